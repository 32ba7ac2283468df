//! The serving loop: one worker thread per core, each a current-thread tokio runtime with
//! its own listener and its own upstream client, sharing the one key pool and the metrics
//! (as nginx's workers share nothing but what must be shared).
//!
//! Why: on a multi-thread runtime a request hops between threads (the accepting worker, the
//! client connection's task, the wake-ups of both), and those hand-offs cost more than the
//! proxying itself. Here a client connection, its requests and the
//! upstream connections they use stay on one thread; the kernel spreads new connections
//! over the workers' listeners (`SO_REUSEPORT` on one address).
//!
//! HTTP/1.x connections are served by `h1::server`, HTTP/2 ones (prior knowledge: the
//! connection opens with the preface, see `detect`) by hyper's server (`h2::server`).
//!
//! Shutdown (the binary's SIGINT, SIGTERM): every worker closes its listener; once all are closed (no
//! new connection can arrive), each closes its idle connections and lets its requests in
//! flight finish (their answers say `connection: close`; HTTP/2 connections get a GOAWAY),
//! all within `--shutdown-timeout`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::error::StartError;
use crate::h1;
use crate::h1::server::Ended;
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
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let addr = bound
        .local_addr()
        .map_err(|e| StartError::caused("cannot listen", e))?;
    let cannot = |e| StartError::caused(format!("cannot listen on {addr}"), e);
    let bound = bound.into_std().map_err(cannot)?;
    if workers <= 1 {
        return Ok(vec![bound]);
    }
    drop(bound);
    (0..workers)
        .map(|_| reuse_port_listener(addr).map_err(cannot))
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

/// Runs one worker per `(listener, state)` until `shutdown` resolves, then shuts them down
/// gracefully (see the module docs).
pub(crate) async fn run(
    workers: Vec<(std::net::TcpListener, State)>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
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

    shutdown.await;
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

/// Accepts connections (HTTP/1.x and HTTP/2) on `listener` until `stopped`, then lets the
/// requests in flight finish, for at most the shutdown timeout: `true` if they did.
async fn worker(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
    listening: mpsc::Sender<()>,
    limits: Limits,
) -> bool {
    let listener = TcpListener::from_std(listener).expect("registering a listener");
    let config = h1::server::Config {
        header_read_timeout: limits.header_read_timeout,
        half_close: false,
    };
    // This worker's own stop signal: its connections wait on it without touching a lock
    // other workers' connections use.
    let (stop, stopping) = watch::channel(false);
    // Each connection holds a sender: none left, every connection has ended.
    let (open, mut all_ended) = mpsc::channel::<()>(1);
    let mut stop_accepting = pin!(stopped.wait_for(|stop| *stop));
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
            _ = &mut stop_accepting => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(
            stream,
            state.clone(),
            config,
            stopping.clone(),
            open.clone(),
        ));
    }
    drop(listener);
    drop(listening);
    let _ = stop.send(true);
    drop(open);
    tokio::time::timeout(limits.shutdown_timeout, all_ended.recv())
        .await
        .is_ok()
}

/// Serves one client connection: HTTP/1.x with our server, HTTP/2 (prior knowledge: the
/// connection starts with the preface) with hyper's. Holds `_open` until it ends.
pub(crate) async fn connection<T>(
    stream: T,
    state: Arc<State>,
    config: h1::server::Config,
    stopping: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = |req| crate::handler::handle(state.clone(), req);
    let (stream, read) = match h1::server::serve(stream, config, stopping.clone(), handler).await {
        Ok(Ended::Closed) => return,
        Ok(Ended::Http2(stream, read)) => (stream, read),
        Err(e) => {
            tracing::debug!("connection ended with an error: {e}");
            return;
        }
    };
    // Boxed: hyper's HTTP/2 connection would otherwise add its size (~1.6 KiB) to every
    // connection's task, HTTP/1 ones included (~1.9 MiB at 1,000 connections).
    Box::pin(crate::h2::server::serve(
        stream,
        read,
        state,
        stopping,
        config.header_read_timeout,
    ))
    .await;
}
