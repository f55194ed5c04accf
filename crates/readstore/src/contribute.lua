-- esq derived contribution: the Redis twin of esq_domain::derived::apply_contribution.
--
-- KEYS[1]  the target's totals hash (what queries read)
-- KEYS[2]  the target's entries hash (source id -> "<version>" or "<version>,<v1>,...")
-- ARGV[1]  the source id
-- ARGV[2]  the source version, in decimal
-- ARGV[3]  the column kinds, one letter each: S sum, N minimum, X maximum (k letters)
-- ARGV[4 .. 3+k]      the column names
-- ARGV[4+k]           "1" for live values, "0" for a tombstone
-- ARGV[5+k .. 4+2k]   the values (live only), canonical decimals within +-10^15
--
-- Returns 1 when applied, 0 when the source's entry was already at that version or later.
-- Versions and sums are handled as decimal strings and HINCRBY, never Lua numbers; values are
-- within +-10^15, so comparing them as Lua numbers (doubles) is exact.

local tkey, ekey = KEYS[1], KEYS[2]
local source, version, kinds = ARGV[1], ARGV[2], ARGV[3]
local k = #kinds
local live = ARGV[4 + k] == '1'

-- a <= b for canonical non-negative decimals.
local function le(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a <= b
end

-- An entry's version and, when live with exactly k values, its values (strings).
local function decode(entry)
  local parts = {}
  for p in string.gmatch(entry, '[^,]+') do
    parts[#parts + 1] = p
  end
  local v = parts[1] or '0'
  if not string.match(v, '^[0-9]+$') then
    v = '0'
  end
  if k == 0 or #parts ~= k + 1 then
    return v, nil
  end
  local values = {}
  for i = 1, k do
    if not string.match(parts[i + 1], '^-?[0-9]+$') then
      return v, nil
    end
    values[i] = parts[i + 1]
  end
  return v, values
end

local function neg(s)
  if s == '0' then
    return '0'
  elseif string.sub(s, 1, 1) == '-' then
    return string.sub(s, 2)
  end
  return '-' .. s
end

-- HINCRBY saturating like i64::saturating_add.
local function add(field, delta)
  local r = redis.pcall('HINCRBY', tkey, field, delta)
  if type(r) == 'table' and r.err then
    local bound = (string.sub(delta, 1, 1) == '-') and '-9223372036854775808'
      or '9223372036854775807'
    redis.call('HSET', tkey, field, bound)
  end
end

local old = redis.call('HGET', ekey, source)
local old_version, old_values = '0', nil
if old then
  old_version, old_values = decode(old)
end
if le(version, old_version) then
  return 0
end

local entry = version
if live then
  for i = 1, k do
    entry = entry .. ',' .. ARGV[4 + k + i]
  end
end
redis.call('HSET', ekey, source, entry)

local count = tonumber(redis.call('HGET', tkey, '_n') or '0') or 0
if old_values then
  count = count - 1
end
if live then
  count = count + 1
end
local extremes = false
for i = 1, k do
  local kind, field = string.sub(kinds, i, i), ARGV[3 + i]
  if kind == 'S' then
    if old_values then
      add(field, neg(old_values[i]))
    end
    if live then
      add(field, ARGV[4 + k + i])
    end
  else
    extremes = true
  end
end
redis.call('HSET', tkey, '_n', string.format('%d', count))

if count <= 0 then
  for i = 1, k do
    redis.call('HDEL', tkey, ARGV[3 + i])
  end
elseif extremes then
  local best = {}
  local all = redis.call('HGETALL', ekey)
  for j = 2, #all, 2 do
    local _, values = decode(all[j])
    if values then
      for i = 1, k do
        local kind = string.sub(kinds, i, i)
        local b = best[i]
        local x = tonumber(values[i])
        if kind == 'N' and (b == nil or x < tonumber(b)) then
          best[i] = values[i]
        elseif kind == 'X' and (b == nil or x > tonumber(b)) then
          best[i] = values[i]
        end
      end
    end
  end
  for i = 1, k do
    local kind = string.sub(kinds, i, i)
    if kind ~= 'S' then
      if best[i] then
        redis.call('HSET', tkey, ARGV[3 + i], best[i])
      else
        redis.call('HDEL', tkey, ARGV[3 + i])
      end
    end
  end
end
return 1
