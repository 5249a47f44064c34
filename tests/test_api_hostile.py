"""Hostile clients against a real `python -m api` process (a crash shows as a dropped connection and a
dead process): a battery of more than 2,000 malformed requests over every endpoint, then a good payment
that still completes; and property-based fuzzing of every operation from the OpenAPI schema."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from sqlalchemy import Engine, text

from payments.config import REPO_ROOT
from payments.db import query, transaction
from payments.localstack import Deployment
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.send import send_lane_tick
from tests.helpers import PRICE, authorize
from tests.test_recovery import FAST

pytestmark = pytest.mark.chain

API_KEY = "hostile-test-operator-key"
DEAD = "0x000000000000000000000000000000000000dEaD"


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None


@pytest.fixture(params=[1])
def server(request: pytest.FixtureRequest, pipeline: Pipeline, chain: Deployment,
           embedded_db_url: str) -> Iterator[Server]:
    """A real `python -m api` process (API_WORKERS = the fixture's param)."""
    with transaction(pipeline.engine, "test") as conn:
        conn.execute(query("upsert_product"), {
            "id": "demo-mint", "chain_id": chain.chain_id, "mint_token": chain.mint_token.lower(),
            "payment_token": chain.payment_token.lower(), "price_per_unit": PRICE, "amount_per_unit": 10**18,
            "pay_to": chain.merchant.lower(), "max_quantity": 100, "active": True})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if "PRIVATE_KEY" not in k}
    env.update({"DATABASE_URL": embedded_db_url, "RPC_URL": chain.rpc_url, "HOST": "127.0.0.1", "PORT": str(port),
                "PUBLIC_URL": f"http://127.0.0.1:{port}", "PAYMENTS_API_KEY": API_KEY, "LOG_LEVEL": "critical",
                "API_WORKERS": str(request.param)})
    log = tempfile.TemporaryFile()  # noqa: SIM115  (closed at teardown, after the process ends)
    process = subprocess.Popen([sys.executable, "-m", "api"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    up = Server(port, process, log)
    deadline = time.monotonic() + 90
    while True:
        try:
            if requests.get(f"{up.url}/openapi.json", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if not up.alive() or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"the API did not start: {log.read()[-3000:]!r}")
        time.sleep(0.2)
    yield up
    import psutil

    family = psutil.Process(process.pid).children(recursive=True)
    process.terminate()
    process.wait(timeout=20)
    _, alive = psutil.wait_procs(family, timeout=20)
    log.close()
    assert not alive, "API worker processes outlived their parent"


# --------------------------------------------------------------------------- raw HTTP


class Dropped(Exception):
    """The connection closed without a complete status line."""


def raw_request(port: int, data: bytes, timeout: float = 20) -> int:
    """Send raw bytes, return the status code of the answer. A body the server refuses early may make the
    kernel reset the connection after the answer; the answer is read as it arrives, so it is still seen."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        received = b""
        try:
            while b"\r\n" not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
    if not received.startswith(b"HTTP/1.1 ") or len(received) < 12:
        raise Dropped(received[:100])
    return int(received[9:12])


def build(method: str, path: bytes, body: bytes | None = None, headers: list[tuple[bytes, bytes]] | None = None,
          chunked: bool = False) -> bytes:
    lines = [method.encode() + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [name + b": " + value for name, value in headers or []]
    if body is None:
        return b"\r\n".join(lines) + b"\r\n\r\n"
    if not any(name.lower() == b"content-type" for name, _ in headers or []):
        lines.append(b"Content-Type: application/json")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        encoded = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + encoded
    if not any(name.lower() == b"content-length" for name, _ in headers or []):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --------------------------------------------------------------------------- the battery

ENDPOINTS: list[tuple[str, bytes, dict[str, Any]]] = [
    ("POST", b"/api/x402-batch-mint", {"token": "demo-mint", "quantity": 1, "recipient": DEAD}),
    ("PUT", b"/api/admin/settings/alert_sent_age_seconds", {"value": "60"}),
    ("PUT", b"/api/admin/products/demo-mint", {"mint_token": DEAD, "payment_token": DEAD, "price_per_unit": 1,
                                               "amount_per_unit": 1, "pay_to": DEAD}),
    ("PUT", b"/api/admin/webhooks", {"product_id": "demo-mint", "url": "https://merchant.example/hook",
                                     "secret_ref": "env:MERCHANT_SECRET"}),
    ("GET", b"/api/payment/pay_0123456789abcdef", {}),
    ("GET", b"/api/payment-stats", {}),
    ("GET", b"/api/admin/settings", {}),
    ("GET", b"/docs", {}),
    ("GET", b"/openapi.json", {}),
]

# values no field of these bodies can take (so even with the right operator key nothing may be written)
HOSTILE_VALUES: list[str] = [
    "1e400", "-1e400", "Infinity", "-Infinity", "NaN", str(10**400), "-1", '"\\u0000"', '"demo\\u0000mint"',
    '"' + "é" * 300 + '"', '"\\ud800"', '"0x10"', '"abc"', "[]", "{}", "null", "[" * 40 + "]" * 40,
    '"' + "\U0001F4A9" * 50 + '"',
]


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _payment_headers(chain: Deployment) -> list[list[tuple[bytes, bytes]]]:
    auth = authorize(chain, chain.buyers[0], value=PRICE + 1).as_x402()
    forged = {"x402Version": 2, "accepted": {"scheme": "exact", "network": f"eip155:{chain.chain_id}",
                                             "asset": chain.payment_token, "amount": str(PRICE),
                                             "payTo": chain.merchant, "maxTimeoutSeconds": 300,
                                             "extra": {"name": "USD Coin", "version": "2"}},
              "payload": {"authorization": auth, "signature": "0x" + "11" * 65}}
    infinite = json.dumps(forged).replace(f'"value": "{PRICE + 1}"', '"value": Infinity').encode()
    return [
        [],
        [(b"PAYMENT-SIGNATURE", b"!!!not-base64!!!")],
        [(b"PAYMENT-SIGNATURE", _b64(b"not json at all"))],
        [(b"PAYMENT-SIGNATURE", _b64(infinite))],
        [(b"PAYMENT-SIGNATURE", _b64(json.dumps(forged).encode()))],  # well formed, wrong amount, bad signature
        [(b"PAYMENT-SIGNATURE", _b64(b"[" * 5000 + b"]" * 5000))],
        [(b"X-PAYMENT", _b64(b'{"x402Version": 1, "scheme": "exact", "network": "\\u0000", "payload": {}}'))],
        [(b"PAYMENT-SIGNATURE", b"\xff\xfe\xe9" * 50)],
        [(b"PAYMENT-SIGNATURE", b"A" * 15_000)],
        [(b"X-API-Key", b"\xe9\xff\x80 bogus")],
        [(b"X-API-Key", b"k" * 8000)],
        [(b"X-API-Key", API_KEY.encode())],
    ]


def battery(chain: Deployment) -> list[tuple[str, bytes]]:
    cases: list[tuple[str, bytes]] = []
    header_sets = _payment_headers(chain)
    for method, path, base in ENDPOINTS:
        bodies: list[tuple[str, bytes | None]] = [("no body", None)] if method == "GET" else []
        for field_name in list(base)[:3] or ["x"]:
            for value in HOSTILE_VALUES:
                doc = json.dumps({**base, field_name: "@@"}).replace('"@@"', value)
                bodies.append((f"{field_name}={value[:12]}", doc.encode()))
        bodies += [("array", b"[1, 2, 3]"), ("raw NUL", b'{"token": "a\x00b"}'),
                   ("invalid utf-8", b'{"a": "\xff\xfe"}'), ("truncated", b'{"token": "demo-mint", "qua'),
                   ("empty", b""), ("duplicate keys", b'{"token": "x", "token": "demo-mint", "quantity": 1e400}')]
        for body_name, body in bodies:
            for headers in header_sets:
                cases.append((f"{method} {path.decode()} {body_name} {headers[:1]!r}"[:160],
                              build(method, path, body, headers)))
        deep = b"[" * 100_000 + b"]" * 100_000
        cases += [
            ("chunked 100k deep", build(method, path, deep, chunked=True)),
            ("chunked 100k deep, keyless", build(method, path, b'{"value": ' + deep + b"}", chunked=True)),
            ("content-length 100k deep", build(method, path, deep)),
            ("small deep chunked", build(method, path, b"[" * 5000 + b"]" * 5000, chunked=True)),
            ("oversized chunked", build(method, path, b'{"token": "' + b"a" * 40_000 + b'"}', chunked=True)),
            ("oversized", build(method, path, b'{"token": "' + b"a" * 40_000 + b'"}')),
            ("huge content-length", build(method, path, b"{}", [(b"Content-Length", b"99999999999999999999")])),
            ("text/plain", build(method, path, b"token=demo-mint", [(b"Content-Type", b"text/plain")])),
            ("utf-16 json", build(method, path, json.dumps(base).encode("utf-16"),
                                  [(b"Content-Type", b"application/json; charset=utf-16")])),
            ("NUL in path", build(method, path + b"%00", b"{}")),
            ("non-ASCII in path", build(method, path + b"%C3%A9\xc3\xa9", b"{}")),
            ("long path", build(method, path + b"/" + b"a" * 6000, b"{}")),
            ("junk query", build(method, path + b"?a=%00&b=%ff&" + b"c" * 2000 + b"=\xe9", b"{}")),
        ]
    for pid in (b"%00", b"..%2f..%2fetc", b"pay_" + b"x" * 200, b"%C3%A9", b"' OR 1=1 --", b"\xe9\xff"):
        cases.append((f"payment id {pid!r}", build("GET", b"/api/payment/" + pid.replace(b" ", b"%20"))))
    for key in (b"%00", b"KEY", b"a" * 80, b"payment_batch_size%00", b"\xc3\xa9"):
        cases.append((f"setting key {key!r}", build("PUT", b"/api/admin/settings/" + key, b'{"value": "5"}',
                                                    [(b"X-API-Key", API_KEY.encode())])))
    return cases


def _snapshot(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as conn:
        return tuple(conn.execute(text(
            "SELECT (SELECT count(*) FROM payment_queue), (SELECT count(*) FROM mint_queue),"
            " (SELECT count(*) FROM payment_events), (SELECT count(*) FROM webhook_endpoints),"
            " (SELECT md5(string_agg(key || '=' || value, ',' ORDER BY key)) FROM system_settings),"
            " (SELECT md5(string_agg(row_to_json(p)::text, ',' ORDER BY id)) FROM mint_products p)")).one())


def test_a_battery_of_hostile_requests_crashes_nothing_and_writes_nothing(
        server: Server, pipeline: Pipeline, chain: Deployment) -> None:
    from tests.test_api import _header

    cases = battery(chain)
    assert len(cases) >= 2000, len(cases)
    before = _snapshot(pipeline.engine)
    started = time.monotonic()

    def run(case: tuple[str, bytes]) -> tuple[str, int | str]:
        try:
            return case[0], raw_request(server.port, case[1])
        except Dropped as dropped:
            return case[0], f"dropped {dropped.args[0]!r}"
        except OSError as exc:
            return case[0], f"{type(exc).__name__}"

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, cases))
    elapsed = time.monotonic() - started
    assert server.alive(), "the API process died"
    failures = [(name, status) for name, status in results if not isinstance(status, int) or status >= 500]
    assert not failures, failures[:20]
    codes = Counter(status for _, status in results)
    print(f"{len(cases)} hostile requests in {elapsed:.1f} s: {dict(sorted(codes.items()))}")  # type: ignore[type-var]
    assert _snapshot(pipeline.engine) == before  # not one row written or changed

    # and a good payment still goes through, end to end
    challenge = requests.post(f"{server.url}/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1},
                              timeout=30)
    assert challenge.status_code == 402
    from x402.http.utils import decode_payment_required_header

    req = decode_payment_required_header(challenge.headers["PAYMENT-REQUIRED"]).accepts[0]
    good = requests.post(f"{server.url}/api/x402-batch-mint", json={"token": "demo-mint", "quantity": 1},
                         headers={"PAYMENT-SIGNATURE": _header(req, authorize(chain, chain.buyers[1]))},  # type: ignore[arg-type]
                         timeout=30)
    assert good.status_code == 202, good.text
    send_lane_tick(pipeline, pipeline.signers[0], new_owner_id("t"), FAST)
    confirm_tick(pipeline, "t", FAST)
    final = requests.get(good.json()["statusUrl"], timeout=30).json()
    assert final["status"] == "completed", final
    assert server.alive()


# --------------------------------------------------------------------------- fuzzing from the OpenAPI schema


def test_no_operation_of_the_schema_answers_5xx(server: Server, pipeline: Pipeline) -> None:
    """Every operation of /openapi.json, with cases generated from its schema (valid and invalid ones),
    with and without the operator key."""
    from hypothesis import given
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    seen: Counter[int] = Counter()

    @given(case=strategy, key=st.booleans())
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: Any, key: bool) -> None:
        response = case.call(headers={"X-API-Key": API_KEY} if key else {}, timeout=30)
        seen[response.status_code] += 1
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])

    check()
    assert server.alive()
    print(f"schema fuzz: {sum(seen.values())} requests: {dict(sorted(seen.items()))}")


@pytest.mark.parametrize("server", [2], indirect=True)
def test_several_api_workers_share_one_port_and_take_payments(server: Server, pipeline: Pipeline,
                                                              chain: Deployment) -> None:
    """API_WORKERS=2: two uvicorn worker processes behind one port take paid requests (each queued once),
    and stopping the parent stops both workers (checked at teardown)."""
    import psutil

    from api.buyer import paying_session, submit

    assert len(psutil.Process(server.process.pid).children(recursive=True)) >= 2
    session = paying_session("0x" + bytes(chain.buyers[0].key).hex())
    answers = [submit(session, server.url, "demo-mint", 1) for _ in range(4)]
    ids = {a["paymentId"] for a in answers}
    assert len(ids) == 4 and all(a["status"] == "pending" for a in answers), answers
    with pipeline.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_queue")).scalar_one() == 4
