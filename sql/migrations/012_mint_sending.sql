-- Mints are sent by the minter wallet through the same nonce-safe machinery as settlements: the
-- signed tx is stored (payment_transactions, kind 'mint') before it is broadcast.
ALTER TABLE payment_transactions ADD COLUMN mint_id bigint REFERENCES mint_queue (id);
ALTER TABLE payment_transactions DROP CONSTRAINT payment_transactions_kind_check;
ALTER TABLE payment_transactions ADD CONSTRAINT payment_transactions_kind_check
    CHECK (kind IN ('settlement', 'replacement', 'cancel', 'gap_fill', 'mint'));
ALTER TABLE payment_transactions DROP CONSTRAINT payment_transactions_payment_kind;
ALTER TABLE payment_transactions ADD CONSTRAINT payment_transactions_owner CHECK (
    (kind IN ('settlement', 'replacement', 'cancel') AND payment_id IS NOT NULL AND mint_id IS NULL)
    OR (kind = 'mint' AND mint_id IS NOT NULL AND payment_id IS NULL)
    OR (kind = 'gap_fill' AND payment_id IS NULL AND mint_id IS NULL));
CREATE INDEX idx_payment_transactions_mint ON payment_transactions (mint_id) WHERE mint_id IS NOT NULL;

ALTER TABLE mint_queue
    ADD COLUMN minter           text CHECK (minter ~ '^0x[0-9a-f]{40}$'),
    ADD COLUMN tx_nonce         bigint CHECK (tx_nonce >= 0),
    ADD COLUMN tx_hash          text CHECK (tx_hash ~ '^0x[0-9a-f]{64}$'),
    ADD COLUMN lease_owner      text,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN attempts         integer NOT NULL DEFAULT 0,
    ADD COLUMN error            text,
    ADD COLUMN block_number     bigint,
    ADD COLUMN minted_at        timestamptz;

ALTER TABLE mint_queue
    ADD CONSTRAINT mint_queue_tx_pair CHECK ((tx_hash IS NULL) = (tx_nonce IS NULL)),
    ADD CONSTRAINT mint_queue_minting_lease
        CHECK (status <> 'minting' OR (minter IS NOT NULL AND lease_expires_at IS NOT NULL)),
    ADD CONSTRAINT mint_queue_minted_at CHECK ((status = 'minted') = (minted_at IS NOT NULL)),
    ADD CONSTRAINT mint_queue_minted_tx CHECK (status <> 'minted' OR (block_number IS NOT NULL AND tx_hash IS NOT NULL)),
    ADD CONSTRAINT mint_queue_unsent_before_release CHECK (status NOT IN ('waiting', 'cancelled') OR tx_hash IS NULL);

CREATE INDEX idx_mint_queue_minting ON mint_queue (lease_expires_at) WHERE status = 'minting';

INSERT INTO system_settings (key, value, description) VALUES
    ('mint_batch_size', '50', 'Released mints sent per mint tick'),
    ('mint_gas_limit', '200000', 'Cap on one mint transaction''s gas')
ON CONFLICT (key) DO NOTHING;
