//! Token quotas shared between replicas: what a lease with a token cost asks of the store,
//! and what the store answers.
//!
//! A (key, bucket) with a token quota (configured, or learned from headers) and a backend
//! keeps its token state (GCRA in token units, see [`TokenQuota`](crate::TokenQuota)) in
//! the store as well as here. Each replica first takes a request's tokens from its own
//! copy (so that a request that cannot fit costs no round trip), then asks the store
//! ([`Op::Tokens`]), which takes them from the one state every replica shares, on its own
//! clock, or says how long until they fit. Every answer carries the shared state as a
//! duration ahead of now, and the replica holds its own copy no earlier than that: a
//! replica learns the other replicas' use from its own requests' answers, without a call
//! of its own. The reservation is settled with the answer's usage ([`Op::TokenSettle`]),
//! by the same refund rule as the local one: a refund never pulls the state before now,
//! and an answer without usage (or cut short) keeps its whole reservation. A settlement
//! also carries the replica's own state (which its provider's token headers hold no
//! earlier than the provider's count), so that what one replica heard from the provider
//! reaches the others through the store.
//!
//! Requests without a token cost, and lanes without a token quota, never ask.
//!
//! While the store is away, each replica keeps accounting alone, by the
//! [`DegradedPolicy`]'s rule for request quotas: under `split`, a request takes its tokens
//! times the replicas alive at the last heartbeat (each replica has its share of the
//! window); under `open`, its tokens (the window in each replica); under `closed`, a request
//! with a token cost takes no lane with a token quota until the store is back. Each ask
//! carries the replica's own state as a floor, which the store takes for a lane it holds
//! nothing of (a lane new to it, or a store restarted empty after an outage): the use a
//! replica accounted alone is not lost.

use std::fmt;
use std::time::Duration;

use tokio::sync::oneshot;

use super::*;

/// A lease's request for tokens from its key's shared token quota.
///
/// Answer it once ([`answer`](Self::answer)); a backend that drops it unanswered lets the
/// request go on the replica's own accounting.
pub struct TokenAsk {
    /// The key's (or lane's) [`StateBackend::key_id`].
    pub key: Arc<str>,
    /// The tokens the request reserves.
    pub cost: u64,
    /// The quota's tokens per period in force here.
    pub limit: u64,
    /// The quota's period.
    pub period: Duration,
    /// How far ahead of its window the request may book its tokens (it then goes when they
    /// fit, within its wait budget); zero: only if they fit now.
    pub ahead: Duration,
    /// This replica's own state of the quota before the request, as a duration ahead of
    /// now: the store starts from it if it holds no state for the key.
    pub floor: Duration,
    pub(super) reply: oneshot::Sender<TokenVerdict>,
}

impl TokenAsk {
    /// Answers the request.
    pub fn answer(self, verdict: TokenVerdict) {
        // The lease may be gone (its caller gave up): the tokens then come back with its
        // drop, which settles what the store took.
        let _ = self.reply.send(verdict);
    }

    /// Is the lease still waiting for the answer?
    pub fn is_waiting(&self) -> bool {
        !self.reply.is_closed()
    }
}

impl fmt::Debug for TokenAsk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenAsk")
            .field("key", &self.key)
            .field("cost", &self.cost)
            .field("limit", &self.limit)
            .field("period", &self.period)
            .field("ahead", &self.ahead)
            .field("floor", &self.floor)
            .finish()
    }
}

/// The store's answer to a [`TokenAsk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVerdict {
    /// The tokens are taken: the request goes in `ready_in` (zero: now; more if it booked
    /// ahead). `state` is the shared state after the take, ahead of now.
    Taken {
        /// When the request may go, from now.
        ready_in: Duration,
        /// The shared state after the take, ahead of now.
        state: Duration,
    },
    /// The tokens do not fit (within the request's booking): nothing is taken. `state` is
    /// the shared state, ahead of now.
    Wait {
        /// The shared state, ahead of now.
        state: Duration,
    },
}

impl SharedKey {
    /// Tokens a request of `cost` takes from this replica's own copy of a token quota of
    /// `limit`: `cost` while the store is reachable (it takes them again from the shared
    /// state), or by the degraded policy while it is away: times the replicas under
    /// `split` (at most the whole window), `cost` under `open`, none at all under `closed`
    /// (`None`: the request waits for the store).
    #[inline(never)]
    pub(crate) fn token_units(&self, cost: u64, limit: u64) -> Option<u64> {
        let shared = &*self.shared;
        if !shared.degraded.load(Ordering::Relaxed) {
            return Some(cost);
        }
        match shared.policy {
            DegradedPolicy::Split => {
                let replicas = u64::from(shared.replicas.load(Ordering::Relaxed).max(1));
                Some(cost.saturating_mul(replicas).min(limit).max(cost))
            }
            DegradedPolicy::Open => Some(cost),
            DegradedPolicy::Closed => None,
        }
    }

    /// Does a request with a token cost ask the store for its tokens (the store is
    /// reachable)?
    pub(crate) fn shares_tokens(&self) -> bool {
        !self.shared.degraded.load(Ordering::Relaxed)
    }

    /// Asks the store for `cost` tokens of the key's shared token quota (see [`TokenAsk`]).
    #[inline(never)]
    pub(crate) fn ask_tokens(
        &self,
        cost: u64,
        limit: u64,
        period: Duration,
        ahead: Duration,
        floor: Duration,
    ) -> oneshot::Receiver<TokenVerdict> {
        let (reply, answer) = oneshot::channel();
        self.shared.send(Op::Tokens(TokenAsk {
            key: self.id.clone(),
            cost,
            limit,
            period,
            ahead,
            floor,
            reply,
        }));
        answer
    }

    /// Settles `charged` tokens the store took for a request whose answer reported `used`
    /// (0: given back whole, the request was refused or never sent).
    #[inline(never)]
    pub(crate) fn settle_tokens(
        &self,
        charged: u64,
        used: u64,
        limit: u64,
        period: Duration,
        floor: Duration,
    ) {
        self.shared.send(Op::TokenSettle {
            key: self.id.clone(),
            charged,
            used,
            limit,
            period,
            floor,
        });
    }
}
