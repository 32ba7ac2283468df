//! The upstream's HTTP/2 side: when the upstream offers HTTP/2 (ALPN), each worker keeps
//! one multiplexed connection to it, on hyper's connection-level client, shared by all
//! the worker's requests ([`Multiplexed`]).

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tower::BoxError;

/// A worker's HTTP/2 connection to the upstream, while it is open.
pub(crate) struct Multiplexed<B> {
    sender: Mutex<Option<http2::SendRequest<B>>>,
}

impl<B> Default for Multiplexed<B> {
    fn default() -> Self {
        Self {
            sender: Mutex::new(None),
        }
    }
}

impl<B> Multiplexed<B> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<http2::SendRequest<B>>> {
        // Nothing panics while holding it; a poisoned lock still holds a valid sender.
        self.sender.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shared HTTP/2 connection, while it is open.
    pub(crate) fn current(&self) -> Option<http2::SendRequest<B>> {
        let mut sender = self.lock();
        match &*sender {
            Some(open) if !open.is_closed() => Some(open.clone()),
            Some(_) => {
                *sender = None;
                None
            }
            None => None,
        }
    }

    /// Opens HTTP/2 on `io` (ALPN chose it) and makes it the shared connection; its
    /// connection task runs on the worker's runtime until the connection ends.
    pub(crate) async fn handshake<T>(&self, io: T) -> Result<http2::SendRequest<B>, hyper::Error>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended with an error: {e}");
            }
        });
        *self.lock() = Some(sender.clone());
        Ok(sender)
    }
}
