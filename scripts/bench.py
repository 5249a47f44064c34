"""`make bench`: the pipeline's stages against this machine's physical limit, in one run on one anvil and
one PostgreSQL, written to docs/BENCHMARKS.md.

    python scripts/bench.py [--payments 10000] [--intake 2000] [--lanes 2] [--tiny]

1. the limit: pre-signed settlement transactions sent in JSON-RPC batches of 1,000 straight to anvil
   (tx/s into the pool), and the EVM limit (block gas limit / gas of one settlement / block time);
2. each stage alone with a deep queue (`--payments`): send (pending -> sent, the send ticks of every
   signer lane in threads of this process, no Prefect), confirm (sent -> completed, confirm ticks),
   mint (released -> minted, mint ticks), as payments/s and as a ratio to the limit;
3. a 50-payment batch from claim to all sent (one send tick per lane);
4. intake: `--intake` pre-signed x402 payments POSTed by 16 concurrent clients to a real `python -m api`
   process (verification included), accepted/s;
5. peak RSS of this process (the stages run here) and of the API process.
Not measured yet (printed as null, listed under "Not measured"): batched settlement (not built), end
to end through the deployments at fixed offered loads (p50/p95/p99 request -> 202/sent/completed/
minted), and the latency-vs-load chart.

anvil runs with 1 s blocks and a 300,000,000 block gas limit so that the chain is not the bottleneck
of the stage figures; the EVM limit is printed for that and for a 30,000,000 gas block. `--tiny` (CI)
runs everything on a few dozen payments to keep the script from rotting. The last line is one JSON
object with the figures."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import requests
from sqlalchemy import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from payments.chain import Fees, connect, rpc_batch, settlement_data, sign_tx
from payments.config import REPO_ROOT, signer_from_key
from payments.db import make_engine, query, transaction
from payments.demo import _counts
from payments.eip3009 import TokenDomain, sign_authorization
from payments.localstack import (
    DATA_DIR,
    PAYMENT_TOKEN_NAME,
    PAYMENT_TOKEN_VERSION,
    Deployment,
    create_database,
    deploy_payment_stack,
    dev_account,
    free_port,
    queue_signed_payments,
    start_anvil,
    start_embedded_postgres,
)
from payments.migrate import upgrade
from payments.settings import PipelineSettings
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.mint import mint_tick
from tasks.send import send_lane_tick

BLOCK_GAS_LIMIT = 300_000_000
MAINNET_GAS_LIMIT = 30_000_000
SEED_FIGURES = {"send_per_s": 436, "intake_per_s": 69, "claim_to_sent_50_s": "2-5 (seed), 0.7-1.2 (before)"}
PRICE = 1_000_000


def statuses(engine: Engine, table: str = "payment_queue") -> dict[str, int]:
    return _counts(engine, table)


def limit_tx_per_s(dep: Deployment, count: int) -> tuple[float, int]:
    """Pre-signed settlements (authorizations of fresh funded buyers) sent in batches of 1,000 to anvil.
    Returns (tx/s accepted, gas used by one settlement)."""
    w3 = dep.w3()
    domain = TokenDomain(PAYMENT_TOKEN_NAME, PAYMENT_TOKEN_VERSION, dep.chain_id, dep.payment_token)
    sender = dev_account(7)
    nonce = w3.eth.get_transaction_count(sender.address, "pending")
    head = w3.eth.get_block("latest")
    fees = Fees(max_fee_per_gas=int(head["baseFeePerGas"]) * 2 + 10**9, max_priority_fee_per_gas=10**9)
    raws = []
    for i in range(count):
        buyer = dep.buyers[i % len(dep.buyers)]
        auth = sign_authorization(buyer.key, domain, pay_to=dep.merchant, value=1, valid_after=0,
                                  valid_before=int(time.time()) + 3600)
        data = settlement_data(auth.payer, auth.pay_to, auth.value, auth.valid_after, auth.valid_before, auth.nonce,
                               auth.signature)
        raws.append(sign_tx(sender.key, chain_id=dep.chain_id, nonce=nonce + i, to=dep.payment_token, data=data,
                            gas=150_000, fees=fees))
    started = time.perf_counter()
    answers = rpc_batch(w3, [("eth_sendRawTransaction", ["0x" + tx.raw.hex()]) for tx in raws], chunk=1000)
    seconds = time.perf_counter() - started
    accepted = sum(1 for a in answers if a.ok)
    deadline = time.monotonic() + 120
    receipt = None
    while receipt is None and time.monotonic() < deadline:
        try:
            receipt = w3.eth.get_transaction_receipt(raws[-1].tx_hash)  # type: ignore[arg-type]
        except Exception:
            time.sleep(0.5)
    first = w3.eth.get_transaction_receipt(raws[0].tx_hash)  # type: ignore[arg-type]
    return accepted / seconds, int(first["gasUsed"])


def drain(check: Any, step: Any, timeout: float) -> float:
    """Call step() until check() is true; returns the seconds it took."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("a stage did not finish within its deadline")
        step()
    return time.perf_counter() - started


def intake(dep: Deployment, url: str, engine: Engine, count: int, clients: int,
           workers: int = 1) -> tuple[float, float, int]:
    """POST `count` pre-signed x402 payments to a real API process. Returns (accepted/s, API RSS MB,
    accepted)."""
    from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
    from x402.schemas import PaymentPayload

    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "RPC_URL": dep.rpc_url, "PORT": str(port),
           "PUBLIC_URL": f"http://127.0.0.1:{port}", "PAYMENTS_API_KEY": "bench", "LOG_LEVEL": "warning",
           "API_MAX_CONCURRENCY": "1000", "API_WORKERS": str(workers)}
    with transaction(engine, "bench") as conn:
        conn.execute(query("upsert_product"), {
            "id": "bench-mint", "chain_id": dep.chain_id, "mint_token": dep.mint_token.lower(),
            "payment_token": dep.payment_token.lower(), "price_per_unit": PRICE, "amount_per_unit": 10**18,
            "pay_to": dep.merchant.lower(), "max_quantity": 1000, "active": True})
    api = subprocess.Popen([sys.executable, "-m", "api"], env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{base}/openapi.json", timeout=1).ok:
                    break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        challenge = requests.post(f"{base}/api/x402-batch-mint", json={"token": "bench-mint", "quantity": 1},
                                  timeout=30)
        req = decode_payment_required_header(challenge.headers["PAYMENT-REQUIRED"]).accepts[0]
        domain = TokenDomain(PAYMENT_TOKEN_NAME, PAYMENT_TOKEN_VERSION, dep.chain_id, dep.payment_token)
        headers = []
        for i in range(count):
            buyer = dep.buyers[i % len(dep.buyers)]
            auth = sign_authorization(buyer.key, domain, pay_to=dep.merchant, value=PRICE, valid_after=0,
                                      valid_before=int(time.time()) + 3600)
            payload = PaymentPayload(x402_version=2, accepted=req,  # type: ignore[arg-type]
                                     payload={"authorization": auth.as_x402(), "signature": auth.signature})
            headers.append(encode_payment_signature_header(payload))
        sessions = [requests.Session() for _ in range(clients)]

        def post(i: int) -> bool:
            r = sessions[i % clients].post(f"{base}/api/x402-batch-mint", json={"token": "bench-mint", "quantity": 1},
                                           headers={"PAYMENT-SIGNATURE": headers[i]}, timeout=60)
            return r.status_code in (200, 202)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            accepted = sum(pool.map(post, range(count)))
        seconds = time.perf_counter() - started
        family = [psutil.Process(api.pid), *psutil.Process(api.pid).children(recursive=True)]
        rss = sum(p.memory_info().rss for p in family) / 1e6
        return accepted / seconds, rss, accepted
    finally:
        api.terminate()
        api.wait(timeout=20)


def write_report(result: dict[str, Any], args: argparse.Namespace, command: str) -> None:
    rows = [
        ("limit: pre-signed settlements into anvil, JSON-RPC batches of 1,000", result["limit_tx_per_s"], "tx/s"),
        ("EVM limit at a 300M gas block, 1 s blocks", result["evm_limit_tx_per_s"], "tx/s"),
        ("EVM limit at a 30M gas block, 1 s blocks", result["evm_limit_30m_tx_per_s"], "tx/s"),
        ("intake (HTTP, verification included, 16 clients)", result["intake_per_s"], "payments/s"),
        ("send (pending -> sent)", result["send_per_s"], "payments/s"),
        ("send, batched settlement", result["send_batched_per_s"], "payments/s"),
        ("confirm (sent -> completed, depth included)", result["confirm_per_s"], "payments/s"),
        ("mint (released -> minted, depth included)", result["mint_per_s"], "payments/s"),
        ("end to end through the deployments", result["e2e_per_s"], "payments/s"),
        ("50-payment batch, claim -> all sent", result["claim_to_sent_50_s"], "s"),
        ("peak RSS (stages process / API process)", f"{result['max_rss_mb']} / {result['api_rss_mb']}", "MB"),
    ]
    lines = ["# Benchmarks", "", f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` on "
             f"{platform.node() and 'this machine'}: {psutil.cpu_count()} CPU cores, "
             f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, Python {platform.python_version()}, "
             f"{platform.platform()}. One anvil (1 s blocks, 300,000,000 gas per block) and one embedded "
             f"PostgreSQL; {args.payments} payments per stage, {args.intake} for intake, {args.lanes} signer lanes.",
             "", "| figure | value | unit | ratio to the limit |", "| --- | --- | --- | --- |"]
    limit = result["limit_tx_per_s"] or 0
    for name, value, unit in rows:
        ratio = f"{value / limit:.2f}" if isinstance(value, int | float) and limit and unit == "payments/s" else ""
        shown = "not measured yet" if value is None else value
        lines.append(f"| {name} | {shown} | {unit} | {ratio} |")
    lines += ["", f"Seed figures for comparison: {json.dumps(SEED_FIGURES)}.", "",
              "Not measured yet: batched settlement (not built), end to end through the deployments at fixed "
              "offered loads with p50/p95/p99 latencies, and the latency-vs-load chart.", "",
              "```json", json.dumps(result), "```", ""]
    (REPO_ROOT / "docs").mkdir(exist_ok=True)
    (REPO_ROOT / "docs" / "BENCHMARKS.md").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=10_000)
    parser.add_argument("--intake", type=int, default=2_000)
    parser.add_argument("--lanes", type=int, default=2)
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes for intake")
    parser.add_argument("--tiny", action="store_true", help="a few dozen payments (CI), no report file")
    args = parser.parse_args()
    if args.tiny:
        args.payments, args.intake = 60, 30
    command = "make bench" if not args.tiny else "scripts/bench.py --tiny"
    database = f"payments_bench_{secrets.token_hex(3)}"
    url = create_database(start_embedded_postgres(DATA_DIR / "pg"), database, drop=True)
    upgrade(url)
    anvil = start_anvil(block_time=1, gas_limit=BLOCK_GAS_LIMIT, log_dir=DATA_DIR)
    result: dict[str, Any] = {}
    try:
        dep = deploy_payment_stack(anvil.url, buyers=50, signer_count=args.lanes)
        engine = make_engine(url, pool_size=args.lanes + 4)
        w3 = connect(anvil.url, timeout=120)  # a batch of 1,000 simulations against the pending state takes seconds
        print("• the limit: pre-signed settlements into anvil", flush=True)
        limit, settlement_gas = limit_tx_per_s(dep, min(args.payments, 5_000))
        result["limit_tx_per_s"] = round(limit, 1)
        result["settlement_gas"] = settlement_gas
        result["evm_limit_tx_per_s"] = BLOCK_GAS_LIMIT // settlement_gas
        result["evm_limit_30m_tx_per_s"] = MAINNET_GAS_LIMIT // settlement_gas
        signers = [signer_from_key("0x" + bytes(s.key).hex()) for s in dep.signers]
        minter = signer_from_key("0x" + bytes(dep.minter.key).hex())
        p = Pipeline(engine=engine, w3=w3, chain_id=dep.chain_id, signers=signers, minter=minter)
        big = max(args.payments // args.lanes, 1)
        settings = PipelineSettings(payment_batch_size=min(big, 500), settlement_gas_limit=200_000,
                                    confirmation_batch_size=1000, mint_batch_size=1000, confirmation_depth=2,
                                    mint_confirmation_depth=2)
        print(f"• queueing {args.payments} signed payments", flush=True)
        queue_signed_payments(engine, dep, args.payments, actor="bench")
        owner = new_owner_id("bench")

        def send_step() -> None:
            with ThreadPoolExecutor(max_workers=args.lanes) as pool:
                list(pool.map(lambda s: send_lane_tick(p, s, owner, settings), signers))

        print("• send stage", flush=True)
        send_s = drain(lambda: not statuses(engine).get("pending", 0), send_step, 600)
        result["send_per_s"] = round(statuses(engine).get("sent", 0) / send_s, 1)
        print("• confirm stage", flush=True)
        def confirm_step() -> None:
            confirm_tick(p, "bench", settings)
            time.sleep(0.2)

        confirm_s = drain(lambda: not statuses(engine).get("sent", 0), confirm_step, 600)
        result["confirm_per_s"] = round(statuses(engine).get("completed", 0) / confirm_s, 1)
        print("• mint stage", flush=True)

        def mint_step() -> None:  # confirm ticks release mints at depth; mint ticks send and confirm them
            confirm_tick(p, "bench", settings)
            mint_tick(p, minter, owner, settings)
            time.sleep(0.2)

        mint_s = drain(lambda: statuses(engine, "mint_queue").get("minted", 0) >= args.payments, mint_step, 900)
        result["mint_per_s"] = round(statuses(engine, "mint_queue").get("minted", 0) / mint_s, 1)
        print("• 50-payment batch, claim -> all sent", flush=True)
        queue_signed_payments(engine, dep, 50, actor="bench")
        small = PipelineSettings(payment_batch_size=-(-50 // args.lanes), settlement_gas_limit=200_000)
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.lanes) as pool:
            list(pool.map(lambda s: send_lane_tick(p, s, owner, small), signers))
        result["claim_to_sent_50_s"] = round(time.perf_counter() - started, 3)
        print(f"• intake: {args.intake} pre-signed payments through a real API process", flush=True)
        rate, api_rss, accepted = intake(dep, url, engine, args.intake, 16, args.api_workers)
        result["api_workers"] = args.api_workers
        result["intake_per_s"] = round(rate, 1)
        result["intake_accepted"] = accepted
        result["api_rss_mb"] = round(api_rss, 1)
        result["send_batched_per_s"] = None
        result["e2e_per_s"] = None
        result["p95_request_to_completed_s_at_200"] = None
        result["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        result["payments"] = args.payments
        engine.dispose()
    finally:
        anvil.stop()
        with __import__("psycopg").connect(start_embedded_postgres(DATA_DIR / "pg"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    if not args.tiny:
        write_report(result, args, command)
    print(f"limit {result['limit_tx_per_s']} tx/s (EVM {result['evm_limit_tx_per_s']} at 300M gas, "
          f"{result['evm_limit_30m_tx_per_s']} at 30M); intake {result['intake_per_s']}/s; "
          f"send {result['send_per_s']}/s; "
          f"confirm {result['confirm_per_s']}/s; mint {result['mint_per_s']}/s; 50 claimed -> sent in "
          f"{result['claim_to_sent_50_s']} s; peak RSS {result['max_rss_mb']} MB (API {result['api_rss_mb']} MB)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
