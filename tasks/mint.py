"""The mint stage: what completed payments bought is minted by the minter wallet.

Released mint rows are claimed with a lease, simulated (eth_estimateGas), given nonces under the
minter's nonce row lock, signed and stored before they are broadcast - the same order as settlements,
so a crash leaves either nothing or stored bytes, which the next tick sends again. Receipts move rows to
`minted` (or `failed` on revert). Only rows released by a completed payment are ever minted, once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from prefect import task
from prefect.cache_policies import NO_CACHE

from payments.chain import fees_from, is_execution_reverted, revert_reason, rpc_batch, sign_tx, to_int
from payments.config import Signer
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.statuses import TxKind
from tasks.common import Pipeline, retry_on_rpc_error, run_logger
from tasks.confirm import Receipt
from tasks.send import broadcast_stored, persist_transactions

MINT_SELECTOR = keccak(text="mint(address,uint256)")[:4]


def mint_calldata(recipient: str, amount: int) -> bytes:
    return MINT_SELECTOR + abi_encode(["address", "uint256"], [recipient, amount])


@dataclass
class MintReport:
    claimed: int = 0
    failed: int = 0
    sent: int = 0
    minted: int = 0
    rebroadcast: int = 0


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
    calls: list[tuple[str, Any]] = [("eth_getBlockByNumber", ["latest", False]), ("eth_maxPriorityFeePerGas", []),
                                    ("eth_getTransactionCount", [minter.address, "pending"])]
    calls += [("eth_estimateGas", [{"from": minter.address, "to": r["mint_token"],
                                    "data": "0x" + mint_calldata(r["recipient"], int(r["amount"])).hex()}, "pending"])
              for r in rows]
    answers = rpc_batch(p.w3, calls)
    if not (answers[0].ok and answers[2].ok):
        raise RpcError("fee/nonce lookup failed")  # the lease brings the rows back
    fees = fees_from(to_int(answers[0].result.get("baseFeePerGas", "0x0")),
                     to_int(answers[1].result) if answers[1].ok else 10**9)
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
            rejected[r["id"]] = f"mint simulation reverted: {revert_reason(a.error)}"
    if rejected:
        with transaction(p.engine, owner) as conn:
            report.failed += len(fetch_all(conn, "fail_mints", ids=list(rejected), errors=list(rejected.values())))
        for mid, why in rejected.items():
            run_logger().error("Mint failed: %s (%s)", mid, why)
    by_id = {r["id"]: r for r in rows if r["id"] in gas}
    if not by_id:
        return
    with transaction(p.engine, owner) as conn:
        owned = [r["id"] for r in fetch_all(conn, "lock_owned_unsigned_mints", ids=list(by_id), owner=owner)]
        if not owned:
            return
        first = int(conn.execute(query("lock_signer_nonce"), {
            "chain_id": p.chain_id, "signer": minter.address, "chain_nonce": to_int(answers[2].result)}).scalar_one())
        signed = [sign_tx(minter.account.key, chain_id=p.chain_id, nonce=first + i, to=by_id[mid]["mint_token"],
                          data=mint_calldata(by_id[mid]["recipient"], int(by_id[mid]["amount"])), gas=gas[mid],
                          fees=fees) for i, mid in enumerate(owned)]
        persist_transactions(conn, p.chain_id, minter.address, [(None, TxKind.MINT, tx) for tx in signed],
                             mint_ids=owned)
        attached = fetch_all(conn, "attach_mint_transactions", ids=owned, nonces=[t.nonce for t in signed],
                             hashes=[t.tx_hash for t in signed], owner=owner)
        if len(attached) != len(owned):
            raise RuntimeError(f"attached {len(attached)} of {len(owned)} signed mints")
        conn.execute(query("advance_signer_nonce"), {"chain_id": p.chain_id, "signer": minter.address,
                                                     "expected": first, "next_nonce": first + len(signed)})
    broadcast_stored(p, owner, [t.tx_hash for t in signed])
    report.sent += len(signed)


def confirm_mints(p: Pipeline, actor: str, settings: PipelineSettings, limit: int, report: MintReport) -> None:
    with p.engine.connect() as conn:
        rows = fetch_all(conn, "load_minting", limit=limit)
    if not rows:
        return
    hashes = [h for r in rows for h in r["hashes"]]
    answers = rpc_batch(p.w3, [("eth_blockNumber", [])] + [("eth_getTransactionReceipt", [h]) for h in hashes])
    if not all(a.ok for a in answers):
        raise RpcError("mint receipt lookup failed")
    head = to_int(answers[0].result)
    receipts = {h: Receipt.from_rpc(a.result) for h, a in zip(hashes, answers[1:], strict=True) if a.result}
    done: list[tuple[int, Receipt]] = []
    reverted: dict[int, str] = {}
    resend: list[str] = []
    for r in rows:
        mined = [receipts[h] for h in r["hashes"] if h in receipts]
        rec = next((x for x in mined if x.status == 1), mined[0] if mined else None)
        if rec is not None:
            if head - rec.block_number + 1 >= settings.confirmation_depth:
                if rec.status == 1:
                    done.append((r["id"], rec))
                else:
                    reverted[r["id"]] = f"mint transaction reverted: {rec.tx_hash} in block {rec.block_number}"
        elif r["last_broadcast_age_seconds"] is None or r["last_broadcast_age_seconds"] >= \
                settings.rebroadcast_after_seconds:
            resend += r["hashes"]
    with transaction(p.engine, actor) as conn:
        if done:
            report.minted += len(fetch_all(conn, "finish_mints", ids=[d[0] for d in done],
                                           blocks=[d[1].block_number for d in done],
                                           hashes=[d[1].tx_hash for d in done]))
        if reverted:
            report.failed += len(fetch_all(conn, "fail_mints", ids=list(reverted), errors=list(reverted.values())))
    for mid, why in reverted.items():
        run_logger().error("Mint failed: %s (%s)", mid, why)
    if resend:
        report.rebroadcast += len(broadcast_stored(p, actor, resend))


def mint_tick(p: Pipeline, minter: Signer, owner: str, settings: PipelineSettings) -> MintReport:
    """Send what is released, then apply receipts of what was sent (and re-send what the node lost)."""
    report = MintReport()
    send_mints(p, minter, owner, settings, report)
    confirm_mints(p, owner, settings, max(settings.mint_batch_size, settings.confirmation_batch_size), report)
    return report


@task(name="mint-batch", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=retry_on_rpc_error,
      cache_policy=NO_CACHE)
def mint_tick_task(p: Pipeline, minter: Signer, owner: str, settings: PipelineSettings) -> MintReport:
    return mint_tick(p, minter, owner, settings)
