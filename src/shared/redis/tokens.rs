//! Token quotas in the store: one GCRA state per (key, bucket) in token units, on the
//! server's clock, for every replica (see [`crate::shared`]'s token sharing).
//!
//! | name | type | holds |
//! | --- | --- | --- |
//! | `tkr:<ns>:{<id>}:t` | string | the token quota's state (GCRA's theoretical arrival time, server µs), expiring a second after it is in the past |
//!
//! A request with a token cost costs two calls: `take` when its lease is admitted, and
//! `settle` when its answer's usage is known (or when it was refused, or dropped unsent:
//! then its whole reservation comes back). Requests without a token cost make neither.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::Inner;
use super::scripts::NOW;
use crate::shared::{Op, TokenAsk, TokenVerdict};

/// KEYS: the token state. ARGV: cost (tokens), limit (tokens per period), period (µs),
/// ahead (µs: how far past its window the request may book), floor (µs: the replica's own
/// state ahead of now, taken if the store holds none). Takes `cost` tokens if they fit
/// within the window plus `ahead`. Returns {taken (0/1), µs until the request may go, the
/// state ahead of now (µs)}.
const TAKE: &str = r"
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost, limit, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ahead, floor = tonumber(ARGV[4]), tonumber(ARGV[5])
local held = redis.call('GET', KEYS[1])
local tat = now_us + floor
if held then
  tat = math.max(tonumber(held), now_us)
end
local span = math.ceil(cost * period / limit)
local next = tat + span
if next > now_us + period + ahead then
  return {0, 0, tat - now_us}
end
redis.call('SET', KEYS[1], string.format('%d', next), 'PX', math.ceil((next - now_us) / 1000) + 1000)
return {1, math.max(next - period - now_us, 0), next - now_us}
";

/// KEYS: the token state. ARGV: charged (tokens taken), used (tokens the answer reported;
/// 0 for a reservation given back whole), limit, period (µs), floor (µs: the replica's own
/// state ahead of now, which its provider's headers hold). Charges what was used beyond
/// the reservation, or gives back what was not used, never pulling the state before now
/// (the refund rule of `crate::tokens`); then holds the state no earlier than the floor.
/// Returns the state ahead of now (µs).
const SETTLE: &str = r"
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local charged, used = tonumber(ARGV[1]), tonumber(ARGV[2])
local limit, period = tonumber(ARGV[3]), tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if used > charged then
  tat = math.max(tat, now_us) + math.ceil((used - charged) * period / limit)
elseif tat > now_us then
  tat = math.max(tat - math.floor((charged - used) * period / limit), now_us)
end
tat = math.max(tat, now_us + tonumber(ARGV[5]))
if tat <= now_us then
  return 0
end
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.ceil((tat - now_us) / 1000) + 1000)
return tat - now_us
";

static SCRIPTS: LazyLock<(Script, Script)> = LazyLock::new(|| {
    (
        Script::new(&format!("{NOW}{TAKE}")),
        Script::new(&format!("{NOW}{SETTLE}")),
    )
});

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 4)
}

impl Inner {
    /// Takes a request's tokens from the shared state; `None` if the store failed.
    async fn take_tokens(&self, ask: &TokenAsk) -> Option<TokenVerdict> {
        let mut invocation = SCRIPTS.0.prepare_invoke();
        invocation
            .key(self.key("t", &ask.key))
            .arg(ask.cost)
            .arg(ask.limit.max(1))
            .arg(micros(ask.period).max(1))
            .arg(micros(ask.ahead))
            .arg(micros(ask.floor));
        let (taken, ready_in, state) = self.call::<(u8, u64, u64)>(invocation).await?;
        let state = Duration::from_micros(state);
        Some(if taken == 1 {
            TokenVerdict::Taken {
                ready_in: Duration::from_micros(ready_in),
                state,
            }
        } else {
            TokenVerdict::Wait { state }
        })
    }

    /// Settles a reservation in the shared state; `false` if the store failed.
    async fn settle_tokens(
        &self,
        id: &str,
        charged: u64,
        used: u64,
        limit: u64,
        period: Duration,
        floor: Duration,
    ) -> bool {
        let mut invocation = SCRIPTS.1.prepare_invoke();
        invocation
            .key(self.key("t", id))
            .arg(charged)
            .arg(used)
            .arg(limit.max(1))
            .arg(micros(period).max(1))
            .arg(micros(floor));
        self.call::<u64>(invocation).await.is_some()
    }
}

/// Carries a token op to the store. An ask the store did not answer is dropped: its lease
/// then goes on this replica's own accounting (as an admission the store failed to answer
/// does).
pub(super) async fn report(inner: &Inner, op: Op) {
    match op {
        Op::Tokens(ask) => {
            if let Some(verdict) = inner.take_tokens(&ask).await {
                ask.answer(verdict);
            }
        }
        Op::TokenSettle {
            key,
            charged,
            used,
            limit,
            period,
            floor,
        } => {
            inner
                .settle_tokens(&key, charged, used, limit, period, floor)
                .await;
        }
        _ => {}
    }
}
