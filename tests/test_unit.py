"""Pure logic: no database, no chain."""

from __future__ import annotations

import dataclasses

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_utils.crypto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from payments.chain import (
    Fees,
    RpcResult,
    broadcast_accepted,
    erc6492_inner_signature,
    failure_code,
    fees_from,
    mint_id_for,
    mint_id_used_calldata,
    mint_once_calldata,
    revert_reason,
    settlement_data,
    sign_tx,
    split_signature,
    transfer_with_authorization_bytes_data,
    transfer_with_authorization_data,
)
from payments.config import signer_from_key
from payments.db import parse_queries
from payments.eip3009 import TokenDomain, recover_payer, sign_authorization
from payments.errors import ConfigurationError, InvalidPaymentError
from payments.intake import MintItem, validate
from payments.settings import PipelineSettings, parse_settings
from payments.statuses import PaymentStatus
from payments.txm import (
    Intent,
    NonceAction,
    OpenNonce,
    decode_call,
    first_fees,
    intent_of,
    nonce_action,
    replacement_fees,
)
from tasks.confirm import CheckedPayment, Facts, Outcome, Settlement, decide

KEY = "0x" + "11" * 32
DOMAIN = TokenDomain("USD Coin", "2", 31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3")


def test_parse_queries_splits_named_blocks() -> None:
    q = parse_queries("-- a --\nSELECT 1\n\n-- b_2 --\nSELECT 2\n")
    assert q == {"a": "SELECT 1", "b_2": "SELECT 2"}


def test_parse_queries_rejects_duplicates_and_empty() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_queries("-- a --\nSELECT 1\n-- a --\nSELECT 2\n")
    with pytest.raises(ValueError, match="empty"):
        parse_queries("-- a --\n\n-- b --\nSELECT 1")


def test_settings_defaults_are_the_seeds() -> None:
    s = parse_settings({})
    assert (s.payment_batch_interval_ms, s.payment_batch_size) == (4000, 10)
    assert (s.confirmation_interval_ms, s.confirmation_batch_size, s.confirmation_timeout_seconds) == (2000, 20, 300)


def test_pipeline_settings_defaults_are_the_registrys() -> None:
    from payments.settings import REGISTRY

    assert all(REGISTRY[f.name].default == f.default for f in dataclasses.fields(PipelineSettings))
    assert parse_settings({}) == PipelineSettings()


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ConfigurationError, match="not an integer"):
        parse_settings({"payment_batch_size": "ten"})
    with pytest.raises(ConfigurationError, match="outside"):
        parse_settings({"payment_batch_size": "0"})
    with pytest.raises(ConfigurationError, match="fee_bump_percent"):
        parse_settings({"fee_bump_percent": "5"})  # geth refuses replacements below +10 %
    assert parse_settings({"unrelated_monitor_threshold": "x"}) == PipelineSettings()


def test_first_fees_pay_twice_the_base_fee() -> None:
    assert fees_from(base_fee=7, priority_fee=0) == Fees(max_fee_per_gas=15, max_priority_fee_per_gas=1)


def test_split_signature_normalises_v() -> None:
    sig = "0x" + "aa" * 32 + "bb" * 32 + "01"
    v, r, s = split_signature(sig)
    assert v == 28 and r == bytes.fromhex("aa" * 32) and s == bytes.fromhex("bb" * 32)
    with pytest.raises(ValueError):
        split_signature("0x1234")


def test_transfer_with_authorization_calldata_matches_abi_encoding() -> None:
    auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=5, valid_after=1, valid_before=9,
                              nonce="0x" + "33" * 32)
    data = transfer_with_authorization_data(auth.payer, auth.pay_to, 5, 1, 9, auth.nonce, auth.signature)
    v, r, s = split_signature(auth.signature)
    expected = encode(["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32",
                       "bytes32"], [auth.payer, auth.pay_to, 5, 1, 9, bytes.fromhex("33" * 32), v, r, s])
    assert data[:4].hex() == "e3ee160e" and data[4:] == expected


TWA_BYTES_TYPES = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "bytes"]
MAGIC_6492 = bytes.fromhex("6492" * 16)


def _wrap_6492(inner: bytes) -> bytes:
    return encode(["address", "bytes", "bytes"], ["0x" + "fa" * 20, b"\x01\x02create", inner]) + MAGIC_6492


def test_settlement_uses_the_vrs_form_for_ecdsa_signatures_and_the_bytes_form_otherwise() -> None:
    auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=5, valid_after=1, valid_before=9,
                              nonce="0x" + "33" * 32)
    fields = (auth.payer, auth.pay_to, 5, 1, 9, auth.nonce)
    eoa = settlement_data(*fields, auth.signature)
    assert eoa == transfer_with_authorization_data(*fields, auth.signature) and eoa[:4].hex() == "e3ee160e"
    low_v = auth.signature[:-2] + f"{int(auth.signature[-2:], 16) - 27:02x}"  # v as 0/1: normalised to 27/28
    assert settlement_data(*fields, low_v) == eoa

    def bytes_form(signature: bytes) -> bytes:
        data = transfer_with_authorization_bytes_data(*fields, signature)
        assert data[:4] == keccak(text="transferWithAuthorization(address,address,uint256,uint256,uint256,"
                                       "bytes32,bytes)")[:4]
        assert data[4:] == encode(TWA_BYTES_TYPES, [auth.payer, auth.pay_to, 5, 1, 9, bytes.fromhex("33" * 32),
                                                    signature])
        return data

    two_owners = bytes.fromhex(auth.signature[2:]) * 2
    assert settlement_data(*fields, "0x" + two_owners.hex()) == bytes_form(two_owners)
    not_a_v = bytes.fromhex(auth.signature[2:-2]) + b"\x05"  # 65 bytes, but no ECDSA v: as signed
    assert settlement_data(*fields, "0x" + not_a_v.hex()) == bytes_form(not_a_v)
    # ERC-6492: the inner signature settles (a deployed wallet checks it), in the form its shape calls for
    assert settlement_data(*fields, "0x" + _wrap_6492(two_owners).hex()) == bytes_form(two_owners)
    assert settlement_data(*fields, "0x" + _wrap_6492(bytes.fromhex(auth.signature[2:])).hex()) == eoa
    garbled = b"\x07" * 40 + MAGIC_6492  # the suffix without a wrapper that decodes: left as it is
    assert erc6492_inner_signature(garbled) == garbled
    assert settlement_data(*fields, "0x" + garbled.hex()) == bytes_form(garbled)


TOKEN = "0x" + "ab" * 20


def test_mint_id_is_the_documented_hash_and_deterministic() -> None:
    expected = keccak(encode(["string", "uint256", "address", "uint256"], ["x402-mint", 31337, TOKEN, 7]))
    assert mint_id_for(31337, TOKEN, 7) == expected
    assert len(expected) == 32
    assert mint_id_for(31337, TOKEN, 7) == mint_id_for(31337, TOKEN.upper().replace("0X", "0x"), 7)


def test_mint_ids_differ_per_chain_token_and_row() -> None:
    ids = {mint_id_for(chain, token, row)
           for chain in (1, 8453, 31337) for token in (TOKEN, "0x" + "cd" * 20) for row in (1, 2, 10**12)}
    assert len(ids) == 3 * 2 * 3
    assert bytes(32) not in ids  # the id supports_mint_once probes with is never a real row's


def test_mint_once_calldata_matches_abi_encoding() -> None:
    mint_id = bytes.fromhex("44" * 32)
    data = mint_once_calldata("0x" + "22" * 20, 5, mint_id)
    assert data[:4] == keccak(text="mintOnce(address,uint256,bytes32)")[:4]
    assert data[4:] == encode(["address", "uint256", "bytes32"], ["0x" + "22" * 20, 5, mint_id])
    assert mint_id_used_calldata(mint_id) == keccak(text="mintIdUsed(bytes32)")[:4] + mint_id
    with pytest.raises(ValueError, match="32 bytes"):
        mint_once_calldata("0x" + "22" * 20, 5, b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        mint_id_used_calldata(bytes(33))


def test_authorization_signature_recovers_the_payer_and_detects_tampering() -> None:
    auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=5, valid_after=0, valid_before=99)
    assert recover_payer(DOMAIN, auth) == auth.payer
    assert recover_payer(DOMAIN, dataclasses.replace(auth, value=6)) != auth.payer
    other_chain = dataclasses.replace(DOMAIN, chain_id=1)
    assert recover_payer(other_chain, auth) != auth.payer


def test_revert_reason_from_error_data_and_message() -> None:
    data = "0x08c379a0" + encode(["string"], ["FiatTokenV2: authorization is expired"]).hex()
    assert revert_reason({"code": 3, "message": "execution reverted", "data": data}) == (
        "FiatTokenV2: authorization is expired")
    assert revert_reason({"message": "execution reverted: ERC20: transfer amount exceeds balance"}) == (
        "ERC20: transfer amount exceeds balance")


@pytest.mark.parametrize(("reason", "code"), [
    ("FiatTokenV2: authorization is expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("FiatTokenV2: authorization is not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("FiatTokenV2: authorization is used or canceled", "invalid_exact_evm_nonce_already_used"),
    ("FiatTokenV2: invalid signature", "invalid_exact_evm_payload_signature"),
    ("ERC20: transfer amount exceeds balance", "invalid_exact_evm_insufficient_balance"),
    ("something else", "invalid_exact_evm_transaction_simulation_failed"),
])
def test_failure_codes_use_x402_reason_names(reason: str, code: str) -> None:
    assert failure_code(reason) == code


def test_rebroadcast_answers_that_mean_success() -> None:
    assert broadcast_accepted(RpcResult(result="0xabc"))
    assert broadcast_accepted(RpcResult(error={"message": "already known"}))
    assert broadcast_accepted(RpcResult(error={"message": "nonce too low: next nonce 5, tx nonce 4"}))
    assert not broadcast_accepted(RpcResult(error={"message": "insufficient funds for gas * price + value"}))
    assert not broadcast_accepted(RpcResult(error={"message": "replacement transaction underpriced"}))


SETTINGS = PipelineSettings(confirmation_depth=2, mint_confirmation_depth=4, finality_depth=6,
                            fee_bump_after_blocks=3, rebroadcast_after_seconds=30, fee_bump_percent=20)
HASH_A, HASH_B = "0x" + "a" * 64, "0x" + "b" * 64


def _pay(status: str = "sent", block_hash: str | None = None) -> CheckedPayment:
    return CheckedPayment(id="pay_00000001", status=status, token="0x" + "02" * 20, payer="0x" + "01" * 20,
                          auth_nonce="0x" + "04" * 32, valid_before=2_000, signer="0x" + "06" * 20,
                          block_hash=block_hash, sent_block=90)


def _facts(block: int | None = None, block_hash: str = HASH_A, *, used: bool | None = None, cancelled: bool = False,
           expired_final: bool = False) -> Facts:
    settlement = None if block is None else Settlement("0x" + "c" * 64, block, block_hash)
    return Facts(used_now=block is not None if used is None else used, settlement=settlement, cancelled=cancelled,
                 expired_final=expired_final)


def test_a_settlement_completes_at_confirmation_depth_whoever_sent_it() -> None:
    assert decide(_pay(), _facts(100), head=100, settings=SETTINGS)[0] is Outcome.WAIT
    assert decide(_pay(), _facts(100), head=101, settings=SETTINGS)[0] is Outcome.COMPLETE
    assert decide(_pay(), _facts(100), head=103, settings=SETTINGS)[0] is Outcome.FINAL  # and mints at once


def test_mints_are_released_at_mint_depth_in_the_same_block_only() -> None:
    done = _pay("completed", HASH_A)
    assert decide(done, _facts(100), head=102, settings=SETTINGS)[0] is Outcome.WAIT
    assert decide(done, _facts(100), head=103, settings=SETTINGS)[0] is Outcome.RELEASE
    assert decide(done, _facts(101, HASH_B), head=110, settings=SETTINGS)[0] is Outcome.STEP_BACK  # moved by a reorg
    assert decide(done, _facts(), head=110, settings=SETTINGS)[0] is Outcome.STEP_BACK  # gone


def test_mint_depth_is_never_below_confirmation_depth() -> None:
    assert dataclasses.replace(SETTINGS, mint_confirmation_depth=1).mint_depth == SETTINGS.confirmation_depth


def test_failure_needs_proof_from_the_chain() -> None:
    assert decide(_pay(), _facts(), head=500, settings=SETTINGS)[0] is Outcome.WAIT  # a revert proves nothing
    assert decide(_pay(), _facts(expired_final=True), head=500, settings=SETTINGS)[0] is Outcome.FAIL
    assert decide(_pay(), _facts(used=True, cancelled=True), head=500, settings=SETTINGS)[0] is Outcome.FAIL
    assert decide(_pay(), _facts(used=True), head=500, settings=SETTINGS)[0] is Outcome.WAIT  # event not seen yet


def test_replacement_fees_rise_ten_percent_or_to_the_estimate_and_stop_at_the_cap() -> None:
    old = Fees(max_fee_per_gas=1_000, max_priority_fee_per_gas=100)
    low = Fees(max_fee_per_gas=10, max_priority_fee_per_gas=1)
    assert replacement_fees(old, low, 5, cap=10**9) == (Fees(1_100, 110), False)  # at least +10 %, rounded up
    assert replacement_fees(Fees(1_001, 101), low, 10, cap=10**9)[0] == Fees(1_102, 112)
    high = Fees(max_fee_per_gas=5_000, max_priority_fee_per_gas=400)
    assert replacement_fees(old, high, 20, cap=10**9) == (Fees(5_000, 400), False)
    assert replacement_fees(old, high, 20, cap=2_000) == (Fees(2_000, 400), True)
    assert replacement_fees(old, high, 20, cap=1_050) == (None, True)  # no room for a valid replacement
    assert first_fees(high, cap=300) == Fees(300, 300)


def _open(intent: Intent = Intent.LIVE, **over: object) -> OpenNonce:
    base = dict(nonce=7, tx_hash=HASH_A, kind="settlement", payment_id="pay_00000001", mint_id=None, raw=b"",
                fees=Fees(1_000, 100), gas_limit=100_000, signed_block=100, broadcast_age=5.0, last_error=None,
                intent=intent)
    base.update(over)
    return OpenNonce(**base)  # type: ignore[arg-type]


def test_nonce_actions() -> None:
    act = nonce_action
    assert act(None, True, 100, 10, SETTINGS) is NonceAction.FILL  # a gap
    assert act(_open(Intent.DEAD), False, 100, 10, SETTINGS) is NonceAction.CANCEL
    assert act(_open(), True, 102, 10, SETTINGS) is NonceAction.NONE
    assert act(_open(), True, 103, 10, SETTINGS) is NonceAction.BUMP  # fee_bump_after_blocks without inclusion
    assert act(_open(broadcast_age=31.0), False, 103, 10, SETTINGS) is NonceAction.REBROADCAST  # waits its turn
    assert act(_open(), False, 101, 2_000, SETTINGS) is NonceAction.BUMP  # below the base fee
    refused = _open(last_error="replacement transaction underpriced")
    assert act(refused, False, 101, 10, SETTINGS) is NonceAction.BUMP
    assert act(_open(broadcast_age=None), False, 101, 10, SETTINGS) is NonceAction.REBROADCAST


def test_intent_of_a_nonce() -> None:
    row = dict(kind="settlement", hashes=[HASH_A], payment_id="p", payment_status="sent", valid_before=2_000,
               payment_tx_hash=HASH_A, mint_status=None, mint_tx_hash=None)
    assert intent_of(row, chain_time=1_999) is Intent.LIVE
    assert intent_of(row, chain_time=2_000) is Intent.DEAD  # expired: cannot land any more
    assert intent_of({**row, "payment_status": "completed"}, 1) is Intent.LIVE  # this nonce settled it (reorg)
    assert intent_of({**row, "payment_status": "completed", "payment_tx_hash": HASH_B}, 1) is Intent.DEAD
    assert intent_of({**row, "payment_status": "confirmation_failed"}, 1) is Intent.DEAD
    mint = {**row, "payment_id": None, "mint_status": "minting"}
    assert intent_of(mint, 1) is Intent.LIVE
    assert intent_of({**mint, "mint_status": "failed"}, 1) is Intent.DEAD
    assert intent_of({**row, "kind": "gap_fill"}, 1) is Intent.FILLER


def test_a_stored_call_decodes_back() -> None:
    key = "0x" + "11" * 32
    signed = sign_tx(key, chain_id=1, nonce=3, to="0x" + "22" * 20, data=b"\x01\x02", gas=50_000,
                     fees=Fees(10, 1), value=5)
    assert decode_call(signed.raw) == ("0x" + "22" * 20, 5, b"\x01\x02")


def test_signer_never_shows_its_key() -> None:
    signer = signer_from_key(KEY)
    assert KEY[2:] not in repr(signer) and signer.address == Account.from_key(KEY).address.lower()
    with pytest.raises(ConfigurationError) as err:
        signer_from_key("0x" + "zz" * 32)
    assert "zz" not in str(err.value)


def test_intake_validation_rejects_malformed_input() -> None:
    auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=5, valid_after=0, valid_before=99)
    validate(auth, [MintItem("0x" + "44" * 20, auth.payer, 1)])
    bad = [
        dataclasses.replace(auth, pay_to="0x1234"),
        dataclasses.replace(auth, value=0),
        dataclasses.replace(auth, value=2**256),
        dataclasses.replace(auth, valid_before=0),
        dataclasses.replace(auth, nonce="0x12"),
        dataclasses.replace(auth, signature="0x" + "00" * 10),
        dataclasses.replace(auth, signature="0x" + "00" * 64),
        dataclasses.replace(auth, signature="0x" + "00" * 2049),
        dataclasses.replace(auth, signature="0x" + "0" * 131),  # not whole bytes
        dataclasses.replace(auth, signature="0x" + "zz" * 65),
        dataclasses.replace(auth, signature="00" * 66),
        dataclasses.replace(auth, signature=auth.signature + "\n"),  # `$` would let a newline through
    ]
    for b in bad:
        with pytest.raises(InvalidPaymentError):
            validate(b, [])
    for length in (65, 130, 2048):  # an EOA's; contract wallets' (ERC-1271) up to 2 KiB
        validate(dataclasses.replace(auth, signature="0x" + "Ab" * length), [])
    with pytest.raises(InvalidPaymentError):
        validate(auth, [MintItem("0x" + "44" * 20, "nobody", 1)])


def test_failure_statuses_are_what_clients_poll_for() -> None:
    assert {s for s in PaymentStatus if s.is_failure} == {"failed", "confirmation_failed"}
    assert {s for s in PaymentStatus if s.is_terminal} == {"completed", "failed", "confirmation_failed"}


def test_tick_loop_drains_full_batches_then_waits_for_the_interval() -> None:
    import time
    from itertools import pairwise

    from flows.ticks import tick_loop

    answers = iter([True, True, False])
    assert tick_loop(PipelineSettings, 0, lambda s: 60_000, lambda s: next(answers)) == 3  # window 0: drain

    calls: list[float] = []

    def tick(_: PipelineSettings) -> bool:
        calls.append(time.monotonic())
        return False

    started = time.monotonic()
    assert tick_loop(PipelineSettings, 1, lambda s: 300, tick) == 4  # 0, .3, .6, .9 s; the next would pass 1 s
    assert 0.85 <= time.monotonic() - started < 1.2 and all(b - a >= 0.29 for a, b in pairwise(calls))
    assert tick_loop(PipelineSettings, 60, lambda s: 10, lambda s: True, max_ticks=5) == 5


def test_a_late_run_ends_when_an_on_time_run_would_have() -> None:
    """Runs that start late (runner busy, serve process restarted after an outage) cannot pile up: past
    the time an on-time run would have ended they stop at their first tick that is not full, while a
    backlog is still drained back to back (for at most one window from their own start)."""
    import time

    from flows.ticks import tick_loop

    assert tick_loop(PipelineSettings, 25, lambda s: 100, lambda s: False, late_by=600) == 1  # nothing to do

    def backlog(_: PipelineSettings) -> bool:
        time.sleep(0.05)
        return True

    started = time.monotonic()
    assert tick_loop(PipelineSettings, 1, lambda s: 100, backlog, late_by=600) >= 10  # drains for its window
    assert 1 <= time.monotonic() - started < 1.5
    remaining = iter([True, True, False, False])
    assert tick_loop(PipelineSettings, 25, lambda s: 100, lambda s: next(remaining), late_by=600) == 3
    started = time.monotonic()
    assert tick_loop(PipelineSettings, 25, lambda s: 100, lambda s: False, late_by=24.5) in (5, 6)
    assert time.monotonic() - started < 0.8  # 0.5 s of its window was left
    assert tick_loop(PipelineSettings, 0, lambda s: 100, lambda s: False, late_by=600) == 1  # window 0: one pass


@given(nonce=st.integers(0, 2**64 - 1), tip=st.integers(0, 10**12), extra=st.integers(0, 10**15),
       gas=st.integers(21_000, 30_000_000), value=st.integers(0, 2**255), data=st.binary(max_size=600),
       to=st.binary(min_size=20, max_size=20), key=st.integers(1, 2**255), chain_id=st.sampled_from([1, 8453, 31337]))
@settings(max_examples=200, deadline=None)
def test_the_lean_signer_gives_eth_accounts_exact_bytes(nonce: int, tip: int, extra: int, gas: int, value: int,
                                                        data: bytes, to: bytes, key: int, chain_id: int) -> None:
    from eth_account import Account
    from web3 import Web3

    private = key.to_bytes(32, "big")
    fees = Fees(max_fee_per_gas=tip + extra, max_priority_fee_per_gas=tip)
    ours = sign_tx(private, chain_id=chain_id, nonce=nonce, to="0x" + to.hex(), data=data, gas=gas, fees=fees,
                   value=value)
    theirs = Account.sign_transaction({
        "type": 2, "chainId": chain_id, "nonce": nonce, "to": Web3.to_checksum_address("0x" + to.hex()),
        "value": value, "data": data, "gas": gas, "maxFeePerGas": fees.max_fee_per_gas,
        "maxPriorityFeePerGas": tip}, private)
    assert ours.raw == bytes(theirs.raw_transaction)
    assert ours.tx_hash == "0x" + bytes(theirs.hash).hex()
