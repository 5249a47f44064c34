"""The confirm stage: payment outcomes read from the chain, never from our own hashes.

A payment is settled iff its EIP-3009 authorization is used on chain (`AuthorizationUsed`, which the
token emits with the transfer to `pay_to`), whichever transaction did it: ours, a fee-bump replacement,
or a front-runner's copy of our calldata. Our transaction reverting proves nothing. Per claimed payment:

- settled at `confirmation_depth` -> `completed` (transaction, block number and block hash recorded);
- completed and settled at `mint_confirmation_depth` in the same block -> final, mint rows released;
- completed, but the settlement is gone or moved (a reorg) before that -> back to `sent`;
- unused, and expired at a block `finality_depth` below the head, or cancelled by the payer ->
  `confirmation_failed` (provably impossible), mint rows cancelled;
- otherwise it waits; getting a transaction mined (fee bumps, re-broadcasts, filling a dead nonce) is the
  transaction manager's job (payments/txm.py), run for every wallet each tick.

Work is claimed with SKIP LOCKED under a lease, least recently checked first, so overlapping confirm
runs and recovery flows never act on one payment at once and stuck rows cannot starve the rest."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from eth_utils.crypto import keccak
from prefect import task
from prefect.cache_policies import NO_CACHE

from payments.chain import authorization_state_data, log_queries, rpc_batch, to_int
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.txm import TendReport
from tasks.common import Pipeline, retry_on_rpc_error, run_logger

AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
AUTHORIZATION_CANCELED_TOPIC = "0x" + keccak(text="AuthorizationCanceled(address,bytes32)").hex()
LOG_LOOKBACK_BLOCKS = 16  # searched below the head at signing time (a settlement cannot land earlier)
AUTHORIZATION_LOOKBACK_BLOCKS = 50_000  # searched when nothing narrower is known


@dataclass(frozen=True)
class CheckedPayment:
    id: str
    status: str
    token: str
    payer: str
    auth_nonce: str
    valid_before: int
    signer: str | None
    block_hash: str | None
    sent_block: int | None
    nonce_final: bool = False  # the nonce of our transaction was consumed at depth (txm_nonces)
    attempts: int = 1
    tx_nonce: int | None = 0  # None: no transaction of ours (handed over by the send stage)
    age_seconds: float = 0.0  # since it became `sent`

    @classmethod
    def from_row(cls, r: dict[str, Any]) -> CheckedPayment:
        return cls(id=r["id"], status=r["status"], token=r["token"], payer=r["payer"], auth_nonce=r["auth_nonce"],
                   valid_before=int(r["valid_before"]), signer=r["signer"], block_hash=r["block_hash"],
                   sent_block=None if r["sent_block"] is None else int(r["sent_block"]),
                   nonce_final=bool(r.get("nonce_final")), attempts=int(r.get("attempts") or 1),
                   tx_nonce=None if r.get("tx_nonce") is None else int(r["tx_nonce"]),
                   age_seconds=float(r.get("age_seconds") or 0.0))


@dataclass(frozen=True)
class Settlement:
    """Where the chain has the authorization used right now."""

    tx_hash: str
    block_number: int
    block_hash: str


@dataclass(frozen=True)
class Facts:
    used_now: bool  # authorizationState at the head
    settlement: Settlement | None  # its AuthorizationUsed event on the canonical chain
    cancelled: bool  # an AuthorizationCanceled event
    expired_final: bool  # unused at the block finality_depth below the head, whose time is past validBefore
    expired_now: bool = False  # the head's time is past validBefore
    known: bool = True  # False: a lookup failed for this payment; nothing is decided from it


class Outcome(StrEnum):
    WAIT = "wait"
    COMPLETE = "complete"
    FINAL = "final"  # complete and, already mint_confirmation_depth deep, release the mints at once
    RELEASE = "release"
    STEP_BACK = "step_back"
    FAIL = "fail"
    RETRY = "retry"  # our nonce was consumed without settling; the authorization can still be used


MAX_SETTLEMENT_ATTEMPTS = 5


def decide(pay: CheckedPayment, facts: Facts, head: int, settings: PipelineSettings) -> tuple[Outcome, str]:
    """What one claimed payment's chain facts prove. Pure: every rule has a unit test."""
    if not facts.known:
        return Outcome.WAIT, "chain facts unavailable (lookup failed); retried next pass"
    s = facts.settlement
    if s is not None:
        depth = head - s.block_number + 1
        if pay.status == "sent":
            if depth >= settings.mint_depth:
                return Outcome.FINAL, f"settled by {s.tx_hash} in block {s.block_number}, {depth} blocks deep"
            if depth >= settings.confirmation_depth:
                return Outcome.COMPLETE, f"settled by {s.tx_hash} in block {s.block_number}"
            return Outcome.WAIT, f"settled in block {s.block_number}, {depth} of {settings.confirmation_depth} blocks"
        if pay.block_hash != s.block_hash:
            return Outcome.STEP_BACK, (f"reorg: settlement now in block {s.block_number} ({s.block_hash}), "
                                       f"not in {pay.block_hash}")
        if depth >= settings.mint_depth:
            return Outcome.RELEASE, f"settlement {depth} blocks deep"
        return Outcome.WAIT, f"settlement {depth} of {settings.mint_depth} blocks deep before mints"
    if pay.status == "completed":
        if facts.used_now:  # used at the head, its event not returned this time: not a reorg
            return Outcome.WAIT, "authorization used; its event not returned by this lookup"
        return Outcome.STEP_BACK, "reorg: the settlement is no longer on chain"
    if facts.used_now:
        if facts.cancelled:
            return Outcome.FAIL, "the payer cancelled the authorization on chain (AuthorizationCanceled)"
        return Outcome.WAIT, "authorization used, its event not found yet"
    if facts.expired_final:
        return Outcome.FAIL, (f"authorization expired unused (validBefore {pay.valid_before}) at a block "
                              f"{settings.finality_depth} deep; it can never transfer funds")
    if (pay.nonce_final or pay.tx_nonce is None) and not facts.expired_now:
        if pay.attempts >= MAX_SETTLEMENT_ATTEMPTS:
            return Outcome.WAIT, f"not settled after {pay.attempts} attempts: waiting for expiry"
        if pay.tx_nonce is None:
            if pay.age_seconds < settings.rebroadcast_after_seconds:  # someone else's may still be pending
                return Outcome.WAIT, "handed over without a transaction of ours; waiting for someone else's"
            return Outcome.RETRY, "no transaction of ours and the authorization is unused: settling it"
        return Outcome.RETRY, "our transaction's nonce was consumed without settling; settling again"
    return Outcome.WAIT, "not settled yet"


def _topic_address(address: str) -> str:
    return "0x" + "0" * 24 + address.lower().removeprefix("0x")


def _flag(result: Any) -> bool | None:
    """A bool returned by eth_call; None for an answer that is not one (no code at the address, a proxy
    without the function, a broken node): unknown, never a verdict."""
    if not isinstance(result, str) or not result.startswith("0x") or len(result) != 66:
        return None
    try:
        return int(result, 16) != 0
    except ValueError:
        return None


def _events(p: Pipeline, groups: dict[str, list[CheckedPayment]], starts: dict[str, int], head: int
            ) -> tuple[dict[tuple[str, str, str, str], dict[str, Any]], set[str]]:
    """Authorization events of these payments per token, searched in chunks up to the head. Returns the
    events by (topic, token, payer, nonce) and the ids whose search failed (unknown)."""
    calls: list[tuple[str, Any]] = []
    owners: list[str] = []
    for token, group in groups.items():
        topics = [[AUTHORIZATION_USED_TOPIC, AUTHORIZATION_CANCELED_TOPIC],
                  sorted({_topic_address(q.payer) for q in group}), sorted({q.auth_nonce for q in group})]
        for query_ in log_queries(token, topics, starts[token], head):
            calls.append(query_)
            owners.append(token)
    answers = rpc_batch(p.w3, calls) if calls else []
    events: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    failed: set[str] = set()
    for token, a in zip(owners, answers, strict=True):
        if not a.ok or not isinstance(a.result, list):
            failed.add(token)
            continue
        for ev in a.result:
            found = [str(t).lower() for t in ev.get("topics", [])]
            if ev.get("removed") or len(found) < 3:
                continue
            events[(found[0], token, "0x" + found[1][-40:], found[2])] = ev
    return events, {q.id for t in failed for q in groups[t]}


def read_facts(p: Pipeline, payments: list[CheckedPayment], settings: PipelineSettings) -> tuple[int, dict[str, Facts]]:
    """Head, authorization states and the authorization events of these payments. A lookup that fails
    for one payment (or one token) makes only those facts unknown: they wait, the rest go on."""
    if not payments:
        return 0, {}
    calls: list[tuple[str, Any]] = [("eth_getBlockByNumber", ["latest", False])]
    calls += [("eth_call", [{"to": pay.token, "data": "0x" + authorization_state_data(pay.payer, pay.auth_nonce).hex()},
                            "latest"]) for pay in payments]
    answers = rpc_batch(p.w3, calls)
    if not answers[0].ok or not answers[0].result:
        raise RpcError(f"head lookup failed: {answers[0].message or 'no head block'}")
    head, head_time = to_int(answers[0].result["number"]), to_int(answers[0].result["timestamp"])
    used_now = {pay.id: _flag(a.result) if a.ok else None for pay, a in zip(payments, answers[1:], strict=True)}
    wide = max(head - AUTHORIZATION_LOOKBACK_BLOCKS, 0)
    groups: dict[str, list[CheckedPayment]] = {}
    for pay in payments:
        groups.setdefault(pay.token, []).append(pay)
    starts = {t: min((max(q.sent_block - LOG_LOOKBACK_BLOCKS, 0) if q.sent_block is not None else wide) for q in g)
              for t, g in groups.items()}
    events, unknown = _events(p, groups, starts, head)

    def key(q: CheckedPayment) -> tuple[str, str, str]:
        return q.token, q.payer.lower(), q.auth_nonce.lower()

    # Used, but its event was not in the narrow window (e.g. the node that gave sent_block lagged): search wide.
    missing = [q for q in payments if used_now[q.id] and q.id not in unknown and q.sent_block is not None
               and (AUTHORIZATION_USED_TOPIC, *key(q)) not in events
               and (AUTHORIZATION_CANCELED_TOPIC, *key(q)) not in events]
    if missing:
        again: dict[str, list[CheckedPayment]] = {}
        for q in missing:
            again.setdefault(q.token, []).append(q)
        more, failed = _events(p, again, {t: wide for t in again}, head)
        events.update(more)
        unknown |= failed
    final_block = max(head - settings.finality_depth + 1, 0)
    final_time: int | None = None
    if any(used_now[q.id] is False and head_time >= q.valid_before for q in payments):
        header = rpc_batch(p.w3, [("eth_getBlockByNumber", [hex(final_block), False])])[0]
        if header.ok and header.result:
            final_time = to_int(header.result["timestamp"])
    facts: dict[str, Facts] = {}
    for pay in payments:
        state = used_now[pay.id]
        if state is None or pay.id in unknown:
            facts[pay.id] = Facts(used_now=False, settlement=None, cancelled=False, expired_final=False, known=False)
            continue
        used = events.get((AUTHORIZATION_USED_TOPIC, *key(pay)))
        settlement = None if used is None else Settlement(
            str(used["transactionHash"]).lower(), to_int(used["blockNumber"]), str(used["blockHash"]).lower())
        # Unused at the head, and the block finality_depth deep is already past validBefore: no later block
        # can use it (every later block is later still), and that block will not be reorged away.
        expired_final = not state and final_time is not None and final_time >= pay.valid_before
        facts[pay.id] = Facts(used_now=state, settlement=settlement,
                              cancelled=(AUTHORIZATION_CANCELED_TOPIC, *key(pay)) in events,
                              expired_final=expired_final, expired_now=head_time >= pay.valid_before)
    return head, facts


@dataclass
class ConfirmReport:
    checked: int = 0
    completed: int = 0
    released: int = 0
    reorged: int = 0
    requeued: int = 0
    confirmation_failed: int = 0
    waiting: int = 0
    rebroadcast: int = 0
    replaced: int = 0
    cancelled: int = 0
    filled: int = 0
    capped: int = 0
    unkeyed: int = 0


def claim_confirmations(p: Pipeline, owner: str, limit: int, lease_seconds: int,
                        ids: list[str] | None = None) -> list[CheckedPayment]:
    with transaction(p.engine, owner) as conn:
        rows = fetch_all(conn, "claim_confirmations", chain_id=p.chain_id, owner=owner, limit=limit,
                         lease_seconds=lease_seconds, ids=ids)
    return [CheckedPayment.from_row(r) for r in rows]


def end_claims(p: Pipeline, owner: str, ids: list[str]) -> None:
    if ids:
        with transaction(p.engine, owner) as conn:
            conn.execute(query("end_confirmation_claims"), {"ids": ids, "owner": owner})


def apply_outcomes(p: Pipeline, owner: str, decided: list[tuple[CheckedPayment, Outcome, str, Facts]],
                   report: ConfirmReport) -> dict[str, str]:
    """Write every decided outcome in one transaction (each statement guarded by status and claim)."""
    complete = [(pay, f.settlement) for pay, o, _, f in decided
                if o in (Outcome.COMPLETE, Outcome.FINAL) and f.settlement]
    release = [(pay, f.settlement) for pay, o, _, f in decided
               if o in (Outcome.RELEASE, Outcome.FINAL) and f.settlement]
    back = [(pay.id, why) for pay, o, why, _ in decided if o is Outcome.STEP_BACK]
    fail = [(pay.id, why) for pay, o, why, _ in decided if o is Outcome.FAIL]
    retry = [(pay.id, why) for pay, o, why, _ in decided if o is Outcome.RETRY]
    moved: dict[str, str] = {}
    with transaction(p.engine, owner) as conn:
        if complete:
            for r in fetch_all(conn, "complete_payments", owner=owner, ids=[c[0].id for c in complete],
                               blocks=[c[1].block_number for c in complete if c[1]],
                               block_hashes=[c[1].block_hash for c in complete if c[1]],
                               hashes=[c[1].tx_hash for c in complete if c[1]]):
                moved[r["id"]] = "completed"
        if release:
            for r in fetch_all(conn, "release_settled_mints", owner=owner, ids=[c[0].id for c in release],
                               block_hashes=[c[1].block_hash for c in release if c[1]]):
                moved[r["id"]] = "completed" if moved.get(r["id"]) == "completed" else "released"
        if back:
            for r in fetch_all(conn, "unsettle_payments", owner=owner, ids=[b[0] for b in back],
                               errors=[b[1][:500] for b in back]):
                moved[r["id"]] = "sent"
        if fail:
            for r in fetch_all(conn, "fail_confirmation", owner=owner, ids=[f[0] for f in fail],
                               errors=[f[1][:500] for f in fail], blocks=[None for _ in fail]):
                moved[r["id"]] = "confirmation_failed"
        if retry:
            for r in fetch_all(conn, "requeue_settlements", owner=owner, ids=[x[0] for x in retry],
                               errors=[x[1][:500] for x in retry]):
                moved[r["id"]] = "pending"
    report.completed += sum(1 for v in moved.values() if v == "completed")
    report.requeued += sum(1 for v in moved.values() if v == "pending")
    report.released += sum(1 for v in moved.values() if v == "released")
    report.reorged += sum(1 for v in moved.values() if v == "sent")
    report.confirmation_failed += sum(1 for v in moved.values() if v == "confirmation_failed")
    return moved


def confirm_payments_once(p: Pipeline, owner: str, settings: PipelineSettings, report: ConfirmReport,
                          ids: list[str] | None = None, *, apply: bool = True
                          ) -> list[tuple[CheckedPayment, Outcome, str]]:
    """Claim a batch (or these payments), read its facts from the chain, apply what they prove (unless
    `apply` is False: a dry run), end the claims. Payments claimed by another run are skipped."""
    claimed = claim_confirmations(p, owner, settings.confirmation_batch_size if ids is None else len(ids),
                                  settings.processing_lease_seconds, ids)
    if not claimed:
        return []
    try:
        report.checked += len(claimed)
        head, facts = read_facts(p, claimed, settings)
        decided: list[tuple[CheckedPayment, Outcome, str, Facts]] = []
        for pay in claimed:
            outcome, why = decide(pay, facts[pay.id], head, settings)
            decided.append((pay, outcome, why, facts[pay.id]))
        moved = apply_outcomes(p, owner, decided, report) if apply else {}
        report.waiting += sum(1 for _, o, _, _ in decided if o is Outcome.WAIT)
        log = run_logger()
        for pay, _, why, _ in decided:
            if moved.get(pay.id) == "confirmation_failed":
                log.warning("Payment confirmation failed: %s (%s)", pay.id, why)
            elif moved.get(pay.id) == "sent":
                log.warning("Payment %s is back in sent: %s", pay.id, why)
        return [(pay, outcome, why) for pay, outcome, why, _ in decided]
    finally:
        end_claims(p, owner, [pay.id for pay in claimed])


def add_tend(report: ConfirmReport, tend: TendReport) -> None:
    report.rebroadcast += tend.rebroadcast
    report.replaced += tend.bumped
    report.cancelled += tend.cancelled
    report.filled += tend.filled
    report.capped += tend.capped
    report.unkeyed += tend.unkeyed


def confirm_tick(p: Pipeline, actor: str, settings: PipelineSettings) -> ConfirmReport:
    """Payments first (outcomes from the chain), then the nonce health of every wallet."""
    report = ConfirmReport()
    try:
        confirm_payments_once(p, actor, settings, report)
    finally:  # nonce health runs whatever happened to the payments' pass
        add_tend(report, p.txm().tend_all(settings, actor))
    log = run_logger()
    if report.checked:
        log.info("Checked %d pending confirmations", report.checked)
    if report.completed:
        log.info("   ✅ %d confirmed", report.completed)
    return report


@task(name="confirm-batch", retries=3, retry_delay_seconds=[0.5, 1, 2], retry_condition_fn=retry_on_rpc_error,
      cache_policy=NO_CACHE)
def confirm_tick_task(p: Pipeline, actor: str, settings: PipelineSettings) -> ConfirmReport:
    return confirm_tick(p, actor, settings)
