-- tollgate: check every limit and charge, atomically, in one round trip.
-- KEYS[1] quota counter of (customer, meter, period); KEYS[2] rate state (GCRA TAT) of the customer.
-- Both keys carry the customer as hash tag, so this runs on Redis Cluster.
-- ARGV[1] cost (units), ARGV[2] cap (-1 = none), ARGV[3] counter expiry (unix seconds),
-- ARGV[4] rate emission interval in microseconds (0 = no rate limit),
-- ARGV[5] rate tolerance in microseconds (interval * burst).
-- Returns {0, used_after} granted, {1, used} over quota, {2, retry_after_us} rate limited.
-- Nothing is written unless the call is granted: a rate-limited or refused call is free.
local cost = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local interval = tonumber(ARGV[4])
local now, new_tat
if interval > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local tat = tonumber(redis.call('GET', KEYS[2]) or now)
  if tat < now then tat = now end
  new_tat = tat + interval
  local allow_at = new_tat - tonumber(ARGV[5])
  if allow_at > now then
    return {2, allow_at - now}
  end
end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if cap >= 0 and used + cost > cap then
  return {1, used}
end
used = redis.call('INCRBY', KEYS[1], cost)
if used == cost then
  -- A new counter: give it its expiry once, not on every call.
  redis.call('EXPIREAT', KEYS[1], ARGV[3])
end
if interval > 0 then
  redis.call('SET', KEYS[2], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1)
end
return {0, used}
