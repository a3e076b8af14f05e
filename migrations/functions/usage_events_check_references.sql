-- usage_events' references (account, API key, rate card) checked once per statement,
-- set-based, instead of by three foreign keys row by row (why: see usage_events in 0001).
-- A statement whose rows name a missing row is refused with foreign_key_violation (23503),
-- the error a foreign key raised; every writer and role is checked.
CREATE OR REPLACE FUNCTION usage_events_check_references() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    missing text;
BEGIN
    -- Each distinct id of the statement once (UNION removes repeats).
    SELECT r.kind || ' ' || r.id INTO missing
      FROM (SELECT 'account' AS kind, account_id AS id FROM checked_rows
            UNION
            SELECT 'API key', api_key_id FROM checked_rows WHERE api_key_id IS NOT NULL
            UNION
            SELECT 'rate card', rate_card_id FROM checked_rows WHERE rate_card_id IS NOT NULL
           ) AS r
     WHERE NOT CASE r.kind
                   WHEN 'account' THEN EXISTS (SELECT 1 FROM accounts a WHERE a.id = r.id)
                   WHEN 'API key' THEN EXISTS (SELECT 1 FROM api_keys k WHERE k.id = r.id)
                   ELSE EXISTS (SELECT 1 FROM rate_cards c WHERE c.id = r.id)
               END
     LIMIT 1;
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'usage_events row refers to unknown %', missing
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END;
$$;

-- A trigger with a transition table takes one event, hence two; on the partitioned table
-- (0012) they fire for rows routed to any partition.
CREATE OR REPLACE TRIGGER usage_events_check_references_on_insert
    AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS checked_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_events_check_references();
CREATE OR REPLACE TRIGGER usage_events_check_references_on_update
    AFTER UPDATE ON usage_events
    REFERENCING NEW TABLE AS checked_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_events_check_references();
