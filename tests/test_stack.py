"""The local stack's supervisor: a long-lived process that dies is started again with backoff, what it
left behind is stopped, and a clean stop ends everything. (The same through the whole
stack, with the real worker: tests/test_flows.py.) `make up` keeps its chain between starts."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from payments.stack import Supervised, group_alive

pytestmark = [pytest.mark.crash]

# A parent that starts a child of its own, like the worker starting flow runs.
PARENT = ("import subprocess, sys, time; "
          "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")


def _wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _members(pgid: int) -> int:
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        count += fields[0] != "Z" and int(fields[2]) == pgid
    return count


def test_a_killed_process_is_restarted_with_backoff_and_stop_ends_everything(tmp_path: Path) -> None:
    said: list[str] = []
    sup = Supervised("sleeper", [sys.executable, "-c", PARENT], dict(os.environ), tmp_path / "sleeper.log",
                     first_delay=0.3, max_delay=1, say=said.append)
    try:
        first = sup.pid
        assert _wait_for(lambda: _members(first) == 2, 10)  # the parent and its child
        os.kill(first, signal.SIGKILL)  # the parent only, as the OOM killer would
        assert _wait_for(lambda: sup.pid != first and sup.process.poll() is None, 10)
        assert sup.restarts == 1 and said and "exited with -9" in said[0]
        assert _wait_for(lambda: not group_alive(first), 10)  # the child it left was stopped
        second = sup.pid
        killed = time.monotonic()
        os.kill(second, signal.SIGKILL)
        assert _wait_for(lambda: sup.pid != second, 10)
        assert time.monotonic() - killed >= 0.55  # the second pause is twice the first (0.6 s)
        assert sup.restarts == 2 and "restarting in 1 s" in said[1]
        assert "exited with -9" in (tmp_path / "sleeper.log").read_text()
    finally:
        sup.stop()
    groups = sup.process_groups
    assert len(groups) == 3
    assert not any(group_alive(g) for g in groups)
    time.sleep(1)
    assert sup.restarts == 2 and sup.process.poll() is not None  # stopped for good


# Like Prefect's process worker: each flow run in a session (and process group) of its own.
DETACHING_PARENT = ("import subprocess, sys, time; "
                    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
                    "time.sleep(600)")


def test_what_a_killed_process_started_in_its_own_session_is_ended_before_the_restart_and_at_stop(
        tmp_path: Path) -> None:
    """A flow run keeps running after its worker is killed (it is not in the worker's process group);
    the supervisor finds it by the marker it inherited and ends it before starting the next worker, so a
    restart with another signer set does not leave runs holding the old keys."""
    from payments.stack import marked_pids

    sup = Supervised("detacher", [sys.executable, "-c", DETACHING_PARENT], dict(os.environ),
                     tmp_path / "detacher.log", first_delay=0.3, max_delay=1, say=lambda _: None)
    try:
        assert _wait_for(lambda: len(marked_pids(sup.marker)) == 2, 10)
        first, orphan = sup.pid, next(pid for pid in marked_pids(sup.marker) if pid != sup.pid)
        os.kill(first, signal.SIGKILL)
        assert _wait_for(lambda: sup.pid != first and sup.process.poll() is None, 30)
        assert _wait_for(lambda: not Path(f"/proc/{orphan}").exists()
                         or Path(f"/proc/{orphan}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 10)
        assert "ended 1 process(es)" in (tmp_path / "detacher.log").read_text()
        assert _wait_for(lambda: len(marked_pids(sup.marker)) == 2, 10)  # the new parent and its own child
    finally:
        sup.stop()
    assert marked_pids(sup.marker) == []


@pytest.mark.chain
def test_a_kept_chain_comes_back_with_its_contracts_balances_and_nonces(tmp_path: Path) -> None:
    """`make up` keeps its chain: anvil writes --state when stopped, a new anvil loads it, and the saved
    deployment is found on it (contracts, buyers' balances, the wallets' nonces), with the block recorded
    at the clean stop. A chain without the saved contracts, a stop that was not clean, or a chain whose
    block differs is refused, so a kept payments database is never paired with a chain that lost what
    the database saw."""
    from payments.localstack import deploy_payment_stack, start_anvil
    from payments.stack import kept_chain_matches, load_deployment, record_clean_stop, save_deployment

    state, saved = tmp_path / "state.json", tmp_path / "stack.json"
    anvil = start_anvil(block_time=1, log_dir=tmp_path, state_file=state)
    try:
        dep = deploy_payment_stack(anvil.url, buyers=2)
        save_deployment(saved, dep, "t1")
        assert kept_chain_matches(saved, anvil.url) is not None  # no clean stop recorded yet
        w3 = dep.w3()
        balance = dep.payment_contract().functions.balanceOf(dep.buyers[0].address).call()
        deployer_nonce = w3.eth.get_transaction_count(dep.deployer.address)
        head = w3.eth.block_number
        record_clean_stop(saved, anvil.url)
    finally:
        anvil.stop()  # SIGTERM: anvil writes its state as it exits
    assert oct(saved.stat().st_mode & 0o777) == "0o600"  # throwaway keys, still not world-readable
    again = start_anvil(block_time=1, log_dir=tmp_path, state_file=state)
    try:
        kept = load_deployment(saved, again.url)
        assert kept is not None and kept.payment_token == dep.payment_token
        assert [b.address for b in kept.buyers] == [b.address for b in dep.buyers]
        assert kept.payment_contract().functions.balanceOf(dep.buyers[0].address).call() == balance
        assert kept.w3().eth.get_transaction_count(dep.deployer.address) == deployer_nonce
        assert kept.w3().eth.block_number >= head
        assert kept_chain_matches(saved, again.url) is None
    finally:
        again.stop()
    fresh = start_anvil(block_time=1, log_dir=tmp_path)  # no state: the saved contracts are not there
    try:
        assert load_deployment(saved, fresh.url) is None
        time.sleep(1.5)
        assert kept_chain_matches(saved, fresh.url) is not None  # another chain's block at that height
    finally:
        fresh.stop()
