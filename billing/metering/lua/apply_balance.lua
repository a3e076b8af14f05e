-- Apply a posted (balance, version) pair read from Postgres if it is newer than what Redis has.
-- Purchases, settlements and reloads may arrive in any order; versions make them converge.
-- KEYS[1] account hash; ARGV: balance_mc, version, shortfall_mc
-- Returns 1 when applied, 0 when Redis already had this version or a newer one.
local cur = redis.call('HGET', KEYS[1], 'ver')
if cur and tonumber(cur) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'bal', ARGV[1], 'ver', ARGV[2], 'shortfall', ARGV[3])
return 1
