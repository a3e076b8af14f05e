-- Create the spend counter fields a reserve found missing, from Postgres's sums of posted
-- usage in the windows (billing.spend_controls.window_spend). A field that exists is kept
-- (another process loaded it first, and holds have counted into it since).
-- KEYS[1] the day's counter hash, KEYS[2] the month's
-- ARGV: key field ("k:<key_id>"), day account mc, day key mc, month account mc, month key mc,
--       day expire-at ms, month expire-at ms (a day after each window ends: a request settles
--       in the window it started in, up to its hold's deadline later)
-- Returns 1.
redis.call('HSETNX', KEYS[1], 'a', ARGV[2])
redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSETNX', KEYS[2], 'a', ARGV[4])
redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[5])
redis.call('PEXPIREAT', KEYS[1], ARGV[6])
redis.call('PEXPIREAT', KEYS[2], ARGV[7])
return 1
