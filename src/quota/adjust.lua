-- tollgate: add a (possibly negative) delta to a quota counter, never below 0.
-- KEYS[1] counter; ARGV[1] delta; ARGV[2] expiry (unix seconds). Returns the new value.
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if v < 0 then
  redis.call('SET', KEYS[1], 0)
  v = 0
end
redis.call('EXPIREAT', KEYS[1], ARGV[2])
return v
