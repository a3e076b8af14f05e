-- After the settlement poster committed a batch to Postgres: acknowledge this account's
-- outbox entries, take their charges off `pending` (once per entry: only when XACK says the
-- entry was still pending) and apply the account's new posted (balance, version).
-- KEYS[1] account hash, KEYS[2] the account's shard's outbox stream (one slot)
-- ARGV: group, balance_mc, version, shortfall_mc, then pairs of (entry_id, charged_mc)
-- One XDEL and one HINCRBY for the whole call rather than one of each per entry: per-entry
-- calls were most of this script's cost in Redis.
local released = 0
local acked = {}
for i = 5, #ARGV, 2 do
  if redis.call('XACK', KEYS[2], ARGV[1], ARGV[i]) == 1 then
    acked[#acked + 1] = ARGV[i]
    released = released + tonumber(ARGV[i + 1])
  end
end
-- In slices: unpack() puts every id on Lua's C stack, which holds 8,000 values at most.
for s = 1, #acked, 1000 do
  redis.call('XDEL', KEYS[2], unpack(acked, s, math.min(s + 999, #acked)))
end
if released > 0 then
  redis.call('HINCRBY', KEYS[1], 'pending', -released)
end
local cur = redis.call('HGET', KEYS[1], 'ver')
if (not cur) or tonumber(cur) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'bal', ARGV[2], 'ver', ARGV[3], 'shortfall', ARGV[4])
end
return released
