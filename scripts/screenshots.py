"""Screenshots of the Prefect UI on the local stack for docs/screenshots/ (headless Chromium).

    python scripts/screenshots.py [--payments 40] [--out docs/screenshots]

Starts a fresh local stack, has buyers pay through the API, waits until every payment is terminal and
the monitor has made a pass after that, then loads the dashboard, the monitor's artifact, the send run
that settled the first payment and the work pool in Chromium (scripts/ui_check.mjs), failing if a page
shows a connection error."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import requests
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from payments.config import REPO_ROOT
from payments.demo import _buy_all
from payments.localstack import DATA_DIR, start_embedded_postgres
from payments.stack import local_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--payments", type=int, default=40)
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "screenshots"))
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL") and not os.environ.get("PREFECT_API_URL"):
        # a fresh Prefect database: the pictures show this run's history only
        with psycopg.connect(start_embedded_postgres(DATA_DIR / "pg"), autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "prefect" WITH (FORCE)')
    with local_stack(database="payments_screens", buyers=8) as stack:
        _buy_all(stack, args.payments)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with stack.engine.connect() as conn:
                open_ = conn.execute(text("SELECT count(*) FROM payment_queue WHERE status NOT IN "
                                          "('completed', 'failed', 'confirmation_failed')")).scalar_one()
            if not open_:
                break
            time.sleep(1)
        time.sleep(40)  # a monitor pass after the drain
        api = stack.prefect.api_url
        flows = {f["name"]: f["id"] for f in requests.post(f"{api}/flows/filter", json={}, timeout=30).json()}
        runs = requests.post(f"{api}/flow_runs/filter", timeout=30, json={
            "flows": {"id": {"any_": [flows["send-payments"]]}}, "sort": "START_TIME_ASC", "limit": 20}).json()
        # the run that sent the payments (renamed with its counts when it ended, or still running)
        send_run = next(r["id"] for r in runs if (r.get("start_time") and "sent" in r["name"])
                        or r.get("state_type") == "RUNNING")
        latest = requests.post(f"{api}/artifacts/filter", timeout=30, json={
            "artifacts": {"key": {"any_": ["payment-queue-summary"]}}, "sort": "CREATED_DESC",
            "limit": 1}).json()[0]["id"]
        ui = stack.prefect.ui_url
        pages = ["dashboard=/dashboard", f"monitor-artifact=/artifacts/artifact/{latest}|queue depth",
                 "monitor-artifact-history=/artifacts/key/payment-queue-summary|Payment queue",
                 f"send-run=/runs/flow-run/{send_run}|send", "work-pool=/work-pools/work-pool/payments|payments"]
        command = ["node", str(REPO_ROOT / "scripts" / "ui_check.mjs"), ui, "--screenshots", args.out]
        for page in pages:
            command += ["--page", page]
        done = subprocess.run(command, cwd=REPO_ROOT, text=True)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
