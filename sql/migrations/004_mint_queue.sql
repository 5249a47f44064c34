-- What a payment buys. Rows are created with the payment (waiting), released exactly once when the
-- payment completes on chain, cancelled when it fails. Only released rows are ever minted.
CREATE TABLE mint_queue (
    id           bigserial PRIMARY KEY,
    payment_id   text NOT NULL REFERENCES payment_queue (id),
    mint_token   text NOT NULL CHECK (mint_token ~ '^0x[0-9a-f]{40}$'),
    recipient    text NOT NULL CHECK (recipient ~ '^0x[0-9a-f]{40}$'),
    amount       numeric(78, 0) NOT NULL CHECK (amount > 0),
    status       text NOT NULL DEFAULT 'waiting'
        CHECK (status IN ('waiting', 'released', 'minting', 'minted', 'cancelled', 'failed')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    released_at  timestamptz,
    cancelled_at timestamptz,
    CONSTRAINT mint_queue_released_at CHECK ((status = 'waiting') = (released_at IS NULL AND cancelled_at IS NULL)),
    CONSTRAINT mint_queue_cancelled_at CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL))
);

CREATE INDEX idx_mint_queue_payment ON mint_queue (payment_id);
CREATE INDEX idx_mint_queue_released ON mint_queue (created_at) WHERE status = 'released';
