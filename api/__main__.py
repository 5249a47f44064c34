"""`python -m api`: serve the HTTP API with uvicorn (HOST / PORT, default 127.0.0.1:8402), configured
from the environment (DATABASE_URL, RPC_URL, SIGNER_PRIVATE_KEYS or SIGNER_KEY_SECRET_BLOCKS,
PUBLIC_URL, PAYMENTS_API_KEY)."""

from __future__ import annotations

import os

import uvicorn

from api.app import ApiConfig, create_app


def main() -> None:
    app = create_app(ApiConfig.from_env())
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8402")),
                log_level=os.environ.get("LOG_LEVEL", "warning"), server_header=False)


if __name__ == "__main__":
    main()
