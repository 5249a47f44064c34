"""Chain access: batched JSON-RPC, EIP-3009 and idempotent-mint call data, EIP-1559 signing, error
classification.

Per-payment work is batched: one JSON-RPC batch carries every estimate, receipt lookup or raw
transaction of a tick, so the pipeline is bounded by the node, not by round trips.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, cast

import coincurve
import requests
import rlp  # type: ignore[import-untyped]
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from web3 import HTTPProvider, Web3
from web3.types import RPCEndpoint

from payments.config import CONTRACTS_BUILD_DIR
from payments.errors import RpcError

TRANSFER_WITH_AUTHORIZATION_SIG = (
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
TRANSFER_WITH_AUTHORIZATION_SELECTOR = keccak(text=TRANSFER_WITH_AUTHORIZATION_SIG)[:4]
TRANSFER_WITH_AUTHORIZATION_BYTES_SIG = (
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)
TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR = keccak(text=TRANSFER_WITH_AUTHORIZATION_BYTES_SIG)[:4]
ERC6492_MAGIC_SUFFIX = bytes.fromhex("64926492" * 8)  # ends an ERC-6492 wrapped signature
AUTHORIZATION_STATE_SELECTOR = keccak(text="authorizationState(address,bytes32)")[:4]
MINT_ONCE_SELECTOR = keccak(text="mintOnce(address,uint256,bytes32)")[:4]
MINT_ID_USED_SELECTOR = keccak(text="mintIdUsed(bytes32)")[:4]
MINT_ID_DOMAIN = "x402-mint"
_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")
_TWA_TYPES = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]
_TWA_BYTES_TYPES = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]


@cache
def artifact(name: str) -> dict[str, Any]:
    """Compiled ABI + bytecode committed under contracts/build."""
    return cast(dict[str, Any], json.loads((CONTRACTS_BUILD_DIR / f"{name}.json").read_text()))


def connect(rpc_url: str, timeout: float = 10.0) -> Web3:
    return Web3(HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))


# --------------------------------------------------------------------------- JSON-RPC batches


@dataclass(frozen=True)
class RpcResult:
    result: Any = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def message(self) -> str:
        return str((self.error or {}).get("message", ""))


def rpc_batch(w3: Web3, calls: Sequence[tuple[str, Sequence[Any]]], chunk: int = 1000) -> list[RpcResult]:
    """Send calls as JSON-RPC batches; answers come back in call order. Transport failures raise
    RpcError (the caller's task retries); per-call errors come back as RpcResult.error."""
    provider = cast(HTTPProvider, w3.provider)
    out: list[RpcResult] = []
    for start in range(0, len(calls), chunk):
        part = [(RPCEndpoint(m), list(p)) for m, p in calls[start : start + chunk]]
        try:
            answers = provider.make_batch_request(part)
        except (requests.RequestException, OSError) as exc:
            raise RpcError(f"RPC batch of {len(part)} failed: {type(exc).__name__}") from exc
        if not isinstance(answers, list):  # the whole batch was refused
            raise RpcError(f"RPC batch refused: {answers.get('error')}")
        if len(answers) != len(part):
            raise RpcError(f"RPC batch returned {len(answers)} answers for {len(part)} calls")
        for a in answers:
            err = a.get("error")
            out.append(RpcResult(error=dict(err)) if err else RpcResult(result=a.get("result")))
    return out


LOG_CHUNK_BLOCKS = 2_000  # many providers cap eth_getLogs ranges; stay under the common limits


def log_queries(address: str, topics: list[Any], from_block: int, to_block: int,
                chunk: int = LOG_CHUNK_BLOCKS) -> list[tuple[str, list[Any]]]:
    """eth_getLogs calls covering [from_block, to_block] in ranges of at most `chunk` blocks."""
    return [("eth_getLogs", [{"address": address, "topics": topics, "fromBlock": hex(start),
                              "toBlock": hex(min(start + chunk - 1, to_block))}])
            for start in range(max(from_block, 0), to_block + 1, chunk)]


# --------------------------------------------------------------------------- error classification


def is_already_known(message: str) -> bool:
    m = message.lower()
    return "already known" in m or "already imported" in m or "known transaction" in m or "alreadyknown" in m


def is_nonce_too_low(message: str) -> bool:
    m = message.lower()
    return "nonce too low" in m or "noncetoolow" in m or "nonce has already been used" in m


def is_execution_reverted(error: dict[str, Any]) -> bool:
    return error.get("code") == 3 or "revert" in str(error.get("message", "")).lower()


def broadcast_accepted(result: RpcResult) -> bool:
    """Re-sending signed bytes is idempotent: the node already having the tx, or the nonce having been
    used already (possibly by this very tx), is success to be reconciled by the confirmation loop."""
    return result.ok or is_already_known(result.message) or is_nonce_too_low(result.message)


def revert_reason(error: dict[str, Any]) -> str:
    """Human revert reason from a JSON-RPC error (Error(string) data decoded when present)."""
    data = error.get("data")
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x") and bytes.fromhex(data[2:10]) == _ERROR_STRING_SELECTOR:
        try:
            (reason,) = abi_decode(["string"], bytes.fromhex(data[10:]))
            return str(reason)
        except Exception:  # malformed revert data: fall back to the message
            pass
    message = str(error.get("message", "execution reverted"))
    return message.removeprefix("execution reverted: ").strip() or message


def failure_code(reason: str) -> str:
    """Stable machine-readable code for a settlement revert (x402 `invalidReason` names)."""
    r = reason.lower()
    if "expired" in r:
        return "invalid_exact_evm_payload_authorization_valid_before"
    if "not yet valid" in r:
        return "invalid_exact_evm_payload_authorization_valid_after"
    if "used or canceled" in r:
        return "invalid_exact_evm_nonce_already_used"
    if "invalid signature" in r:
        return "invalid_exact_evm_payload_signature"
    if "exceeds balance" in r:
        return "invalid_exact_evm_insufficient_balance"
    return "invalid_exact_evm_transaction_simulation_failed"


# --------------------------------------------------------------------------- EIP-3009 call data


def split_signature(signature: str) -> tuple[int, bytes, bytes]:
    raw = bytes.fromhex(signature.removeprefix("0x"))
    if len(raw) != 65:
        raise ValueError("signature must be 65 bytes")
    v = raw[64]
    if v < 27:
        v += 27
    return v, raw[:32], raw[32:64]


def transfer_with_authorization_data(
    payer: str, pay_to: str, value: int, valid_after: int, valid_before: int, nonce: str, signature: str
) -> bytes:
    v, r, s = split_signature(signature)
    args = [payer, pay_to, value, valid_after, valid_before, bytes.fromhex(nonce.removeprefix("0x")), v, r, s]
    return TRANSFER_WITH_AUTHORIZATION_SELECTOR + abi_encode(_TWA_TYPES, args)


def transfer_with_authorization_bytes_data(
    payer: str, pay_to: str, value: int, valid_after: int, valid_before: int, nonce: str, signature: bytes
) -> bytes:
    """Call data of the bytes form, `transferWithAuthorization(..., bytes signature)` (USDC v2.2 and later,
    and the project's token): the signature goes to the token as it is, for ECDSA or ERC-1271."""
    args = [payer, pay_to, value, valid_after, valid_before, bytes.fromhex(nonce.removeprefix("0x")), signature]
    return TRANSFER_WITH_AUTHORIZATION_BYTES_SELECTOR + abi_encode(_TWA_BYTES_TYPES, args)


def erc6492_inner_signature(signature: bytes) -> bytes:
    """The signature an ERC-6492 wrapper (`abi.encode(factory, factoryCalldata, signature) ++ magic`)
    carries; any other signature (or a wrapper that does not decode) as it is. A deployed wallet checks the
    inner signature, which is what the x402 facilitator settles with."""
    if len(signature) < 32 or signature[-32:] != ERC6492_MAGIC_SUFFIX:
        return signature
    try:
        _, _, inner = abi_decode(["address", "bytes", "bytes"], signature[:-32])
    except Exception:  # not a wrapper after all: the token will judge the bytes as given
        return signature
    return bytes(inner)


def settlement_data(
    payer: str, pay_to: str, value: int, valid_after: int, valid_before: int, nonce: str, signature: str
) -> bytes:
    """Call data settling an authorization, in the form the x402 verifier simulated it at intake.

    - An ERC-6492 wrapper is taken off: only a deployed wallet's payment is ever queued (the verifier
      refuses an undeployed one: no factory is allowed), and a deployed wallet checks the inner signature.
    - A 65-byte signature whose last byte is a v (0, 1, 27, 28) - every EOA's, and a contract wallet's
      that carries one owner's ECDSA signature - goes in the v,r,s form: the form every EIP-3009 token has,
      and the cheaper one (measured on the project's token: 70,733 gas for an EOA against 71,383 in the
      bytes form). A token whose v,r,s form checks ERC-1271 too (USDC v2.2, the project's token) hands a
      wallet `r ++ s ++ v`, the signature as signed. Always using the bytes form would cost every EOA
      payment ~650 gas more and fail on tokens that only have the v,r,s form (USDC before v2.2).
    - Any other signature (several owners', WebAuthn, ...) goes in the bytes form, as signed (a 2-of-2
      test wallet: 84,423 gas).
    """
    raw = erc6492_inner_signature(bytes.fromhex(signature.removeprefix("0x")))
    if len(raw) == 65 and raw[64] in (0, 1, 27, 28):
        return transfer_with_authorization_data(payer, pay_to, value, valid_after, valid_before, nonce,
                                                "0x" + raw.hex())
    return transfer_with_authorization_bytes_data(payer, pay_to, value, valid_after, valid_before, nonce, raw)


def authorization_state_data(authorizer: str, nonce: str) -> bytes:
    return AUTHORIZATION_STATE_SELECTOR + abi_encode(
        ["address", "bytes32"], [authorizer, bytes.fromhex(nonce.removeprefix("0x"))]
    )


# --------------------------------------------------------------------------- idempotent mints (mintOnce)


def _bytes32(value: bytes) -> bytes:
    if len(value) != 32:
        raise ValueError(f"a mint id is 32 bytes, not {len(value)}")
    return bytes(value)


def mint_id_for(chain_id: int, mint_token: str, mint_row_id: int) -> bytes:
    """The on-chain mint id of one mint_queue row: keccak256(abi.encode("x402-mint", chain_id, mint_token,
    mint_row_id)) with Solidity types (string, uint256, address, uint256); 32 bytes.

    Deterministic, so every retry or re-broadcast of the row carries the same id and the token's
    `mintOnce` mints it at most once; distinct per chain, token and row, so no two rows share an id.
    The address may be given in any letter case. Computable in Solidity as
    `keccak256(abi.encode("x402-mint", block.chainid, address(token), rowId))`."""
    return keccak(abi_encode(["string", "uint256", "address", "uint256"],
                             [MINT_ID_DOMAIN, chain_id, Web3.to_checksum_address(mint_token), mint_row_id]))


def mint_once_calldata(recipient: str, amount: int, mint_id: bytes) -> bytes:
    """Call data of `mintOnce(address to, uint256 value, bytes32 mintId)`."""
    return MINT_ONCE_SELECTOR + abi_encode(["address", "uint256", "bytes32"], [recipient, amount, _bytes32(mint_id)])


def mint_id_used_calldata(mint_id: bytes) -> bytes:
    """Call data of `mintIdUsed(bytes32 mintId)` (a view returning bool)."""
    return MINT_ID_USED_SELECTOR + abi_encode(["bytes32"], [_bytes32(mint_id)])


def supports_mint_once(w3: Web3, mint_token: str) -> bool:
    """Whether the token at `mint_token` has `mintOnce`/`mintIdUsed`: one eth_call of mintIdUsed(0x00..00).
    A token without them reverts (no fallback) or answers empty/short data (no code, or a fallback that
    returns nothing) - both False. Transport failures raise RpcError (the caller retries)."""
    call = {"to": Web3.to_checksum_address(mint_token), "data": "0x" + mint_id_used_calldata(bytes(32)).hex()}
    (answer,) = rpc_batch(w3, [("eth_call", [call, "latest"])])
    if not answer.ok:
        if is_execution_reverted(answer.error or {}):
            return False
        raise RpcError(f"eth_call mintIdUsed failed: {answer.message}")
    data = bytes.fromhex(str(answer.result or "0x").removeprefix("0x"))
    return len(data) == 32 and int.from_bytes(data, "big") in (0, 1)


# --------------------------------------------------------------------------- fees and signing


@dataclass(frozen=True)
class Fees:
    max_fee_per_gas: int
    max_priority_fee_per_gas: int


def fees_from(base_fee: int, priority_fee: int) -> Fees:
    """Pay up to twice the current base fee, so a tx survives several full blocks of fee growth."""
    tip = max(priority_fee, 1)
    return Fees(max_fee_per_gas=2 * base_fee + tip, max_priority_fee_per_gas=tip)


@dataclass(frozen=True)
class SignedTx:
    nonce: int
    tx_hash: str
    raw: bytes
    fees: Fees
    gas_limit: int


@lru_cache(maxsize=256)
def _private_key(raw: bytes) -> coincurve.PrivateKey:
    return coincurve.PrivateKey(raw)


def _key_bytes(key: Any) -> bytes:
    raw = bytes.fromhex(key.removeprefix("0x")) if isinstance(key, str) else bytes(key)
    if len(raw) != 32:
        raise ValueError("a private key is 32 bytes")
    return raw


def sign_tx(
    key: Any, *, chain_id: int, nonce: int, to: str, data: bytes, gas: int, fees: Fees, value: int = 0
) -> SignedTx:
    """Sign an EIP-1559 transaction: RLP over coincurve (libsecp256k1), byte-identical to eth-account's
    `Account.sign_transaction` (a test compares them) at a fraction of its cost per transaction."""
    to_bytes = bytes.fromhex(to.removeprefix("0x"))
    if len(to_bytes) != 20:
        raise ValueError(f"not an address: {to!r}")
    unsigned = [chain_id, nonce, fees.max_priority_fee_per_gas, fees.max_fee_per_gas, gas, to_bytes, value,
                bytes(data), []]
    digest = keccak(b"\x02" + rlp.encode(unsigned))
    signature = _private_key(_key_bytes(key)).sign_recoverable(digest, hasher=None)  # r || s || v, low s
    raw = b"\x02" + rlp.encode([*unsigned, signature[64], int.from_bytes(signature[:32], "big"),
                                 int.from_bytes(signature[32:64], "big")])
    return SignedTx(nonce=nonce, tx_hash="0x" + keccak(raw).hex(), raw=raw, fees=fees, gas_limit=gas)


def to_int(value: Any) -> int:
    return int(value, 16) if isinstance(value, str) else int(value)
