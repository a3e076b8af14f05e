-- Moves account_month_usage (0013) by the usage events a statement changed: one grouped
-- upsert per statement, in its transaction, over the rows it wrote (post_settlements inserts
-- only fresh request ids, so a replay adds nothing). An update counts its old rows out and
-- its new ones in (a row moved to another month moves its totals); a delete counts them out.
-- ENABLE ALWAYS: the totals follow even a session in replica mode (which bypasses the other
-- triggers: a back-dated test row, an operator's repair, a bulk load).
-- Rows in account order: concurrent posters lock accounts in id order first
-- (post_settlements), so they cannot deadlock here either.
CREATE OR REPLACE FUNCTION count_usage_in_month_totals() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- The posting path: static, so its plan is cached.
        INSERT INTO account_month_usage AS t (account_id, month, model, requests,
                                              prompt_tokens, cached_tokens, completion_tokens,
                                              charged_millicredits)
        SELECT n.account_id, date_trunc('month', n.started_at AT TIME ZONE 'UTC')::date,
               n.model, count(*), sum(n.prompt_tokens), sum(n.cached_tokens),
               sum(n.completion_tokens), sum(n.charged_millicredits)
          FROM new_rows n
         GROUP BY 1, 2, 3
         ORDER BY 1, 2, 3
            ON CONFLICT (account_id, month, model) DO UPDATE
           SET requests = t.requests + EXCLUDED.requests,
               prompt_tokens = t.prompt_tokens + EXCLUDED.prompt_tokens,
               cached_tokens = t.cached_tokens + EXCLUDED.cached_tokens,
               completion_tokens = t.completion_tokens + EXCLUDED.completion_tokens,
               charged_millicredits = t.charged_millicredits + EXCLUDED.charged_millicredits;
    ELSE
        -- Corrections (rare): the INSERT above, fed the changed rows signed, taken from the
        -- transition tables this operation has (an UPDATE both, a DELETE old_rows only).
        EXECUTE format(
            $sql$
            INSERT INTO account_month_usage AS t (account_id, month, model, requests,
                                                  prompt_tokens, cached_tokens,
                                                  completion_tokens, charged_millicredits)
            SELECT c.account_id, date_trunc('month', c.started_at AT TIME ZONE 'UTC')::date,
                   c.model, sum(c.sign), sum(c.sign * c.prompt_tokens),
                   sum(c.sign * c.cached_tokens), sum(c.sign * c.completion_tokens),
                   sum(c.sign * c.charged_millicredits)
              FROM (%s) AS c
             GROUP BY 1, 2, 3
             ORDER BY 1, 2, 3
                ON CONFLICT (account_id, month, model) DO UPDATE
               SET requests = t.requests + EXCLUDED.requests,
                   prompt_tokens = t.prompt_tokens + EXCLUDED.prompt_tokens,
                   cached_tokens = t.cached_tokens + EXCLUDED.cached_tokens,
                   completion_tokens = t.completion_tokens + EXCLUDED.completion_tokens,
                   charged_millicredits = t.charged_millicredits + EXCLUDED.charged_millicredits
            $sql$,
            CASE TG_OP
                WHEN 'UPDATE' THEN 'SELECT 1 AS sign, * FROM new_rows UNION ALL '
                                   'SELECT -1 AS sign, * FROM old_rows'
                ELSE 'SELECT -1 AS sign, * FROM old_rows' END);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER usage_events_month_totals_insert
    AFTER INSERT ON usage_events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_usage_in_month_totals();
CREATE OR REPLACE TRIGGER usage_events_month_totals_update
    AFTER UPDATE ON usage_events REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_usage_in_month_totals();
CREATE OR REPLACE TRIGGER usage_events_month_totals_delete
    AFTER DELETE ON usage_events REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION count_usage_in_month_totals();
ALTER TABLE usage_events ENABLE ALWAYS TRIGGER usage_events_month_totals_insert;
ALTER TABLE usage_events ENABLE ALWAYS TRIGGER usage_events_month_totals_update;
ALTER TABLE usage_events ENABLE ALWAYS TRIGGER usage_events_month_totals_delete;
