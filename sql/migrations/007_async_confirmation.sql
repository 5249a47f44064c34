-- Columns of the asynchronous confirmation phase, the constraints that tie them to statuses, and the
-- confirmation loop's settings.
ALTER TABLE payment_queue
    ADD COLUMN sent_at      timestamptz,
    ADD COLUMN confirmed_at timestamptz,
    ADD COLUMN block_number bigint CHECK (block_number >= 0);

ALTER TABLE payment_queue
    ADD CONSTRAINT payment_queue_tx_pair CHECK ((tx_hash IS NULL) = (tx_nonce IS NULL)),
    ADD CONSTRAINT payment_queue_tx_needs_signer CHECK (tx_hash IS NULL OR signer IS NOT NULL),
    ADD CONSTRAINT payment_queue_pending_clean
        CHECK (status <> 'pending' OR (tx_hash IS NULL AND lease_expires_at IS NULL)),
    ADD CONSTRAINT payment_queue_processing_lease
        CHECK (status <> 'processing' OR (lease_expires_at IS NOT NULL AND signer IS NOT NULL)),
    ADD CONSTRAINT payment_queue_broadcast_has_tx
        CHECK (status NOT IN ('sent', 'completed', 'confirmation_failed')
               OR (tx_hash IS NOT NULL AND sent_at IS NOT NULL AND processed_at IS NOT NULL)),
    ADD CONSTRAINT payment_queue_completed_confirmed
        CHECK ((status = 'completed') = (confirmed_at IS NOT NULL)),
    ADD CONSTRAINT payment_queue_completed_block CHECK (status <> 'completed' OR block_number IS NOT NULL);

-- A signer nonce belongs to one payment at most.
CREATE UNIQUE INDEX idx_payment_queue_signer_nonce
    ON payment_queue (chain_id, signer, tx_nonce) WHERE tx_nonce IS NOT NULL;

INSERT INTO system_settings (key, value, description) VALUES
    ('confirmation_interval_ms', '2000', 'Confirmation loop tick (ms)'),
    ('confirmation_batch_size', '20', 'Sent payments checked per confirmation tick'),
    ('confirmation_timeout_seconds', '300', 'Age in sent after which a payment without receipt is bumped and reconciled'),
    ('confirmation_depth', '1', 'Blocks (including the receipt''s own) before a payment counts as confirmed'),
    ('rebroadcast_after_seconds', '30', 'Re-broadcast the stored bytes of a sent tx without receipt after this age'),
    ('processing_lease_seconds', '60', 'How long a send run owns the payments it claimed'),
    ('fee_bump_percent', '20', 'Fee increase (both fees) for a replacement of a stuck tx; at least 10'),
    ('settlement_gas_limit', '150000', 'Gas limit for one transferWithAuthorization'),
    ('send_run_seconds', '25', 'How long one scheduled send run keeps ticking before it ends'),
    ('confirm_run_seconds', '25', 'How long one scheduled confirm run keeps ticking before it ends')
ON CONFLICT (key) DO NOTHING;
