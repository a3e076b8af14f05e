-- Shared by reserve.lua, settle.lua and void.lua: HoldStore loads each as this file followed
-- by the script, so the holds hash's value format is read and written in one place.
--
-- A hold's value (billing/metering/holds.py documents it):
--   "amount_mc:deadline_ms:day:month:key_id:counted"
-- day "20261203" and month "202612" are the UTC windows the request started in, key_id the
-- API key (0: none), counted four flags ("0"/"1") saying which spend counter fields the
-- reserve added the amount to, in the order of hold_spend_fields. A value of the older form
-- "amount_mc:deadline_ms" belongs to no window and touches no counter.
--
-- Spend counters (hashes under the account's hash tag, created only by load_spend.lua from
-- Postgres, so a field that exists counts everything; never created here):
--   cg:v2:{sNN}:acct:N:spend:d:<day>   fields a (the account) and k:<key_id>
--   cg:v2:{sNN}:acct:N:spend:m:<month> likewise
-- Keys derived here share the account key's stem and hash tag (billing/metering/redis_keys.py,
-- spend_key), so they are in its Cluster slot.

local function hold_value(amount, deadline, day, month, key, counted)
  return amount .. ':' .. deadline .. ':' .. day .. ':' .. month .. ':' .. key .. ':' .. counted
end

local function hold_parse(v)
  local amount, deadline, rest = string.match(v, '^(%d+):(%d+)(.*)$')
  local h = {amount = tonumber(amount), deadline = tonumber(deadline)}
  local day, month, key, counted = string.match(rest, '^:(%d+):(%d+):(%d+):([01][01][01][01])$')
  if day then
    h.day, h.month, h.key, h.counted = day, month, key, counted
  end
  return h
end

-- {hash key, field} of the day's account and key fields, then the month's.
local function spend_fields(account_key, day, month, key)
  local base = string.sub(account_key, 1, -8)  -- "cg:v2:{sNN}:acct:N:" from "...:account"
  local d = base .. 'spend:d:' .. day
  local m = base .. 'spend:m:' .. month
  local k = 'k:' .. key
  return {{d, 'a'}, {d, k}, {m, 'a'}, {m, k}}
end

local function add_if_counted(field, delta)
  -- Lua's -0 reaches Redis as "-0", which HINCRBY rejects: skip a 0 change.
  if delta ~= 0 and redis.call('HEXISTS', field[1], field[2]) == 1 then
    redis.call('HINCRBY', field[1], field[2], delta)
  end
end

-- The hold is released with no charge (void, expiry): take its amount off what it counted.
local function hold_uncount(account_key, h)
  if not h.day then return end
  local f = spend_fields(account_key, h.day, h.month, h.key)
  for i = 1, 4 do
    if string.sub(h.counted, i, i) == '1' then
      add_if_counted(f[i], -h.amount)
    end
  end
end

-- The hold is settled at `charged`: a field that counted the hold moves by charged - hold; a
-- field loaded since the reserve (not counted; Postgres did not have this unposted request)
-- gets the whole charge. Always the window the request started in, whenever it settles.
local function hold_count_charge(account_key, h, charged)
  if not h.day then return end
  local f = spend_fields(account_key, h.day, h.month, h.key)
  if redis.call('EXISTS', f[1][1], f[3][1]) == 0 then
    return  -- no counters in these windows (an account without caps): one call, not four
  end
  for i = 1, 4 do
    if string.sub(h.counted, i, i) == '1' then
      add_if_counted(f[i], charged - h.amount)
    else
      add_if_counted(f[i], charged)
    end
  end
end

