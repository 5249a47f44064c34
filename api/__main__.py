"""`python -m api`: serve the HTTP API with uvicorn (HOST / PORT, default 127.0.0.1:8402), configured
from the environment (DATABASE_URL, RPC_URL, PUBLIC_URL, PAYMENTS_API_KEY, API_SIMULATION_FROM).

The API holds no private key: it verifies with an address-only identity. Key variables a launcher
passed along anyway (one shared environment for every process) are dropped before anything runs."""

from __future__ import annotations

import os

import uvicorn

from api.app import ApiConfig, create_app

KEY_VARIABLES = ("SIGNER_PRIVATE_KEYS", "MINTER_PRIVATE_KEY", "BUYER_PRIVATE_KEY")


def main() -> None:
    for name in KEY_VARIABLES:
        os.environ.pop(name, None)
    app = create_app(ApiConfig.from_env())
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8402")),
                log_level=os.environ.get("LOG_LEVEL", "warning"), server_header=False,
                timeout_keep_alive=5, limit_concurrency=int(os.environ.get("API_MAX_CONCURRENCY", "200")))


if __name__ == "__main__":
    main()
