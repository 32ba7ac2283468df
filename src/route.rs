//! Routing: what a request asks of the pool beyond "a key".
//!
//! Providers meter a key apart per model (a *bucket*), and cache prompts per account (so a
//! conversation is best kept on one key: *affinity*). Neither is known when tower's
//! `poll_ready` reserves capacity, before the request is seen. A pool built with a
//! [`Router`] ([`KeyPoolBuilder::router`](crate::KeyPoolBuilder::router)) therefore
//! chooses the key in `call`, from the request's [`Route`]:
//!
//! ```text
//!   poll_ready ──► the inner service is ready (no key reserved)
//!   call(request) ──► Router reads its head ──► Route { bucket, affinity, tokens }
//!        ├─ a key can take this route now ──► its header goes on, the request goes
//!        └─ none can ──► the response future waits for one, within the wait budget,
//!                        holding the readied inner service (a clone stays behind)
//! ```
//!
//! A pool without a router reserves in `poll_ready`, as tower's own limits do, at no
//! extra cost.
//!
//! A route's `tokens` ([`Router::tokens`]) are its cost against the keys' token quotas
//! ([`TokenQuota`](crate::TokenQuota)): a request waits until they fit, and its
//! [`TokenReservation`](crate::pool::TokenReservation) is settled from the answer's usage.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use http::{Extensions, HeaderMap, Method, Request, Uri};
use tokio::time::Instant;

/// The parts of a request a [`Router`] reads: its head and extensions, never its body (a
/// layer outside that has read the body may leave what it found in an extension).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The request's method.
    pub method: &'a Method,
    /// The request's target.
    pub uri: &'a Uri,
    /// The request's header fields.
    pub headers: &'a HeaderMap,
    /// The request's extensions.
    pub extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `request`.
    pub fn of<B>(request: &'a Request<B>) -> Self {
        Self {
            method: request.method(),
            uri: request.uri(),
            headers: request.headers(),
            extensions: request.extensions(),
        }
    }
}

/// Reads a request's [`Route`]: the bucket the provider meters it in, and the session it
/// belongs to.
///
/// Both methods default to `None` (one bucket, no affinity). A router must be cheap: it
/// runs for every request, and returns borrowed data so that nothing is allocated.
///
/// # Examples
///
/// Buckets by a header naming the model:
///
/// ```
/// use tower_key_rotation::route::{RequestHead, Router};
///
/// #[derive(Debug)]
/// struct ByModelHeader;
///
/// impl Router for ByModelHeader {
///     fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
///         head.headers.get("x-model")?.to_str().ok()
///     }
/// }
///
/// let request = http::Request::builder().header("x-model", "glm-4-plus").body(()).unwrap();
/// assert_eq!(ByModelHeader.bucket(&RequestHead::of(&request)), Some("glm-4-plus"));
/// ```
pub trait Router: Send + Sync + fmt::Debug + 'static {
    /// The name of the bucket the provider meters this request in on a key (usually the
    /// model), or `None` for the pool's default bucket.
    fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
        let _ = head;
        None
    }

    /// An id of the session (conversation) the request belongs to, whose requests are best
    /// kept on one key, or `None`.
    fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
        let _ = head;
        None
    }

    /// The request's cost in tokens, or `None` for none: the tokens it reserves of its
    /// key's token quota ([`KeyPoolBuilder::token_quota_per_key`](crate::KeyPoolBuilder::token_quota_per_key)),
    /// usually its estimated input plus the output it allows, settled later from the
    /// answer's usage ([`TokenReservation`](crate::pool::TokenReservation)).
    ///
    /// The cost extractor of the pool: read here, with the bucket, because this is where a
    /// request is read before a key is taken for it.
    fn tokens(&self, head: &RequestHead<'_>) -> Option<u64> {
        let _ = head;
        None
    }
}

/// A bucket's small id in one pool: 0 is the default bucket (requests that name none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct BucketId(pub(crate) u16);

impl BucketId {
    /// The bucket of requests that name none.
    pub const DEFAULT: Self = Self(0);

    /// The id as an index (0 for the default bucket).
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// What a request asks of the pool: the bucket it is metered in, its session's affinity
/// hash, and its cost in tokens. `Copy`, and made without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    pub(crate) bucket: BucketId,
    pub(crate) affinity: Option<u64>,
    /// A name new to the pool, sent in the overflow bucket until the provider accepts a
    /// request in it (its hash; see `Buckets`).
    pub(crate) candidate: Option<u64>,
    pub(crate) tokens: u64,
}

impl Route {
    /// The default bucket, no affinity, no token cost: what a pool without a router uses.
    pub const ANY: Self = Self {
        bucket: BucketId::DEFAULT,
        affinity: None,
        candidate: None,
        tokens: 0,
    };

    /// The request's token cost (0: none).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// This route, costing `tokens` (0: none).
    pub fn with_tokens(self, tokens: u64) -> Self {
        Self { tokens, ..self }
    }

    /// The bucket.
    pub fn bucket(&self) -> BucketId {
        self.bucket
    }

    /// The session's affinity hash, if the request named a session.
    pub fn affinity(&self) -> Option<u64> {
        self.affinity
    }
}

/// Buckets a pool tracks apart by default, beyond which further names share one overflow
/// bucket ([`KeyPoolBuilder::max_buckets`](crate::KeyPoolBuilder::max_buckets)).
pub const DEFAULT_MAX_BUCKETS: usize = 64;

/// Names a request may add before the provider has accepted any request in them: a caller
/// inventing model names takes at most this many of the pool's bucket ids for good.
const UNCONFIRMED: usize = 8;

/// Names remembered while they wait for the provider's first acceptance in the overflow
/// bucket, per generation (two generations: the older is dropped when the newer fills).
const CANDIDATES: usize = 64;

/// Bucket names interned into small ids: a lookup of a known name reads one map and
/// allocates nothing; a new name takes a lock once. Bounded: names beyond `max` share the
/// overflow id.
///
/// Names come from requests, which are untrusted: a name gets an id of its own only once
/// the provider has accepted a request in it (a 2xx answer, [`Buckets::confirm`]), or
/// while fewer than [`UNCONFIRMED`] names wait for their first acceptance. Other new names
/// go to the overflow bucket as candidates, and get their own id with their first accepted
/// request. So names a provider refuses (made up, misspelt) take at most [`UNCONFIRMED`]
/// ids, and the models callers really use keep buckets of their own.
pub(crate) struct Buckets {
    /// By the name's XXH3 hash: a short name hashes in a few dozen instructions, where the
    /// standard map's SipHash takes a few hundred. A name whose hash another name already
    /// holds (only ever a crafted one) is found by the slow path's scan of `names`.
    ids: ArcSwap<Ids>,
    /// Names by id, and how many of them wait for their first acceptance; serialises
    /// additions.
    names: Mutex<Names>,
    /// By id: has the provider accepted a request in this bucket (or did the operator name
    /// it)? The default and overflow buckets are.
    confirmed: Box<[AtomicBool]>,
    /// New names routed to the overflow bucket, by hash, until their first acceptance.
    candidates: Mutex<Candidates>,
    max: usize,
}

type Ids = HashMap<u64, (Box<str>, BucketId), BuildHasherDefault<Prehashed>>;

/// The hasher of a map whose keys are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys are hashed (`write_u64`); anything else is folded in.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

struct Names {
    /// Index 0: the default bucket's, empty.
    by_id: Vec<Arc<str>>,
    unconfirmed: usize,
}

/// Two generations of candidate names, so that the table stays bounded however many
/// names callers make up, while a name in use (noted again with each request) stays.
#[derive(Default)]
struct Candidates {
    current: HashMap<u64, Box<str>>,
    previous: HashMap<u64, Box<str>>,
}

impl Candidates {
    fn note(&mut self, hash: u64, name: &str) {
        if self.current.contains_key(&hash) {
            return;
        }
        if let Some(name) = self.previous.remove(&hash) {
            self.current.insert(hash, name);
            return;
        }
        if self.current.len() >= CANDIDATES {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(hash, name.into());
    }

    fn take(&mut self, hash: u64) -> Option<Box<str>> {
        self.current
            .remove(&hash)
            .or_else(|| self.previous.remove(&hash))
    }
}

impl Buckets {
    pub(crate) fn new(max: usize) -> Self {
        let confirmed: Box<[AtomicBool]> = (0..max + 2).map(|_| AtomicBool::new(false)).collect();
        confirmed[0].store(true, Ordering::Relaxed);
        confirmed[max + 1].store(true, Ordering::Relaxed);
        Self {
            ids: ArcSwap::from_pointee(Ids::default()),
            names: Mutex::new(Names {
                by_id: vec![Arc::from("")],
                unconfirmed: 0,
            }),
            confirmed,
            candidates: Mutex::new(Candidates::default()),
            max,
        }
    }

    /// The id of the overflow bucket.
    pub(crate) fn overflow(&self) -> BucketId {
        BucketId(u16::try_from(self.max + 1).unwrap_or(u16::MAX))
    }

    /// The id of the bucket named `name`, added (as accepted) if new and within the bound:
    /// for names the operator or the program gives, which need no acceptance.
    pub(crate) fn intern(&self, name: &str) -> BucketId {
        if let Some(id) = self.known(name) {
            self.confirm(id);
            return id;
        }
        self.add(name, true).0
    }

    /// The id of `name` if the fast map knows it.
    #[inline]
    fn known(&self, name: &str) -> Option<BucketId> {
        let ids = self.ids.load();
        let (known, id) = ids.get(&affinity_hash(name.as_bytes()))?;
        (**known == *name).then_some(*id)
    }

    /// The bucket of a request naming `name`: its own if known, or new and within the
    /// bound of unaccepted names; else the overflow bucket, with the name's hash as a
    /// candidate to [`confirm_candidate`](Self::confirm_candidate) on acceptance.
    #[inline]
    pub(crate) fn route(&self, name: &str) -> (BucketId, Option<u64>) {
        match self.known(name) {
            Some(id) => (id, None),
            None => self.add(name, false),
        }
    }

    #[cold]
    fn add(&self, name: &str, accepted: bool) -> (BucketId, Option<u64>) {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        // Known already (added meanwhile, or a name whose hash another holds)?
        let found = names
            .by_id
            .iter()
            .skip(1)
            .position(|known| **known == *name);
        if let Some(index) = found {
            drop(names);
            let id = BucketId(u16::try_from(index + 1).unwrap_or(u16::MAX));
            if accepted {
                self.confirm(id);
            }
            return (id, None);
        }
        if names.by_id.len() > self.max {
            return (self.overflow(), None);
        }
        let hash = affinity_hash(name.as_bytes());
        if !accepted && names.unconfirmed >= UNCONFIRMED {
            drop(names);
            self.candidates
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .note(hash, name);
            return (self.overflow(), Some(hash));
        }
        let id = BucketId(u16::try_from(names.by_id.len()).unwrap_or(u16::MAX));
        names.by_id.push(Arc::from(name));
        if accepted {
            self.confirmed[id.index()].store(true, Ordering::Relaxed);
        } else {
            names.unconfirmed += 1;
        }
        let mut next = Ids::clone(&self.ids.load());
        next.entry(hash).or_insert_with(|| (Box::from(name), id));
        self.ids.store(Arc::new(next));
        (id, None)
    }

    /// The provider accepted a request in bucket `id`: it no longer counts among the names
    /// waiting for their first acceptance. One load once confirmed.
    #[inline]
    pub(crate) fn confirm(&self, id: BucketId) {
        let Some(flag) = self.confirmed.get(id.index()) else {
            return;
        };
        if flag.load(Ordering::Relaxed) {
            return;
        }
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if !flag.swap(true, Ordering::Relaxed) {
            names.unconfirmed -= 1;
        }
    }

    /// The provider accepted a request of the candidate name `hash` (sent in the overflow
    /// bucket): the name gets its own bucket, if there is room;
    /// `true` if it did: requests of that name waiting in the overflow bucket may move.
    #[cold]
    pub(crate) fn confirm_candidate(&self, hash: u64) -> bool {
        let name = self
            .candidates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(hash);
        name.is_some_and(|name| self.intern(&name) != self.overflow())
    }

    /// The name of bucket `id` (`None` for the default and overflow buckets).
    pub(crate) fn name(&self, id: BucketId) -> Option<Arc<str>> {
        if id == BucketId::DEFAULT {
            return None;
        }
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names.by_id.get(id.index()).cloned()
    }
}

/// A stable 64-bit hash of an affinity id: the same in every process and version, so that
/// replicas agree on a session's keys without sharing anything. XXH3 (64-bit, seed 0): a
/// specified hash whose output is fixed across versions and platforms, and that reads 8 to
/// 32 bytes at a step: ~4 ns for a 36-byte session id, where a byte-at-a-time FNV-1a takes
/// a dependent multiplication per byte (~10× that, as much as the rest of a selection).
pub(crate) fn affinity_hash(id: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(id)
}

/// A request extension: the end of the request's wait budget, set by
/// [`Retry`](crate::retry::Retry) on the attempts it sends that carry no
/// [`TriedKeys`](crate::retry::TriedKeys) record (which keeps it otherwise), so that a routed request
/// waiting in [`KeyRotation`](crate::KeyRotation)'s response future stops where the
/// request's budget does, not a whole budget after its retry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitUntil(pub(crate) Instant);

/// A response extension: how long a routed request waited for a key in
/// [`KeyRotation`](crate::KeyRotation)'s response future (set only if it waited), for
/// [`Retry`](crate::retry::Retry) to count with its own waits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Waited(pub(crate) std::time::Duration);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_keeps_its_id_and_names_beyond_the_bound_share_the_overflow() {
        let buckets = Buckets::new(2);
        let a = buckets.intern("glm-4-plus");
        let b = buckets.intern("glm-4-flash");
        assert_eq!((a, b), (BucketId(1), BucketId(2)));
        assert_eq!(buckets.intern("glm-4-plus"), a);
        assert_eq!(buckets.intern("made-up-1"), buckets.overflow());
        assert_eq!(buckets.intern("made-up-2"), buckets.overflow());
        assert_eq!(buckets.overflow(), BucketId(3));
        assert_eq!(buckets.name(a).as_deref(), Some("glm-4-plus"));
        assert_eq!(buckets.name(BucketId::DEFAULT), None);
        assert_eq!(buckets.name(buckets.overflow()), None);
    }

    #[test]
    fn names_from_requests_take_few_ids_until_the_provider_accepts_them() {
        let buckets = Buckets::new(DEFAULT_MAX_BUCKETS);
        // The first few new names get buckets of their own at once...
        let early: Vec<BucketId> = (0..UNCONFIRMED)
            .map(|i| {
                let (id, candidate) = buckets.route(&format!("made-up-{i}"));
                assert_eq!(candidate, None);
                id
            })
            .collect();
        assert!(early.iter().all(|&id| id != buckets.overflow()));
        // ...then, while none of them is accepted, new names share the overflow bucket,
        // however many a caller makes up.
        for i in UNCONFIRMED..10_000 {
            let (id, candidate) = buckets.route(&format!("made-up-{i}"));
            assert_eq!(id, buckets.overflow());
            assert!(candidate.is_some());
        }
        assert_eq!(buckets.ids.load().len(), UNCONFIRMED);
        let candidates = buckets.candidates.lock().unwrap();
        assert!(candidates.current.len() + candidates.previous.len() <= 2 * CANDIDATES);
        drop(candidates);
        // A real model's first accepted request, sent in the overflow bucket, gives it a
        // bucket of its own.
        let (id, candidate) = buckets.route("glm-4-plus");
        assert_eq!(id, buckets.overflow());
        buckets.confirm(id);
        buckets.confirm_candidate(candidate.unwrap());
        let (own, candidate) = buckets.route("glm-4-plus");
        assert_eq!(candidate, None);
        assert_ne!(own, buckets.overflow());
        assert_eq!(buckets.name(own).as_deref(), Some("glm-4-plus"));
        // An early name accepted later frees its place for the next new name.
        buckets.confirm(early[0]);
        buckets.confirm(early[0]);
        let (next, candidate) = buckets.route("glm-4-flash");
        assert_eq!(candidate, None);
        assert_ne!(next, buckets.overflow());
        assert_eq!(buckets.route("glm-4-air").0, buckets.overflow());
    }

    #[test]
    fn a_candidate_in_use_outlives_a_flood_of_made_up_names() {
        let buckets = Buckets::new(DEFAULT_MAX_BUCKETS);
        for i in 0..UNCONFIRMED {
            buckets.route(&format!("taken-{i}"));
        }
        let (_, real) = buckets.route("gpt-4o");
        let made_up: Vec<u64> = (1..CANDIDATES)
            .map(|i| buckets.route(&format!("made-up-{i}")).1.unwrap())
            .collect();
        // The table turns over (the older generation goes) as made-up names keep coming...
        for i in 0..CANDIDATES {
            buckets.route(&format!("more-{i}"));
        }
        // ...but a name in use is noted again by its next request, which keeps it.
        buckets.route("gpt-4o");
        buckets.route("one-more");
        assert!(
            buckets
                .candidates
                .lock()
                .unwrap()
                .take(made_up[0])
                .is_none()
        );
        buckets.confirm_candidate(real.unwrap());
        let (own, candidate) = buckets.route("gpt-4o");
        assert_eq!(candidate, None);
        assert_eq!(buckets.name(own).as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn a_name_whose_hash_another_holds_keeps_an_id_of_its_own() {
        let buckets = Buckets::new(DEFAULT_MAX_BUCKETS);
        let first = buckets.intern("glm-4-plus");
        // Stand in for a crafted collision: "glm-4-plus"'s entry under "gpt-4o"'s hash.
        let mut ids = Ids::clone(&buckets.ids.load());
        let entry = ids.remove(&affinity_hash(b"glm-4-plus")).unwrap();
        ids.insert(affinity_hash(b"gpt-4o"), entry);
        buckets.ids.store(Arc::new(ids));
        let second = buckets.intern("gpt-4o");
        assert_ne!(second, first);
        assert_eq!(buckets.intern("gpt-4o"), second);
        assert_eq!(buckets.route("glm-4-plus"), (first, None));
        assert_eq!(buckets.name(second).as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn the_affinity_hash_is_stable_across_builds() {
        // Pinned values: replicas of different builds must agree on a session's keys. The
        // empty input's is XXH3's published test vector (xxhash's own sanity checks).
        assert_eq!(affinity_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(affinity_hash(b"session-1"), 0xc07e_a649_48c9_a305);
        assert_ne!(affinity_hash(b"session-1"), affinity_hash(b"session-2"));
    }
}
