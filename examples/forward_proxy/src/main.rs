//! The `forward_proxy` binary: the command line ([`cli`]) turned into a
//! [`ProxyConfig`](forward_proxy::ProxyConfig), the allocator, logging, and signals
//! (SIGHUP reloads the keys, SIGINT and SIGTERM shut down) around
//! [`Proxy`](forward_proxy::Proxy).
//!
//! Try it:
//!
//! ```sh
//! BIGMODEL_API_KEY=k1,k2,k3 cargo run --release -p forward_proxy -- \
//!     --listen 127.0.0.1:8080 --upstream https://open.bigmodel.cn/api/paas/v4
//! curl http://127.0.0.1:8080/_keyrotation/keys
//!
//! # Or keys by name, with weights and quotas, from a TOML file; edit the file, or
//! # `kill -HUP <pid>`, to reload them without a restart:
//! PAID_KEY=k1 cargo run --release -p forward_proxy -- --keys-file keys.toml \
//!     --profile bigmodel --upstream https://open.bigmodel.cn/api/paas/v4
//! ```

/// mimalloc rather than glibc's malloc: a request allocates ~30 times (header maps, the
/// boxed call, the retry layer's clone), and glibc spent ~8k of a request's ~44k
/// instructions in `malloc`/`free`; mimalloc's thread-local free lists cost a fraction of
/// that, and it reserves no 64 MiB arena per worker thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;

use std::process::ExitCode;

use clap::Parser;
use forward_proxy::Proxy;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::cli::{Args, LogFormatArg};

// Signals and key reloads; the requests are served by the proxy's workers.
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
    // The library logs each reload of the keys; the proxy logs it with where the keys came
    // from and why: one line a reload.
    let level = LevelFilter::from_level(args.log_level);
    let filter = Targets::new().with_default(level).with_target(
        "tower_key_rotation::pool::table",
        level.min(LevelFilter::WARN),
    );
    match args.log_format {
        LogFormatArg::Text => log.finish().with(filter).init(),
        // One object a line; the event's fields (`message` among them) under `fields`, so that
        // none can collide with `timestamp` or `level`.
        LogFormatArg::Json => log.json().finish().with(filter).init(),
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
    // Before the proxy says it listens: from then on a SIGHUP reloads instead of ending
    // the process.
    let hangup = Hangup::install()?;
    let proxy = Proxy::bind(args.into_config())
        .await
        .map_err(|e| format!("{e:#}"))?;
    let reloads = proxy.reload_handle();
    tokio::spawn(async move {
        let mut hangup = hangup;
        loop {
            hangup.recv().await;
            reloads.reload();
        }
    });
    proxy.serve(shutdown_signal()).await;
    Ok(())
}

/// SIGHUP, installed before the proxy says it listens, so that a SIGHUP sent from then on
/// reloads rather than (the default) terminates the process.
struct Hangup {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Hangup {
    fn install() -> Result<Self, String> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| format!("cannot install a SIGHUP handler: {e}"))?;
            Ok(Self { signal })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }
}

/// SIGINT or SIGTERM.
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
