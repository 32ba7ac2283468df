//! What the fuzz targets (`fuzz/`) reach beyond the public API: the crate-private parsers.
//!
//! Compiled only under `--cfg fuzzing`, which cargo-fuzz passes to every crate it builds
//! (through `RUSTFLAGS`), so no feature exposes these in a normal build, on docs.rs or to a
//! dependent crate.

use std::time::{Duration, SystemTime};

/// [`parse_go_duration`](crate::classify::parse_go_duration): a Go-style duration, as
/// OpenAI's `x-ratelimit-reset-*` headers send it.
pub fn parse_go_duration(text: &str) -> Option<Duration> {
    crate::classify::parse_go_duration(text)
}

/// [`parse_rfc3339`](crate::classify::parse_rfc3339): an RFC 3339 time, as Anthropic's
/// `anthropic-ratelimit-*-reset` headers send it.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    crate::classify::parse_rfc3339(text)
}
