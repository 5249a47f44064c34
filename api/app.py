"""FastAPI application: x402 intake, payment status, queue statistics, operator endpoints.

    POST /api/x402-batch-mint   {"token", "quantity", "recipient"?} + PAYMENT-SIGNATURE (v2) / X-PAYMENT (v1)
    GET  /api/payment/{id}      status, every tx hash, mint progress; PAYMENT-RESPONSE once final
    GET  /api/payment-stats     counts of all six statuses, queue depth, sent age, rates, percentiles
    PUT  /api/admin/settings/{key}, PUT /api/admin/products/{id}   (X-API-Key)

Every rejection is a 4xx with a stable `error` code (x402 invalidReason names where they exist) and
writes nothing; error bodies carry no stack trace and no secret."""

from __future__ import annotations

import hmac
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from eth_utils.address import to_checksum_address
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.hardening import MAX_BODY_BYTES, BodyLimitMiddleware, restore_recursion_limit
from api.x402 import (
    ERR_MALFORMED,
    ChainUnavailable,
    Offer,
    PaymentRejected,
    Verifier,
    as_v2,
    authorization_of,
    decode_payment,
    settlement_header,
)
from payments.config import require_env
from payments.db import fetch_all, make_engine, query, transaction
from payments.eip3009 import Authorization
from payments.errors import ConfigurationError, DuplicatePaymentError, InsufficientFundsError, InvalidPaymentError
from payments.intake import Exposure, MintItem, enqueue_payment, find_payment, same_request
from payments.settings import (
    REGISTRY,
    InvalidSettingError,
    format_value,
    read_values,
    stored_settings,
    write_setting,
)
from payments.statuses import PaymentStatus

restore_recursion_limit()  # after the imports above: py_ecc (through eth-account) raised it to 100,000

log = logging.getLogger("payments.api")
ADDRESS = r"^0x[0-9a-fA-F]{40}$"
DEFAULT_SIMULATION_FROM = "0x000000000000000000000000000000000000dEaD"  # any address: no key behind it
RETRY_AFTER_SECONDS = "5"
STATS_COUNT_CAP = 10_000  # open-status counts stop here; beyond it the monitor's sample has the figure


@dataclass
class ApiConfig:
    engine: Engine
    chain_id: int
    rpc_url: str
    simulation_from: str = DEFAULT_SIMULATION_FROM
    public_url: str = "http://127.0.0.1:8402"
    api_key: str | None = field(default=None, repr=False)
    token_name: str = "USD Coin"
    token_version: str = "2"
    max_timeout_seconds: int = 300

    @classmethod
    def from_env(cls) -> ApiConfig:
        """DATABASE_URL, RPC_URL, PUBLIC_URL, PAYMENTS_API_KEY and API_SIMULATION_FROM (the address
        verification simulates from; no key is read: the API holds none)."""
        from web3 import Web3

        from payments.chain import artifact

        rpc_url = require_env("RPC_URL")
        w3 = Web3(Web3.HTTPProvider(rpc_url))
        simulation_from = os.environ.get("API_SIMULATION_FROM", "").strip() or DEFAULT_SIMULATION_FROM
        if not re.fullmatch(ADDRESS, simulation_from):
            raise ConfigurationError("API_SIMULATION_FROM is not an address")
        engine = make_engine(require_env("DATABASE_URL"), pool_size=10, connect_timeout=5, pool_timeout=5,
                             statement_timeout_ms=5000)
        token_name = os.environ.get("PAYMENT_TOKEN_NAME")
        token_version = os.environ.get("PAYMENT_TOKEN_VERSION")
        if not token_name or not token_version:
            with engine.connect() as conn:
                row = conn.execute(query("any_payment_token")).first()
            if row is None:
                raise ConfigurationError("no active mint product: cannot tell the payment token's EIP-712 domain")
            token = w3.eth.contract(address=Web3.to_checksum_address(row[0]), abi=artifact("PaymentToken")["abi"])
            token_name = token_name or str(token.functions.name().call())
            token_version = token_version or str(token.functions.version().call())
        return cls(
            engine=engine, chain_id=int(w3.eth.chain_id), rpc_url=rpc_url, simulation_from=simulation_from,
            public_url=os.environ.get("PUBLIC_URL", "http://127.0.0.1:8402").rstrip("/"),
            api_key=os.environ.get("PAYMENTS_API_KEY") or None, token_name=token_name, token_version=token_version,
        )


class MintRequest(BaseModel):
    token: str = Field(pattern=r"^\s*[A-Za-z0-9_-]{1,64}\s*$", description="mint product id or mint token address")
    quantity: int = Field(ge=1, le=1_000_000)
    recipient: str | None = Field(default=None, pattern=ADDRESS)

    @field_validator("token")
    @classmethod
    def _token(cls, v: str) -> str:
        return v.strip()


class ProductIn(BaseModel):
    mint_token: str = Field(pattern=ADDRESS)
    payment_token: str = Field(pattern=ADDRESS)
    price_per_unit: int = Field(gt=0, lt=2**256)
    amount_per_unit: int = Field(gt=0, lt=2**256)
    pay_to: str = Field(pattern=ADDRESS)
    max_quantity: int = Field(default=1000, ge=1, le=1_000_000)
    active: bool = True


class WebhookIn(BaseModel):
    product_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    url: str = Field(pattern=r"^https?://[^\s\x00-\x1f]+$", max_length=2000)
    secret_ref: str = Field(pattern=r"^(env|block):[A-Za-z0-9_.-]+$",
                            description="where the signing secret lives: env:NAME or block:NAME (Prefect Secret)")
    active: bool = True


class SettingIn(BaseModel):
    value: str = Field(pattern=r"^[\x20-\x7e]{1,100}$")


def _conflict(existing_id: str) -> JSONResponse:
    return _error(409, "duplicate_authorization", "this authorization was already used for another request",
                  paymentId=existing_id)


def _error(status: int, error: str, message: str = "", headers: dict[str, str] | None = None,
           **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "message": message, **extra}, status_code=status, headers=headers)


def create_app(config: ApiConfig) -> FastAPI:
    restore_recursion_limit()
    # /docs and /redoc load Swagger UI and ReDoc from the installed fastapi-offline package, not a CDN
    app = FastAPIOffline(title="x402 payment pipeline", version="0.1.0")
    app.add_middleware(BodyLimitMiddleware, max_body=MAX_BODY_BYTES)
    verifier = Verifier(config.rpc_url, config.simulation_from)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({".".join(str(p) for p in e.get("loc", ()) if p != "body") for e in exc.errors()})
        return _error(422, "invalid_request", "invalid or missing fields: " + ", ".join(f for f in fields if f))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"error": "http_error", "message": str(exc.detail)}
        return JSONResponse(detail, status_code=exc.status_code)

    @app.exception_handler(ChainUnavailable)
    async def chain_down(request: Request, exc: ChainUnavailable) -> JSONResponse:
        log.warning("chain node unavailable on %s %s: %s", request.method, request.url.path, exc)
        return _error(503, "chain_unavailable", "the chain node is not answering; try again later",
                      headers={"Retry-After": RETRY_AFTER_SECONDS})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def database_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _error(503, "database_unavailable", "the payment database is not answering; try again later",
                      headers={"Retry-After": RETRY_AFTER_SECONDS})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "the request could not be processed")

    def require_api_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not config.api_key:
            raise HTTPException(403, {"error": "operator_api_disabled", "message": "PAYMENTS_API_KEY is not set"})
        # bytes, not str: compare_digest refuses non-ASCII text with a TypeError
        if not x_api_key or not hmac.compare_digest(x_api_key.encode("utf-8", "surrogatepass"),
                                                    config.api_key.encode("utf-8", "surrogatepass")):
            raise HTTPException(401, {"error": "unauthorized", "message": "a valid X-API-Key header is required"})

    def offer_for(body: MintRequest, request: Request) -> tuple[Offer, dict[str, Any]]:
        with config.engine.connect() as conn:
            rows = fetch_all(conn, "find_product", chain_id=config.chain_id, token=body.token)
        if not rows:
            raise HTTPException(404, {"error": "unknown_token", "message": f"no mint product {body.token!r}"})
        product = rows[0]
        if body.quantity > int(product["max_quantity"]):
            raise HTTPException(422, {"error": "quantity_too_large",
                                      "message": f"at most {product['max_quantity']} per payment"})
        offer = Offer(
            chain_id=config.chain_id, asset=to_checksum_address(product["payment_token"]),
            amount=int(product["price_per_unit"]) * body.quantity, pay_to=to_checksum_address(product["pay_to"]),
            resource_url=f"{config.public_url}/api/x402-batch-mint",
            description=f"mint {body.quantity} x {product['id']}", max_timeout_seconds=config.max_timeout_seconds,
            token_name=config.token_name, token_version=config.token_version,
        )
        return offer, product

    @app.post("/api/x402-batch-mint", status_code=202)
    def x402_batch_mint(
        body: MintRequest, request: Request,
        payment_signature: Annotated[str | None, Header(alias="PAYMENT-SIGNATURE")] = None,
        x_payment: Annotated[str | None, Header(alias="X-PAYMENT")] = None,
    ) -> Any:
        offer, product = offer_for(body, request)
        header = payment_signature or x_payment
        if not header:
            headers, challenge = offer.challenge("payment required")
            return JSONResponse(challenge, status_code=402, headers=headers)
        try:
            payload = decode_payment(header)
            _, version = as_v2(payload, offer)
            auth = authorization_of(payload)
        except PaymentRejected as rejected:
            return _rejection(offer, rejected.reason, rejected.message)
        recipient = body.recipient or auth.payer
        mint = MintItem(product["mint_token"], recipient, int(product["amount_per_unit"]) * body.quantity)
        # an authorization already known is answered from the queue, before verification: after settlement
        # the chain would call its nonce used, yet this is the same request again
        with config.engine.connect() as conn:
            existing = find_payment(conn, chain_id=config.chain_id, token=offer.asset, auth=auth)
        if existing is not None:
            return _known(existing, auth, mint)
        try:
            verifier.verify(payload, offer)
        except PaymentRejected as rejected:
            return _rejection(offer, rejected.reason, rejected.message)
        exposure = Exposure(balance=verifier.balance_of(offer.asset, auth.payer), max_open=max_open_payments())
        try:
            payment_id, created = enqueue_payment(config.engine, chain_id=config.chain_id, token=offer.asset,
                                                  auth=auth, mints=[mint], actor="api", x402_version=version,
                                                  exposure=exposure)
        except DuplicatePaymentError as dup:
            return _conflict(dup.existing_id)
        except InsufficientFundsError as poor:
            return _rejection(offer, poor.reason, poor.message)
        except InvalidPaymentError as bad:
            return _rejection(offer, ERR_MALFORMED, bad.message)
        if not created:  # the same request raced this one in: answer as for a replay
            with config.engine.connect() as conn:
                existing = find_payment(conn, chain_id=config.chain_id, token=offer.asset, auth=auth)
            if existing is not None:
                return _known(existing, auth, mint)
        return _accepted(payment_id, "pending", 202)

    def _accepted(payment_id: str, status: str, code: int) -> JSONResponse:
        return JSONResponse({"paymentId": payment_id, "status": status,
                             "statusUrl": f"{config.public_url}/api/payment/{payment_id}"}, status_code=code)

    def _known(existing: dict[str, Any], auth: Authorization, mint: MintItem) -> JSONResponse:
        if not same_request(existing, auth, [mint]):
            return _conflict(str(existing["id"]))
        return _accepted(str(existing["id"]), str(existing["status"]), 200)

    def max_open_payments() -> int:
        s = REGISTRY["max_open_payments_per_payer"]
        try:
            with config.engine.connect() as conn:
                return int(read_values(conn, "api")[s.name])
        except InvalidSettingError:  # stored around the registry: intake goes on with the default
            log.error("system_settings.%s is invalid; using the default %s", s.name, s.default)
            return int(s.default)

    @app.get("/api/payment/{payment_id}")
    def payment_status(payment_id: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]) -> Any:
        with config.engine.connect() as conn:
            rows = fetch_all(conn, "payment_status", id=payment_id)
            if not rows:
                raise HTTPException(404, {"error": "unknown_payment", "message": "no such payment"})
            row = rows[0]
            txs = fetch_all(conn, "payment_transactions_of", id=payment_id)
            mints = fetch_all(conn, "payment_mints", id=payment_id)
            version = int(conn.execute(query("payment_protocol_version"), {"id": payment_id}).scalar_one())
        status = PaymentStatus(row["status"])
        body = {
            "paymentId": row["id"], "status": status.value, "final": status.is_terminal,
            "failed": status.is_failure, "payer": row["payer"], "payTo": row["pay_to"], "asset": row["token"],
            "amount": str(row["amount"]), "transaction": row["tx_hash"], "blockNumber": row["block_number"],
            "error": row["error"],
            "transactions": [{"hash": t["tx_hash"], "nonce": t["nonce"], "kind": t["kind"],
                              "state": ("mined" if row["tx_hash"] == t["tx_hash"] and row["block_number"]
                                        else "broadcast" if t["broadcast_at"] else "signed"),
                              "broadcastCount": t["broadcast_count"]} for t in txs],
            "mints": [{"token": m["mint_token"], "recipient": m["recipient"], "amount": str(m["amount"]),
                       "status": m["status"], "transaction": m["tx_hash"]} for m in mints],
            "createdAt": _iso(row["created_at"]), "processedAt": _iso(row["processed_at"]),
            "sentAt": _iso(row["sent_at"]), "confirmedAt": _iso(row["confirmed_at"]),
        }
        headers = {}
        if status.is_terminal and row["tx_hash"]:
            name, value = settlement_header(version, success=status is PaymentStatus.COMPLETED,
                                            transaction=row["tx_hash"], chain_id=row["chain_id"], payer=row["payer"],
                                            error_reason=None if status is PaymentStatus.COMPLETED else status.value)
            headers[name] = value
        return JSONResponse(body, headers=headers)

    stats_cache: dict[str, Any] = {}

    @app.get("/api/payment-stats")
    def payment_stats() -> Any:
        """Cheap at any table size: the open part of the queue from bounded, indexed reads; what needs the
        whole table (terminal counts, confirmation rate, percentiles) from the monitor's latest sample
        (`sampledAt`, every monitor_interval_seconds). Answers are reused for one second."""
        now = time.monotonic()
        if stats_cache.get("until", 0.0) > now:
            return stats_cache["body"]
        with config.engine.connect() as conn:
            live = conn.execute(query("open_queue_figures"), {"cap": STATS_COUNT_CAP}).one()._mapping
            sample = conn.execute(query("latest_monitor_sample")).first()
        s = dict(sample._mapping) if sample is not None else {}
        sampled_counts: dict[str, Any] = s.get("counts") or {}
        counts: dict[str, int | None] = {}
        for status in PaymentStatus:
            if status.value in ("pending", "processing", "sent"):
                n = int(live[status.value])
                # a count that reached the cap: the monitor's full count is the better figure
                counts[status.value] = max(n, int(sampled_counts.get(status.value, 0))) if n >= STATS_COUNT_CAP else n
            else:
                value = sampled_counts.get(status.value)
                counts[status.value] = int(value) if value is not None else None
        oldest = live["oldest_sent_age"]
        body = {
            "counts": counts, "queueDepth": counts["pending"],
            "oldestSentAgeSeconds": round(float(oldest), 3) if oldest is not None else None,
            "sentAgeMeanSeconds": s.get("sent_age_mean"), "sentAgeP95Seconds": s.get("sent_age_p95"),
            "confirmationRate": s.get("confirmation_rate"), "confirmationRateWindowMinutes": s.get("window_minutes"),
            "processingTimeP50Seconds": s.get("processing_time_p50"),
            "processingTimeP95Seconds": s.get("processing_time_p95"),
            "sampledAt": _iso(s.get("at")),
        }
        stats_cache.update(until=now + 1.0, body=body)
        return body

    @app.get("/api/admin/settings", dependencies=[Depends(require_api_key)])
    def get_settings() -> Any:
        """Every setting the registry knows: type, range, default, description and the stored value."""
        with config.engine.connect() as conn:
            stored = stored_settings(conn)
        return {"settings": [{**s.describe(), "value": stored.get(s.name)} for s in REGISTRY.values()]}

    @app.put("/api/admin/settings/{key}", dependencies=[Depends(require_api_key)])
    def put_setting(key: Annotated[str, Path(pattern=r"^[a-z][a-z0-9_]{0,62}$")], body: SettingIn) -> Any:
        try:
            with config.engine.begin() as conn:
                value = write_setting(conn, key, body.value)
        except InvalidSettingError as bad:
            if bad.setting is None:
                raise HTTPException(404, {"error": "unknown_setting", "setting": key,
                                          "message": f"there is no setting named {key}"}) from None
            s = bad.setting
            raise HTTPException(422, {"error": "invalid_setting", "setting": key, "type": s.type_name,
                                      "min": s.low, "max": s.high,
                                      "message": f"{key} must be {s.range_text}"}) from None
        return {"key": key, "value": format_value(value)}

    @app.put("/api/admin/products/{product_id}", dependencies=[Depends(require_api_key)])
    def put_product(product_id: Annotated[str, Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")],
                    body: ProductIn) -> Any:
        try:
            with transaction(config.engine, "api-admin") as conn:
                conn.execute(query("upsert_product"), {
                    "id": product_id, "chain_id": config.chain_id, "mint_token": body.mint_token.lower(),
                    "payment_token": body.payment_token.lower(), "price_per_unit": body.price_per_unit,
                    "amount_per_unit": body.amount_per_unit, "pay_to": body.pay_to.lower(),
                    "max_quantity": body.max_quantity, "active": body.active})
        except IntegrityError:  # UNIQUE (chain_id, mint_token): one product per mint token
            raise HTTPException(409, {"error": "mint_token_in_use",
                                      "message": "another product already sells this mint token"}) from None
        return {"id": product_id, **body.model_dump(), "price_per_unit": str(body.price_per_unit),
                "amount_per_unit": str(body.amount_per_unit)}

    @app.put("/api/admin/webhooks", dependencies=[Depends(require_api_key)])
    def put_webhook(body: WebhookIn) -> Any:
        try:
            with transaction(config.engine, "api-admin") as conn:
                endpoint_id = conn.execute(query("upsert_webhook_endpoint"), body.model_dump()).scalar_one()
        except IntegrityError:
            raise HTTPException(404, {"error": "unknown_product", "message": "no such mint product"}) from None
        return {"id": endpoint_id, **body.model_dump()}

    return app


def _rejection(offer: Offer, reason: str, message: str = "") -> JSONResponse:
    """A refused payment: 400 when the payment header is malformed (a client bug), 402 when it is well
    formed but not acceptable. Both carry the requirements, so a client can pay again."""
    headers, challenge = offer.challenge(reason)
    return JSONResponse({**challenge, "error": reason, "message": message},
                        status_code=400 if reason == ERR_MALFORMED else 402, headers=headers)


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()
