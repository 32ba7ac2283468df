//! The Lua scripts the store runs atomically, on its own clock.

use redis::Script;

pub(super) struct Scripts {
    pub(super) acquire: Script,
    pub(super) counts: Script,
    pub(super) rest: Script,
    pub(super) limit: Script,
    pub(super) sync: Script,
}

/// `now` in milliseconds on the server's clock.
pub(super) const NOW: &str = "local t = redis.call('TIME')\n\
                   local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS: counts hash, replicas, quota state, probe holder, state hash. ARGV: replica,
/// version, count, cap, ttl (ms), quota interval and tolerance (µs; interval 0: no quota),
/// probe (0/1), probe's time to live (ms). The cap is the lower of the replica's and the
/// key's learned limit kept here (so a replica that has not heard of a lowering yet
/// obeys it all the same). Returns {1, 0} admitted, {0, 0} full (or another replica's
/// probe running), {0, ms} no quota unit for that long.
pub(super) const ACQUIRE: &str = r#"
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[1])
local me, v, c, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local learned = tonumber(redis.call('HGET', KEYS[5], 'limit') or '0')
if learned > 0 and learned < cap then
  cap = learned
end
local probe = ARGV[8] == '1'
if probe then
  local holder = redis.call('GET', KEYS[4])
  if holder and holder ~= me then
    return {0, 0}
  end
end
local interval, tolerance = tonumber(ARGV[6]), tonumber(ARGV[7])
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = 0
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[3]) or '0'), now_us)
  if tat - now_us > tolerance then
    return {0, math.max(1, math.ceil((tat - tolerance - now_us) / 1000))}
  end
end
local mine, store = c, true
local stored = redis.call('HGET', KEYS[1], me)
if stored then
  local sv, sc = string.match(stored, '^(%d+):(%d+)$')
  if tonumber(sv) >= v then
    mine, store = tonumber(sc), false
  end
end
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local r = fields[i]
  if r ~= me then
    local alive = redis.call('ZSCORE', KEYS[2], r)
    if alive and tonumber(alive) > now then
      others = others + tonumber(string.match(fields[i + 1], ':(%d+)$'))
    else
      redis.call('HDEL', KEYS[1], r)
    end
  end
end
if others + mine > cap then
  return {0, 0}
end
if store then
  redis.call('HSET', KEYS[1], me, string.format('%d:%d', v, c))
end
if interval > 0 then
  local next = tat + interval
  redis.call('SET', KEYS[3], string.format('%d', next), 'PX', math.ceil((next - now_us) / 1000) + 1000)
end
if probe then
  redis.call('SET', KEYS[4], me, 'PX', tonumber(ARGV[9]))
end
return {1, 0}
"#;

/// KEYS: replicas, then one counts hash per key. ARGV: replica, ttl (ms), channel, then
/// per key: id, version, count. Returns the replicas alive.
pub(super) const COUNTS: &str = r#"
local me = ARGV[1]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), me)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 2, #KEYS do
  local base = 4 + (i - 2) * 3
  local id, v, c = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local sv, sc = -1, 0
  local stored = redis.call('HGET', KEYS[i], me)
  if stored then
    local a, b = string.match(stored, '^(%d+):(%d+)$')
    sv, sc = tonumber(a), tonumber(b)
  end
  if v > sv then
    redis.call('HSET', KEYS[i], me, string.format('%d:%d', v, c))
    if c < sc then
      redis.call('PUBLISH', ARGV[3], 'freed ' .. id)
    end
  end
end
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"#;

/// KEYS: state hash, probe holder. ARGV: ms left, level, disabled (0/1), recovered
/// (0/1), channel, id, replica, probe done (0/1), back (0/1). Returns {ms left, level,
/// disabled}. A probe's answer is announced after the rest it started.
pub(super) const REST: &str = r#"
local u = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local left = tonumber(ARGV[1])
if left > 0 and now + left > u then
  u = now + left
  redis.call('HSET', KEYS[1], 'until', u)
end
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or '0')
if ARGV[4] == '1' then
  level = 0
elseif tonumber(ARGV[2]) > level then
  level = tonumber(ARGV[2])
end
redis.call('HSET', KEYS[1], 'level', level)
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'disabled', '1')
end
local disabled = 0
if redis.call('HGET', KEYS[1], 'disabled') == '1' then
  disabled = 1
end
left = math.max(u - now, 0)
redis.call('PUBLISH', ARGV[5], string.format('rest %s %d %d %d %s', ARGV[6], left, level, disabled, ARGV[7]))
if ARGV[8] == '1' then
  if redis.call('GET', KEYS[2]) == ARGV[7] then
    redis.call('DEL', KEYS[2])
  end
  redis.call('PUBLISH', ARGV[5], string.format('back %s %s %s', ARGV[6], ARGV[9], ARGV[7]))
end
return {left, level, disabled}
"#;

/// KEYS: state hash. ARGV: limit, generation, raise (0/1), channel, id. The key's learned
/// concurrency limit, one for every replica: a lower limit always wins; a raise wins only
/// if made on the limit kept here (its generation is the one kept); with none kept (a new
/// key, or the store restarted empty) the first one sent is taken. Every change raises the
/// generation (past the sender's, after a restart) and is announced. Returns {limit,
/// generation}.
pub(super) const LIMIT: &str = r#"
local s = redis.call('HMGET', KEYS[1], 'limit', 'lgen')
local kept, gen = tonumber(s[1] or '0'), tonumber(s[2] or '0')
local l, g = tonumber(ARGV[1]), tonumber(ARGV[2])
local changed = false
if kept == 0 then
  kept, gen, changed = l, math.max(gen, g) + 1, true
elseif ARGV[3] == '1' then
  if g == gen and l > kept then
    kept, gen, changed = l, gen + 1, true
  end
elseif l < kept then
  kept, gen, changed = l, math.max(gen, g) + 1, true
end
if changed then
  redis.call('HSET', KEYS[1], 'limit', kept, 'lgen', gen)
  redis.call('PUBLISH', ARGV[4], string.format('limit %s %d %d', ARGV[5], kept, gen))
end
return {kept, gen}
"#;

/// KEYS: state hashes. Returns per key {ms left, level, disabled, learned limit (0:
/// none), its generation}.
pub(super) const SYNC: &str = r#"
local out = {}
for i = 1, #KEYS do
  local s = redis.call('HMGET', KEYS[i], 'until', 'level', 'disabled', 'limit', 'lgen')
  local u = tonumber(s[1] or '0')
  local disabled = 0
  if s[3] == '1' then
    disabled = 1
  end
  out[i] = {math.max(u - now, 0), tonumber(s[2] or '0'), disabled, tonumber(s[4] or '0'), tonumber(s[5] or '0')}
end
return out
"#;

impl Scripts {
    pub(super) fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{NOW}{body}"));
        Self {
            acquire: script(ACQUIRE),
            counts: script(COUNTS),
            rest: script(REST),
            limit: script(LIMIT),
            sync: script(SYNC),
        }
    }
}
