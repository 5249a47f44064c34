-- The transaction manager: payment outcomes read from the chain, depth before mints, claimed
-- confirmation work, and nonce health for every wallet that ever sent.

-- Payments: where the settlement was found on chain (any transaction that used the authorization: ours,
-- a replacement or a front-runner's), the head block when the first transaction was signed (lower bound of
-- log searches), and the claim a confirm pass or a recovery flow holds while it decides.
ALTER TABLE payment_queue
    ADD COLUMN block_hash        text CHECK (block_hash ~ '^0x[0-9a-f]{64}$'),
    ADD COLUMN sent_block        bigint CHECK (sent_block >= 0),
    ADD COLUMN check_owner       text,
    ADD COLUMN check_expires_at  timestamptz,
    ADD COLUMN checked_at        timestamptz;


-- Attempts: the head block when each was signed (bumps are scheduled by blocks without inclusion) and
-- whether its fees were held at max_fee_per_gas_cap.
ALTER TABLE payment_transactions
    ADD COLUMN signed_block bigint CHECK (signed_block >= 0),
    ADD COLUMN fee_capped   boolean NOT NULL DEFAULT false;

-- A cancel fills the nonce of a settlement or a mint that can no longer land; a gap fill belongs to nobody.
ALTER TABLE payment_transactions DROP CONSTRAINT payment_transactions_owner;
ALTER TABLE payment_transactions ADD CONSTRAINT payment_transactions_owner CHECK (
    (kind IN ('settlement', 'replacement') AND payment_id IS NOT NULL AND mint_id IS NULL)
    OR (kind = 'mint' AND mint_id IS NOT NULL AND payment_id IS NULL)
    OR (kind = 'cancel' AND (payment_id IS NULL OR mint_id IS NULL))
    OR (kind = 'gap_fill' AND payment_id IS NULL AND mint_id IS NULL));

-- The outcome of each nonce the manager used, once the chain consumed it: which of our attempts mined
-- (or none: a transaction we never signed consumed it), in which block.
CREATE TABLE txm_nonces (
    chain_id     bigint NOT NULL,
    wallet       text NOT NULL CHECK (wallet ~ '^0x[0-9a-f]{40}$'),
    nonce        bigint NOT NULL CHECK (nonce >= 0),
    mined_hash   text CHECK (mined_hash ~ '^0x[0-9a-f]{64}$'),
    block_number bigint,
    block_hash   text,
    status       smallint,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, wallet, nonce),
    CONSTRAINT txm_nonces_ours CHECK ((mined_hash IS NULL) = (block_number IS NULL))
);

-- Mints: the id the mint token enforces on chain (mintOnce), where the mint was found, and checks.
ALTER TABLE mint_queue
    ADD COLUMN mint_key   text CHECK (mint_key ~ '^0x[0-9a-f]{64}$'),
    ADD COLUMN block_hash text CHECK (block_hash ~ '^0x[0-9a-f]{64}$'),
    ADD COLUMN checked_at timestamptz;

INSERT INTO system_settings (key, value, description) VALUES
    ('mint_confirmation_depth', '4', 'Blocks on top of a settlement (including its own) before its mints are released; >= confirmation_depth'),
    ('fee_bump_after_blocks', '3', 'Blocks without inclusion after which a transaction is replaced with higher fees'),
    ('max_fee_per_gas_cap', '500000000000', 'No replacement pays more than this max fee per gas (wei); an alert fires when a transaction is held at it'),
    ('finality_depth', '12', 'Blocks after which an expired, unused authorization counts as final (confirmation_failed)')
ON CONFLICT (key) DO NOTHING;
UPDATE system_settings SET value = '2' WHERE key = 'confirmation_depth' AND value = '1';
UPDATE system_settings SET description = 'Age in sent after which an unconfirmed payment raises an alert (fee bumps go by blocks)'
WHERE key = 'confirmation_timeout_seconds';

-- A completed payment is final once its mints are released (the settlement is mint_confirmation_depth
-- deep); until then every confirm pass re-reads it, and a reorg that removed it puts it back to `sent`.
ALTER TABLE payment_queue ADD COLUMN final_at timestamptz;
UPDATE payment_queue SET final_at = confirmed_at WHERE status = 'completed';
ALTER TABLE payment_queue ADD CONSTRAINT payment_queue_final_completed CHECK (final_at IS NULL OR status = 'completed');
-- Oldest-checked first: stuck payments cannot starve the rest.
CREATE INDEX idx_payment_queue_unsettled ON payment_queue (chain_id, checked_at NULLS FIRST)
    WHERE status = 'sent' OR (status = 'completed' AND final_at IS NULL);

-- A payment's transaction may be one we did not sign (someone else settled the authorization first): then
-- it has that transaction's hash and no nonce of ours - or, while `sent` (handed to the confirm stage
-- because the authorization was already used), no transaction yet. `completed` always names the
-- transaction that settled it.
ALTER TABLE payment_queue DROP CONSTRAINT payment_queue_tx_pair;
ALTER TABLE payment_queue ADD CONSTRAINT payment_queue_tx_pair CHECK (tx_nonce IS NULL OR tx_hash IS NOT NULL);
ALTER TABLE payment_queue DROP CONSTRAINT payment_queue_broadcast_has_tx;
ALTER TABLE payment_queue ADD CONSTRAINT payment_queue_broadcast_has_tx
    CHECK (status NOT IN ('sent', 'completed', 'confirmation_failed') OR (sent_at IS NOT NULL AND processed_at IS NOT NULL));
ALTER TABLE payment_queue ADD CONSTRAINT payment_queue_completed_tx CHECK (status <> 'completed' OR tx_hash IS NOT NULL);

-- payment.completed webhooks go out when the payment is final (its mints released), not at the first
-- depth a reorg could still undo; failures as before, on the status change.
CREATE OR REPLACE FUNCTION payment_queue_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_deliveries (endpoint_id, payment_id, event, payload)
    SELECT DISTINCT ON (e.id, n.id)
           e.id, n.id,
           CASE WHEN n.status = 'completed' THEN 'payment.completed' ELSE 'payment.failed' END,
           jsonb_build_object(
               'type', CASE WHEN n.status = 'completed' THEN 'payment.completed' ELSE 'payment.failed' END,
               'created', extract(epoch FROM now())::bigint,
               'data', jsonb_build_object('paymentId', n.id, 'status', n.status, 'product', p.id,
                                          'payer', n.payer, 'payTo', n.pay_to, 'asset', n.token,
                                          'amount', n.amount::text, 'transaction', n.tx_hash,
                                          'blockNumber', n.block_number, 'error', n.error,
                                          'chainId', n.chain_id))
    FROM new_rows n
    JOIN old_rows o ON o.id = n.id
    JOIN mint_queue m ON m.payment_id = n.id
    JOIN mint_products p ON p.mint_token = m.mint_token AND p.chain_id = n.chain_id
    JOIN webhook_endpoints e ON e.product_id = p.id AND e.active
    WHERE (n.status = 'completed' AND n.final_at IS NOT NULL AND o.final_at IS NULL)
       OR (n.status IN ('failed', 'confirmation_failed') AND o.status IS DISTINCT FROM n.status)
    ON CONFLICT (endpoint_id, payment_id, event) DO NOTHING;
    RETURN NULL;
END $$;
