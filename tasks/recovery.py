"""Repairs an operator runs by hand (flows/recovery.py). Each function looks at the payments that match
its filters, decides per payment from the chain, and - unless dry_run - applies the decision through
the same guarded statements as the pipeline. Every decision comes back as an Action, applied or not;
the flow stores them in recovery_actions and shows them as an artifact.

A payment is never moved to a failure status while one of its transactions could still be mined."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any

from payments.chain import authorization_state_data, mint_id_used_calldata, rpc_batch, to_int
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.txm import NonceAction, TendReport
from tasks.common import Pipeline
from tasks.confirm import CheckedPayment, ConfirmReport, Outcome, confirm_payments_once, decide, read_facts
from tasks.send import broadcast_and_mark_sent

APPLIED, WOULD_APPLY, REFUSED, UNCHANGED = "applied", "would_apply", "refused", "unchanged"
MAX_GAP_FILL = 500
MAX_BLOCK_RANGE = 5_000


@dataclass(frozen=True)
class Filters:
    ids: list[str] | None = None
    older_than_seconds: int = 0
    limit: int = 1_000


@dataclass(frozen=True)
class Action:
    payment_id: str | None
    action: str
    outcome: str
    detail: str = ""


def _done(dry_run: bool) -> str:
    return WOULD_APPLY if dry_run else APPLIED


def candidates(p: Pipeline, statuses: list[str], f: Filters) -> list[dict[str, Any]]:
    with p.engine.connect() as conn:
        return fetch_all(conn, "recovery_candidates", chain_id=p.chain_id, statuses=statuses, ids=f.ids,
                         older_than=f.older_than_seconds, limit=f.limit)


def record_actions(p: Pipeline, flow: str, actor: str, dry_run: bool, actions: list[Action]) -> None:
    if not actions:
        return
    with transaction(p.engine, actor) as conn:
        conn.execute(query("insert_recovery_actions"), {
            "flow": flow, "dry_run": dry_run, "actor": actor,
            "payment_ids": [a.payment_id for a in actions], "actions": [a.action for a in actions],
            "outcomes": [a.outcome for a in actions], "details": [a.detail[:1000] for a in actions],
        })


def _hashes(p: Pipeline, ids: list[str]) -> dict[str, list[str]]:
    with p.engine.connect() as conn:
        return {r["payment_id"]: list(r["hashes"]) for r in fetch_all(conn, "hashes_of_payments", ids=ids)}


def _check(p: Pipeline, actor: str, settings: PipelineSettings, ids: list[str], *,
           dry_run: bool) -> list[tuple[CheckedPayment, Outcome, str]]:
    """The confirm stage's own decision for these payments (claimed, so no confirm run acts on them at the
    same moment); applied unless dry_run."""
    return confirm_payments_once(p, actor, settings, ConfirmReport(), ids, apply=not dry_run) if ids else []


_OUTCOME_ACTION = {
    Outcome.COMPLETE: "complete", Outcome.FINAL: "complete", Outcome.RELEASE: "release_mints",
    Outcome.STEP_BACK: "back_to_sent", Outcome.FAIL: "confirmation_failed", Outcome.RETRY: "settle_again",
    Outcome.WAIT: "none",
}


# --------------------------------------------------------------------------- reset_stuck_payments


def reset_stuck_payments(p: Pipeline, f: Filters, settings: PipelineSettings, *, dry_run: bool,
                         actor: str) -> list[Action]:
    """The seed's reset-payment-stuck: expired `processing` leases come back (to pending when nothing
    was signed; re-broadcast and `sent` when bytes were committed); `sent` past the timeout is
    re-broadcast and reconciled: confirmation_failed with proof, fee-bumped otherwise."""
    actions: list[Action] = []
    rows = candidates(p, ["processing", "sent"], f)
    with p.engine.connect() as conn:
        now = conn.execute(query("db_now")).scalar_one()
    requeue = [r["id"] for r in rows if r["status"] == "processing" and r["tx_hash"] is None
               and r["lease_expires_at"] < now]
    resend = [(r["id"], r["tx_hash"]) for r in rows if r["status"] == "processing" and r["tx_hash"] is not None
              and r["lease_expires_at"] < now]
    for r in rows:
        if r["status"] == "processing" and r["lease_expires_at"] >= now:
            actions.append(Action(r["id"], "none", UNCHANGED,
                                  f"lease held by a live run until {r['lease_expires_at']}"))
    if requeue:
        moved = requeue
        if not dry_run:
            with transaction(p.engine, actor) as conn:
                moved = [x["id"] for x in fetch_all(conn, "release_stuck_processing", ids=requeue,
                                                    reason="reset_stuck_payments: lease expired, nothing signed")]
        actions += [Action(pid, "requeue", _done(dry_run), "lease expired before signing") for pid in moved]
    if resend:
        sent = [pid for pid, _ in resend]
        if not dry_run:
            sent, _ = broadcast_and_mark_sent(p, actor, resend)
        actions += [Action(pid, "rebroadcast_and_mark_sent", _done(dry_run) if pid in sent else UNCHANGED,
                           "signed bytes sent again") for pid, _ in resend]
    due = [r["id"] for r in rows if r["status"] == "sent" and float(r["age_seconds"] or 0)
           >= settings.confirmation_timeout_seconds]
    for r in rows:
        if r["status"] == "sent" and r["id"] not in due:
            age = float(r["age_seconds"] or 0)
            actions.append(Action(r["id"], "none", UNCHANGED, f"in sent for {age:.0f} s, below the "
                                                              f"{settings.confirmation_timeout_seconds} s timeout"))
    for pay, outcome, why in _check(p, actor, settings, due, dry_run=dry_run):
        done = UNCHANGED if outcome is Outcome.WAIT else _done(dry_run)
        actions.append(Action(pay.id, _OUTCOME_ACTION[outcome], done, why))
    if due and not dry_run:  # re-send, re-price or fill what is stuck on every wallet
        tend = p.txm().tend_all(settings, actor)
        actions.append(Action(None, "tend_nonces", APPLIED, f"{tend.rebroadcast} re-sent, {tend.bumped} re-priced, "
                                                            f"{tend.cancelled + tend.filled} nonces filled"))
    return actions


# --------------------------------------------------------------------------- recheck_confirmation_failed


def recheck_confirmation_failed(p: Pipeline, f: Filters, settings: PipelineSettings, *, dry_run: bool,
                                actor: str) -> list[Action]:
    """confirmation_failed and failed payments whose authorization the chain shows used after all (through
    one of our transactions or anyone else's) become `completed`, once mint_confirmation_depth deep, and
    their mint rows are released once."""
    rows = candidates(p, ["confirmation_failed", "failed"], f)
    if not rows:
        return []
    pays = [CheckedPayment.from_row(r) for r in rows]
    head, facts = read_facts(p, pays, settings)
    actions: list[Action] = []
    landed: list[tuple[str, int, str, str, str]] = []
    for pay in pays:
        s = facts[pay.id].settlement
        if s is None:
            actions.append(Action(pay.id, "none", UNCHANGED, "no settlement of its authorization on chain"))
        elif head - s.block_number + 1 < settings.mint_depth:
            actions.append(Action(pay.id, "none", UNCHANGED, f"settled in block {s.block_number}; waiting for "
                                                             f"{settings.mint_depth} blocks"))
        else:
            landed.append((pay.id, s.block_number, s.block_hash, s.tx_hash,
                           f"recheck: authorization settled by {s.tx_hash} in block {s.block_number}"))
    done = [x[0] for x in landed]
    if landed and not dry_run:
        with transaction(p.engine, actor) as conn:
            done = [x["id"] for x in fetch_all(conn, "recover_completed_payments", ids=[x[0] for x in landed],
                                               blocks=[x[1] for x in landed], block_hashes=[x[2] for x in landed],
                                               hashes=[x[3] for x in landed], notes=[x[4] for x in landed])]
    actions += [Action(pid, "complete", _done(dry_run) if pid in done else UNCHANGED, note)
                for pid, _, _, _, note in landed]
    return actions


# --------------------------------------------------------------------------- requeue_failed


def requeue_failed(p: Pipeline, f: Filters, *, dry_run: bool, actor: str) -> list[Action]:
    """failed payments back to pending when a retry is safe and can succeed: nothing was ever signed for
    them, the authorization is unused on chain and still valid."""
    rows = candidates(p, ["failed"], f)
    if not rows:
        return []
    hashes = _hashes(p, [r["id"] for r in rows])
    calls: list[tuple[str, Any]] = [("eth_getBlockByNumber", ["latest", False])] + [
        ("eth_call", [{"to": r["token"], "data": "0x" + authorization_state_data(r["payer"], r["auth_nonce"]).hex()},
                      "latest"]) for r in rows]
    answers = rpc_batch(p.w3, calls)
    bad = next((a for a in answers if not a.ok), None)
    if bad is not None:
        raise RpcError(f"authorization lookup failed: {bad.message}")
    chain_time = to_int(answers[0].result["timestamp"])
    actions: list[Action] = []
    safe: list[str] = []
    for r, used in zip(rows, answers[1:], strict=True):
        if hashes.get(r["id"]):
            actions.append(Action(r["id"], "requeue", REFUSED, "transactions were signed for it; a retry could pay "
                                                              "twice - use recheck/rollback instead"))
        elif to_int(used.result or "0x0"):
            actions.append(Action(r["id"], "requeue", REFUSED, "authorization already used or cancelled on chain"))
        elif int(r["valid_before"]) <= chain_time:
            actions.append(Action(r["id"], "requeue", REFUSED, "authorization expired"))
        else:
            safe.append(r["id"])
    moved = safe
    if safe and not dry_run:
        with transaction(p.engine, actor) as conn:
            moved = [x["id"] for x in fetch_all(conn, "requeue_failed_payments", ids=safe)]
    actions += [Action(pid, "requeue", _done(dry_run) if pid in moved else UNCHANGED, "back to pending")
                for pid in safe]
    return actions


# --------------------------------------------------------------------------- rollback_to_failed


def rollback_to_failed(p: Pipeline, f: Filters, settings: PipelineSettings, *, reason: str, dry_run: bool,
                       actor: str) -> list[Action]:
    """The seed's rollback procedure (`sent` / `confirmation_failed` -> `failed` with a reason), refused
    for every payment whose authorization is used on chain or could still be used (not yet expired at a
    final block)."""
    rows = candidates(p, ["sent", "confirmation_failed"], f)
    if not rows:
        return []
    pays = [CheckedPayment.from_row(r) for r in rows]
    _, facts = read_facts(p, pays, settings)
    actions: list[Action] = []
    allowed: list[str] = []
    for pay in pays:
        fact = facts[pay.id]
        if fact.used_now or fact.settlement is not None:
            actions.append(Action(pay.id, "rollback", REFUSED, "the authorization is used on chain; run "
                                                               "recheck_confirmation_failed instead"))
        elif pay.status == "sent" and not fact.expired_final:
            actions.append(Action(pay.id, "rollback", REFUSED, "its authorization could still be settled (not "
                                                               f"expired {settings.finality_depth} blocks deep)"))
        else:
            allowed.append(pay.id)
    moved = allowed
    if allowed and not dry_run:
        with transaction(p.engine, actor) as conn:
            moved = [x["id"] for x in fetch_all(conn, "rollback_payments_to_failed", ids=allowed, reason=reason)]
    actions += [Action(pid, "rollback", _done(dry_run) if pid in moved else UNCHANGED, reason) for pid in allowed]
    return actions


# --------------------------------------------------------------------------- resync_nonces


def resync_nonces(p: Pipeline, settings: PipelineSettings, *, dry_run: bool, actor: str) -> list[Action]:
    """Per wallet (every signer that ever sent, and the minter): the counter is raised to the chain's
    pending count if the chain is ahead; then the transaction manager's nonce health runs at once, with
    re-broadcasts due now: stored bytes re-sent, stale or underpriced attempts re-priced, nonces whose
    intent can no longer land and gaps filled with 0-value self-transfers."""
    actions: list[Action] = []
    txm = p.txm()
    head = txm.read_head()
    now = replace(settings, rebroadcast_after_seconds=0)
    for wallet in txm.wallets():
        answers = rpc_batch(p.w3, [("eth_getTransactionCount", [wallet, "latest"]),
                                   ("eth_getTransactionCount", [wallet, "pending"])])
        if not all(a.ok for a in answers):
            raise RpcError("nonce lookup failed")
        mined, pending = to_int(answers[0].result), to_int(answers[1].result)
        with p.engine.connect() as conn:
            local = conn.execute(query("signer_counter"), {"chain_id": p.chain_id, "signer": wallet}
                                 ).scalar_one_or_none()
        local = int(local) if local is not None else mined
        tag = f"wallet {wallet}: mined {mined}, pending {pending}, counter {local}"
        if pending > local:
            if not dry_run:
                with transaction(p.engine, actor) as conn:
                    conn.execute(query("lock_signer_nonce"), {"chain_id": p.chain_id, "signer": wallet,
                                                              "chain_nonce": pending})
            actions.append(Action(None, "raise_counter", _done(dry_run), f"{tag}: counter to {pending}"))
        planned = txm.plan(wallet, head, now)
        if not planned:
            actions.append(Action(None, "none", UNCHANGED, f"{tag}: no nonce waiting"))
            continue
        by_action: dict[NonceAction, list[int]] = {}
        for nonce, action in planned:
            by_action.setdefault(action, []).append(nonce)
        for action, nonces in sorted(by_action.items()):
            actions.append(Action(None, str(action), _done(dry_run) if action is not NonceAction.NONE else UNCHANGED,
                                  f"{tag}: nonces {nonces[:20]}{' ...' if len(nonces) > 20 else ''}"))
        if not dry_run:
            with txm.tend_lock(wallet) as mine:
                if mine:
                    txm.tend(wallet, head, now, actor, TendReport())
    return actions


# --------------------------------------------------------------------------- reconcile_block_range


def reconcile_block_range(p: Pipeline, from_block: int, to_block: int, settings: PipelineSettings, *,
                          dry_run: bool, actor: str) -> list[Action]:
    """Scan blocks for transactions of our signers and match them to payments: mined settlements of
    payments still `processing`/`sent` are applied (sent, then completed or confirmation_failed);
    transactions the database does not know are reported."""
    if to_block < from_block or to_block - from_block + 1 > MAX_BLOCK_RANGE:
        raise ValueError(f"block range must be ascending and at most {MAX_BLOCK_RANGE} blocks")
    answers = rpc_batch(p.w3, [("eth_getBlockByNumber", [hex(n), True]) for n in range(from_block, to_block + 1)])
    ours = {s.address for s in p.signers}
    mined: dict[str, dict[str, Any]] = {}
    for a in answers:
        if not a.ok:
            raise RpcError(f"block lookup failed: {a.message}")
        for tx in (a.result or {}).get("transactions", []):
            if str(tx.get("from", "")).lower() in ours:
                mined[str(tx["hash"]).lower()] = tx
    if not mined:
        return [Action(None, "none", UNCHANGED, f"no transaction of our signers in blocks {from_block}..{to_block}")]
    with p.engine.connect() as conn:
        known = {r["tx_hash"]: r for r in fetch_all(conn, "transactions_by_hashes", hashes=list(mined))}
    actions = [Action(None, "unknown_transaction", REFUSED,
                      f"{h} (nonce {to_int(tx['nonce'])}) from {tx['from']} is not in payment_transactions")
               for h, tx in mined.items() if h not in known]
    open_rows = {h: r for h, r in known.items() if r["payment_status"] in ("processing", "sent")}
    if not open_rows:
        return [*actions, Action(None, "none", UNCHANGED, f"{len(known)} known transaction(s) already applied")]
    to_send = [(r["payment_id"], h) for h, r in open_rows.items() if r["payment_status"] == "processing"]
    ids = sorted({r["payment_id"] for r in open_rows.values() if r["payment_id"] is not None})
    if not dry_run:
        if to_send:
            broadcast_and_mark_sent(p, actor, to_send)
        decided = _check(p, actor, settings, ids, dry_run=False)
    else:  # what the confirm stage would decide once they are `sent`
        actions += [Action(pid, "mark_sent", WOULD_APPLY, f"{h} is mined") for pid, h in to_send]
        pays = [dataclasses.replace(CheckedPayment.from_row(r), status="sent")
                for r in candidates(p, ["processing", "sent"], Filters(ids=ids, limit=len(ids)))]
        head, facts = read_facts(p, pays, settings)
        decided = [(pay, *decide(pay, facts[pay.id], head, settings)) for pay in pays]
    for pay, outcome, why in decided:
        done = UNCHANGED if outcome is Outcome.WAIT else _done(dry_run)
        actions.append(Action(pay.id, _OUTCOME_ACTION[outcome], done, why))
    return actions


# --------------------------------------------------------------------------- retry_failed_mints


def retry_failed_mints(p: Pipeline, f: Filters, *, dry_run: bool, actor: str) -> list[Action]:
    """Failed mints (the payment was completed, nothing was minted) go back to released, for a new
    transaction by the mint flow - after the cause (e.g. the minter role) was fixed. Refused while any
    earlier attempt could still be mined (its nonce not consumed at depth), and for a mint the chain
    shows done (its mint id used, or a successful attempt)."""
    with p.engine.connect() as conn:
        rows = fetch_all(conn, "failed_mints", chain_id=p.chain_id, ids=f.ids, limit=f.limit)
    if not rows:
        return []
    keyed = [r for r in rows if r["mint_key"]]
    answers = rpc_batch(p.w3, [("eth_call", [{"to": r["mint_token"], "data": "0x" + mint_id_used_calldata(
        bytes.fromhex(r["mint_key"][2:])).hex()}, "latest"]) for r in keyed])
    bad = next((a for a in answers if not a.ok), None)
    if bad is not None:
        raise RpcError(f"mint id lookup failed: {bad.message}")
    used = {r["id"] for r, a in zip(keyed, answers, strict=True) if to_int(a.result or "0x0") != 0}
    actions: list[Action] = []
    safe: list[int] = []
    for r in rows:
        if r["tx_nonce"] is not None and not r["nonce_final"]:
            actions.append(Action(r["payment_id"], "retry_mint", REFUSED, f"mint {r['id']}: nonce {r['tx_nonce']} "
                                  "is not consumed at depth yet; an earlier attempt could still be mined"))
        elif r["id"] in used:
            actions.append(Action(r["payment_id"], "retry_mint", REFUSED, f"mint {r['id']}: its mint id is used on "
                                                                         "chain: it was minted"))
        elif not r["mint_key"] and r["mined_status"] == 1 and r["mined_hash"] in (r["hashes"] or []):
            actions.append(Action(r["payment_id"], "retry_mint", REFUSED, f"mint {r['id']}: {r['mined_hash']} "
                                                                         "succeeded on chain: it was minted"))
        else:
            safe.append(r["id"])
    moved = safe
    if safe and not dry_run:
        with transaction(p.engine, actor) as conn:
            moved = [x["id"] for x in fetch_all(conn, "retry_failed_mints", ids=safe, chain_id=p.chain_id)]
    by_id = {r["id"]: r for r in rows}
    actions += [Action(by_id[i]["payment_id"], "retry_mint", _done(dry_run) if i in moved else UNCHANGED,
                       f"mint {i}: {by_id[i]['error']}") for i in safe]
    return actions
