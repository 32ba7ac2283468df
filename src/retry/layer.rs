//! [`RetryLayer`]: configures and applies [`Retry`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower::retry::budget::TpsBudget;
use tower_layer::Layer;

use crate::BoxError;
use crate::pool::KeyPool;
use crate::retry::policy::{RetryPolicy, is_connection_refused};
use crate::retry::service::Retry;

/// Sends a refused request (`429`, rejected key, not connected) again, on a key it has not
/// tried or on the earliest key back within the request's wait budget.
///
/// Put it outside [`KeyRotationLayer`](crate::KeyRotationLayer), over the same pool. What
/// bounds a request is the pool's wait budget
/// ([`KeyPoolBuilder::max_wait`](crate::KeyPoolBuilder::max_wait)); the defaults here only
/// stop pathologies: at most 10 retries per request, and a retry budget of 20% extra
/// requests over a 10 s window, with at least 10 retries a second allowed, so that a storm
/// of refusals cannot multiply the load on the provider. Cloning is cheap; every clone
/// shares the retry budget.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower::retry::budget::TpsBudget;
/// use tower_key_rotation::retry::RetryLayer;
/// use tower_key_rotation::{KeyPool, KeySet};
///
/// let pool = KeyPool::new(KeySet::parse("k1,k2,k3").unwrap());
/// let layer = RetryLayer::new(pool)
///     .max_retries(2)
///     .budget(TpsBudget::new(Duration::from_secs(10), 10, 0.2));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RetryLayer {
    policy: RetryPolicy,
}

impl RetryLayer {
    /// A layer retrying on the keys of `pool`, with the default limits.
    pub fn new(pool: KeyPool) -> Self {
        Self {
            policy: RetryPolicy {
                pool,
                max_retries: 10,
                budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
                retry_error: Arc::new(is_connection_refused),
                retries: 0,
                no_key_in_time: false,
                suspect: None,
                reconnected: false,
            },
        }
    }

    /// At most `max` retries per request (so `max + 1` attempts); `0` turns retrying off.
    pub fn max_retries(mut self, max: usize) -> Self {
        self.policy.max_retries = max;
        self
    }

    /// The retry budget shared by every request through this layer (see
    /// [`TpsBudget::new`]): retries beyond it are not made.
    pub fn budget(mut self, budget: TpsBudget) -> Self {
        self.policy.budget = Arc::new(budget);
        self
    }

    /// Which errors of the inner service are worth a retry (default
    /// [`is_connection_refused`]). Only errors raised before any byte of the request was
    /// sent should qualify: the provider may have acted on anything else.
    pub fn retry_error_if(mut self, f: impl Fn(&BoxError) -> bool + Send + Sync + 'static) -> Self {
        self.policy.retry_error = Arc::new(f);
        self
    }

    /// The policy each [`Retry`] service starts from.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .finish()
    }
}
