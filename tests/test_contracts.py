"""The contracts on a real anvil: the EIP-3009 payment token (settlement, replay, expiry, forgery,
cancellation; EOAs by ECDSA and contract wallets by ERC-1271, in both signature forms) and the mint
token's exactly-once mints (mintOnce)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.exceptions import ContractLogicError
from web3.logs import DISCARD

from payments.chain import (
    artifact,
    fees_from,
    mint_id_for,
    mint_once_calldata,
    revert_reason,
    rpc_batch,
    sign_tx,
    supports_mint_once,
)
from payments.config import REPO_ROOT
from payments.eip3009 import Authorization
from payments.localstack import Deployment, send_and_wait
from tests.helpers import (
    PRICE,
    authorize,
    balance,
    by_address,
    chain_time,
    deploy_wallet,
    domain,
    wallet_authorize,
)

TWA_VRS = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
TWA_BYTES = "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"


def _vrs(sig: str) -> tuple[int, bytes, bytes]:
    raw = bytes.fromhex(sig[2:])
    return raw[64], raw[:32], raw[32:64]


def _args(a: Authorization) -> list[Any]:
    return [a.payer, a.pay_to, a.value, a.valid_after, a.valid_before, bytes.fromhex(a.nonce[2:])]


def _settle(dep: Deployment, a: Authorization, form: str = "vrs") -> Any:
    token = dep.payment_contract()
    if form == "vrs":
        call = token.get_function_by_signature(TWA_VRS)(*_args(a), *_vrs(a.signature))
    else:
        call = token.get_function_by_signature(TWA_BYTES)(*_args(a), bytes.fromhex(a.signature[2:]))
    return send_and_wait(dep.w3(), dep.signers[0], call)


@pytest.mark.chain
@pytest.mark.parametrize("form", ["vrs", "bytes"])
def test_transfer_with_authorization_moves_funds_once(chain: Deployment, form: str) -> None:
    buyer = chain.buyers[0]
    before = balance(chain, chain.merchant)
    auth = authorize(chain, buyer)
    _settle(chain, auth, form)
    assert balance(chain, chain.merchant) == before + PRICE
    assert chain.payment_contract().functions.authorizationState(buyer.address, bytes.fromhex(auth.nonce[2:])).call()
    with pytest.raises(ContractLogicError, match="used or canceled"):
        _settle(chain, auth, form)  # replay
    assert balance(chain, chain.merchant) == before + PRICE


@pytest.mark.chain
def test_expired_and_not_yet_valid_authorizations_revert(chain: Deployment) -> None:
    now = chain_time(chain)
    with pytest.raises(ContractLogicError, match="expired"):
        _settle(chain, authorize(chain, chain.buyers[0], valid_before=now - 10))
    with pytest.raises(ContractLogicError, match="not yet valid"):
        _settle(chain, authorize(chain, chain.buyers[0], valid_after=now + 3600, valid_before=now + 7200))


@pytest.mark.chain
def test_forged_or_tampered_signatures_revert(chain: Deployment) -> None:
    auth = authorize(chain, chain.buyers[0])
    forged = Authorization(**{**auth.__dict__, "payer": chain.buyers[1].address})  # signed by buyer 0
    with pytest.raises(ContractLogicError, match="invalid signature"):
        _settle(chain, forged)
    tampered = Authorization(**{**auth.__dict__, "value": auth.value * 100})
    with pytest.raises(ContractLogicError, match="invalid signature"):
        _settle(chain, tampered)


@pytest.mark.chain
def test_insufficient_balance_reverts(chain: Deployment) -> None:
    with pytest.raises(ContractLogicError, match="exceeds balance"):
        _settle(chain, authorize(chain, chain.buyers[0], value=10**15))


@pytest.mark.chain
def test_cancel_authorization_blocks_settlement(chain: Deployment) -> None:
    from eth_account import Account

    buyer = chain.buyers[2]
    auth = authorize(chain, buyer)
    cancel_types = {"CancelAuthorization": [{"name": "authorizer", "type": "address"},
                                            {"name": "nonce", "type": "bytes32"}]}
    signed = Account.sign_typed_data(buyer.key, domain(chain).as_dict(), cancel_types,
                                     {"authorizer": buyer.address, "nonce": bytes.fromhex(auth.nonce[2:])})
    sig = bytes(signed.signature)
    token = chain.payment_contract()
    send_and_wait(chain.w3(), chain.signers[0],
                  token.functions.cancelAuthorization(buyer.address, bytes.fromhex(auth.nonce[2:]),
                                                      sig[64], sig[:32], sig[32:64]))
    with pytest.raises(ContractLogicError, match="used or canceled"):
        _settle(chain, auth)


@pytest.mark.chain
def test_receive_with_authorization_needs_the_payee_as_caller(chain: Deployment) -> None:
    auth = authorize(chain, chain.buyers[3])
    token = chain.payment_contract()
    with pytest.raises(ContractLogicError, match="caller must be the payee"):
        send_and_wait(chain.w3(), chain.signers[0],
                      token.functions.receiveWithAuthorization(*_args(auth), *_vrs(auth.signature)))


@pytest.mark.chain
def test_eip712_domain_is_discoverable(chain: Deployment) -> None:
    fields = chain.payment_contract().functions.eip712Domain().call()
    assert fields[1:5] == ["USD Coin", "2", chain.chain_id, chain.w3().to_checksum_address(chain.payment_token)]


# --------------------------------------------------------------------------- contract wallets (ERC-1271)


def _owners(n: int) -> list[LocalAccount]:
    from eth_account import Account

    return by_address([Account.create() for _ in range(n)])


@pytest.mark.chain
@pytest.mark.parametrize(("threshold", "form"), [(1, "vrs"), (1, "bytes"), (2, "bytes")])
def test_a_contract_wallet_pays_with_its_owners_signatures(chain: Deployment, threshold: int, form: str) -> None:
    owners = _owners(2)
    wallet = deploy_wallet(chain, owners, threshold, funds=10 * PRICE)
    before = balance(chain, chain.merchant)
    auth = wallet_authorize(chain, wallet, owners[:threshold])
    assert len(bytes.fromhex(auth.signature[2:])) == 65 * threshold
    receipt = _settle(chain, auth, form)
    (used,) = chain.payment_contract().events.AuthorizationUsed().process_receipt(receipt, errors=DISCARD)
    assert (used.args["authorizer"], used.args["nonce"]) == (wallet, bytes.fromhex(auth.nonce[2:]))
    assert balance(chain, chain.merchant) == before + PRICE and balance(chain, wallet) == 9 * PRICE
    with pytest.raises(ContractLogicError, match="used or canceled"):
        _settle(chain, auth, form)  # replay


@pytest.mark.chain
def test_a_contract_wallet_signature_the_wallet_refuses_reverts(chain: Deployment) -> None:
    owners, stranger = _owners(2), _owners(1)[0]
    single = deploy_wallet(chain, owners[:1], 1, funds=10 * PRICE)
    double = deploy_wallet(chain, owners, 2, funds=10 * PRICE)
    refused = [
        (single, [stranger], "vrs"),  # not an owner
        (single, [stranger], "bytes"),
        (double, owners[:1], "bytes"),  # one of two
        (double, [owners[1], owners[0]], "bytes"),  # not in ascending order
        (double, [owners[0], owners[0]], "bytes"),  # one owner twice
    ]
    for wallet, signers, form in refused:
        with pytest.raises(ContractLogicError, match="invalid signature"):
            _settle(chain, wallet_authorize(chain, wallet, signers), form)
    tampered = Authorization(**{**wallet_authorize(chain, single, owners[:1]).__dict__, "value": 2 * PRICE})
    with pytest.raises(ContractLogicError, match="invalid signature"):
        _settle(chain, tampered, "bytes")
    # an owner's own ECDSA signature does not make the owner's key sign for the wallet as an EOA would
    eoa_style = Authorization(**{**authorize(chain, owners[0]).__dict__, "payer": single})
    with pytest.raises(ContractLogicError, match="invalid signature"):
        _settle(chain, eoa_style)
    # a contract without isValidSignature (the call reverts) never authorizes
    no_erc1271 = wallet_authorize(chain, Web3.to_checksum_address(chain.mint_token), owners[:1])
    with pytest.raises(ContractLogicError, match="invalid signature"):
        _settle(chain, no_erc1271, "bytes")
    assert balance(chain, single) == balance(chain, double) == 10 * PRICE


@pytest.mark.chain
def test_an_eoa_signs_65_bytes_in_either_form(chain: Deployment) -> None:
    auth = authorize(chain, chain.buyers[0])
    longer = Authorization(**{**auth.__dict__, "signature": auth.signature + "00"})
    with pytest.raises(ContractLogicError, match="invalid signature length"):
        _settle(chain, longer, "bytes")
    _settle(chain, auth, "bytes")


@pytest.mark.chain
def test_a_contract_wallet_cancels_an_authorization_by_erc1271(chain: Deployment) -> None:
    from eth_account import Account

    owners = _owners(1)
    wallet = deploy_wallet(chain, owners, 1, funds=10 * PRICE)
    auth = wallet_authorize(chain, wallet, owners)
    cancel_types = {"CancelAuthorization": [{"name": "authorizer", "type": "address"},
                                            {"name": "nonce", "type": "bytes32"}]}
    nonce = bytes.fromhex(auth.nonce[2:])
    sig = bytes(Account.sign_typed_data(owners[0].key, domain(chain).as_dict(), cancel_types,
                                        {"authorizer": wallet, "nonce": nonce}).signature)
    token = chain.payment_contract()
    cancel_bytes = token.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")
    with pytest.raises(ContractLogicError, match="invalid signature"):  # signed for another nonce
        send_and_wait(chain.w3(), chain.signers[0], cancel_bytes(wallet, bytes(32), sig))
    receipt = send_and_wait(chain.w3(), chain.signers[0], cancel_bytes(wallet, nonce, sig))
    (canceled,) = token.events.AuthorizationCanceled().process_receipt(receipt, errors=DISCARD)
    assert canceled.args["authorizer"] == wallet
    with pytest.raises(ContractLogicError, match="used or canceled"):
        _settle(chain, auth, "bytes")
    assert balance(chain, wallet) == 10 * PRICE


@pytest.mark.chain
def test_receive_with_authorization_takes_a_contract_wallet_signature_from_the_payee(chain: Deployment) -> None:
    owners = _owners(2)
    wallet = deploy_wallet(chain, owners, 2, funds=10 * PRICE)
    payee = chain.signers[1]
    auth = wallet_authorize(chain, wallet, owners, pay_to=payee.address)
    from eth_account import Account

    receive_types = {"ReceiveWithAuthorization": [{"name": n, "type": t} for n, t in (
        ("from", "address"), ("to", "address"), ("value", "uint256"), ("validAfter", "uint256"),
        ("validBefore", "uint256"), ("nonce", "bytes32"))]}
    message = {"from": wallet, "to": payee.address, "value": auth.value, "validAfter": 0,
               "validBefore": auth.valid_before, "nonce": bytes.fromhex(auth.nonce[2:])}
    sig = b"".join(bytes(Account.sign_typed_data(o.key, domain(chain).as_dict(), receive_types, message).signature)
                   for o in owners)
    receive = chain.payment_contract().get_function_by_signature(
        "receiveWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")
    with pytest.raises(ContractLogicError, match="invalid signature"):  # a transfer's signature is not a receive's
        send_and_wait(chain.w3(), payee, receive(*_args(auth), bytes.fromhex(auth.signature[2:])))
    send_and_wait(chain.w3(), payee, receive(*_args(auth), sig))
    assert balance(chain, payee.address) == PRICE and balance(chain, wallet) == 9 * PRICE


# --------------------------------------------------------------------------- exactly-once mints

MINT_ID_USED = "MintableToken: mint id already used"


def _mint_token(dep: Deployment) -> Any:
    return dep.w3().eth.contract(address=Web3.to_checksum_address(dep.mint_token),
                                 abi=artifact("MintableToken")["abi"])


def _estimate(dep: Deployment, sender: str, data: bytes) -> Any:
    (answer,) = rpc_batch(dep.w3(), [("eth_estimateGas", [{"from": sender, "to": dep.mint_token,
                                                           "data": "0x" + data.hex()}, "pending"])])
    return answer


def _force(dep: Deployment, account: LocalAccount, data: bytes, gas: int = 200_000) -> Any:
    """Send `data` to the mint token with an explicit gas limit (no estimate), so a reverting call is mined."""
    w3 = dep.w3()
    fees = fees_from(int(w3.eth.get_block("latest")["baseFeePerGas"]), 1)
    tx = sign_tx(account.key, chain_id=dep.chain_id, nonce=w3.eth.get_transaction_count(account.address, "pending"),
                 to=dep.mint_token, data=data, gas=gas, fees=fees)
    return w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(tx.raw), timeout=60)


@pytest.mark.chain
def test_mint_once_mints_once_and_refuses_the_same_id_on_chain(chain: Deployment) -> None:
    token = _mint_token(chain)
    recipient = chain.buyers[0].address
    mint_id = mint_id_for(chain.chain_id, chain.mint_token, 1)
    assert token.functions.mintIdUsed(mint_id).call() is False
    supply = token.functions.totalSupply().call()

    data = mint_once_calldata(recipient, 10**18, mint_id)
    assert _estimate(chain, chain.minter.address, data).ok
    receipt = _force(chain, chain.minter, data)
    assert receipt["status"] == 1
    assert len(receipt["logs"]) == 2
    (transfer,) = token.events.Transfer().process_receipt(receipt, errors=DISCARD)
    assert (transfer.args["from"], transfer.args["to"], transfer.args["value"]) == (
        "0x" + "00" * 20, recipient, 10**18)
    (used,) = token.events.MintIdUsed().process_receipt(receipt, errors=DISCARD)
    assert (used.args["mintId"], used.args["to"], used.args["value"]) == (mint_id, recipient, 10**18)
    assert token.functions.mintIdUsed(mint_id).call() is True
    assert token.functions.balanceOf(recipient).call() == 10**18
    assert token.functions.totalSupply().call() == supply + 10**18

    # The same id again - even to another recipient, for another amount - is refused by the contract.
    for again in (data, mint_once_calldata(chain.buyers[1].address, 5, mint_id)):
        answer = _estimate(chain, chain.minter.address, again)
        assert not answer.ok and revert_reason(answer.error or {}) == MINT_ID_USED
        assert _force(chain, chain.minter, again)["status"] == 0
    with pytest.raises(ContractLogicError, match=MINT_ID_USED):
        send_and_wait(chain.w3(), chain.minter, token.functions.mintOnce(recipient, 10**18, mint_id))
    assert token.functions.totalSupply().call() == supply + 10**18
    assert token.functions.balanceOf(recipient).call() == 10**18
    assert token.functions.balanceOf(chain.buyers[1].address).call() == 0

    # Another id mints; the plain mint still works alongside.
    other = mint_id_for(chain.chain_id, chain.mint_token, 2)
    assert _force(chain, chain.minter, mint_once_calldata(recipient, 3, other))["status"] == 1
    send_and_wait(chain.w3(), chain.minter, token.functions.mint(recipient, 4))
    assert token.functions.totalSupply().call() == supply + 10**18 + 7


@pytest.mark.chain
def test_mint_once_refuses_a_caller_that_is_not_a_minter(chain: Deployment) -> None:
    token = _mint_token(chain)
    outsider = chain.signers[0]  # has ETH, has no minter role
    assert token.functions.isMinter(outsider.address).call() is False
    mint_id = mint_id_for(chain.chain_id, chain.mint_token, 3)
    data = mint_once_calldata(outsider.address, 10**18, mint_id)
    answer = _estimate(chain, outsider.address, data)
    assert not answer.ok and revert_reason(answer.error or {}) == "MintableToken: caller is not a minter"
    assert _force(chain, outsider, data)["status"] == 0
    assert token.functions.mintIdUsed(mint_id).call() is False  # a refused call does not use up the id
    assert token.functions.balanceOf(outsider.address).call() == 0
    assert _force(chain, chain.minter, mint_once_calldata(outsider.address, 1, mint_id))["status"] == 1


@pytest.mark.chain
def test_supports_mint_once_tells_the_mint_token_from_tokens_without_it(chain: Deployment) -> None:
    w3 = chain.w3()
    assert supports_mint_once(w3, chain.mint_token) is True
    assert supports_mint_once(w3, chain.payment_token) is False  # no mintIdUsed: the call reverts
    assert supports_mint_once(w3, chain.merchant) is False  # no code at all: an empty answer


@pytest.mark.skipif(shutil.which("node") is None, reason="node is needed to compile")
def test_committed_artifacts_match_a_fresh_compile() -> None:
    result = subprocess.run(["node", "contracts/compile.js", "--check"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
