-- The only writer of ledger entries: inserts entries with their running balance_after, moves
-- each account's balance and shortfall and bumps its version once per entry written, in one
-- statement per call. Callers: billing.ledger.post_entry (one entry: grants, purchases,
-- reversals, shortfall collection) and post_settlements (a batch's usage deductions).
--
-- Entries are the arrays' elements at the same position (all arrays one length; refs and
-- reverses_entry_ids may be '{}' for all NULL), applied in array order per account:
--   amounts_millicredits  signed: credits > 0, debits < 0
--   idempotency_keys      an entry whose key was posted before, or appears earlier in the
--                         call, changes nothing (out_created false)
--   rules                 what a debit does when the balance cannot cover it:
--     'whole'   refused: check_violation, constraint ledger_balance_never_below_zero,
--               nothing written by the call (refuse_negative_balance)
--     'owe'     takes what the balance holds; the rest is added to the account's
--               shortfall_millicredits (refunds and disputes of spent credits)
--     'cap'     takes what the balance holds; the rest is only reported
--               (out_uncovered_millicredits); an entry that takes 0 is not written
--               (settlement deductions: the usage event records the shortfall)
--     'repay'   as 'whole', and the amount taken also lowers the account's shortfall
--               (collecting an outstanding shortfall from new credits)
--
-- The floor without a loop: with B the balance and S_i = B + the sum of the fresh amounts up
-- to entry i, the sequential rule "balance_i = max(balance_i-1 + amount_i, 0)" is
-- balance_i = S_i - min(0, min over j <= i of S_j) (a walk reflected at zero): window sums
-- and minima, no loop. Entries before a refused one are posted exactly as the rule says, so
-- refusing the whole call when any 'whole' entry hits the floor is the sequential answer.
--
-- Accounts are locked in id order (concurrent callers cannot deadlock); an unknown account
-- raises no_data_found (P0002). Answers one row per input entry, in array order, with the
-- account's balance, version and shortfall after the call.
CREATE OR REPLACE FUNCTION post_ledger_entries(
    account_ids bigint[],
    entry_types text[],
    amounts_millicredits bigint[],
    idempotency_keys text[],
    refs text[],
    reverses_entry_ids bigint[],
    rules text[])
RETURNS TABLE (out_ord integer, out_account_id bigint, out_entry_id bigint,
               out_created boolean, out_amount_millicredits bigint,
               out_balance_after_millicredits bigint, out_uncovered_millicredits bigint,
               out_balance_millicredits bigint, out_balance_version bigint,
               out_shortfall_millicredits bigint)
LANGUAGE plpgsql ROWS 500 SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    locked integer;
    unknown bigint;
BEGIN
    PERFORM 1 FROM accounts a WHERE a.id = ANY (account_ids) ORDER BY a.id FOR UPDATE;
    GET DIAGNOSTICS locked = ROW_COUNT;
    IF locked < (SELECT count(DISTINCT x.id) FROM unnest(account_ids) AS x(id)) THEN
        SELECT x.id INTO unknown
          FROM unnest(account_ids) AS x(id)
         WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = x.id)
         LIMIT 1;
        RAISE EXCEPTION 'ledger entry names unknown account %', unknown
            USING ERRCODE = 'no_data_found';
    END IF;

    RETURN QUERY
    WITH items AS (
        SELECT i.ord::integer AS ord, i.account_id, i.entry_type, i.amount, i.idempotency_key,
               i.reference, i.reverses_entry_id, i.rule
          FROM unnest(account_ids, entry_types, amounts_millicredits, idempotency_keys, refs,
                      reverses_entry_ids, rules)
               WITH ORDINALITY AS i(account_id, entry_type, amount, idempotency_key, reference,
                                    reverses_entry_id, rule, ord)
         WHERE i.account_id IS NOT NULL
    ),
    flagged AS (
        SELECT i.*, e.id AS existing_id, e.amount_millicredits AS existing_amount,
               e.balance_after_millicredits AS existing_balance_after,
               (e.id IS NULL AND row_number() OVER (PARTITION BY i.idempotency_key
                                                    ORDER BY i.ord) = 1) AS fresh
          FROM items i
          LEFT JOIN ledger_entries e ON e.idempotency_key = i.idempotency_key
    ),
    summed AS (
        SELECT f.*, a.balance_millicredits AS balance_before,
               a.balance_version AS version_before, a.shortfall_millicredits AS shortfall_before,
               a.balance_millicredits + SUM(CASE WHEN f.fresh THEN f.amount ELSE 0 END) OVER (
                   PARTITION BY f.account_id ORDER BY f.ord) AS reach
          FROM flagged f JOIN accounts a ON a.id = f.account_id
    ),
    -- balance_i and balance_i-1 from the same window: each minimum taken with and without
    -- the current row (S_0 = B, so an account's first entry sees min() of nothing as B).
    floored AS (
        SELECT s.*,
               (s.reach - LEAST(0, MIN(s.reach) OVER w))::bigint AS balance_after,
               (s.reach - CASE WHEN s.fresh THEN s.amount ELSE 0 END
                - LEAST(0, s.balance_before, MIN(s.reach) OVER (
                    w ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)))::bigint
                   AS balance_before_entry
          FROM summed s
        WINDOW w AS (PARTITION BY s.account_id ORDER BY s.ord)
    ),
    stepped AS (
        SELECT f.*, f.balance_after - f.balance_before_entry AS taken
          FROM floored f
    ),
    planned AS (
        SELECT s.*,
               CASE WHEN s.fresh THEN s.taken - s.amount ELSE 0 END::bigint AS uncovered,
               (s.fresh AND NOT (s.rule = 'cap' AND s.taken = 0)) AS written
          FROM stepped s
    ),
    totals AS (
        SELECT p.account_id,
               COUNT(*) FILTER (WHERE p.written) AS entries,
               SUM(p.taken)::bigint AS moved,
               (COALESCE(SUM(p.uncovered) FILTER (WHERE p.written AND p.rule = 'owe'), 0)
                + COALESCE(SUM(p.taken) FILTER (WHERE p.written AND p.rule = 'repay'), 0)
               )::bigint AS owed
          FROM planned p
         GROUP BY p.account_id
    ),
    -- Ids follow the order of each account's entries, as the balance_after chain does.
    inserted AS (
        INSERT INTO ledger_entries (account_id, entry_type, amount_millicredits,
                                    balance_after_millicredits, idempotency_key, reference,
                                    reverses_entry_id)
        SELECT p.account_id, p.entry_type, p.taken, p.balance_after, p.idempotency_key,
               p.reference, p.reverses_entry_id
          FROM planned p
         WHERE p.written
         ORDER BY p.account_id, p.ord
        RETURNING id, idempotency_key
    ),
    -- A data-modifying WITH runs whether or not the answer reads it.
    moved AS (
        UPDATE accounts a
           SET balance_millicredits = a.balance_millicredits + t.moved,
               balance_version = a.balance_version + t.entries,
               shortfall_millicredits = a.shortfall_millicredits + t.owed
          FROM totals t
         WHERE a.id = t.account_id AND t.entries > 0
        RETURNING a.id, a.balance_millicredits, a.balance_version, a.shortfall_millicredits
    )
    SELECT p.ord, p.account_id,
           CASE WHEN p.written THEN n.id ELSE p.existing_id END,
           p.written,
           CASE WHEN p.fresh THEN p.taken ELSE p.existing_amount END,
           CASE WHEN p.fresh THEN p.balance_after ELSE p.existing_balance_after END,
           p.uncovered,
           COALESCE(m.balance_millicredits, p.balance_before),
           COALESCE(m.balance_version, p.version_before),
           COALESCE(m.shortfall_millicredits, p.shortfall_before)
      FROM planned p
      LEFT JOIN inserted n ON p.written AND n.idempotency_key = p.idempotency_key
      LEFT JOIN moved m ON m.id = p.account_id
     WHERE CASE WHEN p.fresh AND p.uncovered > 0 AND p.rule IN ('whole', 'repay')
                THEN refuse_negative_balance(p.account_id, p.balance_before_entry, p.amount)
                ELSE true END
     ORDER BY p.ord;
END;
$$;
