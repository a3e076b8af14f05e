-- Month partitions of one partitioned table, usage_events or ledger_entries (0012), for every
-- month from first_month to last_month (their first days, UTC), named <table>_pYYYY_MM, each
-- [month, next month) in UTC. Idempotent: a month that has its partition is left alone.
-- Called by billing.partitions (the service's maintenance loop and `creditgate partitions
-- create-ahead`), one table per transaction, as the application's role: hence SECURITY
-- DEFINER (the tables' owner creates partitions; the role gets EXECUTE on this and nothing
-- else).
--
-- Each partition is created apart and then ATTACHed: ATTACH takes SHARE UPDATE EXCLUSIVE on
-- the table, which readers and writers do not wait for (CREATE TABLE ... PARTITION OF would
-- take ACCESS EXCLUSIVE on it and, held across both tables, deadlocked with a reader of both);
-- the empty DEFAULT partition is locked for the moment its check takes. ATTACH gives the
-- partition the table's indexes, foreign keys and triggers.
--
-- A month whose rows already sit in the DEFAULT partition (maintenance fell that far behind)
-- is not created (out_created false, out_default_rows > 0): Postgres refuses a partition the
-- default holds rows for; an operator moves them (docs/design.md, "How the ledger grows").
CREATE OR REPLACE FUNCTION create_month_partitions(target text, first_month date,
                                                   last_month date)
RETURNS TABLE (out_table text, out_partition text, out_created boolean, out_default_rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    key_column text := CASE target WHEN 'usage_events' THEN 'started_at'
                                   WHEN 'ledger_entries' THEN 'created_at' END;
    month date := date_trunc('month', first_month)::date;
    low timestamptz;
    high timestamptz;
BEGIN
    IF key_column IS NULL THEN
        RAISE EXCEPTION 'not a month-partitioned table: %', target
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    out_table := target;
    WHILE month <= last_month LOOP
        out_partition := target || '_p' || to_char(month, 'YYYY_MM');
        low := month::timestamp AT TIME ZONE 'UTC';
        high := (month + interval '1 month')::timestamp AT TIME ZONE 'UTC';
        out_created := false;
        out_default_rows := 0;
        IF to_regclass(out_partition) IS NULL THEN
            EXECUTE format('SELECT count(*) FROM %I WHERE %I >= $1 AND %I < $2',
                           target || '_default', key_column, key_column)
               INTO out_default_rows USING low, high;
            IF out_default_rows = 0 THEN
                EXECUTE format('CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                               out_partition, target);
                EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                               target, out_partition, low, high);
                out_created := true;
            END IF;
        END IF;
        RETURN NEXT;
        month := (month + interval '1 month')::date;
    END LOOP;
END;
$$;
REVOKE ALL ON FUNCTION create_month_partitions(text, date, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION create_month_partitions(text, date, date) TO creditgate_app;
