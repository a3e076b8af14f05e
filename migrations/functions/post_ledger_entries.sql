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
--   entry_times           the entry's created_at (its partition, and part of its unique key
--                         with the idempotency key); '{}' or NULL: now(). Given, the key is
--                         looked up in that time's partition only (a settlement's deduction,
--                         dated at its request's start); NULL, in every partition.
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
-- raises no_data_found (P0002). Answers one row per input entry, in array order (out_ord is
-- the position), with the account's balance, version and shortfall after the call;
-- out_entry_id is the entry written or the one posted before under the key, NULL when
-- nothing was (a 'cap' entry that took 0, or a key repeated within the call).
CREATE OR REPLACE FUNCTION post_ledger_entries(
    account_ids bigint[],
    entry_types text[],
    amounts_millicredits bigint[],
    idempotency_keys text[],
    refs text[],
    reverses_entry_ids bigint[],
    rules text[],
    entry_times timestamptz[] DEFAULT '{}')
RETURNS TABLE (out_ord integer, out_account_id bigint, out_entry_id bigint,
               out_created boolean, out_amount_millicredits bigint,
               out_balance_after_millicredits bigint, out_uncovered_millicredits bigint,
               out_balance_millicredits bigint, out_balance_version bigint,
               out_shortfall_millicredits bigint)
LANGUAGE plpgsql ROWS 500 AS $$
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
               i.reference, i.reverses_entry_id, i.rule, i.entry_time
          FROM unnest(account_ids, entry_types, amounts_millicredits, idempotency_keys, refs,
                      reverses_entry_ids, rules, entry_times)
               WITH ORDINALITY AS i(account_id, entry_type, amount, idempotency_key, reference,
                                    reverses_entry_id, rule, entry_time, ord)
         WHERE i.account_id IS NOT NULL
    ),
    -- MATERIALIZED: computed once even if the join to accounts below puts it on the inner
    -- side of a nested loop (stale statistics can make accounts look like one row).
    flagged AS MATERIALIZED (
        SELECT i.*, e.id AS existing_id, e.amount_millicredits AS existing_amount,
               e.balance_after_millicredits AS existing_balance_after,
               (e.id IS NULL AND row_number() OVER (PARTITION BY i.idempotency_key
                                                    ORDER BY i.ord) = 1) AS fresh
          FROM items i
          -- A dated entry's key in its own partition (pruned at run time); an undated one's
          -- in every partition. The one-time filters skip the branch that does not apply.
          LEFT JOIN LATERAL (
              SELECT d.id, d.amount_millicredits, d.balance_after_millicredits
                FROM ledger_entries d
               WHERE i.entry_time IS NOT NULL
                 AND d.idempotency_key = i.idempotency_key AND d.created_at = i.entry_time
              UNION ALL
              SELECT d.id, d.amount_millicredits, d.balance_after_millicredits
                FROM ledger_entries d
               WHERE i.entry_time IS NULL AND d.idempotency_key = i.idempotency_key
               LIMIT 1) AS e ON true
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
        SELECT f.*, (f.balance_after - f.balance_before_entry)::bigint AS taken
          FROM floored f
    ),
    -- Each account's totals on every one of its rows: a window, not a join. No step of this
    -- statement joins two batch-sized sets, so no row estimate can make it quadratic.
    planned AS (
        SELECT s.*,
               COUNT(*) FILTER (WHERE s.written) OVER a AS entries,
               (SUM(s.taken) OVER a)::bigint AS moved,
               (COALESCE(SUM(s.uncovered) FILTER (WHERE s.written AND s.rule = 'owe') OVER a, 0)
                + COALESCE(SUM(s.taken) FILTER (WHERE s.written AND s.rule = 'repay') OVER a, 0)
               )::bigint AS owed
          FROM (SELECT t.*,
                       CASE WHEN t.fresh THEN t.taken - t.amount ELSE 0 END::bigint AS uncovered,
                       (t.fresh AND NOT (t.rule = 'cap' AND t.taken = 0)) AS written
                  FROM stepped t) AS s
        WINDOW a AS (PARTITION BY s.account_id)
    ),
    -- Ids drawn in (account, entry) order, so each account's ids follow its balance_after
    -- chain; known here, so the answer needs no join to the INSERT's RETURNING.
    numbered AS (
        SELECT p.*,
               CASE WHEN p.written THEN nextval('ledger_entries_id_seq') END AS entry_id
          FROM (SELECT * FROM planned ORDER BY account_id, ord) AS p
    ),
    -- Data-modifying WITHs run whether or not the answer reads them.
    inserted AS (
        INSERT INTO ledger_entries (id, account_id, entry_type, amount_millicredits,
                                    balance_after_millicredits, idempotency_key, reference,
                                    reverses_entry_id, created_at)
        SELECT n.entry_id, n.account_id, n.entry_type, n.taken, n.balance_after,
               n.idempotency_key, n.reference, n.reverses_entry_id,
               COALESCE(n.entry_time, now())
          FROM numbered n
         WHERE n.written
         ORDER BY n.entry_id
    ),
    moved AS (
        UPDATE accounts a
           SET balance_millicredits = a.balance_millicredits + t.moved,
               balance_version = a.balance_version + t.entries,
               shortfall_millicredits = a.shortfall_millicredits + t.owed
          FROM (SELECT DISTINCT account_id, entries, moved, owed FROM planned
                 WHERE entries > 0) AS t
         WHERE a.id = t.account_id
    )
    SELECT n.ord, n.account_id, COALESCE(n.entry_id, n.existing_id), n.written,
           CASE WHEN n.fresh THEN n.taken ELSE n.existing_amount END,
           CASE WHEN n.fresh THEN n.balance_after ELSE n.existing_balance_after END,
           n.uncovered,
           n.balance_before + n.moved,
           n.version_before + n.entries,
           n.shortfall_before + n.owed
      FROM numbered n
     WHERE CASE WHEN n.fresh AND n.uncovered > 0 AND n.rule IN ('whole', 'repay')
                THEN refuse_negative_balance(n.account_id, n.balance_before_entry, n.amount)
                ELSE true END
     ORDER BY n.ord;
END;
$$;
