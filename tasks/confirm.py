"""The confirm stage: receipts for every hash of the oldest `sent` payments, then per payment:
completed (mint rows released in the same statement), confirmation_failed (mint rows cancelled),
re-broadcast, or - past the stuck timeout - reconcile against the chain and bump fees.

A payment is never marked failed while any of its transactions could still be mined."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from payments.chain import (
    Fees,
    authorization_state_data,
    broadcast_accepted,
    rpc_batch,
    sign_tx,
    to_int,
    transfer_with_authorization_data,
)
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.statuses import TxKind
from tasks.common import Pipeline, retry_on_rpc_error, run_logger
from tasks.send import broadcast_stored


@dataclass(frozen=True)
class SentPayment:
    id: str
    payer: str
    token: str
    pay_to: str
    amount: int
    valid_after: int
    valid_before: int
    auth_nonce: str
    signature: str
    signer: str
    tx_nonce: int
    age_seconds: float
    hashes: tuple[str, ...]
    latest_hash: str
    latest_age_seconds: float
    last_broadcast_age_seconds: float | None
    fees: Fees
    gas_limit: int

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> SentPayment:
        return cls(
            id=r["id"], payer=r["payer"], token=r["token"], pay_to=r["pay_to"], amount=int(r["amount"]),
            valid_after=int(r["valid_after"]), valid_before=int(r["valid_before"]), auth_nonce=r["auth_nonce"],
            signature=r["signature"], signer=r["signer"], tx_nonce=int(r["tx_nonce"]),
            age_seconds=float(r["age_seconds"]), hashes=tuple(r["hashes"]), latest_hash=r["latest_hash"],
            latest_age_seconds=float(r["latest_age_seconds"]),
            last_broadcast_age_seconds=(None if r["last_broadcast_age_seconds"] is None
                                        else float(r["last_broadcast_age_seconds"])),
            fees=Fees(int(r["max_fee_per_gas"]), int(r["max_priority_fee_per_gas"])),
            gas_limit=int(r["gas_limit"]),
        )


class Verdict(StrEnum):
    COMPLETE = "complete"
    REVERTED = "reverted"
    WAIT = "wait"
    REBROADCAST = "rebroadcast"
    RECONCILE = "reconcile"


@dataclass(frozen=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int

    @classmethod
    def from_rpc(cls, r: dict[str, Any]) -> Receipt:
        return cls(tx_hash=str(r["transactionHash"]).lower(), status=to_int(r["status"]),
                   block_number=to_int(r["blockNumber"]))


def judge(payment: SentPayment, receipts: dict[str, Receipt], head: int,
          settings: PipelineSettings) -> tuple[Verdict, Receipt | None]:
    """Pure decision for one sent payment from the receipts of its hashes and the chain head."""
    mined = [receipts[h] for h in payment.hashes if h in receipts]
    success = next((r for r in mined if r.status == 1), None)
    chosen = success or (mined[0] if mined else None)
    if chosen is not None:
        if head - chosen.block_number + 1 < settings.confirmation_depth:
            return Verdict.WAIT, chosen
        return (Verdict.COMPLETE if chosen.status == 1 else Verdict.REVERTED), chosen
    if payment.age_seconds >= settings.confirmation_timeout_seconds:
        return Verdict.RECONCILE, None
    last = payment.last_broadcast_age_seconds
    if last is None or last >= settings.rebroadcast_after_seconds:
        return Verdict.REBROADCAST, None
    return Verdict.WAIT, None


@dataclass
class ConfirmReport:
    checked: int = 0
    completed: int = 0
    confirmation_failed: int = 0
    rebroadcast: int = 0
    replaced: int = 0
    waiting: int = 0


def load_sent_payments(p: Pipeline, limit: int, ids: list[str] | None = None) -> list[SentPayment]:
    with p.engine.connect() as conn:
        rows = fetch_all(conn, "load_sent_payments", chain_id=p.chain_id, limit=limit, now=None, ids=ids)
    return [SentPayment.from_row(r) for r in rows if r["hashes"]]


def fetch_receipts(p: Pipeline, payments: list[SentPayment]) -> tuple[int, dict[str, Receipt]]:
    hashes = [h for pay in payments for h in pay.hashes]
    answers = rpc_batch(p.w3, [("eth_blockNumber", [])] + [("eth_getTransactionReceipt", [h]) for h in hashes])
    if not answers[0].ok:
        raise RpcError(f"eth_blockNumber failed: {answers[0].message}")
    receipts: dict[str, Receipt] = {}
    for h, a in zip(hashes, answers[1:], strict=True):
        if not a.ok:
            raise RpcError(f"receipt lookup failed for {h}: {a.message}")
        if a.result:
            receipts[h] = Receipt.from_rpc(a.result)
    return to_int(answers[0].result), receipts


def complete_payments(p: Pipeline, actor: str, done: list[tuple[str, Receipt]]) -> list[str]:
    """(payment id, successful receipt) -> completed, mint rows released in the same statement."""
    if not done:
        return []
    with transaction(p.engine, actor) as conn:
        rows = fetch_all(conn, "complete_payments", ids=[pid for pid, _ in done],
                         blocks=[r.block_number for _, r in done], hashes=[r.tx_hash for _, r in done])
    return [r["id"] for r in rows]


def fail_confirmations(p: Pipeline, actor: str, failed: list[tuple[str, str, int | None]]) -> list[str]:
    """(payment id, reason, block or None) -> confirmation_failed, mint rows cancelled."""
    if not failed:
        return []
    with transaction(p.engine, actor) as conn:
        rows = fetch_all(conn, "fail_confirmation", ids=[f[0] for f in failed], errors=[f[1] for f in failed],
                         blocks=[f[2] for f in failed])
    return [r["id"] for r in rows]


@dataclass(frozen=True)
class ChainView:
    """What reconciliation learns about a stuck payment, read in one batch."""

    mined_nonce_count: int  # eth_getTransactionCount(signer, latest)
    authorization_used: bool
    head_timestamp: int
    receipts: dict[str, Receipt]


def read_chain_view(p: Pipeline, payment: SentPayment) -> ChainView:
    # The nonce count is read BEFORE the receipts, so a tx mined in between shows up as a receipt.
    calls: list[tuple[str, Any]] = [
        ("eth_getTransactionCount", [payment.signer, "latest"]),
        ("eth_call", [{"to": payment.token, "data": "0x" + authorization_state_data(payment.payer,
                                                                                      payment.auth_nonce).hex()},
                      "latest"]),
        ("eth_getBlockByNumber", ["latest", False]),
    ] + [("eth_getTransactionReceipt", [h]) for h in payment.hashes]
    answers = rpc_batch(p.w3, calls)
    bad = next((a for a in answers if not a.ok), None)
    if bad is not None:
        raise RpcError(f"reconciliation lookup failed: {bad.message}")
    receipts = {h: Receipt.from_rpc(a.result) for h, a in zip(payment.hashes, answers[3:], strict=True) if a.result}
    return ChainView(
        mined_nonce_count=to_int(answers[0].result),
        authorization_used=to_int(answers[1].result or "0x0") != 0,
        head_timestamp=to_int(answers[2].result["timestamp"]),
        receipts=receipts,
    )


def unlandable_reason(payment: SentPayment, view: ChainView) -> str | None:
    """Why the payment provably can no longer land, or None if it still could."""
    if view.receipts:
        return None  # mined after all: the next tick applies it
    if view.mined_nonce_count > payment.tx_nonce:
        return (f"nonce {payment.tx_nonce} of {payment.signer} was consumed by another transaction; "
                f"none of {len(payment.hashes)} settlement hash(es) can be mined")
    if not view.authorization_used and view.head_timestamp >= payment.valid_before:
        return (f"authorization expired at {payment.valid_before} before any settlement was mined "
                f"(chain time {view.head_timestamp}); it can no longer transfer funds")
    return None


class StuckVerdict(StrEnum):
    UNLANDABLE = "unlandable"  # proven: mark confirmation_failed
    BUMP = "bump"  # could still land, no receipt: replace with higher fees
    WAIT = "wait"  # mined meanwhile, or replaced too recently


def judge_stuck(p: Pipeline, actor: str, payment: SentPayment, settings: PipelineSettings,
                *, rebroadcast: bool = True) -> tuple[StuckVerdict, str]:
    """A sent payment past the timeout: send its stored bytes again, then read the chain for proof."""
    if rebroadcast:
        broadcast_stored(p, actor, list(payment.hashes))
    view = read_chain_view(p, payment)
    reason = unlandable_reason(payment, view)
    if reason is not None:
        return StuckVerdict.UNLANDABLE, reason
    if view.receipts:
        return StuckVerdict.WAIT, "mined meanwhile; the confirmation loop applies it"
    if payment.latest_age_seconds < settings.rebroadcast_after_seconds:
        return StuckVerdict.WAIT, "replaced recently; waiting before the next fee bump"
    return StuckVerdict.BUMP, "no receipt and it can still land: replace with higher fees"


def replace_with_higher_fees(p: Pipeline, actor: str, payment: SentPayment, settings: PipelineSettings) -> str | None:
    """Fee bump: the same call at the same nonce with both fees raised; stored before broadcast."""
    signer = p.signer(payment.signer)
    head = rpc_batch(p.w3, [("eth_getBlockByNumber", ["latest", False]), ("eth_maxPriorityFeePerGas", [])])
    floor = None
    if head[0].ok:
        base = to_int(head[0].result.get("baseFeePerGas", "0x0"))
        tip = to_int(head[1].result) if head[1].ok else 10**9
        floor = Fees(2 * base + tip, tip)
    fees = payment.fees.bumped(settings.fee_bump_percent, floor)
    data = transfer_with_authorization_data(payment.payer, payment.pay_to, payment.amount, payment.valid_after,
                                            payment.valid_before, payment.auth_nonce, payment.signature)
    tx = sign_tx(signer.account.key, chain_id=p.chain_id, nonce=payment.tx_nonce, to=payment.token, data=data,
                 gas=payment.gas_limit, fees=fees)
    with transaction(p.engine, actor) as conn:
        stored = conn.execute(query("insert_replacement"), {
            "chain_id": p.chain_id, "signer": signer.address, "nonce": tx.nonce, "tx_hash": tx.tx_hash,
            "payment_id": payment.id, "kind": str(TxKind.REPLACEMENT), "raw_tx": tx.raw,
            "max_fee": fees.max_fee_per_gas, "max_tip": fees.max_priority_fee_per_gas, "gas_limit": tx.gas_limit,
        }).all()
    if not stored:
        return None  # the payment left `sent` meanwhile
    broadcast_stored(p, actor, [tx.tx_hash])
    return tx.tx_hash


def confirm_tick(p: Pipeline, actor: str, settings: PipelineSettings) -> ConfirmReport:
    report = ConfirmReport()
    payments = load_sent_payments(p, settings.confirmation_batch_size)
    report.checked = len(payments)
    if not payments:
        return report
    log = run_logger()
    log.info("Checking %d pending confirmations...", len(payments))
    head, receipts = fetch_receipts(p, payments)
    done: list[tuple[str, Receipt]] = []
    failed: list[tuple[str, str, int | None]] = []
    rebroadcast: list[str] = []
    stuck: list[SentPayment] = []
    for pay in payments:
        verdict, receipt = judge(pay, receipts, head, settings)
        if verdict is Verdict.COMPLETE and receipt is not None:
            done.append((pay.id, receipt))
        elif verdict is Verdict.REVERTED and receipt is not None:
            failed.append((pay.id, f"transaction reverted: {receipt.tx_hash} in block {receipt.block_number}",
                           receipt.block_number))
        elif verdict is Verdict.REBROADCAST:
            rebroadcast.extend(pay.hashes)
        elif verdict is Verdict.RECONCILE:
            stuck.append(pay)
        else:
            report.waiting += 1
    completed = complete_payments(p, actor, done)
    report.completed = len(completed)
    if rebroadcast:
        results = broadcast_stored(p, actor, rebroadcast)
        report.rebroadcast = sum(1 for a in results.values() if broadcast_accepted(a))
    for pay in stuck:
        stuck_verdict, why = judge_stuck(p, actor, pay, settings)
        if stuck_verdict is StuckVerdict.UNLANDABLE:
            failed.append((pay.id, why, None))
        elif stuck_verdict is StuckVerdict.BUMP and replace_with_higher_fees(p, actor, pay, settings):
            report.replaced += 1
        else:
            report.waiting += 1
    marked = fail_confirmations(p, actor, failed)
    report.confirmation_failed = len(marked)
    reasons = dict((f[0], f[1]) for f in failed)
    for pid in marked:
        log.warning("Payment confirmation failed: %s (%s)", pid, reasons[pid])
    if report.completed:
        log.info("   ✅ %d confirmed", report.completed)
    return report


@task(name="confirm-batch", retries=3, retry_delay_seconds=[0.5, 1, 2], retry_condition_fn=retry_on_rpc_error,
      cache_policy=NO_CACHE)
def confirm_tick_task(p: Pipeline, actor: str, settings: PipelineSettings) -> ConfirmReport:
    return confirm_tick(p, actor, settings)
