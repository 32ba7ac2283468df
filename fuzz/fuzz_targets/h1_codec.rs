//! The proxy's HTTP/1.1 body decoder (`examples/forward_proxy/src/h1/codec/`, through
//! the crate's `fuzzing` feature) on arbitrary bytes, split at arbitrary points:
//! - it never panics;
//! - the outcome is the same however the input is split: the same data, the same ending
//!   (end, error, or wanting more), the same number of bytes taken from the input (bytes
//!   after the body's end are never taken), the same answer at EOF;
//! - the data is never longer than the input;
//! - a chunked encoding of the input (in pieces cut at the split points) decodes back to
//!   the input, to its end, leaving nothing.
//!
//! Input: a framing byte (and two length bytes for `Length`), a count of split steps and
//! the steps, then the body's bytes.
#![no_main]

use bytes::BytesMut;
use forward_proxy::fuzzing::{
    BodyDecoder, CHUNK_END, DecodeError, Decoded, Framing, LAST_CHUNK, encode_chunk_head,
};
use libfuzzer_sys::fuzz_target;

/// Data, ending (`None`: wanted more when the input ran out), bytes taken, EOF's answer.
type Outcome = (
    Vec<u8>,
    Option<Result<(), DecodeError>>,
    usize,
    Result<(), DecodeError>,
);

fn decode(framing: Framing, input: &[u8], steps: &[usize]) -> Outcome {
    let mut decoder = BodyDecoder::new(framing);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut steps = steps.iter().cycle();
    let mut data = Vec::new();
    let ending = loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Data(bytes)) => {
                assert!(!bytes.is_empty(), "empty data");
                data.extend_from_slice(&bytes);
            }
            Ok(Decoded::NeedMore) if fed < input.len() => {
                let step = steps.next().copied().unwrap_or(input.len());
                let n = step.min(input.len() - fed);
                buf.extend_from_slice(&input[fed..fed + n]);
                fed += n;
            }
            Ok(Decoded::NeedMore) => break None,
            Ok(Decoded::End) => break Some(Ok(())),
            Err(e) => break Some(Err(e)),
        }
    };
    let taken = fed - buf.len();
    if ending == Some(Ok(())) {
        // What follows the body is exactly the rest of the input.
        assert_eq!(&buf[..], &input[taken..fed]);
    }
    let eof = decoder.eof();
    (data, ending, taken, eof)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (framing, rest) = match selector % 4 {
        0 if rest.len() >= 2 => (
            Framing::Length(u64::from(u16::from_be_bytes([rest[0], rest[1]]))),
            &rest[2..],
        ),
        1 => (Framing::Chunked, rest),
        2 => (Framing::UntilClose, rest),
        _ => (Framing::Empty, rest),
    };
    let Some((&count, rest)) = rest.split_first() else {
        return;
    };
    let count = usize::from(count % 8).min(rest.len());
    let steps: Vec<usize> = rest[..count].iter().map(|&b| usize::from(b) + 1).collect();
    let input = &rest[count..];

    let whole = decode(framing, input, &[input.len().max(1)]);
    let split = decode(framing, input, &steps);
    let bytewise = decode(framing, input, &[1]);
    assert!(whole.0.len() <= input.len(), "more data than input");
    assert_eq!(whole, split, "split at {steps:?}");
    assert_eq!(whole, bytewise, "split into single bytes");

    // Chunked encode → decode round trip, in pieces cut by the steps.
    let mut encoded = BytesMut::new();
    let mut left = input;
    let mut pieces = steps.iter().cycle();
    while !left.is_empty() {
        let n = pieces.next().copied().unwrap_or(left.len()).min(left.len());
        encode_chunk_head(n, &mut encoded);
        encoded.extend_from_slice(&left[..n]);
        encoded.extend_from_slice(CHUNK_END);
        left = &left[n..];
    }
    encoded.extend_from_slice(LAST_CHUNK);
    let round = decode(Framing::Chunked, &encoded, &steps);
    assert_eq!(round.0, input, "round trip data");
    assert_eq!(round.1, Some(Ok(())), "round trip end");
    assert_eq!(round.2, encoded.len(), "round trip left bytes");
});
