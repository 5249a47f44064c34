"""Benchmark of the send stage (pending -> sent) against the physical limit of this machine.

Starts its own embedded PostgreSQL database and anvil (automine, raised block gas limit), queues
--payments signed x402 payments, then runs send ticks (claim, simulate, sign, persist, broadcast,
mark sent) over all signer lanes in this process - no Prefect overhead - and prints the figures.

    .venv/bin/python scripts/benchmark_send.py --payments 2000 --batch 1000 --lanes 2
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import Engine, text

from payments.config import signer_from_key
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
from payments.settings import PipelineSettings
from tasks.common import Pipeline, new_owner_id
from tasks.send import send_lane_tick


def statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(s): int(n) for s, n in conn.execute(text("SELECT status, count(*) FROM payment_queue GROUP BY 1"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=1000, help="payment_batch_size per lane and tick")
    parser.add_argument("--lanes", type=int, default=2, help="signer lanes (hot wallets)")
    args = parser.parse_args()

    url = create_database(start_embedded_postgres(DATA_DIR / "pg"), "payments_bench", drop=True)
    upgrade(url)
    anvil = start_anvil(gas_limit=1_000_000_000, log_dir=DATA_DIR)
    try:
        dep = deploy_payment_stack(anvil.url, buyers=50, signer_count=args.lanes)
        engine = make_engine(url, pool_size=args.lanes + 2)
        t0 = time.perf_counter()
        queue_signed_payments(engine, dep, args.payments, actor="benchmark")
        queued_s = time.perf_counter() - t0
        p = Pipeline(engine=engine, w3=dep.w3(), chain_id=dep.chain_id,
                     signers=[signer_from_key("0x" + bytes(s.key).hex()) for s in dep.signers])
        settings = PipelineSettings(payment_batch_size=args.batch, settlement_gas_limit=200_000)
        owner = new_owner_id("bench")
        t1 = time.perf_counter()
        ticks = 0
        with ThreadPoolExecutor(max_workers=args.lanes) as pool:
            while statuses(engine).get("pending", 0):
                list(pool.map(lambda s: send_lane_tick(p, s, owner, settings), p.signers))
                ticks += 1
        send_s = time.perf_counter() - t1
        counts = statuses(engine)
        result = {
            "payments": args.payments, "lanes": args.lanes, "batch": args.batch, "ticks": ticks,
            "sent": counts.get("sent", 0), "failed": counts.get("failed", 0),
            "seconds_pending_to_sent": round(send_s, 3),
            "payments_per_second_sent": round(counts.get("sent", 0) / send_s, 1),
            "seconds_to_queue": round(queued_s, 3),
        }
        print(json.dumps(result))
        engine.dispose()
    finally:
        anvil.stop()


if __name__ == "__main__":
    main()
