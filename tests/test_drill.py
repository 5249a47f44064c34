"""The reduced fault drill (payments/drill.py, `make drill REDUCED=1`) with a fixed seed: the whole local
stack under every kind of fault, then money, mints, nonces and liveness checked from the chain. It runs
as a subprocess because it starts and stops the stack (and restarts PostgreSQL) itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from payments.config import REPO_ROOT

pytestmark = [pytest.mark.drill, pytest.mark.flow, pytest.mark.chain, pytest.mark.crash]

SEED = 402


@pytest.mark.timeout(720)
def test_reduced_fault_drill_passes_every_check() -> None:
    result = subprocess.run([sys.executable, "-m", "payments.drill", "--reduced", "--seed", str(SEED)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=700)
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    report = "\n".join(lines[-40:]) + "\n" + result.stderr[-2000:]
    assert summary.get("seed") == SEED, report
    assert result.returncode == 0 and summary.get("passed") is True, report
    assert summary["payments"] >= 60, report
    assert summary["seconds_last_fault_to_drained"] <= 120, report
