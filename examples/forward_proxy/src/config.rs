//! [`ProxyConfig`]: what the proxy is told at start, validated; and reading the secrets it
//! names (`.env`, the keys, the access token) when it starts.

use crate::route::{ProxyRouter, Routing};
use std::net::{IpAddr, SocketAddr};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderName, Uri};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use subtle::ConstantTimeEq;
use tower_key_rotation::{
    KeyPool, KeyPoolBuilder, KeySet, Placement, Quota, Selection, TokenQuota, classify::Classifier,
};
use zeroize::Zeroizing;

use crate::dotenv::DotEnv;
use crate::error::StartError;
use crate::keys::{self, KeySource};
use crate::shared::RedisConfig;

/// Everything the proxy needs to start: where it listens, where it forwards, where its
/// keys come from, its limits and timeouts.
///
/// [`ProxyConfig::new`] gives the defaults the command line has; change the fields from
/// there.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use forward_proxy::{KeysFrom, ProxyConfig};
///
/// let mut config = ProxyConfig::new("https://open.bigmodel.cn/api/paas/v4".parse()?);
/// config.listen = "127.0.0.1:0".parse()?;
/// config.keys = KeysFrom::Env("MY_KEYS".to_owned());
/// config.max_wait = Duration::from_secs(10);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProxyConfig {
    /// The address to listen on (`--listen`).
    pub listen: ListenAddr,
    /// Worker threads, each with its own listener and upstream connections (`--workers`);
    /// `None`: one per available core.
    pub workers: Option<NonZeroUsize>,
    /// The variable holding the token clients must present (`--access-token-env`); `None`:
    /// every client that reaches the proxy is served.
    pub access_token_env: Option<String>,
    /// Where the keys come from (`--keys-env`, `--keys-file`).
    pub keys: KeysFrom,
    /// How often to look for key file changes (`--keys-file-poll`); zero: never.
    pub keys_file_poll: Duration,
    /// How a key is chosen (`--strategy`).
    pub selection: Selection,
    /// The provider's base URL (`--upstream`).
    pub upstream: UpstreamUrl,
    /// The provider: how its answers are read, and the shape of the proxy's own errors
    /// (`--profile`).
    pub profile: Profile,
    /// Where the key goes (`--auth`); `None`: the profile's own placement.
    pub placement: Option<Placement>,
    /// A PEM file of CA certificates trusted besides the public roots (`--upstream-ca`).
    pub upstream_ca: Option<PathBuf>,
    /// At most this many requests in flight per key (`--max-in-flight-per-key`).
    pub max_in_flight_per_key: Option<NonZeroU32>,
    /// At most this many requests a minute per key (`--rpm-per-key`).
    pub rpm_per_key: Option<NonZeroU32>,
    /// How long a request may wait for a key, across its retries (`--max-wait`).
    pub max_wait: Duration,
    /// How many times a refused request is sent again (`--retries`).
    pub retries: usize,
    /// Learn each key's concurrency limit from its 429s (not `--no-learn-concurrency`).
    pub learn_concurrency: bool,
    /// Request bodies up to this many bytes are kept for a retry (`--retry-body-limit`).
    pub retry_body_limit: usize,
    /// Larger request bodies are refused with a 413 (`--max-body-size`).
    pub max_body_size: u64,
    /// Replicas sharing their keys' state through Redis (`--redis-*`).
    pub redis: RedisConfig,
    /// The access log's format (`--log-format`).
    pub log_format: LogFormat,
    /// Give up connecting to the upstream after this long (`--connect-timeout`).
    pub connect_timeout: Duration,
    /// Give up waiting for the upstream's response head after this long
    /// (`--request-timeout`).
    pub request_timeout: Duration,
    /// Close a connection whose request head is this slow, or idle this long
    /// (`--header-read-timeout`).
    pub header_read_timeout: Duration,
    /// How long requests in flight may take to finish at shutdown (`--shutdown-timeout`).
    pub shutdown_timeout: Duration,
    /// How long an upstream request whose client went away is kept (`--abandoned-grace`).
    pub abandoned_grace: Duration,
    /// What requests are routed by within the pool: model buckets, session affinity.
    pub routing: Routing,
    /// Count the tokens each key's answers report (`--count-tokens`): read `usage` from
    /// each successful answer's body, JSON or event stream. With [`Profile::Openai`], a
    /// chat completions stream that did not ask for usage is sent asking
    /// (`stream_options.include_usage`), and what that adds to the stream is taken out
    /// again: the client gets the bytes it would have got.
    pub count_tokens: bool,
    /// Token budgets (`--tpm`, `--token-window`, `--default-output-tokens`): see
    /// [`TokenBudget`].
    pub tokens: TokenBudget,
    /// How a session waits for, spills from, and is remembered on its key
    /// (`--affinity-wait`, `--affinity-ttl`, `--affinity-sessions`).
    pub affinity: AffinityConfig,
}

/// Token budgets: while the proxy counts tokens ([`ProxyConfig::count_tokens`]) and
/// routes requests, each request reserves its estimated input plus the output it allows
/// from its key × model's token quota, and settles with the usage its answer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenBudget {
    /// Tokens per [`window`](Self::window) per key × model (`--tpm`); `None`: learned from
    /// the provider's headers.
    pub tpm: Option<std::num::NonZeroU64>,
    /// The window of the token limits (`--token-window`, a minute).
    pub window: Duration,
    /// The output reserved for a request that names no limit (`--default-output-tokens`).
    pub default_output: u64,
}

impl Default for TokenBudget {
    /// Learned limits, per minute, 4,096 output tokens by default.
    fn default() -> Self {
        Self {
            tpm: None,
            window: Duration::from_secs(60),
            default_output: crate::usage::estimate::DEFAULT_OUTPUT_TOKENS,
        }
    }
}

impl TokenBudget {
    /// Do requests carry a token cost? Only while tokens are counted (settlement reads the
    /// answers' usage) and requests are routed (the cost is read before a key is taken).
    pub(crate) fn is_on(config: &ProxyConfig) -> bool {
        config.count_tokens && config.routing.is_on()
    }
}

/// Prompt-cache affinity's settings beyond [`Routing::affinity`] (`--affinity-wait`,
/// `--affinity-ttl`, `--affinity-sessions`): see the manual's "Prompt-cache affinity".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AffinityConfig {
    /// How long a request waits for its session's key when it comes back soon.
    pub wait: Duration,
    /// How long a spilled session is remembered after its last request.
    pub ttl: Duration,
    /// Spilled sessions remembered at most.
    pub sessions: usize,
}

impl Default for AffinityConfig {
    /// 0.5 s, 5 minutes, 131,072 sessions.
    fn default() -> Self {
        Self {
            wait: Duration::from_millis(500),
            ttl: Duration::from_secs(300),
            sessions: 1 << 17,
        }
    }
}

impl ProxyConfig {
    /// The configuration forwarding to `upstream`, all else as the command line's
    /// defaults: 127.0.0.1:8080, keys from `BIGMODEL_API_KEY`, waits of 30 s, 10 retries.
    pub fn new(upstream: UpstreamUrl) -> Self {
        Self {
            listen: ListenAddr {
                host: "127.0.0.1".to_owned(),
                port: 8080,
            },
            workers: None,
            access_token_env: None,
            keys: KeysFrom::Env(Profile::Generic.keys_env().to_owned()),
            keys_file_poll: Duration::from_secs(1),
            selection: Selection::RoundRobin,
            upstream,
            profile: Profile::Generic,
            placement: None,
            upstream_ca: None,
            max_in_flight_per_key: None,
            rpm_per_key: None,
            max_wait: Duration::from_secs(30),
            retries: 10,
            learn_concurrency: true,
            retry_body_limit: 4 << 20,
            max_body_size: 32 << 20,
            redis: RedisConfig::default(),
            log_format: LogFormat::Text,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            abandoned_grace: Duration::from_secs(30),
            routing: Routing::default(),
            count_tokens: false,
            tokens: TokenBudget::default(),
            affinity: AffinityConfig::default(),
        }
    }

    /// Where the key goes: [`placement`](Self::placement), or the profile's own.
    pub(crate) fn placement(&self) -> Placement {
        self.placement
            .clone()
            .unwrap_or_else(|| self.profile.placement())
    }

    /// The key pool this configuration describes, over `keys` (before the shared state
    /// backend, which `shared::apply` adds).
    pub(crate) fn pool_builder(&self, keys: KeySet) -> KeyPoolBuilder {
        let mut pool = KeyPool::builder(keys)
            .selection(self.selection)
            .classifier(
                Classifier::from(self.profile).unreached_if(crate::connections::is_connect_failure),
            )
            .max_wait(Some(self.max_wait))
            .learn_concurrency(self.learn_concurrency)
            .affinity_wait(self.affinity.wait)
            .affinity_ttl(self.affinity.ttl)
            .affinity_capacity(self.affinity.sessions);
        if let Some(max) = self.max_in_flight_per_key {
            pool = pool.max_in_flight_per_key(max.get());
        }
        if let Some(rpm) = self.rpm_per_key {
            pool = pool.quota_per_key(Quota::per_minute(rpm.get()));
        }
        // With Redis too: each (key, bucket) is shared by the replicas as a key is.
        let routing = self.routing.clone();
        if routing.is_on() {
            pool = pool
                .router(ProxyRouter(routing, self.profile))
                .token_window(self.tokens.window);
            if let (Some(tpm), true) = (self.tokens.tpm, self.count_tokens) {
                pool = pool.token_quota_per_key(TokenQuota::new(tpm.get(), self.tokens.window));
            }
        }
        pool
    }
}

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeysFrom {
    /// The comma-separated keys of an environment variable (set by the environment or a
    /// `.env` file in the working directory).
    Env(String),
    /// A TOML key file naming each key (see the crate docs); reloaded when it changes.
    File(PathBuf),
}

/// The provider: how its answers are read, which variable holds its keys by default,
/// where its key goes and the shape of the proxy's own error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// Status codes and the OpenAI/Anthropic rate-limit headers (any provider).
    Generic,
    /// Zhipu BigModel: also `error.code` (limits, quota, overload, invalid key).
    Bigmodel,
    /// OpenAI: a billing 429 (`insufficient_quota`) is a spent quota, not a rate limit.
    Openai,
    /// Anthropic: a 529 overload is platform-wide; the key goes in `x-api-key`.
    Anthropic,
    /// Google Gemini: `RetryInfo` and quota ids in a 429's body; the key goes in
    /// `x-goog-api-key`; the model is in the path (`/models/{model}:generateContent`).
    Gemini,
}

impl Profile {
    /// The variable holding the provider's keys by convention: `OPENAI_API_KEY`,
    /// `ANTHROPIC_API_KEY`, `GEMINI_API_KEY`, else `BIGMODEL_API_KEY`.
    pub fn keys_env(self) -> &'static str {
        match self {
            Self::Openai => "OPENAI_API_KEY",
            Self::Anthropic => "ANTHROPIC_API_KEY",
            Self::Gemini => "GEMINI_API_KEY",
            Self::Generic | Self::Bigmodel => "BIGMODEL_API_KEY",
        }
    }

    /// Where the provider reads its key: `x-api-key` for Anthropic, `x-goog-api-key` for
    /// Gemini, else `Authorization: Bearer`.
    pub fn placement(self) -> Placement {
        match self {
            Self::Anthropic => Placement::header(HeaderName::from_static("x-api-key")),
            Self::Gemini => Placement::header(HeaderName::from_static("x-goog-api-key")),
            Self::Generic | Self::Bigmodel | Self::Openai => Placement::bearer(),
        }
    }
}

impl From<Profile> for Classifier {
    fn from(profile: Profile) -> Self {
        match profile {
            Profile::Generic => Classifier::default(),
            Profile::Bigmodel => Classifier::bigmodel(),
            Profile::Openai => Classifier::openai(),
            Profile::Anthropic => Classifier::anthropic(),
            Profile::Gemini => Classifier::gemini(),
        }
    }
}

/// The access log's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// For people: `Using key 2/3 (paid): POST /chat/completions -> 200 in 812 ms`.
    Text,
    /// One object a line, for log shippers.
    Json,
}

/// A value the configuration could not take (`--listen`, `--upstream`): what is wrong
/// with it, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl ParseError {
    fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// The address to listen on: a host (name or IP literal) and a port, resolved when the
/// proxy starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    host: String,
    port: u16,
}

impl FromStr for ListenAddr {
    type Err = ParseError;

    /// `HOST:PORT`, as in `127.0.0.1:8080`, `localhost:0` or `[::1]:8080`.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| ParseError::new("expected HOST:PORT, as in 127.0.0.1:8080"))?;
        let port = port
            .parse()
            .map_err(|_| ParseError::new(format!("`{port}` is not a port number (0-65535)")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(ParseError::new("the host is missing, as in 127.0.0.1:8080"));
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl ListenAddr {
    /// Resolves the host and binds the first address that accepts.
    pub(crate) async fn bind(&self) -> Result<tokio::net::TcpListener, StartError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| {
                StartError::caused(format!("--listen {self}: cannot resolve {}", self.host), e)
            })?
            .collect();
        let mut last = None;
        for addr in &addrs {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => return Ok(listener),
                Err(e) => {
                    last = Some(StartError::caused(
                        format!("--listen {self}: cannot listen on {addr}"),
                        e,
                    ));
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            StartError::new(format!("--listen {self}: {} has no address", self.host))
        }))
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// How long the start-up check waits for the upstream host to resolve.
const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// The provider's base URL: where every request goes, and the only host ever contacted.
/// Its path is a prefix: with `https://host/v1`, `/chat/completions` goes to
/// `https://host/v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The URL's path without its trailing `/` (empty for the root).
    pub(crate) prefix: String,
}

impl FromStr for UpstreamUrl {
    type Err = ParseError;

    /// An `http://` or `https://` URL, without user info or query string.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let uri: Uri = s.parse().map_err(|_| ParseError::new("not a valid URL"))?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| ParseError::new("the URL must start with http:// or https://"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ParseError::new("the URL has no host"))?;
        if authority.as_str().contains('@') {
            // Credentials in the URL would be logged and sent along: keys belong in the env.
            return Err(ParseError::new("the URL must not carry user info"));
        }
        if uri.query().is_some() {
            return Err(ParseError::new("the URL must not have a query string"));
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }
}

impl UpstreamUrl {
    /// Warns when the host is a name that does not resolve within [`RESOLVE_WITHIN`]. Not
    /// an error: DNS may come later (a container started before its network), but until
    /// then every request fails.
    pub(crate) async fn warn_if_unresolved(&self) {
        let host = self.authority.host();
        if host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok()
        {
            return;
        }
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if self.scheme == Scheme::HTTPS {
                443
            } else {
                80
            });
        let lookup = tokio::net::lookup_host((host, port));
        let why = match tokio::time::timeout(RESOLVE_WITHIN, lookup).await {
            Ok(Ok(mut addrs)) => match addrs.next() {
                Some(_) => return,
                None => "it has no address".to_owned(),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {} s", RESOLVE_WITHIN.as_secs()),
        };
        tracing::warn!(
            "the upstream host {host} does not resolve ({why}); starting anyway, but requests \
             fail until it does"
        );
    }

    /// The upstream URI for a request's path and query.
    pub(crate) fn join(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        // Not `format!`: this runs on every request.
        let mut joined = String::with_capacity(self.prefix.len() + path_and_query.len());
        joined.push_str(&self.prefix);
        joined.push_str(path_and_query);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(joined)
            .build()
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}/", self.scheme, self.authority, self.prefix)
    }
}

/// The token clients must present, compared in constant time.
pub(crate) struct AccessToken(Zeroizing<Vec<u8>>);

impl AccessToken {
    /// Is `given` (a credential as a client sent it) this token?
    pub(crate) fn matches(&self, given: &[u8]) -> bool {
        // Lengths may differ (and that much leaks); the bytes are compared in constant time.
        given.ct_eq(&self.0).into()
    }
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// What is read from the environment (after `.env`) and the key file: the keys, where
/// they came from (to read them again on reload), and the access token.
#[derive(Debug)]
pub(crate) struct Secrets {
    pub(crate) keys: KeySet,
    pub(crate) source: KeySource,
    /// The key file's fingerprint just before it was read (see `reload`).
    pub(crate) fingerprint: Option<u64>,
    pub(crate) access_token: Option<AccessToken>,
}

/// Reads `.env` (if present), the key file or variable, and the variables the
/// configuration names. Errors are one line and never contain a secret.
pub(crate) fn load_secrets(config: &ProxyConfig) -> Result<Secrets, StartError> {
    // Set by the process environment itself, before `.env` may add it (the environment
    // wins over `.env`, and only `.env` can be read again on reload).
    let keys_env_preset = match &config.keys {
        KeysFrom::Env(var) => std::env::var_os(var).is_some(),
        KeysFrom::File(_) => false,
    };
    if let Some(dotenv) = DotEnv::find()? {
        // Only what the proxy reads may stop it: another program's line does not.
        let mut needed: Vec<String> = match &config.keys {
            KeysFrom::File(path) => keys::env_names(path),
            KeysFrom::Env(var) => vec![var.clone()],
        };
        needed.extend(config.access_token_env.clone());
        needed.extend(config.redis.env_names());
        let needed: Vec<&str> = needed.iter().map(String::as_str).collect();
        dotenv.apply(&needed)?;
    }
    let source = match &config.keys {
        KeysFrom::File(path) => KeySource::File(path.clone()),
        KeysFrom::Env(var) => KeySource::Env {
            var: var.clone(),
            from_dotenv: !keys_env_preset && std::env::var_os(var).is_some(),
        },
    };
    let fingerprint = match &config.keys {
        KeysFrom::File(path) => keys::fingerprint(path),
        KeysFrom::Env(_) => None,
    };
    let keys = match &source {
        // At start, the process environment (with `.env` applied) is the truth.
        KeySource::Env { var, .. } => keys::from_env(var)?,
        KeySource::File(_) => keys::load(&source)?,
    };
    let access_token = match &config.access_token_env {
        None => None,
        Some(var) => {
            let token = Zeroizing::new(std::env::var(var).unwrap_or_default());
            let token = token.trim();
            if token.is_empty() {
                return Err(StartError::new(format!(
                    "access token variable {var} is not set or empty"
                )));
            }
            Some(AccessToken(Zeroizing::new(token.as_bytes().to_vec())))
        }
    };
    Ok(Secrets {
        keys,
        source,
        fingerprint,
        access_token,
    })
}

/// Reads the certificates of a PEM file given with `flag` (`--upstream-ca`, `--redis-ca`).
pub(crate) fn load_ca(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let what = || format!("{flag} {}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| StartError::caused(what(), e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StartError::caused(what(), e))?;
    if certs.is_empty() {
        return Err(StartError::new("no certificate in the file").context(what()));
    }
    Ok(certs)
}
