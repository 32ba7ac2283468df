//! Spread HTTP requests over several API keys of a rate-limited service.
//!
//! Providers such as Zhipu BigModel, OpenAI, Anthropic and Gemini limit each key (requests
//! per minute, concurrent requests). [`KeyRotationLayer`] is a tower middleware that puts a
//! key from a shared [`KeyPool`] on every outgoing [`http::Request`], chosen round-robin or
//! by least-in-flight, and whose `poll_ready` rests any key that answered `429` (honouring
//! `Retry-After`), so callers wait for capacity instead of failing.
//!
//! Providers limit per account or organisation, so rotating keys adds capacity only when the
//! keys belong to different accounts.
//!
//! # Example
//!
//! A hyper-util client whose requests carry keys in rotation:
//!
//! ```
//! use http_body_util::{BodyExt, Empty};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use tower_key_rotation::{KeyPool, KeyRotationLayer, KeySet, Selection};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! # let upstream = start_upstream().await;
//! let keys = KeySet::parse("key-one, key-two, key-three")?; // or KeySet::from_env("BIGMODEL_API_KEY")
//! let pool = KeyPool::builder(keys)
//!     .selection(Selection::RoundRobin)
//!     .max_in_flight_per_key(4)
//!     .build();
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
//! let mut service = ServiceBuilder::new()
//!     .layer(KeyRotationLayer::new(pool.clone()))
//!     .service(client);
//!
//! for _ in 0..3 {
//!     let request = http::Request::get(format!("http://{upstream}/v4/models")).body(Empty::new())?;
//!     let response = service.ready().await?.call(request).await?;
//!     let body = response.into_body().collect().await?.to_bytes();
//!     println!("{}", String::from_utf8_lossy(&body));
//! }
//! assert!(pool.snapshot().iter().all(|key| key.requests == 1 && key.in_flight == 0));
//! # Ok(())
//! # }
//! # async fn start_upstream() -> std::net::SocketAddr {
//! #     let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! #     let addr = listener.local_addr().unwrap();
//! #     tokio::spawn(async move {
//! #         loop {
//! #             let (stream, _) = listener.accept().await.unwrap();
//! #             tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(
//! #                 hyper_util::rt::TokioIo::new(stream),
//! #                 hyper::service::service_fn(|_req| async {
//! #                     Ok::<_, std::convert::Infallible>(http::Response::new(
//! #                         http_body_util::Full::new(bytes::Bytes::from("ok")),
//! #                     ))
//! #                 }),
//! #             ));
//! #         }
//! #     });
//! #     addr
//! # }
//! ```
//!
//! # Composition order
//!
//! - **Retry goes outside** `KeyRotation` ([`retry::RetryLayer`]), so each attempt runs
//!   `poll_ready` again and can take another key, or wait for one.
//! - **Redirects are followed inside, or not at all**: a key must never ride a redirect to
//!   another host. The provider's `Location` is best handed back to the caller.
//! - **One pool per set of keys.** Every service built from the same layer (or the same
//!   [`KeyPool`]) shares the keys' state. Building a pool per connection or per task would
//!   silently stop limiting.
//!
//! # What happens on each response
//!
//! The pool's [`Classifier`](classify::Classifier) (default [`classify::generic`]) turns the
//! response into an
//! [`Outcome`](classify::Outcome):
//!
//! | response | outcome | effect on the key |
//! | --- | --- | --- |
//! | 429 with `Retry-After` / `retry-after-ms` | rate limited | cools down for that long (capped) |
//! | 429 without | rate limited | cools down for an exponential, jittered backoff |
//! | 2xx whose rate-limit headers say `remaining: 0` | limit reached | rests until the window resets ([`learned_reset`](classify::learned_reset), capped as `Retry-After`) |
//! | 503 with `Retry-After` | rate limited | cools down for that long |
//! | 401, 403 | rejected | counted; disabled only by contrast: when the same request then succeeds on another key ([`RejectedKey`], done by the [`retry`] layer) |
//! | other 5xx, transport error | failure | counted only |
//! | an error before the provider (DNS, connect, TLS) | none | not counted ([`Classifier::unreached_if`](classify::Classifier::unreached_if)) |
//! | anything else | success | backoff level reset |
//!
//! A cool-down deadline only ever extends; only a 429 to a request sent after the key's
//! last cool-down began raises the backoff level (requests already in flight do not
//! escalate it). When a cool-down ends, the key takes one probe request before the rest
//! (so waiters do not all rush a key whose limit still holds); a rest until a used-up
//! window resets, as its headers said, ends with the key whole, with no probe. A 429 that comes back while
//! other requests are in flight on the key also teaches the pool the key's **concurrency
//! limit** ([`KeyPoolBuilder::learn_concurrency`]): later callers wait for a slot instead
//! of being refused.
//!
//! # Waiting instead of failing
//!
//! A caller waits for a key, within a **wait budget** ([`KeyPoolBuilder::max_wait`],
//! 30 s by default) counted from its arrival across all its attempts. `poll_ready` never
//! fails for want of a key (tower would then drop the service, and behind `Buffer` for
//! good): when no key can come back within the budget (decided at once, from the earliest
//! rest end or quota refill) the call fails with [`NoKeyAvailable`] and its
//! `retry_after`, and when every key is disabled with [`AllKeysDisabled`]. The
//! [`retry`] layer sends a refused request again on a key it has not tried, or waits for
//! the earliest key back, within the same budget; so with default settings, callers see
//! no 429 while capacity comes back within their budget.
//!
//! The [provider profiles](classify) ([`Classifier::bigmodel`](classify::Classifier::bigmodel), [`Classifier::openai`](classify::Classifier::openai),
//! [`Classifier::anthropic`](classify::Classifier::anthropic)) also read the small JSON error body, because status codes
//! alone misclassify: Zhipu's `1305` "overloaded" 429 is not the key's fault, OpenAI's
//! `insufficient_quota` 429 is a spent quota ([`Outcome::QuotaExhausted`](classify::Outcome::QuotaExhausted): a long rest,
//! then one probe), and a 429 about the *account* ([`Outcome::AccountLimited`](classify::Outcome::AccountLimited)) rests every
//! key of that account.
//!
//! # Staying under the limits
//!
//! Bouncing off a limit costs a round trip and, with some providers, counts against the
//! key. The pool can keep requests the provider would refuse from being sent at all:
//!
//! - a per-key **cap** on requests in flight ([`KeyPoolBuilder::max_in_flight_per_key`]);
//! - a per-key **quota** of requests per period ([`Quota`], [`KeyPoolBuilder::quota_per_key`]):
//!   callers wait for the earliest key with quota;
//! - **learned limits**: the providers' rate-limit headers rest a key before it is refused;
//! - a **token quota** per key and bucket ([`TokenQuota`],
//!   [`KeyPoolBuilder::token_quota_per_key`], or learned from the token headers): a request
//!   whose [`Router`](route::Router) gives it a token cost waits until its tokens fit, fails
//!   at once with [`CostTooLarge`] if they never can, and is settled from its answer's usage
//!   ([`pool::TokenReservation`]);
//! - per-key **settings** ([`KeySpec`]): a name for logs, a **weight** (smooth weighted
//!   round-robin, as nginx does it), its own cap and quota, and the **account** it belongs
//!   to;
//! - **hot reload** ([`KeyPool::reload`]): add, remove or replace keys at run time; unchanged
//!   keys keep their state and removed keys finish their requests in flight.
//!
//! ```
//! use std::time::Duration;
//! use tower_key_rotation::{ApiKey, KeyPool, KeySet, KeySpec, Quota, Selection};
//!
//! # fn main() -> Result<(), tower_key_rotation::KeyError> {
//! let keys = KeySet::from_specs([
//!     KeySpec::new(ApiKey::new("sk-team-a")?).name("team-a").weight(2).account("org-a"),
//!     KeySpec::new(ApiKey::new("sk-team-b")?).name("team-b").account("org-b"),
//! ])?;
//! let pool = KeyPool::builder(keys)
//!     .selection(Selection::LeastInFlight)
//!     .max_in_flight_per_key(4)                 // the provider's concurrency per key
//!     .quota_per_key(Quota::per_minute(60))     // and its requests per minute
//!     .build();
//! assert_eq!(pool.snapshot()[0].name.as_deref(), Some("team-a"));
//! # Ok(())
//! # }
//! ```
//!
//! # Several replicas
//!
//! A pool is one process's. Replicas that must respect the same limits share their keys'
//! state through a [`shared::StateBackend`] ([`KeyPoolBuilder::state_backend`]): the Redis
//! one, `shared::redis::RedisBackend`, comes with the cargo feature `redis` (off by
//! default). Rests and disables then reach every replica by pub/sub and are read locally;
//! a request on a key with a cap is admitted by the store (one round trip; if the key is
//! full it waits in the key's queue there, in arrival order across the replicas) so that
//! the replicas together keep the cap. See [`shared`].
//!
//! # Secrets
//!
//! Key values never appear in `Debug`, `Display`, errors or logs: keys are named by
//! position (`key 2/3`). Header values are marked sensitive and wiped when dropped.
//!
//! # Logging
//!
//! With [`tracing`](https://docs.rs/tracing): a `debug` event `Using key 2/3` per request,
//! a `warn` event when a key starts a cool-down (for how long and why), is suspended or is
//! disabled, an `info` event when keys are reloaded.

// docs.rs (`--cfg docsrs`, nightly): mark what a feature gates.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod auth;
mod backoff;
pub mod body;
pub mod classify;
mod error;
pub mod future;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod human;
mod key;
mod layer;
pub mod pool;
mod pool_time;
mod quota;
pub mod retry;
pub mod route;
mod service;
pub mod shared;
mod sync;
mod tokens;
mod weights;

pub use auth::Placement;
pub use backoff::Backoff;
pub use error::{AllKeysDisabled, CostTooLarge, NoKeyAvailable};
pub use key::{ApiKey, ByteKind, KeyError, KeySet, KeySpec};
pub use layer::KeyRotationLayer;
pub use pool::{KeyPool, KeyPoolBuilder, RejectedKey, Selection};
pub use quota::Quota;
pub use service::KeyRotation;
pub use tokens::TokenQuota;

/// Compiles the README's examples as doctests, so the quick start cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The boxed error type of [`KeyRotation`]: the inner service's error, [`NoKeyAvailable`]
/// or [`AllKeysDisabled`].
///
/// Tower's own, re-exported: the same type its `Buffer`, `Retry` and `Timeout` return, so
/// `tower::BoxError` and `tower_key_rotation::BoxError` name one item.
pub use tower::BoxError;
