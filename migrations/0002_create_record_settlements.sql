-- Post a batch of settlements from the Redis outbox: one usage event and one deduction
-- ledger entry per request id, at most once, in one round trip. Each charge is capped at the
-- balance (a refund may have landed since the hold); what could not be collected is the usage
-- event's shortfall. Accounts are locked in id order so concurrent writers cannot deadlock.
CREATE FUNCTION record_settlements(batch jsonb)
RETURNS TABLE (out_request_id text, out_account_id bigint, out_recorded boolean,
               out_charged_millicredits bigint)
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    bal bigint;
    posted bigint;
    usage_id bigint;
BEGIN
    FOR s IN
        SELECT * FROM jsonb_to_recordset(batch) AS x(
            seq int, request_id text, account_id bigint, api_key_id bigint, model text,
            endpoint text, prompt_tokens int, cached_tokens int, completion_tokens int,
            rate_card_id bigint, input_rate bigint, cached_rate bigint, output_rate bigint,
            rounding_mode text, cost bigint, charged bigint, hold bigint, usage_source text,
            status text, started_at_ms bigint, finished_at_ms bigint, upstream_latency_ms int)
        ORDER BY x.account_id, x.seq
    LOOP
        SELECT a.balance_millicredits INTO bal FROM accounts a WHERE a.id = s.account_id FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'settlement % names unknown account %', s.request_id, s.account_id;
        END IF;
        posted := GREATEST(LEAST(s.charged, bal), 0);
        usage_id := NULL;
        INSERT INTO usage_events (
            request_id, account_id, api_key_id, model, endpoint, prompt_tokens, cached_tokens,
            completion_tokens, rate_card_id, input_millicredits_per_1k_tokens,
            cached_input_millicredits_per_1k_tokens, output_millicredits_per_1k_tokens,
            rounding_mode, cost_millicredits, charged_millicredits, shortfall_millicredits,
            hold_millicredits, usage_source, status, started_at, finished_at, upstream_latency_ms)
        VALUES (
            s.request_id, s.account_id, s.api_key_id, s.model, s.endpoint, s.prompt_tokens,
            s.cached_tokens, s.completion_tokens, s.rate_card_id, s.input_rate, s.cached_rate,
            s.output_rate, s.rounding_mode, s.cost, posted, GREATEST(s.cost - posted, 0), s.hold,
            s.usage_source, s.status, to_timestamp(s.started_at_ms / 1000.0),
            to_timestamp(s.finished_at_ms / 1000.0), s.upstream_latency_ms)
        ON CONFLICT (request_id) DO NOTHING
        RETURNING id INTO usage_id;

        out_request_id := s.request_id;
        out_account_id := s.account_id;
        IF usage_id IS NULL THEN
            out_recorded := false;
            out_charged_millicredits := 0;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF posted > 0 THEN
            UPDATE accounts
               SET balance_millicredits = balance_millicredits - posted,
                   balance_version = balance_version + 1
             WHERE id = s.account_id;
            INSERT INTO ledger_entries (account_id, entry_type, amount_millicredits,
                                        balance_after_millicredits, idempotency_key, reference)
            VALUES (s.account_id, 'deduction', -posted, bal - posted,
                    'usage:' || s.request_id, s.request_id);
        END IF;
        out_recorded := true;
        out_charged_millicredits := posted;
        RETURN NEXT;
    END LOOP;
END;
$$;
