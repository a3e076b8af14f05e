-- Settle request ARGV[1]: release its hold, add its cost to `pending` and append the settlement
-- to the outbox stream, all in one atomic step. The stream entry is the durable record the
-- settlement poster posts to Postgres.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] the shard's deadline index, KEYS[4] the
-- shard's outbox stream, KEYS[5] the request's settled marker (all under the account's shard
-- hash tag, billing/metering/redis_keys.py: one Cluster slot)
-- ARGV: request_id, cost_mc, member, payload (a SettlementRecord, billing/metering/outbox.py),
-- account_id, marker_ttl_ms
-- Returns {charged_mc, hold_mc, stream_entry_id}.
-- (hold_value.lua is prepended: hold_parse, hold_count_charge.)
-- The stream entry's field names are billing.metering.outbox.STREAM_FIELDS (record, charged,
-- account; tests/billing/test_outbox.py reads them here).
--
-- What the hold covers is always charged in full. Only usage above the hold is capped here,
-- at what is available once the hold is released, so an overrun never eats another request's
-- hold. Postgres then posts min(charged, balance) against the true balance. The cap never goes
-- below the hold: Redis's view may briefly count a posted charge twice (a balance synced after
-- the poster's commit but before its ack), and capping a covered charge against that view
-- would undercharge. A missing hold (voided by the sweeper) is not capped either:
-- Postgres keeps one settlement per request id and caps it there; until the poster posts,
-- `available` may be below zero, which only refuses new holds.
--
-- Idempotent by request id: a settle whose reply was lost (a stall, a dropped connection) is
-- sent again by the gateway's SettlementRescue, and the first may have run. The marker,
-- written in the same atomic step, makes the repeat answer the first result and change
-- nothing, so `pending` counts the charge once. It lives marker_ttl_ms; a repeat after that
-- (or after Redis lost its data) appends a second entry, which Postgres ignores (one usage
-- event per request id) and whose `pending` the poster's ack releases.
local done = redis.call('GET', KEYS[5])
if done then
  local c, held, id = string.match(done, '^(%d+):(%d+):(.+)$')
  return {tonumber(c), tonumber(held), id}
end
local hold = 0
local v = redis.call('HGET', KEYS[2], ARGV[1])
local h = v and hold_parse(v)
if h then
  hold = h.amount
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[3])
  -- Lua's -0 reaches Redis as "-0", which HINCRBY rejects: skip the no-op for a 0 mc hold.
  if hold > 0 then
    redis.call('HINCRBY', KEYS[1], 'held', -hold)
  end
end
local charged = tonumber(ARGV[2])
if h and charged > hold then
  local f = redis.call('HMGET', KEYS[1], 'bal', 'held', 'pending')
  if f[1] then
    local available = tonumber(f[1]) - (tonumber(f[2]) or 0) - (tonumber(f[3]) or 0)
    if available < hold then available = hold end
    if charged > available then charged = available end
  else
    charged = hold
  end
end
if charged > 0 then
  redis.call('HINCRBY', KEYS[1], 'pending', charged)
end
if h then
  -- The spend counters of the window the request started in move from its hold to its charge.
  -- (A hold the sweeper voided was taken off them then; its late charge is not counted.)
  hold_count_charge(KEYS[1], h, charged)
end
local id = redis.call('XADD', KEYS[4], '*', 'p', ARGV[4], 'c', charged, 'a', ARGV[5])
redis.call('SET', KEYS[5], charged .. ':' .. hold .. ':' .. id, 'PX', ARGV[6])
return {charged, hold, id}
