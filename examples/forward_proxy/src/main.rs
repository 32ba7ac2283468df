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
//! through Redis: `--redis-url`), `admin` and `metrics`.

mod admin;
mod attempts;
mod config;
mod dotenv;
mod handler;
mod keys;
mod metrics;
mod reload;
mod shared;
mod tls;
mod upstream;

use std::pin::pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower_key_rotation::KeyPool;

use crate::config::{Args, LogFormat};

#[tokio::main]
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
    match args.log_format {
        LogFormat::Text => log.init(),
        // One object a line; the event's fields (`message` among them) under `fields`, so that
        // none can collide with `timestamp` or `level`.
        LogFormat::Json => log.json().init(),
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

    let upstream = upstream::build(
        &pool,
        upstream::Options {
            placement: args.auth.placement(),
            retries: args.retries,
            connect_timeout: args.connect_timeout,
            request_timeout: args.request_timeout,
            extra_roots: match &args.upstream_ca {
                Some(path) => config::load_ca(path)?,
                None => Vec::new(),
            },
        },
    )?;

    let listener = args.listen.bind().await?;
    let listen = listener
        .local_addr()
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
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

    let metrics = metrics::Metrics::new(pool.clone());
    let key_names = Arc::new(handler::KeyNames::new(handler::key_names(&pool)));
    tokio::spawn(reload::run(
        pool.clone(),
        secrets.source,
        secrets.fingerprint,
        args.keys_file_poll,
        hangup,
        metrics.reloads(),
        key_names.clone(),
    ));
    let state = Arc::new(handler::State {
        metrics,
        pool,
        upstream_url,
        upstream,
        access_token: secrets.access_token,
        retry_body_limit: args.retry_body_limit,
        listen,
        max_body_size: args.max_body_size,
        abandoned_grace: args.abandoned_grace,
        log_format: args.log_format,
        key_names,
    });

    serve(
        listener,
        state,
        args.shutdown_timeout,
        args.header_read_timeout,
    )
    .await;
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

/// Accepts connections (HTTP/1.1 and HTTP/2) until SIGINT or SIGTERM, then lets the
/// requests in flight finish, for at most `shutdown_timeout`. An HTTP/1 client that takes
/// longer than `header_read_timeout` to send its request headers is disconnected.
async fn serve(
    listener: TcpListener,
    state: Arc<handler::State>,
    shutdown_timeout: Duration,
    header_read_timeout: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper enforces the header timeout only with a timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let mut signal = pin!(shutdown_signal());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| handler::handle(state.clone(), req));
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended with an error: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!("Shutting down: finishing requests in flight");
    match tokio::time::timeout(shutdown_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("Shut down cleanly"),
        Err(_) => tracing::warn!("Shutdown timed out; dropping requests still in flight"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
