-- One nonce counter per (chain, signer): taken FOR UPDATE while a batch assigns its nonces.
CREATE TABLE signer_nonces (
    chain_id   bigint NOT NULL CHECK (chain_id > 0),
    signer     text NOT NULL CHECK (signer ~ '^0x[0-9a-f]{40}$'),
    next_nonce bigint NOT NULL CHECK (next_nonce >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (chain_id, signer)
);

-- Every transaction ever signed, committed BEFORE it is broadcast. Re-broadcasting the stored bytes is
-- idempotent; fee-bump replacements add rows with the same nonce and a new hash.
CREATE TABLE payment_transactions (
    id                       bigserial PRIMARY KEY,
    chain_id                 bigint NOT NULL,
    signer                   text NOT NULL CHECK (signer ~ '^0x[0-9a-f]{40}$'),
    nonce                    bigint NOT NULL CHECK (nonce >= 0),
    tx_hash                  text NOT NULL UNIQUE CHECK (tx_hash ~ '^0x[0-9a-f]{64}$'),
    payment_id               text REFERENCES payment_queue (id),
    kind                     text NOT NULL CHECK (kind IN ('settlement', 'replacement', 'cancel', 'gap_fill')),
    raw_tx                   bytea NOT NULL,
    max_fee_per_gas          numeric(78, 0) NOT NULL,
    max_priority_fee_per_gas numeric(78, 0) NOT NULL,
    gas_limit                bigint NOT NULL CHECK (gas_limit > 0),
    created_at               timestamptz NOT NULL DEFAULT now(),
    broadcast_at             timestamptz,
    broadcast_count          integer NOT NULL DEFAULT 0,
    last_broadcast_error     text,
    CONSTRAINT payment_transactions_payment_kind
        CHECK ((payment_id IS NULL) = (kind = 'gap_fill'))
);

CREATE INDEX idx_payment_transactions_payment ON payment_transactions (payment_id);
CREATE INDEX idx_payment_transactions_signer_nonce ON payment_transactions (chain_id, signer, nonce);
