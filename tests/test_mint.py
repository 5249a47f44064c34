"""The mint stage on real PostgreSQL and anvil: only released rows are minted, once; a dropped mint
transaction is re-sent; a mint the contract refuses fails without a transaction."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from sqlalchemy import text

from payments.config import Signer, signer_from_key
from payments.localstack import Deployment
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.mint import mint_tick
from tasks.monitor import Thresholds, compute_metrics, evaluate_alerts, read_thresholds
from tasks.recovery import Filters, retry_failed_mints
from tasks.send import send_lane_tick
from tests.conftest import rpc
from tests.helpers import force_confirmation_failed, mint_statuses, queue_many
from tests.test_recovery import FAST

pytestmark = pytest.mark.chain


def _minter(chain: Deployment) -> Signer:
    return signer_from_key("0x" + bytes(chain.minter.key).hex())


def _minted(chain: Deployment, who: str) -> int:
    w3 = chain.w3()
    token = w3.eth.contract(address=w3.to_checksum_address(chain.mint_token),
                            abi=chain.payment_contract().abi)  # same ERC-20 read interface
    return int(token.functions.balanceOf(w3.to_checksum_address(who)).call())


def _pay(pipeline: Pipeline, chain: Deployment, n: int) -> list[str]:
    ids = queue_many(pipeline.engine, chain, n)
    send_lane_tick(pipeline, pipeline.signers[0], new_owner_id("t"), FAST)
    return ids


def _rows(pipeline: Pipeline) -> list[Any]:
    with pipeline.engine.connect() as conn:
        return conn.execute(text("SELECT id, status, recipient, amount, tx_hash, error FROM mint_queue ORDER BY id")
                            ).all()


def test_released_mints_are_minted_once(pipeline: Pipeline, chain: Deployment) -> None:
    ids = _pay(pipeline, chain, 3)
    force_confirmation_failed(pipeline.engine, [ids[2]])  # its mint is cancelled
    confirm_tick(pipeline, "t", FAST)
    minter = _minter(chain)
    before = {r.recipient: _minted(chain, r.recipient) for r in _rows(pipeline)}
    report = mint_tick(pipeline, minter, "mint-run", FAST)
    assert (report.claimed, report.sent, report.minted) == (2, 2, 2)
    assert mint_statuses(pipeline.engine) == {"minted": 2, "cancelled": 1}
    for r in _rows(pipeline):
        expected = before[r.recipient] + (int(r.amount) if r.status == "minted" else 0)
        assert _minted(chain, r.recipient) == expected
    again = mint_tick(pipeline, minter, "mint-run", FAST)
    assert (again.claimed, again.sent, again.minted) == (0, 0, 0)
    with pipeline.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_transactions WHERE kind = 'mint'")).scalar_one() == 2


def test_a_dropped_mint_is_sent_again_and_minted_once(pipeline: Pipeline, chain: Deployment) -> None:
    _pay(pipeline, chain, 1)
    confirm_tick(pipeline, "t", FAST)
    rpc(chain, "evm_setAutomine", [False])
    minter = _minter(chain)
    fast_resend = dataclasses.replace(FAST, rebroadcast_after_seconds=1)
    first = mint_tick(pipeline, minter, "mint-run", fast_resend)
    assert first.sent == 1 and first.minted == 0
    (row,) = _rows(pipeline)
    rpc(chain, "anvil_dropTransaction", [row.tx_hash])
    rpc(chain, "evm_mine", [])
    time.sleep(1.1)
    assert mint_tick(pipeline, minter, "mint-run", fast_resend).rebroadcast == 1
    rpc(chain, "evm_mine", [])
    assert mint_tick(pipeline, minter, "mint-run", fast_resend).minted == 1
    assert _minted(chain, row.recipient) >= int(row.amount)
    assert mint_statuses(pipeline.engine) == {"minted": 1}


def test_a_mint_the_contract_refuses_fails_without_a_transaction(pipeline: Pipeline, chain: Deployment) -> None:
    _pay(pipeline, chain, 1)
    confirm_tick(pipeline, "t", FAST)
    not_a_minter = pipeline.signers[1]
    report = mint_tick(pipeline, not_a_minter, "mint-run", FAST)
    assert (report.failed, report.sent) == (1, 0)
    (row,) = _rows(pipeline)
    assert row.status == "failed" and "not a minter" in row.error and row.tx_hash is None
    with pipeline.engine.connect() as conn:  # the monitor raises it: paid, nothing minted
        metrics = compute_metrics(conn, read_thresholds(conn))
    assert metrics.failed_mints == 1 and "mints_failed" in [a.key for a in evaluate_alerts(metrics, Thresholds())]
    dry = retry_failed_mints(pipeline, Filters(), dry_run=True, actor="t")
    assert [(a.action, a.outcome) for a in dry] == [("retry_mint", "would_apply")]
    assert mint_statuses(pipeline.engine) == {"failed": 1}
    retry_failed_mints(pipeline, Filters(), dry_run=False, actor="t")
    assert mint_statuses(pipeline.engine) == {"released": 1}
    assert mint_tick(pipeline, _minter(chain), "mint-run", FAST).minted == 1  # the cause fixed: minted once
    assert mint_statuses(pipeline.engine) == {"minted": 1}
