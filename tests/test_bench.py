"""`make bench` in its tiny configuration, so the benchmark cannot rot: every stage runs on a few dozen
payments against a real anvil, PostgreSQL and API process, and the last line is the JSON the issue's
tooling reads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from payments.config import REPO_ROOT

pytestmark = [pytest.mark.chain]

KEYS = {"limit_tx_per_s", "intake_per_s", "send_per_s", "send_batched_per_s", "confirm_per_s", "mint_per_s",
        "e2e_per_s", "p95_request_to_completed_s_at_200", "claim_to_sent_50_s", "max_rss_mb"}


def test_the_benchmark_runs_every_stage_and_ends_with_its_json_line() -> None:
    done = subprocess.run([sys.executable, "scripts/bench.py", "--tiny"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) >= KEYS
    for key in ("limit_tx_per_s", "intake_per_s", "send_per_s", "confirm_per_s", "mint_per_s", "claim_to_sent_50_s"):
        assert isinstance(result[key], int | float) and result[key] > 0, key
    assert result["intake_accepted"] == 30  # every pre-signed payment accepted
