-- drop the old constraint
ALTER TABLE payment_queue DROP CONSTRAINT payment_queue_status_check;

-- add the new constraint
ALTER TABLE payment_queue 
  ADD CONSTRAINT payment_queue_status_check 
  CHECK (status IN ('pending', 'processing', 'sent', 'completed', 'failed', 'confirmation_failed'));

-- add an index for the confirmation loop
CREATE INDEX idx_payment_queue_sent_processed
  ON payment_queue(status, processed_at)
  WHERE status = 'sent';
