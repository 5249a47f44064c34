"""The whole local stack, started and stopped as one: embedded PostgreSQL, anvil, a Prefect server on
PostgreSQL, the contracts and a demo mint product, the deployments on the `payments` work pool with a
supervised worker (deployments/deploy.py, deployments/worker.py: the production path), the HTTP API and an
alert receiver. `make demo` and `make up` use it. DATABASE_URL / RPC_URL / PREFECT_API_URL / signer and
minter keys in the environment switch those parts to real infrastructure."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import Engine

from payments.alert_receiver import AlertReceiver, start_alert_receiver
from payments.config import REPO_ROOT
from payments.db import make_engine, query, transaction
from payments.localstack import (
    DATA_DIR,
    Deployment,
    create_database,
    deploy_payment_stack,
    free_port,
    start_anvil,
    start_embedded_postgres,
)
from payments.migrate import upgrade
from payments.prefect_server import PrefectServer, prefect_home, start_prefect_server

PRODUCT_ID = "demo-mint"
KEY_VARIABLES = frozenset({"SIGNER_PRIVATE_KEYS", "SIGNER_KEY_SECRET_BLOCKS", "MINTER_PRIVATE_KEY",
                           "MINTER_KEY_SECRET_BLOCK"})
PRICE = 1_000_000  # 1.00 of the 6-decimal payment token per unit
MINT_AMOUNT = 10**18  # one whole mint token per unit


@dataclass
class Stack:
    database_url: str = field(repr=False)
    rpc_url: str
    deployment: Deployment
    prefect: PrefectServer
    api_url: str
    api_key: str = field(repr=False)
    engine: Engine
    worker: Supervised
    api: subprocess.Popen[bytes]
    receiver: AlertReceiver | None
    service_rpc_url: str = ""  # what the flows and the API use (rpc_url unless local_stack got service_rpc)


def save_deployment(path: Path, dep: Deployment, stack_id: str) -> None:
    """The local chain's contracts and throwaway demo accounts, for the next `make up` (mode 600 from
    the first byte)."""
    body = json.dumps({
        "stack_id": stack_id, "chain_id": dep.chain_id, "payment_token": dep.payment_token,
        "mint_token": dep.mint_token, "merchant": dep.merchant,
        "buyers": ["0x" + bytes(b.key).hex() for b in dep.buyers]}, indent=1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    path.chmod(0o600)


def _update_saved(path: Path, **fields: Any) -> None:
    saved = json.loads(path.read_text())
    saved.update(fields)
    saved = {k: v for k, v in saved.items() if v is not None}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(saved, indent=1))


def record_clean_stop(path: Path, rpc_url: str) -> None:
    """The chain's head as the stack stops (before anvil writes its state): the next start checks that
    the kept chain still holds exactly that block, i.e. lost nothing the payments database saw."""
    from payments.chain import connect

    with suppress(Exception):
        block = connect(rpc_url, timeout=5).eth.get_block("latest")
        _update_saved(path, stopped={"number": int(block["number"]), "hash": block["hash"].hex()})


def kept_chain_matches(path: Path, rpc_url: str) -> str | None:
    """Why the kept chain cannot be used with the kept database (None: it can): the last stop was not
    clean (anvil may have lost the blocks after its last periodic save), or the block recorded then is
    not on this chain."""
    from payments.chain import connect

    saved = json.loads(path.read_text())
    stopped = saved.get("stopped")
    if not stopped:
        return "the last stop was not clean (the chain may have lost its newest blocks)"
    try:
        block = connect(rpc_url).eth.get_block(int(stopped["number"]))
    except Exception:
        return f"block {stopped['number']} of the last stop is missing"
    if block["hash"].hex().removeprefix("0x") != str(stopped["hash"]).removeprefix("0x"):
        return f"block {stopped['number']} differs from the one recorded at the last stop"
    return None


def database_tag(admin_uri: str, database: str) -> str | None:
    """The stack id a kept payments database was created for (its COMMENT), None if it does not exist."""
    import psycopg

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        row = conn.execute("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
                           (database,)).fetchone()
    return None if row is None else str(row[0] or "")


def tag_database(admin_uri: str, database: str, stack_id: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(database),
                                                                     sql.Literal(f"local-stack:{stack_id}")))


def load_deployment(path: Path, rpc_url: str) -> Deployment | None:
    """The saved deployment, if its contracts are on the chain at rpc_url."""
    from eth_account import Account

    from payments.chain import connect
    from payments.localstack import dev_account

    saved = json.loads(path.read_text())
    w3 = connect(rpc_url)
    if not saved.get("stack_id") or w3.eth.chain_id != saved["chain_id"] \
            or not w3.eth.get_code(w3.to_checksum_address(saved["payment_token"])):
        return None
    return Deployment(rpc_url=rpc_url, chain_id=saved["chain_id"], payment_token=saved["payment_token"],
                      mint_token=saved["mint_token"], deployer=dev_account(0), merchant=saved["merchant"],
                      signers=[dev_account(1), dev_account(2)], minter=dev_account(8),
                      buyers=[Account.from_key(k) for k in saved["buyers"]])


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def group_alive(pgid: int) -> bool:
    """Whether a process group still has a live (not zombie) member."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


MARKER = "PAYMENTS_SUPERVISED"


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries MARKER=<marker> (a supervised process and everything it
    started, whatever session or process group they moved to: Prefect's worker starts each flow run in a
    session of its own, out of reach of a signal to the worker's group)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                pid = int(environ.parent.name)
                if (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return pids


def end_marked(marker: str, grace: float = 20.0) -> int:
    """SIGTERM every process carrying the marker, SIGKILL what is left after `grace` s; returns how many."""
    pids = marked_pids(marker)
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and marked_pids(marker):
        time.sleep(0.2)
    for pid in marked_pids(marker):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


class Supervised:
    """A long-lived process kept running: whenever it exits or is killed it is started again, after a
    pause that doubles from `first_delay` up to `max_delay` (back to `first_delay` once a start has lived
    `healthy_after` seconds). Each start runs in its own process group, with a marker in its environment
    that everything it starts inherits; what a dead one left behind (the flow runs of a killed worker, in
    sessions of their own) is ended before the next start, so the new process's runs are the only ones,
    the worker's limit holds and a restart with another signer set really drops the old keys. `stop()`
    ends it and everything it started for good."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path, *,
                 first_delay: float = 1.0, max_delay: float = 30.0, healthy_after: float = 60.0,
                 say: Callable[[str], None] = print) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.first_delay, self.max_delay, self.healthy_after = first_delay, max_delay, healthy_after
        self.say = say
        self.marker = f"{name}-{secrets.token_hex(6)}"
        self.restarts = 0
        self._groups: list[int] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        log_path.write_bytes(b"")
        self.process = self._start()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(self.args, env={**self.env, MARKER: self.marker}, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self._groups.append(process.pid)
        self._started_at = time.monotonic()
        return process

    def _watch(self) -> None:
        delay = self.first_delay
        while True:
            code = self.process.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - self._started_at >= self.healthy_after:
                delay = self.first_delay
            message = f"{self.name} (pid {self.process.pid}) exited with {code}; restarting in {delay:.0f} s"
            self.say(message)
            with self.log_path.open("ab") as log:
                log.write(f"--- {message} ---\n".encode())
            _signal_group(self.process.pid, signal.SIGTERM)  # the runs it started, if any are left
            left = end_marked(self.marker)  # and those in sessions of their own
            if left:
                with self.log_path.open("ab") as log:
                    log.write(f"--- ended {left} process(es) the exited one had started ---\n".encode())
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                self.process = self._start()
                self.restarts += 1
            delay = min(delay * 2, self.max_delay)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """Supervised (running, or about to be started again)."""
        return not self._stopping.is_set()

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
            stop_process(self.process)
        self._thread.join(timeout=10)
        leftovers = [g for g in self._groups[:-1] if group_alive(g)]
        for g in leftovers:
            _signal_group(g, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while leftovers and time.monotonic() < deadline:
            time.sleep(0.2)
            leftovers = [g for g in leftovers if group_alive(g)]
        for g in leftovers:
            _signal_group(g, signal.SIGKILL)
        end_marked(self.marker)

    @property
    def process_groups(self) -> list[int]:
        """Every process group started so far (one per start; the last is the current process's)."""
        return list(self._groups)


def _spawn(stack: ExitStack, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("wb")
    stack.callback(log.close)
    process = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    stack.callback(stop_process, process)
    return process


def _wait_http(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} did not come up; see {log_path}")
        try:
            if requests.get(url, timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; see {log_path}")


@contextmanager
def local_stack(*, database: str, buyers: int, block_time: float = 1, api_port: int | None = None,
                say: bool = True, log_dir: Path = DATA_DIR,
                service_rpc: Callable[[str], str] | None = None, keep: bool = False) -> Iterator[Stack]:
    """service_rpc maps the chain's URL (used to deploy) to the URL the flows and the API are given,
    e.g. a proxy in front of it. keep: the chain (anvil --state in .data/chain/), its contracts and
    buyers (.data/chain/stack.json) and the payments database are kept from the last start with keep, if
    they are all there; otherwise (and without keep) they start fresh. The Prefect database is always kept
    (its history, schedules and automations); `make up RESET=1` drops it too."""

    def note(message: str) -> None:
        if say:
            print(f"• {message}", flush=True)

    DATA_DIR.mkdir(exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = ".data" if log_dir == DATA_DIR else str(log_dir)  # as shown to the operator
    with ExitStack() as stack:
        t0 = time.monotonic()
        database_url = os.environ.get("DATABASE_URL")
        rpc_url = os.environ.get("RPC_URL")
        chain_dir, saved = DATA_DIR / "chain", DATA_DIR / "chain" / "stack.json"
        keep = keep and not database_url and not rpc_url  # kept only when both are the stack's own
        kept = keep and (chain_dir / "state.json").exists() and saved.exists()
        if keep and not kept and chain_dir.exists():
            shutil.rmtree(chain_dir)
        pg_uri = None if database_url else start_embedded_postgres(DATA_DIR / "pg")
        deployment = None
        anvil = None
        if not rpc_url:
            if keep:
                chain_dir.mkdir(parents=True, exist_ok=True)
            anvil = start_anvil(block_time=block_time, log_dir=log_dir,
                                state_file=chain_dir / "state.json" if keep else None)
            rpc_url = anvil.url
            stack.callback(lambda: anvil.stop() if anvil is not None else None)  # whichever anvil runs last
        if kept and anvil is not None and pg_uri is not None:
            deployment = load_deployment(saved, rpc_url)
            stack_id = json.loads(saved.read_text()).get("stack_id", "")
            why = ("the saved contracts are not on it" if deployment is None
                   else kept_chain_matches(saved, rpc_url)
                   or (None if database_tag(pg_uri, database) == f"local-stack:{stack_id}"
                       else f"the payments database {database} is not the one made with it"))
            if why:  # never a kept database on another chain (or the reverse): both start afresh
                note(f"not keeping the chain and the payments database: {why}; starting both afresh")
                anvil.stop()
                shutil.rmtree(chain_dir)
                chain_dir.mkdir(parents=True)
                anvil = start_anvil(block_time=block_time, log_dir=log_dir, state_file=chain_dir / "state.json")
                rpc_url, deployment, kept = anvil.url, None, False
            else:
                _update_saved(saved, stopped=None)  # until the next clean stop records it again
        if anvil is not None and keep:
            stack.callback(record_clean_stop, saved, rpc_url)  # runs just before anvil stops
        if not database_url:
            assert pg_uri is not None
            database_url = create_database(pg_uri, database, drop=not kept)
        upgrade(database_url)
        note(f"PostgreSQL ready, schema migrated ({time.monotonic() - t0:.1f} s)"
             + (f"; payments database {database} kept from the last start" if kept else ""))
        if deployment is None:
            deployment = deploy_payment_stack(rpc_url, buyers=buyers)
            if keep and pg_uri is not None:
                stack_id = secrets.token_hex(8)
                save_deployment(saved, deployment, stack_id)
                tag_database(pg_uri, database, stack_id)
        note(f"chain {deployment.chain_id} at {rpc_url}{' (kept from the last start)' if kept else ''}: "
             f"payment token {deployment.payment_token}, mint token {deployment.mint_token}")
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        with transaction(engine, "stack") as conn:
            conn.execute(query("upsert_product"), {
                "id": PRODUCT_ID, "chain_id": deployment.chain_id, "mint_token": deployment.mint_token.lower(),
                "payment_token": deployment.payment_token.lower(), "price_per_unit": PRICE,
                "amount_per_unit": MINT_AMOUNT, "pay_to": deployment.merchant.lower(), "max_quantity": 1000,
                "active": True})
        service_rpc_url = service_rpc(rpc_url) if service_rpc else rpc_url
        prefect = start_prefect_server(create_database(pg_uri, "prefect") if pg_uri else database_url)
        stack.callback(prefect.stop)
        note(f"Prefect API {prefect.api_url} - UI {prefect.ui_url} ({time.monotonic() - t0:.1f} s)")
        env = dict(os.environ)
        env.update({
            "DATABASE_URL": database_url, "RPC_URL": service_rpc_url, "PREFECT_API_URL": prefect.api_url,
            "PREFECT_HOME": str(prefect_home()), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",  # run pages show what each run did
        })
        env.setdefault("SIGNER_PRIVATE_KEYS", ",".join("0x" + bytes(s.key).hex() for s in deployment.signers))
        env.setdefault("MINTER_PRIVATE_KEY", "0x" + bytes(deployment.minter.key).hex())
        receiver = None
        if not env.get("ALERT_WEBHOOK_URL") and not env.get("ALERT_SLACK_WEBHOOK_URL"):
            receiver = start_alert_receiver(log_path=log_dir / "alerts.jsonl")
            stack.callback(receiver.stop)
            env["ALERT_WEBHOOK_URL"] = receiver.url
            note(f"alert notifications go to the local receiver {receiver.url} (recorded in {logs}/alerts.jsonl)")
        env["PAYMENTS_CODE_DIR"] = str(REPO_ROOT)
        env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
        # the production path: deployments from deployments/prefect.yaml on the work pool, and a worker
        deploy = subprocess.run([sys.executable, "-m", "deployments.deploy"], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True)
        (log_dir / "deploy.log").write_text(deploy.stdout + deploy.stderr)
        if deploy.returncode != 0:
            raise RuntimeError(f"deploying the flows failed; see {logs}/deploy.log")
        note(f"deployed deployments/prefect.yaml on work pool 'payments' ({time.monotonic() - t0:.1f} s)")
        # Kept running: if the worker dies, a new one starts (and starts each scheduled deployment at once).
        worker = Supervised("worker", [sys.executable, "-m", "deployments.worker"], env, log_dir / "worker.log",
                            say=lambda m: note(f"{m} (see {logs}/worker.log)"))
        stack.callback(worker.stop)
        port = api_port or free_port()
        api_key = env.get("PAYMENTS_API_KEY") or secrets.token_urlsafe(24)
        # The internet-facing API holds no key: it verifies with an address only.
        api_env = {k: v for k, v in env.items() if k not in KEY_VARIABLES}
        api_env.update({"PORT": str(port), "PUBLIC_URL": f"http://127.0.0.1:{port}", "PAYMENTS_API_KEY": api_key})
        api = _spawn(stack, [sys.executable, "-m", "api"], api_env, log_dir / "api.log")
        _wait_http(f"http://127.0.0.1:{port}/openapi.json", api, log_dir / "api.log")
        note(f"API http://127.0.0.1:{port} (OpenAPI at /openapi.json) ({time.monotonic() - t0:.1f} s)")
        yield Stack(database_url=database_url, rpc_url=rpc_url, deployment=deployment, prefect=prefect,
                    api_url=f"http://127.0.0.1:{port}", api_key=api_key, engine=engine, worker=worker, api=api,
                    receiver=receiver, service_rpc_url=service_rpc_url)


def trigger_deployments(stack: Stack, names: list[str]) -> None:
    """Start runs now (the worker starts one of each scheduled deployment itself when it starts)."""
    os.environ["PREFECT_API_URL"] = stack.prefect.api_url
    from prefect.deployments import run_deployment

    deadline = time.monotonic() + 60
    pending = list(names)
    while pending:
        try:
            run_deployment(pending[0], timeout=0)
            pending.pop(0)
        except Exception:
            if time.monotonic() > deadline or not stack.worker.alive():
                raise RuntimeError(f"deployment {pending[0]} did not appear; see {stack.worker.log_path}") from None
            time.sleep(0.5)
