-- Merchant webhooks: POST on payment completed / failed, signed with HMAC-SHA256 over "timestamp.body".
-- Deliveries are created by trigger in the same transaction as the status change, so none is lost and
-- none is created twice; every attempt is logged. The signing secret itself is not stored: secret_ref
-- names where it lives ("env:NAME" or "block:NAME" for a Prefect Secret block).
CREATE TABLE webhook_endpoints (
    id         bigserial PRIMARY KEY,
    product_id text NOT NULL REFERENCES mint_products (id),
    url        text NOT NULL CHECK (url ~ '^https?://'),
    secret_ref text NOT NULL CHECK (secret_ref ~ '^(env|block):[A-Za-z0-9_.-]+$'),
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product_id, url)
);

CREATE TABLE webhook_deliveries (
    id              bigserial PRIMARY KEY,
    event_id        uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    endpoint_id     bigint NOT NULL REFERENCES webhook_endpoints (id),
    payment_id      text NOT NULL REFERENCES payment_queue (id),
    event           text NOT NULL CHECK (event IN ('payment.completed', 'payment.failed')),
    payload         jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     integer,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    UNIQUE (endpoint_id, payment_id, event),
    CONSTRAINT webhook_deliveries_delivered_at CHECK ((status = 'delivered') = (delivered_at IS NOT NULL))
);
CREATE INDEX idx_webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    id          bigserial PRIMARY KEY,
    delivery_id bigint NOT NULL REFERENCES webhook_deliveries (id),
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    http_status integer,
    error       text,
    duration_ms integer NOT NULL
);
CREATE TRIGGER webhook_attempts_no_update BEFORE UPDATE OR DELETE ON webhook_attempts
    FOR EACH STATEMENT EXECUTE FUNCTION append_only_table();

CREATE FUNCTION payment_queue_webhooks() RETURNS trigger LANGUAGE plpgsql AS $$
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
    WHERE n.status IN ('completed', 'failed', 'confirmation_failed') AND o.status IS DISTINCT FROM n.status
    ON CONFLICT (endpoint_id, payment_id, event) DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER payment_queue_webhooks AFTER UPDATE ON payment_queue
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION payment_queue_webhooks();

INSERT INTO system_settings (key, value, description) VALUES
    ('webhook_max_attempts', '8', 'Give a webhook delivery up after this many failed attempts'),
    ('webhook_backoff_seconds', '5', 'First retry delay; doubles per attempt, capped at one hour')
ON CONFLICT (key) DO NOTHING;
