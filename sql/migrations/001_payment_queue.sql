-- The payment queue: one row per x402 payment (an EIP-3009 authorization signed by the buyer).
-- Addresses and hex values are stored lower-case; amounts are uint256 in atomic units.
CREATE TABLE payment_queue (
    id               text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{8,64}$'),
    chain_id         bigint NOT NULL CHECK (chain_id > 0),
    token            text NOT NULL CHECK (token ~ '^0x[0-9a-f]{40}$'),
    payer            text NOT NULL CHECK (payer ~ '^0x[0-9a-f]{40}$'),
    pay_to           text NOT NULL CHECK (pay_to ~ '^0x[0-9a-f]{40}$'),
    amount           numeric(78, 0) NOT NULL CHECK (amount > 0),
    valid_after      numeric(78, 0) NOT NULL CHECK (valid_after >= 0),
    valid_before     numeric(78, 0) NOT NULL CHECK (valid_before > valid_after),
    auth_nonce       text NOT NULL CHECK (auth_nonce ~ '^0x[0-9a-f]{64}$'),
    signature        text NOT NULL CHECK (signature ~ '^0x[0-9a-f]{130}$'),
    "authorization"  jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending',
    signer           text CHECK (signer ~ '^0x[0-9a-f]{40}$'),
    tx_nonce         bigint CHECK (tx_nonce >= 0),
    tx_hash          text CHECK (tx_hash ~ '^0x[0-9a-f]{64}$'),
    lease_owner      text,
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    processed_at     timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT payment_queue_status_check
        CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    CONSTRAINT payment_queue_authorization_unique UNIQUE (chain_id, token, payer, auth_nonce)
);

CREATE INDEX idx_payment_queue_pending ON payment_queue (chain_id, created_at) WHERE status = 'pending';
CREATE INDEX idx_payment_queue_processing_lease
    ON payment_queue (chain_id, lease_expires_at) WHERE status = 'processing';
