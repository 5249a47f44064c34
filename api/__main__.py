"""`python -m api`: serve the HTTP API with uvicorn (HOST / PORT, default 127.0.0.1:8402), configured
from the environment (DATABASE_URL, RPC_URL, PUBLIC_URL, PAYMENTS_API_KEY, API_SIMULATION_FROM).
API_WORKERS (default 1) runs that many uvicorn worker processes on the one port, each with its own
database pool and RPC client; everything they share lives in PostgreSQL (the per-payer exposure check
takes an advisory lock), so they need no coordination. API_MAX_CONCURRENCY is per worker.

The API holds no private key: it verifies with an address-only identity. Key variables a launcher
passed along anyway (one shared environment for every process) are dropped before anything runs."""

from __future__ import annotations

import os
from typing import Any

import uvicorn
from fastapi import FastAPI

from api.app import ApiConfig, create_app

KEY_VARIABLES = ("SIGNER_PRIVATE_KEYS", "MINTER_PRIVATE_KEY", "BUYER_PRIVATE_KEY")


def app_from_env() -> FastAPI:
    """The app of one worker process (uvicorn's factory)."""
    for name in KEY_VARIABLES:
        os.environ.pop(name, None)
    return create_app(ApiConfig.from_env())


def main() -> None:
    for name in KEY_VARIABLES:
        os.environ.pop(name, None)
    workers = max(1, int(os.environ.get("API_WORKERS", "1")))
    options: dict[str, Any] = dict(
        host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8402")),
        log_level=os.environ.get("LOG_LEVEL", "warning"), server_header=False, timeout_keep_alive=5,
        limit_concurrency=int(os.environ.get("API_MAX_CONCURRENCY", "200")))
    if workers == 1:
        uvicorn.run(app_from_env(), **options)
    else:  # worker processes import the factory; a bad configuration fails each of them the same way
        ApiConfig.from_env()
        uvicorn.run("api.__main__:app_from_env", factory=True, workers=workers, **options)


if __name__ == "__main__":
    main()
