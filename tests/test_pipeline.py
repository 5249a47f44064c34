"""The send and confirm stages against real PostgreSQL and a real anvil: success, simulation failures,
on-chain reverts, dropped and stuck transactions, confirmation depth, RPC outages, signer lanes."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
from sqlalchemy import Engine, text

from payments.chain import Fees, connect, sign_tx
from payments.errors import RpcError
from payments.localstack import Deployment, free_port, send_and_wait
from payments.settings import PipelineSettings
from tasks.common import Pipeline, new_owner_id
from tasks.confirm import confirm_tick
from tasks.send import send_lane_tick
from tests.conftest import rpc
from tests.helpers import PRICE, authorize, balance, chain_time, mint_statuses, payment, queue, queue_many, statuses

pytestmark = pytest.mark.chain

FAST = PipelineSettings(payment_batch_size=100, confirmation_batch_size=100, confirmation_depth=1,
                        mint_confirmation_depth=1, finality_depth=1)


def _send(p: Pipeline, settings: PipelineSettings = FAST, lane: int = 0) -> Any:
    """One send tick; with automine on, returns once the chain has mined what it sent (automine can lag
    on a busy machine: tests wait for the chain state they need, never assume it)."""
    report = send_lane_tick(p, p.signers[lane], new_owner_id("test-send"), settings)
    if p.w3.provider.make_request("anvil_getAutomine", [])["result"]:  # type: ignore[arg-type]
        address = p.w3.to_checksum_address(p.signers[lane].address)
        deadline = time.monotonic() + 30
        while p.w3.eth.get_transaction_count(address, "latest") < p.w3.eth.get_transaction_count(address, "pending"):
            assert time.monotonic() < deadline, "automine did not mine the sent transactions"
            time.sleep(0.05)
    return report


def _confirm(p: Pipeline, settings: PipelineSettings = FAST) -> Any:
    return confirm_tick(p, "test-confirm", settings)


def _hashes(engine: Engine, pid: str) -> list[str]:
    with engine.connect() as conn:
        return [r[0] for r in conn.execute(text(
            "SELECT tx_hash FROM payment_transactions WHERE payment_id = :p ORDER BY id"), {"p": pid})]


def _age_sent(engine: Engine, seconds: int) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE payment_queue SET sent_at = sent_at - make_interval(secs => :s) "
                          "WHERE status = 'sent'"), {"s": seconds})


def test_payments_settle_and_release_their_mints_once(pipeline: Pipeline, chain: Deployment) -> None:
    ids = queue_many(pipeline.engine, chain, 20)
    before = balance(chain, chain.merchant)
    report = _send(pipeline)
    assert (report.claimed, report.signed, report.sent, report.failed) == (20, 20, 20, 0)
    assert statuses(pipeline.engine) == {"sent": 20}
    confirmed = _confirm(pipeline)
    assert confirmed.completed == 20
    assert statuses(pipeline.engine) == {"completed": 20}
    assert mint_statuses(pipeline.engine) == {"released": 20}
    assert balance(chain, chain.merchant) == before + 20 * PRICE
    signer = pipeline.signers[0].address
    nonces = sorted(payment(pipeline.engine, pid)["tx_nonce"] for pid in ids)
    assert nonces == list(range(20))
    assert chain.w3().eth.get_transaction_count(chain.w3().to_checksum_address(signer)) == 20
    assert _confirm(pipeline).completed == 0  # nothing left, nothing released twice
    assert mint_statuses(pipeline.engine) == {"released": 20}


def test_simulation_failures_are_failed_without_spending_a_nonce(pipeline: Pipeline, chain: Deployment) -> None:
    now = chain_time(chain)
    buyer = chain.buyers[0]
    used = authorize(chain, buyer)
    token = chain.payment_contract()
    raw = bytes.fromhex(used.signature[2:])
    send_and_wait(chain.w3(), chain.deployer, token.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")(
        used.payer, used.pay_to, used.value, used.valid_after, used.valid_before, bytes.fromhex(used.nonce[2:]),
        raw[64], raw[:32], raw[32:64]))
    cases = {
        "expired": authorize(chain, buyer, valid_before=now - 5),
        "used": used,
        "forged": dataclasses.replace(authorize(chain, buyer), value=PRICE * 2),
        "broke": authorize(chain, chain.buyers[1], value=10**15),
    }
    ids = {name: queue(pipeline.engine, chain, auth) for name, auth in cases.items()}
    good = queue(pipeline.engine, chain, authorize(chain, chain.buyers[2]))
    report = _send(pipeline)
    assert (report.failed, report.handed_over, report.sent) == (3, 1, 1)
    expected = {
        "expired": "invalid_exact_evm_payload_authorization_valid_before",
        "forged": "invalid_exact_evm_payload_signature",
        "broke": "invalid_exact_evm_insufficient_balance",
    }
    for name, pid in ids.items():
        row = payment(pipeline.engine, pid)
        assert row["tx_nonce"] is None
        if name == "used":  # someone else settled it: the merchant was paid, so it is not a failure
            assert row["status"] == "sent" and row["tx_hash"] is None, row  # the confirm stage decides
            continue
        assert row["status"] == "failed" and row["error"].startswith(expected[name]), row["error"]
        assert row["tx_hash"] is None
    assert payment(pipeline.engine, good)["tx_nonce"] == 0  # the failures took no nonce
    assert mint_statuses(pipeline.engine) == {"cancelled": 3, "waiting": 2}
    _confirm(pipeline)
    settled = payment(pipeline.engine, ids["used"])
    assert settled["status"] == "completed" and settled["tx_hash"] is not None  # the transaction that paid
    assert mint_statuses(pipeline.engine) == {"cancelled": 3, "released": 2}


def test_an_on_chain_revert_is_not_proof_the_payment_failed(pipeline: Pipeline, chain: Deployment) -> None:
    buyer = chain.buyers[3]  # 1,000 tokens: enough for either payment, not for both
    first = queue(pipeline.engine, chain, authorize(chain, buyer, value=600 * 10**6))
    second = queue(pipeline.engine, chain, authorize(chain, buyer, value=600 * 10**6,
                                                     valid_before=chain_time(chain) + 120))
    assert _send(pipeline).sent == 2  # both simulate fine before either is mined
    report = _confirm(pipeline)
    assert (report.completed, report.confirmation_failed) == (1, 0)
    assert payment(pipeline.engine, first)["status"] == "completed"
    assert payment(pipeline.engine, second)["status"] == "sent"  # reverted, but its authorization is unused
    assert _confirm(pipeline).requeued == 1  # our nonce is spent: settle again under a new one
    assert payment(pipeline.engine, second)["status"] == "pending"
    from tasks.monitor import Thresholds, compute_metrics

    with pipeline.engine.connect() as conn:  # the revert cost our gas: the monitor counts it
        assert compute_metrics(conn, Thresholds()).reverted_settlements == 1
    # The simulation now reverts, but its calldata is public (anyone could still submit it while the
    # buyer's balance allows): not `failed` - the confirm stage waits for proof from the chain.
    assert _send(pipeline).handed_over == 1
    assert payment(pipeline.engine, second)["status"] == "sent"
    rpc(chain, "evm_increaseTime", [300])
    rpc(chain, "evm_mine", [])
    assert _confirm(pipeline).confirmation_failed == 1  # expired unused: proven
    failed = payment(pipeline.engine, second)
    assert failed["status"] == "confirmation_failed" and "expired" in failed["error"]
    assert mint_statuses(pipeline.engine) == {"released": 1, "cancelled": 1}


def test_dropped_transaction_is_rebroadcast_and_completes(pipeline: Pipeline, chain: Deployment) -> None:
    rpc(chain, "evm_setAutomine", [False])
    pid = queue(pipeline.engine, chain, authorize(chain, chain.buyers[0]))
    assert _send(pipeline).sent == 1
    (tx_hash,) = _hashes(pipeline.engine, pid)
    rpc(chain, "anvil_dropTransaction", [tx_hash])
    rpc(chain, "evm_mine", [])
    settings = dataclasses.replace(FAST, rebroadcast_after_seconds=1)
    assert _confirm(pipeline, settings).rebroadcast == 0  # too soon
    time.sleep(1.1)
    assert _confirm(pipeline, settings).rebroadcast == 1
    rpc(chain, "evm_mine", [])
    assert _confirm(pipeline, settings).completed == 1
    assert payment(pipeline.engine, pid)["tx_hash"] == tx_hash


def test_a_stuck_payment_is_fee_bumped_after_blocks_not_minutes(pipeline: Pipeline, chain: Deployment) -> None:
    rpc(chain, "evm_setAutomine", [False])
    before = balance(chain, chain.merchant)
    pid = queue(pipeline.engine, chain, authorize(chain, chain.buyers[1]))
    _send(pipeline)
    (first,) = _hashes(pipeline.engine, pid)
    rpc(chain, "anvil_dropTransaction", [first])  # not included, for whatever reason
    settings = dataclasses.replace(FAST, fee_bump_after_blocks=2)
    rpc(chain, "evm_mine", [])
    assert _confirm(pipeline, settings).replaced == 0  # one block: too soon
    rpc(chain, "evm_mine", [])
    report = _confirm(pipeline, settings)  # 2 blocks without inclusion, long before confirmation_timeout
    assert report.replaced == 1 and report.confirmation_failed == 0
    row = payment(pipeline.engine, pid)
    assert row["status"] == "sent"  # never failed while it could still land
    hashes = _hashes(pipeline.engine, pid)
    assert len(hashes) == 2
    with pipeline.engine.connect() as conn:
        fees = conn.execute(text("SELECT max_fee_per_gas, max_priority_fee_per_gas, nonce FROM payment_transactions "
                                 "WHERE payment_id = :p ORDER BY id"), {"p": pid}).all()
    assert fees[1].nonce == fees[0].nonce
    assert fees[1].max_fee_per_gas >= fees[0].max_fee_per_gas * 11 // 10
    assert fees[1].max_priority_fee_per_gas >= fees[0].max_priority_fee_per_gas * 11 // 10
    rpc(chain, "evm_mine", [])
    assert _confirm(pipeline, settings).completed == 1
    assert payment(pipeline.engine, pid)["tx_hash"] == hashes[1]
    assert balance(chain, chain.merchant) == before + PRICE  # one transfer


def test_stuck_payment_with_expired_authorization_is_confirmation_failed(
    pipeline: Pipeline, chain: Deployment
) -> None:
    rpc(chain, "evm_setAutomine", [False])
    before = balance(chain, chain.merchant)
    pid = queue(pipeline.engine, chain, authorize(chain, chain.buyers[2], valid_before=chain_time(chain) + 120))
    _send(pipeline)
    (tx_hash,) = _hashes(pipeline.engine, pid)
    rpc(chain, "anvil_dropTransaction", [tx_hash])
    rpc(chain, "evm_increaseTime", [600])
    rpc(chain, "evm_mine", [])
    _age_sent(pipeline.engine, 600)
    report = _confirm(pipeline)
    assert report.confirmation_failed == 1
    row = payment(pipeline.engine, pid)
    assert row["status"] == "confirmation_failed" and "expired" in row["error"]
    assert mint_statuses(pipeline.engine) == {"cancelled": 1}
    rpc(chain, "evm_mine", [])  # the re-broadcast bytes may still be mined: they can only revert
    assert balance(chain, chain.merchant) == before


def test_a_nonce_consumed_elsewhere_is_settled_again(pipeline: Pipeline, chain: Deployment) -> None:
    rpc(chain, "evm_setAutomine", [False])
    before = balance(chain, chain.merchant)
    pid = queue(pipeline.engine, chain, authorize(chain, chain.buyers[4]))
    _send(pipeline)
    (tx_hash,) = _hashes(pipeline.engine, pid)
    rpc(chain, "anvil_dropTransaction", [tx_hash])
    signer = pipeline.signers[0]
    stranger = sign_tx(signer.account.key, chain_id=chain.chain_id, nonce=payment(pipeline.engine, pid)["tx_nonce"],
                       to=signer.address, data=b"", gas=21_000, fees=Fees(10**11, 10**10))
    rpc(chain, "eth_sendRawTransaction", ["0x" + stranger.raw.hex()])
    rpc(chain, "evm_mine", [])
    assert _confirm(pipeline).confirmation_failed == 0  # the nonce outcome is recorded: not ours
    with pipeline.engine.connect() as conn:
        assert conn.execute(text("SELECT mined_hash FROM txm_nonces WHERE wallet = :w"),
                            {"w": signer.address}).scalar_one() is None
    assert _confirm(pipeline).requeued == 1
    rpc(chain, "evm_setAutomine", [True])
    assert _send(pipeline).sent == 1
    assert _confirm(pipeline).completed == 1
    assert balance(chain, chain.merchant) == before + PRICE


def test_confirmation_waits_for_the_required_depth(pipeline: Pipeline, chain: Deployment) -> None:
    pid = queue(pipeline.engine, chain, authorize(chain, chain.buyers[5]))
    _send(pipeline)
    deep = dataclasses.replace(FAST, confirmation_depth=3)
    report = _confirm(pipeline, deep)
    assert report.completed == 0 and report.waiting == 1
    assert mint_statuses(pipeline.engine) == {"waiting": 1}
    rpc(chain, "evm_mine", [])
    rpc(chain, "evm_mine", [])
    assert _confirm(pipeline, deep).completed == 1
    assert payment(pipeline.engine, pid)["status"] == "completed"


def test_rpc_outage_gives_claims_back_untouched(embedded_engine: Engine, chain: Deployment) -> None:
    queue_many(embedded_engine, chain, 3)
    healthy = Pipeline(engine=embedded_engine, w3=chain.w3(), chain_id=chain.chain_id, signers=[])
    from payments.config import signer_from_key

    healthy.signers = [signer_from_key("0x" + bytes(chain.signers[0].key).hex())]
    down = dataclasses.replace(healthy, w3=connect(f"http://127.0.0.1:{free_port()}", timeout=1))
    with pytest.raises(RpcError):
        _send(down)
    assert statuses(embedded_engine) == {"pending": 3}
    with embedded_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_transactions")).scalar_one() == 0
        errors = [r[0] for r in conn.execute(text("SELECT error FROM payment_queue"))]
    assert all("RPC batch" in e for e in errors)
    assert _send(healthy).sent == 3  # the same payments go through once the node is back


def test_two_lanes_settle_in_parallel_without_sharing_nonces(pipeline: Pipeline, chain: Deployment) -> None:
    queue_many(pipeline.engine, chain, 30)
    small = dataclasses.replace(FAST, payment_batch_size=15)
    assert _send(pipeline, small, lane=0).sent == 15
    assert _send(pipeline, small, lane=1).sent == 15
    _confirm(pipeline)
    with pipeline.engine.connect() as conn:
        per_signer = conn.execute(text(
            "SELECT signer, array_agg(tx_nonce ORDER BY tx_nonce) FROM payment_queue GROUP BY signer")).all()
    assert sorted(list(n) for _, n in per_signer) == [list(range(15)), list(range(15))]
    assert statuses(pipeline.engine) == {"completed": 30}


def test_signer_health_reads_balances_and_nonces(pipeline: Pipeline, chain: Deployment) -> None:
    from tasks.monitor import read_signer_health

    queue_many(pipeline.engine, chain, 2)
    _send(pipeline)
    first, second = read_signer_health(pipeline)
    w3 = chain.w3()
    assert first.balance_wei == w3.eth.get_balance(w3.to_checksum_address(first.address)) > 0
    assert (first.mined_nonce, first.pending_nonce, first.local_nonce, first.drift) == (2, 2, 2, 0)
    assert (second.mined_nonce, second.local_nonce, second.drift) == (0, None, 0)


def test_a_standby_run_takes_over_the_lanes_and_a_lost_connection_drops_them(pipeline: Pipeline) -> None:
    from tasks.common import Lanes

    first = Lanes(pipeline.engine, pipeline.chain_id, pipeline.signers)
    standby = Lanes(pipeline.engine, pipeline.chain_id, pipeline.signers)
    try:
        assert len(first.take()) == len(pipeline.signers)
        assert standby.take() == []  # every lane held: it stands by
        first.release()  # the first run ends (or dies: its connection closes)
        assert len(standby.take()) == len(pipeline.signers)  # taken over at its next tick
        assert standby.conn is not None
        pid = standby.conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        standby.conn.commit()
        with pipeline.engine.connect() as admin:  # as a PostgreSQL restart would: the locks go with it
            admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        assert standby.take() == []  # it knows it lost them, and does not crash
        assert len(standby.take()) == len(pipeline.signers)  # and takes them again on a new connection
    finally:
        first.release()
        standby.release()
