//! Telling HTTP/2 from HTTP/1.x on a client connection: an HTTP/2 client with prior
//! knowledge opens with the preface ([`http2_preface`]); the bytes read to find out are
//! read again by the HTTP/2 server ([`Rewind`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say of the HTTP/2 preface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preface {
    /// All of it: an HTTP/2 connection.
    Whole,
    /// Its start, so far: read on.
    Partial,
    /// Not it: HTTP/1.x.
    Absent,
}

/// Do the bytes read first on a connection (`read`, not empty) open with the preface?
pub(crate) fn http2_preface(read: &[u8]) -> Preface {
    let n = read.len().min(H2_PREFACE.len());
    if read[..n] != H2_PREFACE[..n] {
        Preface::Absent
    } else if n == H2_PREFACE.len() {
        Preface::Whole
    } else {
        Preface::Partial
    }
}

/// A connection whose first bytes, already read, are read again.
pub(crate) struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub(crate) fn new(inner: T, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_told_whole_in_part_and_absent() {
        assert_eq!(http2_preface(H2_PREFACE), Preface::Whole);
        assert_eq!(
            http2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Preface::Whole
        );
        assert_eq!(http2_preface(b"PRI * HT"), Preface::Partial);
        assert_eq!(http2_preface(b"POST / HTTP/1.1"), Preface::Absent);
        assert_eq!(http2_preface(b"PRI * HTTP/1.1"), Preface::Absent);
    }
}
