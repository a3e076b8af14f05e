-- Accounts, API keys and rate cards are never deleted: usage and ledger history refers to
-- them (usage_events without foreign keys, see 0001). An API key is revoked, a rate card
-- superseded by a newer version, an account keeps its history. Stops the owner too.
CREATE OR REPLACE FUNCTION refuse_delete_of_referenced_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are never deleted: usage and ledger history refers to them (%)',
        TG_TABLE_NAME, TG_ARGV[0]
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE OR REPLACE TRIGGER accounts_no_delete BEFORE DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION refuse_delete_of_referenced_rows('accounts keep their history');
CREATE OR REPLACE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete_of_referenced_rows('accounts keep their history');
CREATE OR REPLACE TRIGGER api_keys_no_delete BEFORE DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION refuse_delete_of_referenced_rows('revoke a key instead');
CREATE OR REPLACE TRIGGER api_keys_no_truncate BEFORE TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete_of_referenced_rows('revoke a key instead');
CREATE OR REPLACE TRIGGER rate_cards_no_delete BEFORE DELETE ON rate_cards
    FOR EACH ROW EXECUTE FUNCTION refuse_delete_of_referenced_rows(
        'publish a newer rate card instead');
CREATE OR REPLACE TRIGGER rate_cards_no_truncate BEFORE TRUNCATE ON rate_cards
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete_of_referenced_rows(
        'publish a newer rate card instead');
