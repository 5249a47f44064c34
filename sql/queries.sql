-- Named statements used by the pipeline. Every status change is one statement guarded by the expected
-- old status; the number of rows it returns says who won.

-- insert_payment --
INSERT INTO payment_queue (id, chain_id, token, payer, pay_to, amount, valid_after, valid_before,
                           auth_nonce, signature, "authorization")
VALUES (:id, :chain_id, :token, :payer, :pay_to, :amount, :valid_after, :valid_before,
        :auth_nonce, :signature, CAST(:authorization AS jsonb))
ON CONFLICT ON CONSTRAINT payment_queue_authorization_unique DO NOTHING
RETURNING id

-- find_payment_by_authorization --
-- The payment an authorization already pays for, with what it buys: a request carrying the same
-- authorization again is answered from here (idempotent intake) before anything is verified.
SELECT p.id, p.status, p.pay_to, p.amount, p.valid_after, p.valid_before, p.signature,
       coalesce((SELECT json_agg(json_build_array(m.mint_token, m.recipient, m.amount::text) ORDER BY m.id)
                 FROM mint_queue m WHERE m.payment_id = p.id), '[]') AS mints
FROM payment_queue p
WHERE p.chain_id = :chain_id AND p.token = :token AND p.payer = :payer AND p.auth_nonce = :auth_nonce

-- lock_payer --
-- Held until the intake transaction ends: one payer's exposure check and insert never interleave.
SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))

-- payer_open_exposure --
SELECT count(*) AS open_count, coalesce(sum(amount), 0) AS open_amount
FROM payment_queue
WHERE chain_id = :chain_id AND token = :token AND payer = :payer AND status IN ('pending', 'processing', 'sent')

-- insert_mint_rows --
INSERT INTO mint_queue (payment_id, mint_token, recipient, amount)
SELECT :payment_id, v.mint_token, v.recipient, v.amount
FROM unnest(CAST(:mint_tokens AS text[]), CAST(:recipients AS text[]), CAST(:amounts AS numeric[]))
     AS v(mint_token, recipient, amount)

-- release_expired_leases --
-- A send run that died before it persisted a transaction: its claims go back to pending.
UPDATE payment_queue
SET status = 'pending', signer = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
    error = 'lease expired before a transaction was signed; requeued'
WHERE chain_id = :chain_id AND status = 'processing' AND tx_hash IS NULL
  AND lease_expires_at < coalesce(CAST(:now AS timestamptz), now())
RETURNING id

-- claim_pending_payments --
WITH claimable AS (
    SELECT id FROM payment_queue
    WHERE chain_id = :chain_id AND status = 'pending'
    ORDER BY created_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE payment_queue p
SET status = 'processing', signer = :signer, lease_owner = :owner,
    lease_expires_at = now() + make_interval(secs => :lease_seconds),
    attempts = p.attempts + 1, error = NULL, updated_at = now()
FROM claimable
WHERE p.id = claimable.id AND p.status = 'pending'
RETURNING p.id, p.token, p.payer, p.pay_to, p.amount, p.valid_after, p.valid_before, p.auth_nonce, p.signature,
          p.created_at, EXISTS (SELECT 1 FROM payment_transactions t WHERE t.payment_id = p.id) AS signed_before

-- claim_unbroadcast_payments --
-- Signed and persisted by a run that died before it wrote `sent`: the same bytes get re-broadcast.
WITH orphaned AS (
    SELECT id FROM payment_queue
    WHERE chain_id = :chain_id AND signer = :signer AND status = 'processing' AND tx_hash IS NOT NULL
      AND lease_expires_at < coalesce(CAST(:now AS timestamptz), now())
    ORDER BY tx_nonce
    FOR UPDATE SKIP LOCKED
)
UPDATE payment_queue p
SET lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :lease_seconds), updated_at = now()
FROM orphaned
WHERE p.id = orphaned.id
RETURNING p.id, p.tx_nonce, p.tx_hash

-- fail_processing_payments --
-- Simulation proved the settlement would revert: nothing was signed, no nonce spent. Only for payments we
-- never signed a transaction for: otherwise its calldata is public and could still be settled by anyone.
WITH failed AS (
    UPDATE payment_queue p
    SET status = 'failed', error = v.error, processed_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[])) AS v(id, error)
    WHERE p.id = v.id AND p.status = 'processing' AND p.lease_owner = :owner AND p.tx_hash IS NULL
      AND NOT EXISTS (SELECT 1 FROM payment_transactions t WHERE t.payment_id = p.id)
    RETURNING p.id
), cancelled AS (
    UPDATE mint_queue m SET status = 'cancelled', cancelled_at = now()
    FROM failed WHERE m.payment_id = failed.id AND m.status = 'waiting'
    RETURNING m.id
)
SELECT id FROM failed

-- release_processing_payments --
-- A transient problem (RPC down) before signing: give the claims back at once.
UPDATE payment_queue
SET status = 'pending', signer = NULL, lease_owner = NULL, lease_expires_at = NULL, error = :error,
    updated_at = now()
WHERE id = ANY(CAST(:ids AS text[])) AND status = 'processing' AND lease_owner = :owner AND tx_hash IS NULL
RETURNING id

-- release_owned_claims --
-- A send run that ends (its window, a cancellation, a shutdown) gives back what it claimed and did not
-- sign, at once, instead of leaving it to its lease.
UPDATE payment_queue
SET status = 'pending', signer = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
    error = 'the send run ended before signing; requeued'
WHERE status = 'processing' AND lease_owner = :owner AND tx_hash IS NULL
RETURNING id

-- lock_owned_unsigned_payments --
SELECT id FROM payment_queue
WHERE id = ANY(CAST(:ids AS text[])) AND status = 'processing' AND lease_owner = :owner AND tx_hash IS NULL
ORDER BY created_at, id
FOR UPDATE

-- lock_signer_nonce --
INSERT INTO signer_nonces (chain_id, signer, next_nonce) VALUES (:chain_id, :signer, :chain_nonce)
ON CONFLICT (chain_id, signer) DO UPDATE
    SET next_nonce = greatest(signer_nonces.next_nonce, EXCLUDED.next_nonce), updated_at = now()
RETURNING next_nonce

-- advance_signer_nonce --
UPDATE signer_nonces SET next_nonce = :next_nonce, updated_at = now()
WHERE chain_id = :chain_id AND signer = :signer AND next_nonce = :expected
RETURNING next_nonce

-- insert_transactions --
-- Attempts are stored before they are broadcast; identical bytes signed twice are stored once.
INSERT INTO payment_transactions (chain_id, signer, nonce, tx_hash, payment_id, mint_id, kind, raw_tx,
                                  max_fee_per_gas, max_priority_fee_per_gas, gas_limit, signed_block, fee_capped)
SELECT :chain_id, :signer, v.nonce, v.tx_hash, v.payment_id, v.mint_id, v.kind, v.raw_tx, v.max_fee, v.max_tip,
       v.gas_limit, CAST(:signed_block AS bigint), v.capped
FROM unnest(CAST(:nonces AS bigint[]), CAST(:hashes AS text[]), CAST(:payment_ids AS text[]),
            CAST(:mint_ids AS bigint[]), CAST(:kinds AS text[]), CAST(:raws AS bytea[]),
            CAST(:max_fees AS numeric[]), CAST(:max_tips AS numeric[]), CAST(:gas_limits AS bigint[]),
            CAST(:capped AS boolean[]))
     AS v(nonce, tx_hash, payment_id, mint_id, kind, raw_tx, max_fee, max_tip, gas_limit, capped)
ON CONFLICT (tx_hash) DO NOTHING
RETURNING id

-- txm_open_attempts --
-- The latest attempt at each open nonce of a wallet, every hash at that nonce, and what its intent is now.
SELECT DISTINCT ON (t.nonce)
       t.nonce, t.tx_hash, t.kind, t.payment_id, t.mint_id, t.raw_tx, t.max_fee_per_gas, t.max_priority_fee_per_gas,
       t.gas_limit, t.signed_block, t.last_broadcast_error,
       extract(epoch FROM now() - t.broadcast_at) AS broadcast_age,
       a.hashes, p.status AS payment_status, p.valid_before, p.tx_hash AS payment_tx_hash,
       m.status AS mint_status, m.tx_hash AS mint_tx_hash
FROM payment_transactions t
JOIN LATERAL (SELECT array_agg(x.tx_hash) AS hashes FROM payment_transactions x
              WHERE x.chain_id = t.chain_id AND x.signer = t.signer AND x.nonce = t.nonce) a ON true
LEFT JOIN payment_queue p ON p.id = t.payment_id
LEFT JOIN mint_queue m ON m.id = t.mint_id
WHERE t.chain_id = :chain_id AND t.signer = :wallet AND t.nonce >= :low AND t.nonce < :high
ORDER BY t.nonce, t.id DESC

-- txm_unrecorded_nonces --
-- Nonces the chain consumed (below :below) whose outcome is not recorded yet, oldest first.
SELECT t.nonce, array_agg(t.tx_hash ORDER BY t.id) AS hashes
FROM payment_transactions t
WHERE t.chain_id = :chain_id AND t.signer = :wallet AND t.nonce < :below
  AND t.nonce > coalesce((SELECT max(n.nonce) FROM txm_nonces n
                          WHERE n.chain_id = :chain_id AND n.wallet = :wallet), -1)
GROUP BY t.nonce
ORDER BY t.nonce
LIMIT :limit

-- record_nonce_outcomes --
INSERT INTO txm_nonces (chain_id, wallet, nonce, mined_hash, block_number, block_hash, status)
SELECT :chain_id, :wallet, v.nonce, v.mined_hash, v.block_number, v.block_hash, v.status
FROM unnest(CAST(:nonces AS bigint[]), CAST(:hashes AS text[]), CAST(:blocks AS bigint[]),
            CAST(:block_hashes AS text[]), CAST(:statuses AS smallint[]))
     AS v(nonce, mined_hash, block_number, block_hash, status)
ON CONFLICT DO NOTHING

-- attach_transactions --
UPDATE payment_queue p
SET tx_nonce = v.nonce, tx_hash = v.tx_hash, sent_block = :sent_block, updated_at = now()
FROM unnest(CAST(:ids AS text[]), CAST(:nonces AS bigint[]), CAST(:hashes AS text[])) AS v(id, nonce, tx_hash)
WHERE p.id = v.id AND p.status = 'processing' AND p.lease_owner = :owner AND p.tx_hash IS NULL
RETURNING p.id

-- raw_transactions_for_hashes --
SELECT tx_hash, raw_tx, nonce FROM payment_transactions WHERE tx_hash = ANY(CAST(:hashes AS text[])) ORDER BY nonce

-- record_broadcasts --
UPDATE payment_transactions t
SET broadcast_at = now(), broadcast_count = t.broadcast_count + 1, last_broadcast_error = v.error
FROM unnest(CAST(:hashes AS text[]), CAST(:errors AS text[])) AS v(tx_hash, error)
WHERE t.tx_hash = v.tx_hash

-- mark_sent --
UPDATE payment_queue
SET status = 'sent', sent_at = now(), processed_at = now(), lease_owner = NULL, lease_expires_at = NULL,
    error = NULL, updated_at = now()
WHERE id = ANY(CAST(:ids AS text[])) AND status = 'processing' AND tx_hash IS NOT NULL
RETURNING id

-- note_processing_error --
UPDATE payment_queue SET error = v.error, updated_at = now()
FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[])) AS v(id, error)
WHERE payment_queue.id = v.id AND payment_queue.status = 'processing'

-- claim_confirmations --
-- Confirm work: `sent` payments and completed ones whose mints are not released yet, least recently
-- checked first (stuck rows cannot starve the rest), under a lease so overlapping confirm runs and
-- recovery flows never act on one payment at once.
WITH c AS (
    SELECT id FROM payment_queue
    WHERE chain_id = :chain_id AND (status = 'sent' OR (status = 'completed' AND final_at IS NULL))
      AND (check_expires_at IS NULL OR check_expires_at < now())
      AND (CAST(:ids AS text[]) IS NULL OR id = ANY(CAST(:ids AS text[])))
    ORDER BY checked_at NULLS FIRST, created_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE payment_queue p
SET check_owner = :owner, check_expires_at = now() + make_interval(secs => :lease_seconds), checked_at = now()
FROM c WHERE p.id = c.id
RETURNING p.id, p.status, p.token, p.payer, p.pay_to, p.amount, p.valid_before, p.auth_nonce, p.signer, p.tx_nonce,
          p.tx_hash, p.block_number, p.block_hash, p.sent_block, p.attempts,
          extract(epoch FROM now() - p.sent_at) AS age_seconds,
          EXISTS (SELECT 1 FROM txm_nonces n WHERE n.chain_id = p.chain_id AND n.wallet = p.signer
                  AND n.nonce = p.tx_nonce) AS nonce_final

-- requeue_settlements --
-- Our transaction's nonce was consumed at depth without settling (it reverted, or a transaction we did
-- not sign took the nonce) while the authorization is unused and valid: settle it again under a new
-- nonce. EIP-3009 lets an authorization move funds once, so a second settlement cannot pay twice.
UPDATE payment_queue p
SET status = 'pending', signer = NULL, tx_nonce = NULL, tx_hash = NULL, sent_at = NULL, processed_at = NULL,
    sent_block = NULL, lease_owner = NULL, lease_expires_at = NULL, error = v.error, updated_at = now()
FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[])) AS v(id, error)
WHERE p.id = v.id AND p.status = 'sent' AND p.check_owner = :owner
RETURNING p.id

-- hand_over_to_confirm --
-- Simulation says the authorization is already used or cancelled (someone else's transaction, mined or
-- still pending), or it reverts for a payment whose calldata we already made public: nothing is signed
-- and the confirm stage decides from the chain (completed if it is used with the transfer, settled again
-- if it is unused and valid, confirmation_failed once expired or cancelled) - never `failed` here.
UPDATE payment_queue p
SET status = 'sent', sent_block = NULL, sent_at = now(), processed_at = now(), lease_owner = NULL,
    lease_expires_at = NULL, error = v.error, updated_at = now()
FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[])) AS v(id, error)
WHERE p.id = v.id AND p.status = 'processing' AND p.lease_owner = :owner AND p.tx_hash IS NULL
RETURNING p.id

-- end_confirmation_claims --
UPDATE payment_queue SET check_owner = NULL, check_expires_at = NULL
WHERE id = ANY(CAST(:ids AS text[])) AND check_owner = :owner

-- complete_payments --
-- The authorization is used on chain at confirmation_depth: completed, with the transaction (ours or
-- anyone's) and block that settled it. Mints wait for mint_confirmation_depth (release_settled_mints).
UPDATE payment_queue p
SET status = 'completed', confirmed_at = now(), block_number = v.block_number, block_hash = v.block_hash,
    tx_hash = v.tx_hash, error = NULL, updated_at = now()
FROM unnest(CAST(:ids AS text[]), CAST(:blocks AS bigint[]), CAST(:block_hashes AS text[]), CAST(:hashes AS text[]))
     AS v(id, block_number, block_hash, tx_hash)
WHERE p.id = v.id AND p.status = 'sent' AND p.check_owner = :owner
RETURNING p.id

-- release_settled_mints --
-- Callback: the settlement is mint_confirmation_depth deep in the same block it was found in. The
-- payment becomes final and its mint rows are released in the same statement, exactly once.
WITH final AS (
    UPDATE payment_queue p SET final_at = now(), updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:block_hashes AS text[])) AS v(id, block_hash)
    WHERE p.id = v.id AND p.status = 'completed' AND p.final_at IS NULL AND p.block_hash = v.block_hash
      AND p.check_owner = :owner
    RETURNING p.id
), released AS (
    UPDATE mint_queue m SET status = 'released', released_at = now()
    FROM final WHERE m.payment_id = final.id AND m.status = 'waiting'
    RETURNING m.id
)
SELECT id FROM final

-- unsettle_payments --
-- A reorg removed (or moved) the settlement before the mints were released: back to `sent`; the next
-- pass finds it again wherever the chain has it now.
UPDATE payment_queue p
SET status = 'sent', confirmed_at = NULL, block_number = NULL, block_hash = NULL, error = v.error, updated_at = now()
FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[])) AS v(id, error)
WHERE p.id = v.id AND p.status = 'completed' AND p.final_at IS NULL AND p.check_owner = :owner
RETURNING p.id

-- fail_confirmation --
-- Proven on chain that the payment can never settle (authorization expired unused at a final block,
-- or cancelled): confirmation_failed, mint rows cancelled.
WITH failed AS (
    UPDATE payment_queue p
    SET status = 'confirmation_failed', error = v.error, block_number = v.block_number, updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[]), CAST(:blocks AS bigint[]))
         AS v(id, error, block_number)
    WHERE p.id = v.id AND p.status = 'sent' AND p.check_owner = :owner
    RETURNING p.id
), cancelled AS (
    UPDATE mint_queue m SET status = 'cancelled', cancelled_at = now()
    FROM failed WHERE m.payment_id = failed.id AND m.status = 'waiting'
    RETURNING m.id
)
SELECT id FROM failed

-- status_counts --
SELECT status, count(*) AS n FROM payment_queue GROUP BY status

-- monitor_open_payments --
-- Payments the monitor judges by age: everything not yet terminal.
SELECT id, status, created_at, processed_at, sent_at, lease_expires_at
FROM payment_queue
WHERE status IN ('pending', 'processing', 'sent')

-- monitor_recent_outcomes --
-- Payments that reached a terminal state inside the window.
SELECT id, status, created_at, processed_at, confirmed_at, updated_at
FROM payment_queue
WHERE status IN ('completed', 'failed', 'confirmation_failed')
  AND updated_at >= coalesce(CAST(:now AS timestamptz), now()) - make_interval(mins => :window_minutes)

-- recovery_candidates --
-- Payments a recovery flow looks at: by status, optionally by id, and not touched for :older_than seconds.
SELECT id, status, chain_id, token, payer, auth_nonce, valid_before, signer, tx_nonce, tx_hash,
       lease_expires_at, sent_at, updated_at, block_hash, sent_block,
       extract(epoch FROM now() - sent_at) AS age_seconds
FROM payment_queue
WHERE chain_id = :chain_id
  AND status = ANY(CAST(:statuses AS text[]))
  AND (CAST(:ids AS text[]) IS NULL OR id = ANY(CAST(:ids AS text[])))
  AND updated_at <= now() - make_interval(secs => :older_than)
ORDER BY created_at
LIMIT :limit

-- hashes_of_payments --
SELECT payment_id, array_agg(tx_hash ORDER BY id) AS hashes
FROM payment_transactions
WHERE payment_id = ANY(CAST(:ids AS text[]))
GROUP BY payment_id

-- release_stuck_processing --
-- reset_stuck_payments: expired leases with nothing signed go back to pending.
UPDATE payment_queue
SET status = 'pending', signer = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
    error = :reason
WHERE id = ANY(CAST(:ids AS text[])) AND status = 'processing' AND tx_hash IS NULL AND lease_expires_at < now()
RETURNING id

-- recover_completed_payments --
-- recheck_confirmation_failed: the chain shows the payment did land (a failed or confirmation_failed
-- payment whose authorization someone used after all); its mint rows come back from cancelled and are
-- released, once, by the statement that moves the payment.
WITH done AS (
    UPDATE payment_queue p
    SET status = 'completed', confirmed_at = now(), final_at = now(), block_number = v.block_number,
        block_hash = v.block_hash, tx_hash = v.tx_hash, error = v.note, updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:blocks AS bigint[]), CAST(:block_hashes AS text[]),
                CAST(:hashes AS text[]), CAST(:notes AS text[]))
         AS v(id, block_number, block_hash, tx_hash, note)
    WHERE p.id = v.id AND p.status IN ('confirmation_failed', 'failed')
    RETURNING p.id
), released AS (
    UPDATE mint_queue m SET status = 'released', released_at = now(), cancelled_at = NULL
    FROM done WHERE m.payment_id = done.id AND m.status IN ('waiting', 'cancelled')
    RETURNING m.id
)
SELECT id FROM done

-- requeue_failed_payments --
-- requeue_failed: only payments for which nothing was ever signed; their mint rows wait again.
WITH requeued AS (
    UPDATE payment_queue p
    SET status = 'pending', error = NULL, signer = NULL, processed_at = NULL, lease_owner = NULL,
        lease_expires_at = NULL, updated_at = now()
    WHERE p.id = ANY(CAST(:ids AS text[])) AND p.status = 'failed' AND p.tx_hash IS NULL
      AND NOT EXISTS (SELECT 1 FROM payment_transactions t WHERE t.payment_id = p.id)
    RETURNING p.id
), waiting AS (
    UPDATE mint_queue m SET status = 'waiting', cancelled_at = NULL
    FROM requeued WHERE m.payment_id = requeued.id AND m.status = 'cancelled'
    RETURNING m.id
)
SELECT id FROM requeued

-- rollback_payments_to_failed --
-- rollback_to_failed (the seed's rollback procedure), only for payments the chain shows cannot land.
WITH failed AS (
    UPDATE payment_queue p
    SET status = 'failed', error = :reason, processed_at = coalesce(p.processed_at, now()), updated_at = now()
    WHERE p.id = ANY(CAST(:ids AS text[])) AND p.status IN ('sent', 'confirmation_failed')
    RETURNING p.id
), cancelled AS (
    UPDATE mint_queue m SET status = 'cancelled', cancelled_at = now()
    FROM failed WHERE m.payment_id = failed.id AND m.status = 'waiting'
    RETURNING m.id
)
SELECT id FROM failed

-- insert_recovery_actions --
INSERT INTO recovery_actions (flow, payment_id, action, outcome, detail, dry_run, actor)
SELECT :flow, v.payment_id, v.action, v.outcome, v.detail, :dry_run, :actor
FROM unnest(CAST(:payment_ids AS text[]), CAST(:actions AS text[]), CAST(:outcomes AS text[]),
            CAST(:details AS text[])) AS v(payment_id, action, outcome, detail)

-- signer_counter --
SELECT next_nonce FROM signer_nonces WHERE chain_id = :chain_id AND signer = :signer

-- transactions_by_hashes --
SELECT t.tx_hash, t.payment_id, t.kind, t.nonce, p.status AS payment_status
FROM payment_transactions t LEFT JOIN payment_queue p ON p.id = t.payment_id
WHERE t.tx_hash = ANY(CAST(:hashes AS text[]))

-- db_now --
SELECT now()

-- open_alert --
-- Opens an alert once: a second monitor run racing this one finds it open and notifies nothing.
INSERT INTO monitor_alerts (key, status, message, opened_at, last_notified_at)
VALUES (:key, 'open', :message, now(), now())
ON CONFLICT (key) DO UPDATE
    SET status = 'open', message = EXCLUDED.message, opened_at = now(), last_notified_at = now(), resolved_at = NULL
    WHERE monitor_alerts.status = 'resolved'
RETURNING key

-- remind_alert --
UPDATE monitor_alerts SET last_notified_at = now(), message = :message
WHERE key = :key AND status = 'open' AND last_notified_at <= now() - make_interval(secs => :every)
RETURNING key

-- resolve_alerts --
UPDATE monitor_alerts SET status = 'resolved', resolved_at = now()
WHERE status = 'open' AND NOT (key = ANY(CAST(:keys AS text[])))
RETURNING key, message

-- insert_monitor_sample --
INSERT INTO monitor_samples (queue_depth, sent, sent_age_max, confirmation_rate, counts, sent_age_mean, sent_age_p95,
                             processing_time_p50, processing_time_p95, window_minutes)
VALUES (:queue_depth, :sent, :sent_age_max, :confirmation_rate, CAST(:counts AS jsonb), :sent_age_mean, :sent_age_p95,
        :processing_time_p50, :processing_time_p95, :window_minutes)

-- latest_monitor_sample --
SELECT at, counts, sent_age_mean, sent_age_p95, confirmation_rate, processing_time_p50, processing_time_p95,
       window_minutes
FROM monitor_samples ORDER BY at DESC LIMIT 1

-- open_queue_figures --
-- The open part of the queue for GET /api/payment-stats: each count stops at :cap (index-only scans of
-- the partial indexes on pending, processing and sent), the oldest sent payment from its own index.
SELECT (SELECT count(*) FROM (SELECT 1 FROM payment_queue WHERE status = 'pending' LIMIT :cap) p) AS pending,
       (SELECT count(*) FROM (SELECT 1 FROM payment_queue WHERE status = 'processing' LIMIT :cap) p) AS processing,
       (SELECT count(*) FROM (SELECT 1 FROM payment_queue WHERE status = 'sent' LIMIT :cap) p) AS sent,
       (SELECT extract(epoch FROM now() - min(sent_at)) FROM payment_queue WHERE status = 'sent') AS oldest_sent_age

-- recent_monitor_samples --
SELECT at, queue_depth, sent, sent_age_max, confirmation_rate
FROM monitor_samples WHERE at >= now() - make_interval(mins => :minutes) ORDER BY at

-- prune_monitor_samples --
DELETE FROM monitor_samples WHERE at < now() - make_interval(days => :days)

-- find_product --
SELECT id, chain_id, mint_token, payment_token, price_per_unit, amount_per_unit, pay_to, max_quantity
FROM mint_products
WHERE active AND chain_id = :chain_id AND (id = :token OR mint_token = lower(:token))

-- upsert_product --
INSERT INTO mint_products (id, chain_id, mint_token, payment_token, price_per_unit, amount_per_unit, pay_to,
                           max_quantity, active)
VALUES (:id, :chain_id, :mint_token, :payment_token, :price_per_unit, :amount_per_unit, :pay_to, :max_quantity,
        :active)
ON CONFLICT (id) DO UPDATE SET
    mint_token = EXCLUDED.mint_token, payment_token = EXCLUDED.payment_token,
    price_per_unit = EXCLUDED.price_per_unit, amount_per_unit = EXCLUDED.amount_per_unit, pay_to = EXCLUDED.pay_to,
    max_quantity = EXCLUDED.max_quantity, active = EXCLUDED.active, updated_at = now()
RETURNING id

-- payment_status --
SELECT id, chain_id, status, payer, pay_to, token, amount, tx_hash, tx_nonce, block_number, error, created_at,
       processed_at, sent_at, confirmed_at, updated_at
FROM payment_queue WHERE id = :id

-- payment_transactions_of --
SELECT tx_hash, nonce, kind, created_at, broadcast_at, broadcast_count, last_broadcast_error
FROM payment_transactions WHERE payment_id = :id ORDER BY id

-- payment_mints --
SELECT mint_token, recipient, amount, status, tx_hash, error, released_at, cancelled_at FROM mint_queue
WHERE payment_id = :id ORDER BY id

-- payment_protocol_version --
SELECT coalesce(("authorization" ->> 'x402Version')::int, 2) FROM payment_queue WHERE id = :id

-- any_payment_token --
SELECT payment_token FROM mint_products WHERE active ORDER BY created_at LIMIT 1

-- release_expired_mint_leases --
UPDATE mint_queue SET status = 'released', minter = NULL, lease_owner = NULL, lease_expires_at = NULL,
                      error = 'mint lease expired before a transaction was signed'
WHERE status = 'minting' AND tx_hash IS NULL AND lease_expires_at < now()
RETURNING id

-- claim_released_mints --
WITH claimable AS (
    SELECT m.id FROM mint_queue m JOIN payment_queue p ON p.id = m.payment_id
    WHERE m.status = 'released' AND p.chain_id = :chain_id AND p.status = 'completed'
    ORDER BY m.released_at, m.id
    LIMIT :limit
    FOR UPDATE OF m SKIP LOCKED
)
UPDATE mint_queue m
SET status = 'minting', minter = :minter, lease_owner = :owner,
    lease_expires_at = now() + make_interval(secs => :lease_seconds), attempts = m.attempts + 1, error = NULL
FROM claimable WHERE m.id = claimable.id AND m.status = 'released'
RETURNING m.id, m.mint_token, m.recipient, m.amount

-- fail_mints --
UPDATE mint_queue m SET status = 'failed', error = v.error, lease_owner = NULL, lease_expires_at = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[])) AS v(id, error)
WHERE m.id = v.id AND m.status = 'minting'
RETURNING m.id

-- attach_mint_transactions --
UPDATE mint_queue m SET tx_nonce = v.nonce, tx_hash = v.tx_hash
FROM unnest(CAST(:ids AS bigint[]), CAST(:nonces AS bigint[]), CAST(:hashes AS text[])) AS v(id, nonce, tx_hash)
WHERE m.id = v.id AND m.status = 'minting' AND m.lease_owner = :owner AND m.tx_hash IS NULL
RETURNING m.id

-- lock_owned_unsigned_mints --
SELECT id FROM mint_queue
WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'minting' AND lease_owner = :owner AND tx_hash IS NULL
ORDER BY id
FOR UPDATE

-- load_minting --
-- Mints being sent, least recently checked first: their mint id, every stored attempt, and the recorded
-- outcome of their nonce (NULL while it is open).
WITH picked AS (
    SELECT m.id FROM mint_queue m
    WHERE m.status = 'minting' AND (m.tx_hash IS NOT NULL OR m.mint_key IS NOT NULL)
    ORDER BY m.checked_at NULLS FIRST, m.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), touched AS (
    UPDATE mint_queue m SET checked_at = now() FROM picked WHERE m.id = picked.id
    RETURNING m.id, m.mint_token, m.mint_key, m.minter, m.tx_nonce
)
SELECT t.id, t.mint_token, t.mint_key, t.minter, t.tx_nonce,
       coalesce(a.hashes, ARRAY[]::text[]) AS hashes, a.first_block,
       n.nonce IS NOT NULL AS nonce_final, n.mined_hash, n.status AS mined_status
FROM touched t
LEFT JOIN LATERAL (SELECT array_agg(x.tx_hash ORDER BY x.id) AS hashes, min(x.signed_block) AS first_block
                   FROM payment_transactions x WHERE x.mint_id = t.id) a ON true
LEFT JOIN txm_nonces n ON n.chain_id = :chain_id AND n.wallet = t.minter AND n.nonce = t.tx_nonce
ORDER BY t.id

-- note_mint_keys --
UPDATE mint_queue m SET mint_key = v.mint_key
FROM unnest(CAST(:ids AS bigint[]), CAST(:keys AS text[])) AS v(id, mint_key)
WHERE m.id = v.id AND m.status = 'minting'

-- finish_mints --
UPDATE mint_queue m SET status = 'minted', minted_at = now(), block_number = v.block_number, tx_hash = v.tx_hash,
                        block_hash = v.block_hash, lease_owner = NULL, lease_expires_at = NULL, error = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:blocks AS bigint[]), CAST(:hashes AS text[]), CAST(:block_hashes AS text[]))
     AS v(id, block_number, tx_hash, block_hash)
WHERE m.id = v.id AND m.status = 'minting'
RETURNING m.id

-- upsert_webhook_endpoint --
INSERT INTO webhook_endpoints (product_id, url, secret_ref, active) VALUES (:product_id, :url, :secret_ref, :active)
ON CONFLICT (product_id, url) DO UPDATE SET secret_ref = EXCLUDED.secret_ref, active = EXCLUDED.active
RETURNING id

-- claim_due_webhooks --
-- Taken deliveries are pushed 60 s into the future while they are being sent, so a crashed deliverer's
-- deliveries come back by themselves (and are then sent again with the same event id).
WITH due AS (
    SELECT id FROM webhook_deliveries
    WHERE status = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d SET next_attempt_at = now() + interval '60 seconds'
FROM due WHERE d.id = due.id
RETURNING d.id, d.event_id, d.event, d.payload, d.attempts,
          (SELECT url FROM webhook_endpoints e WHERE e.id = d.endpoint_id) AS url,
          (SELECT secret_ref FROM webhook_endpoints e WHERE e.id = d.endpoint_id) AS secret_ref

-- record_webhook_attempt --
WITH attempt AS (
    INSERT INTO webhook_attempts (delivery_id, http_status, error, duration_ms)
    VALUES (:id, :http_status, :error, :duration_ms)
)
UPDATE webhook_deliveries
SET attempts = attempts + 1, last_status = :http_status, last_error = :error,
    status = CASE WHEN :ok THEN 'delivered' WHEN attempts + 1 >= :max_attempts THEN 'failed' ELSE 'pending' END,
    delivered_at = CASE WHEN :ok THEN now() END,
    next_attempt_at = now() + make_interval(secs => least(3600, :backoff * power(2, attempts)))
WHERE id = :id AND status = 'pending'
RETURNING status

-- failed_mints --
SELECT m.id, m.payment_id, m.error, m.tx_hash, m.mint_token, m.mint_key, m.minter, m.tx_nonce,
       n.nonce IS NOT NULL AS nonce_final, n.mined_hash, n.status AS mined_status,
       (SELECT array_agg(x.tx_hash) FROM payment_transactions x WHERE x.mint_id = m.id) AS hashes
FROM mint_queue m JOIN payment_queue p ON p.id = m.payment_id
LEFT JOIN txm_nonces n ON n.chain_id = p.chain_id AND n.wallet = m.minter AND n.nonce = m.tx_nonce
WHERE m.status = 'failed' AND p.chain_id = :chain_id
  AND (CAST(:ids AS text[]) IS NULL OR m.payment_id = ANY(CAST(:ids AS text[])))
ORDER BY m.id LIMIT :limit

-- retry_failed_mints --
-- A failed mint minted nothing (its simulation reverted, or its transaction reverted at depth): it goes
-- back to released for a new transaction; the old one stays in payment_transactions.
UPDATE mint_queue SET status = 'released', tx_hash = NULL, tx_nonce = NULL, minter = NULL, error = NULL,
                      lease_owner = NULL, lease_expires_at = NULL
WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'failed'
  AND (tx_nonce IS NULL OR EXISTS (SELECT 1 FROM txm_nonces n WHERE n.chain_id = :chain_id
                                   AND n.wallet = mint_queue.minter AND n.nonce = mint_queue.tx_nonce))
RETURNING id

-- failed_mint_count --
SELECT count(*) FROM mint_queue WHERE status = 'failed'

-- reverted_settlement_count --
-- Settlements that mined and reverted (gas paid by our hot wallets) within the window: overdrafts,
-- front-runs, griefing. From the transaction manager's recorded nonce outcomes.
SELECT count(*) FROM txm_nonces n
JOIN payment_transactions t ON t.tx_hash = n.mined_hash
WHERE n.status = 0 AND t.kind IN ('settlement', 'replacement')
  AND n.recorded_at >= now() - make_interval(mins => :window_minutes)
