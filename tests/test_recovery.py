"""Every recovery flow's work in dry-run and apply mode, including the refusals, on real PostgreSQL and
anvil."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import Engine, text

from payments.chain import Fees, sign_tx
from payments.db import fetch_all, transaction
from payments.localstack import Deployment, send_and_wait
from payments.settings import PipelineSettings
from tasks.common import Pipeline, new_owner_id
from tasks.recovery import (
    Filters,
    recheck_confirmation_failed,
    reconcile_block_range,
    requeue_failed,
    reset_stuck_payments,
    resync_nonces,
    rollback_to_failed,
)
from tasks.send import SendReport, prepare_lane_batch, send_lane_tick, send_stored
from tests.conftest import rpc
from tests.helpers import (
    PRICE,
    authorize,
    balance,
    chain_time,
    force_confirmation_failed,
    mint_statuses,
    payment,
    queue,
    statuses,
)

pytestmark = pytest.mark.chain

FAST = PipelineSettings(payment_batch_size=100, confirmation_batch_size=100, confirmation_depth=1,
                        mint_confirmation_depth=1, finality_depth=1)
ALL = Filters()


def _outcomes(actions: list[Any]) -> dict[str | None, tuple[str, str]]:
    return {a.payment_id: (a.action, a.outcome) for a in actions}


def _send(p: Pipeline) -> Any:
    return send_lane_tick(p, p.signers[0], new_owner_id("test"), FAST)


def _recorded(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM payment_events")).scalar_one())


def _settle_directly(chain: Deployment, auth: Any) -> None:
    """Someone else (here the deployer) submits the buyer's authorization before we do."""
    raw = bytes.fromhex(auth.signature[2:])
    token = chain.payment_contract()
    send_and_wait(chain.w3(), chain.deployer, token.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")(
        auth.payer, auth.pay_to, auth.value, auth.valid_after, auth.valid_before, bytes.fromhex(auth.nonce[2:]),
        raw[64], raw[:32], raw[32:64]))


def test_reset_stuck_payments_dry_run_then_apply(pipeline: Pipeline, chain: Deployment) -> None:
    engine = pipeline.engine
    unsigned = queue(engine, chain, authorize(chain, chain.buyers[0]))
    with engine.begin() as conn:  # a send run claimed it and died before signing
        conn.execute(text("UPDATE payment_queue SET status = 'processing', signer = :s, lease_owner = 'dead', "
                          "lease_expires_at = now() - interval '1 minute' WHERE id = :i"),
                     {"s": pipeline.signers[0].address, "i": unsigned})
    live = queue(engine, chain, authorize(chain, chain.buyers[1]))
    with engine.begin() as conn:
        conn.execute(text("UPDATE payment_queue SET status = 'processing', signer = :s, lease_owner = 'alive', "
                          "lease_expires_at = now() + interval '1 minute' WHERE id = :i"),
                     {"s": pipeline.signers[0].address, "i": live})
    events = _recorded(engine)
    dry = _outcomes(reset_stuck_payments(pipeline, ALL, FAST, dry_run=True, actor="t"))
    assert dry[unsigned] == ("requeue", "would_apply") and dry[live] == ("none", "unchanged")
    assert _recorded(engine) == events and payment(engine, unsigned)["status"] == "processing"
    applied = _outcomes(reset_stuck_payments(pipeline, ALL, FAST, dry_run=False, actor="t"))
    assert applied[unsigned] == ("requeue", "applied")
    assert payment(engine, unsigned)["status"] == "pending" and payment(engine, live)["status"] == "processing"


def test_reset_stuck_payments_resends_signed_bytes_and_reconciles_sent(pipeline: Pipeline,
                                                                       chain: Deployment) -> None:
    engine = pipeline.engine
    rpc(chain, "evm_setAutomine", [False])
    signed = queue(engine, chain, authorize(chain, chain.buyers[0]))
    report = SendReport()
    prepare_lane_batch(pipeline, pipeline.signers[0], "dead-run", FAST, report)  # persisted, never broadcast
    expiring = queue(engine, chain, authorize(chain, chain.buyers[1], valid_before=chain_time(chain) + 60))
    _send(pipeline)  # the dead run's lease is still valid: only `expiring` is sent
    rpc(chain, "anvil_dropTransaction", [payment(engine, expiring)["tx_hash"]])
    rpc(chain, "evm_increaseTime", [600])
    rpc(chain, "evm_mine", [])
    with engine.begin() as conn:
        conn.execute(text("UPDATE payment_queue SET lease_expires_at = now() - interval '1 second' "
                          "WHERE status = 'processing'"))
        conn.execute(text("UPDATE payment_queue SET sent_at = sent_at - interval '10 minutes' WHERE id = :i"),
                     {"i": expiring})
    dry = _outcomes(reset_stuck_payments(pipeline, ALL, FAST, dry_run=True, actor="t"))
    assert dry[signed] == ("rebroadcast_and_mark_sent", "would_apply")
    assert dry[expiring] == ("confirmation_failed", "would_apply")
    assert statuses(engine) == {"processing": 1, "sent": 1}
    applied = _outcomes(reset_stuck_payments(pipeline, ALL, FAST, dry_run=False, actor="t"))
    assert applied[signed][1] == "applied" and applied[expiring][1] == "applied"
    assert payment(engine, signed)["status"] == "sent"
    assert payment(engine, expiring)["status"] == "confirmation_failed"


def test_recheck_completes_payments_that_landed_after_all(pipeline: Pipeline, chain: Deployment) -> None:
    engine = pipeline.engine
    before = balance(chain, chain.merchant)
    ours = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline)  # mined at once (automine), but marked failed before the confirm loop saw it
    front_auth = authorize(chain, chain.buyers[1])
    front_run = queue(engine, chain, front_auth)
    rpc(chain, "evm_setAutomine", [False])
    _send(pipeline)
    rpc(chain, "anvil_dropTransaction", [payment(engine, front_run)["tx_hash"]])
    rpc(chain, "evm_setAutomine", [True])
    _settle_directly(chain, front_auth)
    never = queue(engine, chain, authorize(chain, chain.buyers[2]))
    rpc(chain, "evm_setAutomine", [False])
    _send(pipeline)
    rpc(chain, "anvil_dropTransaction", [payment(engine, never)["tx_hash"]])
    rpc(chain, "evm_setAutomine", [True])
    force_confirmation_failed(pipeline.engine, [ours, front_run, never])
    assert mint_statuses(engine) == {"cancelled": 3}
    dry = _outcomes(recheck_confirmation_failed(pipeline, ALL, FAST, dry_run=True, actor="t"))
    assert dry == {ours: ("complete", "would_apply"), front_run: ("complete", "would_apply"),
                   never: ("none", "unchanged")}
    assert statuses(engine) == {"confirmation_failed": 3}
    recheck_confirmation_failed(pipeline, ALL, FAST, dry_run=False, actor="t")
    assert payment(engine, ours)["status"] == "completed"
    settled = payment(engine, front_run)
    assert settled["status"] == "completed" and "settled by" in settled["error"]
    with engine.connect() as conn:  # a transaction we never signed
        ours_hashes = conn.execute(text("SELECT tx_hash FROM payment_transactions")).scalars().all()
    assert settled["tx_hash"] not in ours_hashes
    assert payment(engine, never)["status"] == "confirmation_failed"
    assert mint_statuses(engine) == {"released": 2, "cancelled": 1}
    assert balance(chain, chain.merchant) == before + 2 * PRICE
    again = _outcomes(recheck_confirmation_failed(pipeline, ALL, FAST, dry_run=False, actor="t"))
    assert again == {never: ("none", "unchanged")}  # released once, never twice
    assert mint_statuses(engine) == {"released": 2, "cancelled": 1}


def test_requeue_failed_only_when_safe(pipeline: Pipeline, chain: Deployment) -> None:
    engine = pipeline.engine
    poor = chain.buyers[4]
    broke = queue(engine, chain, authorize(chain, poor, value=2_000 * 10**6))  # more than the buyer holds
    expired = queue(engine, chain, authorize(chain, chain.buyers[0], valid_before=chain_time(chain) - 1))
    used_auth = authorize(chain, chain.buyers[1])
    used = queue(engine, chain, used_auth)
    _settle_directly(chain, used_auth)
    report = _send(pipeline)
    assert (report.failed, report.handed_over) == (2, 1)  # paid by someone else's transaction: not failed
    signed = queue(engine, chain, authorize(chain, chain.buyers[2]))
    _send(pipeline)
    with transaction(engine, "t") as conn:  # a payment with a broadcast tx, rolled back by an operator
        fetch_all(conn, "rollback_payments_to_failed", ids=[signed], reason="test")
    dry = _outcomes(requeue_failed(pipeline, ALL, dry_run=True, actor="t"))
    assert dry == {broke: ("requeue", "would_apply"), expired: ("requeue", "refused"),
                   signed: ("requeue", "refused")}
    assert payment(engine, used)["status"] == "sent"
    assert payment(engine, broke)["status"] == "failed"
    requeue_failed(pipeline, ALL, dry_run=False, actor="t")
    assert payment(engine, broke)["status"] == "pending"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM mint_queue WHERE payment_id = :p"), {"p": broke}
                            ).scalar_one() == "waiting"
    assert {payment(engine, i)["status"] for i in (expired, signed)} == {"failed"}


def test_rollback_to_failed_refuses_what_landed_or_could_land(pipeline: Pipeline, chain: Deployment) -> None:
    engine = pipeline.engine
    buyer = chain.buyers[3]
    first = queue(engine, chain, authorize(chain, buyer, value=600 * 10**6))
    reverted = queue(engine, chain, authorize(chain, buyer, value=600 * 10**6))
    _send(pipeline)  # both mined: the second reverts; the confirm loop has not run yet
    force_confirmation_failed(pipeline.engine, [reverted])
    rpc(chain, "evm_setAutomine", [False])
    pending_tx = queue(engine, chain, authorize(chain, chain.buyers[5]))
    _send(pipeline)  # in the mempool: could still land
    dry = _outcomes(rollback_to_failed(pipeline, ALL, FAST, reason="Rollback: test", dry_run=True, actor="t"))
    assert dry == {first: ("rollback", "refused"), reverted: ("rollback", "would_apply"),
                   pending_tx: ("rollback", "refused")}
    rollback_to_failed(pipeline, ALL, FAST, reason="Rollback: test", dry_run=False, actor="t")
    assert payment(engine, reverted)["status"] == "failed" and payment(engine, reverted)["error"] == "Rollback: test"
    assert payment(engine, first)["status"] == "sent" and payment(engine, pending_tx)["status"] == "sent"


def test_resync_nonces_rebroadcasts_and_fills_gaps(pipeline: Pipeline, chain: Deployment) -> None:
    engine = pipeline.engine
    w3 = chain.w3()
    signer = pipeline.signers[0]
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    _send(pipeline)  # nonce 0 stored and broadcast ...
    rpc(chain, "anvil_dropTransaction", [payment(engine, pid)["tx_hash"]])  # ... then dropped by the node
    with engine.begin() as conn:  # nonces 1 and 2 taken with nothing stored (a lost write)
        conn.execute(text("UPDATE signer_nonces SET next_nonce = 3 WHERE signer = :s"), {"s": signer.address})
    dry = resync_nonces(pipeline, FAST, dry_run=True, actor="t")
    assert [(a.action, a.outcome) for a in dry if signer.address in a.detail] == [
        ("fill", "would_apply"), ("rebroadcast", "would_apply")], [a.detail for a in dry]
    resync_nonces(pipeline, FAST, dry_run=False, actor="t")
    rpc(chain, "evm_mine", [])
    assert w3.eth.get_transaction_count(w3.to_checksum_address(signer.address)) == 3
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_transactions WHERE kind = 'gap_fill'")
                            ).scalar_one() == 2
    after = resync_nonces(pipeline, FAST, dry_run=True, actor="t")
    assert [(a.action, a.outcome) for a in after if signer.address in a.detail] == [("none", "unchanged")]


def test_reconcile_block_range_applies_mined_settlements_and_reports_strangers(
    pipeline: Pipeline, chain: Deployment
) -> None:
    engine = pipeline.engine
    start = chain.w3().eth.block_number + 1
    pid = queue(engine, chain, authorize(chain, chain.buyers[0]))
    report = SendReport()
    pairs = prepare_lane_batch(pipeline, pipeline.signers[0], "dead-run", FAST, report)
    send_stored(pipeline, [h for _, h in pairs])  # mined; the run died before writing `sent`
    signer = pipeline.signers[1]
    stranger = sign_tx(signer.account.key, chain_id=chain.chain_id, nonce=0, to=signer.address, data=b"",
                       gas=21_000, fees=Fees(10**11, 10**9))
    rpc(chain, "eth_sendRawTransaction", ["0x" + stranger.raw.hex()])
    end = chain.w3().eth.wait_for_transaction_receipt(stranger.tx_hash, timeout=30)["blockNumber"]
    dry = reconcile_block_range(pipeline, start, end, FAST, dry_run=True, actor="t")
    assert ("complete", "would_apply") in [(a.action, a.outcome) for a in dry if a.payment_id == pid]
    assert any(a.action == "unknown_transaction" and stranger.tx_hash in a.detail for a in dry)
    assert payment(engine, pid)["status"] == "processing"
    reconcile_block_range(pipeline, start, end, FAST, dry_run=False, actor="t")
    assert payment(engine, pid)["status"] == "completed" and mint_statuses(engine) == {"released": 1}
    with pytest.raises(ValueError):
        reconcile_block_range(pipeline, end, start - 1, FAST, dry_run=True, actor="t")


def test_recovery_filters_by_id_and_age(pipeline: Pipeline, chain: Deployment) -> None:
    engine = pipeline.engine
    a = queue(engine, chain, authorize(chain, chain.buyers[4], value=2_000 * 10**6))
    b = queue(engine, chain, authorize(chain, chain.buyers[4], value=3_000 * 10**6))
    _send(pipeline)
    only_a = requeue_failed(pipeline, dataclasses.replace(ALL, ids=[a]), dry_run=True, actor="t")
    assert [x.payment_id for x in only_a] == [a]
    assert requeue_failed(pipeline, Filters(older_than_seconds=3600), dry_run=True, actor="t") == []  # too new
    assert {x.payment_id for x in requeue_failed(pipeline, ALL, dry_run=True, actor="t")} == {a, b}
