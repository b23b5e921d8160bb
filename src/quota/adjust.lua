-- tollgate: add a (possibly negative) delta to a quota counter, never below 0.
-- KEYS[1] counter; ARGV[1] delta; ARGV[2] expiry (unix seconds); ARGV[3] 1 = leave an absent
-- counter absent (it is seeded from the ledger by the next reservation). Returns the new value.
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v < 0 then
  redis.call('SET', KEYS[1], 0)
  v = 0
end
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return v
