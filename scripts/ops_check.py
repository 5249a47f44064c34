"""`make ops-check`: the operator's promises, measured on the local stack (fresh chain and databases).

    python scripts/ops_check.py [--trials 5] [--rate 2] [--idle-minutes 5]

1. Alert latency: with buyers paying through the API at `--rate` payments/s, a signer's gas balance is
   set below `alert_min_gas_balance_wei` on the chain (the threshold is crossed at that moment); the time
   until the notification reaches the alert receiver is measured, then the balance is restored and the
   time to the "resolved" notice is measured. `--trials` times; p50/p95/max printed.
2. Recovery start: under the same load, a recovery deployment (repair-wallet-nonces, dry run) is
   triggered as an operator would from the UI; the time from the trigger to the run's start (Running)
   is measured, `--trials` times.
3. Idle noise: the load stops, the queue drains, then for `--idle-minutes` the flow runs and task runs
   created are counted, and the Prefect database's growth is extrapolated to 24 h (retention bounds it
   after that: payments/prefect_server.py RETENTION).

Prints each figure, then one JSON line; exits 1 if a target is missed: alert p95 <= 60 s, recovery start
max <= 15 s, idle <= 2 flow runs and 0 task runs per minute."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.buyer import paying_session, submit
from payments.chain import connect
from payments.localstack import DATA_DIR
from payments.stack import PRODUCT_ID, Stack, local_stack

ALERT_P95_LIMIT = 60.0
RECOVERY_START_LIMIT = 15.0
IDLE_FLOW_RUNS_PER_MINUTE = 2.0
LOW_BALANCE = 9 * 10**15  # below the default alert_min_gas_balance_wei (10**16), enough gas for ~90 settlements
FULL_BALANCE = 10**22


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def figures(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 1), "p95": round(pct(values, 0.95), 1),
            "max": round(max(values), 1), "n": len(values)}


class Load:
    """Buyers paying through the API at a steady rate, in a thread."""

    def __init__(self, stack: Stack, rate: float) -> None:
        self.stack, self.rate = stack, rate
        self.sessions = [paying_session("0x" + bytes(b.key).hex()) for b in stack.deployment.buyers]
        self.stop = threading.Event()
        self.accepted = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(1 / self.rate):
            try:
                submit(self.sessions[i % len(self.sessions)], self.stack.api_url, PRODUCT_ID, 1)
                self.accepted += 1
            except Exception as exc:  # noted, the load goes on
                print(f"  (a payment was refused: {type(exc).__name__})", flush=True)
            i += 1


def wait_for(check: Any, timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    return None


def notification_after(stack: Stack, since: float, kind: str, key: str) -> float | None:
    receiver = stack.receiver
    assert receiver is not None
    for body, at in zip(list(receiver.received), list(receiver.arrived), strict=False):
        if at >= since and f"payments.alert.{kind}" in str(body.get("subject", "")) and key in str(body):
            return at
    return None


def alert_trials(stack: Stack, trials: int) -> tuple[list[float], list[float]]:
    w3 = connect(stack.rpc_url)
    signer = stack.deployment.signers[0].address
    key = f"gas_low:{signer.lower()}"
    opened, resolved = [], []
    for n in range(trials):
        w3.provider.make_request("anvil_setBalance", [signer, hex(LOW_BALANCE)])  # type: ignore[arg-type]
        crossed = time.time()
        at = wait_for(lambda c=crossed: notification_after(stack, c, "opened", key), 180)
        w3.provider.make_request("anvil_setBalance", [signer, hex(FULL_BALANCE)])  # type: ignore[arg-type]
        restored = time.time()
        if at is None:
            print(f"  trial {n + 1}: no notification within 180 s", flush=True)
            opened.append(180.0)
            continue
        opened.append(at - crossed)
        back = wait_for(lambda r=restored: notification_after(stack, r, "resolved", key), 180)
        resolved.append((back - restored) if back else 180.0)
        print(f"  trial {n + 1}: opened notice {at - crossed:.1f} s after the crossing; resolved notice "
              f"{resolved[-1]:.1f} s after the balance came back", flush=True)
    return opened, resolved


def recovery_trials(stack: Stack, trials: int) -> list[float]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    starts = []
    for n in range(trials):
        triggered = time.time()
        run: Any = run_deployment("resync-nonces/repair-wallet-nonces", parameters={"dry_run": True}, timeout=0)

        def started(run_id: Any = run.id) -> float | None:
            with get_client(sync_client=True) as client:
                fr = client.read_flow_run(run_id)
            return fr.start_time.timestamp() if fr.start_time else None

        at = wait_for(started, 120, every=0.5)
        starts.append((at - triggered) if at else 120.0)
        print(f"  trial {n + 1}: recovery run started {starts[-1]:.1f} s after the trigger", flush=True)
        time.sleep(5)
    return starts


def scalar(stack: Stack, sql: str) -> Any:
    with stack.engine.connect() as conn:
        return conn.execute(text(sql)).scalar()


def run_lateness(api: str) -> dict[str, float]:
    """How late the scheduled deployments' runs started (start time - expected start), per flow: the
    worst, in seconds, over every run that started so far."""
    flows = {f["id"]: f["name"] for f in requests.post(f"{api}/flows/filter", json={}, timeout=30).json()}
    worst: dict[str, float] = {}
    offset = 0
    while True:
        page = requests.post(f"{api}/flow_runs/filter", timeout=30, json={
            "flow_runs": {"start_time": {"is_null_": False}}, "limit": 200, "offset": offset}).json()
        for r in page:
            if not r.get("auto_scheduled") or not r.get("start_time") or not r.get("expected_start_time"):
                continue
            late = (datetime.fromisoformat(r["start_time"]) - datetime.fromisoformat(r["expected_start_time"]))
            name = flows.get(r["flow_id"], "?")
            worst[name] = max(worst.get(name, 0.0), round(late.total_seconds(), 1))
        if len(page) < 200:
            return worst
        offset += 200


def count(api: str, what: str) -> int:
    return int(requests.post(f"{api}/{what}/count", json={}, timeout=30).json())


def prefect_db_bytes(stack: Stack) -> int | None:
    try:
        with stack.engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_database_size('prefect')")).scalar_one())
    except Exception:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--rate", type=float, default=2.0, help="payments per second while measuring")
    parser.add_argument("--idle-minutes", type=float, default=5.0)
    parser.add_argument("--soak-minutes", type=float, default=0.0,
                        help="keep the load this long after the trials, then report how late scheduled runs started")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with local_stack(database="payments_ops", buyers=8) as stack:
        import os

        os.environ["PREFECT_API_URL"] = stack.prefect.api_url
        api = stack.prefect.api_url
        print("• waiting for the monitor's first pass", flush=True)
        wait_for(lambda: scalar(stack, "SELECT count(*) FROM monitor_samples"), 120)
        load = Load(stack, args.rate)
        load.thread.start()
        load_started = time.monotonic()
        print(f"• load: {args.rate:g} payments/s through the API", flush=True)
        print(f"• alert latency ({args.trials} trials: a signer's gas balance below the threshold, then back)")
        opened, resolved = alert_trials(stack, args.trials)
        print(f"• recovery start under load ({args.trials} trials: repair-wallet-nonces, dry run)")
        starts = recovery_trials(stack, args.trials)
        if args.soak_minutes:
            print(f"• soak: the load goes on for {args.soak_minutes:g} min", flush=True)
            time.sleep(args.soak_minutes * 60)
        lateness = run_lateness(api)
        load_minutes = (time.monotonic() - load_started) / 60
        load.stop.set()
        load.thread.join()
        print(f"• load stopped after {load.accepted} accepted payments; waiting for the queue to drain", flush=True)
        wait_for(lambda: scalar(stack, "SELECT count(*) = 0 FROM payment_queue WHERE status NOT IN "
                                       "('completed', 'failed', 'confirmation_failed')"), 300, every=1)
        time.sleep(20)
        print(f"• idle for {args.idle_minutes:g} min: counting flow runs and task runs created", flush=True)
        flows0, tasks0, db0 = count(api, "flow_runs"), count(api, "task_runs"), prefect_db_bytes(stack)
        time.sleep(args.idle_minutes * 60)
        flows1, tasks1, db1 = count(api, "flow_runs"), count(api, "task_runs"), prefect_db_bytes(stack)
    minutes = args.idle_minutes
    result = {
        "alert_opened_s": figures(opened), "alert_resolved_s": figures(resolved) if resolved else None,
        "recovery_start_s": figures(starts),
        "worst_scheduled_run_lateness_s": lateness,
        "load_minutes": round(load_minutes, 1),
        "idle_flow_runs_per_min": round((flows1 - flows0) / minutes, 2),
        "idle_task_runs_per_min": round((tasks1 - tasks0) / minutes, 2),
        "prefect_db_mb": round(db1 / 1e6, 1) if db1 else None,
        "prefect_db_growth_mb_per_24h_idle": round((db1 - db0) / 1e6 / minutes * 1440, 1) if db0 and db1 else None,
    }
    print()
    print(f"Alert notification after the threshold was crossed: {result['alert_opened_s']} (target p95 <= "
          f"{ALERT_P95_LIMIT:.0f} s); resolved notice: {result['alert_resolved_s']}")
    print(f"Scheduled runs, the latest start after their due time (s): {lateness} (interval 300 s)")
    print(f"Recovery run start after the trigger, under load: {result['recovery_start_s']} (target max <= "
          f"{RECOVERY_START_LIMIT:.0f} s)")
    print(f"Idle: {result['idle_flow_runs_per_min']} flow runs/min, {result['idle_task_runs_per_min']} task runs/min "
          f"(targets <= {IDLE_FLOW_RUNS_PER_MINUTE:g} and 0); Prefect database {result['prefect_db_mb']} MB, growing "
          f"{result['prefect_db_growth_mb_per_24h_idle']} MB per idle day before retention "
          "(3 days of runs, 1 of events)")
    ok = (result["alert_opened_s"]["p95"] <= ALERT_P95_LIMIT
          and result["recovery_start_s"]["max"] <= RECOVERY_START_LIMIT
          and result["idle_flow_runs_per_min"] <= IDLE_FLOW_RUNS_PER_MINUTE
          and result["idle_task_runs_per_min"] == 0)
    result["passed"] = ok
    (DATA_DIR / "ops-check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
