-- Place a hold of ARGV[2] millicredits for request ARGV[1] if the account can cover it and no
-- spend cap would be passed.
-- KEYS[1] account hash {bal, ver, held, pending, shortfall}
-- KEYS[2] holds hash {request_id -> hold value, see hold_value.lua}
-- KEYS[3] the account's shard's deadline index (zset, member "account_id|request_id")
-- KEYS[4] the day's spend counters, KEYS[5] the month's (...:acct:N:spend:d:<day>, ...:m:)
-- All keys share the account's shard hash tag (billing/metering/redis_keys.py): one slot.
-- ARGV: request_id, amount_mc, deadline_ms, member, now_ms, day, month, key_id,
--       then optionally the caps in mc ("" none) in counter order: the day's account and key
--       caps, the month's account and key caps (billing.spend_controls.COUNTER_CAPS)
-- Returns {"OK", available_after} | {"LOAD"} | {"LOAD_SPEND"} | {"INSUFFICIENT", available}
--       | {"SUSPENDED", shortfall} | {"CAP", i, cap_mc, spent_mc} (i: 1-based counter index)
-- available = posted balance - open holds - settled-but-unposted charges; never below zero.
-- A window's spend = its counted holds + the charges of its settled requests; a cap passes
-- when spend + amount <= cap. Refusals write nothing (but the voiding of overdue holds).
-- (hold_value.lua is prepended: hold_value, hold_parse, hold_uncount.)
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
local key_field = 'k:' .. ARGV[8]

local function read_spend()
  local d = redis.call('HMGET', KEYS[4], 'a', key_field)
  local m = redis.call('HMGET', KEYS[5], 'a', key_field)
  return {d[1], d[2], m[1], m[2]}
end

local spend = read_spend()
local capped = false
for i = 1, 4 do
  local cap = ARGV[8 + i]
  if cap and cap ~= '' then
    capped = true
    if not spend[i] then
      -- The cap needs the window's spend, and Redis has not got it: the caller loads it from
      -- Postgres (load_spend.lua) and runs this again.
      return {'LOAD_SPEND'}
    end
  end
end

-- The first cap (the key's before the account's, the day before the month) that `amount`
-- would pass, as {"CAP", i, cap, spent}; nil when none.
local function refused_by_cap()
  if not capped then return nil end
  for _, i in ipairs({2, 1, 4, 3}) do
    local cap = ARGV[8 + i]
    if cap and cap ~= '' and tonumber(spend[i]) + amount > tonumber(cap) then
      return {'CAP', i, tonumber(cap), tonumber(spend[i])}
    end
  end
  return nil
end

local available = bal - held - pending
local refusal = refused_by_cap()
if refusal or available < amount then
  -- Before refusing, void this account's holds whose deadline passed (a crashed gateway's):
  -- they hold both balance and spend.
  local now = tonumber(ARGV[5])
  local all = redis.call('HGETALL', KEYS[2])
  local prefix = string.match(ARGV[4], '^(.-|)')
  for i = 1, #all, 2 do
    local h = hold_parse(all[i + 1])
    if h.deadline <= now then
      redis.call('HDEL', KEYS[2], all[i])
      redis.call('ZREM', KEYS[3], prefix .. all[i])
      held = held - h.amount
      hold_uncount(KEYS[1], h)
    end
  end
  redis.call('HSET', KEYS[1], 'held', held)
  available = bal - held - pending
  spend = read_spend()
  refusal = refused_by_cap()
  if refusal then
    return refusal
  end
  if available < amount then
    return {'INSUFFICIENT', available}
  end
end
-- Count the hold in every counter field that exists (loaded: it counts everything), capped or
-- not, so a cap set later in the window sees the window's whole spend.
local counted = ''
for i = 1, 4 do
  if spend[i] and amount > 0 then
    local field = i <= 2 and KEYS[4] or KEYS[5]
    redis.call('HINCRBY', field, (i % 2 == 1) and 'a' or key_field, amount)
    counted = counted .. '1'
  else
    counted = counted .. '0'
  end
end
redis.call('HSET', KEYS[2], ARGV[1], hold_value(ARGV[2], ARGV[3], ARGV[6], ARGV[7], ARGV[8], counted))
redis.call('HINCRBY', KEYS[1], 'held', amount)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return {'OK', available - amount}
