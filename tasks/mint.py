"""The mint stage: what completed payments bought is minted by the minter wallet, exactly once.

Released mint rows (released only when their payment's settlement is mint_confirmation_depth deep) are
claimed with a lease, simulated, given nonces by the transaction manager, signed and stored before they
are broadcast. When the mint token has `mintOnce(to, value, mintId)` (the project's token does), each row
mints under its own id (`payments.chain.mint_id_for`) and the token refuses the id a second time: no
retry, replacement or re-sent transaction can mint twice. A mint counts as done when the chain shows
its id used (`MintIdUsed`) at confirmation_depth - whichever of our attempts did it. It fails only when
its nonce was consumed at depth without minting (the transaction manager records each nonce's
outcome); `retry-failed-mints` is refused while any attempt could still be mined.

Tokens without `mintOnce` get the plain `mint(to, value)`, judged from our attempts' receipts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from prefect import task
from prefect.cache_policies import NO_CACHE

from payments.chain import (
    fees_from,
    is_execution_reverted,
    log_queries,
    mint_id_for,
    mint_once_calldata,
    revert_reason,
    rpc_batch,
    sign_tx,
    supports_mint_once,
    to_int,
)
from payments.config import Signer
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.statuses import TxKind
from payments.txm import TxManager, first_fees, persist_attempts
from tasks.common import Pipeline, retry_on_rpc_error, run_logger

MINT_ID_USED_TOPIC = "0x" + keccak(text="MintIdUsed(bytes32,address,uint256)").hex()
MINT_LOOKBACK_BLOCKS = 50_000  # searched for a mint id used before any attempt of ours was recorded
ALREADY_USED = "mint id already used"
_SUPPORT: dict[tuple[int, str], bool] = {}

MINT_SELECTOR = keccak(text="mint(address,uint256)")[:4]


def mint_calldata(recipient: str, amount: int) -> bytes:
    return MINT_SELECTOR + abi_encode(["address", "uint256"], [recipient, amount])


def mint_key(p: Pipeline, token: str, row_id: int) -> str | None:
    """The row's on-chain mint id when the token enforces ids (checked once per token and process)."""
    known = _SUPPORT.get((p.chain_id, token))
    if known is None:
        known = _SUPPORT[(p.chain_id, token)] = supports_mint_once(p.w3, token)
    return "0x" + mint_id_for(p.chain_id, token, row_id).hex() if known else None


def call_for(row: dict[str, Any], key: str | None) -> bytes:
    if key is not None:
        return mint_once_calldata(row["recipient"], int(row["amount"]), bytes.fromhex(key[2:]))
    return mint_calldata(row["recipient"], int(row["amount"]))


@dataclass
class MintReport:
    claimed: int = 0
    failed: int = 0
    sent: int = 0
    minted: int = 0
    rebroadcast: int = 0
    replaced: int = 0


def send_mints(p: Pipeline, minter: Signer, owner: str, settings: PipelineSettings, report: MintReport) -> None:
    batch_size, gas_cap = settings.mint_batch_size, settings.mint_gas_limit
    with transaction(p.engine, owner) as conn:
        fetch_all(conn, "release_expired_mint_leases")
        rows = fetch_all(conn, "claim_released_mints", chain_id=p.chain_id, limit=batch_size, minter=minter.address,
                         owner=owner, lease_seconds=settings.processing_lease_seconds)
    report.claimed += len(rows)
    if not rows:
        return
    rows.sort(key=lambda r: r["id"])
    keys = {r["id"]: mint_key(p, r["mint_token"], r["id"]) for r in rows}
    with transaction(p.engine, owner) as conn:  # the id is known before anything can mint under it
        conn.execute(query("note_mint_keys"), {"ids": [i for i, k in keys.items() if k],
                                               "keys": [k for k in keys.values() if k]})
    calls: list[tuple[str, Any]] = [("eth_getBlockByNumber", ["latest", False]), ("eth_maxPriorityFeePerGas", []),
                                    ("eth_getTransactionCount", [minter.address, "pending"])]
    calls += [("eth_estimateGas", [{"from": minter.address, "to": r["mint_token"],
                                    "data": "0x" + call_for(r, keys[r["id"]]).hex()}, "pending"]) for r in rows]
    answers = rpc_batch(p.w3, calls)
    if not (answers[0].ok and answers[2].ok):
        raise RpcError("fee/nonce lookup failed")  # the lease brings the rows back
    head = to_int(answers[0].result["number"])
    fees = first_fees(fees_from(to_int(answers[0].result.get("baseFeePerGas", "0x0")),
                                to_int(answers[1].result) if answers[1].ok else 10**9), settings.max_fee_per_gas_cap)
    gas: dict[int, int] = {}
    rejected: dict[int, str] = {}
    for r, a in zip(rows, answers[3:], strict=True):
        if a.ok:
            limit = to_int(a.result) * 6 // 5 + 5_000
            if limit <= gas_cap:
                gas[r["id"]] = limit
            else:
                rejected[r["id"]] = f"mint gas estimate {limit} above mint_gas_limit {gas_cap}"
        elif a.error and is_execution_reverted(a.error):
            reason = revert_reason(a.error)
            if ALREADY_USED in reason and keys[r["id"]]:
                continue  # minted already (an earlier attempt): confirm_mints finds its event
            rejected[r["id"]] = f"mint simulation reverted: {reason}"
    if rejected:
        with transaction(p.engine, owner) as conn:
            report.failed += len(fetch_all(conn, "fail_mints", ids=list(rejected), errors=list(rejected.values())))
        for mid, why in rejected.items():
            run_logger().error("Mint failed: %s (%s)", mid, why)
    by_id = {r["id"]: r for r in rows if r["id"] in gas}
    if not by_id:
        return
    txm = TxManager(p.engine, p.w3, p.chain_id, [minter])
    with transaction(p.engine, owner) as conn:
        owned = [r["id"] for r in fetch_all(conn, "lock_owned_unsigned_mints", ids=list(by_id), owner=owner)]
        if not owned:
            return
        first = txm.take_nonces(conn, minter.address, to_int(answers[2].result), len(owned))
        signed = [sign_tx(minter.account.key, chain_id=p.chain_id, nonce=first + i, to=by_id[mid]["mint_token"],
                          data=call_for(by_id[mid], keys[mid]), gas=gas[mid], fees=fees)
                  for i, mid in enumerate(owned)]
        persist_attempts(conn, p.chain_id, minter.address, signed, [TxKind.MINT for _ in signed],
                         [None for _ in signed], list(owned), head)
        attached = fetch_all(conn, "attach_mint_transactions", ids=owned, nonces=[t.nonce for t in signed],
                             hashes=[t.tx_hash for t in signed], owner=owner)
        if len(attached) != len(owned):
            raise RuntimeError(f"attached {len(attached)} of {len(owned)} signed mints")
    txm.broadcast(owner, [t.tx_hash for t in signed])
    report.sent += len(signed)


@dataclass(frozen=True)
class MintFound:
    tx_hash: str
    block_number: int
    block_hash: str


def find_mints(p: Pipeline, rows: list[dict[str, Any]]) -> tuple[int, dict[int, MintFound], set[int]]:
    """Where the chain has each row minted now: its MintIdUsed event (keyed rows), or a successful receipt
    of one of our attempts (rows of tokens without mintOnce). Returns the head, what was found, and the
    rows whose lookup failed (unknown: decided on a later pass, the others go on)."""
    head_answer = rpc_batch(p.w3, [("eth_blockNumber", [])])[0]
    if not head_answer.ok:
        raise RpcError(f"head lookup failed: {head_answer.message}")
    head = to_int(head_answer.result)
    keyed = [r for r in rows if r["mint_key"]]
    plain_hashes = [h for r in rows if not r["mint_key"] for h in r["hashes"]]
    calls: list[tuple[str, Any]] = []
    owners: list[str] = []
    for token in sorted({r["mint_token"] for r in keyed}):
        group = [r for r in keyed if r["mint_token"] == token]
        start = min((int(r["first_block"]) - 16 if r["first_block"] is not None
                     else head - MINT_LOOKBACK_BLOCKS) for r in group)
        for call in log_queries(token, [MINT_ID_USED_TOPIC, sorted({r["mint_key"] for r in group})], start, head):
            calls.append(call)
            owners.append(token)
    calls += [("eth_getTransactionReceipt", [h]) for h in plain_hashes]
    answers = rpc_batch(p.w3, calls) if calls else []
    by_key: dict[tuple[str, str], MintFound] = {}
    failed_tokens: set[str] = set()
    for token, a in zip(owners, answers[:len(owners)], strict=True):
        if not a.ok or not isinstance(a.result, list):
            failed_tokens.add(token)
            continue
        for ev in a.result:
            if not ev.get("removed") and len(ev.get("topics", [])) >= 2:
                by_key[(token, str(ev["topics"][1]).lower())] = MintFound(
                    str(ev["transactionHash"]).lower(), to_int(ev["blockNumber"]), str(ev["blockHash"]).lower())
    receipts: dict[str, Any] = {}
    failed_hashes: set[str] = set()
    for h, a in zip(plain_hashes, answers[len(owners):], strict=True):
        if not a.ok:
            failed_hashes.add(h)
        elif a.result:
            receipts[h] = a.result
    found: dict[int, MintFound] = {}
    unknown: set[int] = set()
    for r in rows:
        if r["mint_key"]:
            if r["mint_token"] in failed_tokens:
                unknown.add(int(r["id"]))
                continue
            hit = by_key.get((r["mint_token"], r["mint_key"]))
        else:
            if failed_hashes & set(r["hashes"]):
                unknown.add(int(r["id"]))
                continue
            ok = next((receipts[h] for h in r["hashes"] if h in receipts and to_int(receipts[h]["status"]) == 1), None)
            hit = None if ok is None else MintFound(str(ok["transactionHash"]).lower(), to_int(ok["blockNumber"]),
                                                    str(ok["blockHash"]).lower())
        if hit is not None:
            found[int(r["id"])] = hit
    return head, found, unknown


def confirm_mints(p: Pipeline, actor: str, settings: PipelineSettings, limit: int, report: MintReport) -> None:
    with transaction(p.engine, actor) as conn:
        rows = fetch_all(conn, "load_minting", chain_id=p.chain_id, limit=limit)
    if not rows:
        return
    head, found, unknown = find_mints(p, rows)
    done = [(int(r["id"]), found[int(r["id"])]) for r in rows if int(r["id"]) in found
            and head - found[int(r["id"])].block_number + 1 >= settings.mint_depth]
    failed: dict[int, str] = {}
    for r in rows:
        if int(r["id"]) in found or int(r["id"]) in unknown or not r["nonce_final"] or r["tx_nonce"] is None:
            continue  # minted, unknown, or an attempt could still be mined: the transaction manager gets it mined
        if r["mined_hash"] in r["hashes"]:
            failed[int(r["id"])] = f"mint transaction {r['mined_hash']} reverted"
        else:
            failed[int(r["id"])] = (f"nonce {r['tx_nonce']} of the minter was consumed by "
                                    f"{r['mined_hash'] or 'a transaction this service did not sign'}; nothing minted")
    with transaction(p.engine, actor) as conn:
        if done:
            report.minted += len(fetch_all(conn, "finish_mints", ids=[d[0] for d in done],
                                           blocks=[d[1].block_number for d in done],
                                           hashes=[d[1].tx_hash for d in done],
                                           block_hashes=[d[1].block_hash for d in done]))
        if failed:
            report.failed += len(fetch_all(conn, "fail_mints", ids=list(failed), errors=list(failed.values())))
    for mid, why in failed.items():
        run_logger().error("Mint failed: %s (%s)", mid, why)


def mint_tick(p: Pipeline, minter: Signer, owner: str, settings: PipelineSettings) -> MintReport:
    """Send what is released, apply what the chain shows minted, and tend the minter's nonces (re-send,
    re-price, fill)."""
    report = MintReport()
    try:
        try:
            send_mints(p, minter, owner, settings, report)
        finally:  # what was sent before is confirmed whatever happened to this batch
            confirm_mints(p, owner, settings, max(settings.mint_batch_size, settings.confirmation_batch_size), report)
    finally:  # and the minter's nonces are tended whatever happened to both
        tend = TxManager(p.engine, p.w3, p.chain_id, [minter]).tend_all(settings, owner, [minter.address])
        report.rebroadcast += tend.rebroadcast
        report.replaced += tend.bumped + tend.cancelled + tend.filled
    return report


@task(name="mint-batch", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=retry_on_rpc_error,
      cache_policy=NO_CACHE)
def mint_tick_task(p: Pipeline, minter: Signer, owner: str, settings: PipelineSettings) -> MintReport:
    return mint_tick(p, minter, owner, settings)
