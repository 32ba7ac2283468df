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
//! use tower_key_rotation::{KeyPool, KeyRotationLayer, KeySet, Strategy};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! # let upstream = start_upstream().await;
//! let keys = KeySet::parse("key-one, key-two, key-three")?; // or KeySet::from_env("BIGMODEL_API_KEY")
//! let pool = KeyPool::builder(keys)
//!     .strategy(Strategy::RoundRobin)
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
//! - **Retry goes outside** `KeyRotation`, so each attempt runs `poll_ready` again and can
//!   take another key.
//! - **Redirects are followed inside, or not at all**: a key must never ride a redirect to
//!   another host. The provider's `Location` is best handed back to the caller.
//! - **One pool per set of keys.** Every service built from the same layer (or the same
//!   [`KeyPool`]) shares the keys' state. Building a pool per connection or per task would
//!   silently stop limiting.
//!
//! # What happens on each response
//!
//! The pool's [`Classifier`] (default [`classify`]) turns status and headers into an
//! [`Outcome`]:
//!
//! | response | outcome | effect on the key |
//! | --- | --- | --- |
//! | 429 with `Retry-After` / `retry-after-ms` | rate limited | cools down for that long (capped) |
//! | 429 without | rate limited | cools down for an exponential, jittered backoff |
//! | 401, 403 | rejected | disabled |
//! | 5xx, transport error | failure | counted only |
//! | anything else | success | backoff level reset |
//!
//! A cool-down deadline only ever extends; only a 429 to a request sent after the key's
//! last cool-down began raises the backoff level (requests already in flight do not
//! escalate it). A cooling or disabled key is simply not ready: `poll_ready` returns an
//! error only when every key is disabled.
//!
//! # Secrets
//!
//! Key values never appear in `Debug`, `Display`, errors or logs: keys are named by
//! position (`key 2/3`). Header values are marked sensitive and wiped when dropped.
//!
//! # Logging
//!
//! With [`tracing`](https://docs.rs/tracing): a `debug` event `Using key 2/3` per request,
//! a `warn` event when a key cools down (for how long and why) or is disabled.

mod auth;
mod backoff;
pub mod body;
mod error;
pub mod future;
mod key;
mod layer;
mod limits;
mod outcome;
mod pool;
pub mod profile;
mod quota;
pub mod retry;
mod service;
mod stats;
mod tried;
mod weights;

pub use auth::Placement;
pub use backoff::{Backoff, parse_retry_after, retry_after};
pub use error::AllKeysDisabled;
pub use key::{ApiKey, ByteKind, KeyError, KeySet, KeySpec};
pub use layer::KeyRotationLayer;
pub use limits::{learned_reset, parse_go_duration, parse_rfc3339};
pub use outcome::{Classifier, Outcome, classify};
pub use pool::{KeyPool, KeyPoolBuilder, Lease, ReloadSummary, Strategy, Waiter};
pub use quota::Quota;
pub use service::KeyRotation;
pub use stats::KeyStats;
pub use tried::TriedKeys;

/// Compiles the README's examples as doctests, so the quick start cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The boxed error type of [`KeyRotation`]: the inner service's error, or
/// [`AllKeysDisabled`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
