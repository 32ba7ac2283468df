//! [`Proxy`]: the proxy bound to its address, ready to serve.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tower_key_rotation::KeyPool;

use crate::config::{self, ProxyConfig};
use crate::error::StartError;
use crate::handler::{self, KeyNames};
use crate::keys::KeySource;
use crate::reload::{self, ReloadCounter, ReloadHandle};
use crate::{serve, shared, upstream};

/// The proxy, listening: its keys loaded, its workers' listeners bound and their upstream
/// clients built. [`Proxy::serve`] runs it.
///
/// # Examples
///
/// ```no_run
/// use forward_proxy::{Proxy, ProxyConfig};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = ProxyConfig::new("https://open.bigmodel.cn/api/paas/v4".parse()?);
/// let proxy = Proxy::bind(config).await?;
/// println!("listening on {}", proxy.local_addr());
/// proxy.serve(async { let _ = tokio::signal::ctrl_c().await; }).await;
/// # Ok(())
/// # }
/// ```
pub struct Proxy {
    workers: Vec<(std::net::TcpListener, handler::State)>,
    limits: serve::Limits,
    local_addr: SocketAddr,
    pool: KeyPool,
    keys: KeySource,
    /// The key file's fingerprint when its keys were read (see `reload`).
    fingerprint: Option<u64>,
    keys_file_poll: std::time::Duration,
    reloads: ReloadHandle,
    reload_counter: ReloadCounter,
    key_names: Arc<KeyNames>,
}

impl Proxy {
    /// Reads the keys (`.env`, the key variable or file, the access token), connects to
    /// Redis when asked, binds the listening address (one listener per worker) and builds
    /// each worker's upstream client. Logs the keys loaded and the address it listens on.
    ///
    /// Call it within a tokio runtime; the workers get runtimes of their own when served.
    ///
    /// # Errors
    ///
    /// A [`StartError`] naming the flag, file or variable at fault: keys missing or
    /// invalid, an unreadable CA file, an address that cannot be bound, Redis refusing
    /// its certificate.
    pub async fn bind(config: ProxyConfig) -> Result<Self, StartError> {
        let secrets = config::load_secrets(&config)?;
        let pool = shared::apply(&config.redis, config.pool_builder(secrets.keys))
            .await?
            .build();
        tracing::info!(
            "Loaded {} API key(s) from {}{}",
            pool.len(),
            secrets.source,
            key_names(&pool)
        );

        let extra_roots = match &config.upstream_ca {
            Some(path) => config::load_ca("--upstream-ca", path)?,
            None => Vec::new(),
        };
        let upstream_options = upstream::Options::new(&config, extra_roots);
        let upstream = upstream::build(&pool, upstream_options.clone())?;

        let listener = config.listen.bind().await?;
        let listen = listener
            .local_addr()
            .map_err(|e| StartError::caused(format!("cannot listen on {}", config.listen), e))?;
        let workers = config
            .workers
            .map_or_else(serve::available_cores, usize::from);
        let listeners = serve::listeners(listener, workers)?;
        if secrets.access_token.is_none() && !listen.ip().is_loopback() {
            tracing::warn!(
                "listening on {listen} without --access-token-env: anyone who can reach this \
                 address uses your API keys"
            );
        }
        let upstream_url = &config.upstream;
        tracing::info!(
            "Listening on http://{listen}, forwarding to {}://{}{}/",
            upstream_url.scheme,
            upstream_url.authority,
            upstream_url.prefix
        );

        // In the background: a slow resolver does not hold up the start.
        tokio::spawn({
            let upstream = config.upstream.clone();
            async move { upstream.warn_if_unresolved().await }
        });

        let state = handler::State::new(
            &config,
            pool.clone(),
            upstream,
            secrets.access_token,
            listen,
        );
        let reload_counter = state.metrics.reloads();
        let key_names = state.key_names.clone();
        // Each worker its own upstream client, so that its connections stay on its thread.
        let mut states = vec![state];
        while states.len() < listeners.len() {
            let upstream = upstream::build(&pool, upstream_options.clone())?;
            states.push(handler::State {
                upstream,
                ..states[0].clone()
            });
        }
        Ok(Self {
            workers: listeners.into_iter().zip(states).collect(),
            limits: serve::Limits {
                shutdown_timeout: config.shutdown_timeout,
                header_read_timeout: config.header_read_timeout,
            },
            local_addr: listen,
            pool,
            keys: secrets.source,
            fingerprint: secrets.fingerprint,
            keys_file_poll: config.keys_file_poll,
            reloads: ReloadHandle::default(),
            reload_counter,
            key_names,
        })
    }

    /// The address the proxy listens on (its port chosen by the system when the
    /// configuration asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The pool of keys the proxy spreads requests over.
    pub fn pool(&self) -> &KeyPool {
        &self.pool
    }

    /// A handle that makes the proxy read its keys again (the binary calls it on SIGHUP).
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reloads.clone()
    }

    /// Serves requests, one worker thread (with a runtime of its own) per listener, until
    /// `shutdown` resolves; then stops accepting and lets the requests in flight finish
    /// within the shutdown timeout. Reloads the keys when asked ([`Proxy::reload_handle`])
    /// and when the key file changes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        tokio::spawn(reload::run(
            self.pool.clone(),
            self.keys,
            self.fingerprint,
            self.keys_file_poll,
            self.reloads,
            self.reload_counter,
            self.key_names,
        ));
        serve::run(self.workers, self.limits, shutdown).await;
    }

    /// The first worker's state, for serving a connection in process.
    #[cfg(feature = "fuzzing")]
    pub(crate) fn state(&self) -> Arc<handler::State> {
        Arc::new(self.workers[0].1.clone())
    }
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("local_addr", &self.local_addr)
            .field("workers", &self.workers.len())
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// `: 1 (paid), 2 (free)` when keys have names, for the start-up line; never a value.
fn key_names(pool: &KeyPool) -> String {
    let named: Vec<String> = pool
        .snapshot()
        .iter()
        .filter_map(|key| Some(format!("{} ({})", key.position, key.name.as_ref()?)))
        .collect();
    if named.is_empty() {
        String::new()
    } else {
        format!(": {}", named.join(", "))
    }
}
