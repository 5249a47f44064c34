"""Where the pipeline's infrastructure is: taken from the environment (12-factor).

- DATABASE_URL: PostgreSQL (``postgresql://…``; the psycopg 3 driver is used).
- RPC_URL: the chain's JSON-RPC endpoint.
- SIGNER_PRIVATE_KEYS: comma-separated hot-wallet keys (one nonce lane each), or
- SIGNER_KEY_SECRET_BLOCKS: comma-separated names of Prefect Secret blocks holding them.
Keys are only ever held in memory; they are never logged or written to a table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from payments.errors import ConfigurationError

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"
CONTRACTS_BUILD_DIR = REPO_ROOT / "contracts" / "build"


def require_env(name: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigurationError(f"environment variable {name} is not set")
    return value


@dataclass(frozen=True)
class Signer:
    """A hot wallet. repr() never shows the key."""

    account: LocalAccount = field(repr=False)

    @property
    def address(self) -> str:
        return str(self.account.address).lower()

    def __repr__(self) -> str:
        return f"Signer({self.address})"


def signer_from_key(key: str) -> Signer:
    try:
        return Signer(Account.from_key(key.strip()))
    except Exception as exc:  # the key itself must never reach a message
        raise ConfigurationError("a signer private key is malformed") from exc


def _keys_from_secret_blocks(names: list[str]) -> list[str]:
    from prefect.blocks.system import Secret

    return [str(Secret.load(name).get()) for name in names]  # type: ignore[union-attr]


def minter_configured() -> bool:
    return any(os.environ.get(name, "").strip() for name in ("MINTER_PRIVATE_KEY", "MINTER_KEY_SECRET_BLOCK"))


def load_minter() -> Signer:
    """The wallet that mints what was bought: MINTER_PRIVATE_KEY or the Prefect Secret block named in
    MINTER_KEY_SECRET_BLOCK. It should hold the mint token's minter role and nothing else."""
    key = os.environ.get("MINTER_PRIVATE_KEY", "").strip()
    block = os.environ.get("MINTER_KEY_SECRET_BLOCK", "").strip()
    if not key and block:
        key = _keys_from_secret_blocks([block])[0]
    if not key:
        raise ConfigurationError("no minter configured: set MINTER_PRIVATE_KEY or MINTER_KEY_SECRET_BLOCK")
    return signer_from_key(key)


def load_signers() -> list[Signer]:
    """Hot wallets from SIGNER_PRIVATE_KEYS, else from the Prefect Secret blocks named in
    SIGNER_KEY_SECRET_BLOCKS."""
    raw = os.environ.get("SIGNER_PRIVATE_KEYS", "").strip()
    keys: list[str] = [k for k in raw.split(",") if k.strip()] if raw else []
    blocks = [b.strip() for b in os.environ.get("SIGNER_KEY_SECRET_BLOCKS", "").split(",") if b.strip()]
    if not keys and blocks:
        keys = _keys_from_secret_blocks(blocks)
    if not keys:
        raise ConfigurationError("no signer configured: set SIGNER_PRIVATE_KEYS or SIGNER_KEY_SECRET_BLOCKS")
    signers = [signer_from_key(k) for k in keys]
    if len({s.address for s in signers}) != len(signers):
        raise ConfigurationError("the same signer key is configured twice")
    return signers
