"""`make up`: the whole local stack in the foreground - embedded PostgreSQL, anvil, the Prefect server
and UI, the deployments on the `payments` work pool with a worker, the API and an alert receiver - until
Ctrl-C, which stops everything. A worker that dies is started again (with backoff) while the stack is up.

Kept between starts: the chain (anvil --state in .data/chain/), its contracts and demo buyers, the
payments database and the Prefect database (run history, schedules, automations). `make up RESET=1`
(`--reset`) starts all of them afresh. `make demo` and `make drill` always use fresh chains and databases
of their own.

Buy with the printed command: each demo buyer's key is in .data/buyer-N.key (mode 600, local throwaway
keys)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import threading

import psycopg

from payments.localstack import DATA_DIR, start_embedded_postgres
from payments.stack import PRODUCT_ID, local_stack


def reset() -> None:
    """Forget the kept chain, the payments database and the Prefect database."""
    shutil.rmtree(DATA_DIR / "chain", ignore_errors=True)
    if not os.environ.get("DATABASE_URL"):
        with psycopg.connect(start_embedded_postgres(DATA_DIR / "pg"), autocommit=True) as conn:
            for name in ("payments_local", "prefect"):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reset", action="store_true", help="start the chain and both databases afresh")
    args = parser.parse_args()
    if args.reset:
        reset()
        print("• reset: fresh chain, payments database and Prefect database", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with local_stack(database="payments_local", buyers=5, api_port=int(os.environ.get("PORT", "0")) or None,
                     keep=True) as s:
        for i, b in enumerate(s.deployment.buyers):
            key_file = DATA_DIR / f"buyer-{i}.key"
            key_file.write_text("0x" + bytes(b.key).hex())
            key_file.chmod(0o600)
        (DATA_DIR / "api-key").write_text(s.api_key)
        (DATA_DIR / "api-key").chmod(0o600)
        print(f"""
The local stack is up (Ctrl-C stops everything):
  API             {s.api_url}   (OpenAPI: {s.api_url}/docs)
  Prefect UI      {s.prefect.ui_url}
  dashboard       {s.prefect.ui_url}/artifacts/key/payment-queue-summary
  work pool       {s.prefect.ui_url}/work-pools/work-pool/payments
  chain (anvil)   {s.rpc_url}   chain id {s.deployment.chain_id}
  payment token   {s.deployment.payment_token}   (USD Coin, 6 decimals)
  mint product    {PRODUCT_ID} -> {s.deployment.mint_token}
  merchant        {s.deployment.merchant}
  alert receiver  {s.receiver.url if s.receiver else os.environ.get('ALERT_WEBHOOK_URL', '-')}
  operator key    .data/api-key (X-API-Key for /api/admin/*)
Kept for the next `make up`: the chain (.data/chain/), the payments and Prefect databases (.data/pg/);
`make up RESET=1` starts afresh.
Funded demo buyers (1,000,000 USDC each at the start); buy with:""")
        for i, b in enumerate(s.deployment.buyers):
            print(f"  BUYER_PRIVATE_KEY=$(cat .data/buyer-{i}.key) .venv/bin/python -m api.buyer "
                  f"--url {s.api_url} --quantity 2    # {b.address}")
        print(flush=True)
        try:
            while not stop.wait(1):
                if s.api.poll() is not None:  # the worker is restarted by the stack when it dies
                    print("the API exited; see .data/api.log")
                    break
        except KeyboardInterrupt:
            pass
        print("stopping…", flush=True)


if __name__ == "__main__":
    main()
