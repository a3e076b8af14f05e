-- Count a request against its key's requests-per-minute limit: a sliding window of 60 s, the
-- start of each request admitted in it kept in a sorted set (score: Redis's clock, ms, so
-- every gateway process counts on one clock).
-- KEYS[1] the key's rpm sorted set (billing/metering/redis_keys.py: rpm_key)
-- ARGV: limit, member (unique per request), window_ms
-- Returns {1, used} when admitted (used counts this request) or {0, used, retry_after_ms}:
-- the time until enough of the counted requests leave the window for one more.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = redis.call('ZCARD', KEYS[1])
if used >= limit then
  -- The (used - limit + 1)-th oldest start must leave the window (more than one when the
  -- limit was lowered).
  local oldest = redis.call('ZRANGE', KEYS[1], used - limit, used - limit, 'WITHSCORES')
  return {0, used, tonumber(oldest[2]) + window - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], window)
return {1, used + 1}
