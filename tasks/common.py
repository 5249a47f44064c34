"""What every stage of the pipeline shares: the lane context, logging and lane locks."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from web3 import Web3

from payments.chain import connect
from payments.config import Signer, load_minter, load_signers, minter_configured, require_env
from payments.db import engine_for
from payments.errors import RpcError
from payments.settings import PipelineSettings, read_settings
from payments.txm import TxManager


def run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The Prefect run logger inside a flow or task run (shown in the UI), the module logger outside."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:
        return logging.getLogger("payments")


def new_owner_id(prefix: str) -> str:
    """Identifies one claimer (lease owner) across processes and machines."""
    return f"{prefix}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Pipeline:
    """Handles shared by the stages of one process: database, chain, chain id and hot wallets."""

    engine: Engine
    w3: Web3
    chain_id: int
    signers: list[Signer] = field(repr=False)
    minter: Signer | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls) -> Pipeline:
        w3 = connect(require_env("RPC_URL"))
        return cls(
            engine=engine_for(require_env("DATABASE_URL")),
            w3=w3,
            chain_id=int(w3.eth.chain_id),
            signers=load_signers(),
            minter=load_minter() if minter_configured() else None,
        )

    def txm(self) -> TxManager:
        """The transaction manager over every key this process holds (signers and the minter)."""
        keys = self.signers + ([self.minter] if self.minter is not None else [])
        return TxManager(self.engine, self.w3, self.chain_id, keys)

    def settings(self) -> PipelineSettings:
        with self.engine.connect() as conn:
            return read_settings(conn)


def lane_lock_key(chain_id: int, signer: str) -> str:
    return f"payments-send-lane:{chain_id}:{signer.lower()}"


class Lanes:
    """Signer lanes a long-running send (or mint) run holds, taken again every tick: a run that started
    while another held every lane stands by and takes them over the moment that run ends or dies (its
    session locks go with its connection), instead of ending and leaving the lanes idle until the next
    scheduled run starts."""

    def __init__(self, engine: Engine, chain_id: int, signers: list[Signer]) -> None:
        self.engine, self.chain_id, self.signers = engine, chain_id, signers
        self.conn: Connection | None = None
        self.owned: list[Signer] = []
        self.resting_until = 0.0

    def rest(self, seconds: float) -> None:
        """Let every lane go and take none for `seconds`: a run whose ticks fail (its chain or database
        connection broken) leaves the lanes to a standby run that may still reach both."""
        self.release()
        self.resting_until = time.monotonic() + seconds

    def take(self) -> list[Signer]:
        """Lock every free lane not held yet; returns all lanes this run holds now. If the locks'
        connection was lost (a PostgreSQL restart), so were the locks: nothing is held until they are
        taken again on a new connection."""
        if time.monotonic() < self.resting_until:
            return []
        try:
            if self.conn is None:
                self.conn = self.engine.connect()
                self.conn.commit()
            self.conn.execute(text("SELECT 1"))  # a dead connection means the locks are gone with it
            held = {s.address for s in self.owned}
            for s in self.signers:
                if s.address not in held and _try_lock(self.conn, lane_lock_key(self.chain_id, s.address)):
                    self.owned.append(s)
            self.conn.commit()
        except DBAPIError as exc:
            run_logger().warning("lost the signer lanes' database connection (%s); taking them again next tick",
                                 str(exc).splitlines()[0][:200])
            conn, self.conn, self.owned = self.conn, None, []
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.invalidate()  # never back to the pool: its session may still hold lane locks
        return list(self.owned)

    def release(self) -> None:
        if self.conn is None:
            return
        conn, self.conn, owned, self.owned = self.conn, None, self.owned, []
        try:
            for s in owned:
                conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"),
                             {"k": lane_lock_key(self.chain_id, s.address)})
            conn.commit()
            conn.close()
        except Exception:
            with contextlib.suppress(Exception):
                conn.invalidate()  # the session (and any lock left in it) ends with the connection


def _try_lock(conn: Connection, key: str) -> bool:
    return bool(conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:k, 0))"), {"k": key}).scalar())


def chunked(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def retry_on_rpc_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry transport-level RPC failures only, never logic errors."""
    try:
        state.result()
    except RpcError:
        return True
    except Exception:
        return False
    return False
