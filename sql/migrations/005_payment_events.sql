-- Append-only audit of every status change, written by triggers so no code path can skip it.
-- The actor comes from the transaction-local setting payments.actor (set by the pipeline).
CREATE TABLE payment_events (
    id          bigserial PRIMARY KEY,
    payment_id  text NOT NULL,
    from_status text,
    to_status   text NOT NULL,
    actor       text NOT NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX idx_payment_events_payment ON payment_events (payment_id, id);

CREATE FUNCTION payment_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payment_events is append-only';
END $$;

CREATE TRIGGER payment_events_no_update BEFORE UPDATE OR DELETE ON payment_events
    FOR EACH STATEMENT EXECUTE FUNCTION payment_events_append_only();

CREATE FUNCTION payment_queue_audit_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO payment_events (payment_id, from_status, to_status, actor, reason)
    SELECT n.id, NULL, n.status, coalesce(nullif(current_setting('payments.actor', true), ''), current_user), n.error
    FROM new_rows n;
    RETURN NULL;
END $$;

CREATE FUNCTION payment_queue_audit_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO payment_events (payment_id, from_status, to_status, actor, reason)
    SELECT n.id, o.status, n.status, coalesce(nullif(current_setting('payments.actor', true), ''), current_user),
           n.error
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status;
    RETURN NULL;
END $$;

CREATE TRIGGER payment_queue_audit_insert AFTER INSERT ON payment_queue
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION payment_queue_audit_insert();

CREATE TRIGGER payment_queue_audit_update AFTER UPDATE ON payment_queue
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION payment_queue_audit_update();
