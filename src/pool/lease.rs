//! [`Lease`]: a reserved key, counted in flight until dropped.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use http::HeaderValue;

use super::LazyNow;
use super::events::{self, Label};
use super::record::Answered;
use super::rest::Claim;
use super::slot::{Slot, Taken};
use super::table::Table;
use crate::key::ApiKey;
use crate::outcome::{Classifier, Outcome};
use crate::shared::{Admission, Admit};

/// A reserved key: counts as in flight until dropped.
///
/// Made by [`KeyPool::try_reserve`](super::KeyPool::try_reserve) or
/// [`KeyPool::poll_reserve`](super::KeyPool::poll_reserve). The service moves it
/// into the response future and then into the response body, so the slot is given back
/// when the body ends, errors or is dropped, or as soon as anything on the way is dropped.
pub struct Lease {
    slot: Arc<Slot>,
    index: usize,
    keys: usize,
    generation: u32,
    /// Taken with the key at its concurrency limit.
    at_limit: bool,
    /// Where the quota unit this lease took ends: a refund gives back only what of it is
    /// still unused (see `Gcra::refund`).
    tat_after: u64,
    /// `SENT`, `PROBE`, `RESOLVED`, `REFUSED` bits. Only the lease's owner writes them, so
    /// a plain load and store suffice (no locked read-modify-write on the hot path); atomic only
    /// so that a lease is `Sync`.
    flags: AtomicU8,
    /// With a shared state backend, on a key with a cap: the store's answer, until it
    /// comes (see [`Lease::poll_admitted`]).
    admission: Option<Admission>,
}

const SENT: u8 = 1;
const PROBE: u8 = 2;
const RESOLVED: u8 = 4;
/// Refused for a limit: counted in the slot's `refused_open` until dropped.
const REFUSED: u8 = 8;

impl Lease {
    pub(super) fn new(table: &Table, index: usize, taken: Taken) -> Self {
        let slot = &table.slots[index];
        let admission = match &slot.shared {
            None => None,
            Some(shared) => match shared.taken(slot.limit()) {
                Admit::Now => None,
                Admit::Wait(admission) => Some(admission),
            },
        };
        Self {
            admission,
            slot: slot.clone(),
            index,
            keys: table.slots.len(),
            generation: taken.generation,
            at_limit: taken.at_limit,
            tat_after: taken.tat_after,
            flags: AtomicU8::new(if taken.probe { PROBE } else { 0 }),
        }
    }

    fn set_flag(&self, flag: u8) {
        let flags = self.flags.load(Ordering::Relaxed);
        self.flags.store(flags | flag, Ordering::Relaxed);
    }

    fn label(&self) -> Label<'_> {
        Label {
            position: self.index + 1,
            keys: self.keys,
            name: self.slot.spec.name.as_deref(),
        }
    }

    /// 0-based index of the reserved key (in the pool's order when it was reserved).
    pub fn index(&self) -> usize {
        self.index
    }

    /// 1-based position of the reserved key, as logs show it (`key 2/3`).
    pub fn position(&self) -> usize {
        self.index + 1
    }

    /// The reserved key's name, if it has one.
    pub fn name(&self) -> Option<&str> {
        self.slot.spec.name.as_deref()
    }

    /// The reserved key, for custom placements.
    pub fn key(&self) -> &ApiKey {
        &self.slot.spec.key
    }

    /// The reserved key's header value, `Bearer <key>` (if `bearer`) or the bare key,
    /// built once per key and marked sensitive.
    pub fn header_value(&self, bearer: bool) -> &HeaderValue {
        self.slot.header(bearer)
    }

    /// Is this lease the single probe request of a key coming back from a suspension?
    pub fn is_probe(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & PROBE != 0
    }

    /// The classifier of the pool the key belongs to.
    pub fn classifier(&self) -> &Classifier {
        &self.slot.signals.classifier
    }

    /// May this reservation still be sent? Not if, since it was made, its key was removed
    /// or replaced by a reload, started resting, was disabled, or came to owe its single
    /// probe after a rest to another request. `poll_ready` and `call` ask this of a
    /// reservation made earlier.
    ///
    /// A key owing its probe makes this reservation the probe, if no other request has
    /// claimed it yet: a ready request may as well be the one.
    pub fn is_usable(&self) -> bool {
        let slot = &*self.slot;
        if slot.is_retired() || slot.is_resting(&mut LazyNow::new(&slot.signals)) {
            return false;
        }
        if self.is_probe() {
            return true;
        }
        match slot.probe.claim() {
            Claim::Ordinary => true,
            Claim::Probe => {
                self.set_flag(PROBE);
                true
            }
            Claim::Running => false,
        }
    }

    /// Has the store shared with other replicas admitted this lease? Always `Ready(true)`
    /// without a [state backend](crate::shared), for a key without a cap, and while the
    /// backend is degraded.
    ///
    /// With one, a lease on a key with a cap must be admitted before its request goes (one
    /// round trip to the store, which counts every replica's leases on the key): poll this
    /// until it is ready. `Ready(false)`: the key is full across the replicas; drop the
    /// lease and reserve again (the key reads busy until a release is announced).
    /// [`KeyRotation`](crate::KeyRotation) does this in `poll_ready`.
    pub fn poll_admitted(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(admission) = &mut self.admission else {
            return Poll::Ready(true);
        };
        let shared = self
            .slot
            .shared
            .as_ref()
            .expect("an admission has a shared key");
        let admitted = ready!(admission.poll(shared, cx));
        self.admission = None;
        Poll::Ready(admitted)
    }

    /// Sends this lease without waiting for the store's answer (it is still counted): for
    /// a reservation traded in `call`, where nothing can wait.
    pub(crate) fn skip_admission(&mut self) {
        self.admission = None;
    }

    /// Counts the request as sent with this key and logs `Using key i/n`.
    pub fn mark_sent(&self) {
        self.set_flag(SENT);
        self.slot.requests.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            key = self.position(),
            keys = self.keys,
            "Using {}",
            self.label()
        );
    }

    /// Applies a response's [`Outcome`] to the key: cool down, suspend, disable, or count.
    pub fn record(&self, outcome: Outcome) {
        let flags = self.flags.load(Ordering::Relaxed);
        let first_refusal = matches!(outcome, Outcome::RateLimited { .. }) && flags & REFUSED == 0;
        if first_refusal {
            self.set_flag(REFUSED);
        }
        if self.is_probe() {
            self.set_flag(RESOLVED);
        }
        let transition = self.slot.record(
            outcome,
            Answered {
                generation: self.generation,
                at_limit: self.at_limit,
                probe: flags & PROBE != 0,
                first_refusal,
            },
        );
        events::log(&self.label(), &transition);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let flags = *self.flags.get_mut();
        if flags & PROBE != 0 && flags & RESOLVED == 0 {
            // The probe never got an answer: the next caller may probe.
            self.slot.probe.give_back();
        }
        // Reserved but never sent: what is left of its quota unit goes back.
        let unsent = (flags & SENT == 0).then_some(self.tat_after);
        self.slot.release(unsent, flags & REFUSED != 0);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lease({})", self.label())
    }
}
