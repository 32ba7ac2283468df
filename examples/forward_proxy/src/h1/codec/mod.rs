//! HTTP/1.1 body framing (RFC 9112 §6, §7.1): how long a body is ([`framing`]), and its
//! bytes out of a connection's read buffer, for the client and the server sides alike.
//!
//! Strict where leniency lets two parties disagree about where a message ends (request
//! smuggling): a message with both `Content-Length` and `Transfer-Encoding`, differing or
//! invalid lengths, `chunked` that is not the last coding, a chunk size that is not plain
//! hex or is too long, a bare LF, an oversized extension or trailer section: all are
//! errors, never guesses. hyper and nginx refuse the same.
//!
//! The decoder takes the body's bytes out of the read buffer without copying
//! (`split_to(..).freeze()`) and never reads past the body's end: bytes after it (a
//! pipelined request, or an upstream's extra byte) stay in the buffer for the caller to
//! judge.

mod framing;

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) use self::framing::Framing;
pub(crate) use self::framing::{request_framing, response_framing};

/// At most this many hex digits in a chunk size (a `u64`'s worth, as hyper allows).
const MAX_CHUNK_SIZE_DIGITS: u32 = 16;
/// At most this many bytes of extensions (and white space) on one chunk-size line.
const MAX_CHUNK_EXTENSIONS: u32 = 4096;
/// At most this many bytes of trailer fields after the last chunk (they are discarded).
const MAX_TRAILERS: u32 = 16 * 1024;

/// Why a body could not be decoded. Its `Display` names the problem, never the bytes.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// A chunk size with a non-hex character, none at all, or too many digits.
    InvalidChunkSize,
    /// Chunk extensions longer than the bound.
    ChunkExtensionsTooLong,
    /// A line end that is not CRLF (a bare LF, or bytes where the CRLF after a chunk's
    /// data belongs).
    InvalidLineEnd,
    /// Trailer fields longer than the bound.
    TrailersTooLong,
    /// The connection closed before the body's end.
    Incomplete,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidChunkSize => "an invalid chunk size",
            Self::ChunkExtensionsTooLong => "chunk extensions too long",
            Self::InvalidLineEnd => "a line in the chunked body not ended by CRLF",
            Self::TrailersTooLong => "trailer fields too long",
            Self::Incomplete => "the connection closed before the end of the body",
        })
    }
}

impl std::error::Error for DecodeError {}

/// What [`BodyDecoder::decode`] found in the buffer.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Some of the body (never empty).
    Data(Bytes),
    /// The buffer holds no more of the body: read more, then decode again.
    NeedMore,
    /// The body is complete; the buffer holds only what follows it.
    End,
}

/// Takes one body's bytes out of a connection's read buffer as they arrive.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug)]
pub(crate) struct BodyDecoder {
    state: State,
}

// The chunked states follow the grammar (RFC 9112 §7.1):
//   Size ─hex─► Size ─(SP|HTAB)─► SizeSpace ─;─► Extension ─CR─► SizeLf ─LF─►
//     (size > 0) Data ─0 left─► DataCr ─CR─► DataLf ─LF─► Size
//     (size 0)   TrailerStart ─CR─► EndLf ─LF─► Done
//                TrailerStart ─other─► Trailer ─CR─► TrailerLf ─LF─► TrailerStart
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A `Content-Length` body with this much left (0: done).
    Length(u64),
    /// Reading a chunk size: its value and its digits so far.
    Size {
        size: u64,
        digits: u32,
    },
    /// White space after the size: only `;` or CR may follow.
    SizeSpace {
        size: u64,
        bytes: u32,
    },
    /// Inside chunk extensions (skipped), this many bytes long so far.
    Extension {
        size: u64,
        bytes: u32,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// This much of the current chunk's data left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line), after this many
    /// trailer bytes.
    TrailerStart {
        bytes: u32,
    },
    Trailer {
        bytes: u32,
    },
    TrailerLf {
        bytes: u32,
    },
    /// After the final empty line's CR.
    EndLf,
    UntilClose,
    Done,
}

impl BodyDecoder {
    /// A decoder of a body delimited by `framing`.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size { size: 0, digits: 0 },
            Framing::UntilClose => State::UntilClose,
        };
        Self { state }
    }

    /// The body is complete (everything after it is the next message's).
    pub(crate) fn is_end(&self) -> bool {
        self.state == State::Done
    }

    /// The exact number of body bytes still to come, when the framing tells.
    pub(crate) fn exact_remaining(&self) -> Option<u64> {
        match self.state {
            State::Done => Some(0),
            State::Length(n) => Some(n),
            _ => None,
        }
    }

    /// The next piece of the body out of `buf`, leaving every byte after the body's end
    /// in it.
    ///
    /// # Errors
    ///
    /// A malformed chunked body ([`DecodeError`]); the connection must not be used again.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        match self.state {
            State::Done => return Ok(Decoded::End),
            State::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = take(left, buf.len());
                self.state = if left == n as u64 {
                    State::Done
                } else {
                    State::Length(left - n as u64)
                };
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            State::UntilClose => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                return Ok(Decoded::Data(buf.split().freeze()));
            }
            _ => {}
        }
        // Chunked: walk the framing bytes up to the next data (or the end), then take
        // them out of the buffer at once.
        let mut used = 0;
        let decoded = loop {
            if let State::Data(left) = self.state {
                buf.advance(used);
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = take(left, buf.len());
                self.state = if left == n as u64 {
                    State::DataCr
                } else {
                    State::Data(left - n as u64)
                };
                return Ok(Decoded::Data(buf.split_to(n).freeze()));
            }
            if self.state == State::Done {
                break Decoded::End;
            }
            let Some(&byte) = buf.get(used) else {
                break Decoded::NeedMore;
            };
            used += 1;
            self.state = match self.chunked_step(byte) {
                Ok(state) => state,
                Err(e) => {
                    buf.advance(used);
                    return Err(e);
                }
            };
        };
        buf.advance(used);
        Ok(decoded)
    }

    /// The chunked state after `byte`.
    fn chunked_step(&self, byte: u8) -> Result<State, DecodeError> {
        Ok(match self.state {
            State::Size { size, digits } => match (byte, hex_value(byte)) {
                (_, Some(value)) => {
                    if digits == MAX_CHUNK_SIZE_DIGITS {
                        return Err(DecodeError::InvalidChunkSize);
                    }
                    State::Size {
                        // 16 hex digits fit a u64: no overflow.
                        size: size << 4 | u64::from(value),
                        digits: digits + 1,
                    }
                }
                _ if digits == 0 => return Err(DecodeError::InvalidChunkSize),
                (b'\r', _) => State::SizeLf { size },
                (b';', _) => State::Extension { size, bytes: 1 },
                (b' ' | b'\t', _) => State::SizeSpace { size, bytes: 1 },
                (b'\n', _) => return Err(DecodeError::InvalidLineEnd),
                _ => return Err(DecodeError::InvalidChunkSize),
            },
            State::SizeSpace { size, bytes } => match byte {
                _ if bytes == MAX_CHUNK_EXTENSIONS => {
                    return Err(DecodeError::ChunkExtensionsTooLong);
                }
                b' ' | b'\t' => State::SizeSpace {
                    size,
                    bytes: bytes + 1,
                },
                b';' => State::Extension {
                    size,
                    bytes: bytes + 1,
                },
                b'\r' => State::SizeLf { size },
                b'\n' => return Err(DecodeError::InvalidLineEnd),
                _ => return Err(DecodeError::InvalidChunkSize),
            },
            State::Extension { size, bytes } => match byte {
                b'\r' => State::SizeLf { size },
                b'\n' => return Err(DecodeError::InvalidLineEnd),
                _ if bytes == MAX_CHUNK_EXTENSIONS => {
                    return Err(DecodeError::ChunkExtensionsTooLong);
                }
                _ => State::Extension {
                    size,
                    bytes: bytes + 1,
                },
            },
            State::SizeLf { size } => match byte {
                b'\n' if size == 0 => State::TrailerStart { bytes: 0 },
                b'\n' => State::Data(size),
                _ => return Err(DecodeError::InvalidLineEnd),
            },
            State::DataCr => match byte {
                b'\r' => State::DataLf,
                _ => return Err(DecodeError::InvalidLineEnd),
            },
            State::DataLf => match byte {
                b'\n' => State::Size { size: 0, digits: 0 },
                _ => return Err(DecodeError::InvalidLineEnd),
            },
            State::TrailerStart { bytes } => match byte {
                b'\r' => State::EndLf,
                b'\n' => return Err(DecodeError::InvalidLineEnd),
                _ => trailer_byte(bytes)?,
            },
            State::Trailer { bytes } => match byte {
                b'\r' => State::TrailerLf { bytes },
                b'\n' => return Err(DecodeError::InvalidLineEnd),
                _ => trailer_byte(bytes)?,
            },
            State::TrailerLf { bytes } => match byte {
                b'\n' => State::TrailerStart { bytes },
                _ => return Err(DecodeError::InvalidLineEnd),
            },
            State::EndLf => match byte {
                b'\n' => State::Done,
                _ => return Err(DecodeError::InvalidLineEnd),
            },
            State::Length(_) | State::Data(_) | State::UntilClose | State::Done => {
                unreachable!("not a chunked framing state")
            }
        })
    }

    /// The peer closed the connection: the body's end for [`Framing::UntilClose`].
    ///
    /// # Errors
    ///
    /// [`DecodeError::Incomplete`] for a length or chunked body that has not ended.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn eof(&mut self) -> Result<(), DecodeError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(DecodeError::Incomplete),
        }
    }
}

fn trailer_byte(bytes: u32) -> Result<State, DecodeError> {
    if bytes == MAX_TRAILERS {
        return Err(DecodeError::TrailersTooLong);
    }
    Ok(State::Trailer { bytes: bytes + 1 })
}

/// As much of `left` as `available` holds.
fn take(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Ends a chunk's data.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk and the end of a chunked body (no trailers).
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Appends the size line of a chunk of `len` bytes (`len` in hex, CRLF) to `out`; the
/// chunk's data and [`CHUNK_END`] follow it. A chunk of 0 bytes would end the body: use
/// [`LAST_CHUNK`] for that.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn encode_chunk_head(len: usize, out: &mut BytesMut) {
    debug_assert!(len > 0, "an empty chunk ends the body");
    let mut digits = [0u8; 16];
    let mut start = digits.len();
    let mut n = len;
    loop {
        start -= 1;
        digits[start] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.reserve(digits.len() - start + 2);
    out.extend_from_slice(&digits[start..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::framing::FramingError;
    use super::*;

    /// Everything `input` decodes to, fed in pieces of `step` bytes: the data, how it
    /// ended, and what stayed in the buffer.
    fn decode_all(
        framing: Framing,
        input: &[u8],
        step: usize,
    ) -> (Vec<u8>, Result<Decoded, DecodeError>, Vec<u8>) {
        let mut decoder = BodyDecoder::new(framing);
        let mut buf = BytesMut::new();
        let mut rest = input;
        let mut data = Vec::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(bytes)) => {
                    assert!(!bytes.is_empty());
                    data.extend_from_slice(&bytes);
                }
                Ok(Decoded::NeedMore) if !rest.is_empty() => {
                    let n = step.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
                other => return (data, other, buf.to_vec()),
            }
        }
    }

    #[test]
    fn a_length_body_stops_at_its_end_and_leaves_the_rest() {
        for step in [1, 3, 100] {
            let (data, end, rest) = decode_all(Framing::Length(5), b"hello, next", step);
            assert_eq!(data, b"hello");
            assert_eq!(end, Ok(Decoded::End));
            assert!(b", next".starts_with(&rest), "step {step}: {rest:?}");
        }
    }

    #[test]
    fn a_length_body_cut_short_is_incomplete() {
        let mut decoder = BodyDecoder::new(Framing::Length(5));
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"hel")))
        );
        assert_eq!(decoder.exact_remaining(), Some(2));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::NeedMore));
        assert_eq!(decoder.eof(), Err(DecodeError::Incomplete));
    }

    #[test]
    fn an_until_close_body_ends_at_eof() {
        let mut decoder = BodyDecoder::new(Framing::UntilClose);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"abc")))
        );
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::NeedMore));
        assert_eq!(decoder.eof(), Ok(()));
        assert_eq!(decoder.decode(&mut buf), Ok(Decoded::End));
    }

    #[test]
    fn an_empty_body_ends_at_once() {
        for framing in [Framing::Empty, Framing::Length(0)] {
            let mut decoder = BodyDecoder::new(framing);
            let mut buf = BytesMut::from(&b"HTTP/1.1"[..]);
            assert!(decoder.is_end());
            assert_eq!(decoder.decode(&mut buf), Ok(Decoded::End));
            assert_eq!(&buf[..], b"HTTP/1.1");
        }
    }

    #[test]
    fn a_chunked_body_decodes_however_it_is_split() {
        let input = b"5\r\nhello\r\n1;name=value\r\n,\r\nA \t; x\r\n0123456789\r\n0\r\n\r\nNEXT";
        for step in [1, 2, 5, 7, 1000] {
            let (data, end, rest) = decode_all(Framing::Chunked, input, step);
            assert_eq!(data, b"hello,0123456789", "step {step}");
            assert_eq!(end, Ok(Decoded::End), "step {step}");
            assert!(b"NEXT".starts_with(&rest), "step {step}: {rest:?}");
        }
    }

    #[test]
    fn trailers_are_read_and_discarded() {
        let input = b"3\r\nabc\r\n0\r\nx-one: 1\r\nx-two: 2\r\n\r\nNEXT";
        let (data, end, rest) = decode_all(Framing::Chunked, input, 1000);
        assert_eq!(data, b"abc");
        assert_eq!(end, Ok(Decoded::End));
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn bad_chunk_sizes_are_errors() {
        for input in [
            &b"x\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"+1\r\n",
            b"0x5\r\n",
            b"5 5\r\n",
            b"10000000000000000\r\n",
            b"5\rx",
        ] {
            let (_, end, _) = decode_all(Framing::Chunked, input, 1000);
            assert!(
                matches!(
                    end,
                    Err(DecodeError::InvalidChunkSize | DecodeError::InvalidLineEnd)
                ),
                "{input:?}: {end:?}"
            );
        }
        // The largest size that fits is a size, not an error.
        let (_, end, _) = decode_all(Framing::Chunked, b"ffffffffffffffff\r\n", 1000);
        assert_eq!(end, Ok(Decoded::NeedMore));
    }

    #[test]
    fn bare_line_feeds_are_errors() {
        for input in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"5;ext\nhello",
            b"0\r\n\n",
            b"0\r\nx: y\n\r\n",
        ] {
            let (_, end, _) = decode_all(Framing::Chunked, input, 1000);
            assert_eq!(end, Err(DecodeError::InvalidLineEnd), "{input:?}");
        }
    }

    #[test]
    fn data_longer_than_its_chunk_size_is_an_error() {
        let (data, end, _) = decode_all(Framing::Chunked, b"3\r\nhello\r\n", 1000);
        assert_eq!(data, b"hel");
        assert_eq!(end, Err(DecodeError::InvalidLineEnd));
    }

    #[test]
    fn extensions_and_trailers_are_bounded() {
        let mut long_extension = b"1;".to_vec();
        long_extension.extend(std::iter::repeat_n(b'a', 5000));
        let (_, end, _) = decode_all(Framing::Chunked, &long_extension, 1000);
        assert_eq!(end, Err(DecodeError::ChunkExtensionsTooLong));

        let mut long_space = b"1".to_vec();
        long_space.extend(std::iter::repeat_n(b' ', 5000));
        let (_, end, _) = decode_all(Framing::Chunked, &long_space, 1000);
        assert_eq!(end, Err(DecodeError::ChunkExtensionsTooLong));

        let mut long_trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            long_trailers.extend_from_slice(b"x-a: bbbbb\r\n");
        }
        let (_, end, _) = decode_all(Framing::Chunked, &long_trailers, 1000);
        assert_eq!(end, Err(DecodeError::TrailersTooLong));
    }

    #[test]
    fn an_unfinished_chunked_body_at_eof_is_incomplete() {
        for input in [
            &b""[..],
            b"5\r\nhel",
            b"5\r\nhello\r\n",
            b"0\r\n",
            b"0\r\n\r",
        ] {
            let mut decoder = BodyDecoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(input);
            while let Ok(Decoded::Data(_)) = decoder.decode(&mut buf) {}
            assert_eq!(decoder.eof(), Err(DecodeError::Incomplete), "{input:?}");
        }
    }

    #[test]
    fn encoded_chunks_decode_to_the_same_data() {
        let mut out = BytesMut::new();
        let pieces: [&[u8]; 3] = [b"a", &[b'x'; 300], b"0123456789abcdef"];
        for piece in pieces {
            encode_chunk_head(piece.len(), &mut out);
            out.extend_from_slice(piece);
            out.extend_from_slice(CHUNK_END);
        }
        out.extend_from_slice(LAST_CHUNK);
        assert!(out.starts_with(b"1\r\na\r\n12c\r\n"));
        let (data, end, rest) = decode_all(Framing::Chunked, &out, 1000);
        assert_eq!(data, pieces.concat());
        assert_eq!(end, Ok(Decoded::End));
        assert!(rest.is_empty());
    }

    #[test]
    fn errors_name_the_problem_not_the_value() {
        let text = FramingError::DifferingContentLengths.to_string();
        assert_eq!(text, "several differing Content-Lengths");
        assert_eq!(
            DecodeError::InvalidChunkSize.to_string(),
            "an invalid chunk size"
        );
    }
}
