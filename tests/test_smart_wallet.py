"""Contract-wallet payers end to end on anvil: an ERC-1271 wallet (the TestSmartWallet fixture, whose owners'
ECDSA signatures make its signature) pays through the API, the send stage settles it in the form its
signature calls for, the confirm stage completes it and the mint is released and minted; a signature the
wallet refuses is refused at intake with nothing written; ERC-6492: a deployed wallet's wrapped signature
settles with the inner signature, an undeployed wallet is refused (no factory is allowed).

The official x402 client signs as an EOA only, so these payloads are built by hand, as a wallet's SDK
would: the x402 `exact` payload with the wallet as `from` and the signature the wallet expects."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from fastapi.testclient import TestClient
from sqlalchemy import text
from web3 import Web3
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.schemas import PaymentPayload, PaymentRequirements

from api.app import ApiConfig, create_app
from payments.chain import artifact
from payments.config import signer_from_key
from payments.eip3009 import Authorization
from payments.localstack import Deployment, deploy, send_and_wait
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.mint import mint_tick
from tasks.send import send_lane_tick
from tests.conftest import rpc
from tests.helpers import (
    PRICE,
    authorize,
    balance,
    by_address,
    deploy_wallet,
    mint_statuses,
    payment,
    statuses,
    wallet_authorize,
)
from tests.test_recovery import FAST

pytestmark = pytest.mark.chain

API_KEY = "test-operator-key"
MINT_PER_UNIT = 10**18
MULTICALL3 = "0xcA11bde05977b3631167028862bE2a173976CA11"
ERC6492_MAGIC = bytes.fromhex("6492" * 16)
VRS_SELECTOR = Web3.keccak(text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,"
                                "bytes32,bytes32)")[:4]
BYTES_SELECTOR = Web3.keccak(text="transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,"
                                  "bytes)")[:4]


@pytest.fixture
def api(pipeline: Pipeline, chain: Deployment) -> Iterator[TestClient]:
    config = ApiConfig(engine=pipeline.engine, chain_id=chain.chain_id, rpc_url=chain.rpc_url,
                       public_url="http://testserver", api_key=API_KEY)
    client = TestClient(create_app(config), raise_server_exceptions=False)
    response = client.put("/api/admin/products/demo-mint", headers={"X-API-Key": API_KEY}, json={
        "mint_token": chain.mint_token, "payment_token": chain.payment_token, "price_per_unit": PRICE,
        "amount_per_unit": MINT_PER_UNIT, "pay_to": chain.merchant, "max_quantity": 100})
    assert response.status_code == 200, response.text
    yield client


def _owners(n: int) -> list[LocalAccount]:
    return by_address([Account.create() for _ in range(n)])


def _requirements(api: TestClient, quantity: int) -> PaymentRequirements:
    response = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": quantity})
    assert response.status_code == 402
    return decode_payment_required_header(response.headers["PAYMENT-REQUIRED"]).accepts[0]  # type: ignore[return-value]


def _pay(api: TestClient, auth: Authorization, quantity: int = 1) -> Any:
    """What a smart wallet's SDK sends: the x402 v2 `exact` payload, the wallet as `from`, its signature."""
    payload = PaymentPayload(x402_version=2, payload={"authorization": auth.as_x402(), "signature": auth.signature},
                             accepted=_requirements(api, quantity))
    return api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": quantity},
                    headers={"PAYMENT-SIGNATURE": encode_payment_signature_header(payload)})


def _nothing_written(pipeline: Pipeline) -> bool:
    with pipeline.engine.connect() as conn:
        return all(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() == 0
                   for t in ("payment_queue", "mint_queue", "payment_events"))


def _mint_balance(chain: Deployment, who: str) -> int:
    w3 = chain.w3()
    token = w3.eth.contract(address=w3.to_checksum_address(chain.mint_token), abi=artifact("MintableToken")["abi"])
    return int(token.functions.balanceOf(w3.to_checksum_address(who)).call())


def _settle_through_the_pipeline(pipeline: Pipeline, chain: Deployment, api: TestClient, pid: str) -> Any:
    """send tick → confirm ticks → mint tick; returns the settlement's receipt."""
    assert send_lane_tick(pipeline, pipeline.signers[0], new_owner_id("t"), FAST).sent == 1
    sent = payment(pipeline.engine, pid)
    assert sent["status"] == "sent", sent["error"]
    receipt = chain.w3().eth.wait_for_transaction_receipt(sent["tx_hash"], timeout=30)
    assert receipt["status"] == 1
    for _ in range(5):
        if api.get(f"/api/payment/{pid}").json()["status"] == "completed":
            break
        confirm_tick(pipeline, "t", FAST)
    status = api.get(f"/api/payment/{pid}").json()
    assert status["status"] == "completed" and status["mints"][0]["status"] == "released", status
    minter = signer_from_key("0x" + bytes(chain.minter.key).hex())
    assert mint_tick(pipeline, minter, "t", FAST).minted == 1
    assert api.get(f"/api/payment/{pid}").json()["mints"][0]["status"] == "minted"
    return receipt


@pytest.mark.parametrize(("threshold", "selector"), [(1, VRS_SELECTOR), (2, BYTES_SELECTOR)], ids=["1of1", "2of2"])
def test_a_contract_wallet_pays_through_the_api_and_gets_its_mint(
        api: TestClient, pipeline: Pipeline, chain: Deployment, threshold: int, selector: bytes) -> None:
    """One owner's 65-byte signature settles in the v,r,s form, two owners' 130 bytes in the bytes form; the
    token asks the wallet (ERC-1271) either way."""
    owners = _owners(2)
    wallet = deploy_wallet(chain, owners, threshold, funds=10 * PRICE)
    merchant_before = balance(chain, chain.merchant)
    auth = wallet_authorize(chain, wallet, owners[:threshold], value=2 * PRICE)
    accepted = _pay(api, auth, quantity=2)
    assert accepted.status_code == 202, accepted.text
    pid = accepted.json()["paymentId"]
    stored = payment(pipeline.engine, pid)
    assert stored["payer"] == wallet.lower() and stored["signature"] == auth.signature.lower()
    assert len(stored["signature"]) == 2 + 130 * threshold
    assert _pay(api, auth, quantity=2).status_code == 200  # the same request again: answered from the queue

    receipt = _settle_through_the_pipeline(pipeline, chain, api, pid)
    tx = chain.w3().eth.get_transaction(receipt["transactionHash"])
    assert bytes(tx["input"])[:4] == selector
    assert balance(chain, chain.merchant) == merchant_before + 2 * PRICE
    assert balance(chain, wallet) == 8 * PRICE
    assert _mint_balance(chain, wallet) == 2 * MINT_PER_UNIT  # the payer is the recipient by default
    assert statuses(pipeline.engine) == {"completed": 1} and mint_statuses(pipeline.engine) == {"minted": 1}


def test_a_signature_the_wallet_refuses_is_402_at_intake_and_writes_nothing(
        api: TestClient, pipeline: Pipeline, chain: Deployment) -> None:
    owners, stranger = _owners(2), _owners(1)[0]
    single = deploy_wallet(chain, owners[:1], 1, funds=10 * PRICE)
    double = deploy_wallet(chain, owners, 2, funds=10 * PRICE)
    refused = {
        "a stranger signs": wallet_authorize(chain, single, [stranger]),
        "a stranger signs in the bytes form": wallet_authorize(chain, single, [stranger, stranger]),
        "one owner of two": wallet_authorize(chain, double, owners[:1]),
        "one owner twice": wallet_authorize(chain, double, [owners[0], owners[0]]),
        "owners out of order": wallet_authorize(chain, double, owners[::-1]),
        "the owner's signature as if the owner paid": Authorization(
            **{**authorize(chain, owners[0]).__dict__, "payer": single}),
        "signed for another amount": Authorization(
            **{**wallet_authorize(chain, single, owners[:1], value=PRICE // 2).__dict__, "value": PRICE}),
    }
    for why, auth in refused.items():
        response = _pay(api, auth)
        assert response.status_code == 402, (why, response.text)
        assert response.json()["error"] == "invalid_exact_evm_payload_signature", (why, response.json())
        assert "PAYMENT-REQUIRED" in response.headers
    # an EOA (no code) cannot send anything but 65 bytes of ECDSA
    eoa = authorize(chain, chain.buyers[0])
    longer = _pay(api, Authorization(**{**eoa.__dict__, "signature": eoa.signature + eoa.signature[2:]}))
    assert longer.status_code == 402 and longer.json()["error"] == "invalid_exact_evm_payload_undeployed_smart_wallet"
    # beyond the queue's bounds: a malformed payload, not a payment problem
    huge = _pay(api, Authorization(**{**eoa.__dict__, "signature": "0x" + "ab" * 2049}))
    assert huge.status_code == 400 and huge.json()["error"] == "invalid_payload"
    assert _nothing_written(pipeline)
    assert balance(chain, single) == balance(chain, double) == 10 * PRICE


# --------------------------------------------------------------------------- ERC-6492


def _factory(chain: Deployment) -> Any:
    w3 = chain.w3()
    address = deploy(w3, chain.deployer, "test/TestSmartWalletFactory")
    return w3.eth.contract(address=w3.to_checksum_address(address), abi=artifact("test/TestSmartWalletFactory")["abi"])


def _wrap_6492(factory: Any, owners: list[LocalAccount], threshold: int, salt: bytes,
               auth: Authorization) -> Authorization:
    calldata = factory.functions.createWallet([o.address for o in owners], threshold, salt)._encode_transaction_data()
    wrapped = encode(["address", "bytes", "bytes"], [factory.address, bytes.fromhex(calldata[2:]),
                                                    bytes.fromhex(auth.signature[2:])]) + ERC6492_MAGIC
    return Authorization(**{**auth.__dict__, "signature": "0x" + wrapped.hex()})


def _install_multicall3(chain: Deployment) -> None:
    """The x402 verifier simulates an ERC-6492 payment through Multicall3 (on every public chain at its
    canonical address); anvil has none, so the fixture's code goes there."""
    w3 = chain.w3()
    deployed = deploy(w3, chain.deployer, "test/TestMulticall3")
    rpc(chain, "anvil_setCode", [MULTICALL3, "0x" + bytes(w3.eth.get_code(w3.to_checksum_address(deployed))).hex()])


def test_a_deployed_wallet_pays_with_an_erc6492_wrapped_signature(
        api: TestClient, pipeline: Pipeline, chain: Deployment) -> None:
    """Wallet SDKs may keep wrapping after deployment: the verifier checks the inner signature by ERC-1271,
    and the pipeline settles with the inner signature (the token knows nothing of ERC-6492)."""
    _install_multicall3(chain)
    owners, salt = _owners(2), secrets.token_bytes(32)
    factory = _factory(chain)
    send_and_wait(chain.w3(), chain.deployer, factory.functions.createWallet([o.address for o in owners], 2, salt))
    wallet = factory.functions.walletAddress([o.address for o in owners], 2, salt).call()
    send_and_wait(chain.w3(), chain.deployer, chain.payment_contract().functions.mint(wallet, 10 * PRICE))
    merchant_before = balance(chain, chain.merchant)
    auth = _wrap_6492(factory, owners, 2, salt, wallet_authorize(chain, wallet, owners))
    accepted = _pay(api, auth)
    assert accepted.status_code == 202, accepted.text
    pid = accepted.json()["paymentId"]
    assert payment(pipeline.engine, pid)["signature"] == auth.signature.lower()  # stored as the buyer sent it
    receipt = _settle_through_the_pipeline(pipeline, chain, api, pid)
    tx_input = bytes(chain.w3().eth.get_transaction(receipt["transactionHash"])["input"])
    assert tx_input[:4] == BYTES_SELECTOR and ERC6492_MAGIC not in tx_input
    assert balance(chain, chain.merchant) == merchant_before + PRICE and balance(chain, wallet) == 9 * PRICE


def test_an_undeployed_wallet_is_refused_at_intake(api: TestClient, pipeline: Pipeline, chain: Deployment) -> None:
    """Settling for a counterfactual wallet needs its deployment first (a factory call from a hot wallet);
    the verifier allows no factory, so such a payment is refused before anything is written."""
    _install_multicall3(chain)
    owners, salt = _owners(1), secrets.token_bytes(32)
    factory = _factory(chain)
    wallet = factory.functions.walletAddress([o.address for o in owners], 1, salt).call()
    send_and_wait(chain.w3(), chain.deployer, chain.payment_contract().functions.mint(wallet, 10 * PRICE))
    assert chain.w3().eth.get_code(wallet) == b""
    auth = _wrap_6492(factory, owners, 1, salt, wallet_authorize(chain, wallet, owners,
                                                                 valid_before=int(time.time()) + 600))
    response = _pay(api, auth)
    assert response.status_code == 402 and response.json()["error"] == "eip6492_factory_not_allowed", response.text
    assert _nothing_written(pipeline) and chain.w3().eth.get_code(wallet) == b""
