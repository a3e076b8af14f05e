-- The settlement record: what the gateway appends to the Redis outbox for each settled
-- request, as SQL sees it. Python's billing.metering.outbox.SettlementRecord has the same
-- fields in the same order (tests/billing/test_outbox.py compares the two through
-- pg_attribute); settlement_record_from_json (functions/) is the one reader of its wire form,
-- a JSON array in this order. Amounts in millicredits, rates per 1,000 tokens, times in Unix
-- milliseconds. Changing it: ALTER TYPE in a new numbered migration, and the Python record.
CREATE TYPE settlement_record AS (
    request_id                              text,
    account_id                              bigint,
    api_key_id                              bigint,
    model                                   text,
    endpoint                                text,
    prompt_tokens                           integer,
    cached_tokens                           integer,
    completion_tokens                       integer,
    rate_card_id                            bigint,
    input_millicredits_per_1k_tokens        bigint,
    cached_input_millicredits_per_1k_tokens bigint,
    output_millicredits_per_1k_tokens       bigint,
    rounding_mode                           text,
    cost_millicredits                       bigint,
    hold_millicredits                       bigint,
    usage_source                            text,
    status                                  text,
    started_at_ms                           bigint,
    finished_at_ms                          bigint,
    upstream_latency_ms                     integer
);
