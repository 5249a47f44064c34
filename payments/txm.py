"""The transaction manager: the one place that signs, stores, broadcasts, re-prices and fills nonces for
every wallet of the service (settlement signers and the minter).

Stages ask it to send *intents* (a call from a wallet) and read outcomes from the chain; they never sign
or judge receipts themselves. What it owns:

- the nonce counter per (chain, wallet): nonces are taken under the counter's row lock in the same
  database transaction that stores the signed bytes, so a crash leaves nothing or bytes to send again;
- every attempt at every nonce (`payment_transactions`), stored before it is broadcast;
- nonce health (`tend`), per wallet, each tick: the lowest open nonce is replaced with higher fees after
  `fee_bump_after_blocks` blocks without inclusion (both fees +max(10 %, fee_bump_percent), or the
  current estimate if higher, never above `max_fee_per_gas_cap`); an attempt the node refuses as
  underpriced is re-priced instead of re-sent; a nonce whose intent can no longer land (authorization
  expired, payment or mint settled or failed elsewhere) is filled with a 0-value self-transfer; a nonce
  below the counter with no attempt at all is filled the same way; every open nonce's latest bytes are
  re-broadcast every `rebroadcast_after_seconds`;
- the outcome of each consumed nonce (`txm_nonces`): which attempt mined, in which block - or none of
  ours (a foreign transaction consumed it).

Outcomes of payments and mints are NOT decided here from hashes: a payment is settled iff its
authorization is used on chain, a mint iff its mint id is used (tasks/confirm.py, tasks/mint.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import rlp  # type: ignore[import-untyped]
from sqlalchemy import Connection, Engine, text
from web3 import Web3

from payments.chain import Fees, RpcResult, SignedTx, broadcast_accepted, fees_from, rpc_batch, sign_tx, to_int
from payments.config import Signer
from payments.db import fetch_all, query, transaction
from payments.errors import RpcError
from payments.settings import PipelineSettings
from payments.statuses import TxKind

log = logging.getLogger("payments.txm")

MAX_OPEN_NONCES = 500  # nonces looked at per wallet and tick
MAX_OUTCOMES = 500  # consumed nonces recorded per wallet and tick
SELF_TRANSFER_GAS = 21_000


def is_underpriced(message: str | None) -> bool:
    """The node refused the attempt for its fees (not for its nonce or its contents)."""
    m = (message or "").lower()
    return any(w in m for w in ("underpriced", "less than block base fee", "fee cap", "feecap",
                                "max fee per gas less", "fee too low"))


def _ceil_percent(value: int, percent: int) -> int:
    return -(-value * (100 + percent) // 100)


def replacement_fees(old: Fees, estimate: Fees, percent: int, cap: int) -> tuple[Fees | None, bool]:
    """Fees for a replacement at the same nonce: both fees raised by max(10 %, percent), rounded up, or
    to the current estimate if that is higher, and never above `cap`. Returns (fees, capped); fees is
    None when the cap leaves no room for the +10 % nodes require of a replacement."""
    pct = max(percent, 10)
    tip = max(_ceil_percent(old.max_priority_fee_per_gas, pct), estimate.max_priority_fee_per_gas)
    fee = max(_ceil_percent(old.max_fee_per_gas, pct), estimate.max_fee_per_gas, tip)
    capped = fee > cap
    if capped:
        fee = cap
        tip = min(tip, cap)
    if fee < _ceil_percent(old.max_fee_per_gas, 10) or tip < _ceil_percent(old.max_priority_fee_per_gas, 10):
        return None, True
    return Fees(max_fee_per_gas=fee, max_priority_fee_per_gas=tip), capped


def first_fees(estimate: Fees, cap: int) -> Fees:
    """Fees of a first attempt: the estimate, held at the cap."""
    fee = min(estimate.max_fee_per_gas, cap)
    return Fees(max_fee_per_gas=fee, max_priority_fee_per_gas=min(estimate.max_priority_fee_per_gas, fee))


def decode_call(raw: bytes) -> tuple[str, int, bytes]:
    """(to, value, data) of a stored EIP-1559 transaction, to sign the same call again at other fees."""
    if not raw or raw[0] != 2:
        raise ValueError("not an EIP-1559 transaction")
    fields = rlp.decode(raw[1:])
    return "0x" + bytes(fields[5]).hex(), int.from_bytes(bytes(fields[6]), "big"), bytes(fields[7])


class Intent(StrEnum):
    LIVE = "live"  # the call can still do what it is for
    DEAD = "dead"  # it can no longer land usefully: fill the nonce
    FILLER = "filler"  # a cancel or gap fill: only needs to be mined


class NonceAction(StrEnum):
    NONE = "none"
    REBROADCAST = "rebroadcast"
    BUMP = "bump"
    CANCEL = "cancel"
    FILL = "fill"


@dataclass(frozen=True)
class OpenNonce:
    """The latest attempt at one open nonce (at or above the chain's mined count) and its intent."""

    nonce: int
    tx_hash: str
    kind: str
    payment_id: str | None
    mint_id: int | None
    raw: bytes
    fees: Fees
    gas_limit: int
    signed_block: int | None
    broadcast_age: float | None
    last_error: str | None
    intent: Intent


def intent_of(row: dict[str, Any], chain_time: int) -> Intent:
    """Whether the call behind a nonce can still do what it is for, from the tables and chain time."""
    if row["kind"] in (TxKind.CANCEL, TxKind.GAP_FILL):
        return Intent.FILLER
    hashes = set(row["hashes"])
    if row["payment_id"] is not None:
        status = row["payment_status"]
        if status == "completed":  # settled: by this very nonce (a reorg put it back) or by another tx
            return Intent.LIVE if row["payment_tx_hash"] in hashes else Intent.DEAD
        if status in ("failed", "confirmation_failed"):
            return Intent.DEAD
        return Intent.DEAD if chain_time >= int(row["valid_before"]) else Intent.LIVE
    status = row["mint_status"]
    if status == "minting":
        return Intent.LIVE
    if status == "minted":
        return Intent.LIVE if row["mint_tx_hash"] in hashes else Intent.DEAD
    return Intent.DEAD


def nonce_action(n: OpenNonce | None, lowest: bool, head: int, base_fee: int,
                 settings: PipelineSettings) -> NonceAction:
    """What one open nonce needs now. Pure: every rule has a unit test."""
    if n is None:
        return NonceAction.FILL
    if n.intent is Intent.DEAD:
        return NonceAction.CANCEL
    stale = n.signed_block is not None and head - n.signed_block >= settings.fee_bump_after_blocks
    if is_underpriced(n.last_error) or n.fees.max_fee_per_gas < base_fee or (lowest and stale):
        return NonceAction.BUMP
    if n.broadcast_age is None or n.broadcast_age >= settings.rebroadcast_after_seconds:
        return NonceAction.REBROADCAST
    return NonceAction.NONE


@dataclass
class TendReport:
    wallets: int = 0
    open_nonces: int = 0
    rebroadcast: int = 0
    bumped: int = 0
    cancelled: int = 0
    filled: int = 0
    capped: int = 0
    unkeyed: int = 0
    outcomes: int = 0
    foreign: int = 0


@dataclass(frozen=True)
class ChainHead:
    number: int
    timestamp: int
    base_fee: int
    estimate: Fees


def persist_attempts(conn: Connection, chain_id: int, wallet: str, txs: list[SignedTx], kinds: list[TxKind],
                     payment_ids: list[str | None], mint_ids: list[int | None], signed_block: int | None,
                     capped: list[bool] | None = None) -> int:
    """Store signed attempts (before any broadcast). Identical bytes signed twice (two runs replacing the
    same nonce at the same fees) are stored once. Returns how many rows were new."""
    rows = conn.execute(query("insert_transactions"), {
        "chain_id": chain_id, "signer": wallet, "signed_block": signed_block,
        "nonces": [t.nonce for t in txs], "hashes": [t.tx_hash for t in txs],
        "payment_ids": payment_ids, "mint_ids": mint_ids, "kinds": [str(k) for k in kinds],
        "raws": [t.raw for t in txs], "max_fees": [t.fees.max_fee_per_gas for t in txs],
        "max_tips": [t.fees.max_priority_fee_per_gas for t in txs], "gas_limits": [t.gas_limit for t in txs],
        "capped": capped if capped is not None else [False for _ in txs],
    }).all()
    return len(rows)


class TxManager:
    """Signs, stores, broadcasts and tends the transactions of every wallet on one chain."""

    def __init__(self, engine: Engine, w3: Web3, chain_id: int, keys: list[Signer]) -> None:
        self.engine, self.w3, self.chain_id = engine, w3, chain_id
        self.keys = {k.address: k for k in keys}

    # ------------------------------------------------------------------ sending

    def take_nonces(self, conn: Connection, wallet: str, chain_pending: int, count: int) -> int:
        """Reserve `count` consecutive nonces in the caller's transaction (row lock until it commits):
        the first is max(our counter, the chain's pending count)."""
        first = int(conn.execute(query("lock_signer_nonce"), {"chain_id": self.chain_id, "signer": wallet,
                                                              "chain_nonce": chain_pending}).scalar_one())
        advanced = conn.execute(query("advance_signer_nonce"), {
            "chain_id": self.chain_id, "signer": wallet, "expected": first, "next_nonce": first + count}).all()
        if len(advanced) != 1:
            raise RuntimeError("nonce counter moved while it was locked")
        return first

    def broadcast(self, actor: str, hashes: list[str]) -> dict[str, RpcResult]:
        """Send the stored bytes of these attempts (idempotent) and record each answer."""
        if not hashes:
            return {}
        with self.engine.connect() as conn:
            rows = fetch_all(conn, "raw_transactions_for_hashes", hashes=hashes)
        answers = rpc_batch(self.w3, [("eth_sendRawTransaction", ["0x" + bytes(r["raw_tx"]).hex()]) for r in rows])
        results = {r["tx_hash"]: a for r, a in zip(rows, answers, strict=True)}
        if results:
            with transaction(self.engine, actor) as conn:
                record_broadcasts(conn, results)
        return results

    # ------------------------------------------------------------------ nonce health

    def wallets(self) -> list[str]:
        """Every wallet that ever sent on this chain, configured or not (a removed signer stays watched)."""
        with self.engine.connect() as conn:
            known = [str(w) for w in conn.execute(
                text("SELECT signer FROM signer_nonces WHERE chain_id = :c"), {"c": self.chain_id}).scalars()]
        return sorted(set(known) | set(self.keys))

    def read_head(self) -> ChainHead:
        answers = rpc_batch(self.w3, [("eth_getBlockByNumber", ["latest", False]), ("eth_maxPriorityFeePerGas", [])])
        if not answers[0].ok or not answers[0].result:
            raise RpcError(f"head lookup failed: {answers[0].message}")
        block = answers[0].result
        base = to_int(block.get("baseFeePerGas", "0x0"))
        tip = to_int(answers[1].result) if answers[1].ok else 10**9
        return ChainHead(to_int(block["number"]), to_int(block["timestamp"]), base, fees_from(base, tip))

    def tend_all(self, settings: PipelineSettings, actor: str, wallets: list[str] | None = None) -> TendReport:
        report = TendReport()
        head = self.read_head()
        failure: Exception | None = None
        for wallet in wallets if wallets is not None else self.wallets():
            try:  # one wallet's failure (an RPC error) does not keep the others untended
                with self.tend_lock(wallet) as mine:
                    if mine:
                        self.tend(wallet, head, settings, actor, report)
            except Exception as exc:
                log.warning("tending %s failed: %s", wallet, exc)
                failure = failure or exc
        if failure is not None:
            raise failure
        return report

    @contextmanager
    def tend_lock(self, wallet: str) -> Iterator[bool]:
        """One tender per wallet at a time (two runs would only race each other's replacements)."""
        key = f"payments-txm:{self.chain_id}:{wallet}"
        with self.engine.connect() as conn:
            got = bool(conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:k, 0))"), {"k": key}).scalar())
            conn.commit()
            try:
                yield got
            finally:
                if got:
                    conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"), {"k": key})
                    conn.commit()

    def _open_nonces(self, wallet: str, head: ChainHead) -> tuple[int, int, dict[int, OpenNonce]]:
        """(mined count, end of the open range, latest attempt per open nonce)."""
        answers = rpc_batch(self.w3, [("eth_getTransactionCount", [wallet, "latest"])])
        if not answers[0].ok:
            raise RpcError(f"nonce lookup failed for {wallet}: {answers[0].message}")
        mined = to_int(answers[0].result)
        with self.engine.connect() as conn:
            counter = conn.execute(query("signer_counter"), {"chain_id": self.chain_id, "signer": wallet}
                                   ).scalar_one_or_none()
            high = min(int(counter) if counter is not None else mined, mined + MAX_OPEN_NONCES)
            if high <= mined:
                return mined, mined, {}
            rows = fetch_all(conn, "txm_open_attempts", chain_id=self.chain_id, wallet=wallet, low=mined, high=high)
        latest = {int(r["nonce"]): OpenNonce(
            nonce=int(r["nonce"]), tx_hash=r["tx_hash"], kind=r["kind"], payment_id=r["payment_id"],
            mint_id=r["mint_id"], raw=bytes(r["raw_tx"]),
            fees=Fees(int(r["max_fee_per_gas"]), int(r["max_priority_fee_per_gas"])), gas_limit=int(r["gas_limit"]),
            signed_block=None if r["signed_block"] is None else int(r["signed_block"]),
            broadcast_age=None if r["broadcast_age"] is None else float(r["broadcast_age"]),
            last_error=r["last_broadcast_error"], intent=intent_of(r, head.timestamp)) for r in rows}
        return mined, high, latest

    def plan(self, wallet: str, head: ChainHead, settings: PipelineSettings) -> list[tuple[int, NonceAction]]:
        """What `tend` would do to each open nonce of this wallet (nothing is signed or sent)."""
        mined, high, latest = self._open_nonces(wallet, head)
        return [(n, nonce_action(latest.get(n), n == mined, head.number, head.base_fee, settings))
                for n in range(mined, high)]

    def tend(self, wallet: str, head: ChainHead, settings: PipelineSettings, actor: str, report: TendReport) -> None:
        """Record consumed nonces' outcomes, then give every open nonce what it needs (call under tend_lock)."""
        report.wallets += 1
        # Outcomes are recorded once the nonce is consumed mint_confirmation_depth deep (decisions that
        # re-send a payment or fail a mint rest on them).
        deep = rpc_batch(self.w3, [("eth_getTransactionCount",
                                    [wallet, hex(max(head.number - settings.mint_depth + 1, 0))])])[0]
        if not deep.ok:
            raise RpcError(f"nonce lookup failed for {wallet}: {deep.message}")
        self._record_outcomes(wallet, to_int(deep.result), actor, report)
        mined, high, latest = self._open_nonces(wallet, head)
        if high <= mined:
            return
        report.open_nonces += high - mined
        resend: list[str] = []
        resend_payments: dict[str, str] = {}  # re-sent hash -> its payment (a `processing` one becomes sent)
        signed: list[tuple[SignedTx, TxKind, str | None, int | None, bool]] = []
        for nonce in range(mined, high):
            n = latest.get(nonce)
            action = nonce_action(n, nonce == mined, head.number, head.base_fee, settings)
            if action is NonceAction.NONE:
                continue
            if action is NonceAction.REBROADCAST and n is not None:
                resend.append(n.tx_hash)
                if n.payment_id is not None and n.kind in (TxKind.SETTLEMENT, TxKind.REPLACEMENT):
                    resend_payments[n.tx_hash] = n.payment_id
                continue
            key = self.keys.get(wallet)
            if key is None:  # a wallet removed from the configuration: watched, its stored bytes re-sent
                report.unkeyed += 1
                if n is not None:
                    resend.append(n.tx_hash)
                    if n.payment_id is not None and n.kind in (TxKind.SETTLEMENT, TxKind.REPLACEMENT):
                        resend_payments[n.tx_hash] = n.payment_id
                continue
            replacement = self._replacement(key, nonce, n, action, head, settings)
            if replacement is None:
                report.capped += 1
                if n is not None:
                    resend.append(n.tx_hash)
                continue
            signed.append(replacement)
        if signed:
            with transaction(self.engine, actor) as conn:
                for tx, kind, pid, mid, capped in signed:
                    persist_attempts(conn, self.chain_id, wallet, [tx], [kind], [pid], [mid], head.number, [capped])
            for tx, kind, _, _, capped in signed:
                report.capped += int(capped)
                if kind is TxKind.GAP_FILL:
                    report.filled += 1
                elif kind is TxKind.CANCEL:
                    report.cancelled += 1
                else:
                    report.bumped += 1
                log.warning("nonce %d of %s: %s -> %s (max fee %d%s)", tx.nonce, wallet, kind, tx.tx_hash,
                            tx.fees.max_fee_per_gas, ", held at max_fee_per_gas_cap" if capped else "")
        hashes = resend + [tx.tx_hash for tx, *_ in signed]
        results = self.broadcast(actor, hashes)
        report.rebroadcast += sum(1 for h in resend if h in results and broadcast_accepted(results[h]))
        accepted_payments = [pid for tx, kind, pid, _, _ in signed if kind is TxKind.REPLACEMENT and pid is not None
                             and tx.tx_hash in results and broadcast_accepted(results[tx.tx_hash])]
        accepted_payments += [pid for h, pid in resend_payments.items()
                              if h in results and broadcast_accepted(results[h])]
        if accepted_payments:  # accepted by the node (a re-priced or re-sent attempt): a `processing` payment is sent
            with transaction(self.engine, actor) as conn:
                fetch_all(conn, "mark_sent", ids=accepted_payments)

    def _replacement(self, key: Signer, nonce: int, n: OpenNonce | None, action: NonceAction, head: ChainHead,
                     settings: PipelineSettings) -> tuple[SignedTx, TxKind, str | None, int | None, bool] | None:
        cap = settings.max_fee_per_gas_cap
        if n is None:
            fees, capped = first_fees(head.estimate, cap), head.estimate.max_fee_per_gas > cap
        else:
            maybe, capped = replacement_fees(n.fees, head.estimate, settings.fee_bump_percent, cap)
            if maybe is None:
                log.warning("nonce %d of %s: no replacement possible under max_fee_per_gas_cap %d (holds %s)",
                            nonce, key.address, cap, n.tx_hash)
                return None
            fees = maybe
        if action is NonceAction.BUMP and n is not None:
            to, value, data = decode_call(n.raw)
            kind = TxKind.MINT if n.kind == TxKind.MINT else (
                TxKind(n.kind) if n.kind in (TxKind.CANCEL, TxKind.GAP_FILL) else TxKind.REPLACEMENT)
            tx = sign_tx(key.account.key, chain_id=self.chain_id, nonce=nonce, to=to, data=data, gas=n.gas_limit,
                         fees=fees, value=value)
            return tx, kind, n.payment_id, n.mint_id, capped
        tx = sign_tx(key.account.key, chain_id=self.chain_id, nonce=nonce, to=key.address, data=b"",
                     gas=SELF_TRANSFER_GAS, fees=fees)
        if n is None:
            return tx, TxKind.GAP_FILL, None, None, capped
        return tx, TxKind.CANCEL, n.payment_id, (None if n.payment_id is not None else n.mint_id), capped

    def _record_outcomes(self, wallet: str, deep: int, actor: str, report: TendReport) -> None:
        """Nonces the chain consumed at depth: which of our attempts mined, or none (a foreign transaction)."""
        with self.engine.connect() as conn:
            rows = fetch_all(conn, "txm_unrecorded_nonces", chain_id=self.chain_id, wallet=wallet, below=deep,
                             limit=MAX_OUTCOMES)
        if not rows:
            return
        hashes = [h for r in rows for h in r["hashes"]]
        answers = rpc_batch(self.w3, [("eth_getTransactionReceipt", [h]) for h in hashes])
        receipts: dict[str, dict[str, Any]] = {}
        for h, a in zip(hashes, answers, strict=True):
            if not a.ok:
                raise RpcError(f"receipt lookup failed for {h}: {a.message}")
            if a.result:
                receipts[h] = a.result
        out: list[tuple[int, str | None, int | None, str | None, int | None]] = []
        for r in rows:
            mined = next((receipts[h] for h in r["hashes"] if h in receipts), None)
            if mined is None:
                out.append((int(r["nonce"]), None, None, None, None))
                report.foreign += 1
                log.warning("nonce %d of %s was consumed by a transaction this service did not sign", r["nonce"],
                            wallet)
            else:
                out.append((int(r["nonce"]), str(mined["transactionHash"]).lower(), to_int(mined["blockNumber"]),
                            str(mined["blockHash"]).lower(), to_int(mined["status"])))
        with transaction(self.engine, actor) as conn:
            conn.execute(query("record_nonce_outcomes"), {
                "chain_id": self.chain_id, "wallet": wallet, "nonces": [o[0] for o in out],
                "hashes": [o[1] for o in out], "blocks": [o[2] for o in out], "block_hashes": [o[3] for o in out],
                "statuses": [o[4] for o in out]})
        report.outcomes += len(out)


def record_broadcasts(conn: Connection, results: dict[str, RpcResult]) -> None:
    conn.execute(query("record_broadcasts"), {
        "hashes": list(results),
        "errors": [None if broadcast_accepted(a) else a.message[:500] for a in results.values()],
    })
