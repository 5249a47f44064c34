-- Runs of the pipeline's stages and of the monitor last 5 minutes (their schedule's interval) instead of
-- 25 s: an idle system made ~9 flow runs a minute, each a process start of ~2-4 CPU-seconds, and a third
-- of them did nothing. Stages tick inside a run as before; a run that crashes or fails is replaced within
-- seconds by the payments-rerun-ended-runs automation, not at the next slot. Values an operator changed
-- are kept.
UPDATE system_settings SET value = '300', updated_at = now(),
       description = 'Length of one send run, and the interval of its schedule (next deploy)'
 WHERE key = 'send_run_seconds' AND value = '25';
UPDATE system_settings SET value = '300', updated_at = now(),
       description = 'Length of one confirm, mint, webhooks or monitor run, and their schedule interval (next deploy)'
 WHERE key = 'confirm_run_seconds' AND value = '25';
UPDATE system_settings SET description = 'How often the monitor evaluates the thresholds (inside its run)'
 WHERE key = 'monitor_interval_seconds';
