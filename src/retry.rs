//! Send a refused request again, on another key or on the same key once it may take it,
//! within the request's wait budget.
//!
//! A provider's `429` is about one key, not about the request: another key usually takes
//! it at once, and the same key takes it once its rest (`Retry-After`) is over. Generic
//! retry policies resend on whatever key comes next, which is often the same one (and only
//! earns another `429`), and they answer with a response stripped of its `Retry-After` when
//! they give up. This module's policy
//!
//! - retries a `429` (or a `503` with `Retry-After`, which the pool reads as a rate limit),
//!   a `401`/`403` once, on a key not tried (if it serves the request, the refusing key is
//!   disabled; if it refuses it too, the request is to blame: its refusal is the answer and
//!   no key is disabled), or, once, a connection that failed before any byte was sent;
//!   never a response whose [`Outcome`](crate::classify::Outcome) says the
//!   key's quota is spent ([`QuotaExhausted`](crate::classify::Outcome::QuotaExhausted): billing, a
//!   daily quota; another key of the same account would not help) or that the platform as
//!   a whole is overloaded,
//! - sends the next attempt to a key the request has not tried, if one can take it now
//!   (the [`TriedKeys`] extension it puts on the request makes
//!   [`KeyRotation`](crate::KeyRotation) prefer such a key); else it **waits** for the
//!   earliest key that can: one freeing a slot, or a tried key whose own rest is over. It
//!   never sends on a key that is still resting,
//! - waits only within the request's **wait budget**
//!   ([`KeyPoolBuilder::max_wait`](crate::KeyPoolBuilder::max_wait), 30 s by default,
//!   counted from the request's arrival across all its attempts): when the earliest key
//!   comes back after the budget ends, the refusal goes back to the caller at once,
//! - only when the body can be sent again ([`ReplayBody`], buffered up to a size you choose),
//! - at most [`RetryLayer::max_retries`] times per request, and only while the shared
//!   [retry budget](tower::retry::budget::TpsBudget) allows, so that a storm of `429`s
//!   cannot multiply the load on the provider,
//! - and when it gives up, hands back the provider's last response untouched, with its
//!   `Retry-After` / `retry-after-ms` headers. A final answer that took more than one
//!   attempt, or waited, carries an [`Attempts`] extension.
//!
//! # Composition
//!
//! [`RetryLayer`] goes *outside* [`KeyRotationLayer`](crate::KeyRotationLayer), so each
//! attempt runs `poll_ready` again and reserves a key of its own:
//!
//! ```
//! use bytes::Bytes;
//! use http_body_util::Full;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_key_rotation::retry::{ReplayBody, RetryLayer};
//! use tower_key_rotation::{KeyPool, KeyRotationLayer, KeySet};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let pool = KeyPool::new(KeySet::parse("key-one,key-two")?);
//! # let client = tower::service_fn(|req: http::Request<ReplayBody<Full<Bytes>>>| async move {
//! #     // The first key is rate limited; the second is not.
//! #     let limited = req.headers()["authorization"] == "Bearer key-one";
//! #     let status = if limited { 429 } else { 200 };
//! #     Ok::<_, std::convert::Infallible>(
//! #         http::Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
//! #     )
//! # });
//! let mut service = ServiceBuilder::new()
//!     .layer(RetryLayer::new(pool.clone()).max_retries(2))
//!     .layer(KeyRotationLayer::new(pool.clone()))
//!     .service(client);
//!
//! // Buffer the body (up to 1 MiB) so that it can be sent again.
//! let body = ReplayBody::buffer(Full::new(Bytes::from("{}")), 1 << 20).await?;
//! let request = http::Request::post("http://provider.example/v4/chat/completions").body(body)?;
//! let response = service.ready().await?.call(request).await?;
//! assert_eq!(response.status(), 200); // key 1 answered 429, key 2 took it
//! # Ok(())
//! # }
//! ```

mod body;
pub mod future;
mod layer;
mod policy;
mod service;
mod tried;

use std::time::Duration;

pub use body::ReplayBody;
pub use layer::RetryLayer;
pub use policy::{RetryPolicy, is_connection_refused};
pub use service::Retry;
pub use tried::TriedKeys;

/// A response extension saying the request took more than one attempt, waited for a key,
/// or was refused and handed back because no key could take it again within its wait
/// budget: what a proxy needs to tell its clients not to retry again themselves (the
/// openai, anthropic and zhipuai SDKs obey `x-should-retry: false`). A client retrying
/// such an answer would stack its retries on the proxy's, or wait past the budget.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::retry::Attempts;
///
/// # let response = http::Response::new(());
/// if let Some(attempts) = response.extensions().get::<Attempts>() {
///     println!("{} attempts, {:?} waiting for a key", attempts.count(), attempts.waited());
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    pub(crate) count: u32,
    pub(crate) waited: Duration,
    pub(crate) no_key_in_time: bool,
}

impl Attempts {
    /// Attempts made, this one included.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Time spent waiting for a key, before the first attempt and between attempts.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Whether this refusal was handed back because no key could take the request again
    /// within its wait budget (the earliest key's rest ends later), or ever (all disabled).
    pub fn no_key_in_time(&self) -> bool {
        self.no_key_in_time
    }
}
