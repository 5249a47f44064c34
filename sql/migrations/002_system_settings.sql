-- Runtime settings, read by every run (no restart needed to change them).
CREATE TABLE system_settings (
    key         text PRIMARY KEY CHECK (key ~ '^[a-z][a-z0-9_]*$'),
    value       text NOT NULL,
    description text NOT NULL DEFAULT '',
    updated_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO system_settings (key, value, description) VALUES
    ('payment_batch_interval_ms', '4000', 'Send loop tick: how often pending payments are claimed (ms)'),
    ('payment_batch_size', '10', 'Pending payments claimed per send tick (recommended 50-100 under high load)')
ON CONFLICT (key) DO NOTHING;
