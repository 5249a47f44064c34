-- Settlements that revert on chain cost the hot wallets gas: counted, with an alert. Rates alert only on
-- enough outcomes: 2 failures out of 6 payments opened a confirmation-rate alert that
-- stayed open for minutes.
INSERT INTO system_settings (key, value, description) VALUES
    ('alert_rate_min_samples', '20', 'Outcomes in the window before the confirmation-rate alert may open'),
    ('alert_reverted_settlements', '3', 'Alert when more settlements than this reverted on chain (our gas) in the window')
ON CONFLICT (key) DO NOTHING;
