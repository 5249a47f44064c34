"""Queueing a payment: the payment row and the mint rows it pays for, in one transaction.

Idempotent: the same authorization (chain, token, payer, nonce) again returns the existing payment id;
the same authorization with different content raises DuplicatePaymentError and writes nothing."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from sqlalchemy import Engine

from payments.db import fetch_all, query, transaction
from payments.eip3009 import Authorization
from payments.errors import DuplicatePaymentError, InvalidPaymentError

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_SIGNATURE = re.compile(r"^0x[0-9a-fA-F]{130}$")
UINT256_MAX = 2**256 - 1


@dataclass(frozen=True)
class MintItem:
    mint_token: str
    recipient: str
    amount: int


def new_payment_id() -> str:
    return "pay_" + uuid.uuid4().hex


def _address(value: str, what: str) -> str:
    if not isinstance(value, str) or not _ADDRESS.match(value):
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
    if not _BYTES32.match(auth.nonce):
        raise InvalidPaymentError("invalid_payload", "authorization.nonce is not 32 bytes of hex")
    if not _SIGNATURE.match(auth.signature):
        raise InvalidPaymentError("invalid_payload", "signature is not 65 bytes of hex")
    for m in mints:
        _address(m.mint_token, "mint token")
        _address(m.recipient, "mint recipient")
        _uint(m.amount, "mint amount", positive=True)


def enqueue_payment(
    engine: Engine, *, chain_id: int, token: str, auth: Authorization, mints: list[MintItem],
    payment_id: str | None = None, actor: str = "intake", x402_version: int = 2,
) -> tuple[str, bool]:
    """Queue a payment; returns (payment id, created). Raises InvalidPaymentError or
    DuplicatePaymentError without writing anything."""
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
        (existing,) = fetch_all(conn, "find_payment_by_authorization", chain_id=chain_id, token=token,
                                payer=params["payer"], auth_nonce=params["auth_nonce"])
    same = (existing["pay_to"] == params["pay_to"] and int(existing["amount"]) == auth.value
            and int(existing["valid_after"]) == auth.valid_after and int(existing["valid_before"]) == auth.valid_before
            and existing["signature"] == params["signature"])
    if not same:
        raise DuplicatePaymentError(existing["id"])
    return str(existing["id"]), False
