"""The one Lua script behind CostGuard: reserve, settle, release and reclaim, each atomic in Redis.

One script with an ``op`` argument (not four) so a replica loads one SHA and the
four operations share the helpers that must agree (what "unreserve" means).

Data (``P`` is the CostGuard key prefix):

* ``P:quota:<tenant>:<user>:<day>`` and ``P:budget:<id>:<period-start>`` are
  counter hashes: ``ut``/``uu`` used tokens / nano-USD (settled), ``rt``/``ru``
  reserved tokens / nano-USD (in flight). A request fits a counter when
  ``used + reserved + its reservation <= limit``. USD is counted in integer
  nano-dollars so that limits hold exactly (no float drift in HINCRBYFLOAT).
* ``P:res:<request_id>`` is a reservation hash: ``m`` model, ``t``/``u`` its
  reserved tokens / nano-USD, ``c`` the JSON list of counters it touched (key,
  limits, expiry, alert keys), so settling needs no config and survives a
  config change. ``s`` is ``expired`` once reclaimed (a tombstone whose amounts
  are 0, so a late settle still records the real usage).
* ``P:reservations`` is a sorted set of request ids scored by expiry time.
* ``P:alert:<id>:<period-start>:<threshold>`` is SET NX when a budget's spent
  fraction first reaches a threshold, so each crossing is reported once.

A counter entry in the JSON (``c``): ``k`` key, ``x`` expire-at (epoch s),
optional ``lt``/``lu`` token / nano-USD limits, ``f`` downgrade floor, and for
budgets ``id``, ``p`` (period label) and ``a`` (``[threshold, alert key,
threshold text]`` list).

Numbers written back to Redis go through ``string.format('%d')``: Lua's
default number formatting (``%.14g``) would turn large integers into ``1e+15``,
which HINCRBY refuses.
"""

from __future__ import annotations

from typing import Final

COST_GUARD_LUA: Final = r"""
local op = ARGV[1]
local Z = KEYS[1]

local function int(n) return string.format('%d', n) end
local function num(v) return tonumber(v) or 0 end

local function unreserve(checks, t, u)
  for _, c in ipairs(checks) do
    if t ~= 0 then redis.call('HINCRBY', c.k, 'rt', int(-t)) end
    if u ~= 0 then redis.call('HINCRBY', c.k, 'ru', int(-u)) end
  end
end

-- Release reservations whose expiry is at or before `now`; keep a tombstone for late settles.
local function reclaim(now, limit, keep_s, prefix)
  local ids = redis.call('ZRANGEBYSCORE', Z, '-inf', now, 'LIMIT', 0, limit)
  for _, rid in ipairs(ids) do
    local rk = prefix .. rid
    local h = redis.call('HMGET', rk, 't', 'u', 'c')
    if h[3] then
      unreserve(cjson.decode(h[3]), num(h[1]), num(h[2]))
      redis.call('HSET', rk, 't', '0', 'u', '0', 's', 'expired')
      redis.call('EXPIRE', rk, int(keep_s))
    end
    redis.call('ZREM', Z, rid)
  end
  return #ids
end

-- Indices of the counters a reservation of (t, u) would overrun, and the first whose floor it is under.
local function check(checks, t, u, want_floor)
  local fails, floor = {}, 0
  for i, c in ipairs(checks) do
    local v = redis.call('HMGET', c.k, 'ut', 'rt', 'uu', 'ru')
    local tok = num(v[1]) + num(v[2])
    local usd = num(v[3]) + num(v[4])
    if (c.lt and tok + t > c.lt) or (c.lu and usd + u > c.lu) then
      fails[#fails + 1] = i
    elseif want_floor and c.f and floor == 0 then
      local share = 1
      if c.lt then share = math.min(share, (c.lt - tok) / c.lt) end
      if c.lu then share = math.min(share, (c.lu - usd) / c.lu) end
      if share < c.f then floor = i end
    end
  end
  return fails, floor
end

-- ARGV[2]: head JSON {rid, now, exp, keep, rp, rc, cands = [{m, t, u}]}; ARGV[3..]: counters per candidate.
-- Returns {1, chosen, floor, fails of candidate 1, {}} | {0, 0, 0, fails 1, fails 2} | {2, model, t, u}.
local function reserve()
  local head = cjson.decode(ARGV[2])
  if head.rc > 0 then reclaim(head.now, head.rc, head.keep, head.rp) end
  local rk = KEYS[2]
  local prev = redis.call('HMGET', rk, 'm', 't', 'u')
  if prev[1] then return {2, prev[1], prev[2], prev[3]} end
  local fails, decoded = {{}, {}}, {}
  local chosen, fallback, floor = 0, 0, 0
  for i, cand in ipairs(head.cands) do
    decoded[i] = cjson.decode(ARGV[2 + i])
    local f
    fails[i], f = check(decoded[i], cand.t, cand.u, i == 1 and #head.cands > 1)
    if #fails[i] == 0 then
      if f == 0 then chosen = i break end
      floor, fallback = f, i
    end
  end
  if chosen == 0 then chosen = fallback end
  if chosen == 0 then return {0, 0, 0, fails[1], fails[2]} end
  local cand = head.cands[chosen]
  for _, c in ipairs(decoded[chosen]) do
    if cand.t ~= 0 then redis.call('HINCRBY', c.k, 'rt', int(cand.t)) end
    if cand.u ~= 0 then redis.call('HINCRBY', c.k, 'ru', int(cand.u)) end
    redis.call('EXPIREAT', c.k, int(c.x))
  end
  redis.call('HSET', rk, 'm', cand.m, 't', int(cand.t), 'u', int(cand.u), 'c', ARGV[2 + chosen])
  redis.call('ZADD', Z, head.exp, head.rid)
  return {1, chosen, floor, fails[1], {}}
end

-- ARGV[2..4]: request id, actual tokens, actual nano-USD. Returns {0} | {1, {{budget id, period, threshold}}}.
local function settle()
  local rk = KEYS[2]
  local h = redis.call('HMGET', rk, 't', 'u', 'c')
  if not h[3] then return {0} end
  local rt, ru, t, u = num(h[1]), num(h[2]), num(ARGV[3]), num(ARGV[4])
  local crossings = {}
  for _, c in ipairs(cjson.decode(h[3])) do
    if rt ~= 0 then redis.call('HINCRBY', c.k, 'rt', int(-rt)) end
    if ru ~= 0 then redis.call('HINCRBY', c.k, 'ru', int(-ru)) end
    local ut, uu
    if t ~= 0 then ut = redis.call('HINCRBY', c.k, 'ut', int(t)) end
    if u ~= 0 then uu = redis.call('HINCRBY', c.k, 'uu', int(u)) end
    redis.call('EXPIREAT', c.k, int(c.x))
    if c.a then
      ut = ut or num(redis.call('HGET', c.k, 'ut'))
      uu = uu or num(redis.call('HGET', c.k, 'uu'))
      local frac = 0
      if c.lt then frac = math.max(frac, ut / c.lt) end
      if c.lu then frac = math.max(frac, uu / c.lu) end
      for _, a in ipairs(c.a) do
        if frac >= a[1] and redis.call('SET', a[2], '1', 'NX', 'EXAT', int(c.x)) then
          crossings[#crossings + 1] = {c.id, c.p, a[3]}
        end
      end
    end
  end
  redis.call('DEL', rk)
  redis.call('ZREM', Z, ARGV[2])
  return {1, crossings}
end

-- ARGV[2]: request id. Returns 1 when a reservation was released, 0 when there was none.
local function release()
  local rk = KEYS[2]
  local h = redis.call('HMGET', rk, 't', 'u', 'c')
  if not h[3] then return 0 end
  unreserve(cjson.decode(h[3]), num(h[1]), num(h[2]))
  redis.call('DEL', rk)
  redis.call('ZREM', Z, ARGV[2])
  return 1
end

if op == 'reserve' then return reserve() end
if op == 'settle' then return settle() end
if op == 'release' then return release() end
if op == 'reclaim' then return reclaim(ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]) end
return redis.error_reply('unknown cost guard op ' .. tostring(op))
"""
