//! The proxy's own HTTP/1.1 on `httparse`: heads are parsed by `httparse`, bodies are
//! delimited by `codec`, shared by both sides so that there is one decoder to trust (and
//! to fuzz: `fuzz/fuzz_targets/h1_codec.rs`). `server` serves the proxy's clients,
//! `client` speaks to the upstream.

pub(crate) mod client;
pub(crate) mod codec;
pub(crate) mod server;

use bytes::BytesMut;
use http::HeaderValue;

/// Writes one header field line, `name: value` and CRLF (the value is a `HeaderValue`'s
/// bytes or our own: no CR or LF in it).
pub(crate) fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the `content-length` field for `len`, without allocating.
pub(crate) fn put_content_length(out: &mut BytesMut, len: u64) {
    put_field(
        out,
        b"content-length",
        itoa::Buffer::new().format(len).as_bytes(),
    );
}

/// Does any of `values` (fields holding comma-separated lists, as `Connection`) hold
/// `token`, in any case?
pub(crate) fn has_token<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
    token: &[u8],
) -> bool {
    values.into_iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
    })
}
