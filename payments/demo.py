"""`make demo`: the whole pipeline on the local stack, end to end, through the HTTP API.

Starts the local stack (payments/stack.py: embedded PostgreSQL, anvil with 1 s blocks, a Prefect server
on PostgreSQL, the deployments on a work pool with a worker, the API), has PAYMENTS buyers pay with
the official x402 client,
shows progress until every payment is terminal and every mint is minted, checks the chain against the
queue, stops what it started and prints a summary followed by one line of JSON. It exits non-zero if
any payment did not complete."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine, text
from tqdm import tqdm

from api.buyer import paying_session, submit
from payments.stack import MINT_AMOUNT, PRICE, PRODUCT_ID, Stack, local_stack
from payments.statuses import TERMINAL_STATUSES


def _counts(engine: Engine, table: str) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(s): int(n) for s, n in conn.execute(text(f"SELECT status, count(*) FROM {table} GROUP BY 1"))}


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


def _buy_all(stack: Stack, payments: int) -> float:
    """Every payment goes through the API: 402, sign, pay. Returns the seconds it took."""
    buyers = stack.deployment.buyers
    sessions = [paying_session("0x" + bytes(b.key).hex()) for b in buyers]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda i: submit(sessions[i % len(sessions)], stack.api_url, PRODUCT_ID, 1),
                      range(payments)))
    return time.monotonic() - started


def _wait(engine: Engine, payments: int, deadline: float, worker_alive: Any) -> None:
    with tqdm(total=payments, unit="payment", desc="terminal", file=sys.stderr, mininterval=0.5) as bar:
        while True:
            counts = _counts(engine, "payment_queue")
            done = sum(n for s, n in counts.items() if s in TERMINAL_STATUSES)
            bar.update(done - bar.n)
            bar.set_postfix({k: counts[k] for k in sorted(counts)})
            if done >= payments or time.monotonic() > deadline or not worker_alive():
                break
            time.sleep(0.25)
    completed = counts.get("completed", 0)
    while time.monotonic() < deadline and worker_alive():  # then the mints of the completed payments
        mints = _counts(engine, "mint_queue")
        if mints.get("minted", 0) + mints.get("failed", 0) >= completed:
            break
        time.sleep(0.25)


def run(payments: int, timeout: float) -> int:
    with local_stack(database="payments_demo", buyers=min(payments, 20)) as stack:
        triggered = time.time()
        buying = _buy_all(stack, payments)
        print(f"• {payments} x402 payments accepted by the API in {buying:.1f} s (official x402 client)")
        _wait(stack.engine, payments, time.monotonic() + timeout, stack.worker.alive)
        counts = _counts(stack.engine, "payment_queue")
        mints = _counts(stack.engine, "mint_queue")
        timing = _timings(stack.engine)
        dep = stack.deployment
        token = dep.payment_contract()
        merchant_balance = int(token.functions.balanceOf(dep.merchant).call())
        minted_supply = int(dep.w3().eth.contract(address=dep.w3().to_checksum_address(dep.mint_token),
                                                  abi=token.abi).functions.totalSupply().call())
        alerts = len(stack.receiver.received) if stack.receiver else 0
    completed = counts.get("completed", 0)
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
    if first is not None:
        print(f"The first send run claimed {first.timestamp() - triggered:.1f} s after the payments started "
              "arriving (the worker started one run of each stage as it started; each run is a fresh process).")
    print(f"Completed {completed}/{payments} payments "
          f"(failed {summary['failed']}, confirmation_failed {summary['confirmation_failed']}).")
    print(f"All sent {summary['seconds_to_all_sent']} s after the first claim "
          f"({summary['payments_per_second_sent']} payments/s); all completed after "
          f"{summary['seconds_to_all_completed']} s.")
    if timing["p50_processing"] is not None:
        print(f"Median processing time (processed_at - created_at): {float(timing['p50_processing']):.2f} s; "
              f"median wait until confirmed: {float(timing['p50_wait'] or 0):.2f} s.")
    print(f"Merchant received {merchant_balance / 10**6:.2f} USDC on chain for {completed} payments; "
          f"{mints.get('minted', 0)} mints confirmed ({minted_supply / 10**18:g} tokens minted on chain); "
          f"{alerts} alert notification(s) received.")
    ok = (merchant_balance == completed * PRICE and mints.get("minted", 0) == completed
          and minted_supply == completed * MINT_AMOUNT)
    if not ok:
        print("MISMATCH between chain, payments and mints", file=sys.stderr)
    print(json.dumps(summary))
    return 0 if ok and completed == payments else 1


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
