-- Reconciliation runs (billing/reconciliation.py): `creditgate reconcile` and the service's
-- daily run each append one row. Amounts inside mismatches are millicredits (strings).
CREATE TABLE reconciliation_runs (
    id              bigserial PRIMARY KEY,
    -- 'scheduled' (the service's daily run) or 'cli' (`creditgate reconcile`).
    source          text NOT NULL CHECK (source IN ('scheduled', 'cli')),
    -- First UTC day of the per-day deduction check.
    since_day       date NOT NULL,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz NOT NULL,
    ok              boolean NOT NULL,
    -- [{check, accountId, day, requestId, expectedMillicredits, actualMillicredits, note}]
    -- (at most MAX_LISTED_PER_CHECK per check; mismatch_counts has the full counts).
    mismatches      jsonb NOT NULL DEFAULT '[]',
    -- {check: number of mismatches}, every check present.
    mismatch_counts jsonb NOT NULL DEFAULT '{}',
    -- What was examined: {accounts, days, redisBalancesCompared, ...}.
    counts          jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX reconciliation_runs_started_at_idx ON reconciliation_runs (started_at);

-- The per-day check reads usage events by recorded_at (ledger_entries has its created_at
-- index, 0007). BRIN: rows arrive in recorded_at order, so a few pages of summaries cover the
-- table and an insert costs next to nothing (a B-tree would add work to every posting).
CREATE INDEX usage_events_recorded_at_brin ON usage_events USING brin (recorded_at);

GRANT SELECT, INSERT ON reconciliation_runs TO creditgate_app;
GRANT USAGE ON SEQUENCE reconciliation_runs_id_seq TO creditgate_app;
