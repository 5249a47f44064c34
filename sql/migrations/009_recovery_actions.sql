-- What the hand-run recovery flows did (or, in dry-run, would have done): one row per payment and action.
-- Status changes they make are audited in payment_events as well (by trigger), with the same actor.
CREATE TABLE recovery_actions (
    id         bigserial PRIMARY KEY,
    flow       text NOT NULL,
    payment_id text,
    action     text NOT NULL,
    outcome    text NOT NULL CHECK (outcome IN ('applied', 'would_apply', 'refused', 'unchanged')),
    detail     text NOT NULL DEFAULT '',
    dry_run    boolean NOT NULL,
    actor      text NOT NULL,
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX idx_recovery_actions_payment ON recovery_actions (payment_id, id);

CREATE FUNCTION append_only_table() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;

CREATE TRIGGER recovery_actions_no_update BEFORE UPDATE OR DELETE ON recovery_actions
    FOR EACH STATEMENT EXECUTE FUNCTION append_only_table();
