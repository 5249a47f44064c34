-- Monitoring thresholds (the seed's alert levels) and the monitor's cadence.
INSERT INTO system_settings (key, value, description) VALUES
    ('monitor_interval_seconds', '30', 'How often the monitor flow runs'),
    ('monitor_window_minutes', '60', 'Window for confirmation rate and processing time'),
    ('alert_sent_age_seconds', '60', 'Alert if a payment has been in sent longer than this (seed: 60 s)'),
    ('alert_confirmation_rate_min', '0.90', 'Alert if completed / (completed + confirmation_failed) falls below'),
    ('alert_processing_time_seconds', '60', 'Alert if p95 of processed_at - created_at exceeds this (seed: 60 s)'),
    ('alert_stuck_seconds', '300', 'Alert on any payment stuck in sent or processing longer than this (5 min)')
ON CONFLICT (key) DO NOTHING;
