//! What both sides of the proxy's HTTP/1.1 share: the bounds on a head, and writing its
//! field lines.

use bytes::BytesMut;
use http::HeaderValue;

/// At most this many header fields in a head (hyper's default): a request with more gets
/// a 431, a response with more is an error.
pub(crate) const MAX_HEADERS: usize = 100;
/// The largest head (start line and fields, 1xx heads included) taken: a larger request
/// gets a 431, a larger response is an error.
pub(crate) const MAX_HEAD: usize = 64 * 1024;

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
