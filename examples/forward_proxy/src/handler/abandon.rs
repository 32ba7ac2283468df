//! A client that goes away while its request is at the provider: the attempt runs on, its
//! key in flight, within `--abandoned-grace` ([`abandon`]).

use std::sync::Arc;

use http::Request;
use tower_key_rotation::retry::TriedKeys;

use super::log::log_client_gone;
use super::{RequestLabel, State};
use crate::attempts::Attempts;
use crate::upstream::UpstreamClient;

/// The upstream call of a request, as `proxy` drives it.
pub(super) type Call = tower::util::Oneshot<UpstreamClient, Request<crate::upstream::RequestBody>>;

/// A call in progress: dropped before its answer (the client went away), it is abandoned.
pub(super) struct InFlight<'a> {
    pub(super) call: Option<std::pin::Pin<Box<Call>>>,
    pub(super) state: &'a Arc<State>,
    pub(super) request: &'a RequestLabel,
    pub(super) attempts: &'a Attempts,
    pub(super) tried: &'a TriedKeys,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            abandon(
                call,
                Abandoned {
                    state: self.state.clone(),
                    request: self.request.clone(),
                    attempts: self.attempts.clone(),
                    tried: self.tried.clone(),
                },
            );
        }
    }
}

/// What `abandon` needs to log a client that went away.
struct Abandoned {
    state: Arc<State>,
    request: RequestLabel,
    attempts: Attempts,
    tried: TriedKeys,
}

/// A client went away before the response head: lets the call run on in a task of its
/// own while an attempt is at the provider, for at most `--abandoned-grace`.
///
/// Why: a provider does not stop working on a request because the connection it came on
/// closed, and counts it against the key's concurrency until it is done. Cancelling at
/// once would free the key's slot in the proxy while the provider still holds it, and
/// the next request on that key could earn a 429 despite `--max-in-flight-per-key`. So
/// the attempt runs on, its key in flight, until the response head comes (then the
/// response is dropped, which closes a stream the provider would go on generating) or the
/// grace ends. A request still waiting for a key, or between attempts, is cancelled at
/// once: nothing is at the provider, and no key should be spent on it.
fn abandon(call: std::pin::Pin<Box<Call>>, abandoned: Abandoned) {
    let Abandoned {
        state,
        request,
        attempts,
        tried,
    } = abandoned;
    let key = tried.positions().last().copied();
    let grace = state.abandoned_grace;
    if !attempts.at_upstream() || grace.is_zero() {
        let what = if attempts.at_upstream() {
            "before the response head; the upstream request is cancelled (--abandoned-grace 0)"
        } else {
            state.metrics.client_gone_waiting();
            "while waiting for a key; nothing was at the upstream"
        };
        log_client_gone(&state, &request, key, what);
        return;
    }
    log_client_gone(
        &state,
        &request,
        key,
        &format!(
            "before the response head; the key stays in flight until the upstream answers \
             (at most {grace:?})"
        ),
    );
    // The runtime is shutting down when there is none: the call goes with it.
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(within_grace(call, state, request, attempts, tried));
    }
}

/// Drives an abandoned call until its answer, the end of its attempt, or the grace.
async fn within_grace(
    mut call: std::pin::Pin<Box<Call>>,
    state: Arc<State>,
    request: RequestLabel,
    attempts: Attempts,
    tried: TriedKeys,
) {
    let grace = state.abandoned_grace;
    let answered = tokio::time::timeout(grace, async {
        tokio::select! {
            biased;
            result = &mut call => Some(result),
            // The attempt ended (its outcome recorded); a retry would be for no one.
            () = attempts.none_at_upstream() => None,
        }
    })
    .await;
    let keys = state.pool.len();
    let key = tried.positions().last().copied().unwrap_or_default();
    let (method, path) = (&request.method, &request.path);
    match answered {
        Ok(Some(Ok(response))) => tracing::info!(
            "Upstream answered {} on key {key}/{keys} after the client went away: {method} \
             {path}; response dropped, key released",
            response.status().as_u16()
        ),
        Ok(Some(Err(error))) => tracing::info!(
            "Upstream request on key {key}/{keys} failed after the client went away: {method} \
             {path}: {error}"
        ),
        Ok(None) => tracing::info!(
            "Upstream answered on key {key}/{keys} after the client went away: {method} \
             {path}; key released"
        ),
        Err(_) => tracing::info!(
            "Upstream did not answer within {grace:?} after the client went away: {method} \
             {path}; request cancelled, key {key}/{keys} released"
        ),
    }
}
