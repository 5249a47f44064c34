"""The EIP-3009 payment token on a real anvil: settlement, replay, expiry, forgery, cancellation."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest
from web3.exceptions import ContractLogicError

from payments.config import REPO_ROOT
from payments.eip3009 import Authorization
from payments.localstack import Deployment, send_and_wait
from tests.helpers import PRICE, authorize, balance, chain_time, domain

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


@pytest.mark.skipif(shutil.which("node") is None, reason="node is needed to compile")
def test_committed_artifacts_match_a_fresh_compile() -> None:
    result = subprocess.run(["node", "contracts/compile.js", "--check"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
