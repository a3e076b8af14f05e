-- Void an account's holds whose deadline has passed (a crashed gateway's), for the sweeper.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] set of accounts with open holds
-- ARGV: account_id, now_ms
-- Returns how many holds of more than 0 mc were voided (0 mc ones are voided, not counted).
-- An account left without holds leaves KEYS[3].
local now = tonumber(ARGV[2])
local all = redis.call('HGETALL', KEYS[2])
local released, counted = 0, 0
for i = 1, #all, 2 do
  local a, d = string.match(all[i + 1], '^(%d+):(%d+)$')
  if tonumber(d) <= now then
    redis.call('HDEL', KEYS[2], all[i])
    local amount = tonumber(a)
    if amount > 0 then
      released = released + amount
      counted = counted + 1
    end
  end
end
if released > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', -released)
end
if redis.call('HLEN', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
end
return counted
