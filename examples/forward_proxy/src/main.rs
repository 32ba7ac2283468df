//! A forward proxy that spreads requests over several API keys of one provider, built on
//! `tower_key_rotation`: every backend process talks to this proxy, and the proxy shares
//! one pool of keys among them, resting keys that answered 429 and retrying such requests
//! on a key they have not tried.
//!
//! Try it:
//!
//! ```sh
//! BIGMODEL_API_KEY=k1,k2,k3 cargo run --release -p forward_proxy -- \
//!     --listen 127.0.0.1:8080 --upstream https://open.bigmodel.cn/api/paas/v4
//! curl http://127.0.0.1:8080/_keyrotation/keys
//!
//! # Or keys by name, with weights and quotas, from a TOML file (see `keys`); edit the file,
//! # or `kill -HUP <pid>`, to reload them without a restart:
//! PAID_KEY=k1 cargo run --release -p forward_proxy -- --keys-file keys.toml \
//!     --profile bigmodel --upstream https://open.bigmodel.cn/api/paas/v4
//! ```
//!
//! One module per job: `config` (flags, secrets), `dotenv` (`.env`), `keys` (the key
//! file), `reload` (SIGHUP and key file changes), `handler` (one request, and a client that
//! goes away), `upstream` (client stack), `tls` (certificate checks, failures in words),
//! `attempts` (each attempt's time, for the log), `shared` (replicas sharing keys' state
//! through Redis: `--redis-url`), `admin` and `metrics`; `serve` runs the workers (one
//! runtime per core) and their shutdown; `h1` is the HTTP/1.1 the clients speak to
//! (`h1::server`) and its body framing (`h1::codec`).

/// mimalloc rather than glibc's malloc: a request allocates ~30 times (header maps, the
/// boxed call, the retry layer's clone), and glibc spent ~8k of a request's ~44k
/// instructions in `malloc`/`free`; mimalloc's thread-local free lists cost a fraction of
/// that, and it reserves no 64 MiB arena per worker thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod answer;
mod attempts;
mod config;
mod connections;
mod dotenv;
mod h1;
mod handler;
mod keys;
mod metrics;
mod reload;
mod serve;
mod shared;
mod tls;
mod upstream;

use std::process::ExitCode;

use clap::Parser;
use tower_key_rotation::KeyPool;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{Args, LogFormat};

// Signals and key reloads; the requests are served by `serve`'s workers.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // --help and --version print and exit 0 as usual.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            // clap's whole message: the argument at fault, the valid values, the usage line
            // (a flag's value is never a key: keys come from the environment or files).
            let text = e.render().to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprint!("forward_proxy: error: {text}");
            return ExitCode::from(2);
        }
    };
    let log = tracing_subscriber::fmt()
        .with_max_level(args.log_level)
        .with_writer(std::io::stderr)
        .with_target(false);
    // The library logs each reload of the keys; `reload` logs it with where the keys came
    // from and why: one line a reload.
    let level = LevelFilter::from_level(args.log_level);
    let filter = Targets::new().with_default(level).with_target(
        "tower_key_rotation::pool::table",
        level.min(LevelFilter::WARN),
    );
    match args.log_format {
        LogFormat::Text => log.finish().with(filter).init(),
        // One object a line; the event's fields (`message` among them) under `fields`, so that
        // none can collide with `timestamp` or `level`.
        LogFormat::Json => log.json().finish().with(filter).init(),
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            // One line, no secret: errors name variables and positions only.
            eprintln!("forward_proxy: error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let secrets = config::load_secrets(&args)?;
    let pool = shared::apply(&args.shared, args.pool_builder(secrets.keys))
        .await?
        .build();
    tracing::info!(
        "Loaded {} API key(s) from {}{}",
        pool.len(),
        secrets.source,
        key_names(&pool)
    );
    // Before "Listening": from then on a SIGHUP reloads instead of ending the process.
    let hangup = reload::Hangup::install()?;

    let extra_roots = match &args.upstream_ca {
        Some(path) => config::load_ca(path)?,
        None => Vec::new(),
    };
    let upstream_options = upstream::Options::from_args(&args, extra_roots);
    let upstream = upstream::build(&pool, upstream_options.clone())?;

    let listener = args.listen.bind().await?;
    let listen = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let workers = args
        .workers
        .map_or_else(serve::available_cores, usize::from);
    let listeners = serve::listeners(listener, workers)?;
    if secrets.access_token.is_none() && !listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {listen} without --access-token-env: anyone who can reach this \
             address uses your API keys"
        );
    }
    let upstream_url = args.upstream.clone();
    tracing::info!(
        "Listening on http://{listen}, forwarding to {}://{}{}/",
        upstream_url.scheme,
        upstream_url.authority,
        upstream_url.prefix
    );

    // In the background: a slow resolver does not hold up the start.
    tokio::spawn({
        let upstream = args.upstream.clone();
        async move { upstream.warn_if_unresolved().await }
    });

    let state = handler::State::new(&args, pool.clone(), upstream, secrets.access_token, listen);
    tokio::spawn(reload::run(
        pool.clone(),
        secrets.source,
        secrets.fingerprint,
        args.keys_file_poll,
        hangup,
        state.metrics.reloads(),
        state.key_names.clone(),
    ));
    // Each worker its own upstream client, so that its connections stay on its thread.
    let mut states = vec![state];
    while states.len() < listeners.len() {
        let upstream = upstream::build(&pool, upstream_options.clone())?;
        states.push(handler::State {
            upstream,
            ..states[0].clone()
        });
    }
    let limits = serve::Limits {
        shutdown_timeout: args.shutdown_timeout,
        header_read_timeout: args.header_read_timeout,
    };
    serve::run(listeners.into_iter().zip(states).collect(), limits).await;
    Ok(())
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
