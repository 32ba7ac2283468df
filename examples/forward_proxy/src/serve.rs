//! The serving loop: one worker thread per core, each a current-thread tokio runtime with
//! its own listener and its own upstream client, sharing the one key pool and the metrics
//! (as nginx's workers share nothing but what must be shared).
//!
//! Why: on a multi-thread runtime a request hops between threads (the accepting worker, the
//! client connection's task, the wake-ups of both), and those hand-offs cost more than the
//! proxying itself (BENCHMARKS.md §3). Here a client connection, its requests and the
//! upstream connections they use stay on one thread; the kernel spreads new connections
//! over the workers' listeners (`SO_REUSEPORT` on one address).
//!
//! Shutdown (SIGINT, SIGTERM): every worker closes its listener; once all are closed (no
//! new connection can arrive), each lets its requests in flight finish, all within
//! `--shutdown-timeout`.

use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::handler::State;

/// How long the kernel's queue of connections not yet accepted may grow, per listener.
const BACKLOG: i32 = 1024;

/// The default `--workers`: the cores this process may run on.
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// One listener per worker on `bound`'s address. `bound` (bound by `--listen`, without
/// `SO_REUSEPORT`) is the only one for a single worker; for more, it is closed and the
/// address (its port, when `--listen` asked for port 0) bound again `workers` times with
/// `SO_REUSEPORT`. Binding without it first keeps "address in use" an error: a socket
/// bound with `SO_REUSEPORT` would share the port with another proxy started on it.
pub(crate) fn listeners(
    bound: TcpListener,
    workers: usize,
) -> Result<Vec<std::net::TcpListener>, String> {
    let addr = bound
        .local_addr()
        .map_err(|e| format!("cannot listen: {e}"))?;
    let bound = bound
        .into_std()
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    if workers <= 1 {
        return Ok(vec![bound]);
    }
    drop(bound);
    (0..workers)
        .map(|_| reuse_port_listener(addr).map_err(|e| format!("cannot listen on {addr}: {e}")))
        .collect()
}

fn reuse_port_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As tokio's own `bind` does: a restart need not wait for old connections' TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Timeouts of every worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// On SIGINT/SIGTERM, how long requests in flight may take to finish.
    pub(crate) shutdown_timeout: Duration,
    /// An HTTP/1 client taking longer than this to send its request headers is cut off.
    pub(crate) header_read_timeout: Duration,
}

/// Runs one worker per `(listener, state)` until SIGINT or SIGTERM, then shuts them down
/// gracefully (see the module docs).
pub(crate) async fn run(workers: Vec<(std::net::TcpListener, State)>, limits: Limits) {
    let (stop, stopped) = watch::channel(false);
    // Each worker holds a sender until its listener is closed.
    let (listening, mut all_closed) = mpsc::channel::<()>(1);
    let mut threads = Vec::with_capacity(workers.len());
    for (index, (listener, state)) in workers.into_iter().enumerate() {
        let stopped = stopped.clone();
        let listening = listening.clone();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{index}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("building a worker's runtime");
                runtime.block_on(worker(
                    listener,
                    Arc::new(state),
                    stopped,
                    listening,
                    limits,
                ))
            })
            .expect("starting a worker thread");
        threads.push(thread);
    }
    drop(listening);

    shutdown_signal().await;
    let _ = stop.send(true);
    // No sender left: every listener is closed.
    let _ = all_closed.recv().await;
    tracing::info!("Shutting down: finishing requests in flight");
    let clean = tokio::task::spawn_blocking(move || {
        // Every thread joined, each worker's own timeout spent.
        let mut clean = true;
        for thread in threads {
            clean &= thread.join().unwrap_or(false);
        }
        clean
    })
    .await
    .unwrap_or(false);
    if clean {
        tracing::info!("Shut down cleanly");
    } else {
        tracing::warn!("Shutdown timed out; dropping requests still in flight");
    }
}

/// Accepts connections (HTTP/1.1 and HTTP/2) on `listener` until `stopped`, then lets the
/// requests in flight finish, for at most the shutdown timeout: `true` if they did.
async fn worker(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
    listening: mpsc::Sender<()>,
    limits: Limits,
) -> bool {
    let listener = TcpListener::from_std(listener).expect("registering a listener");
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper enforces the header timeout only with a timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut stop = pin!(stopped.wait_for(|stop| *stop));
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
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| crate::handler::handle(state.clone(), req));
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
    drop(listening);
    tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_ok()
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
