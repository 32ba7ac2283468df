//! The proxy's own HTTP/1.1 on `httparse`: heads are parsed by `httparse`, bodies are
//! delimited by `codec`, shared by both sides so that there is one decoder to trust (and
//! to fuzz: `fuzz/fuzz_targets/h1_codec.rs`); `common` holds what else both sides share.
//! `server` serves the proxy's clients, `client` speaks to the upstream.

pub(crate) mod client;
pub(crate) mod codec;
pub(crate) mod common;
pub(crate) mod server;
