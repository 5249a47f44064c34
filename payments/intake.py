"""Queueing a payment: the payment row and the mint rows it pays for, in one transaction.

Idempotent: the same authorization (chain, token, payer, nonce) buying the same mints again returns the
existing payment id; the same authorization with any other content (amount, window, signature, or what
it buys: product, quantity, recipient) raises DuplicatePaymentError and writes nothing."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from payments.db import fetch_all, query, transaction
from payments.eip3009 import MAX_SIGNATURE_BYTES, MIN_SIGNATURE_BYTES, Authorization, is_signature_hex
from payments.errors import DuplicatePaymentError, InsufficientFundsError, InvalidPaymentError

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
UINT256_MAX = 2**256 - 1


@dataclass(frozen=True)
class MintItem:
    mint_token: str
    recipient: str
    amount: int


def new_payment_id() -> str:
    return "pay_" + uuid.uuid4().hex


def _address(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise InvalidPaymentError("invalid_payload", f"{what} is not a 20-byte hex address")
    return value.lower()


def _uint(value: int, what: str, *, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= UINT256_MAX:
        raise InvalidPaymentError("invalid_payload", f"{what} is not a uint256")
    if positive and value == 0:
        raise InvalidPaymentError("invalid_payload", f"{what} must be positive")
    return value


def validate(auth: Authorization, mints: list[MintItem]) -> None:
    _address(auth.payer, "authorization.from")
    _address(auth.pay_to, "authorization.to")
    _uint(auth.value, "authorization.value", positive=True)
    _uint(auth.valid_after, "authorization.validAfter")
    _uint(auth.valid_before, "authorization.validBefore")
    if auth.valid_before <= auth.valid_after:
        raise InvalidPaymentError("invalid_payload", "validBefore must be after validAfter")
    if not _BYTES32.fullmatch(auth.nonce):
        raise InvalidPaymentError("invalid_payload", "authorization.nonce is not 32 bytes of hex")
    if not is_signature_hex(auth.signature):  # 65 bytes from an EOA; a contract wallet's may be longer
        raise InvalidPaymentError("invalid_payload", f"signature is not {MIN_SIGNATURE_BYTES} to "
                                                     f"{MAX_SIGNATURE_BYTES} bytes of hex")
    for m in mints:
        _address(m.mint_token, "mint token")
        _address(m.recipient, "mint recipient")
        _uint(m.amount, "mint amount", positive=True)


@dataclass(frozen=True)
class Exposure:
    """What the payer can cover: its token balance (read on chain just before) and the most payments it
    may have open at once."""

    balance: int
    max_open: int


def find_payment(conn: Connection, *, chain_id: int, token: str, auth: Authorization) -> dict[str, Any] | None:
    """The payment this authorization (chain, token, payer, nonce) already pays for, with its mints."""
    rows = fetch_all(conn, "find_payment_by_authorization", chain_id=chain_id, token=token.lower(),
                     payer=auth.payer.lower(), auth_nonce=auth.nonce.lower())
    return rows[0] if rows else None


def same_request(existing: dict[str, Any], auth: Authorization, mints: list[MintItem]) -> bool:
    """Whether a stored payment is exactly this authorization buying exactly these mints."""
    stored_mints = sorted((str(t), str(r), int(a)) for t, r, a in existing["mints"])
    wanted = sorted((m.mint_token.lower(), m.recipient.lower(), m.amount) for m in mints)
    return (existing["pay_to"] == auth.pay_to.lower() and int(existing["amount"]) == auth.value
            and int(existing["valid_after"]) == auth.valid_after
            and int(existing["valid_before"]) == auth.valid_before
            and existing["signature"] == auth.signature.lower() and stored_mints == wanted)


def payer_lock_key(chain_id: int, token: str, payer: str) -> str:
    return f"payments-payer:{chain_id}:{token.lower()}:{payer.lower()}"


def enqueue_payment(
    engine: Engine, *, chain_id: int, token: str, auth: Authorization, mints: list[MintItem],
    payment_id: str | None = None, actor: str = "intake", x402_version: int = 2, exposure: Exposure | None = None,
) -> tuple[str, bool]:
    """Queue a payment; returns (payment id, created). Raises InvalidPaymentError (InsufficientFundsError
    when `exposure` is given and the payer's open payments plus this one are more than its balance covers,
    or more than it may have open) or DuplicatePaymentError without writing anything.

    With `exposure`, the check and the insert run under a transaction-scoped advisory lock per payer, so
    concurrent requests of one payer are judged one after the other."""
    validate(auth, mints)
    token = _address(token, "token")
    pid = payment_id or new_payment_id()
    params = {
        "id": pid, "chain_id": chain_id, "token": token, "payer": auth.payer.lower(), "pay_to": auth.pay_to.lower(),
        "amount": auth.value, "valid_after": auth.valid_after, "valid_before": auth.valid_before,
        "auth_nonce": auth.nonce.lower(), "signature": auth.signature.lower(),
        "authorization": json.dumps({"x402Version": x402_version, "authorization": auth.as_x402(),
                                     "signature": auth.signature}),
    }
    with transaction(engine, actor) as conn:
        inserted: list[dict[str, Any]] = []
        existing = None
        if exposure is not None:
            conn.execute(query("lock_payer"), {"key": payer_lock_key(chain_id, token, auth.payer)})
            existing = find_payment(conn, chain_id=chain_id, token=token, auth=auth)
            if existing is None:
                _check_exposure(conn, chain_id, token, auth, exposure)
        if existing is None:
            inserted = fetch_all(conn, "insert_payment", **params)
        if inserted:
            if mints:  # the mint rows belong to the same transaction as the payment
                conn.execute(query("insert_mint_rows"), {
                    "payment_id": pid,
                    "mint_tokens": [m.mint_token.lower() for m in mints],
                    "recipients": [m.recipient.lower() for m in mints],
                    "amounts": [m.amount for m in mints],
                })
            return pid, True
        existing = existing or find_payment(conn, chain_id=chain_id, token=token, auth=auth)
    if existing is None or not same_request(existing, auth, mints):
        raise DuplicatePaymentError(str(existing["id"]) if existing else "unknown")
    return str(existing["id"]), False


def _check_exposure(conn: Connection, chain_id: int, token: str, auth: Authorization, exposure: Exposure) -> None:
    (row,) = fetch_all(conn, "payer_open_exposure", chain_id=chain_id, token=token, payer=auth.payer.lower())
    if int(row["open_count"]) >= exposure.max_open:
        raise InsufficientFundsError(f"the payer already has {int(row['open_count'])} open payments, the most "
                                     "allowed; wait until they settle")
    if int(row["open_amount"]) + auth.value > exposure.balance:
        raise InsufficientFundsError("the payer's balance does not cover its open payments and this one")
