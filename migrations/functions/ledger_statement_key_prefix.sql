-- What a ledger entry's statement line needs of its idempotency key, kept in
-- account_month_ledger.key_prefix (0013): a reversal's key up to and including its first ':'
-- (billing.purchases.purchase_ledger's REFUND_KEY_PREFIX / DISPUTE_KEY_PREFIX say which are
-- refunds and disputes), '' for every other entry and for a key without ':'.
CREATE OR REPLACE FUNCTION ledger_statement_key_prefix(entry_type text, idempotency_key text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN entry_type = 'reversal' AND strpos(idempotency_key, ':') > 0
                THEN split_part(idempotency_key, ':', 1) || ':' ELSE '' END
$$;
