-- Resetting a live flag to its environment's value deletes its row (billing/live_flags.py,
-- reset_flag; audited as flag.reset): 0007 granted the application's role no DELETE on flags.
GRANT DELETE ON flags TO creditgate_app;
