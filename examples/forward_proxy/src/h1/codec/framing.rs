//! How long a message body is (RFC 9112 §6.3): from a request's or a response's length
//! headers, refusing any a peer could read otherwise.

use std::fmt;

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Method};

/// How a message body is delimited (RFC 9112 §6.3).
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body at all (a request without length headers, a response to HEAD, 1xx, 204,
    /// 304).
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A response without length: its body ends when the connection does.
    UntilClose,
}

/// Why a message's framing headers cannot be trusted. Its `Display` names the problem,
/// never a header's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FramingError {
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked,
    /// `Transfer-Encoding` whose last coding is not `chunked` (on a request), or with
    /// `chunked` before another coding, or empty.
    BadTransferEncoding,
    /// A `Content-Length` that is not a plain decimal number.
    InvalidContentLength,
    /// Several `Content-Length` values that differ.
    DifferingContentLengths,
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LengthAndChunked => "both Content-Length and Transfer-Encoding",
            Self::BadTransferEncoding => "a Transfer-Encoding whose last coding is not chunked",
            Self::InvalidContentLength => "an invalid Content-Length",
            Self::DifferingContentLengths => "several differing Content-Lengths",
        })
    }
}

impl std::error::Error for FramingError {}

/// The framing of a request body: `chunked`, a length, or none (a request never reads
/// until the connection closes).
///
/// # Errors
///
/// Both `Content-Length` and `Transfer-Encoding`, a `Transfer-Encoding` not ending in
/// `chunked` (RFC 9112 §6.3: the server cannot tell the length), an invalid or several
/// differing `Content-Length`s.
pub(crate) fn request_framing(headers: &HeaderMap) -> Result<Framing, FramingError> {
    match length_headers(headers)? {
        Lengths::Chunked => Ok(Framing::Chunked),
        Lengths::OtherCoding => Err(FramingError::BadTransferEncoding),
        Lengths::Length(0) | Lengths::None => Ok(Framing::Empty),
        Lengths::Length(n) => Ok(Framing::Length(n)),
    }
}

/// The framing of the response to a `method` request with `status`: HEAD, 1xx, 204, 304
/// and a successful CONNECT have no body whatever the headers say; a `Transfer-Encoding`
/// that does not end in `chunked`, or no length header at all, means the body runs until
/// the connection closes.
///
/// # Errors
///
/// Both `Content-Length` and `Transfer-Encoding` (allowed by RFC 9112 for a lenient
/// recipient, refused here: no guessing), `chunked` before another coding, an invalid or
/// several differing `Content-Length`s.
pub(crate) fn response_framing(
    method: &Method,
    status: u16,
    headers: &HeaderMap,
) -> Result<Framing, FramingError> {
    if *method == Method::HEAD
        || (100..200).contains(&status)
        || status == 204
        || status == 304
        || (*method == Method::CONNECT && (200..300).contains(&status))
    {
        return Ok(Framing::Empty);
    }
    match length_headers(headers)? {
        Lengths::Chunked => Ok(Framing::Chunked),
        Lengths::OtherCoding | Lengths::None => Ok(Framing::UntilClose),
        Lengths::Length(0) => Ok(Framing::Empty),
        Lengths::Length(n) => Ok(Framing::Length(n)),
    }
}

/// What a message's length headers say, before the request/response rules.
enum Lengths {
    None,
    Length(u64),
    Chunked,
    /// `Transfer-Encoding` whose last coding is another one.
    OtherCoding,
}

fn length_headers(headers: &HeaderMap) -> Result<Lengths, FramingError> {
    // One pass over the few names of a head instead of three hashed lookups (two of them
    // for fields that are usually absent); then one lookup for the field that is there.
    let (mut has_length, mut has_coding) = (false, false);
    for name in headers.keys() {
        has_length |= *name == CONTENT_LENGTH;
        has_coding |= *name == TRANSFER_ENCODING;
    }
    if has_coding {
        if has_length {
            return Err(FramingError::LengthAndChunked);
        }
        // The codings of all the fields in order, empty list elements ignored (RFC 9110
        // §5.6.1); `chunked` must come last and only once.
        let mut last_chunked = None;
        for value in &headers.get_all(TRANSFER_ENCODING) {
            let value = value
                .to_str()
                .map_err(|_| FramingError::BadTransferEncoding)?;
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if last_chunked == Some(true) {
                    return Err(FramingError::BadTransferEncoding);
                }
                last_chunked = Some(coding.eq_ignore_ascii_case("chunked"));
            }
        }
        return match last_chunked {
            Some(true) => Ok(Lengths::Chunked),
            Some(false) => Ok(Lengths::OtherCoding),
            None => Err(FramingError::BadTransferEncoding),
        };
    }
    if !has_length {
        return Ok(Lengths::None);
    }
    // Several fields, or a list in one, are fine when all agree (RFC 9110 §8.6).
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii()).ok_or(FramingError::InvalidContentLength)?;
            match length {
                Some(seen) if seen != n => return Err(FramingError::DifferingContentLengths),
                _ => length = Some(n),
            }
        }
    }
    Ok(Lengths::Length(
        length.ok_or(FramingError::InvalidContentLength)?,
    ))
}

/// Digits only (no sign, no white space inside), not empty, no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn a_request_without_length_headers_has_no_body() {
        assert_eq!(request_framing(&HeaderMap::new()), Ok(Framing::Empty));
        let map = headers(&[("content-length", "0")]);
        assert_eq!(request_framing(&map), Ok(Framing::Empty));
    }

    #[test]
    fn content_length_gives_the_length() {
        let map = headers(&[("content-length", "42")]);
        assert_eq!(request_framing(&map), Ok(Framing::Length(42)));
        assert_eq!(
            response_framing(&Method::POST, 200, &map),
            Ok(Framing::Length(42))
        );
    }

    #[test]
    fn repeated_equal_content_lengths_are_one_length() {
        let map = headers(&[("content-length", "7, 7"), ("content-length", "7")]);
        assert_eq!(request_framing(&map), Ok(Framing::Length(7)));
    }

    #[test]
    fn differing_content_lengths_are_refused() {
        for map in [
            headers(&[("content-length", "7"), ("content-length", "8")]),
            headers(&[("content-length", "7,8")]),
        ] {
            assert_eq!(
                request_framing(&map),
                Err(FramingError::DifferingContentLengths)
            );
            assert_eq!(
                response_framing(&Method::GET, 200, &map),
                Err(FramingError::DifferingContentLengths)
            );
        }
    }

    #[test]
    fn a_content_length_that_is_not_plain_digits_is_refused() {
        for value in [
            "",
            "+5",
            "-1",
            "5 5",
            "0x10",
            "1e3",
            "18446744073709551616",
            "5,",
        ] {
            let map = headers(&[("content-length", value)]);
            assert_eq!(
                request_framing(&map),
                Err(FramingError::InvalidContentLength),
                "{value:?}"
            );
        }
        let map = headers(&[("content-length", "18446744073709551615")]);
        assert_eq!(request_framing(&map), Ok(Framing::Length(u64::MAX)));
    }

    #[test]
    fn length_and_transfer_encoding_together_are_refused() {
        let map = headers(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        assert_eq!(request_framing(&map), Err(FramingError::LengthAndChunked));
        assert_eq!(
            response_framing(&Method::GET, 200, &map),
            Err(FramingError::LengthAndChunked)
        );
    }

    #[test]
    fn chunked_must_be_the_last_coding_once() {
        for value in ["chunked", "gzip, chunked", "CHUNKED", " chunked ,"] {
            let map = headers(&[("transfer-encoding", value)]);
            assert_eq!(request_framing(&map), Ok(Framing::Chunked), "{value:?}");
        }
        let split = headers(&[
            ("transfer-encoding", "gzip"),
            ("transfer-encoding", "chunked"),
        ]);
        assert_eq!(request_framing(&split), Ok(Framing::Chunked));
        for value in ["chunked, gzip", "chunked, chunked", "", " , "] {
            let map = headers(&[("transfer-encoding", value)]);
            assert_eq!(
                request_framing(&map),
                Err(FramingError::BadTransferEncoding),
                "{value:?}"
            );
        }
    }

    #[test]
    fn a_request_with_another_last_coding_is_refused_a_response_reads_to_close() {
        let map = headers(&[("transfer-encoding", "gzip")]);
        assert_eq!(
            request_framing(&map),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            response_framing(&Method::GET, 200, &map),
            Ok(Framing::UntilClose)
        );
    }

    #[test]
    fn a_response_without_length_reads_to_close() {
        assert_eq!(
            response_framing(&Method::GET, 200, &HeaderMap::new()),
            Ok(Framing::UntilClose)
        );
    }

    #[test]
    fn responses_that_have_no_body_ignore_their_length_headers() {
        let map = headers(&[("content-length", "10")]);
        for (method, status) in [
            (Method::HEAD, 200),
            (Method::GET, 100),
            (Method::GET, 204),
            (Method::GET, 304),
            (Method::CONNECT, 200),
        ] {
            assert_eq!(
                response_framing(&method, status, &map),
                Ok(Framing::Empty),
                "{method} {status}"
            );
        }
        let chunked = headers(&[("transfer-encoding", "chunked")]);
        assert_eq!(
            response_framing(&Method::HEAD, 200, &chunked),
            Ok(Framing::Empty)
        );
    }
}
