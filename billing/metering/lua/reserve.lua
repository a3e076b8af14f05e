-- Place a hold of ARGV[2] millicredits for request ARGV[1] if the account can cover it.
-- KEYS[1] account hash {bal, ver, held, pending, shortfall}
-- KEYS[2] holds hash {request_id -> "amount:deadline_ms"}
-- KEYS[3] global deadline index (zset, member "account_id|request_id")
-- ARGV: request_id, amount_mc, deadline_ms, member, now_ms
-- Returns {"OK", available_after} | {"LOAD"} | {"INSUFFICIENT", available} | {"SUSPENDED", shortfall}
-- available = posted balance - open holds - settled-but-unposted charges; never below zero.
local f = redis.call('HMGET', KEYS[1], 'ver', 'bal', 'held', 'pending', 'shortfall')
if not f[1] then
  return {'LOAD'}
end
local existing = redis.call('HGET', KEYS[2], ARGV[1])
local bal = tonumber(f[2]) or 0
local held = tonumber(f[3]) or 0
local pending = tonumber(f[4]) or 0
local shortfall = tonumber(f[5]) or 0
if existing then
  -- Idempotent: a repeat of the same request id returns the hold it already has.
  return {'OK', bal - held - pending}
end
if shortfall > 0 then
  return {'SUSPENDED', shortfall}
end
local amount = tonumber(ARGV[2])
local available = bal - held - pending
if available < amount then
  -- Before refusing, void this account's holds whose deadline passed (a crashed gateway's).
  local now = tonumber(ARGV[5])
  local all = redis.call('HGETALL', KEYS[2])
  local prefix = string.match(ARGV[4], '^(.-|)')
  for i = 1, #all, 2 do
    local a, d = string.match(all[i + 1], '^(%d+):(%d+)$')
    if tonumber(d) <= now then
      redis.call('HDEL', KEYS[2], all[i])
      redis.call('ZREM', KEYS[3], prefix .. all[i])
      held = held - tonumber(a)
    end
  end
  redis.call('HSET', KEYS[1], 'held', held)
  available = bal - held - pending
  if available < amount then
    return {'INSUFFICIENT', available}
  end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('HINCRBY', KEYS[1], 'held', amount)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return {'OK', available - amount}
