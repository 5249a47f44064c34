"""The send stage: claim pending payments, simulate, take nonces, sign, persist, broadcast, mark sent.

Order is what keeps money safe: the nonce, the signed bytes and the hash are committed before anything
is broadcast, so a crash at any point leaves either nothing on chain or bytes we can send again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from payments.chain import (
    Fees,
    RpcResult,
    SignedTx,
    broadcast_accepted,
    failure_code,
    fees_from,
    is_execution_reverted,
    revert_reason,
    rpc_batch,
    settlement_data,
    sign_tx,
    to_int,
)
from payments.config import Signer
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.faults import AFTER_BROADCAST, AFTER_PERSIST, failpoint
from payments.settings import PipelineSettings
from payments.statuses import TxKind
from payments.txm import first_fees, persist_attempts, record_broadcasts
from tasks.common import Pipeline, chunked, retry_on_rpc_error, run_logger

BROADCAST_CHUNK = 500


@dataclass(frozen=True)
class ClaimedPayment:
    id: str
    token: str
    payer: str
    pay_to: str
    amount: int
    valid_after: int
    valid_before: int
    auth_nonce: str
    signature: str
    signed_before: bool = False  # a transaction was signed for it before (a settlement that did not settle)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ClaimedPayment:
        return cls(
            id=row["id"],
            token=row["token"],
            payer=row["payer"],
            pay_to=row["pay_to"],
            amount=int(row["amount"]),
            valid_after=int(row["valid_after"]),
            valid_before=int(row["valid_before"]),
            auth_nonce=row["auth_nonce"],
            signature=row["signature"],
            signed_before=bool(row.get("signed_before")),
        )

    def calldata(self) -> bytes:
        """transferWithAuthorization call data: the v,r,s form for a 65-byte ECDSA-shaped signature (an
        EOA's, or a one-owner wallet's), the bytes form for any other contract-wallet signature
        (`payments.chain.settlement_data` says why). Outcomes are read from AuthorizationUsed events,
        whichever form settled."""
        return settlement_data(
            self.payer, self.pay_to, self.amount, self.valid_after, self.valid_before, self.auth_nonce,
            self.signature,
        )


@dataclass
class SendReport:
    claimed: int = 0
    failed: int = 0
    released: int = 0
    signed: int = 0
    sent: int = 0
    resumed: int = 0
    not_accepted: int = 0
    handed_over: int = 0


# --------------------------------------------------------------------------- claims


def release_expired_leases(p: Pipeline, actor: str) -> list[str]:
    with transaction(p.engine, actor) as conn:
        return [r["id"] for r in fetch_all(conn, "release_expired_leases", chain_id=p.chain_id, now=None)]


def claim_pending_payments(
    p: Pipeline, signer: Signer, owner: str, limit: int, lease_seconds: int
) -> list[ClaimedPayment]:
    with transaction(p.engine, owner) as conn:
        rows = fetch_all(conn, "claim_pending_payments", chain_id=p.chain_id, limit=limit, signer=signer.address,
                         owner=owner, lease_seconds=lease_seconds)
    rows.sort(key=lambda r: (r["created_at"], r["id"]))
    return [ClaimedPayment.from_row(r) for r in rows]


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Simulation:
    fees: Fees
    chain_pending_nonce: int
    head: int
    gas: dict[str, int]  # payment id -> gas limit, for settlements that would succeed
    rejected: dict[str, str]  # payment id -> reason, for settlements that would revert
    unknown: dict[str, str]  # payment id -> RPC error that proves nothing (retry later)


def simulate_settlements(p: Pipeline, signer: Signer, payments: list[ClaimedPayment], gas_cap: int,
                         fee_cap: int = 10**16) -> Simulation:
    """One JSON-RPC batch: fee data, the signer's pending nonce, and an eth_estimateGas per payment
    (against the pending state, so payments queued behind each other are seen)."""
    calls: list[tuple[str, list[Any]]] = [
        ("eth_getBlockByNumber", ["latest", False]),
        ("eth_maxPriorityFeePerGas", []),
        ("eth_getTransactionCount", [signer.address, "pending"]),
    ]
    calls += [
        ("eth_estimateGas", [{"from": signer.address, "to": pay.token, "data": "0x" + pay.calldata().hex()},
                             "pending"])
        for pay in payments
    ]
    answers = rpc_batch(p.w3, calls)
    head, tip, count = answers[0], answers[1], answers[2]
    if not (head.ok and count.ok):
        raise RpcError(f"fee/nonce lookup failed: {head.message or count.message}")
    base_fee = to_int(head.result.get("baseFeePerGas", "0x0"))
    fees = first_fees(fees_from(base_fee, to_int(tip.result) if tip.ok else 10**9), fee_cap)
    gas: dict[str, int] = {}
    rejected: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for pay, answer in zip(payments, answers[3:], strict=True):
        if answer.ok:
            limit = to_int(answer.result) * 6 // 5 + 5_000
            if limit > gas_cap:
                rejected[pay.id] = f"gas estimate {limit} above settlement_gas_limit {gas_cap}"
            else:
                gas[pay.id] = limit
        elif answer.error and is_execution_reverted(answer.error):
            reason = revert_reason(answer.error)
            rejected[pay.id] = f"{failure_code(reason)}: simulation reverted: {reason}"
        else:
            unknown[pay.id] = answer.message or "estimate failed"
    return Simulation(fees=fees, chain_pending_nonce=to_int(count.result), head=to_int(head.result["number"]),
                      gas=gas, rejected=rejected, unknown=unknown)


def fail_processing_payments(p: Pipeline, owner: str, reasons: dict[str, str]) -> list[str]:
    if not reasons:
        return []
    with transaction(p.engine, owner) as conn:
        rows = fetch_all(conn, "fail_processing_payments", ids=list(reasons), errors=list(reasons.values()),
                         owner=owner)
    return [r["id"] for r in rows]


def release_processing_payments(p: Pipeline, owner: str, ids: list[str], error: str) -> list[str]:
    if not ids:
        return []
    with transaction(p.engine, owner) as conn:
        return [r["id"] for r in fetch_all(conn, "release_processing_payments", ids=ids, owner=owner, error=error)]


USED_OR_CANCELED = failure_code("used or canceled")


def hand_over_to_confirm(p: Pipeline, owner: str, reasons: dict[str, str]) -> list[str]:
    """Payments the send stage must not fail (the authorization is already used or cancelled by someone
    else's transaction, or we signed for it before and its calldata is public): `sent` without a new
    transaction, for the confirm stage to decide from the chain."""
    if not reasons:
        return []
    with transaction(p.engine, owner) as conn:
        rows = fetch_all(conn, "hand_over_to_confirm", owner=owner, ids=list(reasons),
                         errors=[why[:500] for why in reasons.values()])
    return [r["id"] for r in rows]


# --------------------------------------------------------------------------- nonces, signing, persistence


def assign_nonces_and_sign(
    p: Pipeline, signer: Signer, owner: str, payments: list[ClaimedPayment], sim: Simulation
) -> list[tuple[str, SignedTx]]:
    """In ONE database transaction: lock the payments still owned, take consecutive nonces from the
    transaction manager (the wallet's counter row stays locked until commit), sign, store every attempt,
    attach nonce + hash to its payment. Nothing is broadcast here."""
    to_sign = [pay for pay in payments if pay.id in sim.gas]
    if not to_sign:
        return []
    by_id = {pay.id: pay for pay in to_sign}
    txm = p.txm()
    with transaction(p.engine, owner) as conn:
        owned = [r["id"] for r in fetch_all(conn, "lock_owned_unsigned_payments", ids=list(by_id), owner=owner)]
        if not owned:
            return []
        first = txm.take_nonces(conn, signer.address, sim.chain_pending_nonce, len(owned))
        signed = [(pid, sign_tx(signer.account.key, chain_id=p.chain_id, nonce=first + offset, to=by_id[pid].token,
                                data=by_id[pid].calldata(), gas=sim.gas[pid], fees=sim.fees))
                  for offset, pid in enumerate(owned)]
        persist_attempts(conn, p.chain_id, signer.address, [tx for _, tx in signed],
                         [TxKind.SETTLEMENT for _ in signed], [pid for pid, _ in signed], [None for _ in signed],
                         sim.head)
        attached = fetch_all(conn, "attach_transactions", ids=[pid for pid, _ in signed],
                             nonces=[tx.nonce for _, tx in signed], hashes=[tx.tx_hash for _, tx in signed],
                             owner=owner, sent_block=sim.head)
        if len(attached) != len(signed):  # rows are locked above, so this means a bug: roll back everything
            raise RuntimeError(f"attached {len(attached)} of {len(signed)} signed payments")
    return signed


# --------------------------------------------------------------------------- broadcast


def send_stored(p: Pipeline, hashes: list[str]) -> dict[str, RpcResult]:
    """Broadcast the committed bytes of these transactions (idempotent); nothing is written."""
    if not hashes:
        return {}
    with p.engine.connect() as conn:
        rows = fetch_all(conn, "raw_transactions_for_hashes", hashes=hashes)
    answers = rpc_batch(p.w3, [("eth_sendRawTransaction", ["0x" + bytes(r["raw_tx"]).hex()]) for r in rows])
    return {r["tx_hash"]: a for r, a in zip(rows, answers, strict=True)}


def broadcast_and_mark_sent(p: Pipeline, actor: str, pairs: list[tuple[str, str]]) -> tuple[list[str], dict[str, str]]:
    """Broadcast (payment id, tx hash) pairs; payments whose tx the node accepted become `sent`.
    The rest stay `processing` with the node's answer noted; the transaction manager re-prices an
    attempt refused for its fees, and a dead run's lease expiry brings the rest back to
    `resume_unbroadcast`, which sends the same bytes again."""
    results = send_stored(p, [h for _, h in pairs])
    failpoint(AFTER_BROADCAST)
    accepted = [pid for pid, h in pairs if h in results and broadcast_accepted(results[h])]
    refused = {pid: f"broadcast not accepted: {results[h].message}"[:500]
               for pid, h in pairs if h in results and not broadcast_accepted(results[h])}
    sent: list[str] = []
    if results:  # the attempts, `sent` and the refusals: one transaction
        with transaction(p.engine, actor) as conn:
            record_broadcasts(conn, results)
            if accepted:
                sent = [r["id"] for r in fetch_all(conn, "mark_sent", ids=accepted)]
            if refused:
                conn.execute(query("note_processing_error"),
                             {"ids": list(refused), "errors": list(refused.values())})
    log = run_logger()
    if log.isEnabledFor(logging.DEBUG):  # the seed's per-transaction line; DEBUG so high rates stay cheap
        sent_ids = set(sent)
        for pid, h in pairs:
            if pid in sent_ids:
                log.debug("📤 Sent payment tx: %s (payment %s)", h, pid)
    return sent, refused


def resume_unbroadcast(p: Pipeline, signer: Signer, owner: str, lease_seconds: int) -> list[str]:
    """Payments signed and persisted by a run that died (lease expired) get the same bytes again."""
    with transaction(p.engine, owner) as conn:
        rows = fetch_all(conn, "claim_unbroadcast_payments", chain_id=p.chain_id, signer=signer.address,
                         owner=owner, lease_seconds=lease_seconds, now=None)
    if not rows:
        return []
    sent, _ = broadcast_and_mark_sent(p, owner, [(r["id"], r["tx_hash"]) for r in rows])
    return sent


# --------------------------------------------------------------------------- one tick of one lane


def prepare_lane_batch(
    p: Pipeline, signer: Signer, owner: str, settings: PipelineSettings, report: SendReport
) -> list[tuple[str, str]]:
    """Everything before broadcast: (payment id, tx hash) pairs, committed and ready to send."""
    claimed = claim_pending_payments(p, signer, owner, settings.payment_batch_size, settings.processing_lease_seconds)
    report.claimed += len(claimed)
    if not claimed:
        return []
    try:
        sim = simulate_settlements(p, signer, claimed, settings.settlement_gas_limit, settings.max_fee_per_gas_cap)
    except RpcError as exc:
        report.released += len(release_processing_payments(p, owner, [c.id for c in claimed], str(exc)[:500]))
        raise
    signed_before = {c.id for c in claimed if c.signed_before}
    handed = {pid: why for pid, why in sim.rejected.items() if why.startswith(USED_OR_CANCELED) or pid in signed_before}
    report.handed_over += len(hand_over_to_confirm(p, owner, handed))
    failed = fail_processing_payments(p, owner, {k: v for k, v in sim.rejected.items() if k not in handed})
    report.failed += len(failed)
    log = run_logger()
    for pid in failed:
        log.warning("Payment send failed: %s (%s)", pid, sim.rejected[pid])
    if sim.unknown:
        report.released += len(release_processing_payments(
            p, owner, list(sim.unknown), "simulation inconclusive: " + next(iter(sim.unknown.values()))[:400]))
    signed = assign_nonces_and_sign(p, signer, owner, claimed, sim)
    report.signed += len(signed)
    failpoint(AFTER_PERSIST)
    return [(pid, tx.tx_hash) for pid, tx in signed]


def resume_and_prepare(
    p: Pipeline, signer: Signer, owner: str, settings: PipelineSettings
) -> tuple[SendReport, list[tuple[str, str]]]:
    """Re-send what dead runs left signed, then claim and prepare a new batch for this lane."""
    report = SendReport()
    report.resumed = len(resume_unbroadcast(p, signer, owner, settings.processing_lease_seconds))
    return report, prepare_lane_batch(p, signer, owner, settings, report)


def send_lane_tick(p: Pipeline, signer: Signer, owner: str, settings: PipelineSettings) -> SendReport:
    """One tick of one signer lane, all stages in this process (what tests and benchmarks call)."""
    report, pairs = resume_and_prepare(p, signer, owner, settings)
    for chunk in chunked(pairs, BROADCAST_CHUNK):
        sent, refused = broadcast_and_mark_sent(p, owner, chunk)
        report.sent += len(sent)
        report.not_accepted += len(refused)
    return report


# --------------------------------------------------------------------------- Prefect tasks


@task(name="prepare-lane-batch", retries=2, retry_delay_seconds=[1, 2], retry_condition_fn=retry_on_rpc_error,
      cache_policy=NO_CACHE)
def prepare_lane_batch_task(
    p: Pipeline, signer: Signer, owner: str, settings: PipelineSettings
) -> tuple[SendReport, list[tuple[str, str]]]:
    return resume_and_prepare(p, signer, owner, settings)


@task(name="broadcast-chunk", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=retry_on_rpc_error,
      cache_policy=NO_CACHE)
def broadcast_chunk_task(p: Pipeline, owner: str, chunk: list[tuple[str, str]]) -> tuple[int, int]:
    sent, refused = broadcast_and_mark_sent(p, owner, chunk)
    log = run_logger()
    for pid, why in refused.items():
        log.warning("Payment send failed: %s (%s)", pid, why)
    return len(sent), len(refused)
