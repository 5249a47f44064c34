-- What can be bought through the x402 API: a mint token, its price per unit in the payment asset
-- (atomic units), how much one unit mints, and who is paid.
CREATE TABLE mint_products (
    id              text PRIMARY KEY CHECK (id ~ '^[a-z0-9][a-z0-9_-]{0,63}$'),
    chain_id        bigint NOT NULL CHECK (chain_id > 0),
    mint_token      text NOT NULL CHECK (mint_token ~ '^0x[0-9a-f]{40}$'),
    payment_token   text NOT NULL CHECK (payment_token ~ '^0x[0-9a-f]{40}$'),
    price_per_unit  numeric(78, 0) NOT NULL CHECK (price_per_unit > 0),
    amount_per_unit numeric(78, 0) NOT NULL CHECK (amount_per_unit > 0),
    pay_to          text NOT NULL CHECK (pay_to ~ '^0x[0-9a-f]{40}$'),
    max_quantity    integer NOT NULL DEFAULT 1000 CHECK (max_quantity > 0),
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (chain_id, mint_token)
);
