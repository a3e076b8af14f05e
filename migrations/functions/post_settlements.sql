-- Post a batch of settlements from the Redis outbox: one usage event per request id, at most
-- once (looked up by its id and start time, the partition key, 0012), and its deduction
-- through post_ledger_entries (dated at the request's start; rule 'cap': each charge capped
-- at what the balance still covers, a refund may have landed since the hold; what could not be
-- collected is the usage event's shortfall; a charge of 0 writes no entry), in one
-- transaction: a lock, then one statement.
--
-- batch: a JSON array of posting rows as billing.metering.posting builds them: each is the
-- gateway's settlement record (settlement_record_from_json reads its fields) with what the
-- Redis settle script charged appended (read here from the end, at -1). An account's
-- settlements are applied in batch order.
--
-- Answers one row per posting row, in (account, batch) order: whether it was posted now
-- (false: its request id was posted before, or earlier in the batch), what it took from the
-- balance, and its account's balance, version and shortfall after the batch.
CREATE OR REPLACE FUNCTION post_settlements(batch jsonb)
RETURNS TABLE (out_request_id text, out_account_id bigint, out_posted boolean,
               out_charged_millicredits bigint, out_balance_millicredits bigint,
               out_balance_version bigint, out_shortfall_millicredits bigint)
LANGUAGE plpgsql AS $$
BEGIN
    -- Lock the batch's accounts in id order, so concurrent posters cannot deadlock; the next
    -- statement's snapshot then sees every settlement committed before the locks.
    PERFORM 1 FROM accounts a
     WHERE a.id IN (SELECT DISTINCT (settlement_record_from_json(e)).account_id
                      FROM jsonb_array_elements(batch) AS e)
     ORDER BY a.id
       FOR UPDATE;

    RETURN QUERY
    -- Only the few columns the steps below need travel through them (every step copies its
    -- rows); the usage insert reads the whole record from the batch by position.
    WITH items AS (
        SELECT t.pos::integer AS pos, (t.e ->> -1)::bigint AS charged,
               (settlement_record_from_json(t.e)).request_id,
               (settlement_record_from_json(t.e)).account_id,
               -- The request's start: the partition of its usage event and its deduction.
               to_timestamp((settlement_record_from_json(t.e)).started_at_ms / 1000.0)
                   AS started_at
          FROM jsonb_array_elements(batch) WITH ORDINALITY AS t(e, pos)
    ),
    -- Fresh: the first of its request id in the batch, and not in Postgres already.
    flagged AS (
        SELECT i.*,
               (row_number() OVER (PARTITION BY i.request_id ORDER BY i.pos) = 1
                AND NOT EXISTS (SELECT 1 FROM usage_events u
                                 WHERE u.request_id = i.request_id
                                   AND u.started_at = i.started_at)) AS fresh
          FROM items i
    ),
    -- ord: a fresh settlement's position among the fresh ones, the index of its deduction.
    ordered AS (
        SELECT f.*,
               CASE WHEN f.fresh
                    THEN count(*) FILTER (WHERE f.fresh) OVER (ORDER BY f.pos) END::integer AS ord
          FROM flagged f
    ),
    -- post_ledger_entries answers in its arrays' order; its answer is kept as arrays and read
    -- by position, never joined back: no step of this statement joins two batch-sized sets,
    -- so no row estimate can make it quadratic.
    ledger AS (
        SELECT array_agg(d.out_amount_millicredits ORDER BY d.out_ord) AS amounts,
               array_agg(d.out_balance_millicredits ORDER BY d.out_ord) AS balances,
               array_agg(d.out_balance_version ORDER BY d.out_ord) AS versions,
               array_agg(d.out_shortfall_millicredits ORDER BY d.out_ord) AS shortfalls
          FROM (SELECT array_agg(o.account_id ORDER BY o.ord) AS account_ids,
                       array_agg('deduction'::text ORDER BY o.ord) AS entry_types,
                       array_agg(-o.charged ORDER BY o.ord) AS amounts,
                       array_agg('usage:' || o.request_id ORDER BY o.ord) AS idempotency_keys,
                       array_agg(o.request_id ORDER BY o.ord) AS refs,
                       array_agg('cap'::text ORDER BY o.ord) AS rules,
                       array_agg(o.started_at ORDER BY o.ord) AS entry_times
                  FROM ordered o
                 WHERE o.fresh) AS x,
               LATERAL post_ledger_entries(x.account_ids, x.entry_types, x.amounts,
                                           x.idempotency_keys, x.refs, '{}', x.rules,
                                           x.entry_times) AS d
    ),
    posted AS (
        SELECT o.*, COALESCE(-l.amounts[o.ord], 0)::bigint AS taken
          FROM ordered o CROSS JOIN ledger l
    ),
    usage_rows AS (
        INSERT INTO usage_events (
            request_id, account_id, api_key_id, model, endpoint, prompt_tokens, cached_tokens,
            completion_tokens, rate_card_id, input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
            rounding_mode, cost_millicredits, charged_millicredits, shortfall_millicredits,
            hold_millicredits, usage_source, status, started_at, finished_at, upstream_latency_ms)
        SELECT r.request_id, r.account_id, r.api_key_id, r.model, r.endpoint, r.prompt_tokens,
               r.cached_tokens, r.completion_tokens, r.rate_card_id,
               r.input_millicredits_per_1k_tokens, r.cached_input_millicredits_per_1k_tokens,
               r.output_millicredits_per_1k_tokens, r.rounding_mode, r.cost_millicredits,
               p.taken, GREATEST(r.cost_millicredits - p.taken, 0), r.hold_millicredits,
               r.usage_source, r.status, p.started_at,
               to_timestamp(r.finished_at_ms / 1000.0), r.upstream_latency_ms
          FROM posted p,
               -- OFFSET 0: the row is taken out of the batch once, not once per field.
               LATERAL (SELECT batch -> (p.pos - 1)::integer AS e OFFSET 0) AS x,
               LATERAL (SELECT (settlement_record_from_json(x.e)).*) AS r
         WHERE p.fresh
         ORDER BY p.account_id, p.pos
    )
    -- An account's state after the batch: from post_ledger_entries (any of its deductions'
    -- rows), or, when it had none (a batch of repeats changes nothing), as locked.
    SELECT p.request_id, p.account_id, p.fresh, p.taken,
           COALESCE(l.balances[p.account_ord],
                    (SELECT a.balance_millicredits FROM accounts a WHERE a.id = p.account_id)),
           COALESCE(l.versions[p.account_ord],
                    (SELECT a.balance_version FROM accounts a WHERE a.id = p.account_id)),
           COALESCE(l.shortfalls[p.account_ord],
                    (SELECT a.shortfall_millicredits FROM accounts a WHERE a.id = p.account_id))
      FROM (SELECT q.*, max(q.ord) OVER (PARTITION BY q.account_id) AS account_ord
              FROM posted q) AS p
      CROSS JOIN ledger l
     ORDER BY p.account_id, p.pos;
END;
$$;
