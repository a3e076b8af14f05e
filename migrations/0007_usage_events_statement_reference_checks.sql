-- usage_events' references (account, API key, rate card) are checked once per statement,
-- set-based, instead of by three foreign keys row by row.
--
-- Why: the settlement writer inserts usage rows 500 at a time, and a foreign key runs one
-- lookup-and-lock query per row and reference: record_settlement_rows took ~39 µs per
-- settlement with them and ~28 with the statement trigger below, which checks each distinct
-- id of the statement once (500-row batches, median of 15 each way).
--
-- What stays guaranteed, for every writer and role:
-- * A usage row names an existing account, and an existing API key and rate card when it
--   names one: the trigger refuses the statement otherwise, with foreign_key_violation
--   (23503), the error a foreign key raised.
-- * A referenced row never disappears: accounts, API keys and rate cards are never deleted
--   (an API key is revoked, a rate card superseded by a newer version, an account keeps its
--   history). A foreign key only stopped deleting rows still referenced, and locked each
--   referenced row against that; refusing every DELETE needs neither the lock nor an index
--   on every referencing column. The application's role never had DELETE on these tables;
--   the triggers stop the owner too.
-- ledger_entries keeps its foreign key to accounts: its writers post one entry at a time.

ALTER TABLE usage_events
    DROP CONSTRAINT usage_events_account_id_fkey,
    DROP CONSTRAINT usage_events_api_key_id_fkey,
    DROP CONSTRAINT usage_events_rate_card_id_fkey;

CREATE FUNCTION usage_events_check_references() RETURNS trigger LANGUAGE plpgsql AS $$
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

-- A trigger with a transition table takes one event, hence two.
CREATE TRIGGER usage_events_check_references_on_insert
    AFTER INSERT ON usage_events
    REFERENCING NEW TABLE AS checked_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_events_check_references();
CREATE TRIGGER usage_events_check_references_on_update
    AFTER UPDATE ON usage_events
    REFERENCING NEW TABLE AS checked_rows
    FOR EACH STATEMENT EXECUTE FUNCTION usage_events_check_references();

CREATE FUNCTION refuse_delete_of_referenced_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted: usage and ledger history refers to them (%)',
        TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION refuse_delete_of_referenced_rows('accounts keep their history');
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete_of_referenced_rows('accounts keep their history');
CREATE TRIGGER api_keys_no_delete BEFORE DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION refuse_delete_of_referenced_rows('revoke a key instead');
CREATE TRIGGER api_keys_no_truncate BEFORE TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete_of_referenced_rows('revoke a key instead');
CREATE TRIGGER rate_cards_no_delete BEFORE DELETE ON rate_cards
    FOR EACH ROW EXECUTE FUNCTION refuse_delete_of_referenced_rows(
        'publish a newer rate card instead');
CREATE TRIGGER rate_cards_no_truncate BEFORE TRUNCATE ON rate_cards
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete_of_referenced_rows(
        'publish a newer rate card instead');
