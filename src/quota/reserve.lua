-- tollgate: check every limit and charge, atomically, for a batch of requests in one round trip.
-- Request i (1-based): KEYS[2i-1] quota counter of (customer, meter, period), KEYS[2i] rate state
-- (GCRA TAT) of the customer. Both carry the customer as hash tag: on Redis Cluster a batch is one
-- request (one slot); on a single server a batch is whatever requests were waiting.
-- ARGV[6i-5] cost (units), ARGV[6i-4] cap (-1 = none), ARGV[6i-3] counter expiry (unix seconds),
-- ARGV[6i-2] rate emission interval in microseconds (0 = no rate limit),
-- ARGV[6i-1] rate tolerance in microseconds (interval * burst),
-- ARGV[6i] 1 = report an absent counter instead of starting it from 0 (the caller seeds it).
-- The last key is the batch's own: the call records there which requests it granted (for
-- `cancel.lua`, when the caller stopped waiting), and does nothing if that key already exists
-- (a cancel came first). ARGV[#ARGV] is its lifetime in milliseconds.
-- Requests are decided one after the other, each exactly as if it came alone, so a batch changes
-- nothing about exactness. Returns {code_1, value_1, code_2, value_2, ...}, per request:
-- {0, used_after} granted, {1, used} over quota, {2, retry_after_us} rate limited,
-- {3, 0} the counter is absent (only when asked): nothing was charged;
-- or {4} for the whole batch: it was cancelled before it ran.
-- Nothing is written for a request unless it is granted: a rate-limited or refused call is free.
local bk = KEYS[#KEYS]
if redis.call('EXISTS', bk) == 1 then
  return {4}
end
local out = {}
local granted = {}
local now
for i = 1, (#KEYS - 1) / 2 do
  local qk, rk, b = KEYS[2 * i - 1], KEYS[2 * i], 6 * (i - 1)
  local cost = tonumber(ARGV[b + 1])
  local cap = tonumber(ARGV[b + 2])
  local interval = tonumber(ARGV[b + 4])
  local code, value, new_tat = nil, nil, nil
  if interval > 0 then
    if not now then
      local t = redis.call('TIME')
      now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    end
    local tat = tonumber(redis.call('GET', rk) or now)
    if tat < now then tat = now end
    new_tat = tat + interval
    local allow_at = new_tat - tonumber(ARGV[b + 5])
    if allow_at > now then
      code, value = 2, allow_at - now
    end
  end
  local raw = nil
  if not code then
    raw = redis.call('GET', qk)
    if not raw and ARGV[b + 6] == '1' then
      code, value = 3, 0
    end
  end
  if not code then
    local used = tonumber(raw or '0')
    if cap >= 0 and used + cost > cap then
      code, value = 1, used
    else
      used = redis.call('INCRBY', qk, cost)
      if used == cost then
        -- A new counter: give it its expiry once, not on every call.
        redis.call('EXPIREAT', qk, ARGV[b + 3])
      end
      if interval > 0 then
        redis.call('SET', rk, new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1)
      end
      code, value = 0, used
    end
  end
  out[2 * i - 1] = code
  out[2 * i] = value
  granted[i] = code == 0 and '1' or '0'
end
redis.call('SET', bk, table.concat(granted), 'PX', ARGV[#ARGV])
return out
