//! What the fuzz targets (`fuzz/fuzz_targets/`) drive: the HTTP/1 codec and server, and
//! one client connection served as a worker serves it; and what the benches measure (the
//! usage scan of `--count-tokens`). Only with the `fuzzing` feature; not an API.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

pub use crate::h1::codec::{
    BodyDecoder, CHUNK_END, DecodeError, Decoded, Framing, LAST_CHUNK, encode_chunk_head,
};
pub use crate::h1::server::{Config, ReceivedBody, serve};
pub use crate::usage::{Usage, UsageScan, UsageStrip, ask_for_usage};

use crate::Proxy;

/// The HTTP/1 server's configuration: `header_read_timeout`, and whether a client's
/// closed sending side still gets its answers (`half_close`).
pub fn server_config(header_read_timeout: std::time::Duration, half_close: bool) -> Config {
    Config {
        header_read_timeout,
        half_close,
    }
}

/// Serves `stream` as one of `proxy`'s workers serves a client connection (HTTP/1.x, or
/// HTTP/2 when it opens with the preface), until it ends.
pub async fn serve_connection<T>(proxy: &Proxy, stream: T, config: Config)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state: Arc<_> = proxy.state();
    let (_stop, stopping) = watch::channel(false);
    let (open, _ended) = mpsc::channel(1);
    crate::serve::connection(stream, state, config, stopping, open).await;
}
