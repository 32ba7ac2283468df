//! [`KeyRotationLayer`]: applies [`KeyRotation`] to a service.

use std::fmt;

use tower_layer::Layer;

use crate::auth::Placement;
use crate::pool::KeyPool;
use crate::service::KeyRotation;

/// Puts a key from a shared [`KeyPool`] on every request of the wrapped service.
///
/// Every service this layer builds shares the same pool, so the keys' limits hold across
/// clones, connections and tasks (a per-service pool behind axum or `Buffer` would silently
/// stop limiting). Cloning the layer is cheap.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::{KeyPool, KeyRotationLayer, KeySet, Placement};
///
/// let pool = KeyPool::new(KeySet::parse("k1,k2,k3").unwrap());
/// let layer = KeyRotationLayer::new(pool.clone())
///     .placement(Placement::header(http::HeaderName::from_static("x-api-key")));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct KeyRotationLayer {
    pool: KeyPool,
    placement: Placement,
}

impl KeyRotationLayer {
    /// A layer over `pool`, placing keys as `Authorization: Bearer <key>`.
    pub fn new(pool: KeyPool) -> Self {
        Self {
            pool,
            placement: Placement::default(),
        }
    }

    /// Where keys go on the request (default [`Placement::bearer`]).
    pub fn placement(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    /// The shared pool.
    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }
}

impl<S> Layer<S> for KeyRotationLayer {
    type Service = KeyRotation<S>;

    fn layer(&self, inner: S) -> Self::Service {
        KeyRotation::from_parts(inner, self.pool.clone(), self.placement.clone())
    }
}

impl fmt::Debug for KeyRotationLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRotationLayer")
            .field("pool", &self.pool)
            .field("placement", &self.placement)
            .finish()
    }
}
