//! When a key, and the pool, can next take a request: the one answer that selection,
//! waiting ([`KeyPool::poll_reserve`](super::KeyPool::poll_reserve)), the retry policy and
//! [`KeyPool::snapshot`](super::KeyPool::snapshot) share. Each key's comes from
//! `Slot::status`, which reads the states of the module docs' diagram.

use std::sync::Arc;

use super::bucket::Bucket;
use super::{LazyNow, PoolInner};
use crate::pool_time::PoolTime;

/// When a key can next take a request (see `Slot::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Availability {
    /// Now.
    Now,
    /// When one of its requests ends (at its concurrency limit, or its probe running): no
    /// time is known, but the release or the probe's answer wakes waiters.
    OnRelease,
    /// At this time: its rest ends or its quota refills.
    At(PoolTime),
    /// Never: disabled.
    Never,
}

/// When some key of the pool can next take a request: the keys' [`Availability`] combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PoolAvailability {
    /// A key can take one now.
    Now,
    /// A key frees when one of its requests ends; `earliest` is the earliest timed return
    /// of the others, if any.
    OnRelease { earliest: Option<PoolTime> },
    /// Every usable key rests or waits for quota; the earliest is back at this time.
    At(PoolTime),
    /// Every key is disabled.
    Never,
}

impl PoolInner {
    /// Every key's [`Availability`], combined.
    pub(super) fn availability(&self) -> PoolAvailability {
        self.availability_in(None, 0)
    }

    /// Every key's [`Availability`] for a request of `bucket` (`None`: a pool without
    /// buckets) and `cost` tokens, combined.
    pub(super) fn availability_in(
        &self,
        bucket: Option<&Arc<Bucket>>,
        cost: u64,
    ) -> PoolAvailability {
        let table = self.table.load();
        let mut now = LazyNow::costing(&self.signals, cost);
        let mut on_release = false;
        let mut earliest: Option<PoolTime> = None;
        for slot in table.slots.iter() {
            let status = match bucket {
                Some(bucket) => slot.status_in(bucket, &mut now),
                None => slot.status_any(&mut now),
            };
            match status.1 {
                Availability::Now => return PoolAvailability::Now,
                Availability::OnRelease => on_release = true,
                Availability::At(at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
                Availability::Never => {}
            }
        }
        match (on_release, earliest) {
            (true, earliest) => PoolAvailability::OnRelease { earliest },
            (false, Some(at)) => PoolAvailability::At(at),
            (false, None) => PoolAvailability::Never,
        }
    }
}

impl PoolInner {
    /// A request of `cost` tokens that no usable key's token window (for `bucket`) can ever
    /// hold: the largest window, and its period. `None` if some key can (or has no token
    /// quota there yet).
    pub(super) fn too_large(
        &self,
        bucket: &Arc<Bucket>,
        cost: u64,
    ) -> Option<(u64, std::time::Duration)> {
        let table = self.table.load();
        let mut largest: Option<(u64, std::time::Duration)> = None;
        for slot in table.slots.iter() {
            if slot.deadline.is_disabled() {
                continue;
            }
            let Some(lane) = slot.lanes[bucket.index].get() else {
                // No lane yet: its limit is the key's default, if configured.
                match self.signals.token_quota {
                    Some(quota) if quota.tokens() < cost => {
                        largest = largest.max(Some((quota.tokens(), quota.period())));
                        continue;
                    }
                    _ => return None,
                }
            };
            if lane.tokens.fits(cost) {
                return None;
            }
            let window = (lane.tokens.limit().unwrap_or(0), lane.tokens.period());
            largest = largest.max(Some(window));
        }
        largest
    }
}
