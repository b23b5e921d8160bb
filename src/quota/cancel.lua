-- tollgate: take back a reservation batch the caller stopped waiting for (it timed out, so its
-- requests were answered from the fail-open fallback or refused). Runs after the batch on the
-- same connection, or on a new one when that connection died: if the batch ran, every request it
-- granted is refunded; if it has not run, the tombstone left here makes it do nothing when it
-- arrives. Idempotent.
-- KEYS[1] the batch key, KEYS[1 + i] the quota counter of request i; ARGV[1] the tombstone's
-- lifetime in milliseconds, ARGV[1 + i] the cost of request i. Returns the requests refunded.
local ran = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'x', 'PX', ARGV[1])
if not ran or ran == 'x' then
  return 0
end
local n = 0
for i = 1, #ran do
  if string.byte(ran, i) == 49 and redis.call('EXISTS', KEYS[i + 1]) == 1 then
    if redis.call('DECRBY', KEYS[i + 1], ARGV[i + 1]) < 0 then
      redis.call('SET', KEYS[i + 1], 0, 'KEEPTTL')
    end
    n = n + 1
  end
end
return n
