-- Release request ARGV[1]'s hold with no charge.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] set of accounts with open holds,
-- KEYS[4] the previous release's deadline index (zset of "account_id|request_id")
-- ARGV: request_id, account_id, [max_deadline_ms]  (the sweeper passes now: only expired holds)
-- Returns the millicredits released (0 when there was no such hold).
-- The previous release indexed holds in KEYS[4]; its member is removed too, so the holds a
-- gateway of that release placed leave the index when voided here.
local legacy_member = ARGV[2] .. '|' .. ARGV[1]
local h = redis.call('HGET', KEYS[2], ARGV[1])
if not h then
  redis.call('ZREM', KEYS[4], legacy_member)
  return 0
end
local a, d = string.match(h, '^(%d+):(%d+)$')
if ARGV[3] and tonumber(d) > tonumber(ARGV[3]) then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], legacy_member)
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[2])
end
local amount = tonumber(a)
-- Lua's -0 reaches Redis as "-0", which HINCRBY rejects: skip the no-op for a 0 mc hold.
if amount > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', -amount)
end
return amount
