"""`python -m api.buyer`: a buyer's whole round trip with the official x402 client: request a mint, read
the 402 requirements, sign the EIP-3009 authorization, retry with the payment header, then poll the
payment's status until it is final and what it bought is minted. Exits 0 when completed, 1 on failed /
confirmation_failed or time out, 2 when the API refuses the request or the payment.

The buyer's key comes from the environment variable named by --key-env (default BUYER_PRIVATE_KEY),
never from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import requests
from eth_account import Account
from x402 import x402ClientSync
from x402.http.clients import x402_requests
from x402.mechanisms.evm.exact.register import register_exact_evm_client


class PurchaseRefused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def paying_session(buyer_key: str) -> requests.Session:
    """A requests session that answers 402 challenges by signing with the buyer's key."""
    client = register_exact_evm_client(x402ClientSync(), Account.from_key(buyer_key))
    client.set_spend_controls(False)  # the asset is the deployment's own token, not a listed default
    session: requests.Session = x402_requests(client)
    return session


def submit(session: requests.Session, api_url: str, token: str, quantity: int, recipient: str | None = None,
           timeout: float = 30) -> dict[str, Any]:
    body: dict[str, Any] = {"token": token, "quantity": quantity}
    if recipient:
        body["recipient"] = recipient
    response = session.post(f"{api_url.rstrip('/')}/api/x402-batch-mint", json=body, timeout=timeout)
    if response.status_code not in (200, 202):
        try:
            detail: Any = response.json()
        except ValueError:
            detail = response.text[:500]
        raise PurchaseRefused(response.status_code, detail)
    return dict(response.json())


def settled(status: dict[str, Any]) -> bool:
    """The payment is final and, if it completed, what it bought is minted (or failed to mint)."""
    if not status.get("final"):
        return False
    return status.get("status") != "completed" or all(m["status"] in ("minted", "failed")
                                                       for m in status.get("mints", []))


def wait_final(session: requests.Session, status_url: str, timeout: float, poll: float = 1.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = dict(session.get(status_url, timeout=30).json())
        if settled(status) or time.monotonic() > deadline:
            return status
        time.sleep(poll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("API_URL", "http://127.0.0.1:8402"))
    parser.add_argument("--token", default="demo-mint", help="mint product id or mint token address")
    parser.add_argument("--quantity", type=int, default=1)
    parser.add_argument("--recipient", help="who receives the mint (default: the payer)")
    parser.add_argument("--key-env", default="BUYER_PRIVATE_KEY", help="environment variable holding the key")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    key = os.environ.get(args.key_env, "").strip()
    if not key:
        parser.error(f"set {args.key_env} to the buyer's private key")
    session = paying_session(key)
    try:
        accepted = submit(session, args.url, args.token, args.quantity, args.recipient)
    except PurchaseRefused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        sys.exit(2)
    print(f"paid: payment {accepted['paymentId']} queued; polling {accepted['statusUrl']}")
    status = wait_final(session, accepted["statusUrl"], args.timeout)
    mints = ", ".join(f"{m['amount']} to {m['recipient']} ({m['status']})" for m in status.get("mints", []))
    print(f"status: {status['status']}  transaction: {status.get('transaction')}  mints: {mints or '-'}")
    if status.get("error"):
        print(f"error: {status['error']}")
    sys.exit(0 if status["status"] == "completed" else 1)


if __name__ == "__main__":
    main()
