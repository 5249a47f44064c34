"""Money-safety reproductions: each test drives only the stage entry points (send_lane_tick, confirm_tick,
mint_tick, the recovery functions) against real PostgreSQL and anvil, and judges the outcome from the chain
(merchant balance, mint totalSupply and Transfer events, signer nonces) and the queue statuses.

On anvil a transaction whose fee cap falls below the base fee is evicted from the pool when a block is built
and refused when sent again: that is what "stuck" means here. The base fee is raised with
anvil_setNextBlockBaseFeePerGas, which evm_revert does not undo, so an autouse fixture puts it back."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from eth_abi.abi import encode as abi_encode
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from sqlalchemy import Engine, event, text
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint, RPCResponse

from payments.chain import Fees, sign_tx
from payments.config import Signer, signer_from_key
from payments.db import make_engine
from payments.localstack import Deployment, dev_account, queue_signed_payments
from payments.settings import PipelineSettings
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.mint import mint_tick
from tasks.recovery import Filters, retry_failed_mints
from tasks.send import send_lane_tick
from tests.conftest import rpc
from tests.helpers import PRICE, authorize, balance, chain_time, payment, queue

pytestmark = pytest.mark.chain

GWEI = 10**9
HIGH_BASE_FEE = 200 * GWEI  # far above what a settlement signed on the quiet test chain may pay
TERMINAL_PAYMENT = ("completed", "failed", "confirmation_failed")
TERMINAL_MINT = ("minted", "failed", "cancelled")
TRANSFER_TOPIC = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
ZERO_TOPIC = "0x" + "0" * 64
CONFIGURE_MINTER = keccak(text="configureMinter(address,bool)")[:4]


# --------------------------------------------------------------------------- settings


def _settings(**overrides: Any) -> PipelineSettings:
    """Defaults plus overrides. Fields the stage rewrite adds (mint_confirmation_depth, fee_bump_after_blocks,
    max_fee_per_gas_cap) raise TypeError on code that does not have them."""
    return dataclasses.replace(PipelineSettings(payment_batch_size=100, confirmation_batch_size=100), **overrides)


def _bump_soon(**overrides: Any) -> PipelineSettings:
    """Settings under which a stuck settlement is replaced after one block (fee_bump_after_blocks) or one second
    (the time-based timeout). The scenarios using them are about what happens around a bump, not about when it
    happens, so fee_bump_after_blocks is set only where PipelineSettings has it: older code then shows the
    defect itself rather than a TypeError."""
    known = {f.name for f in dataclasses.fields(PipelineSettings)}
    blocks = {"fee_bump_after_blocks": 1} if "fee_bump_after_blocks" in known else {}
    return _settings(confirmation_timeout_seconds=1, rebroadcast_after_seconds=1, **blocks, **overrides)


# --------------------------------------------------------------------------- chain


@pytest.fixture(autouse=True)
def _chain_left_clean(chain: Deployment) -> Iterator[None]:
    """The next test finds the base fee it would have had and no transaction of ours in the pool (a transaction
    left queued behind a nonce gap would otherwise be mined into the next test's chain)."""
    base_fee = rpc(chain, "eth_getBlockByNumber", ["pending", False])["baseFeePerGas"]
    yield
    for i in range(10):
        rpc(chain, "anvil_removePoolTransactions", [dev_account(i).address])
    rpc(chain, "anvil_setNextBlockBaseFeePerGas", [base_fee])


def _mine(chain: Deployment, blocks: int = 1) -> None:
    for _ in range(blocks):
        rpc(chain, "evm_mine", [])


def _raise_base_fee(chain: Deployment, fee: int = HIGH_BASE_FEE) -> None:
    """One block at base fee `fee`: every transaction priced below it leaves the pool (and, while the base fee
    stays above its cap, is refused if sent again). Empty blocks then lower the base fee by 1/8 each."""
    rpc(chain, "anvil_setNextBlockBaseFeePerGas", [hex(fee)])
    _mine(chain)


def _receipt(chain: Deployment, tx_hash: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = rpc(chain, "eth_getTransactionReceipt", [tx_hash])
    return found


def _status_of(chain: Deployment, tx_hash: str) -> int | None:
    r = _receipt(chain, tx_hash)
    return None if r is None else int(r["status"], 16)


def _nonces(chain: Deployment, address: str) -> tuple[int, int]:
    """eth_getTransactionCount (latest, pending)."""
    return (int(rpc(chain, "eth_getTransactionCount", [address, "latest"]), 16),
            int(rpc(chain, "eth_getTransactionCount", [address, "pending"]), 16))


def _pool(chain: Deployment, address: str) -> list[dict[str, Any]]:
    """The transactions of `address` in anvil's pool (pending and queued), by nonce."""
    content = rpc(chain, "txpool_content", [])
    txs = [tx for part in ("pending", "queued") for sender, by_nonce in content.get(part, {}).items()
           if sender.lower() == address.lower() for tx in by_nonce.values()]
    return sorted(txs, key=lambda tx: int(tx["nonce"], 16))


def _pool_hashes(chain: Deployment, address: str) -> list[str]:
    return [str(tx["hash"]).lower() for tx in _pool(chain, address)]


def _send_from(chain: Deployment, account: LocalAccount, to: str, data: bytes, *, tip: int = 50 * GWEI) -> str:
    """A transaction from any funded account, priced to go first in the next block."""
    nonce = int(rpc(chain, "eth_getTransactionCount", [account.address, "pending"]), 16)
    base = int(rpc(chain, "eth_getBlockByNumber", ["pending", False])["baseFeePerGas"], 16)
    tx = sign_tx(account.key, chain_id=chain.chain_id, nonce=nonce, to=to, data=data, gas=300_000,
                 fees=Fees(2 * base + tip, tip))
    return str(rpc(chain, "eth_sendRawTransaction", ["0x" + tx.raw.hex()])).lower()


def _configure_minter(chain: Deployment, allowed: bool) -> str:
    """The mint token's owner grants or revokes the minter wallet's role (sent, not mined)."""
    data = CONFIGURE_MINTER + abi_encode(["address", "bool"], [chain.minter.address, allowed])
    return _send_from(chain, chain.deployer, chain.mint_token, data)


def _minter(chain: Deployment) -> Signer:
    return signer_from_key("0x" + bytes(chain.minter.key).hex())


def _total_supply(chain: Deployment) -> int:
    return int(rpc(chain, "eth_call", [{"to": chain.mint_token, "data": "0x" + keccak(text="totalSupply()")[:4].hex()},
                                       "latest"]), 16)


def _mints_to(chain: Deployment, recipient: str, from_block: int) -> int:
    """Transfer events from the zero address to `recipient` on the mint token since `from_block`."""
    logs = rpc(chain, "eth_getLogs", [{"address": chain.mint_token, "fromBlock": hex(from_block), "toBlock": "latest",
                                       "topics": [TRANSFER_TOPIC, ZERO_TOPIC,
                                                  "0x" + "0" * 24 + recipient.lower().removeprefix("0x")]}])
    return len(logs)


# --------------------------------------------------------------------------- queue


def _status(engine: Engine, pid: str) -> str:
    return str(payment(engine, pid)["status"])


def _mint_row(engine: Engine, pid: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT id, status, recipient, amount FROM mint_queue WHERE payment_id = :p"),
                            {"p": pid}).one()


def _tx_rows(engine: Engine, pid: str) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT tx_hash, nonce, max_fee_per_gas, max_priority_fee_per_gas FROM payment_transactions "
            "WHERE payment_id = :p ORDER BY id"), {"p": pid}).all())


def _send(p: Pipeline, settings: PipelineSettings, lane: int = 0) -> Any:
    return send_lane_tick(p, p.signers[lane], new_owner_id("test-send"), settings)


def _drive(until: Callable[[], bool], step: Callable[[], object], seconds: float = 10.0) -> bool:
    """Run `step` until `until()` holds or `seconds` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not until():
        if time.monotonic() > deadline:
            return False
        step()
        time.sleep(0.1)
    return True


def _then(*steps: Callable[[], object]) -> Callable[[], None]:
    """One step made of several, run in order."""
    def step() -> None:
        for s in steps:
            s()

    return step


def _settled(engine: Engine, pid: str) -> Callable[[], bool]:
    """The payment reached a final status and so did its mint (minted, or cancelled/failed)."""
    return lambda: _status(engine, pid) in TERMINAL_PAYMENT and _mint_row(engine, pid).status in TERMINAL_MINT


def _pipeline_step(p: Pipeline, chain: Deployment, settings: PipelineSettings, *,
                   lanes: tuple[int, ...] = ()) -> Callable[[], None]:
    """One round of the pipeline as the scheduled flows would run it, then one block."""
    minter = _minter(chain)

    def step() -> None:
        for lane in lanes:
            _send(p, settings, lane)
        confirm_tick(p, "test-confirm", settings)
        mint_tick(p, minter, "test-mint", settings)
        _mine(chain)

    return step


def _wait_until_older_than(since: float, seconds: float) -> None:
    """Let a time-based threshold of the settings (in whole seconds) pass."""
    time.sleep(max(0.0, since + seconds - time.monotonic()))


# --------------------------------------------------------------------------- two overlapping confirm runs


class _HoldingProvider(HTTPProvider):
    """An RPC connection that stops at its first request once `armed` is set, until `resume` is set."""

    def __init__(self, url: str) -> None:
        super().__init__(url, request_kwargs={"timeout": 10})
        self.armed = threading.Event()
        self.held = threading.Event()
        self.resume = threading.Event()

    def _gate(self) -> None:
        if self.armed.is_set() and not self.held.is_set():
            self.held.set()
            self.resume.wait(timeout=8)

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        self._gate()
        return super().make_request(method, params)

    def make_batch_request(self, batch_requests: list[tuple[RPCEndpoint, Any]]) -> list[RPCResponse] | RPCResponse:
        self._gate()
        return super().make_batch_request(batch_requests)


class _HeldConfirmRun(threading.Thread):
    """A confirm_tick on its own database engine and RPC connection, held at its first chain request after it
    has read payment_queue: it keeps the view it loaded while the test lets another run act, then goes on."""

    def __init__(self, p: Pipeline, db_url: str, rpc_url: str, settings: PipelineSettings, actor: str) -> None:
        super().__init__(daemon=True)
        self.provider = _HoldingProvider(rpc_url)
        self.engine = make_engine(db_url)
        event.listen(self.engine, "after_cursor_execute", self._saw_sql)
        self.p = dataclasses.replace(p, engine=self.engine, w3=Web3(self.provider))
        self.settings = settings
        self.actor = actor
        self.report: Any = None
        self.error: BaseException | None = None

    def _saw_sql(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "payment_queue" in statement:
            self.provider.armed.set()

    def run(self) -> None:
        try:
            self.report = confirm_tick(self.p, self.actor, self.settings)
        except BaseException as exc:
            self.error = exc
        finally:
            self.engine.dispose()

    def start_and_hold(self) -> None:
        self.start()
        assert self.provider.held.wait(timeout=10), "the held run never reached the chain after reading the queue"

    def finish(self) -> None:
        self.provider.resume.set()
        self.join(timeout=20)
        assert not self.is_alive(), "the held run did not finish"


# =========================================================================== 1. double mint via the runbook


def test_double_mint_runbook_retry_failed_mints_mints_once(pipeline: Pipeline, chain: Deployment) -> None:
    """A mint that passed simulation reverts on chain (the minter lost its role before it mined); the row goes
    failed, the cause is fixed and an operator runs retry-failed-mints twice while mint ticks run. The reverted
    transaction stays in the row's history; the bought amount must be minted exactly once."""
    engine, settings, minter = pipeline.engine, _settings(), _minter(chain)
    start = chain.w3().eth.block_number + 1
    supply = _total_supply(chain)
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)
    assert _drive(lambda: _mint_row(engine, pid).status == "released",
                  _then(lambda: confirm_tick(pipeline, "test-confirm", settings), lambda: _mine(chain)))
    mint = _mint_row(engine, pid)

    rpc(chain, "evm_setAutomine", [False])
    mint_tick(pipeline, minter, "test-mint", settings)  # simulated fine, signed, in the pool
    (first_mint,) = _pool_hashes(chain, minter.address)
    revoke = _configure_minter(chain, False)  # higher tip: mined ahead of the mint in the same block
    _mine(chain)
    assert _status_of(chain, revoke) == 1 and _status_of(chain, first_mint) == 0, "setup: the mint must revert"
    assert _drive(lambda: _mint_row(engine, pid).status == "failed",
                  _then(lambda: mint_tick(pipeline, minter, "test-mint", settings), lambda: _mine(chain)))
    grant = _configure_minter(chain, True)  # the cause is fixed
    _mine(chain)
    assert _status_of(chain, grant) == 1

    for _ in range(2):  # the runbook, twice: retry the failed mint, let the mint flow run
        retry_failed_mints(pipeline, Filters(), dry_run=False, actor="operator")
        mint_tick(pipeline, minter, "test-mint", settings)

    def quiet() -> bool:
        latest, pending = _nonces(chain, minter.address)
        return latest == pending and not _pool(chain, minter.address) and \
            _mint_row(engine, pid).status in TERMINAL_MINT

    _drive(quiet, _then(lambda: _mine(chain), lambda: mint_tick(pipeline, minter, "test-mint", settings)))
    minted = _total_supply(chain) - supply
    assert minted == int(mint.amount), f"minted {minted / int(mint.amount):g} times the bought amount"
    assert _mints_to(chain, mint.recipient, start) == 1
    assert _mint_row(engine, pid).status == "minted"


# =========================================================================== 2a. overlapping confirm runs


def test_overlapping_confirm_runs_stale_view_does_not_fail_a_settled_payment(
    pipeline: Pipeline, chain: Deployment, embedded_db_url: str
) -> None:
    """Run A loads the stuck payment (hashes [T1]); run B replaces T1 by T2 and T2 is mined; run A then judges
    from its stale view. The authorization is used on chain with the transfer to pay_to: the payment is
    completed and its mint released - never confirmation_failed."""
    engine, settings = pipeline.engine, _bump_soon()
    merchant = balance(chain, chain.merchant)
    supply = _total_supply(chain)
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)
    sent_at = time.monotonic()
    (t1,) = _pool_hashes(chain, pipeline.signers[0].address)
    _raise_base_fee(chain)
    _mine(chain)
    assert _receipt(chain, t1) is None and not _pool(chain, pipeline.signers[0].address)
    _wait_until_older_than(sent_at, 1.2)

    run_a = _HeldConfirmRun(pipeline, embedded_db_url, chain.rpc_url, settings, "confirm-run-a")
    run_a.start_and_hold()  # A has read the queue: T1 is all it knows
    try:  # B replaces T1 and the replacement is mined (unless A's hold on the payment keeps B out of it)
        if _drive(lambda: len(_tx_rows(engine, pid)) > 1,
                  lambda: confirm_tick(pipeline, "confirm-run-b", settings), seconds=5):
            _mine(chain)
            assert _status_of(chain, _tx_rows(engine, pid)[-1].tx_hash) == 1, "setup: the replacement is mined"
    finally:
        run_a.finish()
    assert run_a.error is None, f"run A raised {run_a.error!r}"

    _drive(_settled(engine, pid), _pipeline_step(pipeline, chain, settings))
    row = payment(engine, pid)
    assert row["status"] == "completed", f"{row['status']}: {row['error']}"
    assert balance(chain, chain.merchant) == merchant + PRICE
    assert _mint_row(engine, pid).status == "minted"
    assert _total_supply(chain) - supply == int(_mint_row(engine, pid).amount)


# =========================================================================== 2b. front-run settlement


def test_front_run_settlement_completes_and_releases_the_mint(pipeline: Pipeline, chain: Deployment) -> None:
    """Someone copies our transferWithAuthorization calldata from the mempool and lands it first; our own
    transaction reverts ("authorization is used or canceled"). The merchant was paid: the payment is
    completed and its mint minted."""
    engine, settings = pipeline.engine, _settings()
    merchant = balance(chain, chain.merchant)
    supply = _total_supply(chain)
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)
    (ours,) = _pool(chain, pipeline.signers[0].address)
    theirs = _send_from(chain, dev_account(5), ours["to"], bytes.fromhex(ours["input"][2:]))
    _mine(chain)
    assert _status_of(chain, theirs) == 1 and _status_of(chain, ours["hash"]) == 0, "setup: the copy must win"
    assert balance(chain, chain.merchant) == merchant + PRICE

    _drive(_settled(engine, pid), _pipeline_step(pipeline, chain, settings))
    row = payment(engine, pid)
    assert row["status"] == "completed", f"{row['status']}: {row['error']}"
    assert _mint_row(engine, pid).status == "minted"
    assert _total_supply(chain) - supply == int(_mint_row(engine, pid).amount)
    assert balance(chain, chain.merchant) == merchant + PRICE


# =========================================================================== 3. jammed signer


def test_jammed_signer_later_payments_settle_without_a_nonce_gap(pipeline: Pipeline, chain: Deployment) -> None:
    """A settlement leaves the mempool and cannot be sent again (its fee cap is below the base fee), then its
    authorization expires. Its nonce must not jam the signer: the signer's later payments settle."""
    engine, settings = pipeline.engine, _bump_soon()
    signer = pipeline.signers[0].address
    merchant = balance(chain, chain.merchant)
    rpc(chain, "evm_setAutomine", [False])
    jammed = queue(engine, chain, authorize(chain, chain.buyers[0], valid_before=chain_time(chain) + 120))
    _send(pipeline, settings)
    (t1,) = _pool_hashes(chain, signer)
    raw = rpc(chain, "eth_getRawTransactionByHash", [t1])
    rpc(chain, "anvil_dropTransaction", [t1])
    _raise_base_fee(chain)
    refused = chain.w3().provider.make_request(RPCEndpoint("eth_sendRawTransaction"), [raw])
    assert "error" in refused, f"setup: the re-broadcast must be refused, got {refused}"
    rpc(chain, "evm_increaseTime", [600])
    _mine(chain)  # the authorization has expired
    later = [queue(engine, chain, authorize(chain, buyer, valid_before=chain_time(chain) + 3600))
             for buyer in chain.buyers[1:3]]

    def step() -> None:
        _send(pipeline, settings)
        confirm_tick(pipeline, "test-confirm", settings)
        _mine(chain)

    _drive(lambda: all(_status(engine, pid) == "completed" for pid in later), step, seconds=12)
    latest, pending = _nonces(chain, signer)
    assert [_status(engine, pid) for pid in later] == ["completed", "completed"], \
        f"signer nonces: latest {latest}, pending {pending}, pool {[int(t['nonce'], 16) for t in _pool(chain, signer)]}"
    assert latest == pending
    assert _status(engine, jammed) != "completed"
    assert balance(chain, chain.merchant) == merchant + 2 * PRICE


# =========================================================================== 4. fee bumps in time and capped


def test_fee_bump_in_time_replaces_within_fee_bump_after_blocks(pipeline: Pipeline, chain: Deployment) -> None:
    """An underpriced settlement gets its first replacement once fee_bump_after_blocks blocks passed without
    it - not after confirmation_timeout_seconds."""
    settings = _settings(confirmation_timeout_seconds=300, fee_bump_after_blocks=2)
    engine = pipeline.engine
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)
    (t1,) = _pool(chain, pipeline.signers[0].address)
    _raise_base_fee(chain, int(t1["maxFeePerGas"], 16) * 3 // 2)  # evicted; the base fee sinks back to its cap
    _mine(chain, 2)  # three blocks without it
    assert _receipt(chain, t1["hash"]) is None
    confirm_tick(pipeline, "test-confirm", settings)
    rows = _tx_rows(engine, pid)
    assert len(rows) > 1, "no replacement after 3 blocks with fee_bump_after_blocks=2"
    first, bump = rows[0], rows[-1]
    assert bump.nonce == first.nonce
    assert bump.max_fee_per_gas >= first.max_fee_per_gas * 11 // 10
    assert bump.max_priority_fee_per_gas >= first.max_priority_fee_per_gas * 11 // 10
    assert rpc(chain, "eth_getTransactionByHash", [bump.tx_hash]) is not None, "the replacement was not broadcast"


def test_fee_bump_capped_never_exceeds_max_fee_per_gas_cap(pipeline: Pipeline, chain: Deployment) -> None:
    """Repeated replacements of a stuck settlement never offer more than max_fee_per_gas_cap."""
    cap = 10 * GWEI
    settings = _settings(confirmation_timeout_seconds=1, rebroadcast_after_seconds=1, fee_bump_after_blocks=1,
                         max_fee_per_gas_cap=cap)
    engine, signer = pipeline.engine, pipeline.signers[0].address
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)
    (t1,) = _pool(chain, signer)
    assert int(t1["maxFeePerGas"], 16) < cap, "setup: the first settlement leaves room below the cap"
    _raise_base_fee(chain)  # nothing at or below the cap can be mined now

    def over_cap() -> list[str]:
        stored = [f"stored {r.tx_hash}: {int(r.max_fee_per_gas)}" for r in _tx_rows(engine, pid)
                  if int(r.max_fee_per_gas) > cap]
        pooled = [f"in the pool {tx['hash']}: {int(tx['maxFeePerGas'], 16)}" for tx in _pool(chain, signer)
                  if int(tx["maxFeePerGas"], 16) > cap]
        return stored + pooled

    _drive(lambda: len(_tx_rows(engine, pid)) >= 4 or bool(over_cap()),
           _then(lambda: confirm_tick(pipeline, "test-confirm", settings), lambda: _mine(chain)), seconds=6)
    assert over_cap() == [], f"max_fee_per_gas_cap {cap} exceeded"


# =========================================================================== 5. reorg before mint depth


def test_reorg_before_mint_depth_mints_exactly_once(pipeline: Pipeline, chain: Deployment) -> None:
    """confirmation_depth=1, mint_confirmation_depth=3: a payment completes, then a reorg removes its settlement
    block before the mint depth. Nothing may be minted for it until it is settled again; then exactly once."""
    settings = _settings(confirmation_depth=1, mint_confirmation_depth=3)
    engine, minter = pipeline.engine, _minter(chain)
    start = chain.w3().eth.block_number + 1
    supply = _total_supply(chain)
    merchant = balance(chain, chain.merchant)
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)  # mined at once (automine)
    (settlement,) = [r.tx_hash for r in _tx_rows(engine, pid)]
    receipt = _receipt(chain, settlement)
    assert receipt is not None
    settled_in = int(receipt["blockNumber"], 16)
    confirm_tick(pipeline, "test-confirm", settings)
    assert _status(engine, pid) == "completed"
    mint_tick(pipeline, minter, "test-mint", settings)  # the settlement is 1 block deep: too shallow to mint
    assert _mint_row(engine, pid).status not in ("released", "minting", "minted"), \
        f"mint {_mint_row(engine, pid).status} at depth 1 of mint_confirmation_depth 3"
    assert _total_supply(chain) == supply

    rpc(chain, "anvil_reorg", [chain.w3().eth.block_number - settled_in + 1, []])
    assert _receipt(chain, settlement) is None, "setup: the reorg must remove the settlement"
    assert balance(chain, chain.merchant) == merchant

    done = _drive(lambda: _status(engine, pid) == "completed" and _mint_row(engine, pid).status == "minted",
                  _pipeline_step(pipeline, chain, settings, lanes=(0,)), seconds=15)
    minted = _total_supply(chain) - supply
    assert minted == int(_mint_row(engine, pid).amount), \
        f"minted {minted} for {_mint_row(engine, pid).amount} bought (payment {_status(engine, pid)})"
    assert done and _mints_to(chain, _mint_row(engine, pid).recipient, start) == 1
    assert balance(chain, chain.merchant) == merchant + PRICE


# =========================================================================== 6. head-of-line blocking


def test_head_of_line_blocking_mined_payments_complete_behind_stuck_ones(
    pipeline: Pipeline, chain: Deployment
) -> None:
    """25 sent payments: the oldest 20 stuck (dropped, no receipt), the 5 newest mined. With
    confirmation_batch_size=20, two confirm ticks complete the 5 mined ones."""
    engine = pipeline.engine
    settings = _settings(confirmation_batch_size=20, confirmation_depth=1, mint_confirmation_depth=1)
    rpc(chain, "evm_setAutomine", [False])
    stuck = queue_signed_payments(engine, chain, 20, price=PRICE, actor="test")
    assert _send(pipeline, settings, lane=0).sent == 20
    for tx_hash in _pool_hashes(chain, pipeline.signers[0].address):
        rpc(chain, "anvil_dropTransaction", [tx_hash])
    mined = queue_signed_payments(engine, chain, 5, price=PRICE, actor="test")
    assert _send(pipeline, settings, lane=1).sent == 5
    _mine(chain)
    assert _nonces(chain, pipeline.signers[1].address)[0] == 5, "setup: the 5 newest are mined"
    assert _nonces(chain, pipeline.signers[0].address)[0] == 0, "setup: the 20 oldest are not"
    for _ in range(2):
        confirm_tick(pipeline, "test-confirm", settings)
    assert [_status(engine, pid) for pid in mined] == ["completed"] * 5
    assert {_status(engine, pid) for pid in stuck} == {"sent"}


# =========================================================================== 7. signer removed, concurrent bumps


def test_removed_signer_confirm_tick_does_not_raise_and_completes_its_mined_payments(
    pipeline: Pipeline, chain: Deployment
) -> None:
    """Signer S sent a payment that was mined and one that is stuck; S is then removed from the configuration.
    Confirm runs without S must not raise, and S's mined payment completes."""
    engine, settings = pipeline.engine, _bump_soon()
    removed = pipeline.signers[1].address
    merchant = balance(chain, chain.merchant)
    rpc(chain, "evm_setAutomine", [False])
    mined = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings, lane=1)
    _mine(chain)
    stuck = queue(engine, chain, authorize(chain, chain.buyers[1]))
    _send(pipeline, settings, lane=1)
    sent_at = time.monotonic()
    _raise_base_fee(chain)
    assert _nonces(chain, removed)[0] == 1 and not _pool(chain, removed), "setup: one mined, one stuck"

    without_s = dataclasses.replace(pipeline, signers=[pipeline.signers[0]])
    deadline = sent_at + 3  # past the 1 s timeout and rebroadcast interval, and several blocks
    while time.monotonic() < deadline:
        confirm_tick(without_s, "test-confirm", settings)
        _mine(chain)
        time.sleep(0.2)
    assert _status(engine, mined) == "completed"
    assert balance(chain, chain.merchant) == merchant + PRICE
    assert _status(engine, stuck) == "sent"  # it can still land; nobody here can replace it


def test_two_runs_bumping_the_same_payment_do_not_crash(
    pipeline: Pipeline, chain: Deployment, embedded_db_url: str
) -> None:
    """Two confirm runs load the same stuck payment and both decide to replace it with the same inputs (same
    transaction, same fees, same head): the second must not crash on UNIQUE(tx_hash), and the payment lands."""
    engine, settings = pipeline.engine, _bump_soon()
    merchant = balance(chain, chain.merchant)
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline, settings)
    sent_at = time.monotonic()
    _raise_base_fee(chain)
    _mine(chain)
    _wait_until_older_than(sent_at, 1.2)

    run_a = _HeldConfirmRun(pipeline, embedded_db_url, chain.rpc_url, settings, "confirm-run-a")
    run_a.start_and_hold()
    try:  # B replaces T1 (unless A's hold on the payment keeps B out of it); no block in between
        _drive(lambda: len(_tx_rows(engine, pid)) > 1,
               lambda: confirm_tick(pipeline, "confirm-run-b", settings), seconds=5)
    finally:
        run_a.finish()  # same payment view, same head: the same replacement
    assert run_a.error is None, f"run A raised {run_a.error!r}"

    _drive(_settled(engine, pid), _pipeline_step(pipeline, chain, settings))
    assert _status(engine, pid) == "completed"
    assert balance(chain, chain.merchant) == merchant + PRICE


# =========================================================================== found in review


def test_a_settlement_someone_else_has_pending_is_handed_over_not_failed(pipeline: Pipeline, chain: Deployment) -> None:
    """The payer (or anyone) broadcasts the same transferWithAuthorization first; our simulation against
    the pending state reverts "used or canceled" while that transaction is not mined yet. The payment
    must not become `failed` (the merchant is about to be paid): the confirm stage completes it."""
    engine, settings = pipeline.engine, _settings(confirmation_depth=1, mint_confirmation_depth=1)
    rpc(chain, "evm_setAutomine", [False])
    before = balance(chain, chain.merchant)
    auth = authorize(chain, chain.buyers[3])
    pid = queue(engine, chain, auth)
    raw = bytes.fromhex(auth.signature[2:])
    data = chain.payment_contract().functions.transferWithAuthorization(
        Web3.to_checksum_address(auth.payer), Web3.to_checksum_address(auth.pay_to), auth.value, auth.valid_after,
        auth.valid_before, bytes.fromhex(auth.nonce[2:]), raw[64], raw[:32], raw[32:64])._encode_transaction_data()
    _send_from(chain, dev_account(9), chain.payment_token, bytes.fromhex(data[2:]))
    report = _send(pipeline, settings)
    assert (report.failed, report.handed_over, report.signed) == (0, 1, 0)
    assert _status(engine, pid) == "sent"
    _mine(chain)
    confirm_tick(pipeline, "t", settings)
    row = payment(engine, pid)
    assert row["status"] == "completed" and row["tx_nonce"] is None  # settled by a transaction we never signed
    assert _mint_row(engine, pid).status == "released"
    assert balance(chain, chain.merchant) == before + PRICE


def test_one_payment_whose_lookups_fail_does_not_stop_the_others(pipeline: Pipeline, chain: Deployment) -> None:
    """A payment whose token answers nothing sensible (no code at the address) waits alone: the healthy
    payment in the same pass completes and the wallets are still tended."""
    engine, settings = pipeline.engine, _settings(confirmation_depth=1, mint_confirmation_depth=1)
    good = queue(engine, chain, authorize(chain, chain.buyers[0]))
    assert _send(pipeline, settings).sent == 1
    _mine(chain)
    poisoned = queue(engine, chain, authorize(chain, chain.buyers[1]))
    with engine.begin() as conn:  # as if it had been sent against a token that is not there
        conn.execute(text("UPDATE payment_queue SET status = 'sent', token = :t, signer = :s, tx_nonce = 99, "
                          "tx_hash = :h, sent_at = now(), processed_at = now(), lease_owner = NULL, "
                          "lease_expires_at = NULL WHERE id = :i"),
                     {"t": "0x" + "de" * 20, "s": pipeline.signers[1].address, "h": "0x" + "ab" * 32, "i": poisoned})
    report = confirm_tick(pipeline, "t", settings)
    assert _status(engine, good) == "completed" and _status(engine, poisoned) == "sent"
    assert report.completed == 1 and report.waiting == 1
