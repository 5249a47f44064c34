"""`make demo`: the whole pipeline on the local stack, end to end.

Starts embedded PostgreSQL, anvil (1 s blocks) and a Prefect server on PostgreSQL (unless
PREFECT_API_URL is set), migrates, deploys the contracts, funds buyers, serves the send and confirm
deployments, queues PAYMENTS signed x402 payments, shows progress until every payment is terminal,
stops what it started and prints a summary followed by one line of JSON.
DATABASE_URL / RPC_URL / SIGNER_PRIVATE_KEYS switch those parts to real infrastructure."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Any

from sqlalchemy import Engine, text
from tqdm import tqdm

from payments.alert_receiver import start_alert_receiver
from payments.db import make_engine
from payments.localstack import (
    DATA_DIR,
    create_database,
    deploy_payment_stack,
    queue_signed_payments,
    start_anvil,
    start_embedded_postgres,
)
from payments.migrate import upgrade
from payments.prefect_server import prefect_home, start_prefect_server
from payments.statuses import TERMINAL_STATUSES

PRICE = 1_000_000  # 1.00 of the 6-decimal payment token per payment
MINT_AMOUNT = 10**18


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def _counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(s): int(n) for s, n in conn.execute(text("SELECT status, count(*) FROM payment_queue GROUP BY 1"))}


def _timings(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        row = conn.execute(text("""
            SELECT (SELECT min(at) FROM payment_events WHERE to_status = 'processing') AS first_claim,
                   max(sent_at) AS last_sent, max(confirmed_at) AS last_confirmed,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - created_at))
                       AS p50_processing,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM confirmed_at - created_at))
                       AS p50_wait
            FROM payment_queue""")).one()._mapping
    return dict(row)


def run(payments: int, timeout: float) -> int:
    DATA_DIR.mkdir(exist_ok=True)
    with ExitStack() as stack:
        t0 = time.monotonic()
        database_url = os.environ.get("DATABASE_URL")
        pg_uri = None
        if not database_url:
            pg_uri = start_embedded_postgres(DATA_DIR / "pg")
            database_url = create_database(pg_uri, "payments_demo", drop=True)
        upgrade(database_url)
        rpc_url = os.environ.get("RPC_URL")
        if not rpc_url:
            anvil = start_anvil(block_time=1, log_dir=DATA_DIR)
            stack.callback(anvil.stop)
            rpc_url = anvil.url
        print(f"• PostgreSQL ready, schema migrated ({time.monotonic() - t0:.1f} s)")
        deployment = deploy_payment_stack(rpc_url, buyers=min(payments, 20))
        print(f"• chain {deployment.chain_id} at {rpc_url}: payment token {deployment.payment_token}, "
              f"mint token {deployment.mint_token}")
        prefect_db = create_database(pg_uri, "prefect") if pg_uri else database_url
        server = start_prefect_server(prefect_db)
        stack.callback(server.stop)
        print(f"• Prefect API {server.api_url} - UI {server.ui_url} ({time.monotonic() - t0:.1f} s)")
        signer_keys = os.environ.get("SIGNER_PRIVATE_KEYS") or ",".join(
            "0x" + bytes(s.key).hex() for s in deployment.signers)
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": database_url, "RPC_URL": rpc_url, "SIGNER_PRIVATE_KEYS": signer_keys,
            "PREFECT_API_URL": server.api_url,
            "MINTER_PRIVATE_KEY": os.environ.get("MINTER_PRIVATE_KEY") or "0x" + bytes(deployment.minter.key).hex(),
            "PREFECT_HOME": str(prefect_home()),
            "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_LOGGING_LEVEL": "WARNING",
        })
        if not env.get("ALERT_WEBHOOK_URL") and not env.get("ALERT_SLACK_WEBHOOK_URL"):
            receiver = start_alert_receiver(log_path=DATA_DIR / "alerts.jsonl")
            stack.callback(receiver.stop)
            env["ALERT_WEBHOOK_URL"] = receiver.url
            print(f"• alert notifications go to the local receiver {receiver.url} (recorded in .data/alerts.jsonl)")
        serve_log = (DATA_DIR / "serve.log").open("wb")
        stack.callback(serve_log.close)
        serve = subprocess.Popen([sys.executable, "-m", "deployments.serve"], env=env, stdout=serve_log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        stack.callback(_stop_process, serve)

        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        queue_signed_payments(engine, deployment, payments, price=PRICE, mint_amount=MINT_AMOUNT)
        print(f"• {payments} signed x402 payments queued; serving the send and confirm deployments")
        os.environ["PREFECT_API_URL"] = server.api_url
        from prefect.deployments import run_deployment

        from deployments.serve import CONFIRM_DEPLOYMENT, MINT_DEPLOYMENT, SEND_DEPLOYMENT
        triggered = time.time()
        _trigger(run_deployment, [SEND_DEPLOYMENT, CONFIRM_DEPLOYMENT, MINT_DEPLOYMENT], serve)

        deadline = time.monotonic() + timeout
        with tqdm(total=payments, unit="payment", desc="terminal", file=sys.stderr, mininterval=0.5) as bar:
            while True:
                counts = _counts(engine)
                done = sum(n for s, n in counts.items() if s in TERMINAL_STATUSES)
                bar.update(done - bar.n)
                bar.set_postfix({k: counts[k] for k in sorted(counts)})
                if done >= payments or time.monotonic() > deadline or serve.poll() is not None:
                    break
                time.sleep(0.25)
        counts = _counts(engine)
        timing = _timings(engine)
        mints = _wait_for_mints(engine, counts.get("completed", 0), deadline)
        token = deployment.payment_contract()
        merchant_balance = int(token.functions.balanceOf(deployment.merchant).call())
        minted_supply = int(deployment.w3().eth.contract(
            address=deployment.w3().to_checksum_address(deployment.mint_token),
            abi=token.abi).functions.totalSupply().call())
    completed = counts.get("completed", 0)
    if timing["first_claim"] is not None:
        print(f"\nThe first served send run claimed {timing['first_claim'].timestamp() - triggered:.1f} s after it was "
              "triggered (each served run is a fresh process).")
    first, last_sent, last_confirmed = timing["first_claim"], timing["last_sent"], timing["last_confirmed"]
    to_sent = (last_sent - first).total_seconds() if first and last_sent else None
    to_completed = (last_confirmed - first).total_seconds() if first and last_confirmed else None
    summary = {
        "payments": payments,
        "completed": completed,
        "failed": counts.get("failed", 0),
        "confirmation_failed": counts.get("confirmation_failed", 0),
        "seconds_to_all_sent": round(to_sent, 3) if to_sent is not None else None,
        "seconds_to_all_completed": round(to_completed, 3) if to_completed is not None else None,
        "payments_per_second_sent": round(payments / to_sent, 1) if to_sent else None,
    }
    print()
    print(f"Completed {completed}/{payments} payments "
          f"(failed {summary['failed']}, confirmation_failed {summary['confirmation_failed']}).")
    print(f"All sent {summary['seconds_to_all_sent']} s after the first claim "
          f"({summary['payments_per_second_sent']} payments/s); all completed after "
          f"{summary['seconds_to_all_completed']} s.")
    if timing["p50_processing"] is not None:
        print(f"Median processing time (processed_at - created_at): {float(timing['p50_processing']):.2f} s; "
              f"median wait until confirmed: {float(timing['p50_wait'] or 0):.2f} s.")
    print(f"Merchant received {merchant_balance / 10**6:.2f} USDC on chain for {completed} payments; "
          f"{mints.get('minted', 0)} mints confirmed ({minted_supply / 10**18:g} tokens minted on chain).")
    if (merchant_balance != completed * PRICE or mints.get("minted", 0) != completed
            or minted_supply != completed * MINT_AMOUNT):
        print("MISMATCH between chain, payments and mint rows", file=sys.stderr)
        completed = -1
    print(json.dumps(summary))
    return 0 if completed == payments else 1


def _wait_for_mints(engine: Engine, completed: int, deadline: float) -> dict[str, int]:
    """Mint counts by status, once every completed payment's mint is minted (or failed), or at the deadline."""
    while True:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM mint_queue GROUP BY 1"))
            mints = {str(s): int(n) for s, n in rows}
        if mints.get("minted", 0) + mints.get("failed", 0) >= completed or time.monotonic() > deadline:
            return mints
        time.sleep(0.25)


def _trigger(run_deployment: Any, names: list[str], serve: subprocess.Popen[bytes]) -> None:
    """Start the first runs now rather than at the next schedule slot (the deployments must be registered
    by the serve process first)."""
    deadline = time.monotonic() + 60
    pending = list(names)
    while pending:
        name = pending[0]
        try:
            run_deployment(name, timeout=0)
            pending.pop(0)
        except Exception:
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError(f"deployment {name} did not appear; see {DATA_DIR / 'serve.log'}") from None
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=int(os.environ.get("PAYMENTS", "50")))
    parser.add_argument("--timeout", type=float, default=300.0, help="give up waiting after this many seconds")
    args = parser.parse_args()
    if args.payments < 1:
        parser.error("--payments must be at least 1")
    sys.exit(run(args.payments, args.timeout))


if __name__ == "__main__":
    main()
