-- Alert state, so an alert notifies once when it opens, reminds at an interval, and once when it
-- resolves - not on every monitor run - and queue-depth samples for the trend rule and the chart.
CREATE TABLE monitor_alerts (
    key              text PRIMARY KEY,
    status           text NOT NULL CHECK (status IN ('open', 'resolved')),
    message          text NOT NULL,
    opened_at        timestamptz NOT NULL,
    last_notified_at timestamptz NOT NULL,
    resolved_at      timestamptz,
    CONSTRAINT monitor_alerts_resolved_at CHECK ((status = 'resolved') = (resolved_at IS NOT NULL))
);

CREATE TABLE monitor_samples (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    queue_depth integer NOT NULL,
    sent        integer NOT NULL,
    sent_age_max double precision,
    confirmation_rate double precision
);
CREATE INDEX idx_monitor_samples_at ON monitor_samples (at);

INSERT INTO system_settings (key, value, description) VALUES
    ('alert_reminder_seconds', '900', 'Repeat the notification of a still-open alert this often'),
    ('alert_queue_trend_samples', '5', 'Alert if queue depth has not decreased over this many monitor runs'),
    ('alert_min_gas_balance_wei', '10000000000000000', 'Alert if a signer holds less native gas than this'),
    ('alert_nonce_drift', '10', 'Alert if a signer''s local nonce counter and the chain differ by more'),
    ('monitor_sample_retention_days', '7', 'Monitor samples older than this are deleted')
ON CONFLICT (key) DO NOTHING;
