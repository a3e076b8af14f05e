-- Settle request ARGV[1]: release its hold, charge min(cost, what the balance covers) and
-- append the settlement to the outbox stream, all in one atomic step. The stream entry is
-- the durable record the settlement writer posts to Postgres.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] deadline index, KEYS[4] outbox stream
-- ARGV: request_id, cost_mc, member, payload_json
-- Returns {charged_mc, hold_mc, stream_entry_id}. A missing hold (already settled or voided
-- by the sweeper) still charges: Postgres dedupes by request id, so nothing is doubled.
local hold = 0
local h = redis.call('HGET', KEYS[2], ARGV[1])
if h then
  hold = tonumber(string.match(h, '^(%d+)'))
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[3])
  -- Lua's -0 reaches Redis as "-0", which HINCRBY rejects: skip the no-op for a 0 mc hold.
  if hold > 0 then
    redis.call('HINCRBY', KEYS[1], 'held', -hold)
  end
end
local f = redis.call('HMGET', KEYS[1], 'bal', 'held', 'pending')
local cost = tonumber(ARGV[2])
local charged = cost
if f[1] then
  local available = tonumber(f[1]) - (tonumber(f[2]) or 0) - (tonumber(f[3]) or 0)
  if available < 0 then available = 0 end
  if charged > available then charged = available end
elseif charged > hold then
  charged = hold
end
if charged > 0 then
  redis.call('HINCRBY', KEYS[1], 'pending', charged)
end
local id = redis.call('XADD', KEYS[4], '*', 'p', ARGV[4], 'c', charged)
return {charged, hold, id}
