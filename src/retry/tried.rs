//! [`TriedKeys`]: which keys a request (and its retries) has already used.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use smallvec::SmallVec;
use tokio::time::Instant;

/// Positions held without an allocation: a request tries one key, a retried one a few
/// (every request pays for the record, retried or not).
type Positions = SmallVec<[usize; 4]>;

/// A request extension recording the keys a request has been sent with, shared by every
/// clone of the request.
///
/// A retry policy puts one on a request; [`KeyRotation`](crate::KeyRotation) then records
/// each attempt's key in it and, when the key it reserved was already tried, trades it for
/// an untried available key if there is one. Requests without it cost nothing extra.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::retry::TriedKeys;
///
/// let tried = TriedKeys::new();
/// let mut request = http::Request::new(());
/// request.extensions_mut().insert(tried.clone());
/// // ... after an attempt through KeyRotation:
/// # tried.insert(2);
/// assert_eq!(tried.positions(), vec![2]); // key 2 was used
/// assert!(tried.contains(2));
/// ```
#[derive(Clone, Default)]
pub struct TriedKeys(Arc<Mutex<Record>>);

/// What a request's attempts share.
#[derive(Default)]
struct Record {
    positions: Positions,
    /// The end of the request's wait budget, set by [`Retry`](super::Retry) in a routing
    /// pool: kept here rather than in an extension of its own, which every request would
    /// pay to insert and every attempt's copy to clone.
    wait_until: Option<Instant>,
}

impl TriedKeys {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Has the key at 1-based `position` (`key 2/3` is 2) been tried?
    pub fn contains(&self, position: usize) -> bool {
        self.record().positions.contains(&position)
    }

    /// Records the key at 1-based `position` as tried.
    pub fn insert(&self, position: usize) {
        let mut record = self.record();
        if !record.positions.contains(&position) {
            record.positions.push(position);
        }
    }

    /// Number of distinct keys tried.
    pub fn len(&self) -> usize {
        self.record().positions.len()
    }

    /// `true` before any attempt.
    pub fn is_empty(&self) -> bool {
        self.record().positions.is_empty()
    }

    /// 1-based position of the key tried last (first used last), if any.
    pub fn last(&self) -> Option<usize> {
        self.record().positions.last().copied()
    }

    /// 1-based positions of the keys tried, in the order they were first used.
    pub fn positions(&self) -> Vec<usize> {
        self.record().positions.to_vec()
    }

    /// Sets the end of the request's wait budget (see [`WaitUntil`](crate::route)).
    pub(crate) fn set_wait_until(&self, end: Instant) {
        self.record().wait_until = Some(end);
    }

    /// The end of the request's wait budget, if its retry layer set one.
    pub(crate) fn wait_until(&self) -> Option<Instant> {
        self.record().wait_until
    }

    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        // The critical sections cannot panic; a poisoned lock still holds valid data.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for TriedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TriedKeys").field(&self.positions()).finish()
    }
}
