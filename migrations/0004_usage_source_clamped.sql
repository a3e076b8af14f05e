-- usage_source 'clamped': the upstream reported more usage than the request could produce
-- (above gateway.usage.usage_bound: the request's output cap x n, or twice our prompt count
-- + 1,000). The row keeps the reported token counts; cost_millicredits is the charge of the
-- bounded counts. The constraint is the one 0001 declared inline (Postgres named it
-- usage_events_usage_source_check), widened; every existing row satisfies it.
ALTER TABLE usage_events
    DROP CONSTRAINT usage_events_usage_source_check,
    ADD CONSTRAINT usage_events_usage_source_check
        CHECK (usage_source IN ('upstream', 'estimated', 'clamped'));
