"""x402 protocol glue (scheme `exact` on EVM), built on the official `x402` package: its schemas and
header codecs for the wire format, and its facilitator-side `ExactEvmScheme.verify` for the checks a
facilitator makes (scheme/network, recipient, exact amount, validity window, EIP-712 signature,
authorization nonce unused, balance by simulation). Settlement is NOT done here: verified payments are
queued and settled by the pipeline, which is the point of the queue."""

from __future__ import annotations

import base64
import re
import threading
from dataclasses import dataclass
from typing import Any

from eth_utils.address import to_checksum_address
from web3 import HTTPProvider, Web3
from web3.middleware import ExtraDataToPOAMiddleware
from web3.types import RPCEndpoint, RPCResponse
from x402.http.utils import (
    decode_payment_signature_header,
    encode_payment_required_header,
    encode_payment_response_header,
)
from x402.mechanisms.evm.exact.facilitator import ExactEvmScheme
from x402.mechanisms.evm.signers import FacilitatorWeb3Signer
from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
from x402.schemas import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse
from x402.schemas.v1 import PaymentPayloadV1, PaymentRequiredV1, PaymentRequirementsV1

from api.hardening import MAX_JSON_DEPTH, json_depth
from payments.eip3009 import MAX_SIGNATURE_BYTES, MIN_SIGNATURE_BYTES, Authorization, is_signature_hex

SCHEME = "exact"
ERR_MALFORMED = "invalid_payload"
ERR_UNSUPPORTED_SCHEME = "unsupported_scheme"
ERR_NETWORK_MISMATCH = "invalid_network"
RATE_LIMITED = -32005  # JSON-RPC "limit exceeded"
_BALANCE_OF_ABI = [{"type": "function", "name": "balanceOf", "stateMutability": "view",
                    "inputs": [{"name": "owner", "type": "address"}], "outputs": [{"name": "", "type": "uint256"}]}]


def v1_network_name(chain_id: int) -> str | None:
    """The v1 name of a chain (v1 only knows named public networks)."""
    return next((name for name, cid in V1_NETWORK_CHAIN_IDS.items() if cid == chain_id), None)


@dataclass(frozen=True)
class Offer:
    """What one request costs: the x402 payment requirements of a product and quantity."""

    chain_id: int
    asset: str
    amount: int
    pay_to: str
    resource_url: str
    description: str
    max_timeout_seconds: int
    token_name: str
    token_version: str

    @property
    def network(self) -> str:
        return f"eip155:{self.chain_id}"

    def requirements(self) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=SCHEME, network=self.network, asset=self.asset, amount=str(self.amount), pay_to=self.pay_to,
            max_timeout_seconds=self.max_timeout_seconds,
            extra={"name": self.token_name, "version": self.token_version},
        )

    def payment_required(self, error: str | None) -> PaymentRequired:
        return PaymentRequired(
            x402_version=2, error=error, accepts=[self.requirements()],
            resource=ResourceInfo(url=self.resource_url, description=self.description,
                                  mime_type="application/json"),
        )

    def payment_required_v1(self, error: str | None) -> PaymentRequiredV1 | None:
        name = v1_network_name(self.chain_id)
        if name is None:
            return None
        return PaymentRequiredV1(
            x402_version=1, error=error,
            accepts=[PaymentRequirementsV1(
                scheme=SCHEME, network=name, max_amount_required=str(self.amount), resource=self.resource_url,
                description=self.description, mime_type="application/json", pay_to=self.pay_to,
                max_timeout_seconds=self.max_timeout_seconds, asset=self.asset,
                extra={"name": self.token_name, "version": self.token_version})],
        )

    def challenge(self, error: str | None) -> tuple[dict[str, str], dict[str, Any]]:
        """402 headers (v2: PAYMENT-REQUIRED) and body (v1 requirements where the chain has a v1 name,
        else the v2 object)."""
        v2 = self.payment_required(error)
        headers = {"PAYMENT-REQUIRED": encode_payment_required_header(v2)}
        v1 = self.payment_required_v1(error)
        body = (v1 or v2).model_dump(by_alias=True, exclude_none=True)
        return headers, body


class PaymentRejected(Exception):
    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class VerifiedPayment:
    version: int
    authorization: Authorization


def decode_payment(header_value: str) -> PaymentPayload | PaymentPayloadV1:
    try:
        raw = base64.b64decode(header_value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raw = b""  # not plain base64: the x402 decoder decides
    if json_depth(raw) > MAX_JSON_DEPTH:  # measured before anything parses it
        raise PaymentRejected(ERR_MALFORMED, f"the payment payload may nest at most {MAX_JSON_DEPTH} levels")
    try:
        return decode_payment_signature_header(header_value)
    except Exception:
        raise PaymentRejected(ERR_MALFORMED, "payment header is not base64 of an x402 PaymentPayload") from None


_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_UINT = re.compile(r"^[0-9]{1,78}$")


def _uint256(value: Any, what: str) -> int:
    """A uint256 given as a decimal string (x402's form) or a JSON integer; never a float, bool, NaN or
    Infinity, and never anything that could overflow later."""
    if isinstance(value, str) and _UINT.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise PaymentRejected(ERR_MALFORMED, f"authorization.{what} is not a uint256")
    if not 0 <= number < 2**256:
        raise PaymentRejected(ERR_MALFORMED, f"authorization.{what} is not a uint256")
    return number


def _text(value: Any, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise PaymentRejected(ERR_MALFORMED, f"{what} is malformed")
    return value


def _authorization(payload: Any) -> Authorization:
    """The EIP-3009 authorization of a payload, every field checked for shape and range before anything
    else (the x402 verifier included) looks at it."""
    auth = payload.get("authorization") if isinstance(payload, dict) else None
    if not isinstance(auth, dict):
        raise PaymentRejected(ERR_MALFORMED, "payload.authorization is missing")
    return Authorization(
        payer=_text(auth.get("from"), _ADDRESS, "authorization.from"),
        pay_to=_text(auth.get("to"), _ADDRESS, "authorization.to"),
        value=_uint256(auth.get("value"), "value"),
        valid_after=_uint256(auth.get("validAfter"), "validAfter"),
        valid_before=_uint256(auth.get("validBefore"), "validBefore"),
        nonce=_text(auth.get("nonce"), _BYTES32, "authorization.nonce"),
        signature=_signature(payload.get("signature")),
    )


def _signature(value: Any) -> str:
    """65 bytes from an EOA; a contract wallet's (ERC-1271, possibly ERC-6492-wrapped) may be longer. The
    verifier checks it: ECDSA for a payer without code, the wallet's isValidSignature for one with code."""
    if not is_signature_hex(value):
        raise PaymentRejected(ERR_MALFORMED, f"payload.signature is not {MIN_SIGNATURE_BYTES} to "
                                             f"{MAX_SIGNATURE_BYTES} bytes of hex")
    return str(value)


class ChainUnavailable(Exception):
    """The chain node did not answer (transport failure, HTTP error, rate limit): the buyer is not to blame."""


class WatchedProvider(HTTPProvider):
    """An HTTP JSON-RPC provider that counts transport failures, so an outage is told apart from a payment
    the chain refused (the x402 verifier turns both into an invalid payment). No retries: a request that
    finds the node down fails fast."""

    def __init__(self, rpc_url: str, timeout: float = 10.0) -> None:
        super().__init__(rpc_url, request_kwargs={"timeout": timeout}, exception_retry_configuration=None)
        self.failures = 0

    def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        try:
            response = super().make_request(method, params)
        except Exception:
            self.failures += 1
            raise
        error = response.get("error") if isinstance(response, dict) else None
        if isinstance(error, dict) and error.get("code") == RATE_LIMITED:
            self.failures += 1
        return response


class _AddressOnly:
    """Stands where the x402 signer keeps its account: an address, and no key to sign with."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __repr__(self) -> str:
        return f"_AddressOnly({self.address})"


class ReadOnlyFacilitatorSigner(FacilitatorWeb3Signer):
    """x402's facilitator signer with no private key: it reads, verifies signatures and simulates calls
    from `simulation_from` (any address: transferWithAuthorization may be submitted by anyone), and
    refuses to send anything. The API process holds no key."""

    def __init__(self, provider: WatchedProvider, simulation_from: str) -> None:  # no super(): it wants a key
        self._account = _AddressOnly(to_checksum_address(simulation_from))  # type: ignore[assignment]
        self._w3 = Web3(provider)
        self._w3.middleware_onion.inject(ExtraDataToPOAMiddleware, layer=0)
        self._confirmation_timeout_seconds = 0
        self._gas_limit = 0
        self._chain_id = None
        self._nonce_lock = threading.Lock()
        self._next_nonce = None

    def write_contract(self, *args: Any, **kwargs: Any) -> str:
        raise PermissionError("the API's verifier is read-only: settlement is the pipeline's")

    def send_transaction(self, to: str, data: bytes) -> str:
        raise PermissionError("the API's verifier is read-only: settlement is the pipeline's")


class Verifier:
    """Facilitator-side verification through x402's ExactEvmScheme (reads and simulates; never settles)."""

    def __init__(self, rpc_url: str, simulation_from: str) -> None:
        self.provider = WatchedProvider(rpc_url)
        self.signer = ReadOnlyFacilitatorSigner(self.provider, simulation_from)
        self._scheme = ExactEvmScheme(self.signer)
        self._w3 = Web3(self.provider)

    def verify(self, payload: PaymentPayload | PaymentPayloadV1, offer: Offer) -> VerifiedPayment:
        v2, version = as_v2(payload, offer)
        authorization = _authorization(v2.payload)
        failures = self.provider.failures
        try:
            result = self._scheme.verify(v2, offer.requirements())
        except Exception as exc:
            if self.provider.failures != failures:
                raise ChainUnavailable(type(exc).__name__) from None
            raise PaymentRejected("invalid_exact_evm_failed_to_verify_signature", "") from None
        if self.provider.failures != failures:
            raise ChainUnavailable("the node failed during verification")
        if not result.is_valid:
            raise PaymentRejected(str(result.invalid_reason), "")
        return VerifiedPayment(version=version, authorization=authorization)

    def balance_of(self, token: str, owner: str) -> int:
        """The owner's token balance at the latest block; ChainUnavailable when the node does not answer."""
        contract = self._w3.eth.contract(address=to_checksum_address(token), abi=_BALANCE_OF_ABI)
        try:
            return int(contract.functions.balanceOf(to_checksum_address(owner)).call())
        except Exception as exc:
            raise ChainUnavailable(type(exc).__name__) from None


def as_v2(payload: PaymentPayload | PaymentPayloadV1, offer: Offer) -> tuple[PaymentPayload, int]:
    """The payload as x402 v2 against this offer, and the client's protocol version; PaymentRejected when
    the scheme or network is not the offer's."""
    if isinstance(payload, PaymentPayloadV1):
        if payload.scheme != SCHEME:
            raise PaymentRejected(ERR_UNSUPPORTED_SCHEME, "this scheme is not offered")
        if payload.network != v1_network_name(offer.chain_id):
            raise PaymentRejected(ERR_NETWORK_MISMATCH, "this network is not offered")
        # the v1 payload carries the same EIP-3009 authorization: verify it as v2 against this offer
        return PaymentPayload(x402_version=2, payload=payload.payload, accepted=offer.requirements()), 1
    if payload.accepted.scheme != SCHEME:
        raise PaymentRejected(ERR_UNSUPPORTED_SCHEME, "this scheme is not offered")
    if payload.accepted.network != offer.network:
        raise PaymentRejected(ERR_NETWORK_MISMATCH, "this network is not offered")
    return payload, 2


def authorization_of(payload: PaymentPayload | PaymentPayloadV1) -> Authorization:
    """The payload's EIP-3009 authorization, checked for shape and range (nothing read from the chain)."""
    return _authorization(payload.payload)


def settlement_header(version: int, *, success: bool, transaction: str, chain_id: int, payer: str,
                      error_reason: str | None = None) -> tuple[str, str]:
    """(header name, value) of the settlement response for the client's protocol version."""
    network = f"eip155:{chain_id}" if version == 2 else (v1_network_name(chain_id) or f"eip155:{chain_id}")
    value = encode_payment_response_header(SettleResponse(success=success, transaction=transaction, network=network,
                                                          payer=payer, error_reason=error_reason))
    return ("PAYMENT-RESPONSE" if version == 2 else "X-PAYMENT-RESPONSE"), value
