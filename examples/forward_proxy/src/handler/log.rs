//! The access log: one line per request, and one for a client that went away.

use std::time::Duration;

use http::StatusCode;

use super::{Exchange, RequestLabel, State};
use crate::config::LogFormat;

/// One line per request: `Using key 2/3 (paid): POST /chat/completions -> 200 in 812 ms`
/// (the key's name when it has one), or with `--log-format json` an object with the same
/// facts as fields.
pub(super) fn access_log(
    state: &State,
    request: &RequestLabel,
    exchange: &Exchange,
    status: StatusCode,
    elapsed: Duration,
) {
    let (method, path) = (&request.method, &request.path);
    let keys = state.pool.len();
    let latency_ms = elapsed.as_millis() as u64;
    let waited_ms = exchange.waited.as_millis() as u64;
    let tried = &exchange.tried;
    let names = state.key_names.load();
    let name_of = |key: usize| names.get(key - 1).and_then(Option::as_deref);
    if state.log_format == LogFormat::Json {
        let key = tried.last().copied();
        let key_name = key.and_then(name_of);
        let keys_tried = (tried.len() > 1).then(|| {
            let tried: Vec<String> = tried.iter().map(usize::to_string).collect();
            tried.join(",")
        });
        tracing::info!(
            method = %method,
            path = %path,
            status = status.as_u16(),
            key,
            key_name,
            keys,
            keys_tried,
            attempts = exchange.attempts,
            latency_ms,
            waited_ms,
            "request"
        );
        return;
    }
    /// ` (paid)` after the key's position when the key has a name.
    struct Named<'a>(Option<&'a str>);
    impl std::fmt::Display for Named<'_> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self.0 {
                Some(name) => write!(f, " ({name})"),
                None => Ok(()),
            }
        }
    }
    let waited = WaitedNote(waited_ms);
    match tried.last() {
        Some(&key) if tried.len() > 1 => tracing::info!(
            "Using key {key}/{keys}{}: {method} {path} -> {} in {latency_ms} ms{waited} (keys tried: {tried:?})",
            Named(name_of(key)),
            status.as_u16()
        ),
        Some(&key) => tracing::info!(
            "Using key {key}/{keys}{}: {method} {path} -> {} in {latency_ms} ms{waited}",
            Named(name_of(key)),
            status.as_u16()
        ),
        None => tracing::info!(
            "No key used: {method} {path} -> {} in {latency_ms} ms{waited}",
            status.as_u16()
        ),
    }
}

/// ` (waited N ms for a key)` in the access log, or nothing when N is 0: written into the
/// line as it is formatted, not into a `String` of its own.
struct WaitedNote(u64);

impl std::fmt::Display for WaitedNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => Ok(()),
            ms => write!(f, " (waited {ms} ms for a key)"),
        }
    }
}

/// Logs a client that went away: before the response head (`phase`), or mid-body.
pub(super) fn log_client_gone(
    state: &State,
    request: &RequestLabel,
    key: Option<usize>,
    what: &str,
) {
    let keys = state.pool.len();
    let after_ms = request.started.elapsed().as_millis() as u64;
    let (method, path) = (&request.method, &request.path);
    if state.log_format == LogFormat::Json {
        tracing::info!(
            method = %method,
            path = %path,
            key,
            keys,
            after_ms,
            what,
            "client went away"
        );
        return;
    }
    match key {
        Some(key) => tracing::info!(
            "Client went away: {method} {path} on key {key}/{keys} after {after_ms} ms: {what}"
        ),
        None => tracing::info!("Client went away: {method} {path} after {after_ms} ms: {what}"),
    }
}
