-- The one reader of a settlement record's wire form: the JSON array the gateway appends to
-- the outbox (billing.metering.outbox.SettlementRecord.to_json), fields in the order of the
-- settlement_record type (0003); values after the last field (the poster appends two) are
-- not read. A LANGUAGE sql function of one expression, so the planner inlines it and
-- (settlement_record_from_json(r)).field is one ->> and a cast.
CREATE OR REPLACE FUNCTION settlement_record_from_json(r jsonb) RETURNS settlement_record
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ROW(
        r ->> 0, (r ->> 1)::bigint, (r ->> 2)::bigint, r ->> 3, r ->> 4,
        (r ->> 5)::bigint, (r ->> 6)::bigint, (r ->> 7)::bigint, (r ->> 8)::bigint,
        (r ->> 9)::bigint, (r ->> 10)::bigint, (r ->> 11)::bigint, r ->> 12,
        (r ->> 13)::bigint, (r ->> 14)::bigint, r ->> 15, r ->> 16,
        (r ->> 17)::bigint, (r ->> 18)::bigint, (r ->> 19)::integer
    )::settlement_record
$$;
