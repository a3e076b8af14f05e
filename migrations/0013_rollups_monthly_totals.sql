-- Exact per-account monthly totals of usage_events and ledger_entries, so a month's statement
-- reads a few rows however many requests the account made (billing/statements.py). Kept in
-- the SAME transaction as the rows they sum by statement-level triggers (one grouped upsert
-- per statement, over the rows it wrote: functions/count_usage_in_month_totals.sql,
-- functions/count_ledger_in_month_totals.sql), so a late posting dated in an old month is
-- counted in that month, and an idempotent replay (which writes no row) adds nothing.
--
-- month: the UTC month of the row's partition key (usage_events.started_at,
-- ledger_entries.created_at). key_prefix (ledger): a reversal's idempotency key up to and
-- including its first ':' ('refund:', 'dispute:', ...: what the statement's lines split
-- reversals by), '' for every other entry (ledger_statement_key_prefix).
-- Detaching a month (billing/partitions.py) leaves its totals here: they are small, and a
-- statement of a later month never reads them. Reconciliation compares the totals with the
-- rows of the months it covers (billing/reconciliation.py, check_month_totals).
--
-- Backfilled below from the rows already posted; the triggers are bound when the function
-- files apply, in the same `creditgate migrate` run: stop the gateway fleet first (as for
-- 0012), or reconciliation reports the rows posted in between.

-- fillfactor 70: room on each page, so a posting's update of a total is a HOT update (no
-- index entry written).
CREATE TABLE account_month_usage (
    account_id              bigint NOT NULL,
    month                   date NOT NULL,
    model                   text NOT NULL,
    requests                bigint NOT NULL,
    prompt_tokens           bigint NOT NULL,
    cached_tokens           bigint NOT NULL,
    completion_tokens       bigint NOT NULL,
    charged_millicredits    bigint NOT NULL,
    PRIMARY KEY (account_id, month, model)
) WITH (fillfactor = 70);

CREATE TABLE account_month_ledger (
    account_id              bigint NOT NULL,
    month                   date NOT NULL,
    entry_type              text NOT NULL,
    key_prefix              text NOT NULL,
    amount_millicredits     bigint NOT NULL,
    entries                 bigint NOT NULL,
    PRIMARY KEY (account_id, month, entry_type, key_prefix)
) WITH (fillfactor = 70);

LOCK TABLE usage_events, ledger_entries IN SHARE MODE;

INSERT INTO account_month_usage
SELECT account_id, date_trunc('month', started_at AT TIME ZONE 'UTC')::date, model, count(*),
       sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), sum(charged_millicredits)
  FROM usage_events
 GROUP BY 1, 2, 3;

INSERT INTO account_month_ledger
SELECT account_id, date_trunc('month', created_at AT TIME ZONE 'UTC')::date, entry_type,
       CASE WHEN entry_type = 'reversal' AND strpos(idempotency_key, ':') > 0
            THEN split_part(idempotency_key, ':', 1) || ':' ELSE '' END,
       sum(amount_millicredits), count(*)
  FROM ledger_entries
 GROUP BY 1, 2, 3, 4;

-- The triggers run as the writer (creditgate_app): they insert and update the totals.
GRANT SELECT, INSERT, UPDATE ON account_month_usage, account_month_ledger TO creditgate_app;
