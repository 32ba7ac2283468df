//! The proxy's HTTP/1 server against hostile and unusual framing, over raw TCP: requests
//! whose body length two parsers could read differently (RFC 9112 §6.3, the ground of
//! request smuggling) are refused with 400 and their connection closed, and none of them
//! reaches the upstream; pipelining, heads in tiny pieces, `Expect: 100-continue`, HEAD and
//! HTTP/1.0 work as a client expects.
//!
//! The mock upstream records every request it gets (`MockUpstream::seen`): "reaches no
//! one" is checked there, not inferred from the status.

mod support;

use std::net::SocketAddr;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY_LIST: &str = "sk-smuggle-a1,sk-smuggle-b2";

async fn proxy_and_upstream() -> (Proxy, MockUpstream) {
    let upstream = MockUpstream::start(|seen| async move {
        reply(200, &format!("{} {}", seen.target, seen.body.len()))
    })
    .await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEY_LIST)
        .arg("--log-level", "debug")
        .start()
        .await;
    (proxy, upstream)
}

/// Writes `raw` on a new connection and reads until the proxy closes it.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    within("the proxy to answer and close", async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
}

/// The status codes of the responses in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text[at + 9..at + 12].parse().ok())
        .collect()
}

/// Each of `cases` is answered 400 alone (the request smuggled behind it is never
/// answered: the connection closes), and nothing reaches the upstream.
async fn refused_and_closed(cases: &[&[u8]]) {
    let (proxy, upstream) = proxy_and_upstream().await;
    for raw in cases {
        let mut raw = raw.to_vec();
        // A second request behind the first: served only if the proxy guessed a framing.
        raw.extend_from_slice(b"GET /smuggled HTTP/1.1\r\nhost: a\r\n\r\n");
        let text = exchange(proxy.addr, &raw).await;
        assert_eq!(
            statuses(&text),
            [400],
            "{:?} -> {text}",
            String::from_utf8_lossy(&raw)
        );
        assert!(text.contains("connection: close"), "{text}");
    }
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    refused_and_closed(&[
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ncontent-length: 0\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn differing_or_invalid_content_lengths_are_refused() {
    refused_and_closed(&[
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 5\r\n\r\nabcde",
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3, 5\r\n\r\nabcde",
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: +3\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0x3\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 99999999999999999999999\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn a_transfer_coding_list_not_ending_in_chunked_is_refused() {
    refused_and_closed(&[
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n0\r\n\r\n",
        // HTTP/1.0 has no transfer codings.
        b"POST /x HTTP/1.0\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn obs_fold_bare_lf_and_a_field_without_colon_are_refused() {
    refused_and_closed(&[
        b"GET /x HTTP/1.1\r\nhost: a\r\nx-folded: one\r\n two\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\n\tx-folded: one\r\n\r\n",
        b"GET /x HTTP/1.1\nhost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\nx-y: z\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost: a\r\nno colon\r\n\r\n",
        b"GET /x HTTP/1.1\r\nhost : a\r\n\r\n",
    ])
    .await;
}

/// A malformed chunked body is refused by the handler once it reads it (the head was
/// fine): 400, nothing forwarded, the connection closed.
#[tokio::test]
async fn malformed_chunked_bodies_are_refused_and_reach_no_one() {
    refused_and_closed(&[
        // Chunk size overflowing 64 bits.
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\nx\r\n0\r\n\r\n",
        // Not hex.
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nx\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n",
        // Bare LF after the size and after the data.
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n1\r\nx\n0\r\n\r\n",
    ])
    .await;
}

#[tokio::test]
async fn a_chunked_body_is_forwarded_whole_and_the_next_request_follows() {
    let (proxy, upstream) = proxy_and_upstream().await;
    let raw = b"POST /chunked HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n\
        5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n\
        GET /after HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    let text = exchange(proxy.addr, raw).await;
    assert_eq!(statuses(&text), [200, 200], "{text}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].target, "/chunked");
    assert_eq!(&seen[0].body[..], b"hello world");
    assert_eq!(seen[1].target, "/after");
}

#[tokio::test]
async fn pipelined_requests_in_one_write_are_answered_in_order() {
    let (proxy, upstream) = proxy_and_upstream().await;
    let raw = b"POST /first HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc\
        GET /second HTTP/1.1\r\nhost: a\r\n\r\n\
        GET /third HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    let text = exchange(proxy.addr, raw).await;
    assert_eq!(statuses(&text), [200, 200, 200], "{text}");
    let first = text.find("/first 3").expect("first answer");
    let second = text.find("/second 0").expect("second answer");
    let third = text.find("/third 0").expect("third answer");
    assert!(first < second && second < third, "{text}");
    assert_eq!(upstream.seen().len(), 3);
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_served() {
    let (proxy, upstream) = proxy_and_upstream().await;
    let raw =
        b"POST /slowly HTTP/1.1\r\nhost: a\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbody";
    let text = within("the trickled request's answer", async {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        for byte in raw {
            stream.write_all(&[*byte]).await.unwrap();
            stream.flush().await.unwrap();
            tokio::task::yield_now().await;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await;
    assert_eq!(statuses(&text), [200], "{text}");
    assert!(text.ends_with("/slowly 4"), "{text}");
    assert_eq!(&upstream.seen()[0].body[..], b"body");
}

#[tokio::test]
async fn expect_100_continue_gets_100_before_the_body_is_sent() {
    let (proxy, upstream) = proxy_and_upstream().await;
    within("the 100-continue exchange", async {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"POST /expect HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        // The client waits for the interim answer before it sends the body.
        let mut interim = Vec::new();
        let mut byte = [0u8; 1];
        while !interim.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "{interim:?}");
            interim.push(byte[0]);
        }
        assert_eq!(interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(upstream.seen().is_empty());
        stream.write_all(b"hello").await.unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        let text = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(statuses(&text), [200], "{text}");
        assert!(text.ends_with("/expect 5"), "{text}");
    })
    .await;
}

#[tokio::test]
async fn head_gets_no_body_and_the_connection_goes_on() {
    let (proxy, upstream) = proxy_and_upstream().await;
    let raw = b"HEAD /head HTTP/1.1\r\nhost: a\r\n\r\nGET /next HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n";
    let text = exchange(proxy.addr, raw).await;
    assert_eq!(statuses(&text), [200, 200], "{text}");
    // The HEAD's answer is a head alone: the next status line follows its blank line.
    let (head_answer, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(rest.starts_with("HTTP/1.1 200"), "{text}");
    assert!(!head_answer.contains("/head"), "{text}");
    assert!(text.ends_with("/next 0"), "{text}");
    assert_eq!(upstream.seen()[0].method, http::Method::HEAD);
}

#[tokio::test]
async fn http_1_0_is_closed_after_the_answer_unless_keep_alive_was_asked() {
    let (proxy, upstream) = proxy_and_upstream().await;
    // Without keep-alive: the proxy closes (read_to_end returns).
    let text = exchange(proxy.addr, b"GET /ten HTTP/1.0\r\nhost: a\r\n\r\n").await;
    assert_eq!(statuses(&text), [200], "{text}");
    assert!(text.contains("content-length: 6"), "{text}");
    assert!(text.ends_with("/ten 0"), "{text}");

    // With keep-alive: a second request on the same connection is answered.
    let raw = b"GET /one HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\nGET /two HTTP/1.0\r\nhost: a\r\n\r\n";
    let text = exchange(proxy.addr, raw).await;
    assert_eq!(statuses(&text), [200, 200], "{text}");
    assert!(text.contains("connection: keep-alive"), "{text}");
    assert_eq!(upstream.seen().len(), 3);
}

#[tokio::test]
async fn responses_carry_a_date_and_their_length() {
    let (proxy, _upstream) = proxy_and_upstream().await;
    let text = exchange(
        proxy.addr,
        b"GET /dated HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let head = text.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
    assert!(head.contains("\r\ndate: "), "{text}");
    assert!(head.contains("\r\ncontent-length: 8"), "{text}");
    assert!(text.ends_with("/dated 0"), "{text}");
}
