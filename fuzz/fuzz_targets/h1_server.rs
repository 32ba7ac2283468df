//! The proxy's HTTP/1 server (`examples/forward_proxy/src/h1/server/`, with the body
//! codec beside it, through the crate's `fuzzing` feature) on arbitrary bytes, delivered
//! in arbitrary pieces over an in-memory connection, with a trivial handler that reads
//! each request's body and answers `<method> <target> <body length or error>`.
//!
//! Input: the first byte `n` (mod 8) is the number of split points, the next `n` bytes
//! their distances; the rest is what the client sends, in those pieces, then it closes its
//! sending side (the server runs with `half_close`, so it still answers).
//!
//! After each input:
//! - the server neither panicked nor hung (20 s);
//! - everything it wrote parses as a sequence of well-formed HTTP/1.1 answers (a status
//!   line, fields, a `date`, a body framed by `content-length` or chunked, none for HEAD),
//!   with `100 Continue` interims allowed;
//! - its `200` answers are exactly the handler's answers, in the order it gave them (no
//!   answer lost, doubled or reordered), and an error answer (400, 431) is the last thing
//!   on the connection.
#![no_main]

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use forward_proxy::fuzzing::{BodyDecoder, Decoded, Framing, ReceivedBody, server_config};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// What the handler answered, in order: (method, body).
type Answered = Arc<Mutex<Vec<(Method, String)>>>;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8).min(rest.len());
    let (splits, input) = rest.split_at(n);
    if input.len() > 64 * 1024 {
        return;
    }
    let mut pieces = Vec::new();
    let mut input_left = input;
    for &at in splits {
        let at = usize::from(at).min(input_left.len());
        let (piece, tail) = input_left.split_at(at);
        pieces.push(piece.to_vec());
        input_left = tail;
    }
    pieces.push(input_left.to_vec());

    let answered: Answered = Arc::default();
    let log = answered.clone();
    let written = runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let (_stop, stopping) = watch::channel(false);
        let config = server_config(Duration::from_secs(10), true);
        let handler = move |req: Request<ReceivedBody>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let read = match body.collect().await {
                    Ok(body) => body.to_bytes().len().to_string(),
                    Err(_) => "error".to_owned(),
                };
                let text = format!("{} {} {read}", parts.method, parts.uri);
                log.lock().unwrap().push((parts.method, text.clone()));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            }
        };
        // An HTTP/2 preface hands the connection back (for hyper's server): dropped here,
        // which closes it.
        let server = tokio::spawn(async move {
            let _ = forward_proxy::fuzzing::serve(server, config, stopping, handler).await;
        });
        let exchange = async {
            for piece in pieces {
                if client.write_all(&piece).await.is_err() {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            server.await.expect("the server panicked");
            answer
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("the server neither answered nor closed within 20 s")
    });
    check(&written, &answered.lock().unwrap());
});

/// `written` is a sequence of well-formed answers matching `answered` (see the docs).
fn check(written: &[u8], answered: &[(Method, String)]) {
    let mut buf = BytesMut::from(written);
    let mut handler_answers = answered.iter();
    let mut finals = 0;
    while !buf.is_empty() {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        let len = match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            other => panic!("not an answer head ({other:?}): {:?}", String::from_utf8_lossy(&buf)),
        };
        assert_eq!(response.version, Some(1), "not HTTP/1.1");
        let status = response.code.unwrap();
        let field = |name: &str| {
            response
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .collect::<Vec<_>>()
        };
        if status == 100 {
            assert!(response.headers.is_empty());
            let _ = buf.split_to(len);
            continue;
        }
        finals += 1;
        assert_eq!(field("date").len(), 1, "no date");
        let lengths = field("content-length");
        let chunked = field("transfer-encoding") == ["chunked"];
        assert!(lengths.len() <= 1 && !(chunked && !lengths.is_empty()));
        let method = if status == 200 {
            let (method, _) = handler_answers
                .clone()
                .next()
                .expect("a 200 the handler did not give");
            method.clone()
        } else {
            assert!(
                [400, 431, 500].contains(&status),
                "an unexpected status {status}"
            );
            Method::GET
        };
        let framing = if method == Method::HEAD {
            Framing::Empty
        } else if chunked {
            Framing::Chunked
        } else if let Some(len) = lengths.first() {
            Framing::Length(len.parse().expect("a numeric content-length"))
        } else {
            Framing::UntilClose
        };
        let _ = buf.split_to(len);
        let mut decoder = BodyDecoder::new(framing);
        let mut body = Vec::new();
        loop {
            match decoder.decode(&mut buf).expect("a well-framed answer body") {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => break,
                Decoded::NeedMore => {
                    decoder.eof().expect("an answer body cut short");
                    break;
                }
            }
        }
        if status == 200 {
            let (_, text) = handler_answers.next().unwrap();
            if method != Method::HEAD {
                assert_eq!(String::from_utf8_lossy(&body), *text, "answers out of order");
            }
        } else {
            assert!(buf.is_empty(), "something after an error answer");
        }
    }
    assert!(finals >= answered.len());
    assert!(
        handler_answers.next().is_none(),
        "a handler answer never reached the client"
    );
}
