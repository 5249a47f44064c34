"""Shared test helpers: signed payments, queue inspection."""

from __future__ import annotations

import secrets
import time
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from sqlalchemy import Engine, text

from payments.eip3009 import AUTHORIZATION_TYPES, Authorization, TokenDomain, sign_authorization
from payments.intake import MintItem, enqueue_payment
from payments.localstack import (
    PAYMENT_TOKEN_NAME,
    PAYMENT_TOKEN_VERSION,
    Deployment,
    deploy,
    queue_signed_payments,
    send_and_wait,
)

PRICE = 1_000_000


def domain(dep: Deployment) -> TokenDomain:
    return TokenDomain(PAYMENT_TOKEN_NAME, PAYMENT_TOKEN_VERSION, dep.chain_id, dep.payment_token)


def authorize(dep: Deployment, buyer: LocalAccount, *, value: int = PRICE, valid_after: int = 0,
              valid_before: int | None = None, nonce: str | None = None, pay_to: str | None = None) -> Authorization:
    return sign_authorization(buyer.key, domain(dep), pay_to=pay_to or dep.merchant, value=value,
                              valid_after=valid_after, valid_before=valid_before or int(time.time()) + 3600,
                              nonce=nonce)


def by_address(owners: list[LocalAccount]) -> list[LocalAccount]:
    return sorted(owners, key=lambda o: int(o.address, 16))


def deploy_wallet(dep: Deployment, owners: list[LocalAccount], threshold: int = 1, *, funds: int = 0) -> str:
    """A TestSmartWallet (test fixture: ERC-1271 by `threshold` of its owners' ECDSA signatures) holding
    `funds` payment tokens."""
    w3 = dep.w3()
    wallet = deploy(w3, dep.deployer, "test/TestSmartWallet", [o.address for o in owners], threshold)
    if funds:
        send_and_wait(w3, dep.deployer, dep.payment_contract().functions.mint(wallet, funds))
    return w3.to_checksum_address(wallet)


def wallet_authorize(dep: Deployment, wallet: str, signers: list[LocalAccount], *, value: int = PRICE,
                     valid_after: int = 0, valid_before: int | None = None, nonce: str | None = None,
                     pay_to: str | None = None) -> Authorization:
    """An authorization from the contract wallet `wallet`: its signature is what the wallet's ERC-1271
    check expects, each signer's 65-byte ECDSA signature of the token's EIP-712 digest, in this order."""
    nonce = nonce or "0x" + secrets.token_hex(32)
    valid_before = valid_before or int(time.time()) + 3600
    pay_to = pay_to or dep.merchant
    message = {"from": wallet, "to": pay_to, "value": value, "validAfter": valid_after, "validBefore": valid_before,
               "nonce": bytes.fromhex(nonce.removeprefix("0x"))}
    signature = b"".join(bytes(Account.sign_typed_data(s.key, domain(dep).as_dict(), AUTHORIZATION_TYPES,
                                                       message).signature) for s in signers)
    return Authorization(payer=wallet, pay_to=pay_to, value=value, valid_after=valid_after,
                         valid_before=valid_before, nonce=nonce, signature="0x" + signature.hex())


def queue(engine: Engine, dep: Deployment, auth: Authorization, recipient: str | None = None) -> str:
    pid, _ = enqueue_payment(engine, chain_id=dep.chain_id, token=dep.payment_token, auth=auth,
                             mints=[MintItem(dep.mint_token, recipient or auth.payer, 10**18)])
    return pid


def queue_many(engine: Engine, dep: Deployment, n: int) -> list[str]:
    return queue_signed_payments(engine, dep, n, price=PRICE, actor="test")


def statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(s): int(n) for s, n in conn.execute(text("SELECT status, count(*) FROM payment_queue GROUP BY 1"))}


def payment(engine: Engine, pid: str) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT * FROM payment_queue WHERE id = :id"), {"id": pid}).one()._mapping)


def mint_statuses(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {str(s): int(n) for s, n in conn.execute(text("SELECT status, count(*) FROM mint_queue GROUP BY 1"))}


def balance(dep: Deployment, who: str) -> int:
    return int(dep.payment_contract().functions.balanceOf(dep.w3().to_checksum_address(who)).call())


def chain_time(dep: Deployment) -> int:
    """The latest block's timestamp: what `validBefore` is checked against (anvil's clock can lag or lead
    wall time after snapshots and evm_increaseTime)."""
    return int(dep.w3().eth.get_block("latest")["timestamp"])


def claim_checks(conn: Any, ids: list[str], owner: str) -> None:
    """Take the confirm claim of these payments, as a confirm pass does before it writes an outcome."""
    conn.execute(text("UPDATE payment_queue SET check_owner = :o, check_expires_at = now() + interval '1 minute' "
                      "WHERE id = ANY(:ids)"), {"o": owner, "ids": ids})


def force_confirmation_failed(engine: Engine, ids: list[str], reason: str = "test") -> None:
    """Put `sent` payments into confirmation_failed (mint rows cancelled) through the pipeline's statement."""
    from payments.db import fetch_all, transaction

    with transaction(engine, "test") as conn:
        claim_checks(conn, ids, "test")
        fetch_all(conn, "fail_confirmation", ids=ids, errors=[reason] * len(ids), blocks=[None] * len(ids),
                  owner="test")
