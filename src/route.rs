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
//!   call(request) ──► Router reads its head ──► Route { bucket, affinity }
//!        ├─ a key can take this route now ──► its header goes on, the request goes
//!        └─ none can ──► the response future waits for one, within the wait budget,
//!                        holding the readied inner service (a clone stays behind)
//! ```
//!
//! A pool without a router reserves in `poll_ready`, as tower's own limits do, at no
//! extra cost.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
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

/// What a request asks of the pool: the bucket it is metered in, and its session's
/// affinity hash. `Copy`, and made without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Route {
    pub(crate) bucket: BucketId,
    pub(crate) affinity: Option<u64>,
}

impl Route {
    /// The default bucket, no affinity: what a pool without a router uses.
    pub const ANY: Self = Self {
        bucket: BucketId::DEFAULT,
        affinity: None,
    };

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

/// Bucket names interned into small ids: a lookup of a known name reads one map and
/// allocates nothing; a new name takes a lock once. Bounded: names beyond `max` share
/// the overflow id, so a caller inventing model names cannot grow the pool's state.
pub(crate) struct Buckets {
    ids: ArcSwap<HashMap<Box<str>, BucketId, BuildHasherDefault<NameHasher>>>,
    /// Names by id (index 0: the default bucket's, empty); serialises additions.
    names: Mutex<Vec<Arc<str>>>,
    max: usize,
}

impl Buckets {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            ids: ArcSwap::from_pointee(HashMap::default()),
            names: Mutex::new(vec![Arc::from("")]),
            max,
        }
    }

    /// The id of the overflow bucket.
    pub(crate) fn overflow(&self) -> BucketId {
        BucketId(u16::try_from(self.max + 1).unwrap_or(u16::MAX))
    }

    /// The id of the bucket named `name`, added if new and within the bound.
    pub(crate) fn intern(&self, name: &str) -> BucketId {
        if let Some(&id) = self.ids.load().get(name) {
            return id;
        }
        self.add(name)
    }

    #[cold]
    fn add(&self, name: &str) -> BucketId {
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        let ids = self.ids.load();
        if let Some(&id) = ids.get(name) {
            return id;
        }
        if names.len() > self.max {
            return self.overflow();
        }
        let id = BucketId(u16::try_from(names.len()).unwrap_or(u16::MAX));
        names.push(Arc::from(name));
        let mut next = HashMap::clone(&ids);
        next.insert(Box::from(name), id);
        self.ids.store(Arc::new(next));
        id
    }

    /// The name of bucket `id` (`None` for the default and overflow buckets).
    pub(crate) fn name(&self, id: BucketId) -> Option<Arc<str>> {
        if id == BucketId::DEFAULT {
            return None;
        }
        let names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        names.get(id.index()).cloned()
    }
}

/// The hasher of the interned bucket names: XXH3 over each name at once (a short name in
/// ~20 instructions, where SipHash takes ~200: a bucket's name is looked up on every
/// request). Without SipHash's keyed defence against chosen collisions, which a map of at
/// most [`DEFAULT_MAX_BUCKETS`]-odd names (new names beyond the bound never enter it)
/// does not need.
#[derive(Debug, Default)]
pub(crate) struct NameHasher(u64);

impl Hasher for NameHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    #[inline]
    fn write_u8(&mut self, byte: u8) {
        // `str`'s terminator.
        self.0 = self.0.rotate_left(5) ^ u64::from(byte);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
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
/// [`Retry`](crate::retry::Retry) on the attempts it sends, so that a routed request
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
    fn the_affinity_hash_is_stable_across_builds() {
        // Pinned values: replicas of different builds must agree on a session's keys. The
        // empty input's is XXH3's published test vector (xxhash's own sanity checks).
        assert_eq!(affinity_hash(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(affinity_hash(b"session-1"), 0xc07e_a649_48c9_a305);
        assert_ne!(affinity_hash(b"session-1"), affinity_hash(b"session-2"));
    }
}
