-- Release request ARGV[1]'s hold with no charge, and take it off the spend counters it counted.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] the account's shard's deadline index
-- ARGV: request_id, member, [max_deadline_ms]  (the sweeper passes now: only expired holds)
-- Returns the millicredits released (0 when there was no such hold).
-- (hold_value.lua is prepended: hold_parse, hold_uncount.)
local v = redis.call('HGET', KEYS[2], ARGV[1])
if not v then
  redis.call('ZREM', KEYS[3], ARGV[2])
  return 0
end
local h = hold_parse(v)
if ARGV[3] and h.deadline > tonumber(ARGV[3]) then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
-- Lua's -0 reaches Redis as "-0", which HINCRBY rejects: skip the no-op for a 0 mc hold.
if h.amount > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', -h.amount)
end
hold_uncount(KEYS[1], h)
return h.amount
