-- record_settlements, set-based: the same contract as 0002's (one usage event and one
-- deduction entry per request id, at most once; each charge capped at what the balance still
-- covers; the rest is the usage event's shortfall), in a few statements per batch instead of
-- four per settlement. 0002's loop updated an account row once per settlement, which made
-- Postgres the settlement writer's bottleneck (bench/paired.py: the outbox backlog grew under
-- a sustained 1,500 requests/s on one account).
--
-- The cap, without a loop: with an account's settlements in batch order (seq) and B its
-- balance, posted_i = clamp(charged_i, 0, B - sum of charged_j for j < i). Before the first
-- capped one this is the sequential rule; from it on, B - sum <= 0, so the rest post 0 as the
-- loop did once the balance reached 0.
--
-- It also returns each account's posted balance after the batch, so the writer needs one
-- statement (its own transaction) per batch instead of BEGIN, two queries and COMMIT.
DROP FUNCTION record_settlements(jsonb);
CREATE FUNCTION record_settlements(batch jsonb)
RETURNS TABLE (out_request_id text, out_account_id bigint, out_recorded boolean,
               out_charged_millicredits bigint, out_balance_millicredits bigint,
               out_balance_version bigint, out_shortfall_millicredits bigint)
LANGUAGE plpgsql AS $$
DECLARE
    unknown bigint;
BEGIN
    -- Lock the batch's accounts in id order, so concurrent writers cannot deadlock; the
    -- next statement's snapshot then sees every settlement committed before the locks.
    PERFORM 1 FROM accounts a
     WHERE a.id IN (SELECT DISTINCT (e ->> 'account_id')::bigint
                      FROM jsonb_array_elements(batch) AS e)
     ORDER BY a.id
       FOR UPDATE;
    SELECT x.id INTO unknown
      FROM (SELECT DISTINCT (e ->> 'account_id')::bigint AS id
              FROM jsonb_array_elements(batch) AS e) AS x
     WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = x.id)
     LIMIT 1;
    IF unknown IS NOT NULL THEN
        RAISE EXCEPTION 'settlement batch names unknown account %', unknown;
    END IF;

    RETURN QUERY
    WITH items AS (
        SELECT * FROM jsonb_to_recordset(batch) AS x(
            seq int, request_id text, account_id bigint, api_key_id bigint, model text,
            endpoint text, prompt_tokens int, cached_tokens int, completion_tokens int,
            rate_card_id bigint, input_rate bigint, cached_rate bigint, output_rate bigint,
            rounding_mode text, cost bigint, charged bigint, hold bigint, usage_source text,
            status text, started_at_ms bigint, finished_at_ms bigint, upstream_latency_ms int)
    ),
    -- The first of each request id in the batch, unless Postgres has it already.
    fresh AS (
        SELECT DISTINCT ON (i.request_id) i.*
          FROM items i
         WHERE NOT EXISTS (SELECT 1 FROM usage_events u WHERE u.request_id = i.request_id)
         ORDER BY i.request_id, i.seq
    ),
    capped AS (
        SELECT f.*,
               GREATEST(LEAST(f.charged,
                              a.balance_millicredits - COALESCE(SUM(f.charged) OVER (
                                  PARTITION BY f.account_id ORDER BY f.seq
                                  ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0)),
                        0)::bigint AS posted,
               a.balance_millicredits AS balance_before
          FROM fresh f JOIN accounts a ON a.id = f.account_id
    ),
    posted AS (
        SELECT c.*,
               (c.balance_before - SUM(c.posted) OVER (
                   PARTITION BY c.account_id ORDER BY c.seq))::bigint AS balance_after
          FROM capped c
    ),
    usage_rows AS (
        INSERT INTO usage_events (
            request_id, account_id, api_key_id, model, endpoint, prompt_tokens, cached_tokens,
            completion_tokens, rate_card_id, input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
            rounding_mode, cost_millicredits, charged_millicredits, shortfall_millicredits,
            hold_millicredits, usage_source, status, started_at, finished_at, upstream_latency_ms)
        SELECT p.request_id, p.account_id, p.api_key_id, p.model, p.endpoint, p.prompt_tokens,
               p.cached_tokens, p.completion_tokens, p.rate_card_id, p.input_rate, p.cached_rate,
               p.output_rate, p.rounding_mode, p.cost, p.posted, GREATEST(p.cost - p.posted, 0),
               p.hold, p.usage_source, p.status, to_timestamp(p.started_at_ms / 1000.0),
               to_timestamp(p.finished_at_ms / 1000.0), p.upstream_latency_ms
          FROM posted p
         ORDER BY p.account_id, p.seq
        RETURNING 1
    ),
    -- The ledger's unique idempotency key turns any race past the lock into an error (the
    -- writer retries the batch), never into a second charge.
    ledger_rows AS (
        INSERT INTO ledger_entries (account_id, entry_type, amount_millicredits,
                                    balance_after_millicredits, idempotency_key, reference)
        SELECT p.account_id, 'deduction', -p.posted, p.balance_after,
               'usage:' || p.request_id, p.request_id
          FROM posted p
         WHERE p.posted > 0
         ORDER BY p.account_id, p.seq
        RETURNING 1
    ),
    balances AS (
        UPDATE accounts a
           SET balance_millicredits = a.balance_millicredits - t.total,
               balance_version = a.balance_version + t.entries
          FROM (SELECT p.account_id, SUM(p.posted)::bigint AS total, COUNT(*) AS entries
                  FROM posted p WHERE p.posted > 0 GROUP BY p.account_id) AS t
         WHERE a.id = t.account_id
        RETURNING a.id, a.balance_millicredits, a.balance_version, a.shortfall_millicredits
    )
    -- An account this batch did not charge keeps the balance read under the lock.
    SELECT i.request_id, i.account_id, p.request_id IS NOT NULL, COALESCE(p.posted, 0),
           COALESCE(b.balance_millicredits, a.balance_millicredits),
           COALESCE(b.balance_version, a.balance_version),
           COALESCE(b.shortfall_millicredits, a.shortfall_millicredits)
      FROM items i
      JOIN accounts a ON a.id = i.account_id
      LEFT JOIN posted p ON p.request_id = i.request_id AND p.seq = i.seq
      LEFT JOIN balances b ON b.id = i.account_id
     ORDER BY i.account_id, i.seq;
END;
$$;
