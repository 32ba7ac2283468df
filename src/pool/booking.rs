//! Booking tokens ahead: a request whose tokens fit no key now takes them on the key where
//! they fit soonest, for a later start, and waits holding its lease until then.
//!
//! Without booking, a waiter for `n` tokens sleeps until `n` tokens have refilled; a request
//! of fewer tokens arriving meanwhile fits sooner and takes them, and under a sustained
//! load the large request is overtaken refill after refill. A booking moves the token
//! quota's state at once, so that requests arriving later queue behind it: waiters go in
//! the order they booked, as a provider's own queue would take them.
//!
//! ```text
//!   no key fits n tokens now ──► the key where they fit soonest (within the wait budget)
//!        ──► take them there, ready at t ──► the lease waits until t ──► sent
//! ```
//!
//! A booked lease dropped unsent gives its tokens back (`Lease`'s drop), and one whose key
//! started resting meanwhile is traded for another at its start.

use std::sync::Arc;

use super::bucket::Bucket;
use super::lease::Lease;
use super::{LazyNow, PoolInner};

impl PoolInner {
    /// Books `cost` tokens of `bucket` on the key where they fit soonest, at most `ahead`
    /// (nanoseconds) from now; `None` if no key can take the request within that.
    pub(super) fn book_in(&self, bucket: &Arc<Bucket>, cost: u64, ahead: u64) -> Option<Lease> {
        let table = self.table.load();
        let mut candidates: Vec<(crate::pool_time::PoolTime, usize)> = table
            .slots
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                let lane = slot.lanes[bucket.index].get()?;
                Some((lane.tokens.available_at(cost)?, index))
            })
            .collect();
        candidates.sort_unstable();
        let mut now = LazyNow::costing(&self.signals, cost);
        now.ahead = ahead;
        for (_, index) in candidates {
            if let Some((lane, taken)) = table.slots[index].try_take_in(bucket, &mut now) {
                return Some(Lease::new_in(&table, index, lane, taken).with_horizon(ahead));
            }
        }
        None
    }
}
