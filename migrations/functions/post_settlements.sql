-- Post a batch of settlements from the Redis outbox: one usage event per request id, at most
-- once, and its deduction through post_ledger_entries (rule 'cap': each charge capped at what
-- the balance still covers, a refund may have landed since the hold; what could not be
-- collected is the usage event's shortfall; a charge of 0 writes no entry). One statement.
--
-- batch: a JSON array of posting rows [charged_millicredits, seq, record] as
-- billing.metering.posting builds them: charged is what the Redis settle script charged, seq
-- orders an account's settlements, record is the gateway's settlement record
-- (settlement_record_from_json).
--
-- Answers one row per posting row, in (account, seq) order: whether it was posted now (false:
-- its request id was posted before, or earlier in the batch), what it took from the balance,
-- and its account's balance, version and shortfall after the batch.
CREATE OR REPLACE FUNCTION post_settlements(batch jsonb)
RETURNS TABLE (out_request_id text, out_account_id bigint, out_posted boolean,
               out_charged_millicredits bigint, out_balance_millicredits bigint,
               out_balance_version bigint, out_shortfall_millicredits bigint)
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    -- Lock the batch's accounts in id order, so concurrent posters cannot deadlock; the next
    -- statement's snapshot then sees every settlement committed before the locks.
    PERFORM 1 FROM accounts a
     WHERE a.id IN (SELECT DISTINCT (settlement_record_from_json(e -> 2)).account_id
                      FROM jsonb_array_elements(batch) AS e)
     ORDER BY a.id
       FOR UPDATE;

    RETURN QUERY
    WITH items AS (
        SELECT (e ->> 0)::bigint AS charged, (e ->> 1)::integer AS seq,
               settlement_record_from_json(e -> 2) AS r
          FROM jsonb_array_elements(batch) AS e
    ),
    -- Fresh: the first of its request id in the batch, and not in Postgres already.
    flagged AS (
        SELECT i.seq, i.charged, i.r, (i.r).request_id, (i.r).account_id,
               (row_number() OVER (PARTITION BY (i.r).request_id ORDER BY i.seq) = 1
                AND NOT EXISTS (SELECT 1 FROM usage_events u
                                 WHERE u.request_id = (i.r).request_id)) AS fresh
          FROM items i
    ),
    fresh AS (
        SELECT f.*, row_number() OVER (ORDER BY f.seq)::integer AS ord
          FROM flagged f
         WHERE f.fresh
    ),
    deductions AS (
        SELECT d.*
          FROM (SELECT array_agg(f.account_id ORDER BY f.ord) AS account_ids,
                       array_agg('deduction'::text ORDER BY f.ord) AS entry_types,
                       array_agg(-f.charged ORDER BY f.ord) AS amounts,
                       array_agg('usage:' || f.request_id ORDER BY f.ord) AS idempotency_keys,
                       array_agg(f.request_id ORDER BY f.ord) AS refs,
                       array_agg('cap'::text ORDER BY f.ord) AS rules
                  FROM fresh f) AS x,
               LATERAL post_ledger_entries(x.account_ids, x.entry_types, x.amounts,
                                           x.idempotency_keys, x.refs, '{}', x.rules) AS d
    ),
    posted AS (
        SELECT f.*, -COALESCE(d.out_amount_millicredits, 0) AS taken
          FROM fresh f LEFT JOIN deductions d ON d.out_ord = f.ord
    ),
    usage_rows AS (
        INSERT INTO usage_events (
            request_id, account_id, api_key_id, model, endpoint, prompt_tokens, cached_tokens,
            completion_tokens, rate_card_id, input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
            rounding_mode, cost_millicredits, charged_millicredits, shortfall_millicredits,
            hold_millicredits, usage_source, status, started_at, finished_at, upstream_latency_ms)
        SELECT p.request_id, p.account_id, (p.r).api_key_id, (p.r).model, (p.r).endpoint,
               (p.r).prompt_tokens, (p.r).cached_tokens, (p.r).completion_tokens,
               (p.r).rate_card_id, (p.r).input_millicredits_per_1k_tokens,
               (p.r).cached_input_millicredits_per_1k_tokens,
               (p.r).output_millicredits_per_1k_tokens, (p.r).rounding_mode,
               (p.r).cost_millicredits, p.taken, GREATEST((p.r).cost_millicredits - p.taken, 0),
               (p.r).hold_millicredits, (p.r).usage_source, (p.r).status,
               to_timestamp((p.r).started_at_ms / 1000.0),
               to_timestamp((p.r).finished_at_ms / 1000.0), (p.r).upstream_latency_ms
          FROM posted p
         ORDER BY p.account_id, p.seq
        RETURNING 1
    ),
    -- Each account's state after the batch: from post_ledger_entries when it wrote, else as
    -- locked (a batch of repeats changes nothing).
    after AS (
        SELECT DISTINCT ON (d.out_account_id) d.out_account_id, d.out_balance_millicredits,
               d.out_balance_version, d.out_shortfall_millicredits
          FROM deductions d
    )
    SELECT f.request_id, f.account_id, f.fresh, COALESCE(p.taken, 0)::bigint,
           COALESCE(t.out_balance_millicredits, a.balance_millicredits),
           COALESCE(t.out_balance_version, a.balance_version),
           COALESCE(t.out_shortfall_millicredits, a.shortfall_millicredits)
      FROM flagged f
      JOIN accounts a ON a.id = f.account_id
      LEFT JOIN posted p ON p.seq = f.seq AND f.fresh
      LEFT JOIN after t ON t.out_account_id = f.account_id
     ORDER BY f.account_id, f.seq;
END;
$$;
