//! The client over in-memory connections: writing requests, reading answers, reuse.

use std::collections::VecDeque;

use bytes::Bytes;
use http::header;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::*;

/// A request body of given pieces, with or without its exact size known.
struct Pieces {
    pieces: VecDeque<Bytes>,
    exact: bool,
}

impl Pieces {
    fn new(pieces: &[&'static [u8]], exact: bool) -> Self {
        Self {
            pieces: pieces.iter().map(|p| Bytes::from_static(p)).collect(),
            exact,
        }
    }
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.pieces.pop_front().map(|p| Ok(Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.pieces.iter().map(|p| p.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
}

fn parts(method: Method, uri: &str) -> http::request::Parts {
    let (mut parts, ()) = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("x-one", "1")
        .header("content-length", "999")
        .body(())
        .unwrap()
        .into_parts();
    parts.headers.append("x-one", HeaderValue::from_static("2"));
    parts
}

/// Writes the request below the upstream path `/api` and returns the bytes the upstream
/// side received.
async fn written(parts: &http::request::Parts, mut body: Pieces) -> String {
    let (near, mut far) = duplex(64 * 1024);
    let mut conn = Connection::new(near, true);
    let host = HeaderValue::from_static("upstream.test");
    let mut writer = RequestWriter::new(parts, "/api", Some(&host), &body);
    writer.write(&mut conn, Pin::new(&mut body)).await.unwrap();
    drop(conn);
    let mut out = String::new();
    far.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_body_of_known_size_is_sent_with_its_length_behind_the_head() {
    let mut parts = parts(Method::POST, "http://upstream.test/v4/chat?x=1");
    // The client's `Host` names the proxy: the upstream's goes in its place.
    parts
        .headers
        .insert(header::HOST, HeaderValue::from_static("proxy.test"));
    let out = written(&parts, Pieces::new(&[b"{\"a\"", b":1}"], true)).await;
    assert_eq!(
        out,
        "POST /api/v4/chat?x=1 HTTP/1.1\r\nhost: upstream.test\r\nx-one: 1\r\nx-one: 2\r\n\
         content-length: 7\r\n\r\n{\"a\":1}"
    );
}

#[tokio::test]
async fn a_body_of_unknown_size_is_chunked() {
    let parts = parts(Method::POST, "/stream");
    let out = written(&parts, Pieces::new(&[b"hello", b"", b" world"], false)).await;
    assert!(
        out.ends_with("transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    );
    assert!(!out.contains("content-length"), "{out}");
}

#[tokio::test]
async fn an_empty_body_is_announced_only_where_a_body_means_something() {
    let get = written(&parts(Method::GET, "/"), Pieces::new(&[], true)).await;
    assert!(get.ends_with("x-one: 2\r\n\r\n"), "{get}");
    let post = written(&parts(Method::POST, "/"), Pieces::new(&[], true)).await;
    assert!(post.ends_with("content-length: 0\r\n\r\n"), "{post}");
}

#[tokio::test]
async fn a_body_longer_than_its_size_is_an_error() {
    struct Lying(Pieces);
    impl Body for Lying {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Pin::new(&mut self.0).poll_frame(cx)
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(3)
        }
    }
    let (near, _far) = duplex(1024);
    let mut conn = Connection::new(near, true);
    let mut body = Lying(Pieces::new(&[b"four"], false));
    let mut writer = RequestWriter::new(&parts(Method::POST, "/"), "", None, &body);
    let error = writer
        .write(&mut conn, Pin::new(&mut body))
        .await
        .unwrap_err();
    assert!(matches!(error.kind, Kind::BodyLength), "{error:?}");
}

#[tokio::test]
async fn a_request_whose_first_write_failed_goes_out_whole_on_another_connection() {
    let parts = parts(Method::POST, "/again");
    let mut body = Pieces::new(&[b"payload"], true);
    let mut writer = RequestWriter::new(&parts, "", None, &body);

    let (near, far) = duplex(1024);
    drop(far); // closed by the upstream while idle
    let mut closed = Connection::new(near, true);
    let error = writer
        .write(&mut closed, Pin::new(&mut body))
        .await
        .unwrap_err();
    assert!(error.is_unsent(), "{error:?}");

    let (near, mut far) = duplex(1024);
    let mut fresh = Connection::new(near, true);
    writer.write(&mut fresh, Pin::new(&mut body)).await.unwrap();
    drop(fresh);
    let mut out = String::new();
    far.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("POST /again HTTP/1.1\r\n"), "{out}");
    assert!(out.ends_with("content-length: 7\r\n\r\npayload"), "{out}");
}

#[tokio::test]
async fn a_failed_first_write_is_not_unsent_where_it_may_have_sent_a_part() {
    let mut body = Pieces::new(&[b"payload"], true);
    let mut writer = RequestWriter::new(&parts(Method::POST, "/"), "", None, &body);
    let (near, far) = duplex(1024);
    drop(far);
    let mut tls_like = Connection::new(near, false);
    let error = writer
        .write(&mut tls_like, Pin::new(&mut body))
        .await
        .unwrap_err();
    assert!(!error.is_unsent(), "{error:?}");
}

#[tokio::test]
async fn a_write_failing_after_the_first_bytes_is_not_unsent() {
    // Room for part of the head only: the rest fails once the upstream is gone.
    let (near, mut far) = duplex(8);
    let mut conn = Connection::new(near, true);
    let mut body = Pieces::new(&[b"payload"], true);
    let mut writer = RequestWriter::new(&parts(Method::POST, "/"), "", None, &body);
    let upstream = tokio::spawn(async move {
        let mut first = [0u8; 8];
        far.read_exact(&mut first).await.unwrap();
        // Gone after reading 8 bytes.
    });
    let error = writer
        .write(&mut conn, Pin::new(&mut body))
        .await
        .unwrap_err();
    upstream.await.unwrap();
    assert!(!error.is_unsent(), "{error:?}");
}

async fn connection_with(answer: &'static [u8]) -> (Connection<DuplexStream>, DuplexStream) {
    let (near, mut far) = duplex(64 * 1024);
    far.write_all(answer).await.unwrap();
    (Connection::new(near, true), far)
}

#[tokio::test]
async fn interim_answers_are_skipped_and_the_head_is_parsed() {
    let (mut conn, _far) = connection_with(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nx-a: 1\r\nx-a: 2\r\n\
          content-length: 5\r\n\r\nhello",
    )
    .await;
    let head = conn.read_head(&Method::POST).await.unwrap();
    assert_eq!(head.response.status(), 201);
    assert_eq!(head.response.headers().get_all("x-a").iter().count(), 2);
    assert_eq!(head.framing, Framing::Length(5));
    assert!(head.keep_alive);
    let mut body = ResponseBody::new(conn, &head);
    // The body came with the head: the connection is free at once.
    assert!(body.take_reusable().is_some());
    assert_eq!(body.size_hint().exact(), Some(5));
}

#[tokio::test]
async fn connection_close_and_http_1_0_are_not_kept_alive() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 0\r\n\r\n"[..],
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
    ] {
        let (mut conn, _far) = connection_with(answer).await;
        let head = conn.read_head(&Method::GET).await.unwrap();
        assert!(!head.keep_alive, "{answer:?}");
        let mut body = ResponseBody::new(conn, &head);
        assert!(body.take_reusable().is_none());
    }
}

#[tokio::test]
async fn the_fields_of_this_connection_are_read_here_and_not_handed_on() {
    let (mut conn, _far) = connection_with(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
          x-a: 1\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let head = conn.read_head(&Method::GET).await.unwrap();
    assert!(head.keep_alive);
    let names: Vec<_> = head.response.headers().keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-a", "content-length"]);

    // A `Connection` naming other fields stays, for the proxy to remove them.
    let (mut conn, _far) = connection_with(
        b"HTTP/1.1 200 OK\r\nConnection: close, x-trace\r\nx-trace: 1\r\n\
          content-length: 0\r\n\r\n",
    )
    .await;
    let head = conn.read_head(&Method::GET).await.unwrap();
    assert!(!head.keep_alive);
    assert_eq!(head.response.headers()["connection"], "close, x-trace");
}

#[tokio::test]
async fn too_many_header_fields_are_refused() {
    let mut answer = b"HTTP/1.1 200 OK\r\n".to_vec();
    for n in 0..=MAX_HEADERS {
        answer.extend_from_slice(format!("x-{n}: v\r\n").as_bytes());
    }
    answer.extend_from_slice(b"\r\n");
    let (near, mut far) = duplex(64 * 1024);
    far.write_all(&answer).await.unwrap();
    let mut conn = Connection::new(near, true);
    let error = conn.read_head(&Method::GET).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "the upstream answered with too many header fields"
    );
}

#[tokio::test]
async fn a_head_past_the_bound_is_refused() {
    let (near, mut far) = duplex(256 * 1024);
    let mut answer = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    answer.resize(MAX_HEAD + 10, b'a');
    far.write_all(&answer).await.unwrap();
    let mut conn = Connection::new(near, true);
    let error = conn.read_head(&Method::GET).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "the upstream answered with a head too large"
    );
}

#[tokio::test]
async fn a_closed_or_chatty_idle_connection_is_not_usable() {
    let (near, far) = duplex(1024);
    let mut quiet = Connection::new(near, true);
    assert!(quiet.is_usable());
    drop(far);
    assert!(!quiet.is_usable(), "closed by the upstream");

    let (near, mut far) = duplex(1024);
    let mut chatty = Connection::new(near, true);
    far.write_all(b"H").await.unwrap();
    assert!(!chatty.is_usable(), "bytes nobody asked for");
}

#[tokio::test]
async fn a_body_read_as_it_comes_frees_the_connection_at_its_end() {
    let (near, mut far) = duplex(1024);
    let mut conn = Connection::new(near, true);
    far.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        .await
        .unwrap();
    let head = conn.read_head(&Method::GET).await.unwrap();
    let mut body = ResponseBody::new(conn, &head);
    let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
    assert_eq!(first.unwrap().unwrap().into_data().unwrap(), "abc");
    assert!(body.take_reusable().is_none(), "not ended yet");
    far.write_all(b"0\r\n\r\n").await.unwrap();
    let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
    assert!(end.is_none());
    assert!(body.is_end_stream());
    assert!(body.take_reusable().is_some());
}
