//! The command line: its flags, and the [`ProxyConfig`] they describe.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use forward_proxy::{
    KeysFrom, ListenAddr, LogFormat, Profile, ProxyConfig, RedisConfig, RedisUrl, UpstreamUrl,
};
use http::HeaderName;
use tower_key_rotation::shared::DegradedPolicy;
use tower_key_rotation::{Placement, Selection};

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
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8080", value_parser = parse::<ListenAddr>)]
    listen: ListenAddr,

    /// Variable holding the token clients must send
    ///
    /// Clients send it as `Authorization: Bearer <token>`, or where their SDK puts a key
    /// (`x-api-key`, `api-key`, `x-goog-api-key`, a `key` query parameter); it is never
    /// forwarded. Without it, any client that reaches the proxy is served, with your keys.
    #[arg(long, value_name = "NAME")]
    access_token_env: Option<String>,

    /// Worker threads [default: the available cores]
    ///
    /// Each has its own listener on the address (`SO_REUSEPORT`) and its own upstream
    /// connections; all share the keys.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    workers: Option<u16>,

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
    keys_file: Option<PathBuf>,

    /// How often to look for key file changes; 0: never
    ///
    /// A change to the key file, or to a file it takes a key from, reloads the keys; so
    /// does SIGHUP.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = seconds, help_heading = KEYS)]
    keys_file_poll: Duration,

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
    strategy: StrategyArg,

    /// The provider's base URL (http or https)
    ///
    /// Its path is a prefix: with `https://host/v1`, `/chat/completions?x=1` goes to
    /// `https://host/v1/chat/completions?x=1`. The only host the proxy ever contacts.
    #[arg(long, value_name = "URL", value_parser = parse::<UpstreamUrl>, help_heading = UPSTREAM)]
    upstream: UpstreamUrl,

    /// The provider: generic, bigmodel, openai, anthropic or gemini
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
    ///
    /// `gemini` (Google): also a 429's `RetryInfo.retryDelay` (the rest) and quota ids
    /// (per minute: a rest; per day: spent until midnight Pacific time), `API_KEY_INVALID`;
    /// GEMINI_API_KEY; `x-goog-api-key`.
    #[arg(
        long,
        value_enum,
        value_name = "NAME",
        default_value_t = ProfileArg::Generic,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = UPSTREAM
    )]
    profile: ProfileArg,

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
    upstream_ca: Option<PathBuf>,

    /// What each key's limits are kept per: model (default) or none
    ///
    /// `model`: providers meter each key per model, so each (key, model) has its own
    /// requests in flight, rests, learned concurrency and quota: a 429 for one model rests
    /// that model on the key, not the key. The model is the JSON body's top-level `model`
    /// (the path's `/models/{model}:...` for gemini), grouped as the provider meters it
    /// (openai: dated snapshots with their model; anthropic: the model class). A key's
    /// --max-in-flight-per-key, --rpm-per-key and key-file limits apply to each model; a key
    /// file may set a model's own (`[key.models."NAME"]`). A key's account-wide state
    /// (disabled, a spent balance or daily cap) covers every model.
    ///
    /// `none`: one state per key, whatever the model. With --redis-url every (key, model)
    /// is shared by the replicas as a key is.
    #[arg(
        long,
        value_enum,
        value_name = "model|none",
        default_value_t = BucketsArg::Model,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = LIMITS
    )]
    buckets: BucketsArg,

    /// At most N requests in flight per key [default: no cap]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = LIMITS)]
    max_in_flight_per_key: Option<u32>,

    /// At most N requests a minute per key
    ///
    /// Keys of a key file may set their own `rpm`. Requests beyond it wait for their turn
    /// instead of earning a 429.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..), help_heading = LIMITS)]
    rpm_per_key: Option<u32>,

    /// How long a request may wait for a key
    ///
    /// Counted from the request's arrival, across its retries; then a 429 with
    /// Retry-After and `x-should-retry: false`, in the provider's error format (at once
    /// when no key can be back in time).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = LIMITS)]
    max_wait: Duration,

    /// Send a refused request again at most N times
    ///
    /// A 429, a rejected key or a refused connection sends the request again, on another
    /// key; what bounds a request's time is --max-wait.
    #[arg(long, value_name = "N", default_value_t = 10, help_heading = LIMITS)]
    retries: usize,

    /// Do not learn each key's concurrency limit from its 429s
    ///
    /// Learning (from 429s that arrive while other requests are in flight on the key)
    /// makes later requests wait for a slot instead of being refused.
    #[arg(long, help_heading = LIMITS)]
    no_learn_concurrency: bool,

    /// Count the tokens each key's answers report
    ///
    /// Reads `usage` from each successful answer (JSON, or the stream's events) and shows
    /// each key's input and output tokens in /_keyrotation/keys and the metrics. With
    /// --profile openai, a chat completions stream that did not ask for usage is sent
    /// asking (`stream_options.include_usage`), and what that adds is taken out of the
    /// stream the client gets.
    #[arg(long, help_heading = LIMITS)]
    count_tokens: bool,

    /// Tokens per minute per key × model (implies --count-tokens)
    ///
    /// Each request reserves its estimated input and the output it allows (max_tokens,
    /// max_completion_tokens, max_output_tokens, else --default-output-tokens) and waits
    /// until they fit; its answer's usage settles the reservation. Without it, counting
    /// tokens learns each key × model's limit from the provider's token headers.
    #[arg(long, value_name = "N", help_heading = LIMITS)]
    tpm: Option<std::num::NonZeroU64>,

    /// The window of --tpm and learned token limits
    ///
    /// A minute by default, as OpenAI and Anthropic meter tokens.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = positive_seconds, help_heading = LIMITS)]
    token_window: Duration,

    /// Output tokens a request without a limit reserves
    ///
    /// With --count-tokens: what a request without max_tokens, max_completion_tokens or
    /// max_output_tokens reserves of its key's tokens per minute until its answer settles.
    #[arg(long, value_name = "N", default_value_t = 4096, help_heading = LIMITS)]
    default_output_tokens: u64,

    /// Retry request bodies up to this size
    ///
    /// A body up to this many bytes is kept so that a 429 can be retried on another key;
    /// a larger one streams through and is not retried.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, help_heading = LIMITS)]
    retry_body_limit: usize,

    /// Refuse larger request bodies with a 413
    ///
    /// Before a key is used. 32 MiB by default: the largest request LLM providers accept.
    #[arg(long, value_name = "BYTES", default_value_t = 32 << 20, help_heading = LIMITS)]
    max_body_size: u64,

    /// Keep a session on one key: session (default), prefix or off
    ///
    /// `session`: a request naming a session (`prompt_cache_key`, `metadata.user_id` or
    /// `user` in its JSON body, else the --affinity-header) goes to that session's key,
    /// so the provider's prompt cache stays warm; others go by --strategy. `prefix`: as
    /// `session`, and a request naming none goes to the key of its prompt's prefix (the
    /// hash of its model, system prompt and first user message). `off`: every request by
    /// --strategy.
    #[arg(
        long,
        value_enum,
        value_name = "MODE",
        default_value_t = AffinityArg::Session,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = AFFINITY
    )]
    affinity: AffinityArg,

    /// Header naming a session
    ///
    /// Read when the JSON body names no session (`prompt_cache_key`, `metadata.user_id`,
    /// `user`).
    #[arg(long, value_name = "NAME", default_value = "x-session-id", value_parser = parse_header_name, help_heading = AFFINITY)]
    affinity_header: HeaderName,

    /// Wait for a session's busy key this long
    ///
    /// When a session's key cannot take its request now (resting, at its limit), the
    /// request waits for it this long if it comes back sooner, else goes at once to the
    /// next key of the session's own order.
    #[arg(long, value_name = "SECONDS", default_value = "0.5", value_parser = seconds, help_heading = AFFINITY)]
    affinity_wait: Duration,

    /// Remember a spilled session this long
    ///
    /// Counted from the session's last request: the providers' prompt-cache lifetime: a session that went to another key stays
    /// there, where its cache is now warm.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = seconds, help_heading = AFFINITY)]
    affinity_ttl: Duration,

    /// Remember at most N spilled sessions
    ///
    /// 8 bytes each, allocated at the first spill; past it the oldest of a few is forgotten.
    #[arg(long, value_name = "N", default_value_t = 1 << 17, help_heading = AFFINITY)]
    affinity_sessions: usize,

    /// Replicas sharing state through Redis (see `shared`).
    #[command(flatten)]
    shared: SharedArgs,

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
        default_value_t = LogFormatArg::Text,
        hide_default_value = true,
        hide_possible_values = true,
        help_heading = ADMIN
    )]
    pub(crate) log_format: LogFormatArg,

    /// Give up connecting after this long (504)
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds, help_heading = TIMEOUTS)]
    connect_timeout: Duration,

    /// Give up waiting for the response head (504)
    ///
    /// Give up waiting for the upstream's response head after this long. Streaming
    /// bodies are not cut.
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = seconds, help_heading = TIMEOUTS)]
    request_timeout: Duration,

    /// Close idle HTTP/1 and HTTP/2 connections
    ///
    /// An HTTP/1 connection whose request head takes longer than this to arrive
    /// (slowloris protection), or that stays idle this long between requests, is closed;
    /// so is an HTTP/2 connection with no request in progress for this long (GOAWAY
    /// first).
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = TIMEOUTS)]
    header_read_timeout: Duration,

    /// Time for requests in flight on SIGINT/SIGTERM
    ///
    /// On SIGINT or SIGTERM the proxy stops accepting, then waits at most this long for
    /// the requests in flight.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = TIMEOUTS)]
    shutdown_timeout: Duration,

    /// Keep a request whose client left this long
    ///
    /// When a client goes away before the response head, its upstream request (and its
    /// key's slot) is kept until the provider answers, at most this long: the provider
    /// goes on working on it, and counts it against the key's concurrency. 0 releases at
    /// once.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds, help_heading = TIMEOUTS)]
    abandoned_grace: Duration,
}

/// `--help`'s headings, one per job.
const KEYS: &str = "Keys";
const UPSTREAM: &str = "Upstream";
const LIMITS: &str = "Limits and waiting";
/// The heading of the replicas' flags ([`SharedArgs`]).
const REPLICAS: &str = "Replicas";
const AFFINITY: &str = "Prompt-cache affinity";
const ADMIN: &str = "Admin and logs";
const TIMEOUTS: &str = "Timeouts";

impl Args {
    /// The configuration these flags describe.
    pub(crate) fn into_config(self) -> ProxyConfig {
        let placement = self.auth.map(|auth| match auth {
            AuthArg::Bearer => Placement::bearer(),
            AuthArg::Header(name) => Placement::header(name),
        });
        let profile = Profile::from(self.profile);
        let keys = match self.keys_file {
            Some(path) => KeysFrom::File(path),
            None => KeysFrom::Env(
                self.keys_env
                    .unwrap_or_else(|| profile.keys_env().to_owned()),
            ),
        };
        let mut config = ProxyConfig::new(self.upstream);
        config.listen = self.listen;
        config.workers = self.workers.and_then(|n| usize::from(n).try_into().ok());
        config.access_token_env = self.access_token_env;
        config.keys = keys;
        config.keys_file_poll = self.keys_file_poll;
        config.selection = self.strategy.into();
        config.profile = profile;
        config.placement = placement;
        config.upstream_ca = self.upstream_ca;
        config.max_in_flight_per_key = self.max_in_flight_per_key.and_then(NonZeroU32::new);
        config.rpm_per_key = self.rpm_per_key.and_then(NonZeroU32::new);
        config.max_wait = self.max_wait;
        config.retries = self.retries;
        config.learn_concurrency = !self.no_learn_concurrency;
        config.count_tokens = self.count_tokens || self.tpm.is_some();
        config.tokens.tpm = self.tpm;
        config.tokens.window = self.token_window;
        config.tokens.default_output = self.default_output_tokens;
        config.retry_body_limit = self.retry_body_limit;
        config.max_body_size = self.max_body_size;
        config.redis = self.shared.into_config();
        config.log_format = self.log_format.into();
        config.connect_timeout = self.connect_timeout;
        config.request_timeout = self.request_timeout;
        config.header_read_timeout = self.header_read_timeout;
        config.shutdown_timeout = self.shutdown_timeout;
        config.abandoned_grace = self.abandoned_grace;
        config.routing.bucket_by_model = self.buckets == BucketsArg::Model;
        config.routing.affinity = self.affinity != AffinityArg::Off;
        config.routing.prefix_affinity = self.affinity == AffinityArg::Prefix;
        config.routing.session_header = self.affinity_header;
        config.affinity.wait = self.affinity_wait;
        config.affinity.ttl = self.affinity_ttl;
        config.affinity.sessions = self.affinity_sessions;
        config
    }
}

/// The flags of replicas sharing state.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = REPLICAS)]
struct SharedArgs {
    /// Share the keys' state with the other replicas through Redis
    ///
    /// Their rests, disables and in-flight caps, through this Redis or Valkey:
    /// `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS) or `unix:///path`;
    /// several `redis://` URLs, comma-separated: nodes of a Redis Cluster. Default: the REDIS_URL variable (better for a password: a command line is visible
    /// to other users); neither: no sharing.
    #[arg(long, value_name = "URL", value_parser = redis_url)]
    redis_url: Option<RedisUrl>,

    /// For a rediss:// URL: trust the CA certificates in this PEM file
    ///
    /// A deployment's own CA, instead of the public roots.
    #[arg(long, value_name = "FILE")]
    redis_ca: Option<PathBuf>,

    /// One namespace per deployment
    ///
    /// The replicas of one deployment share a namespace; other deployments on the same
    /// Redis use others.
    #[arg(long, value_name = "NAME", default_value = "default")]
    redis_namespace: String,

    /// Variable holding a secret shared by the replicas
    ///
    /// It keys the hash that names each API key in Redis (a key's value is never stored).
    /// Without it the namespace keys the hash, and whoever reads Redis can test a guessed
    /// key against it.
    #[arg(long, value_name = "NAME")]
    redis_secret_env: Option<String>,

    /// What to do while Redis is away: split (default), open or closed
    ///
    /// While Redis is unreachable, each replica: `split` each key's cap across the
    /// replicas last seen; `open` uses the whole cap; `closed` makes keys with a cap wait
    /// for Redis.
    #[arg(
        long,
        value_name = "POLICY",
        value_enum,
        default_value_t = PolicyArg::Split,
        hide_default_value = true,
        hide_possible_values = true
    )]
    degraded_policy: PolicyArg,

    /// How long a replica's slots outlive it in Redis, in seconds
    ///
    /// A replica that dies (kill -9, a lost machine) frees its keys' slots within this
    /// plus one heartbeat. Default 5.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = positive_seconds, hide_default_value = true)]
    redis_ttl: Duration,

    /// How often a replica renews its slots in Redis, in seconds
    ///
    /// Keep it well below --redis-ttl. Default 1.
    #[arg(long, value_name = "SECONDS", default_value = "1", value_parser = positive_seconds, hide_default_value = true)]
    redis_heartbeat: Duration,
}

impl SharedArgs {
    fn into_config(self) -> RedisConfig {
        let mut config = RedisConfig::default();
        config.url = self.redis_url;
        config.ca = self.redis_ca;
        config.namespace = self.redis_namespace;
        config.secret_env = self.redis_secret_env;
        config.degraded_policy = self.degraded_policy.into();
        config.ttl = self.redis_ttl;
        config.heartbeat = self.redis_heartbeat;
        config
    }
}

/// A Redis URL may hold a password: parsing never fails (clap would repeat a rejected
/// value in its error); it is checked when used.
fn redis_url(s: &str) -> Result<RedisUrl, String> {
    Ok(RedisUrl::new(s.to_owned()))
}

/// `--degraded-policy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    Split,
    Open,
    Closed,
}

impl From<PolicyArg> for DegradedPolicy {
    fn from(arg: PolicyArg) -> Self {
        match arg {
            PolicyArg::Split => DegradedPolicy::Split,
            PolicyArg::Open => DegradedPolicy::Open,
            PolicyArg::Closed => DegradedPolicy::Closed,
        }
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormatArg {
    /// For people.
    Text,
    /// One object a line, for log shippers.
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(arg: LogFormatArg) -> Self {
        match arg {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

/// `--strategy`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StrategyArg {
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

/// `--affinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AffinityArg {
    /// Requests naming a session go to its key.
    Session,
    /// As `session`; a request naming none goes to its prompt prefix's key.
    Prefix,
    /// Every request by --strategy.
    Off,
}

fn parse_header_name(s: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(s).map_err(|_| format!("`{s}` is not a valid header name"))
}

/// `--profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProfileArg {
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
    /// Google Gemini: a 429's `RetryInfo` and quota ids; the key goes in `x-goog-api-key`.
    Gemini,
}

/// `--buckets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BucketsArg {
    /// Each key's limits, rests and learned concurrency apart per model.
    Model,
    /// One state per key, whatever the model.
    None,
}

impl From<ProfileArg> for Profile {
    fn from(arg: ProfileArg) -> Self {
        match arg {
            ProfileArg::Generic => Profile::Generic,
            ProfileArg::Bigmodel => Profile::Bigmodel,
            ProfileArg::Openai => Profile::Openai,
            ProfileArg::Anthropic => Profile::Anthropic,
            ProfileArg::Gemini => Profile::Gemini,
        }
    }
}

/// `--auth`.
#[derive(Debug, Clone)]
enum AuthArg {
    Bearer,
    Header(HeaderName),
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

/// A value the library validates (`--listen`, `--upstream`), its error in clap's message.
fn parse<T>(s: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e: T::Err| e.to_string())
}

fn positive_seconds(s: &str) -> Result<Duration, String> {
    let duration = seconds(s)?;
    if duration.is_zero() {
        return Err("expected a number of seconds above zero".to_owned());
    }
    Ok(duration)
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| "expected a number of seconds".to_owned())?;
    Duration::try_from_secs_f64(secs)
        .map_err(|_| "expected a non-negative number of seconds".to_owned())
}
