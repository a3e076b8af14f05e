-- After the settlement poster wrote an outbox entry to settlement_dead_letters (Postgres
-- refused its record, or it could not be read): acknowledge and delete the entry, and take its
-- charge off the account's `pending`, once: only when XACK says the entry was still pending
-- (as ack_posted.lua does), so a poster that crashed after this script and meets the entry
-- again, or two posters, release it once.
-- KEYS[1] outbox stream, KEYS[2] account hash (absent when the entry names no readable account
-- of the stream's shard: the two share one Cluster slot)
-- ARGV[1] group, ARGV[2] entry id, ARGV[3] charged_mc (0 when unreadable)
-- Reply: 1 when the entry was acknowledged now, 0 when it was not pending (nothing released).
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 0
end
redis.call('XDEL', KEYS[1], ARGV[2])
local charged = tonumber(ARGV[3])
if KEYS[2] and charged > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  -- Never below zero: `pending` is the sum of charges not yet posted; a hand-written entry
  -- whose charge never entered it must not make it negative (available above the balance).
  local pending = tonumber(redis.call('HGET', KEYS[2], 'pending') or '0')
  local released = math.min(charged, pending)
  if released > 0 then
    redis.call('HINCRBY', KEYS[2], 'pending', -released)
  end
end
return 1
