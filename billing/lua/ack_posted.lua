-- After the settlement writer committed a batch to Postgres: acknowledge this account's
-- outbox entries, take their charges off `pending` (once per entry: only when XACK says the
-- entry was still pending) and apply the account's new posted (balance, version).
-- KEYS[1] account hash, KEYS[2] outbox stream
-- ARGV: group, balance_mc, version, shortfall_mc, then pairs of (entry_id, charged_mc)
local released = 0
for i = 5, #ARGV, 2 do
  if redis.call('XACK', KEYS[2], ARGV[1], ARGV[i]) == 1 then
    redis.call('XDEL', KEYS[2], ARGV[i])
    local c = tonumber(ARGV[i + 1])
    if c > 0 then
      redis.call('HINCRBY', KEYS[1], 'pending', -c)
      released = released + c
    end
  end
end
local cur = redis.call('HGET', KEYS[1], 'ver')
if (not cur) or tonumber(cur) < tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'bal', ARGV[2], 'ver', ARGV[3], 'shortfall', ARGV[4])
end
return released
