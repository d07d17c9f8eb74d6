"""The one Lua script behind Guard: check, token correction, block listing and history reads.

One script with an ``op`` argument so a replica loads one SHA, and ``check`` (the
only op on a request's path) is one round trip that reads and writes everything
a request touches, atomically, so N Gateway replicas enforce one limit.

Data (``P`` is the Guard key prefix, ``K`` an API key id):

* ``P:m:K:<minute>`` hash, per key and epoch minute (``floor(now / 60)``):
  ``a`` attempts (every check not rejected by a block), ``r`` admitted
  requests, ``t`` admitted tokens (estimates, corrected by ``tokens``). The
  rate limits read this minute and the one before (sliding window); anomaly
  scoring reads the history. Expires ``ttl`` seconds after its first attempt.
* ``P:f:K`` hash, flood state: ``b`` current short-window index, ``c``
  attempts in it, ``e`` the key's baseline (EWMA of attempts per short window).
* ``P:blocks`` hash: K -> ``until|created|reason`` (epoch seconds as Python
  wrote them). A block is active while ``until > now``; expired entries are
  deleted when seen, by ``check`` or ``blocks``.
* ``P:active`` sorted set: K scored by its last attempt, for anomaly scoring.

Floats go back to Python as strings (Redis truncates Lua numbers to integers)
and into Redis through ``%.17g``.
"""

from __future__ import annotations

from typing import Final

GUARD_LUA: Final = r"""
local op = ARGV[1]

local function num(v) return tonumber(v) or 0 end
local function flt(n) return string.format('%.17g', n) end

local function until_of(entry)
  if not entry then return nil end
  return tonumber(string.match(entry, '^([^|]+)'))
end

-- KEYS: blocks, active, this minute, previous minute, flood state.
-- ARGV[2..]: key id, now, previous minute's weight, rpm, tpm (-1: unlimited), tokens, minute ttl,
-- flood window index, EWMA keep factor per window, factor, flood floor (attempts), block entry, flood ttl (0: off),
-- track active (1/0).
-- Returns {status, this minute r, t, previous minute r, t, block entry or ''}; status 1 allowed,
-- 2 requests limit, 3 tokens limit, 4 blocked, 5 flood (blocked now). Counts include this request
-- when allowed.
local function check()
  local kid, now, w = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
  local rpm, tpm, tokens = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
  local cur = redis.call('HMGET', KEYS[3], 'r', 't')
  local prev = redis.call('HMGET', KEYS[4], 'r', 't')
  local cr, ct, pr, pt = num(cur[1]), num(cur[2]), num(prev[1]), num(prev[2])
  local entry = redis.call('HGET', KEYS[1], kid)
  if entry then
    if until_of(entry) > now then return {4, cr, ct, pr, pt, entry} end
    redis.call('HDEL', KEYS[1], kid)
  end
  if redis.call('HINCRBY', KEYS[3], 'a', 1) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[8]) end
  if ARGV[15] == '1' then redis.call('ZADD', KEYS[2], now, kid) end
  local fttl = tonumber(ARGV[14])
  if fttl > 0 then
    local bucket = tonumber(ARGV[9])
    local f = redis.call('HMGET', KEYS[5], 'b', 'c', 'e')
    local b, c, e = tonumber(f[1]), num(f[2]), num(f[3])
    if b == nil or bucket > b then
      if b ~= nil then
        local keep = tonumber(ARGV[10])
        e = keep * e + (1 - keep) * c                     -- fold the finished window into the baseline
        e = e * keep ^ math.min(bucket - b - 1, 100000)   -- and the empty windows since
      end
      c = 1
      redis.call('HSET', KEYS[5], 'b', bucket, 'c', 1, 'e', flt(e))
      redis.call('EXPIRE', KEYS[5], fttl)
    else
      c = redis.call('HINCRBY', KEYS[5], 'c', 1)
    end
    if c >= tonumber(ARGV[12]) and c > tonumber(ARGV[11]) * e then
      redis.call('HSET', KEYS[1], kid, ARGV[13])
      redis.call('HSET', KEYS[5], 'c', 0)  -- keep the burst out of the baseline
      return {5, cr, ct, pr, pt, ARGV[13]}
    end
  end
  if rpm >= 0 and pr * w + cr + 1 > rpm + 1e-9 then return {2, cr, ct, pr, pt, ''} end
  if tpm >= 0 and pt * w + ct + tokens > tpm + 1e-9 then return {3, cr, ct, pr, pt, ''} end
  cr = redis.call('HINCRBY', KEYS[3], 'r', 1)
  if tokens ~= 0 then ct = redis.call('HINCRBY', KEYS[3], 't', ARGV[7]) end
  return {1, cr, ct, pr, pt, ''}
end

-- KEYS: the minute the estimate was counted in. ARGV[2]: actual - estimated tokens.
-- Returns the minute's corrected tokens, or -1 when the minute is gone (nothing to correct).
local function tokens()
  if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
  local t = redis.call('HINCRBY', KEYS[1], 't', ARGV[2])
  if t < 0 then
    redis.call('HSET', KEYS[1], 't', 0)
    t = 0
  end
  return t
end

-- KEYS: blocks. ARGV[2]: now. Deletes expired blocks; returns the active ones as {key id, entry, ...}.
local function blocks()
  local now, out = tonumber(ARGV[2]), {}
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if until_of(all[i + 1]) > now then
      out[#out + 1] = all[i]
      out[#out + 1] = all[i + 1]
    else
      redis.call('HDEL', KEYS[1], all[i])
    end
  end
  return out
end

-- KEYS: none (built from ARGV; the prefix keeps them in one slot). ARGV[2..]: minute key prefix,
-- first minute, minutes, key ids. Returns, per key id, its attempts in each minute (0 if none).
local function history()
  local prefix, first, n, out = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), {}
  for i = 5, #ARGV do
    local counts = {}
    for m = 0, n - 1 do
      counts[m + 1] = num(redis.call('HGET', prefix .. ARGV[i] .. ':' .. string.format('%d', first + m), 'a'))
    end
    out[#out + 1] = counts
  end
  return out
end

if op == 'check' then return check() end
if op == 'tokens' then return tokens() end
if op == 'blocks' then return blocks() end
if op == 'history' then return history() end
return redis.error_reply('unknown guard op ' .. tostring(op))
"""
