"""`make up`: the whole local stack in the foreground - embedded PostgreSQL, anvil, the Prefect server
and UI, the served deployments, the API and an alert receiver - until Ctrl-C, which stops everything.
A serve process that dies is started again (with backoff) while the stack is up.

The funded demo buyers' keys are written to .data/buyers.json (mode 600, local throwaway keys); buy
with the command-line client, e.g.:
    BUYER_PRIVATE_KEY=$(python -c 'import json;print(json.load(open(".data/buyers.json"))[0]["key"])') \\
        .venv/bin/python -m api.buyer --url <API URL> --quantity 2"""

from __future__ import annotations

import json
import os
import signal
import threading

from payments.localstack import DATA_DIR
from payments.stack import PRODUCT_ID, local_stack, trigger_deployments


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with local_stack(database="payments_local", buyers=5, api_port=int(os.environ.get("PORT", "0")) or None) as s:
        trigger_deployments(s, ["send-payments/send", "confirm-payments/confirm", "mint-tokens/mint"])
        buyers_file = DATA_DIR / "buyers.json"
        buyers_file.write_text(json.dumps([{"address": b.address, "key": "0x" + bytes(b.key).hex()}
                                           for b in s.deployment.buyers], indent=2))
        buyers_file.chmod(0o600)
        (DATA_DIR / "api-key").write_text(s.api_key)
        (DATA_DIR / "api-key").chmod(0o600)
        print(f"""
The local stack is up (Ctrl-C stops everything):
  API             {s.api_url}   (OpenAPI: {s.api_url}/docs)
  Prefect UI      {s.prefect.ui_url}
  chain (anvil)   {s.rpc_url}   chain id {s.deployment.chain_id}
  payment token   {s.deployment.payment_token}   (USD Coin, 6 decimals)
  mint product    {PRODUCT_ID} -> {s.deployment.mint_token}
  merchant        {s.deployment.merchant}
  alert receiver  {s.receiver.url if s.receiver else os.environ.get('ALERT_WEBHOOK_URL', '-')}
  operator key    .data/api-key (X-API-Key for /api/admin/*)
Funded demo buyers (1,000,000 USDC each; keys in .data/buyers.json):""")
        for b in s.deployment.buyers:
            print(f"  {b.address}")
        print(f"\nBuy:  BUYER_PRIVATE_KEY=<key> .venv/bin/python -m api.buyer --url {s.api_url} --quantity 2",
              flush=True)
        try:
            while not stop.wait(1):
                if s.api.poll() is not None:  # the serve process is restarted by the stack when it dies
                    print("the API exited; see .data/api.log")
                    break
        except KeyboardInterrupt:
            pass
        print("stopping…", flush=True)


if __name__ == "__main__":
    main()
