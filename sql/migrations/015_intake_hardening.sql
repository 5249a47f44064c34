-- Intake hardening: a cap on the payments one payer may have open at once (the settings registry in
-- payments/settings.py describes every setting; this row makes the table complete).
INSERT INTO system_settings (key, value, description) VALUES
    ('max_open_payments_per_payer', '100',
     'Payments one payer may have pending, processing or sent at once; more are refused at intake')
ON CONFLICT (key) DO NOTHING;

-- The intake's exposure check sums one payer's open payments.
CREATE INDEX idx_payment_queue_payer_open ON payment_queue (chain_id, token, payer)
    WHERE status IN ('pending', 'processing', 'sent');

-- GET /api/payment-stats reads the monitor's latest sample for what needs the whole table (terminal
-- counts, rates, percentiles) and only bounded, indexed reads of the open part of the queue.
ALTER TABLE monitor_samples
    ADD COLUMN counts              jsonb,
    ADD COLUMN sent_age_mean       double precision,
    ADD COLUMN sent_age_p95        double precision,
    ADD COLUMN processing_time_p50 double precision,
    ADD COLUMN processing_time_p95 double precision,
    ADD COLUMN window_minutes      integer;
CREATE INDEX idx_payment_queue_sent_at ON payment_queue (sent_at) WHERE status = 'sent';
