-- Month partitions of usage_events and ledger_entries (0012) for every month from first_month
-- to last_month (their first days, UTC), named <table>_pYYYY_MM, each [month, next month) in
-- UTC. Idempotent: a month that has its partition is left alone. Called by
-- billing.partitions (the service's maintenance loop and `creditgate partitions
-- create-ahead`) as the application's role, hence SECURITY DEFINER (the tables' owner
-- creates partitions; the role gets EXECUTE on this function and nothing else).
--
-- A month whose rows already sit in the DEFAULT partition (maintenance fell that far behind)
-- is not created (out_created false, out_default_rows > 0): Postgres refuses a partition
-- the default holds rows for; an operator moves them (docs/design.md, "How the ledger grows").
-- Creating a partition locks its table briefly: lock_timeout bounds the wait behind readers.
CREATE OR REPLACE FUNCTION create_month_partitions(first_month date, last_month date)
RETURNS TABLE (out_table text, out_partition text, out_created boolean, out_default_rows bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    target text;
    month date;
    low timestamptz;
    high timestamptz;
    in_default bigint;
BEGIN
    FOREACH target IN ARRAY ARRAY['usage_events', 'ledger_entries'] LOOP
        month := date_trunc('month', first_month)::date;
        WHILE month <= last_month LOOP
            out_table := target;
            out_partition := target || '_p' || to_char(month, 'YYYY_MM');
            low := month::timestamp AT TIME ZONE 'UTC';
            high := (month + interval '1 month')::timestamp AT TIME ZONE 'UTC';
            out_created := false;
            out_default_rows := 0;
            IF to_regclass(out_partition) IS NULL THEN
                EXECUTE format('SELECT count(*) FROM %I WHERE %I >= $1 AND %I < $2',
                               target || '_default',
                               CASE target WHEN 'usage_events' THEN 'started_at'
                                           ELSE 'created_at' END,
                               CASE target WHEN 'usage_events' THEN 'started_at'
                                           ELSE 'created_at' END)
                   INTO in_default USING low, high;
                out_default_rows := in_default;
                IF in_default = 0 THEN
                    EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                                   out_partition, target, low, high);
                    out_created := true;
                END IF;
            END IF;
            RETURN NEXT;
            month := (month + interval '1 month')::date;
        END LOOP;
    END LOOP;
END;
$$;
REVOKE ALL ON FUNCTION create_month_partitions(date, date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION create_month_partitions(date, date) TO creditgate_app;
