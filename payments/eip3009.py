"""EIP-3009 `TransferWithAuthorization` typed data: signing (the buyer's side) and recovery, and the shape
of a signature the intake accepts."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

AUTHORIZATION_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}

# An EOA signs 65 bytes (r, s, v). A contract wallet's ERC-1271 signature is whatever the wallet checks:
# several owners' signatures, WebAuthn data, an ERC-6492 wrapper - longer, rarely beyond a kilobyte. The
# queue's CHECK constraint (sql/migrations/016) holds the same bounds.
MIN_SIGNATURE_BYTES = 65
MAX_SIGNATURE_BYTES = 2048
_SIGNATURE_HEX = re.compile(r"0x(?:[0-9a-fA-F]{2})+")


def is_signature_hex(value: object) -> bool:
    """Whether `value` is 0x-prefixed hex of MIN_SIGNATURE_BYTES..MAX_SIGNATURE_BYTES bytes. Only the
    shape: the x402 verifier checks the signature (ECDSA for an address without code, ERC-1271 for one
    with code)."""
    return (isinstance(value, str) and 2 + 2 * MIN_SIGNATURE_BYTES <= len(value) <= 2 + 2 * MAX_SIGNATURE_BYTES
            and _SIGNATURE_HEX.fullmatch(value) is not None)


@dataclass(frozen=True)
class TokenDomain:
    name: str
    version: str
    chain_id: int
    verifying_contract: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }


@dataclass(frozen=True)
class Authorization:
    """The x402 `payload.authorization` fields plus the buyer's signature."""

    payer: str
    pay_to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: str
    signature: str

    def as_x402(self) -> dict[str, str]:
        return {
            "from": self.payer,
            "to": self.pay_to,
            "value": str(self.value),
            "validAfter": str(self.valid_after),
            "validBefore": str(self.valid_before),
            "nonce": self.nonce,
        }


def _message(payer: str, pay_to: str, value: int, valid_after: int, valid_before: int, nonce: str) -> dict[str, Any]:
    return {
        "from": payer,
        "to": pay_to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before,
        "nonce": bytes.fromhex(nonce.removeprefix("0x")),
    }


def sign_authorization(
    buyer_key: Any,
    domain: TokenDomain,
    *,
    pay_to: str,
    value: int,
    valid_after: int,
    valid_before: int,
    nonce: str | None = None,
) -> Authorization:
    account = Account.from_key(buyer_key)
    nonce = nonce or "0x" + secrets.token_hex(32)
    message = _message(account.address, pay_to, value, valid_after, valid_before, nonce)
    signed = Account.sign_typed_data(buyer_key, domain.as_dict(), AUTHORIZATION_TYPES, message)
    return Authorization(
        payer=account.address,
        pay_to=pay_to,
        value=value,
        valid_after=valid_after,
        valid_before=valid_before,
        nonce=nonce,
        signature="0x" + bytes(signed.signature).hex(),
    )


def recover_payer(domain: TokenDomain, auth: Authorization) -> str:
    """The EOA that signed `auth` under `domain` (compare with auth.payer); a 65-byte ECDSA signature only
    (a contract wallet's signature is checked by the wallet, ERC-1271)."""
    message = _message(auth.payer, auth.pay_to, auth.value, auth.valid_after, auth.valid_before, auth.nonce)
    signable = encode_typed_data(domain.as_dict(), AUTHORIZATION_TYPES, message)
    return str(Account.recover_message(signable, signature=bytes.fromhex(auth.signature.removeprefix("0x"))))
