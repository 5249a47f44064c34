"""Real parts for the tests: embedded PostgreSQL (always), the CI machine's PostgreSQL service (when it
answers), and one anvil with the contracts deployed, reverted to a snapshot before every chain test.

Each database test gets a fresh database cloned from a migrated template: real commits, real locks."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine

from payments.config import Signer, signer_from_key
from payments.db import make_engine
from payments.localstack import (
    DATA_DIR,
    Anvil,
    Deployment,
    create_database,
    deploy_payment_stack,
    start_anvil,
    start_embedded_postgres,
)
from payments.migrate import upgrade
from tasks.common import Pipeline

SERVICE_URI = os.environ.get("TEST_SERVICE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _service_answers() -> bool:
    try:
        with psycopg.connect(SERVICE_URI, connect_timeout=2):
            return True
    except Exception:
        return False


SERVERS = ["embedded"] + (["service"] if _service_answers() else [])


@dataclass
class PgServer:
    admin_uri: str
    template: str

    def fresh_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        return create_database(self.admin_uri, name, template=self.template)

    def drop(self, url: str) -> None:
        name = url.split("?")[0].rsplit("/", 1)[1]
        with psycopg.connect(self.admin_uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_servers: dict[str, PgServer] = {}


def _server(kind: str) -> PgServer:
    if kind not in _servers:
        admin = start_embedded_postgres(DATA_DIR / "pg-test") if kind == "embedded" else SERVICE_URI
        template = f"tmpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        url = create_database(admin, template)
        upgrade(url)
        with psycopg.connect(url) as c:
            c.execute("SELECT 1")
        _servers[kind] = PgServer(admin_uri=admin, template=template)
    return _servers[kind]


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    for server in _servers.values():
        with psycopg.connect(server.admin_uri, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{server.template}" WITH (FORCE)')


def _fresh(kind: str) -> Iterator[str]:
    server = _server(kind)
    url = server.fresh_database()
    yield url
    server.drop(url)


@pytest.fixture(params=SERVERS)
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh migrated database on every available server (embedded, and the CI service)."""
    yield from _fresh(request.param)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def embedded_db_url() -> Iterator[str]:
    """A fresh migrated database on the embedded server (tests that also need anvil)."""
    yield from _fresh("embedded")


@pytest.fixture
def embedded_engine(embedded_db_url: str) -> Iterator[Engine]:
    eng = make_engine(embedded_db_url)
    yield eng
    eng.dispose()


# --------------------------------------------------------------------------- chain


@pytest.fixture(scope="session")
def anvil_node() -> Iterator[Anvil]:
    node = start_anvil(gas_limit=100_000_000)
    yield node
    node.stop()


def rpc(dep: Deployment, method: str, params: list[Any]) -> Any:
    answer = dep.w3().provider.make_request(method, params)  # type: ignore[arg-type]
    assert "error" not in answer, answer
    return answer["result"]


@pytest.fixture(scope="session")
def _deployed(anvil_node: Anvil) -> tuple[Deployment, dict[str, str]]:
    dep = deploy_payment_stack(anvil_node.url, buyers=6, buyer_balance=1_000 * 10**6)
    return dep, {"id": str(rpc(dep, "evm_snapshot", []))}


@pytest.fixture
def chain(_deployed: tuple[Deployment, dict[str, str]]) -> Iterator[Deployment]:
    """The deployed contracts; the chain goes back to its post-deploy state after the test, with an empty
    transaction pool: evm_revert keeps pending transactions, which a later test would see mined (a
    wallet with nonces it never used)."""
    dep, snapshot = _deployed
    rpc(dep, "anvil_dropAllTransactions", [])
    yield dep
    rpc(dep, "anvil_dropAllTransactions", [])
    rpc(dep, "evm_setAutomine", [True])
    assert rpc(dep, "evm_revert", [snapshot["id"]]) is True
    rpc(dep, "anvil_dropAllTransactions", [])
    snapshot["id"] = str(rpc(dep, "evm_snapshot", []))  # a snapshot is used up by its revert


@pytest.fixture
def pipeline(chain: Deployment, embedded_engine: Engine) -> Pipeline:
    signers: list[Signer] = [signer_from_key("0x" + bytes(a.key).hex()) for a in chain.signers]
    return Pipeline(engine=embedded_engine, w3=chain.w3(), chain_id=chain.chain_id, signers=signers)

