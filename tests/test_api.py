"""The x402 API on real PostgreSQL and anvil: the 402 challenge, every rejection reason with nothing
written, idempotency and 409, status with the settlement header, statistics, operator endpoints, a
fuzz of the request surface with no 5xx, and the official x402 client buying end to end."""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import uvicorn
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from x402.http.utils import (
    decode_payment_required_header,
    decode_payment_response_header,
    encode_payment_signature_header,
)
from x402.schemas import PaymentPayload, PaymentRequirements

from api.app import ApiConfig, create_app
from payments.config import signer_from_key
from payments.db import query
from payments.eip3009 import Authorization
from payments.localstack import Deployment
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.send import send_lane_tick
from tests.helpers import PRICE, authorize, balance, chain_time, mint_statuses, statuses
from tests.test_recovery import FAST, _settle_directly

pytestmark = pytest.mark.chain

API_KEY = "test-operator-key"
MINT_PER_UNIT = 10**18


@pytest.fixture
def api(pipeline: Pipeline, chain: Deployment) -> Iterator[TestClient]:
    config = ApiConfig(engine=pipeline.engine, chain_id=chain.chain_id, rpc_url=chain.rpc_url,
                       public_url="http://testserver", api_key=API_KEY)  # simulates from an address, no key
    client = TestClient(create_app(config), raise_server_exceptions=False)
    response = client.put("/api/admin/products/demo-mint", headers={"X-API-Key": API_KEY}, json={
        "mint_token": chain.mint_token, "payment_token": chain.payment_token, "price_per_unit": PRICE,
        "amount_per_unit": MINT_PER_UNIT, "pay_to": chain.merchant, "max_quantity": 100})
    assert response.status_code == 200, response.text
    yield client


def _requirements(api: TestClient, quantity: int = 1) -> PaymentRequirements:
    response = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": quantity})
    assert response.status_code == 402
    return decode_payment_required_header(response.headers["PAYMENT-REQUIRED"]).accepts[0]  # type: ignore[return-value]


def _header(req: PaymentRequirements, auth: Authorization, **accepted: Any) -> str:
    payload = PaymentPayload(x402_version=2, payload={"authorization": auth.as_x402(), "signature": auth.signature},
                             accepted=req.model_copy(update=accepted))
    return encode_payment_signature_header(payload)


def _buy(api: TestClient, header: str, quantity: int = 1, **body: Any) -> Any:
    return api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": quantity, **body},
                    headers={"PAYMENT-SIGNATURE": header})


def _nothing_written(pipeline: Pipeline) -> bool:
    with pipeline.engine.connect() as conn:
        return all(conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() == 0
                   for t in ("payment_queue", "mint_queue", "payment_events"))


def test_challenge_carries_the_x402_requirements(api: TestClient, chain: Deployment) -> None:
    response = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 3})
    assert response.status_code == 402
    required = decode_payment_required_header(response.headers["PAYMENT-REQUIRED"])
    assert required.x402_version == 2 and required.resource is not None
    assert required.resource.url == "http://testserver/api/x402-batch-mint"
    (req,) = required.accepts
    assert (req.scheme, req.network, req.amount) == ("exact", "eip155:31337", str(3 * PRICE))
    assert req.pay_to.lower() == chain.merchant.lower() and req.asset.lower() == chain.payment_token.lower()
    assert req.max_timeout_seconds == 300 and req.extra == {"name": "USD Coin", "version": "2"}
    assert response.json()["accepts"][0]["amount"] == str(3 * PRICE)  # no v1 name for 31337: v2 body
    by_address = api.post("/api/x402-batch-mint", json={"token": chain.mint_token, "quantity": 1})
    assert by_address.status_code == 402


def test_valid_payment_is_queued_with_its_mint(api: TestClient, pipeline: Pipeline, chain: Deployment) -> None:
    req = _requirements(api, 2)
    buyer, friend = chain.buyers[0], chain.buyers[1]
    response = _buy(api, _header(req, authorize(chain, buyer, value=2 * PRICE)), 2, recipient=friend.address)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "pending" and body["statusUrl"].endswith(body["paymentId"])
    with pipeline.engine.connect() as conn:
        mint = conn.execute(text("SELECT recipient, amount, status FROM mint_queue")).one()
    assert (mint.recipient, int(mint.amount), mint.status) == (friend.address.lower(), 2 * MINT_PER_UNIT, "waiting")


def test_the_same_authorization_is_idempotent_and_a_changed_body_is_409(api: TestClient, chain: Deployment) -> None:
    req = _requirements(api)
    auth = authorize(chain, chain.buyers[0])
    first = _buy(api, _header(req, auth))
    again = _buy(api, _header(req, auth))
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["paymentId"] == again.json()["paymentId"]
    double = authorize(chain, chain.buyers[0], value=2 * PRICE, nonce=auth.nonce)
    conflict = _buy(api, _header(_requirements(api, 2), double), 2)
    assert conflict.status_code == 409 and conflict.json()["error"] == "duplicate_authorization"
    assert conflict.json()["paymentId"] == first.json()["paymentId"]


def test_replays_get_the_payment_and_its_current_status_before_any_verification(
        api: TestClient, pipeline: Pipeline, chain: Deployment) -> None:
    req = _requirements(api)
    buyer, friend = chain.buyers[0], chain.buyers[1]
    header = _header(req, authorize(chain, buyer))
    first = _buy(api, header)
    assert first.status_code == 202, first.text
    pid = first.json()["paymentId"]
    send_lane_tick(pipeline, pipeline.signers[0], new_owner_id("t"), FAST)
    confirm_tick(pipeline, "t", FAST)
    replay = _buy(api, header)  # the chain now calls this nonce used: the replay is still the same request
    assert replay.status_code == 200, replay.text
    assert replay.json()["paymentId"] == pid and replay.json()["status"] == "completed"
    for changed in ({"recipient": friend.address}, {"quantity": 2}):
        conflict = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1, **changed},
                            headers={"PAYMENT-SIGNATURE": header})
        assert conflict.status_code == 409 and conflict.json()["paymentId"] == pid, (changed, conflict.text)
    api.put("/api/admin/products/second", headers={"X-API-Key": API_KEY}, json={
        "mint_token": chain.deployer.address, "payment_token": chain.payment_token, "price_per_unit": PRICE,
        "amount_per_unit": MINT_PER_UNIT, "pay_to": chain.merchant})
    other_product = api.post("/api/x402-batch-mint", json={"token": "second", "quantity": 1},
                             headers={"PAYMENT-SIGNATURE": header})
    assert other_product.status_code == 409, other_product.text
    assert statuses(pipeline.engine) == {"completed": 1} and mint_statuses(pipeline.engine) == {"released": 1}


def _fund_new_buyer(chain: Deployment, amount: int) -> Any:
    from eth_account import Account

    from payments.localstack import send_and_wait

    buyer = Account.create()
    token = chain.payment_contract()
    send_and_wait(chain.w3(), chain.deployer, token.functions.mint(buyer.address, amount))
    return buyer


def test_a_payer_cannot_queue_more_than_its_balance_covers(api: TestClient, pipeline: Pipeline,
                                                           chain: Deployment) -> None:
    """A buyer holding 3 units sends two 2-unit payments at once: each alone is covered (and passes the
    x402 balance simulation), together they are not, so at most one is accepted."""
    from concurrent.futures import ThreadPoolExecutor

    buyers = [_fund_new_buyer(chain, 3 * PRICE) for _ in range(3)]  # three pairs at once: three races
    req = _requirements(api, 2)
    headers = [_header(req, authorize(chain, b, value=2 * PRICE)) for b in buyers for _ in range(2)]
    with ThreadPoolExecutor(len(headers)) as pool:
        answers = list(pool.map(lambda h: _buy(api, h, 2), headers))
    for pair in (answers[0:2], answers[2:4], answers[4:6]):
        assert sorted(a.status_code for a in pair) == [202, 402], [a.text for a in pair]
        refused = next(a for a in pair if a.status_code == 402)
        assert refused.json()["error"] == "insufficient_funds" and "PAYMENT-REQUIRED" in refused.headers
    assert statuses(pipeline.engine) == {"pending": 3}
    buyer = buyers[0]
    one_more = _buy(api, _header(_requirements(api), authorize(chain, buyer)))  # 2 open + 1 <= 3
    assert one_more.status_code == 202, one_more.text
    key = {"X-API-Key": API_KEY}
    assert api.put("/api/admin/settings/max_open_payments_per_payer", json={"value": "2"}, headers=key).is_success
    rich = chain.buyers[0]
    assert _buy(api, _header(_requirements(api), authorize(chain, rich))).status_code == 202
    assert _buy(api, _header(_requirements(api), authorize(chain, rich))).status_code == 202
    capped = _buy(api, _header(_requirements(api), authorize(chain, rich)))
    assert capped.status_code == 402 and capped.json()["error"] == "insufficient_funds"
    assert "open payments" in capped.json()["message"]


def test_every_rejection_has_a_reason_and_writes_nothing(api: TestClient, pipeline: Pipeline,
                                                         chain: Deployment) -> None:
    req = _requirements(api)
    buyer = chain.buyers[2]
    now = chain_time(chain)
    used = authorize(chain, buyer)
    _settle_directly(chain, used)
    forged = authorize(chain, buyer)
    forged = Authorization(**{**forged.__dict__, "payer": chain.buyers[3].address})
    cases = {
        "invalid_exact_evm_payload_authorization_value_mismatch": _header(req, authorize(chain, buyer,
                                                                                       value=PRICE - 1)),
        "invalid_exact_evm_payload_recipient_mismatch": _header(req, authorize(chain, buyer, pay_to=buyer.address)),
        "invalid_exact_evm_payload_authorization_valid_before": _header(req, authorize(chain, buyer,
                                                                                     valid_before=now - 60)),
        "invalid_exact_evm_payload_authorization_valid_after": _header(req, authorize(
            chain, buyer, valid_after=int(time.time()) + 3600, valid_before=int(time.time()) + 7200)),
        "invalid_exact_evm_payload_signature": _header(req, forged),
        "invalid_exact_evm_nonce_already_used": _header(req, used),
        "unsupported_scheme": _header(req, authorize(chain, buyer), scheme="upto"),
        "invalid_network": _header(req, authorize(chain, buyer), network="eip155:1"),
        "invalid_payload": base64.b64encode(b"not json").decode(),
    }
    # a product that costs more than a buyer's 1,000 tokens
    expensive = 2_000 * 10**6
    api.put("/api/admin/products/pricey", headers={"X-API-Key": API_KEY}, json={
        "mint_token": chain.deployer.address, "payment_token": chain.payment_token, "price_per_unit": expensive,
        "amount_per_unit": 1, "pay_to": chain.merchant})
    pricey = api.post("/api/x402-batch-mint", json={"token": "pricey", "quantity": 1})
    pricey_req = decode_payment_required_header(pricey.headers["PAYMENT-REQUIRED"]).accepts[0]
    cases["invalid_exact_evm_insufficient_balance"] = _header(
        pricey_req, authorize(chain, chain.buyers[4], value=expensive))  # type: ignore[arg-type]
    for reason, header in cases.items():
        token = "pricey" if reason == "invalid_exact_evm_insufficient_balance" else "demo-mint"
        response = api.post("/api/x402-batch-mint", json={"token": token, "quantity": 1},
                            headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == (400 if reason == "invalid_payload" else 402), (reason, response.text)
        assert response.json()["error"] == reason, (reason, response.json())
        assert "PAYMENT-REQUIRED" in response.headers
    assert _nothing_written(pipeline)


def test_request_errors_are_4xx_without_internals(api: TestClient) -> None:
    unknown = api.post("/api/x402-batch-mint", json={"token": "nope", "quantity": 1})
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_token"
    bad = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 0, "recipient": "x"})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"
    assert "quantity" in bad.json()["message"] and "Traceback" not in bad.text
    too_many = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 101})
    assert too_many.status_code == 422 and too_many.json()["error"] == "quantity_too_large"
    huge = api.post("/api/x402-batch-mint", content=b"{" + b" " * 20_000 + b"}",
                    headers={"Content-Type": "application/json"})
    assert huge.status_code == 413
    assert api.get("/api/payment/pay_doesnotexist").status_code == 404
    assert api.get("/api/payment/%00").status_code == 422  # found by the fuzz: NUL must not reach SQL
    nul = api.post("/api/x402-batch-mint", json={"token": "demo\u0000mint", "quantity": 1})
    assert nul.status_code == 422 and nul.json()["error"] == "invalid_request"


def test_bodies_are_limited_whatever_the_transfer_encoding(api: TestClient) -> None:
    def chunks(data: bytes, size: int = 1000) -> Iterator[bytes]:
        yield from (data[i : i + size] for i in range(0, len(data), size))

    deep = b"[" * 100_000 + b"]" * 100_000
    for path, method in (("/api/x402-batch-mint", "POST"), ("/api/admin/settings/payment_batch_size", "PUT")):
        chunked = api.request(method, path, content=chunks(deep), headers={"Content-Type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"] == "request_too_large", chunked.text
        assert "content-length" not in chunked.request.headers  # really sent chunked
        nested = b'{"token": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
        assert len(nested) < 16 * 1024
        deep_small = api.request(method, path, content=chunks(nested), headers={"Content-Type": "application/json"})
        assert deep_small.status_code == 400 and deep_small.json()["error"] == "json_too_deep", deep_small.text
    ok_depth = {"token": "demo-mint", "quantity": 1, "recipient": None, "x": [[[[[[[[[[1]]]]]]]]]]}
    assert api.post("/api/x402-batch-mint", json=ok_depth).status_code == 402
    header = base64.b64encode(b"[" * 5_000 + b"]" * 5_000).decode()
    deep_header = _buy(api, header)
    assert deep_header.status_code < 500 and deep_header.json()["error"] == "invalid_payload"


def test_the_api_process_keeps_the_default_recursion_limit() -> None:
    """py_ecc raises the limit to 100,000 on import; with that, JSON nested 99,000 deep overflows a worker
    thread's C stack (SIGSEGV, exit -11) instead of raising RecursionError. Checked in a fresh interpreter
    that imports what the API process imports."""
    import subprocess
    import sys

    from payments.config import REPO_ROOT

    script = ("import sys, json, threading\n"
              "import api.__main__, api.app, api.x402, payments.chain, x402.mechanisms.evm.exact.facilitator\n"
              "print(sys.getrecursionlimit())\n"
              "def parse():\n"
              "    try:\n        json.loads('[' * 99000 + ']' * 99000)\n"
              "    except RecursionError:\n        print('refused')\n"
              "worker = threading.Thread(target=parse)\nworker.start()\nworker.join()\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    limit, outcome = result.stdout.split()
    assert int(limit) <= 1000 and outcome == "refused"


def _raw_header(req: PaymentRequirements, auth: Authorization, **fields: Any) -> str:
    """A payment header whose authorization fields are replaced by raw JSON text (1e400, NaN, ...)."""
    authorization = auth.as_x402()
    marks = {name: f"@@{name}@@" for name in fields}
    payload = {"x402Version": 2, "payload": {"authorization": {**authorization, **marks}, "signature": auth.signature},
               "accepted": req.model_dump(by_alias=True)}
    text_ = json.dumps(payload)
    for name, raw in fields.items():
        text_ = text_.replace(f'"@@{name}@@"', raw)
    return base64.b64encode(text_.encode()).decode()


def test_absurd_numbers_and_keys_are_4xx(api: TestClient, pipeline: Pipeline, chain: Deployment) -> None:
    req = _requirements(api)
    auth = authorize(chain, chain.buyers[0])
    for field_ in ("value", "validAfter", "validBefore"):
        for raw in ("1e400", "-1e400", "Infinity", "-Infinity", "NaN", "1.5", "true", '"0x10"', '"1e3"', str(2**256),
                    "-1", "null", '"\u0661"'):
            response = _buy(api, _raw_header(req, auth, **{field_: raw}))
            assert response.status_code == 400, (field_, raw, response.text)
            assert response.json()["error"] == "invalid_payload" and "PAYMENT-REQUIRED" in response.headers
    for field_, raw in (("nonce", json.dumps(auth.nonce + "\n")), ("from", json.dumps(auth.payer + "\n")),
                        ("to", json.dumps(auth.pay_to + "\n")), ("value", json.dumps(str(auth.value) + "\n"))):
        response = _buy(api, _raw_header(req, auth, **{field_: raw}))  # a trailing newline is not a value
        assert 400 <= response.status_code < 500, (field_, response.status_code, response.text)
    for key in ("é", "\u00ff" * 40, "key\u0080", API_KEY + "é"):
        refused = api.put("/api/admin/settings/payment_batch_size", json={"value": "50"},
                          headers={"X-API-Key": key.encode("utf-8")})
        assert refused.status_code == 401, (key, refused.text)
    product = {"mint_token": chain.mint_token, "payment_token": chain.payment_token, "price_per_unit": PRICE,
               "amount_per_unit": 1, "pay_to": chain.merchant}
    taken = api.put("/api/admin/products/other", headers={"X-API-Key": API_KEY}, json=product)
    assert taken.status_code == 409 and taken.json()["error"] == "mint_token_in_use", taken.text
    assert "duplicate key" not in taken.text
    assert _nothing_written(pipeline)


def test_status_shows_progress_and_the_settlement_response(api: TestClient, pipeline: Pipeline,
                                                          chain: Deployment) -> None:
    req = _requirements(api)
    pid = _buy(api, _header(req, authorize(chain, chain.buyers[0]))).json()["paymentId"]
    pending = api.get(f"/api/payment/{pid}")
    assert pending.json()["status"] == "pending" and not pending.json()["final"]
    assert "PAYMENT-RESPONSE" not in pending.headers
    send_lane_tick(pipeline, pipeline.signers[0], new_owner_id("t"), FAST)
    sent = api.get(f"/api/payment/{pid}").json()
    assert sent["status"] == "sent" and sent["transaction"] and sent["transactions"][0]["state"] == "broadcast"
    confirm_tick(pipeline, "t", FAST)
    done = api.get(f"/api/payment/{pid}")
    body = done.json()
    assert body["status"] == "completed" and body["final"] and not body["failed"]
    assert body["mints"] == [{"token": chain.mint_token.lower(), "recipient": chain.buyers[0].address.lower(),
                              "amount": str(MINT_PER_UNIT), "status": "released", "transaction": None}]
    settled = decode_payment_response_header(done.headers["PAYMENT-RESPONSE"])
    assert settled.success and settled.transaction == body["transaction"] and settled.network == "eip155:31337"
    assert settled.payer is not None and settled.payer.lower() == chain.buyers[0].address.lower()


def test_stats_count_all_six_statuses(api: TestClient, chain: Deployment) -> None:
    req = _requirements(api)
    _buy(api, _header(req, authorize(chain, chain.buyers[0])))
    stats = api.get("/api/payment-stats").json()
    assert set(stats["counts"]) == {"pending", "processing", "sent", "completed", "failed", "confirmation_failed"}
    assert stats["counts"]["pending"] == 1 and stats["queueDepth"] == 1
    assert {"oldestSentAgeSeconds", "confirmationRate", "processingTimeP50Seconds",
            "processingTimeP95Seconds"} <= set(stats)


def _plan_nodes(plan: Any) -> list[tuple[str, str | None]]:
    nodes = [(str(plan["Node Type"]), plan.get("Relation Name"))]
    for child in plan.get("Plans", []):
        nodes += _plan_nodes(child)
    return nodes


def test_stats_stay_cheap_on_a_large_table(api: TestClient, pipeline: Pipeline) -> None:
    """40,000 payments (90 % completed): the stats endpoint reads only indexes of the open part of the
    queue and the monitor's latest sample; no plan scans payment_queue sequentially."""
    from tasks.monitor import compute_metrics, read_thresholds, record_sample

    rows = int(os.environ.get("STATS_TEST_ROWS", "40000"))  # STATS_TEST_ROWS=1000000 for the README figure
    with pipeline.engine.begin() as conn:
        conn.execute(text("SET LOCAL session_replication_role = replica"))  # bulk load without audit triggers
        conn.execute(text(
            "INSERT INTO payment_queue (id, chain_id, token, payer, pay_to, amount, valid_after, valid_before,"
            " auth_nonce, signature, \"authorization\", status, signer, tx_nonce, tx_hash, processed_at, sent_at,"
            " confirmed_at, block_number, lease_expires_at, created_at, updated_at) "
            "SELECT 'pay_bulk' || i, 31337, '0x' || repeat('aa', 20), '0x' || lpad(to_hex(i % 5000), 40, '0'),"
            " '0x' || repeat('bb', 20), 1000000, 0, 2000000000, '0x' || lpad(to_hex(i), 64, '0'),"
            " '0x' || repeat('cc', 65), '{}',"
            " CASE WHEN i % 20 = 0 THEN 'pending' WHEN i % 20 = 1 THEN 'sent' ELSE 'completed' END,"
            " CASE WHEN i % 20 = 0 THEN NULL ELSE '0x' || repeat('dd', 20) END,"
            " CASE WHEN i % 20 = 0 THEN NULL ELSE i END,"
            " CASE WHEN i % 20 = 0 THEN NULL ELSE '0x' || lpad(to_hex(i), 64, '0') END,"
            " CASE WHEN i % 20 = 0 THEN NULL ELSE now() - interval '30 seconds' END,"
            " CASE WHEN i % 20 = 0 THEN NULL ELSE now() - interval '20 seconds' END,"
            " CASE WHEN i % 20 > 1 THEN now() END, CASE WHEN i % 20 > 1 THEN 1 END, NULL,"
            " now() - interval '3 hours', CASE WHEN i % 1000 = 2 THEN now() ELSE now() - interval '2 hours' END "
            "FROM generate_series(1, :n) AS i"), {"n": rows})
    with pipeline.engine.connect() as conn:
        conn.execute(text("ANALYZE payment_queue"))
        conn.commit()
        for name, params in (("open_queue_figures", {"cap": 10_000}), ("latest_monitor_sample", {}),
                             ("payer_open_exposure", {"chain_id": 31337, "token": "0x" + "aa" * 20,
                                                      "payer": "0x" + "00" * 19 + "01"})):
            plan = conn.execute(text("EXPLAIN (FORMAT JSON) " + str(query(name))), params).scalar_one()
            nodes = _plan_nodes(plan[0]["Plan"])
            assert ("Seq Scan", "payment_queue") not in nodes, (name, nodes)
        record_sample(pipeline.engine, compute_metrics(conn, read_thresholds(conn)), 7, 60)
    time.sleep(1.1)  # past the one-second answer cache
    started = time.perf_counter()
    stats = api.get("/api/payment-stats").json()
    elapsed = time.perf_counter() - started
    assert stats["counts"] == {"pending": rows // 20, "processing": 0, "sent": rows // 20,
                               "completed": rows * 18 // 20, "failed": 0, "confirmation_failed": 0}, stats
    assert stats["sampledAt"] and stats["confirmationRate"] == 1.0 and stats["oldestSentAgeSeconds"] >= 20
    print(f"payment-stats over {rows} payments: {elapsed * 1000:.1f} ms")  # the plans above are the check


def test_docs_are_served_without_a_cdn(api: TestClient) -> None:
    import re

    for page in ("/docs", "/redoc"):
        html = api.get(page)
        assert html.status_code == 200 and "<html" in html.text.lower()
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert assets and all(a.startswith("/") for a in assets), assets  # nothing from another host
        for asset in assets:
            if not asset.endswith("openapi.json"):
                assert api.get(asset).status_code == 200, asset
    assert "cdn" not in api.get("/docs").text.lower()


def test_operator_endpoints_need_the_api_key(api: TestClient) -> None:
    assert api.put("/api/admin/settings/payment_batch_size", json={"value": "50"}).status_code == 401
    wrong = api.put("/api/admin/settings/payment_batch_size", json={"value": "50"}, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401
    ok = api.put("/api/admin/settings/payment_batch_size", json={"value": "50"}, headers={"X-API-Key": API_KEY})
    assert ok.status_code == 200
    invalid = api.put("/api/admin/settings/payment_batch_size", json={"value": "0"}, headers={"X-API-Key": API_KEY})
    assert invalid.status_code == 422 and invalid.json()["error"] == "invalid_setting"
    hook = {"product_id": "demo-mint", "url": "https://merchant.example/hooks", "secret_ref": "env:MERCHANT_SECRET"}
    assert api.put("/api/admin/webhooks", json=hook).status_code == 401
    assert api.put("/api/admin/webhooks", json=hook, headers={"X-API-Key": API_KEY}).status_code == 200
    unknown = api.put("/api/admin/webhooks", json={**hook, "product_id": "nope"}, headers={"X-API-Key": API_KEY})
    assert unknown.status_code == 404
    secret_in_body = api.put("/api/admin/webhooks", json={**hook, "secret_ref": "whsec_plain"},
                             headers={"X-API-Key": API_KEY})
    assert secret_in_body.status_code == 422  # secrets are referenced, never stored


def test_settings_are_checked_against_the_registry(api: TestClient) -> None:
    key = {"X-API-Key": API_KEY}
    for name in ("alert_sent_age_seconds", "alert_confirmation_rate_min", "monitor_window_minutes",
                 "alert_queue_trend_samples", "webhook_backoff_seconds", "max_open_payments_per_payer"):
        for value in ("abc", "nan", "0x10", "Infinity", "1e400", "-1", "99999999999"):
            refused = api.put(f"/api/admin/settings/{name}", json={"value": value}, headers=key)
            assert refused.status_code == 422, (name, value, refused.text)
            body = refused.json()
            assert body["error"] == "invalid_setting" and body["setting"] == name and name in body["message"]
            assert {"type", "min", "max"} <= set(body) and str(body["max"]) in body["message"]
        assert api.get("/api/payment-stats").status_code == 200
    unknown = api.put("/api/admin/settings/no_such_setting", json={"value": "1"}, headers=key)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_setting"
    ok = api.put("/api/admin/settings/alert_confirmation_rate_min", json={"value": "0.75"}, headers=key)
    assert ok.status_code == 200 and ok.json() == {"key": "alert_confirmation_rate_min", "value": "0.75"}
    listed = {s["name"]: s for s in api.get("/api/admin/settings", headers=key).json()["settings"]}
    assert listed["alert_confirmation_rate_min"]["value"] == "0.75"
    assert listed["max_open_payments_per_payer"]["min"] == 1 and listed["payment_batch_size"]["default"] == 10
    assert api.get("/api/admin/settings").status_code == 401


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_api_verifies_without_a_private_key(api: TestClient, chain: Deployment, embedded_db_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import fields

    from api.x402 import Verifier

    assert not [f.name for f in fields(ApiConfig) if "key" in f.name and f.name != "api_key"]
    verifier = Verifier(chain.rpc_url, "0x000000000000000000000000000000000000dEaD")
    assert not hasattr(verifier.signer._account, "key")
    with pytest.raises(PermissionError):
        verifier.signer.send_transaction(chain.merchant, b"")
    with pytest.raises(PermissionError):
        verifier.signer.write_contract(chain.payment_token, [], "transfer")
    for name in ("SIGNER_PRIVATE_KEYS", "SIGNER_KEY_SECRET_BLOCKS", "MINTER_PRIVATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RPC_URL", chain.rpc_url)
    monkeypatch.setenv("DATABASE_URL", embedded_db_url)
    config = ApiConfig.from_env()  # no key anywhere in the environment
    assert config.simulation_from.lower() == "0x000000000000000000000000000000000000dead"
    config.engine.dispose()


def test_outages_are_503_with_retry_after_not_the_buyers_fault(api: TestClient, pipeline: Pipeline,
                                                               chain: Deployment) -> None:
    from payments.db import make_engine

    req = _requirements(api)
    header = _header(req, authorize(chain, chain.buyers[0]))
    rpc_down = TestClient(create_app(ApiConfig(engine=pipeline.engine, chain_id=chain.chain_id,
                                               rpc_url=f"http://127.0.0.1:{_closed_port()}")),
                          raise_server_exceptions=False)
    refused = _buy(rpc_down, header)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "chain_unavailable" and refused.headers["Retry-After"] == "5"
    assert "Connection" not in refused.text and "127.0.0.1" not in refused.text
    assert _nothing_written(pipeline)
    dead = make_engine(f"postgresql://payments@127.0.0.1:{_closed_port()}/payments", connect_timeout=2)
    db_down = TestClient(create_app(ApiConfig(engine=dead, chain_id=chain.chain_id, rpc_url=chain.rpc_url)),
                         raise_server_exceptions=False)
    for response in (db_down.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1}),
                     _buy(db_down, header), db_down.get("/api/payment/pay_0123456789"),
                     db_down.get("/api/payment-stats")):
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "database_unavailable" and response.headers["Retry-After"] == "5"
        assert "psycopg" not in response.text and "127.0.0.1" not in response.text
    dead.dispose()
    assert _buy(api, header).status_code == 202  # the same payment once both are back


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.none(), st.dictionaries(st.sampled_from(["token", "quantity", "recipient", "x"]),
                                                 st.one_of(st.none(), st.integers(), st.text(max_size=50),
                                                           st.booleans()), max_size=4)),
       header=st.one_of(st.none(), st.text(max_size=200), st.binary(max_size=200).map(
           lambda b: base64.b64encode(b).decode())))
def test_fuzzed_requests_never_cause_a_server_error(api: TestClient, body: Any, header: str | None) -> None:
    headers = {"PAYMENT-SIGNATURE": header} if header and header.isascii() and header.isprintable() else {}
    response = api.post("/api/x402-batch-mint", content=json.dumps(body), headers={
        "Content-Type": "application/json", **headers})
    assert response.status_code < 500, response.text
    assert api.get(f"/api/payment/{quote((header or 'x')[:60], safe='')}").status_code < 500


# --------------------------------------------------------------------------- the official client, end to end


@pytest.fixture
def live_api(pipeline: Pipeline, chain: Deployment, api: TestClient) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ApiConfig(engine=pipeline.engine, chain_id=chain.chain_id, rpc_url=chain.rpc_url,
                       simulation_from=chain.signers[0].address, public_url=f"http://127.0.0.1:{port}")
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_the_official_x402_client_buys_and_gets_its_mint(live_api: str, pipeline: Pipeline,
                                                        chain: Deployment) -> None:
    """The buyer CLI's building blocks (official x402 client underneath) against a live server."""
    from api.buyer import paying_session, settled, submit, wait_final
    from tasks.mint import mint_tick

    buyer = chain.buyers[5]
    session = paying_session("0x" + bytes(buyer.key).hex())
    before = balance(chain, chain.merchant)
    w3 = chain.w3()
    mint_token = w3.eth.contract(address=w3.to_checksum_address(chain.mint_token), abi=chain.payment_contract().abi)
    minted_before = int(mint_token.functions.balanceOf(buyer.address).call())
    accepted = submit(session, live_api, "demo-mint", 2)
    assert accepted["status"] == "pending"
    send_lane_tick(pipeline, pipeline.signers[0], new_owner_id("t"), FAST)
    confirm_tick(pipeline, "t", FAST)
    paid = session.get(accepted["statusUrl"], timeout=30)
    assert paid.json()["status"] == "completed" and not settled(paid.json())  # mint not yet sent
    assert decode_payment_response_header(paid.headers["PAYMENT-RESPONSE"]).success
    minter = signer_from_key("0x" + bytes(chain.minter.key).hex())
    assert mint_tick(pipeline, minter, "t", FAST).minted == 1
    final = wait_final(session, accepted["statusUrl"], timeout=10)
    assert settled(final) and final["mints"][0]["status"] == "minted" and final["mints"][0]["transaction"]
    assert balance(chain, chain.merchant) == before + 2 * PRICE
    assert int(mint_token.functions.balanceOf(buyer.address).call()) == minted_before + 2 * MINT_PER_UNIT
    assert mint_tick(pipeline, minter, "t", FAST).minted == 0  # minted once: nothing more on the next tick
    assert int(mint_token.functions.balanceOf(buyer.address).call()) == minted_before + 2 * MINT_PER_UNIT
    assert statuses(pipeline.engine) == {"completed": 1} and mint_statuses(pipeline.engine) == {"minted": 1}


def test_the_buyer_cli_exits_2_when_refused(live_api: str) -> None:
    import subprocess
    import sys

    from payments.config import REPO_ROOT

    broke = "0x" + "11" * 32  # a key with no funds: the API refuses with insufficient balance
    result = subprocess.run([sys.executable, "-m", "api.buyer", "--url", live_api, "--quantity", "1"],
                            env={**os.environ, "BUYER_PRIVATE_KEY": broke}, cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "invalid_exact_evm_insufficient_balance" in result.stderr
    assert broke[2:] not in result.stdout + result.stderr  # the key is never printed


# --------------------------------------------------------------------------- x402 version 1


@pytest.fixture(scope="module")
def v1_chain() -> Iterator[Deployment]:
    """A chain with a v1 network name: anvil as base-sepolia (84532)."""
    from payments.localstack import deploy_payment_stack, start_anvil

    node = start_anvil(extra=["--chain-id", "84532"])
    try:
        yield deploy_payment_stack(node.url, buyers=2, buyer_balance=100 * 10**6)
    finally:
        node.stop()


def test_version_1_clients_pay_with_x_payment(v1_chain: Deployment, embedded_engine: Any) -> None:
    from x402.http.utils import encode_payment_signature_header as encode
    from x402.schemas.v1 import PaymentPayloadV1

    from payments.config import signer_from_key as key_signer
    from tasks.common import Pipeline as Lane

    chain = v1_chain
    config = ApiConfig(engine=embedded_engine, chain_id=84532, rpc_url=chain.rpc_url,
                       simulation_from=chain.signers[0].address, public_url="http://testserver",
                       api_key=API_KEY)
    api = TestClient(create_app(config), raise_server_exceptions=False)
    api.put("/api/admin/products/demo-mint", headers={"X-API-Key": API_KEY}, json={
        "mint_token": chain.mint_token, "payment_token": chain.payment_token, "price_per_unit": PRICE,
        "amount_per_unit": MINT_PER_UNIT, "pay_to": chain.merchant})
    challenge = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1})
    body = challenge.json()
    assert challenge.status_code == 402 and body["x402Version"] == 1
    (req,) = body["accepts"]
    assert (req["scheme"], req["network"], req["maxAmountRequired"]) == ("exact", "base-sepolia", str(PRICE))
    assert req["resource"] == "http://testserver/api/x402-batch-mint" and req["extra"]["version"] == "2"
    auth = authorize(chain, chain.buyers[0])
    payload = PaymentPayloadV1(x402_version=1, scheme="exact", network="base-sepolia",
                               payload={"authorization": auth.as_x402(), "signature": auth.signature})
    wrong_network = PaymentPayloadV1(x402_version=1, scheme="exact", network="base",
                                     payload={"authorization": auth.as_x402(), "signature": auth.signature})
    refused = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1},
                       headers={"X-PAYMENT": encode(wrong_network)})
    assert refused.status_code == 402 and refused.json()["error"] == "invalid_network"
    accepted = api.post("/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1},
                        headers={"X-PAYMENT": encode(payload)})
    assert accepted.status_code == 202, accepted.text
    lane = Lane(engine=embedded_engine, w3=chain.w3(), chain_id=84532,
                signers=[key_signer("0x" + bytes(s.key).hex()) for s in chain.signers])
    send_lane_tick(lane, lane.signers[0], new_owner_id("t"), FAST)
    confirm_tick(lane, "t", FAST)
    status = api.get(f"/api/payment/{accepted.json()['paymentId']}")
    assert status.json()["status"] == "completed" and "PAYMENT-RESPONSE" not in status.headers
    settled = decode_payment_response_header(status.headers["X-PAYMENT-RESPONSE"])
    assert settled.success and settled.network == "base-sepolia"
