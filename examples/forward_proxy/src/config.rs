//! Command line flags, `.env`, and turning them into a validated configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use http::uri::{Authority, Scheme};
use http::{HeaderName, Uri};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use subtle::ConstantTimeEq;
use tower_key_rotation::{
    KeyPool, KeyPoolBuilder, KeySet, Placement, Quota, Selection, classify::Classifier,
};
use zeroize::Zeroizing;

use crate::dotenv::DotEnv;
use crate::keys::{self, KeySource};

const EXAMPLES: &str = "\
Example:
  BIGMODEL_API_KEY=k1,k2,k3 cargo run --release -p forward_proxy -- \\
      --listen 127.0.0.1:8080 --upstream https://open.bigmodel.cn/api/paas/v4

  curl http://127.0.0.1:8080/chat/completions -H 'content-type: application/json' \\
      -d '{\"model\":\"glm-4-flash\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'

Keys are read from the environment variable named by --keys-env (comma-separated; by
default the profile's: OPENAI_API_KEY, ANTHROPIC_API_KEY, else BIGMODEL_API_KEY), or from
a .env file in the working directory, or from a TOML key file (--keys-file) that names
each key and takes its value from an environment variable or a file:

  [[key]]
  name = \"paid\"
  env = \"PAID_KEY\"    # or: file = \"secrets/paid.key\"
  weight = 3          # optional: share, rpm, max_in_flight, account
  rpm = 500

SIGHUP, or a change to the key file, reloads the keys (unchanged keys keep their state).
Keys of one account share its limit: tag them with the same account.

Admin routes: /_keyrotation/health, /_keyrotation/keys, /_keyrotation/backend,
/_keyrotation/metrics.

Replicas share their keys' state through Redis with --redis-url (or REDIS_URL).

Anyone who can reach the proxy uses your keys: keep it on loopback, or set --access-token-env.";

/// Shown after `-h`: where to read on.
const SHORT_AFTER: &str = "\
Keys come from --keys-env (or .env in the working directory) or --keys-file.
--help tells more: each flag in full, the key file, reloads, admin routes, an example.";

/// A forward proxy that spreads requests over several API keys of one provider.
// Each flag's doc: a first paragraph that `-h` prints on one line (100 columns), then
// what `--help` adds; flags go under headings by the job they do.
#[derive(Debug, Parser)]
#[command(
    name = "forward_proxy",
    version,
    max_term_width = 100,
    after_help = SHORT_AFTER,
    after_long_help = EXAMPLES
)]
pub(crate) struct Args {
    /// Address to listen on
    ///
    /// A host and a port; a name such as `localhost` is resolved, and the first address
    /// that can be bound is used. Keep it on loopback unless an access token is set.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080", value_parser = Listen::parse)]
    pub(crate) listen: Listen,

    /// Variable holding the token clients must send
    ///
    /// Clients send it as `Authorization: Bearer <token>`, or where their SDK puts a key
    /// (`x-api-key`, `api-key`, `x-goog-api-key`, a `key` query parameter); it is never
    /// forwarded. Without it, any client that reaches the proxy is served, with your keys.
    #[arg(long, value_name = "NAME")]
    pub(crate) access_token_env: Option<String>,

    /// Worker threads [default: the available cores]
    ///
    /// Each has its own listener on the address (`SO_REUSEPORT`) and its own upstream
    /// connections; all share the keys.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) workers: Option<u16>,

    /// Variable with the comma-separated keys [default: the profile's]
    ///
    /// By default the profile's: OPENAI_API_KEY (openai), ANTHROPIC_API_KEY (anthropic),
    /// else BIGMODEL_API_KEY. The environment sets it, or a `.env` file in the working
    /// directory.
    #[arg(long, value_name = "NAME", help_heading = KEYS)]
    keys_env: Option<String>,

    /// TOML file naming the keys; takes precedence over --keys-env
    ///
    /// Each `[[key]]` table names a key and takes its value from an environment variable
    /// or a file, with optional weight, rpm, max_in_flight and account (the format is
    /// below). Reloaded on SIGHUP and when it changes.
    #[arg(long, value_name = "FILE", help_heading = KEYS)]
    pub(crate) keys_file: Option<PathBuf>,

    /// How often to look for key file changes; 0: never
    ///
    /// A change to the key file, or to a file it takes a key from, reloads the keys; so
    /// does SIGHUP.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = seconds, help_heading = KEYS)]
    pub(crate) keys_file_poll: Duration,

    /// How a key is chosen: round-robin (default) or least-in-flight
    ///
    /// `round-robin` takes the available keys in turn (1, 2, 3, 1, 2, 3), each as often as
    /// its weight says; `least-in-flight` the one with the fewest requests in flight.
    #[arg(
        long,
        value_enum,
        value_name = "HOW",
        default_value_t = StrategyArg::RoundRobin,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = KEYS
    )]
    pub(crate) strategy: StrategyArg,

    /// The provider's base URL (http or https)
    ///
    /// Its path is a prefix: with `https://host/v1`, `/chat/completions?x=1` goes to
    /// `https://host/v1/chat/completions?x=1`. The only host the proxy ever contacts.
    #[arg(long, value_name = "URL", value_parser = Upstream::parse, help_heading = UPSTREAM)]
    pub(crate) upstream: Upstream,

    /// The provider: generic (default), bigmodel, openai or anthropic
    ///
    /// How its answers are read, which variable holds the keys (--keys-env) and where the
    /// key goes (--auth):
    ///
    /// `generic`: status codes and the OpenAI/Anthropic rate-limit headers (any provider);
    /// BIGMODEL_API_KEY; bearer.
    ///
    /// `bigmodel` (Zhipu): also `error.code` (1302/1303 limits, 1113/1304/1308/1310 quota,
    /// 1305/1312 overload, 1000-1004 invalid key); BIGMODEL_API_KEY; bearer.
    ///
    /// `openai`: also a billing 429 (`insufficient_quota`) is a spent quota, not a rate
    /// limit; OPENAI_API_KEY; bearer.
    ///
    /// `anthropic`: also a 529 overload is platform-wide, not the key's fault;
    /// ANTHROPIC_API_KEY; `x-api-key`.
    #[arg(
        long,
        value_enum,
        value_name = "NAME",
        default_value_t = ProfileArg::Generic,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = UPSTREAM
    )]
    pub(crate) profile: ProfileArg,

    /// Where the key goes [default: the profile's]
    ///
    /// `bearer` sends `Authorization: Bearer <key>`; `header:NAME` sends the key alone in
    /// that header. By default the provider's own: `header:x-api-key` for anthropic,
    /// `bearer` for openai, bigmodel and generic.
    #[arg(long, value_name = "bearer|header:NAME", value_parser = parse_auth, help_heading = UPSTREAM)]
    auth: Option<AuthArg>,

    /// Also trust the CA certificates in this PEM file
    ///
    /// For an https upstream behind a company gateway, say; the usual public roots stay
    /// trusted.
    #[arg(long, value_name = "FILE", help_heading = UPSTREAM)]
    pub(crate) upstream_ca: Option<PathBuf>,

    /// At most N requests in flight per key [default: no cap]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = LIMITS)]
    pub(crate) max_in_flight_per_key: Option<u32>,

    /// At most N requests a minute per key
    ///
    /// Keys of a key file may set their own `rpm`. Requests beyond it wait for their turn
    /// instead of earning a 429.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = LIMITS)]
    pub(crate) rpm_per_key: Option<u32>,

    /// How long a request may wait for a key
    ///
    /// Counted from the request's arrival, across its retries; then a 429 with
    /// Retry-After and `x-should-retry: false`, in the provider's error format (at once
    /// when no key can be back in time).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = LIMITS)]
    pub(crate) max_wait: Duration,

    /// Send a refused request again at most N times
    ///
    /// A 429, a rejected key or a refused connection sends the request again, on another
    /// key; what bounds a request's time is --max-wait.
    #[arg(long, value_name = "N", default_value_t = 10, help_heading = LIMITS)]
    pub(crate) retries: usize,

    /// Do not learn each key's concurrency limit from its 429s
    ///
    /// Learning (from 429s that arrive while other requests are in flight on the key)
    /// makes later requests wait for a slot instead of being refused.
    #[arg(long, help_heading = LIMITS)]
    pub(crate) no_learn_concurrency: bool,

    /// Retry request bodies up to this size
    ///
    /// A body up to this many bytes is kept so that a 429 can be retried on another key;
    /// a larger one streams through and is not retried.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, help_heading = LIMITS)]
    pub(crate) retry_body_limit: usize,

    /// Refuse larger request bodies with a 413
    ///
    /// Before a key is used. 32 MiB by default: the largest request LLM providers accept.
    #[arg(long, value_name = "BYTES", default_value_t = 32 << 20, help_heading = LIMITS)]
    pub(crate) max_body_size: u64,

    /// Replicas sharing state through Redis (see `shared`).
    #[command(flatten)]
    pub(crate) shared: crate::shared::SharedArgs,

    /// Log level: error, warn, info, debug or trace
    #[arg(long, value_name = "LEVEL", default_value = "info", help_heading = ADMIN)]
    pub(crate) log_level: tracing::Level,

    /// Log format: text (default) or json
    ///
    /// `text` for people: `Using key 2/3 (paid): POST /chat/completions -> 200 in 812 ms`;
    /// `json` for log shippers, one object a line:
    /// `{"timestamp":...,"level":"INFO","fields":{"message":"request","key":2,...}}`.
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        default_value_t = LogFormat::Text,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = ADMIN
    )]
    pub(crate) log_format: LogFormat,

    /// Give up connecting after this long (504)
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds, help_heading = TIMEOUTS)]
    pub(crate) connect_timeout: Duration,

    /// Give up waiting for the response head (504)
    ///
    /// Give up waiting for the upstream's response head after this long. Streaming
    /// bodies are not cut.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = seconds, help_heading = TIMEOUTS)]
    pub(crate) request_timeout: Duration,

    /// Close idle HTTP/1 and HTTP/2 connections
    ///
    /// An HTTP/1 connection whose request head takes longer than this to arrive
    /// (slowloris protection), or that stays idle this long between requests, is closed;
    /// so is an HTTP/2 connection with no request in progress for this long (GOAWAY
    /// first).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = TIMEOUTS)]
    pub(crate) header_read_timeout: Duration,

    /// Time for requests in flight on SIGINT/SIGTERM
    ///
    /// On SIGINT or SIGTERM the proxy stops accepting, then waits at most this long for
    /// the requests in flight.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = TIMEOUTS)]
    pub(crate) shutdown_timeout: Duration,

    /// Keep a request whose client left this long
    ///
    /// When a client goes away before the response head, its upstream request (and its
    /// key's slot) is kept until the provider answers, at most this long: the provider
    /// goes on working on it, and counts it against the key's concurrency. 0 releases at
    /// once.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = TIMEOUTS)]
    pub(crate) abandoned_grace: Duration,
}

/// `--help`'s headings, one per job.
const KEYS: &str = "Keys";
const UPSTREAM: &str = "Upstream";
const LIMITS: &str = "Limits and waiting";
/// The heading of the replicas' flags (`shared`).
pub(crate) const REPLICAS: &str = "Replicas";
const ADMIN: &str = "Admin and logs";
const TIMEOUTS: &str = "Timeouts";

impl Args {
    /// Where the key goes: `--auth`, or the provider's own placement for the profile.
    pub(crate) fn placement(&self) -> Placement {
        match (&self.auth, self.profile) {
            (Some(auth), _) => auth.placement(),
            (None, ProfileArg::Anthropic) => {
                Placement::header(HeaderName::from_static("x-api-key"))
            }
            (None, ProfileArg::Generic | ProfileArg::Bigmodel | ProfileArg::Openai) => {
                Placement::bearer()
            }
        }
    }

    /// `--keys-env`, or the profile's usual variable.
    pub(crate) fn keys_env(&self) -> &str {
        match (&self.keys_env, self.profile) {
            (Some(var), _) => var,
            (None, ProfileArg::Openai) => "OPENAI_API_KEY",
            (None, ProfileArg::Anthropic) => "ANTHROPIC_API_KEY",
            (None, ProfileArg::Generic | ProfileArg::Bigmodel) => "BIGMODEL_API_KEY",
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// For people.
    Text,
    /// One object a line, for log shippers.
    Json,
}

/// `--listen`: a host (name or IP literal) and a port, resolved when the proxy starts.
#[derive(Debug, Clone)]
pub(crate) struct Listen {
    host: String,
    port: u16,
}

impl Listen {
    fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| "expected HOST:PORT, as in 127.0.0.1:8080".to_owned())?;
        let port = port
            .parse()
            .map_err(|_| format!("`{port}` is not a port number (0-65535)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the host is missing, as in 127.0.0.1:8080".to_owned());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }

    /// Resolves the host and binds the first address that accepts.
    pub(crate) async fn bind(&self) -> Result<tokio::net::TcpListener, String> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("--listen {self}: cannot resolve {}: {e}", self.host))?
            .collect();
        let mut last = None;
        for addr in &addrs {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => return Ok(listener),
                Err(e) => last = Some(format!("--listen {self}: cannot listen on {addr}: {e}")),
            }
        }
        Err(last.unwrap_or_else(|| format!("--listen {self}: {} has no address", self.host)))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Args {
    /// The key pool these flags describe, over `keys` (before the shared state backend,
    /// which `shared::apply` adds).
    pub(crate) fn pool_builder(&self, keys: KeySet) -> KeyPoolBuilder {
        let mut pool = KeyPool::builder(keys)
            .selection(self.strategy.into())
            .classifier(
                Classifier::from(self.profile).unreached_if(crate::connections::is_connect_failure),
            )
            .max_wait(Some(self.max_wait))
            .learn_concurrency(!self.no_learn_concurrency);
        if let Some(max) = self.max_in_flight_per_key {
            pool = pool.max_in_flight_per_key(max);
        }
        if let Some(rpm) = self.rpm_per_key {
            pool = pool.quota_per_key(Quota::per_minute(rpm));
        }
        pool
    }
}

/// `--strategy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum StrategyArg {
    /// 1, 2, 3, 1, 2, 3 over the available keys.
    RoundRobin,
    /// The key with the fewest requests in flight.
    LeastInFlight,
}

impl From<StrategyArg> for Selection {
    fn from(arg: StrategyArg) -> Self {
        match arg {
            StrategyArg::RoundRobin => Selection::RoundRobin,
            StrategyArg::LeastInFlight => Selection::LeastInFlight,
        }
    }
}

/// `--profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProfileArg {
    /// Status codes and the OpenAI/Anthropic rate-limit headers (any provider).
    Generic,
    /// Zhipu BigModel: reads `error.code` (1302/1303 limits, 1113/1304/1308/1310 quota,
    /// 1305/1312 overload, 1000-1004 invalid key).
    Bigmodel,
    /// OpenAI: a billing 429 (`insufficient_quota`) is a spent quota, not a rate limit.
    Openai,
    /// Anthropic: 529 overload is platform-wide, not the key's fault; the key goes in
    /// `x-api-key`.
    Anthropic,
}

impl From<ProfileArg> for Classifier {
    fn from(arg: ProfileArg) -> Self {
        match arg {
            ProfileArg::Generic => Classifier::default(),
            ProfileArg::Bigmodel => Classifier::bigmodel(),
            ProfileArg::Openai => Classifier::openai(),
            ProfileArg::Anthropic => Classifier::anthropic(),
        }
    }
}

/// `--auth`.
#[derive(Debug, Clone)]
pub(crate) enum AuthArg {
    Bearer,
    Header(HeaderName),
}

impl AuthArg {
    fn placement(&self) -> Placement {
        match self {
            Self::Bearer => Placement::bearer(),
            Self::Header(name) => Placement::header(name.clone()),
        }
    }
}

fn parse_auth(s: &str) -> Result<AuthArg, String> {
    if s == "bearer" {
        return Ok(AuthArg::Bearer);
    }
    let name = s
        .strip_prefix("header:")
        .ok_or_else(|| "expected `bearer` or `header:NAME`".to_owned())?;
    HeaderName::try_from(name)
        .map(AuthArg::Header)
        .map_err(|_| format!("`{name}` is not a valid header name"))
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| "expected a number of seconds".to_owned())?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| "expected a non-negative number of seconds".to_owned())
}

/// How long the start-up check waits for the upstream host to resolve.
const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// The validated `--upstream`: where every request goes, and the only host ever contacted.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The URL's path without its trailing `/` (empty for the root).
    pub(crate) prefix: String,
}

impl Upstream {
    fn parse(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|_| "not a valid URL".to_owned())?;
        let scheme = uri
            .scheme()
            .filter(|s| **s == Scheme::HTTP || **s == Scheme::HTTPS)
            .cloned()
            .ok_or_else(|| "the URL must start with http:// or https://".to_owned())?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| "the URL has no host".to_owned())?;
        if authority.as_str().contains('@') {
            // Credentials in the URL would be logged and sent along: keys belong in the env.
            return Err("the URL must not carry user info".to_owned());
        }
        if uri.query().is_some() {
            return Err("the URL must not have a query string".to_owned());
        }
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }

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

/// Reads `.env` (if present), the key file or variable, and the variables the flags name.
/// Errors are one line and never contain a secret.
pub(crate) fn load_secrets(args: &Args) -> Result<Secrets, String> {
    // Set by the process environment itself, before `.env` may add it (the environment
    // wins over `.env`, and only `.env` can be read again on reload).
    let keys_env = args.keys_env();
    let keys_env_preset = std::env::var_os(keys_env).is_some();
    if let Some(dotenv) = DotEnv::find()? {
        // Only what the proxy reads may stop it: another program's line does not.
        let mut needed: Vec<String> = match &args.keys_file {
            Some(path) => keys::env_names(path),
            None => vec![keys_env.to_owned()],
        };
        needed.extend(args.access_token_env.clone());
        needed.extend(args.shared.env_names());
        let needed: Vec<&str> = needed.iter().map(String::as_str).collect();
        dotenv.apply(&needed)?;
    }
    let source = match &args.keys_file {
        Some(path) => KeySource::File(path.clone()),
        None => KeySource::Env {
            var: keys_env.to_owned(),
            from_dotenv: !keys_env_preset && std::env::var_os(keys_env).is_some(),
        },
    };
    let fingerprint = args.keys_file.as_deref().and_then(keys::fingerprint);
    let keys = match &source {
        // At start, the process environment (with `.env` applied) is the truth.
        KeySource::Env { var, .. } => keys::from_env(var)?,
        KeySource::File(_) => keys::load(&source)?,
    };
    let access_token = match &args.access_token_env {
        None => None,
        Some(var) => {
            let token = Zeroizing::new(std::env::var(var).unwrap_or_default());
            let token = token.trim();
            if token.is_empty() {
                return Err(format!("access token variable {var} is not set or empty"));
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

/// Reads the certificates of `--upstream-ca`.
pub(crate) fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |e: &dyn std::fmt::Display| format!("--upstream-ca {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if certs.is_empty() {
        return Err(fail(&"no certificate in the file"));
    }
    Ok(certs)
}
