//! [`RejectedKey`]: a key the provider refused, to be disabled once the request is proven
//! not to blame.

use std::fmt;
use std::sync::Arc;

use super::events::{self, Label};
use super::slot::Slot;

/// A key whose credentials the provider refused (401/403, [`Outcome::KeyRejected`]), put
/// in the extensions of that response by [`KeyRotation`](crate::KeyRotation).
///
/// A refusal alone does not disable the key: the request may be to blame (a caller's own
/// credentials sent along, a model the account may not use), and one request must not
/// disable keys for everyone. The key is the one to blame only by contrast: when the same
/// request then succeeds with another key. [`RetryLayer`](crate::retry::RetryLayer) makes
/// that test (a request refused the same way by a second key is answered with the refusal,
/// and disables nothing); without it, call [`disable`](Self::disable) on proof of your own.
///
/// [`Outcome::KeyRejected`]: crate::classify::Outcome::KeyRejected
///
/// # Examples
///
/// ```
/// use tower_key_rotation::{KeyPool, KeySet};
///
/// let pool = KeyPool::new(KeySet::parse("k1,k2").unwrap());
/// let lease = pool.try_reserve().unwrap();
/// // The provider refused this key, and another key served the same request:
/// assert!(lease.disable());
/// drop(lease);
/// assert!(pool.snapshot()[0].disabled);
/// ```
#[derive(Clone)]
pub struct RejectedKey {
    slot: Arc<Slot>,
    index: usize,
    keys: usize,
}

impl RejectedKey {
    pub(super) fn new(slot: Arc<Slot>, index: usize, keys: usize) -> Self {
        Self { slot, index, keys }
    }

    /// 1-based position of the key, as logs show it (`key 2/3`).
    pub fn position(&self) -> usize {
        self.index + 1
    }

    /// Disables the key for good (and in every replica sharing the pool's state); `true`
    /// if it was not disabled yet. A reload that keeps the key keeps it disabled; one that
    /// replaces its value brings the new key in fresh.
    pub fn disable(&self) -> bool {
        disable(&self.slot, self.index, self.keys)
    }
}

/// Disables the key of `slot` (at 0-based `index` of `keys`) and logs it.
pub(super) fn disable(slot: &Slot, index: usize, keys: usize) -> bool {
    let transition = slot.disable_rejected();
    let label = Label {
        position: index + 1,
        keys,
        name: slot.spec.name.as_deref(),
        bucket: None,
    };
    events::log(&label, &transition);
    transition.disabled
}

impl fmt::Debug for RejectedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RejectedKey(key {}/{})", self.index + 1, self.keys)
    }
}
