-- tollgate: take, extend or give back one instance's lease on a quota counter, atomically.
-- A lease is a block of units charged to the counter at once, which the instance then spends
-- in process; the counter always holds what was spent plus what is leased out, so exact
-- reservations (`reserve.lua`) and other instances' leases see leased units as used.
-- KEYS[1] the quota counter (as in reserve.lua), KEYS[2] its lease table: a hash with one field
-- per instance, "seq:units:expires_ms:returned", the instance's latest lease (returned = 1 once
-- its units went back to the counter because it expired).
-- ARGV[1] instance, ARGV[2] the lease seq the caller holds (0 = none), ARGV[3] that lease's
-- units, ARGV[4] how many of them the caller gives back (unspent, plus refunds),
-- ARGV[5] units wanted (0 = give back only; -1 = extend the held lease's lifetime only),
-- ARGV[6] cap (-1 = none), ARGV[7] lease lifetime (ms), ARGV[8] counter expiry (unix seconds),
-- ARGV[9] 1 = report an absent counter instead of starting it from 0 (the caller seeds it),
-- ARGV[10] share: under a cap, a lease takes at most 1/share of the units left, so one
-- instance never holds what the others need; ARGV[11] the smallest lease worth taking.
-- Returns {0, seq, granted, used}: the caller now holds lease `seq` of `granted` units (0: none;
-- under a cap possibly fewer than wanted) and the counter is at `used`; {1, seq, 0, used}: too
-- few units are left for the smallest lease, nothing is leased (the caller reserves exactly); {2}: the lease to extend is gone (expired and returned,
-- or superseded): stop spending it; {3}: the counter is absent (only when asked); nothing written.
--
-- A lease whose holder stops calling (it crashed) expires, and the first call on the counter
-- after that gives its units back. A holder that was only late (Redis unreachable past its
-- expiry) gets back what it spent. A call whose answer the holder never heard (a timeout) left
-- a newer seq: the caller's retry gives that lease back whole and does not give its own units
-- back twice.
local qk, lk, inst = KEYS[1], KEYS[2], ARGV[1]
local held_seq, held_units, give = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local want, cap, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

if ARGV[9] == '1' and want > 0 and redis.call('EXISTS', qk) == 0 then
  return {3}
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Changes the counter by `d`, never below 0, and never creates it from a give-back alone.
local function add(d)
  if d == 0 then return end
  if d < 0 and redis.call('EXISTS', qk) == 0 then return end
  local v = redis.call('INCRBY', qk, d)
  if v < 0 then redis.call('SET', qk, 0, 'KEEPTTL') end
  if v == d then redis.call('EXPIREAT', qk, ARGV[8]) end
end

local function parse(rec)
  local s, u, e, r = string.match(rec, '^(%d+):(%d+):(%d+):(%d)$')
  return tonumber(s), tonumber(u), tonumber(e), r == '1'
end

-- Give back every lease that expired (its holder stopped calling), and forget old records.
local all = redis.call('HGETALL', lk)
for i = 1, #all, 2 do
  local s, u, e, r = parse(all[i + 1])
  if s then
    if not r and e < now then
      add(-u)
      redis.call('HSET', lk, all[i], s .. ':' .. u .. ':' .. e .. ':1')
    elseif r and e + 600000 < now and all[i] ~= inst then
      redis.call('HDEL', lk, all[i])
    end
  end
end

local rseq, runits, rexp, rret = 0, 0, 0, false
local rec = redis.call('HGET', lk, inst)
if rec then rseq, runits, rexp, rret = parse(rec) end

if want == -1 then
  if rec and rseq == held_seq and not rret then
    redis.call('HSET', lk, inst, rseq .. ':' .. runits .. ':' .. (now + ttl) .. ':0')
    return {0, rseq, runits, tonumber(redis.call('GET', qk) or '0')}
  end
  return {2}
end

if held_seq > 0 then
  if rseq == held_seq then
    if rret then
      -- Expired and given back whole while the caller was still spending it: what it spent
      -- comes back.
      add(held_units - give)
    else
      add(-give)
    end
  elseif rseq > held_seq and not rret then
    -- A lease the caller never heard of (its answer was lost); its own give-back already ran.
    add(-runits)
  end
end

local used = tonumber(redis.call('GET', qk) or '0')
local code, granted = 0, 0
if want > 0 then
  local take = want
  if cap >= 0 then
    take = math.min(want, math.floor(math.max(cap - used, 0) / tonumber(ARGV[10])))
  end
  if take < tonumber(ARGV[11]) then
    code = 1
  else
    add(take)
    used = used + take
    granted = take
  end
end
local seq = math.max(rseq, held_seq) + 1
redis.call('HSET', lk, inst, seq .. ':' .. granted .. ':' .. (now + ttl) .. ':' .. (granted > 0 and '0' or '1'))
redis.call('EXPIREAT', lk, ARGV[8])
return {code, seq, granted, used}
