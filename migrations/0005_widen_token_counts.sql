-- Token counts as bigint: a record whose counts do not fit integer (an older gateway, a
-- hand-written entry; the gateway now bounds reported usage, gateway/usage.py) failed its
-- whole batch in Postgres. Any count a balance can pay for now fits. settlement_record (0003)
-- and usage_events (0001) change together: post_settlements copies one into the other, and
-- settlement_record_from_json (functions/) reads the counts as bigint.
-- Rewrites usage_events once (ACCESS EXCLUSIVE while it runs).
ALTER TYPE settlement_record
    ALTER ATTRIBUTE prompt_tokens TYPE bigint,
    ALTER ATTRIBUTE cached_tokens TYPE bigint,
    ALTER ATTRIBUTE completion_tokens TYPE bigint;
ALTER TABLE usage_events
    ALTER COLUMN prompt_tokens TYPE bigint,
    ALTER COLUMN cached_tokens TYPE bigint,
    ALTER COLUMN completion_tokens TYPE bigint;
