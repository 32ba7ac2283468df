//! The Lua scripts the store runs atomically, on its own clock.
//!
//! Every per-key script names only keys of one id (`tkr:<ns>:{<id>}:...`, the braces a
//! hash tag), so that a Redis Cluster runs it on one node.

use redis::Script;

pub(super) struct Scripts {
    pub(super) acquire: Script,
    pub(super) release: Script,
    pub(super) renew: Script,
    pub(super) replicas: Script,
    pub(super) rest: Script,
    pub(super) limit: Script,
    pub(super) sync: Script,
}

/// `now` in milliseconds on the server's clock.
pub(super) const NOW: &str = "local t = redis.call('TIME')\n\
                   local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// Helpers of the admission scripts, whose KEYS are: 1 the counts hash (replica →
/// `count:deadline:generation`, a count of requests sent, the server time it lives until,
/// and how many times the replica reset it), 2 the
/// queue (a list of replicas, one entry per waiting lease, in arrival order), 3 the
/// key's state hash (`cap`, the learned `limit`, rests).
///
/// - `live()`: the live replicas' total, forgetting the dead ones.
/// - `cap_of(cap)`: `cap` (or the one kept, if `nil`) under the learned limit.
/// - `room(total, cap)`: may one more lease go? 0 no; 1 yes, under the limit known to
///   hold (`floor`); 2 yes, as the single try above it (when a raise is being tried and
///   no other try runs: `trial`, the server time a try's mark lasts until, is past).
///   `took(r)` marks a try taken (cleared when the try's answer changes the limit).
/// - `pump(total, cap, me, channel, id)`: hands each free slot to the queue's first live
///   entry (its count goes up by one: a *grant*), announcing grants to each other
///   replica by name (`grant <id> <replica> <n> <generation> <total>`, the total after,
///   which the granted requests are sent with); returns the grants to `me` and the total
///   after.
pub(super) const HELPERS: &str = r#"
local function field(v)
  local c, d, g = string.match(v, '^(%d+):(%d+):(%d+)$')
  return tonumber(c), tonumber(d), tonumber(g)
end
local function live()
  local total = 0
  local f = redis.call('HGETALL', KEYS[1])
  for i = 1, #f, 2 do
    local c, d = field(f[i + 1])
    if d > now then
      total = total + c
    else
      redis.call('HDEL', KEYS[1], f[i])
    end
  end
  return total
end
local function cap_of(cap)
  local s = redis.call('HMGET', KEYS[3], 'limit', 'cap')
  cap = cap or tonumber(s[2] or '0')
  local learned = tonumber(s[1] or '0')
  if learned > 0 and learned < cap then
    cap = learned
  end
  return cap
end
local function room(total, cap)
  if total >= cap then
    return 0
  end
  local s = redis.call('HMGET', KEYS[3], 'floor', 'trial')
  local floor = tonumber(s[1] or '0')
  if floor == 0 or total < floor then
    return 1
  end
  if tonumber(s[2] or '0') > now then
    return 0
  end
  return 2
end
local function took(r)
  if r == 2 then
    redis.call('HSET', KEYS[3], 'trial', now + 10000)
  end
end
local function pump(total, cap, me, channel, id)
  local mine, others, gens = 0, {}, {}
  while true do
    local r = room(total, cap)
    if r == 0 then
      break
    end
    local head = redis.call('LPOP', KEYS[2])
    if not head then
      break
    end
    local v = redis.call('HGET', KEYS[1], head)
    if v then
      local c, d, g = field(v)
      if d > now then
        redis.call('HSET', KEYS[1], head, string.format('%d:%d:%d', c + 1, d, g))
        took(r)
        gens[head] = g
        total = total + 1
        if head == me then
          mine = mine + 1
        else
          others[head] = (others[head] or 0) + 1
        end
      end
    end
  end
  for who, n in pairs(others) do
    redis.call('PUBLISH', channel, string.format('grant %s %s %d %d %d', id, who, n, gens[who], total))
  end
  return mine, total
end
local function mine_of(me)
  local v = redis.call('HGET', KEYS[1], me)
  if v then
    local c, d, g = field(v)
    return c, g
  end
  return 0, 0
end
local function put(me, c, ttl)
  local _, g = mine_of(me)
  redis.call('HSET', KEYS[1], me, string.format('%d:%d:%d', c, now + ttl, g))
end
"#;

/// KEYS: counts, queue, state, quota state, probe holder. ARGV: replica, cap
/// (4294967295: none, the lease is not counted), ttl (ms), quota interval and tolerance
/// (µs; interval 0: no quota), probe (0/1), probe's time to live (ms), channel, id.
///
/// Admits if the live replicas' counts leave room under the cap (the lower of the
/// replica's and the learned limit kept here) and nobody waits; else queues the replica
/// (its count unchanged: the lease waits for a grant). A probe is refused while another
/// replica's probe runs, a lease without a quota unit is told how long until one.
/// Returns {status (1 admitted, 2 queued, 0 refused), ms until a quota unit, the key's
/// total with this lease, grants to this replica}.
pub(super) const ACQUIRE: &str = r#"
local me, ttl = ARGV[1], tonumber(ARGV[3])
local counted = ARGV[2] ~= '4294967295'
local cap = tonumber(ARGV[2])
if counted then
  if redis.call('HGET', KEYS[3], 'cap') ~= ARGV[2] then
    redis.call('HSET', KEYS[3], 'cap', ARGV[2])
  end
  cap = cap_of(cap)
end
local probe = ARGV[6] == '1'
if probe then
  local holder = redis.call('GET', KEYS[5])
  if holder and holder ~= me then
    return {0, 0, 0, 0}
  end
end
local interval, tolerance = tonumber(ARGV[4]), tonumber(ARGV[5])
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = 0
if interval > 0 then
  tat = math.max(tonumber(redis.call('GET', KEYS[4]) or '0'), now_us)
  if tat - now_us > tolerance then
    return {0, math.max(1, math.ceil((tat - tolerance - now_us) / 1000)), 0, 0}
  end
end
local status, total, mine = 1, 0, 0
if counted then
  total = live()
  mine, total = pump(total, cap, me, ARGV[8], ARGV[9])
  local c = mine_of(me)
  local r = room(total, cap)
  if r > 0 and redis.call('LLEN', KEYS[2]) == 0 then
    c, total = c + 1, total + 1
    took(r)
  else
    redis.call('RPUSH', KEYS[2], me)
    status = 2
  end
  put(me, c, ttl)
end
if interval > 0 then
  local next = tat + interval
  redis.call('SET', KEYS[4], string.format('%d', next), 'PX', math.ceil((next - now_us) / 1000) + 1000)
end
if probe then
  redis.call('SET', KEYS[5], me, 'PX', tonumber(ARGV[7]))
end
return {status, 0, total, mine}
"#;

/// KEYS: counts, queue, state. ARGV: replica, leases released, ttl (ms), channel, id.
/// Takes the leases off the replica's count and hands the freed slots to the queue.
/// Returns {grants to this replica, the key's total after}.
pub(super) const RELEASE: &str = r#"
local me, ttl = ARGV[1], tonumber(ARGV[3])
put(me, math.max(mine_of(me) - tonumber(ARGV[2]), 0), ttl)
local mine, total = pump(live(), cap_of(nil), me, ARGV[4], ARGV[5])
return {mine, total}
"#;

/// KEYS: counts, queue, state. ARGV: replica, ttl (ms), channel, id, the replica's own
/// count (-1: unknown). The heartbeat's renewal of the replica's count, and the hand-out
/// of slots a dead replica held. With the replica's own count (when nothing of its is
/// on the way: no lease asking, queued or being released), a count here that differs
/// from it, or a queue entry of the replica's, is an error (a call whose answer was lost,
/// an outage): the count is reset to it, the replica's queue entries dropped, and its
/// generation raised (grants announced before are void). With `claim` (ARGV 6: the
/// replica's leases only wait, nothing else of its is on its way), the generation is
/// raised and the count returned, so that grants whose messages were lost reach their
/// leases. Returns {grants to this replica, its generation, its count here, the key's
/// total}.
pub(super) const RENEW: &str = r#"
local me, ttl, own = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[5])
local v = redis.call('HGET', KEYS[1], me)
local c, d, g = 0, 0, 0
if v then
  c, d, g = field(v)
end
if ARGV[6] == '1' then
  g = g + 1
end
if own >= 0 then
  local removed = redis.call('LREM', KEYS[2], 0, me)
  if own ~= c or removed > 0 then
    g = g + 1
    c = own
  end
end
if v or own > 0 then
  redis.call('HSET', KEYS[1], me, string.format('%d:%d:%d', c, now + ttl, g))
end
local mine, total = pump(live(), cap_of(nil), me, ARGV[3], ARGV[4])
local count = mine_of(me)
return {mine, g, count, total}
"#;

/// KEYS: replicas. ARGV: replica, ttl (ms). Renews the replica's life; returns the names
/// of the replicas alive.
pub(super) const REPLICAS: &str = r#"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
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

/// KEYS: state hash. ARGV: limit, generation, change (0 lowered, 1 raised, 2 raise
/// refused, 3 raise served), channel, id, the raise back-off's first and longest waits
/// (ms). The key's learned concurrency limit, one for every replica, with the limit known
/// to hold (`floor`), when the next try above it may start (`rat`, server ms) and the wait
/// a refused try doubles (`rwait`, ms):
///
/// - lowered: a lower limit always wins; it holds, and the next try waits the first wait;
///   while a raise is tried, one lower than the limit known to hold by at most one is the
///   try's refusal (a request admitted before the try, whose count missed it);
/// - raised: wins only if made on the limit kept here (its generation is the one kept),
///   that limit holds (no other try runs: one replica's raise at a time) and `rat` has
///   passed;
/// - raise refused: back to the limit known to hold, the wait doubled (up to the longest);
///   once per try, whichever replica's refusal comes first;
/// - raise served: once as many tries as the raised limit were served in a row (`tries`;
///   one could be served only because another request had just ended at the provider and
///   not yet here), the raised limit holds, and the next try waits the first wait;
///
/// A try is one request: the admission scripts let one lease at a time above the limit
/// known to hold (see `room`), until the try's answer comes here.
///
/// With none kept (a new key, or the store restarted empty) the first one sent is taken,
/// as holding. Every change raises the generation (past the sender's, after a restart)
/// and is announced (`limit <id> <limit> <generation> <floor> <ms until a raise>`).
/// Returns {limit, generation, floor, ms until a raise}.
pub(super) const LIMIT: &str = r#"
local s = redis.call('HMGET', KEYS[1], 'limit', 'lgen', 'floor', 'rat', 'rwait')
local kept, gen = tonumber(s[1] or '0'), tonumber(s[2] or '0')
local floor, rat, rwait = tonumber(s[3] or '0'), tonumber(s[4] or '0'), tonumber(s[5] or '0')
local l, g, change = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local first, longest = tonumber(ARGV[6]), tonumber(ARGV[7])
if floor == 0 then
  floor = kept
end
local changed = false
local function hold(limit, wait)
  kept, floor, rwait, rat, changed = limit, limit, wait, now + wait, true
end
if kept == 0 then
  hold(l, first)
elseif change == '0' then
  if kept > floor and l + 1 >= floor then
    -- A refusal while a raise is tried, of a request admitted before the try's (its
    -- count missed the try): the try's refusal.
    hold(floor, math.min(math.max(rwait * 2, first), longest))
  elseif l < kept then
    hold(l, first)
  end
elseif change == '1' then
  if g == gen and l > kept and kept <= floor and now >= rat then
    kept, changed = l, true
  end
elseif change == '2' then
  if kept > floor then
    hold(floor, math.min(math.max(rwait * 2, first), longest))
  end
elseif change == '3' then
  if l > floor and l <= kept then
    local tries = tonumber(redis.call('HGET', KEYS[1], 'tries') or '0') + 1
    if tries >= l then
      hold(l, first)
    else
      -- Not proven yet: the next request above the floor tries again.
      redis.call('HSET', KEYS[1], 'tries', tries, 'trial', 0)
    end
  end
end
if changed then
  gen = math.max(gen, g) + 1
  redis.call('HSET', KEYS[1], 'limit', kept, 'lgen', gen, 'floor', floor, 'rat', rat, 'rwait', rwait, 'trial', 0, 'tries', 0)
  redis.call('PUBLISH', ARGV[4], string.format('limit %s %d %d %d %d', ARGV[5], kept, gen, floor, math.max(rat - now, 0)))
end
return {kept, gen, floor, math.max(rat - now, 0)}
"#;

/// KEYS: state hashes (one, on a cluster). Returns per key {ms left, level, disabled,
/// learned limit (0: none), its generation, the limit known to hold, ms until a raise}.
pub(super) const SYNC: &str = r#"
local out = {}
for i = 1, #KEYS do
  local s = redis.call('HMGET', KEYS[i], 'until', 'level', 'disabled', 'limit', 'lgen', 'floor', 'rat')
  local u = tonumber(s[1] or '0')
  local disabled = 0
  if s[3] == '1' then
    disabled = 1
  end
  local floor = tonumber(s[6] or '0')
  if floor == 0 then
    floor = tonumber(s[4] or '0')
  end
  out[i] = {math.max(u - now, 0), tonumber(s[2] or '0'), disabled, tonumber(s[4] or '0'), tonumber(s[5] or '0'), floor, math.max(tonumber(s[7] or '0') - now, 0)}
end
return out
"#;

impl Scripts {
    pub(super) fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{NOW}{body}"));
        let admission = |body: &str| Script::new(&format!("{NOW}{HELPERS}{body}"));
        Self {
            acquire: admission(ACQUIRE),
            release: admission(RELEASE),
            renew: admission(RENEW),
            replicas: script(REPLICAS),
            rest: script(REST),
            limit: script(LIMIT),
            sync: script(SYNC),
        }
    }
}
