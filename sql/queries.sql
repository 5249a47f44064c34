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
SELECT id, pay_to, amount, valid_after, valid_before, signature
FROM payment_queue
WHERE chain_id = :chain_id AND token = :token AND payer = :payer AND auth_nonce = :auth_nonce

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
          p.created_at

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
-- Simulation proved the settlement would revert: nothing was signed, no nonce spent.
WITH failed AS (
    UPDATE payment_queue p
    SET status = 'failed', error = v.error, processed_at = now(), lease_owner = NULL, lease_expires_at = NULL,
        updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[])) AS v(id, error)
    WHERE p.id = v.id AND p.status = 'processing' AND p.lease_owner = :owner AND p.tx_hash IS NULL
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
INSERT INTO payment_transactions (chain_id, signer, nonce, tx_hash, payment_id, mint_id, kind, raw_tx,
                                  max_fee_per_gas, max_priority_fee_per_gas, gas_limit)
SELECT :chain_id, :signer, v.nonce, v.tx_hash, v.payment_id, v.mint_id, v.kind, v.raw_tx, v.max_fee, v.max_tip,
       v.gas_limit
FROM unnest(CAST(:nonces AS bigint[]), CAST(:hashes AS text[]), CAST(:payment_ids AS text[]),
            CAST(:mint_ids AS bigint[]), CAST(:kinds AS text[]), CAST(:raws AS bytea[]),
            CAST(:max_fees AS numeric[]), CAST(:max_tips AS numeric[]), CAST(:gas_limits AS bigint[]))
     AS v(nonce, tx_hash, payment_id, mint_id, kind, raw_tx, max_fee, max_tip, gas_limit)

-- attach_transactions --
UPDATE payment_queue p
SET tx_nonce = v.nonce, tx_hash = v.tx_hash, updated_at = now()
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

-- load_sent_payments --
-- The confirmation loop's batch: oldest first, with every hash ever broadcast for each payment.
SELECT p.id, p.payer, p.token, p.pay_to, p.amount, p.valid_after, p.valid_before, p.auth_nonce, p.signature,
       p.signer, p.tx_nonce,
       extract(epoch FROM coalesce(CAST(:now AS timestamptz), now()) - p.sent_at) AS age_seconds,
       t.hashes, t.latest_hash, t.latest_age_seconds, t.last_broadcast_age_seconds,
       t.max_fee_per_gas, t.max_priority_fee_per_gas, t.gas_limit
FROM (
    SELECT * FROM payment_queue
    WHERE status = 'sent' AND chain_id = :chain_id
      AND (CAST(:ids AS text[]) IS NULL OR id = ANY(CAST(:ids AS text[])))
    ORDER BY processed_at
    LIMIT :limit
) p
CROSS JOIN LATERAL (
    SELECT array_agg(tx_hash ORDER BY id) AS hashes,
           (array_agg(tx_hash ORDER BY id DESC))[1] AS latest_hash,
           extract(epoch FROM coalesce(CAST(:now AS timestamptz), now()) - max(created_at)) AS latest_age_seconds,
           extract(epoch FROM coalesce(CAST(:now AS timestamptz), now()) - max(broadcast_at))
               AS last_broadcast_age_seconds,
           (array_agg(max_fee_per_gas ORDER BY id DESC))[1] AS max_fee_per_gas,
           (array_agg(max_priority_fee_per_gas ORDER BY id DESC))[1] AS max_priority_fee_per_gas,
           (array_agg(gas_limit ORDER BY id DESC))[1] AS gas_limit
    FROM payment_transactions
    WHERE payment_id = p.id AND kind IN ('settlement', 'replacement')
) t
ORDER BY p.processed_at

-- complete_payments --
-- Callback: the payment's mint rows are released in the same statement (same transaction) as
-- `completed`, and only for the rows this statement moved, so a mint is released exactly once.
WITH done AS (
    UPDATE payment_queue p
    SET status = 'completed', confirmed_at = now(), block_number = v.block_number, tx_hash = v.tx_hash,
        error = NULL, updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:blocks AS bigint[]), CAST(:hashes AS text[]))
         AS v(id, block_number, tx_hash)
    WHERE p.id = v.id AND p.status = 'sent'
    RETURNING p.id
), released AS (
    UPDATE mint_queue m SET status = 'released', released_at = now()
    FROM done WHERE m.payment_id = done.id AND m.status = 'waiting'
    RETURNING m.id
)
SELECT id FROM done

-- fail_confirmation --
WITH failed AS (
    UPDATE payment_queue p
    SET status = 'confirmation_failed', error = v.error, block_number = v.block_number, updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:errors AS text[]), CAST(:blocks AS bigint[]))
         AS v(id, error, block_number)
    WHERE p.id = v.id AND p.status = 'sent'
    RETURNING p.id
), cancelled AS (
    UPDATE mint_queue m SET status = 'cancelled', cancelled_at = now()
    FROM failed WHERE m.payment_id = failed.id AND m.status = 'waiting'
    RETURNING m.id
)
SELECT id FROM failed

-- insert_replacement --
INSERT INTO payment_transactions (chain_id, signer, nonce, tx_hash, payment_id, kind, raw_tx,
                                  max_fee_per_gas, max_priority_fee_per_gas, gas_limit)
SELECT :chain_id, :signer, :nonce, :tx_hash, :payment_id, :kind, :raw_tx, :max_fee, :max_tip, :gas_limit
WHERE EXISTS (SELECT 1 FROM payment_queue WHERE id = :payment_id AND status = 'sent')
RETURNING id

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
       lease_expires_at, sent_at, updated_at
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
-- recheck_confirmation_failed: the chain shows the payment did land; its mint rows come back from
-- cancelled and are released, once, by the statement that moves the payment.
WITH done AS (
    UPDATE payment_queue p
    SET status = 'completed', confirmed_at = now(), block_number = v.block_number, tx_hash = v.tx_hash,
        error = v.note, updated_at = now()
    FROM unnest(CAST(:ids AS text[]), CAST(:blocks AS bigint[]), CAST(:hashes AS text[]), CAST(:notes AS text[]))
         AS v(id, block_number, tx_hash, note)
    WHERE p.id = v.id AND p.status = 'confirmation_failed'
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

-- stored_transactions_by_nonce --
SELECT nonce, array_agg(tx_hash ORDER BY id) AS hashes
FROM payment_transactions
WHERE chain_id = :chain_id AND signer = :signer AND nonce >= :low AND nonce < :high
GROUP BY nonce

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
INSERT INTO monitor_samples (queue_depth, sent, sent_age_max, confirmation_rate)
VALUES (:queue_depth, :sent, :sent_age_max, :confirmation_rate)

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
-- Mints whose transaction was stored: the hashes to poll (and re-send when the node lost them).
SELECT m.id, m.minter, m.tx_nonce, array_agg(t.tx_hash ORDER BY t.id) AS hashes,
       extract(epoch FROM now() - max(t.broadcast_at)) AS last_broadcast_age_seconds
FROM mint_queue m JOIN payment_transactions t ON t.mint_id = m.id
WHERE m.status = 'minting' AND m.tx_hash IS NOT NULL
GROUP BY m.id
ORDER BY m.id
LIMIT :limit

-- finish_mints --
UPDATE mint_queue m SET status = 'minted', minted_at = now(), block_number = v.block_number, tx_hash = v.tx_hash,
                        lease_owner = NULL, lease_expires_at = NULL, error = NULL
FROM unnest(CAST(:ids AS bigint[]), CAST(:blocks AS bigint[]), CAST(:hashes AS text[])) AS v(id, block_number, tx_hash)
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
SELECT m.id, m.payment_id, m.error, m.tx_hash FROM mint_queue m JOIN payment_queue p ON p.id = m.payment_id
WHERE m.status = 'failed' AND p.chain_id = :chain_id
  AND (CAST(:ids AS text[]) IS NULL OR m.payment_id = ANY(CAST(:ids AS text[])))
ORDER BY m.id LIMIT :limit

-- retry_failed_mints --
-- A failed mint minted nothing (its simulation reverted, or its transaction reverted at depth): it goes
-- back to released for a new transaction; the old one stays in payment_transactions.
UPDATE mint_queue SET status = 'released', tx_hash = NULL, tx_nonce = NULL, minter = NULL, error = NULL,
                      lease_owner = NULL, lease_expires_at = NULL
WHERE id = ANY(CAST(:ids AS bigint[])) AND status = 'failed'
RETURNING id

-- failed_mint_count --
SELECT count(*) FROM mint_queue WHERE status = 'failed'
