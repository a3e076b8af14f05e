-- Moves account_month_ledger (0013) by the ledger entries a statement wrote: one grouped
-- upsert per statement, in its transaction, over the rows it wrote (a replayed key writes no
-- row, so adds nothing). The ledger is append-only (ledger_entries_append_only), so inserts
-- are the posting path; an update or delete can only come from a session that bypassed that
-- trigger (replica mode: a back-dated test entry, an operator's repair), and the totals follow
-- it too: the triggers are ENABLE ALWAYS. Rows in account order: concurrent writers lock
-- accounts in id order first (post_ledger_entries), so they cannot deadlock here either.
CREATE OR REPLACE FUNCTION count_ledger_in_month_totals() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- The posting path: static, so its plan is cached.
        INSERT INTO account_month_ledger AS t (account_id, month, entry_type, key_prefix,
                                               amount_millicredits, entries)
        SELECT n.account_id, date_trunc('month', n.created_at AT TIME ZONE 'UTC')::date,
               n.entry_type, ledger_statement_key_prefix(n.entry_type, n.idempotency_key),
               sum(n.amount_millicredits), count(*)
          FROM new_rows n
         GROUP BY 1, 2, 3, 4
         ORDER BY 1, 2, 3, 4
            ON CONFLICT (account_id, month, entry_type, key_prefix) DO UPDATE
           SET amount_millicredits = t.amount_millicredits + EXCLUDED.amount_millicredits,
               entries = t.entries + EXCLUDED.entries;
    ELSE
        -- The same, fed the changed rows signed (old ones out, new ones in), from the
        -- transition tables this operation has.
        EXECUTE format(
            $sql$
            INSERT INTO account_month_ledger AS t (account_id, month, entry_type, key_prefix,
                                                   amount_millicredits, entries)
            SELECT c.account_id, date_trunc('month', c.created_at AT TIME ZONE 'UTC')::date,
                   c.entry_type, ledger_statement_key_prefix(c.entry_type, c.idempotency_key),
                   sum(c.sign * c.amount_millicredits), sum(c.sign)
              FROM (%s) AS c
             GROUP BY 1, 2, 3, 4
             ORDER BY 1, 2, 3, 4
                ON CONFLICT (account_id, month, entry_type, key_prefix) DO UPDATE
               SET amount_millicredits = t.amount_millicredits + EXCLUDED.amount_millicredits,
                   entries = t.entries + EXCLUDED.entries
            $sql$,
            CASE TG_OP
                WHEN 'UPDATE' THEN 'SELECT 1 AS sign, * FROM new_rows UNION ALL '
                                   'SELECT -1 AS sign, * FROM old_rows'
                ELSE 'SELECT -1 AS sign, * FROM old_rows' END);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER ledger_entries_month_totals_insert
    AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_ledger_in_month_totals();
CREATE OR REPLACE TRIGGER ledger_entries_month_totals_update
    AFTER UPDATE ON ledger_entries REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_ledger_in_month_totals();
CREATE OR REPLACE TRIGGER ledger_entries_month_totals_delete
    AFTER DELETE ON ledger_entries REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_ledger_in_month_totals();
ALTER TABLE ledger_entries ENABLE ALWAYS TRIGGER ledger_entries_month_totals_insert;
ALTER TABLE ledger_entries ENABLE ALWAYS TRIGGER ledger_entries_month_totals_update;
ALTER TABLE ledger_entries ENABLE ALWAYS TRIGGER ledger_entries_month_totals_delete;
