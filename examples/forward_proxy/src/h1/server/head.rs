//! Request heads: parsed in place by `httparse` ([`parse_head`]), refused when malformed or
//! too large, and their body framing ([`framing`]).

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};
use std::mem::MaybeUninit;
use tower::BoxError;

use crate::h1::codec::{self, Framing};
use crate::h1::common::{MAX_HEAD, MAX_HEADERS, has_token};

/// A request head, parsed.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) parts: http::request::Parts,
    /// The client keeps the connection open after the answer (HTTP/1.1 unless
    /// `connection: close`; HTTP/1.0 only with `connection: keep-alive`).
    pub(crate) keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for a `100 Continue` before it
    /// sends the body.
    pub(crate) expect_continue: bool,
}

/// Why a head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadError {
    /// Not a valid HTTP/1.x request head: 400.
    Malformed(&'static str),
    /// More fields or bytes than taken: 431.
    TooLarge,
}

impl HeadError {
    pub(super) fn status(self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        }
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is incomplete; once
/// complete, the head is taken out of `buf` (what follows, a body or the next request,
/// stays) and its target and field values are slices of it (no copy).
///
/// # Errors
///
/// [`HeadError`] for a head the server refuses (see the module docs).
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    // Uninitialised: zeroing 100 fields per parse costs more than the parse.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(HeadError::TooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => {
            return Err(HeadError::Malformed(match e {
                httparse::Error::HeaderName => "invalid header name",
                httparse::Error::HeaderValue => "invalid header value",
                httparse::Error::NewLine => "invalid line end",
                httparse::Error::Token => "invalid method",
                httparse::Error::Version => "invalid version",
                _ => "invalid request line",
            }));
        }
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    // httparse takes a bare LF as a line end; RFC 9112 §2.2 lets a server refuse it, and
    // a proxy must not read lines another parser would split differently.
    if memchr::memchr_iter(b'\n', &buf[..len]).any(|i| i == 0 || buf[i - 1] != b'\r') {
        return Err(HeadError::Malformed("a bare LF in the head"));
    }
    let base = buf.as_ptr() as usize;
    // Where a slice of the head lies in it (the head is at most MAX_HEAD bytes).
    let span = |s: &[u8]| Span {
        at: (s.as_ptr() as usize - base) as u32,
        len: s.len() as u32,
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| HeadError::Malformed("invalid method"))?;
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let target = span(parsed.path.unwrap_or_default().as_bytes());
    // The fields' places, noted before the head is taken out of `buf` (which httparse's
    // slices borrow): on the stack for the usual few, else on the heap.
    let mut few = [(Span::EMPTY, Span::EMPTY); FEW_HEADERS];
    let many: Vec<(Span, Span)>;
    let spans = if parsed.headers.len() <= FEW_HEADERS {
        for (slot, field) in few.iter_mut().zip(parsed.headers.iter()) {
            *slot = (span(field.name.as_bytes()), span(field.value));
        }
        &few[..parsed.headers.len()]
    } else {
        many = parsed
            .headers
            .iter()
            .map(|field| (span(field.name.as_bytes()), span(field.value)))
            .collect();
        &many[..]
    };
    let head = buf.split_to(len).freeze();

    let uri = Uri::from_maybe_shared(target.of(&head))
        .map_err(|_| HeadError::Malformed("invalid request target"))?;
    // Room for a field or two more: the proxy adds the provider's credential, and a
    // full map would be reallocated for it.
    let mut headers = HeaderMap::with_capacity(spans.len() + 2);
    // `Connection` and `Expect` are read as the fields go by (a name compare), not looked
    // up by hash afterwards.
    let (mut close, mut keep_alive, mut expect) = (false, false, None);
    for &(name, value) in spans {
        let name = HeaderName::from_bytes(name.in_(&head))
            .map_err(|_| HeadError::Malformed("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(value.of(&head))
            .map_err(|_| HeadError::Malformed("invalid header value"))?;
        if name == header::CONNECTION {
            close |= has_token([&value], b"close");
            keep_alive |= has_token([&value], b"keep-alive");
        } else if name == header::EXPECT && expect.is_none() {
            expect = Some(value.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        }
        headers.append(name, value);
    }
    let keep_alive = if version == Version::HTTP_10 {
        keep_alive && !close
    } else {
        !close
    };
    let expect_continue = version == Version::HTTP_11 && expect == Some(true);
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        keep_alive,
        expect_continue,
    }))
}

/// Fields noted on the stack (more go to the heap).
const FEW_HEADERS: usize = 24;

/// A slice of a head by position.
#[derive(Debug, Clone, Copy)]
struct Span {
    at: u32,
    len: u32,
}

impl Span {
    const EMPTY: Self = Self { at: 0, len: 0 };

    fn range(self) -> std::ops::Range<usize> {
        self.at as usize..(self.at + self.len) as usize
    }

    /// The slice of `head`, sharing it.
    fn of(self, head: &Bytes) -> Bytes {
        head.slice(self.range())
    }

    fn in_(self, head: &[u8]) -> &[u8] {
        &head[self.range()]
    }
}

/// The request's body framing; HTTP/1.0 has no transfer codings (RFC 9112 §6.1: a
/// server must treat such a message as faulty).
pub(super) fn framing(parts: &http::request::Parts) -> Result<Framing, BoxError> {
    if parts.version == Version::HTTP_10 && parts.headers.contains_key(header::TRANSFER_ENCODING) {
        return Err("Transfer-Encoding in an HTTP/1.0 request".into());
    }
    Ok(codec::request_framing(&parts.headers)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> (Result<Option<Head>, HeadError>, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let parsed = parse_head(&mut buf);
        (parsed, buf)
    }

    #[test]
    fn a_complete_head_is_taken_and_what_follows_stays() {
        let (head, rest) =
            parse(b"POST /v1/chat?x=1 HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nx-two: 2\r\n\r\nbody");
        let head = head.unwrap().unwrap();
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri, "/v1/chat?x=1");
        assert_eq!(head.parts.version, Version::HTTP_11);
        assert_eq!(head.parts.headers["host"], "a");
        let twos: Vec<_> = head.parts.headers.get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert!(head.keep_alive);
        assert!(!head.expect_continue);
        assert_eq!(&rest[..], b"body");
    }

    #[test]
    fn an_incomplete_head_waits_and_leaves_the_buffer_alone() {
        for raw in [&b"GET / HTTP/1.1\r\nhost: a\r\n"[..], b"GET /", b"G"] {
            let (head, rest) = parse(raw);
            assert!(head.unwrap().is_none());
            assert_eq!(&rest[..], raw);
        }
    }

    #[test]
    fn targets_in_every_form_hyper_took_are_taken() {
        for (raw, target) in [
            (
                &b"GET http://h:1/p?q HTTP/1.1\r\n\r\n"[..],
                "http://h:1/p?q",
            ),
            (b"OPTIONS * HTTP/1.1\r\n\r\n", "*"),
            (b"CONNECT h:443 HTTP/1.1\r\n\r\n", "h:443"),
        ] {
            let head = parse(raw).0.unwrap().unwrap();
            assert_eq!(head.parts.uri.to_string(), target);
        }
    }

    #[test]
    fn keep_alive_and_expect_follow_the_version() {
        let head = |raw: &[u8]| parse(raw).0.unwrap().unwrap();
        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.1\r\nconnection: te, close\r\n\r\n").keep_alive);
        assert!(head(b"POST / HTTP/1.1\r\nexpect: 100-Continue\r\n\r\n").expect_continue);
        assert!(!head(b"POST / HTTP/1.0\r\nexpect: 100-continue\r\n\r\n").expect_continue);
    }

    #[test]
    fn malformed_heads_are_refused() {
        for raw in [
            &b"GET / HTTP/1.1\nhost: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nhost: a\n\r\n",
            b"GET / HTTP/1.1\r\nhost: a\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET /a b HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nx: \x00\r\n\r\n",
            b"G\x01T / HTTP/1.1\r\n\r\n",
        ] {
            let (head, _) = parse(raw);
            assert!(
                matches!(head, Err(HeadError::Malformed(_))),
                "{:?}: {head:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn heads_past_the_limits_are_too_large() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).0.unwrap_err(), HeadError::TooLarge);
        // Long and still incomplete.
        let mut long = b"GET / HTTP/1.1\r\nx: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(parse(&long).0.unwrap_err(), HeadError::TooLarge);
        // Just under, complete: taken.
        long.truncate(MAX_HEAD - 4);
        long.extend_from_slice(b"\r\n\r\n");
        assert!(parse(&long).0.unwrap().is_some());
    }
}
