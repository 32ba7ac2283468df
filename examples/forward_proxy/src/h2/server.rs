//! Client connections that speak HTTP/2 (prior knowledge: they open with the preface),
//! served by hyper's HTTP/2 server, with the idle timeout hyper's server lacks.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::detect::Rewind;
use crate::h1::server::ReceivedBody;
use crate::handler::State;

/// Serves a connection that opened with the HTTP/2 preface (`read`: the bytes read so
/// far) with hyper's HTTP/2 server, until it ends or the worker stops. A connection with
/// no request in progress for `idle_timeout` (`--header-read-timeout`, as for an idle
/// HTTP/1 connection) is closed gracefully (GOAWAY): hyper's server has no such timeout,
/// and a client that opens connections and sends nothing would otherwise hold them.
pub(crate) async fn serve<T>(
    stream: T,
    read: bytes::BytesMut,
    state: Arc<State>,
    mut stopping: watch::Receiver<bool>,
    idle_timeout: Duration,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (streams, mut watched) = watch::channel(Streams {
        open: 0,
        idle_since: tokio::time::Instant::now(),
    });
    let streams = Arc::new(streams);
    let counted = streams.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let stream = OpenStream::new(counted.clone());
        let answer = crate::handler::handle(state.clone(), req.map(ReceivedBody::http2));
        async move {
            let response = answer.await?;
            // Open until the answer's body has been sent (or dropped).
            Ok::<_, std::convert::Infallible>(response.map(|body| {
                http_body_util::BodyExt::boxed_unsync(StreamBody {
                    body,
                    _open: stream,
                })
            }))
        }
    });
    let io = TokioIo::new(Rewind::new(stream, read.freeze()));
    let connection = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(io, service);
    let mut connection = pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = async { let _ = stopping.wait_for(|stop| *stop).await; } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = idle_for(&mut watched, idle_timeout) => {
            tracing::debug!("closing an HTTP/2 connection idle for {idle_timeout:?}");
            connection.as_mut().graceful_shutdown();
            // The GOAWAY's last stream is settled by a ping the client answers: one that
            // answers nothing is dropped once idle for another `idle_timeout` (a request
            // it still starts meanwhile is answered first).
            streams.send_modify(|streams| streams.idle_since = tokio::time::Instant::now());
            tokio::select! {
                result = connection.as_mut() => result,
                () = idle_for(&mut watched, idle_timeout) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!("connection ended with an error: {e}");
    }
}

/// The requests in progress on one HTTP/2 connection.
struct Streams {
    open: usize,
    /// When the last one ended (or the connection began).
    idle_since: tokio::time::Instant,
}

/// Counts one request as in progress while it lives.
struct OpenStream(Arc<watch::Sender<Streams>>);

impl OpenStream {
    fn new(streams: Arc<watch::Sender<Streams>>) -> Self {
        streams.send_modify(|streams| streams.open += 1);
        Self(streams)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.send_modify(|streams| {
            streams.open -= 1;
            if streams.open == 0 {
                streams.idle_since = tokio::time::Instant::now();
            }
        });
    }
}

/// An answer's body, holding its request's [`OpenStream`] until it is sent or dropped.
struct StreamBody {
    body: crate::answer::Body,
    _open: OpenStream,
}

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves once no request has been in progress for `timeout`.
async fn idle_for(streams: &mut watch::Receiver<Streams>, timeout: Duration) {
    loop {
        let (open, since) = {
            let streams = streams.borrow_and_update();
            (streams.open, streams.idle_since)
        };
        let changed = if open == 0 {
            tokio::select! {
                () = tokio::time::sleep_until(since + timeout) => return,
                changed = streams.changed() => changed,
            }
        } else {
            streams.changed().await
        };
        if changed.is_err() {
            // The connection's service is gone: the connection is ending on its own.
            std::future::pending::<()>().await;
        }
    }
}
