-- esq fenced apply: the Redis twin of esq_domain::projection::apply_to_doc.
--
-- KEYS[1]  the document hash
-- ARGV[1]  first_version - 1 in decimal, or "" when first_version is 0 (then never in sequence)
-- ARGV[2]  last_version in decimal
-- ARGV[3]  the applied channel: once applied, "<last_version> <KEYS[1]>" is PUBLISHed on it so
--          that readers waiting for this document wake (crates/readstore/src/notify.rs); ""
--          publishes nothing
-- ARGV[4…] field ops, flat: "S" field value | "D" field | "I" field delta | "A" field delta | "T"
--
-- Returns {code, current}: code 0 = applied, 1 = duplicate, 2 = stale; current is the
-- document's version afterwards, as a decimal string (Lua numbers cannot hold every u64).
--
-- Versions and counters are handled as decimal strings, never Lua numbers, so that u64 versions
-- and i64 counters behave exactly as in Rust.

local key = KEYS[1]

-- a <= b for canonical non-negative decimals (byte comparison: independent of the locale).
local function le(a, b)
  if #a ~= #b then
    return #a < #b
  end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return true
end

-- The canonical decimal form of what Rust's str::parse::<i64> (signed) or ::<u64> reads from s,
-- or nil where it fails: optional sign, ASCII digits, leading zeros allowed, range checked.
local function canon(s, signed)
  local sign, body = string.match(s, '^([+-]?)([0-9]+)$')
  if not body then
    return nil
  end
  if sign == '-' and not signed then
    return nil
  end
  body = string.gsub(body, '^0+', '')
  if body == '' then
    return '0'
  end
  local max = '18446744073709551615'
  if signed then
    max = (sign == '-') and '9223372036854775808' or '9223372036854775807'
  end
  if not le(body, max) then
    return nil
  end
  if sign == '-' then
    return '-' .. body
  end
  return body
end

local raw = redis.call('HGET', key, '_v')
local current = raw and canon(raw, false) or '0'
local last = ARGV[2]
if le(last, current) then
  return {1, current}
end
if ARGV[1] ~= current then
  return {2, current}
end

local i, n = 4, #ARGV
while i <= n do
  local op = ARGV[i]
  if op == 'S' then
    redis.call('HSET', key, ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  elseif op == 'D' then
    redis.call('HDEL', key, ARGV[i + 1])
    i = i + 2
  elseif op == 'I' then
    local field, delta = ARGV[i + 1], ARGV[i + 2]
    local old = redis.call('HGET', key, field)
    if old then
      -- HINCRBY accepts only canonical integers; Rust reads "+7" or "007" as 7 and garbage as 0.
      local c = canon(old, true) or '0'
      if c ~= old then
        redis.call('HSET', key, field, c)
      end
    end
    local r = redis.pcall('HINCRBY', key, field, delta)
    if type(r) == 'table' and r.err then
      -- The only failure left is overflow: saturate like i64::saturating_add.
      local bound = (string.sub(delta, 1, 1) == '-') and '-9223372036854775808'
        or '9223372036854775807'
      redis.call('HSET', key, field, bound)
    end
    i = i + 3
  elseif op == 'A' then
    -- Adjust: like 'I', then a result <= 0 removes the field.
    local field, delta = ARGV[i + 1], ARGV[i + 2]
    local old = redis.call('HGET', key, field)
    if old then
      local c = canon(old, true) or '0'
      if c ~= old then
        redis.call('HSET', key, field, c)
      end
    end
    local r = redis.pcall('HINCRBY', key, field, delta)
    if type(r) == 'table' and r.err then
      -- Overflow: i64::saturating_add gives MAX (kept) or MIN (removed).
      if string.sub(delta, 1, 1) == '-' then
        redis.call('HDEL', key, field)
      else
        redis.call('HSET', key, field, '9223372036854775807')
      end
    elseif r <= 0 then
      redis.call('HDEL', key, field)
    end
    i = i + 3
  elseif op == 'T' then
    redis.call('DEL', key)
    redis.call('HSET', key, '_deleted', '1')
    i = i + 1
  else
    return redis.error_reply('esq apply: unknown op ' .. tostring(op))
  end
end
redis.call('HSET', key, '_v', last)
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], last .. ' ' .. key)
end
return {0, last}
