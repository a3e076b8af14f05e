-- Raised by post_ledger_entries for an entry that must be posted whole but would take its
-- account below zero: check_violation (23514) naming the rule as its constraint, which
-- billing.ledger.post_entry turns into NegativeBalanceError. Called from a query, so a
-- refusal aborts the statement that planned the entry and everything it wrote.
CREATE OR REPLACE FUNCTION refuse_negative_balance(
    account_id bigint, balance_millicredits bigint, amount_millicredits bigint)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'entry of % mc would take account % below zero (balance % mc)',
        amount_millicredits, account_id, balance_millicredits
        USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_balance_never_below_zero';
END;
$$;
