"""Repairs an operator runs by hand (flows/recovery.py). Each function looks at the payments that match
its filters, decides per payment from the chain, and - unless dry_run - applies the decision through
the same guarded statements as the pipeline. Every decision comes back as an Action, applied or not;
the flow stores them in recovery_actions and shows them as an artifact.

A payment is never moved to a failure status while one of its transactions could still be mined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_utils.crypto import keccak

from payments.chain import Fees, authorization_state_data, fees_from, rpc_batch, sign_tx, to_int
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.statuses import TxKind
from tasks.common import Pipeline
from tasks.confirm import (
    Receipt,
    StuckVerdict,
    complete_payments,
    fail_confirmations,
    judge_stuck,
    load_sent_payments,
    replace_with_higher_fees,
)
from tasks.send import broadcast_and_mark_sent, broadcast_stored, persist_transactions

APPLIED, WOULD_APPLY, REFUSED, UNCHANGED = "applied", "would_apply", "refused", "unchanged"
AUTHORIZATION_USED_TOPIC = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
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


def _receipts(p: Pipeline, hashes: list[str]) -> tuple[int, dict[str, Receipt]]:
    answers = rpc_batch(p.w3, [("eth_blockNumber", [])] + [("eth_getTransactionReceipt", [h]) for h in hashes])
    bad = next((a for a in answers if not a.ok), None)
    if bad is not None:
        raise RpcError(f"receipt lookup failed: {bad.message}")
    found = {h: Receipt.from_rpc(a.result) for h, a in zip(hashes, answers[1:], strict=True) if a.result}
    return to_int(answers[0].result), found


def _authorization_used_log(p: Pipeline, row: dict[str, Any]) -> dict[str, Any] | None:
    """The AuthorizationUsed event of this payment's authorization, if any transaction (ours or anyone's)
    settled it. Only a successful transfer emits it; a cancellation emits AuthorizationCanceled."""
    payer_topic = "0x" + "0" * 24 + row["payer"][2:]
    answers = rpc_batch(p.w3, [("eth_getLogs", [{"address": row["token"], "fromBlock": "0x0", "toBlock": "latest",
                                                  "topics": [AUTHORIZATION_USED_TOPIC, payer_topic,
                                                             row["auth_nonce"]]}])])
    if not answers[0].ok:
        raise RpcError(f"eth_getLogs failed: {answers[0].message}")
    logs = answers[0].result or []
    return dict(logs[0]) if logs else None


def _success(hashes: list[str], receipts: dict[str, Receipt], head: int, depth: int) -> Receipt | None:
    return next((receipts[h] for h in hashes if h in receipts and receipts[h].status == 1
                 and head - receipts[h].block_number + 1 >= depth), None)


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
    sent_ids = [r["id"] for r in rows if r["status"] == "sent"]
    failed: list[tuple[str, str, int | None]] = []
    for pay in load_sent_payments(p, len(sent_ids), sent_ids) if sent_ids else []:
        if pay.age_seconds < settings.confirmation_timeout_seconds:
            actions.append(Action(pay.id, "none", UNCHANGED, f"in sent for {pay.age_seconds:.0f} s, below the "
                                                             f"{settings.confirmation_timeout_seconds} s timeout"))
            continue
        verdict, why = judge_stuck(p, actor, pay, settings, rebroadcast=not dry_run)
        if verdict is StuckVerdict.UNLANDABLE:
            failed.append((pay.id, why, None))
            actions.append(Action(pay.id, "confirmation_failed", _done(dry_run), why))
        elif verdict is StuckVerdict.BUMP:
            new_hash = None if dry_run else replace_with_higher_fees(p, actor, pay, settings)
            actions.append(Action(pay.id, "fee_bump", _done(dry_run), new_hash or why))
        else:
            actions.append(Action(pay.id, "rebroadcast", _done(dry_run), why))
    if failed and not dry_run:
        fail_confirmations(p, actor, failed)
    return actions


# --------------------------------------------------------------------------- recheck_confirmation_failed


def recheck_confirmation_failed(p: Pipeline, f: Filters, settings: PipelineSettings, *, dry_run: bool,
                                actor: str) -> list[Action]:
    """confirmation_failed payments that did land after all - through one of our hashes, or through a
    transaction of someone else's that used the same authorization - become `completed`, and their
    mint rows are released once."""
    rows = candidates(p, ["confirmation_failed"], f)
    if not rows:
        return []
    hashes = _hashes(p, [r["id"] for r in rows])
    head, receipts = _receipts(p, [h for hs in hashes.values() for h in hs])
    actions: list[Action] = []
    landed: list[tuple[str, int, str, str]] = []
    for r in rows:
        ours = _success(hashes.get(r["id"], []), receipts, head, settings.confirmation_depth)
        if ours is not None:
            landed.append((r["id"], ours.block_number, ours.tx_hash, "recheck: settlement found on chain"))
            continue
        log = _authorization_used_log(p, r)
        if log is not None and head - to_int(log["blockNumber"]) + 1 >= settings.confirmation_depth:
            tx = str(log["transactionHash"]).lower()
            landed.append((r["id"], to_int(log["blockNumber"]), tx,
                           f"recheck: authorization settled by transaction {tx}, not one of ours"))
            continue
        actions.append(Action(r["id"], "none", UNCHANGED, "no successful settlement on chain"))
    done = [x[0] for x in landed]
    if landed and not dry_run:
        with transaction(p.engine, actor) as conn:
            done = [x["id"] for x in fetch_all(conn, "recover_completed_payments", ids=[x[0] for x in landed],
                                               blocks=[x[1] for x in landed], hashes=[x[2] for x in landed],
                                               notes=[x[3] for x in landed])]
    actions += [Action(pid, "complete", _done(dry_run) if pid in done else UNCHANGED, note)
                for pid, _, _, note in landed]
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
    for every payment whose transaction landed or could still land."""
    rows = candidates(p, ["sent", "confirmation_failed"], f)
    if not rows:
        return []
    hashes = _hashes(p, [r["id"] for r in rows])
    head, receipts = _receipts(p, [h for hs in hashes.values() for h in hs])
    sent = {pay.id: pay for pay in load_sent_payments(p, len(rows), [r["id"] for r in rows if r["status"] == "sent"])}
    actions: list[Action] = []
    allowed: list[str] = []
    for r in rows:
        mine = hashes.get(r["id"], [])
        if _success(mine, receipts, head, 1) is not None or _authorization_used_log(p, r) is not None:
            actions.append(Action(r["id"], "rollback", REFUSED, "the payment landed on chain; run "
                                                               "recheck_confirmation_failed instead"))
            continue
        if r["status"] == "sent":
            verdict, why = judge_stuck(p, actor, sent[r["id"]], settings, rebroadcast=False)
            if verdict is not StuckVerdict.UNLANDABLE:
                actions.append(Action(r["id"], "rollback", REFUSED, f"a transaction could still land: {why}"))
                continue
        allowed.append(r["id"])
    moved = allowed
    if allowed and not dry_run:
        with transaction(p.engine, actor) as conn:
            moved = [x["id"] for x in fetch_all(conn, "rollback_payments_to_failed", ids=allowed, reason=reason)]
    actions += [Action(pid, "rollback", _done(dry_run) if pid in moved else UNCHANGED, reason) for pid in allowed]
    return actions


# --------------------------------------------------------------------------- resync_nonces


def resync_nonces(p: Pipeline, *, dry_run: bool, actor: str) -> list[Action]:
    """Per signer: the counter is raised to the chain's pending count if the chain is ahead; every nonce
    between the chain's mined count and the counter gets its stored transactions re-broadcast, or - when
    none is stored - a 0-value self-transfer, so later nonces are not stuck behind a gap."""
    actions: list[Action] = []
    for signer in p.signers:
        answers = rpc_batch(p.w3, [("eth_getTransactionCount", [signer.address, "latest"]),
                                   ("eth_getTransactionCount", [signer.address, "pending"]),
                                   ("eth_getBlockByNumber", ["latest", False]), ("eth_maxPriorityFeePerGas", [])])
        if not all(a.ok for a in answers[:3]):
            raise RpcError("nonce lookup failed")
        mined, pending = to_int(answers[0].result), to_int(answers[1].result)
        with p.engine.connect() as conn:
            local = conn.execute(query("signer_counter"), {"chain_id": p.chain_id, "signer": signer.address}
                                 ).scalar_one_or_none()
        local = int(local) if local is not None else mined
        tag = f"signer {signer.address}: mined {mined}, pending {pending}, counter {local}"
        if pending > local:
            if not dry_run:
                with transaction(p.engine, actor) as conn:
                    conn.execute(query("lock_signer_nonce"),
                                 {"chain_id": p.chain_id, "signer": signer.address, "chain_nonce": pending})
            actions.append(Action(None, "raise_counter", _done(dry_run), f"{tag}: counter to {pending}"))
        high = min(local, mined + MAX_GAP_FILL)
        if high <= mined:
            actions.append(Action(None, "none", UNCHANGED, f"{tag}: no nonce waiting"))
            continue
        with p.engine.connect() as conn:
            stored = {int(r["nonce"]): list(r["hashes"]) for r in fetch_all(
                conn, "stored_transactions_by_nonce", chain_id=p.chain_id, signer=signer.address, low=mined,
                high=high)}
        gaps = [n for n in range(mined, high) if n not in stored]
        resend = [h for n in range(mined, high) for h in stored.get(n, [])]
        if resend:
            if not dry_run:
                broadcast_stored(p, actor, resend)
            actions.append(Action(None, "rebroadcast", _done(dry_run),
                                  f"{tag}: stored transactions for nonces {mined}..{high - 1} sent again"))
        if gaps:
            if not dry_run:
                tip = to_int(answers[3].result) if answers[3].ok else 10**9
                fees: Fees = fees_from(to_int(answers[2].result.get("baseFeePerGas", "0x0")), tip).bumped(20)
                fills = [sign_tx(signer.account.key, chain_id=p.chain_id, nonce=n, to=signer.address, data=b"",
                                 gas=21_000, fees=fees) for n in gaps]
                with transaction(p.engine, actor) as conn:
                    persist_transactions(conn, p.chain_id, signer.address, [(None, TxKind.GAP_FILL, t) for t in fills])
                broadcast_stored(p, actor, [t.tx_hash for t in fills])
            actions.append(Action(None, "gap_fill", _done(dry_run),
                                  f"{tag}: 0-value self-transfers for nonces {gaps[:20]}"))
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
    head, receipts = _receipts(p, list(open_rows))
    to_send = [(r["payment_id"], h) for h, r in open_rows.items() if r["payment_status"] == "processing"]
    if to_send and not dry_run:
        broadcast_and_mark_sent(p, actor, to_send)
    done: list[tuple[str, Receipt]] = []
    failed: list[tuple[str, str, int | None]] = []
    for h, r in open_rows.items():
        rec = receipts.get(h)
        if rec is None or head - rec.block_number + 1 < settings.confirmation_depth:
            actions.append(Action(r["payment_id"], "none", UNCHANGED, f"{h} not yet at depth"))
        elif rec.status == 1:
            done.append((r["payment_id"], rec))
        else:
            failed.append((r["payment_id"], f"transaction reverted: {h} in block {rec.block_number}",
                           rec.block_number))
    if not dry_run:
        complete_payments(p, actor, done)
        fail_confirmations(p, actor, failed)
    actions += [Action(pid, "complete", _done(dry_run), f"{rec.tx_hash} in block {rec.block_number}")
                for pid, rec in done]
    actions += [Action(pid, "confirmation_failed", _done(dry_run), why) for pid, why, _ in failed]
    return actions


# --------------------------------------------------------------------------- retry_failed_mints


def retry_failed_mints(p: Pipeline, f: Filters, *, dry_run: bool, actor: str) -> list[Action]:
    """Failed mints (the payment was completed, nothing was minted) go back to released, for a new
    transaction by the mint flow - after the cause (e.g. the minter role) was fixed."""
    with p.engine.connect() as conn:
        rows = fetch_all(conn, "failed_mints", chain_id=p.chain_id, ids=f.ids, limit=f.limit)
    if not rows:
        return []
    moved = [r["id"] for r in rows]
    if not dry_run:
        with transaction(p.engine, actor) as conn:
            moved = [x["id"] for x in fetch_all(conn, "retry_failed_mints", ids=moved)]
    return [Action(r["payment_id"], "retry_mint", _done(dry_run) if r["id"] in moved else UNCHANGED,
                   f"mint {r['id']}: {r['error']}") for r in rows]
