"""Schema, migrations and every guarded transition against a real PostgreSQL (embedded, and the CI
service when it answers)."""

from __future__ import annotations

import re
import threading
import time
import uuid

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from payments.config import SQL_DIR
from payments.db import fetch_all, query, transaction
from payments.eip3009 import TokenDomain, sign_authorization
from payments.errors import ConfigurationError, DuplicatePaymentError, InvalidPaymentError
from payments.intake import MintItem, enqueue_payment
from payments.migrate import current_revision, head_revision, upgrade
from payments.settings import read_settings, write_setting
from payments.statuses import MintStatus, PaymentStatus
from tests.helpers import claim_checks

KEY = "0x" + "11" * 32
TOKEN = "0x" + "aa" * 20
DOMAIN = TokenDomain("USD Coin", "2", 31337, TOKEN)
MINT = MintItem("0x" + "bb" * 20, "0x" + "cc" * 20, 10**18)
SIGNER = "0x" + "dd" * 20


def _queue(engine: Engine, n: int = 1, value: int = 1_000) -> list[str]:
    ids = []
    for _ in range(n):
        auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=value, valid_after=0,
                                  valid_before=2_000_000_000)
        pid, created = enqueue_payment(engine, chain_id=31337, token=TOKEN, auth=auth, mints=[MINT])
        assert created
        ids.append(pid)
    return ids


def _claim(engine: Engine, owner: str, limit: int) -> list[str]:
    with transaction(engine, owner) as conn:
        rows = fetch_all(conn, "claim_pending_payments", chain_id=31337, limit=limit, signer=SIGNER, owner=owner,
                         lease_seconds=60)
    return [r["id"] for r in rows]


def _attach(engine: Engine, owner: str, ids: list[str], first_nonce: int = 0) -> None:
    with transaction(engine, owner) as conn:
        fetch_all(conn, "attach_transactions", ids=ids, nonces=list(range(first_nonce, first_nonce + len(ids))),
                  hashes=["0x" + f"{i + first_nonce:064x}" for i in range(len(ids))], owner=owner,
                  sent_block=None)


def _status(engine: Engine, pid: str) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT status FROM payment_queue WHERE id = :i"), {"i": pid}).scalar_one())


def test_migrations_reach_head_and_are_idempotent(db_url: str) -> None:
    assert current_revision(db_url) == head_revision() == "018"
    upgrade(db_url)  # again: nothing to do, nothing fails
    assert current_revision(db_url) == "018"


def test_every_migration_file_has_a_revision() -> None:
    sql = sorted(p.stem for p in (SQL_DIR / "migrations").glob("*.sql"))
    py = sorted(p.stem for p in (SQL_DIR / "alembic" / "versions").glob("*.py"))
    assert sql == py and "006_update_payment_queue_status" in sql


def test_status_enum_matches_the_check_constraint(engine: Engine) -> None:
    with engine.connect() as conn:
        definition = conn.execute(text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'payment_queue_status_check'"
        )).scalar_one()
        mint_def = conn.execute(text(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname LIKE 'mint_queue_status_check'"
        )).scalar_one()
    assert set(re.findall(r"'(\w+)'", definition)) == {s.value for s in PaymentStatus}
    assert set(re.findall(r"'(\w+)'", mint_def)) == {s.value for s in MintStatus}


def test_the_queue_takes_contract_wallet_signatures_of_65_to_2048_bytes(engine: Engine) -> None:
    """The CHECK on payment_queue.signature (migration 016) holds what the intake accepts, written around it."""
    def insert(signature: str) -> None:
        with transaction(engine, "test") as conn:
            fetch_all(conn, "insert_payment", id=f"pay_{uuid.uuid4().hex}", chain_id=31337, token=TOKEN,
                      payer="0x" + "ee" * 20, pay_to="0x" + "22" * 20, amount=1, valid_after=0, valid_before=9,
                      auth_nonce="0x" + uuid.uuid4().hex * 2, signature=signature, authorization="{}")

    for length in (65, 66, 130, 2048):
        insert("0x" + "ab" * length)
    for bad in ("0x" + "ab" * 64, "0x" + "ab" * 2049, "0x" + "a" * 131, "0x" + "AB" * 65, "0x" + "zz" * 65,
                "ab" * 66):
        with pytest.raises(IntegrityError, match="payment_queue_signature_check"):
            insert(bad)


def test_seed_index_and_settings_exist(engine: Engine) -> None:
    with engine.connect() as conn:
        index = conn.execute(text(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_payment_queue_sent_processed'")).scalar_one()
        settings = read_settings(conn)
    assert "WHERE (status = 'sent'::text)" in index and "(status, processed_at)" in index
    assert settings.payment_batch_interval_ms == 4000 and settings.payment_batch_size == 10
    assert settings.confirmation_interval_ms == 2000 and settings.confirmation_batch_size == 20
    assert settings.confirmation_timeout_seconds == 300


def test_write_setting_validates_before_storing(engine: Engine) -> None:
    with engine.begin() as conn:
        write_setting(conn, "payment_batch_size", 100)
    with pytest.raises(ConfigurationError), engine.begin() as conn:
        write_setting(conn, "payment_batch_size", -1)
    with engine.connect() as conn:
        assert read_settings(conn).payment_batch_size == 100


def test_enqueue_is_idempotent_and_refuses_a_changed_body(engine: Engine) -> None:
    auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=5, valid_after=0, valid_before=2 * 10**9)
    first, created = enqueue_payment(engine, chain_id=31337, token=TOKEN, auth=auth, mints=[MINT])
    again, created_again = enqueue_payment(engine, chain_id=31337, token=TOKEN, auth=auth, mints=[MINT])
    assert created and not created_again and first == again
    other = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=6, valid_after=0,
                               valid_before=2 * 10**9, nonce=auth.nonce)
    with pytest.raises(DuplicatePaymentError) as err:
        enqueue_payment(engine, chain_id=31337, token=TOKEN, auth=other, mints=[MINT])
    assert err.value.existing_id == first
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_queue")).scalar_one() == 1
        assert conn.execute(text("SELECT count(*) FROM mint_queue")).scalar_one() == 1


def test_invalid_payment_writes_nothing(engine: Engine) -> None:
    auth = sign_authorization(KEY, DOMAIN, pay_to="0x" + "22" * 20, value=5, valid_after=0, valid_before=2 * 10**9)
    with pytest.raises(InvalidPaymentError):
        enqueue_payment(engine, chain_id=31337, token="not-an-address", auth=auth, mints=[MINT])
    with pytest.raises(InvalidPaymentError):
        enqueue_payment(engine, chain_id=31337, token=TOKEN, auth=auth, mints=[MintItem(TOKEN, TOKEN, 0)])
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM payment_queue")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM payment_events")).scalar_one() == 0


def test_concurrent_claimers_never_share_a_row(engine: Engine) -> None:
    ids = _queue(engine, 60)
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(4)

    def claimer(k: int) -> None:
        got: list[str] = []
        barrier.wait()
        while batch := _claim(engine, f"owner-{k}", 7):
            got += batch
        results[k] = got

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [pid for got in results.values() for pid in got]
    assert sorted(claimed) == sorted(ids) and len(set(claimed)) == len(claimed)


def test_a_claim_skips_rows_locked_by_an_uncommitted_claim(engine: Engine) -> None:
    ids = _queue(engine, 10)
    with transaction(engine, "slow-run") as slow:
        first = [r["id"] for r in fetch_all(slow, "claim_pending_payments", chain_id=31337, limit=6,
                                            signer=SIGNER, owner="slow-run", lease_seconds=60)]
        second = _claim(engine, "fast-run", 10)  # commits while the first claim is still open
        assert len(first) == 6 and len(second) == 4 and not set(first) & set(second)
    assert sorted(first + second) == sorted(ids)


def test_guarded_transitions_have_one_winner(engine: Engine) -> None:
    (pid,) = _queue(engine)
    assert _claim(engine, "a", 10) == [pid]
    assert _claim(engine, "b", 10) == []  # already processing
    with transaction(engine, "x") as conn:
        assert fetch_all(conn, "mark_sent", ids=[pid]) == []  # no tx attached yet: refused
    _attach(engine, "a", [pid])
    with transaction(engine, "a") as conn:
        assert [r["id"] for r in fetch_all(conn, "mark_sent", ids=[pid])] == [pid]
        assert fetch_all(conn, "mark_sent", ids=[pid]) == []  # second time: nothing
    block_hash = "0x" + "1" * 64
    done = {"ids": [pid], "blocks": [5], "hashes": ["0x" + "0" * 64], "block_hashes": [block_hash]}
    with transaction(engine, "c1") as conn:
        claim_checks(conn, [pid], "c1")
        assert fetch_all(conn, "complete_payments", owner="c2", **done) == []  # not the claim's owner
        assert len(fetch_all(conn, "complete_payments", owner="c1", **done)) == 1
    with transaction(engine, "c1") as conn:
        assert fetch_all(conn, "complete_payments", owner="c1", **done) == []
        assert fetch_all(conn, "fail_confirmation", ids=[pid], errors=["late"], blocks=[None], owner="c1") == []
    with engine.connect() as conn:
        mint = conn.execute(text("SELECT status FROM mint_queue WHERE payment_id = :p"), {"p": pid}).scalar_one()
    assert mint == "waiting"  # mints wait for mint_confirmation_depth
    with transaction(engine, "c1") as conn:
        assert fetch_all(conn, "release_settled_mints", ids=[pid], block_hashes=["0x" + "2" * 64], owner="c1") == []
        assert len(fetch_all(conn, "release_settled_mints", ids=[pid], block_hashes=[block_hash], owner="c1")) == 1
        assert fetch_all(conn, "release_settled_mints", ids=[pid], block_hashes=[block_hash], owner="c1") == []
        assert fetch_all(conn, "unsettle_payments", ids=[pid], errors=["reorg"], owner="c1") == []  # final
    with engine.connect() as conn:
        mint = conn.execute(text("SELECT status, released_at FROM mint_queue WHERE payment_id = :p"), {"p": pid}).one()
    assert mint.status == "released" and mint.released_at is not None
    assert _status(engine, pid) == "completed"


def test_confirmation_failure_cancels_mint_rows(engine: Engine) -> None:
    (pid,) = _queue(engine)
    _claim(engine, "a", 1)
    _attach(engine, "a", [pid])
    with transaction(engine, "a") as conn:
        fetch_all(conn, "mark_sent", ids=[pid])
        claim_checks(conn, [pid], "a")
        assert len(fetch_all(conn, "fail_confirmation", ids=[pid], errors=["expired"], blocks=[9], owner="a")) == 1
        assert fetch_all(conn, "complete_payments", ids=[pid], blocks=[9], hashes=["0x" + "0" * 64],
                         block_hashes=["0x" + "0" * 64], owner="a") == []
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM mint_queue")).scalar_one() == "cancelled"


def test_constraints_tie_columns_to_statuses(engine: Engine) -> None:
    (pid,) = _queue(engine)
    bad_updates = [
        "UPDATE payment_queue SET status = 'sent' WHERE id = :i",  # sent needs sent_at and processed_at
        "UPDATE payment_queue SET status = 'completed' WHERE id = :i",
        "UPDATE payment_queue SET status = 'completed', confirmed_at = now(), block_number = 1, sent_at = now(), "
        "processed_at = now() WHERE id = :i",  # completed names the transaction that settled it
        "UPDATE payment_queue SET final_at = now() WHERE id = :i",  # final only when completed
        f"UPDATE payment_queue SET tx_hash = '0x{'1' * 64}', tx_nonce = 1, signer = '{SIGNER}' WHERE id = :i",
        "UPDATE payment_queue SET status = 'processing' WHERE id = :i",
        "UPDATE payment_queue SET status = 'refunded' WHERE id = :i",
        "UPDATE payment_queue SET tx_nonce = 3 WHERE id = :i",
    ]
    for sql in bad_updates:
        with pytest.raises((IntegrityError, DBAPIError)), engine.begin() as conn:
            conn.execute(text(sql), {"i": pid})
    assert _status(engine, pid) == "pending"


def test_one_nonce_per_signer_across_payments(engine: Engine) -> None:
    a, b = _queue(engine, 2)
    _claim(engine, "o", 2)
    _attach(engine, "o", [a], first_nonce=4)
    with pytest.raises(IntegrityError), transaction(engine, "o") as conn:
        conn.execute(text("UPDATE payment_queue SET tx_nonce = 4, tx_hash = '0x" + "9" * 64 + "' WHERE id = :b"),
                     {"b": b})


def test_every_status_change_is_audited_and_the_audit_is_append_only(engine: Engine) -> None:
    (pid,) = _queue(engine)
    _claim(engine, "send-run-1", 1)
    _attach(engine, "send-run-1", [pid])
    with transaction(engine, "send-run-1") as conn:
        fetch_all(conn, "mark_sent", ids=[pid])
    with engine.connect() as conn:
        events = conn.execute(text(
            "SELECT from_status, to_status, actor FROM payment_events WHERE payment_id = :p ORDER BY id"), {"p": pid}
        ).all()
    assert [(e.from_status, e.to_status) for e in events] == [(None, "pending"), ("pending", "processing"),
                                                              ("processing", "sent")]
    assert events[1].actor == "send-run-1"
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("UPDATE payment_events SET actor = 'x'"))
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(text("DELETE FROM payment_events"))


def test_expired_leases_come_back_unless_a_tx_was_signed(engine: Engine) -> None:
    unsigned, signed = _queue(engine, 2)
    _claim(engine, "dead-run", 2)
    _attach(engine, "dead-run", [signed])
    with engine.begin() as conn:
        conn.execute(text("UPDATE payment_queue SET lease_expires_at = now() - interval '1 second'"))
    with transaction(engine, "next-run") as conn:
        released = [r["id"] for r in fetch_all(conn, "release_expired_leases", chain_id=31337, now=None)]
        orphans = fetch_all(conn, "claim_unbroadcast_payments", chain_id=31337, signer=SIGNER, owner="next-run",
                            lease_seconds=60, now=None)
    assert released == [unsigned] and _status(engine, unsigned) == "pending"
    assert [o["id"] for o in orphans] == [signed] and _status(engine, signed) == "processing"


def test_nonce_counter_takes_the_larger_of_local_and_chain(engine: Engine) -> None:
    def lock(chain_nonce: int) -> int:
        with engine.begin() as conn:
            return int(conn.execute(query("lock_signer_nonce"),
                                    {"chain_id": 1, "signer": SIGNER, "chain_nonce": chain_nonce}).scalar_one())
    assert lock(5) == 5
    with engine.begin() as conn:
        conn.execute(query("advance_signer_nonce"), {"chain_id": 1, "signer": SIGNER, "expected": 5, "next_nonce": 9})
    assert lock(7) == 9  # local ahead (txs not yet seen by the node): keep ours
    assert lock(12) == 12  # chain ahead (someone else used the wallet): follow the chain


def test_nonce_row_lock_serialises_batches(engine: Engine) -> None:
    order: list[str] = []
    with engine.begin() as conn:
        conn.execute(query("lock_signer_nonce"), {"chain_id": 1, "signer": SIGNER, "chain_nonce": 0})

    def second() -> None:
        with engine.begin() as conn:
            conn.execute(query("lock_signer_nonce"), {"chain_id": 1, "signer": SIGNER, "chain_nonce": 0})
            order.append("second")

    with engine.begin() as conn:
        conn.execute(query("lock_signer_nonce"), {"chain_id": 1, "signer": SIGNER, "chain_nonce": 0})
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        order.append("first")
    t.join()
    assert order == ["first", "second"]
