-- Reconciliation runs started through the admin API (`POST /admin/v1/reconciliation-runs`,
-- admin_api/reconciliation.py, used by `creditgate qa`) are recorded with source 'api'.
ALTER TABLE reconciliation_runs DROP CONSTRAINT reconciliation_runs_source_check;
ALTER TABLE reconciliation_runs
    ADD CONSTRAINT reconciliation_runs_source_check CHECK (source IN ('scheduled', 'cli', 'api'));
