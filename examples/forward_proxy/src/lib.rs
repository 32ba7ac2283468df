//! A forward proxy that spreads requests over several API keys of one provider, built on
//! `tower_key_rotation`: every backend process talks to this proxy, and the proxy shares
//! one pool of keys among them, resting keys that answered 429 and retrying such requests
//! on a key they have not tried.
//!
//! The `forward_proxy` binary is this crate behind a command line; the same proxy can be
//! run from code:
//!
//! ```no_run
//! use forward_proxy::{KeysFrom, Proxy, ProxyConfig};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = ProxyConfig::new("https://open.bigmodel.cn/api/paas/v4".parse()?);
//! config.listen = "127.0.0.1:8080".parse()?;
//! config.keys = KeysFrom::Env("BIGMODEL_API_KEY".to_owned());
//! let proxy = Proxy::bind(config).await?;
//! proxy.serve(async { let _ = tokio::signal::ctrl_c().await; }).await;
//! # Ok(())
//! # }
//! ```
//!
//! A key file names each key and takes its value from an environment variable or a file
//! ([`KeysFrom::File`]):
//!
//! ```toml
//! [[key]]
//! name = "paid"            # required, unique: logs and /_keyrotation/keys show it
//! env = "PAID_KEY"         # the value: exactly one of env, file or value
//! weight = 3               # share of requests (default 1)
//! rpm = 500                # requests per minute sent with this key, at most
//! max_in_flight = 8        # requests in flight with this key, at most
//! account = "acme"         # keys of one account share its limit
//! ```
//!
//! One module per job: `proxy` ([`Proxy`]) and `config` ([`ProxyConfig`], and the
//! secrets it names), `error` ([`StartError`]); `dotenv` (`.env`), `keys` (the key file),
//! `reload` (reloads on request and on key file changes); `handler` (one request: admit,
//! rewrite, log, abandon, the client's body), `answer` (the proxy's own answers), `admin`
//! and `metrics`; `upstream` (the client stack), `connections` (each worker's upstream
//! connections), `tls` (certificate checks, failures in words), `attempts` (each
//! attempt's time, for the log), `shared` (replicas sharing keys' state through Redis);
//! `serve` runs the workers (one runtime per core) and their shutdown; `detect` tells
//! HTTP/2 from HTTP/1.x on a client connection; `h1` is the proxy's own HTTP/1.1 (the
//! clients' `h1::server`, the upstream's `h1::client`, their `h1::codec`), `h2` hyper's
//! HTTP/2 on both sides.

mod admin;
mod answer;
mod attempts;
mod config;
mod connections;
mod detect;
mod dotenv;
mod error;
mod h1;
mod h2;
mod handler;
mod keys;
mod metrics;
mod proxy;
mod reload;
mod route;
mod serve;
mod shared;
mod tls;
mod upstream;
mod usage;

pub use config::{
    AffinityConfig, KeysFrom, ListenAddr, LogFormat, ParseError, Profile, ProxyConfig, TokenBudget,
    UpstreamUrl,
};
pub use error::StartError;
pub use proxy::Proxy;
pub use reload::ReloadHandle;
pub use route::Routing;
pub use shared::{RedisConfig, RedisUrl};

/// The crate's internals the fuzz targets drive (`fuzz/`): not an API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
