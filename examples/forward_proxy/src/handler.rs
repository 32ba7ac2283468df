//! One client request: admit it, rewrite it for the upstream, send it through the key
//! layers, and stream the answer back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use std::time::Duration;

use tokio::time::Instant;
use tower::{BoxError, ServiceExt};
use tower_key_rotation::KeyPool;
use tower_key_rotation::retry::{self, ReplayBody, TriedKeys};

use crate::admin;
use crate::answer::{self, ErrorFormat};
use crate::attempts::Attempts;
use crate::config::{AccessToken, LogFormat, ProxyConfig, UpstreamUrl};
use crate::h1::server::ReceivedBody;
use crate::metrics::Metrics;
use crate::upstream::UpstreamClient;

/// Every response body the proxy sends: the upstream's, streamed, or its own.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Shared by every connection of a worker; its clones (one per worker) share all but the
/// upstream client.
#[derive(Clone)]
pub(crate) struct State {
    pub(crate) pool: KeyPool,
    pub(crate) upstream_url: UpstreamUrl,
    pub(crate) upstream: UpstreamClient,
    pub(crate) access_token: Option<Arc<AccessToken>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) retry_body_limit: usize,
    pub(crate) listen: SocketAddr,
    pub(crate) max_body_size: u64,
    pub(crate) abandoned_grace: Duration,
    pub(crate) log_format: LogFormat,
    /// The keys' names by position, for the JSON log (updated on reload).
    pub(crate) key_names: Arc<KeyNames>,
    /// The shape of the proxy's own error answers: the profile's provider's.
    pub(crate) error_format: ErrorFormat,
}

impl State {
    /// The state `config` describes, for one worker. `listen` is the address the proxy
    /// answers on (absolute-form targets naming it count as the proxy's own).
    pub(crate) fn new(
        config: &ProxyConfig,
        pool: KeyPool,
        upstream: UpstreamClient,
        access_token: Option<AccessToken>,
        listen: SocketAddr,
    ) -> Self {
        Self {
            metrics: Arc::new(Metrics::new(pool.clone())),
            key_names: Arc::new(KeyNames::new(key_names(&pool))),
            pool,
            upstream_url: config.upstream.clone(),
            upstream,
            access_token: access_token.map(Arc::new),
            retry_body_limit: config.retry_body_limit,
            listen,
            max_body_size: config.max_body_size,
            abandoned_grace: config.abandoned_grace,
            log_format: config.log_format,
            error_format: config.profile.into(),
        }
    }
}

/// The keys' names by 0-based index (`None` for a key without one).
pub(crate) type KeyNames = arc_swap::ArcSwap<Vec<Option<String>>>;

/// The names of `pool`'s keys, for [`KeyNames`].
pub(crate) fn key_names(pool: &KeyPool) -> Arc<Vec<Option<String>>> {
    Arc::new(pool.snapshot().into_iter().map(|key| key.name).collect())
}

pub(crate) fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Serves one request (from the HTTP/1 server or hyper's HTTP/2 one).
pub(crate) async fn handle(
    state: Arc<State>,
    req: Request<ReceivedBody>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    // The path only (`LoggedPath`): a query string is the client's business and stays out
    // of logs. A shared slice of the request's head, not a copy.
    let path = LoggedPath(req.uri().path_and_query().cloned());
    let request = RequestLabel {
        method,
        path,
        started,
    };
    let exchange = proxy(&state, req, &request).await;
    let elapsed = exchange.finished.saturating_duration_since(started);
    let status = exchange.response.status();
    if request.path.path().starts_with(admin::PREFIX) {
        tracing::debug!("{} {} -> {}", request.method, request.path, status.as_u16());
        return Ok(exchange.response.map(ExchangeBody::boxed));
    }
    let tried = &exchange.tried;
    state.metrics.observe(
        status,
        elapsed,
        tried.len().saturating_sub(1),
        exchange.waited,
    );
    access_log(&state, &request, &exchange, status, elapsed);
    if exchange.attempts == 0 {
        return Ok(exchange.response.map(ExchangeBody::boxed));
    }
    // Proxied: note a client that goes away before the body's end.
    let key = exchange.tried.last().copied();
    let (parts, body) = exchange.response.into_parts();
    let body = ClientBody {
        inner: body,
        gone: Some(GoneNote {
            state,
            request,
            key,
        }),
    };
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// A request as the log names it.
#[derive(Clone)]
struct RequestLabel {
    method: Method,
    path: LoggedPath,
    started: Instant,
}

/// A request's path as logged: its target's path, without the query.
#[derive(Clone)]
struct LoggedPath(Option<http::uri::PathAndQuery>);

impl LoggedPath {
    fn path(&self) -> &str {
        self.0.as_ref().map_or("/", http::uri::PathAndQuery::path)
    }
}

impl std::fmt::Display for LoggedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

/// What became of a request.
struct Exchange {
    response: Response<ExchangeBody>,
    /// 1-based positions of the keys tried, in order (empty when the request never
    /// reached the key layer).
    tried: Vec<usize>,
    /// Attempts sent to the upstream.
    attempts: u32,
    /// Time spent waiting for a key (before the first attempt and between attempts).
    waited: Duration,
    /// When the answer's head was ready (one reading of the clock for the latency and
    /// the time waited).
    finished: Instant,
}

impl Exchange {
    fn local(response: Response<Body>) -> Self {
        Self {
            response: response.map(ExchangeBody::Own),
            tried: Vec::new(),
            attempts: 0,
            waited: Duration::ZERO,
            finished: Instant::now(),
        }
    }
}

/// One line per request: `Using key 2/3 (paid): POST /chat/completions -> 200 in 812 ms`
/// (the key's name when it has one), or with `--log-format json` an object with the same
/// facts as fields.
fn access_log(
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
fn log_client_gone(state: &State, request: &RequestLabel, key: Option<usize>, what: &str) {
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

/// The upstream's response body, as the key layer hands it on.
type UpstreamBody = tower_key_rotation::body::TrackedBody<crate::connections::Body>;

/// A response body as [`proxy`] leaves it: the upstream's, or the proxy's own. Kept
/// apart (not boxed) until [`handle`] has wrapped it, so that it is boxed once.
enum ExchangeBody {
    Upstream(UpstreamBody),
    Own(Body),
}

impl ExchangeBody {
    fn boxed(self) -> Body {
        match self {
            Self::Upstream(body) => body.boxed_unsync(),
            Self::Own(body) => body,
        }
    }
}

/// The response body as the client gets it: logs a client that leaves before its end.
struct ClientBody {
    inner: ExchangeBody,
    gone: Option<GoneNote>,
}

struct GoneNote {
    state: Arc<State>,
    request: RequestLabel,
    key: Option<usize>,
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let frame = std::task::ready!(match &mut self.inner {
            ExchangeBody::Upstream(body) => std::pin::Pin::new(body).poll_frame(cx),
            ExchangeBody::Own(body) => std::pin::Pin::new(body).poll_frame(cx),
        });
        if !matches!(frame, Some(Ok(_))) {
            // The end, or the upstream's failure: not the client's doing.
            self.gone = None;
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            ExchangeBody::Upstream(body) => body.is_end_stream(),
            ExchangeBody::Own(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.inner {
            ExchangeBody::Upstream(body) => body.size_hint(),
            ExchangeBody::Own(body) => body.size_hint(),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        if let Some(note) = self.gone.take() {
            if !http_body::Body::is_end_stream(self) {
                log_client_gone(
                    &note.state,
                    &note.request,
                    note.key,
                    "mid-response; the upstream response is dropped and the key released",
                );
            }
        }
    }
}

/// What became of the request.
async fn proxy(state: &Arc<State>, req: Request<ReceivedBody>, request: &RequestLabel) -> Exchange {
    if req.method() == Method::CONNECT {
        let response = state.error_format.answer(
            StatusCode::BAD_REQUEST,
            "connect_not_supported",
            "CONNECT is not supported: this proxy only reaches its configured upstream",
        );
        return Exchange::local(response);
    }
    if let Some(authority) = req.uri().authority() {
        if !is_own_authority(state, authority) {
            let response = state.error_format.answer(
                StatusCode::BAD_REQUEST,
                "foreign_host",
                "this proxy only reaches its configured upstream; send origin-form requests",
            );
            return Exchange::local(response);
        }
    }
    let path = req.uri().path();
    let admitted = state
        .access_token
        .as_ref()
        .is_none_or(|token| presents(token, &req));
    if path.starts_with(admin::PREFIX) {
        if !admitted && !admin::is_public(path) {
            return Exchange::local(answer::unauthorized(state.error_format));
        }
        return Exchange::local(admin::respond(state, req.method(), path));
    }
    if !admitted {
        return Exchange::local(answer::unauthorized(state.error_format));
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > state.max_body_size) {
        return Exchange::local(answer::too_large(state.error_format, state.max_body_size));
    }

    let (mut parts, body) = req.into_parts();
    // Only a path can go under the upstream's path: the asterisk-form `OPTIONS *
    // HTTP/1.1` would be joined into `<prefix>*`, outside it (found by fuzz/proxy_request).
    let within_prefix = parts.uri.path().starts_with('/') && !has_dot_segment(parts.uri.path());
    if !within_prefix {
        let response = state.error_format.answer(
            StatusCode::BAD_REQUEST,
            "bad_path",
            "the request path is not valid",
        );
        return Exchange::local(response);
    }
    // The upstream's connections take the path and query below the upstream URL's path
    // and put the upstream's scheme, host and path in front (`Connections`): an
    // origin-form target goes on as it came, an absolute-form one (HTTP/2, or naming this
    // proxy) loses its scheme and authority.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .map_or_else(|| Uri::from_static("/"), Uri::from);
    }
    // A client's key in the query (Google's `key=`) goes no further than its headers do.
    if let Some(target) = parts.uri.path_and_query().and_then(without_key_parameter) {
        parts.uri = Uri::from(target);
    }
    // The client speaks to us in whatever version; the upstream connection picks its own
    // (HTTP/2 by ALPN where offered).
    parts.version = Version::HTTP_11;
    remove_unforwarded(&mut parts.headers, Message::Request);
    // Only `TriedKeys` (the retry layer then shares it between the copies it keeps for
    // retries instead of copying the extensions); the attempts are followed by this
    // request's clone of the client stack.
    parts.extensions = http::Extensions::new();
    let tried = TriedKeys::new();
    parts.extensions.insert(tried.clone());
    let attempts = Attempts::new();

    // A body without a declared length is cut at the limit (and answered 413).
    let limit = usize::try_from(state.max_body_size).unwrap_or(usize::MAX);
    let body = Limited::new(body, limit);
    let body = match ReplayBody::buffer(body, state.retry_body_limit).await {
        Ok(body) => body,
        Err(error) if error.is::<LengthLimitError>() => {
            return Exchange::local(answer::too_large(state.error_format, state.max_body_size));
        }
        Err(error) => {
            tracing::debug!("reading the request body failed: {error}");
            let response = state.error_format.answer(
                StatusCode::BAD_REQUEST,
                "bad_request_body",
                "the request body could not be read",
            );
            return Exchange::local(response);
        }
    };
    let sent = Instant::now();
    let mut upstream = state.upstream.clone();
    upstream.get_mut().get_mut().follow(attempts.clone());
    let call = upstream.oneshot(Request::from_parts(parts, body));
    // The call is driven here, in the client connection's task. A client going away drops
    // this future: `InFlight` then hands an attempt the provider is working on to a task
    // of its own (see `abandon`) instead of cancelling it.
    let mut in_flight = InFlight {
        call: Some(Box::pin(call)),
        state,
        request,
        attempts: &attempts,
        tried: &tried,
    };
    let result = in_flight.call.as_mut().expect("set above").await;
    in_flight.call = None;
    let finished = Instant::now();
    let waited = finished
        .saturating_duration_since(sent)
        .saturating_sub(attempts.upstream_time());
    let response = match result {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            remove_unforwarded(&mut parts.headers, Message::Response);
            if parts.extensions.get::<retry::Attempts>().is_some() {
                // We already retried or waited for this answer, or no key can take it
                // again within its wait budget: an SDK retrying it would only stack its
                // retries on ours, or wait past the budget.
                answer::no_more_retries(&mut parts.headers);
            }
            Response::from_parts(parts, ExchangeBody::Upstream(body))
        }
        Err(error) => answer::Failure {
            format: state.error_format,
            upstream: state.upstream_url.authority.as_str(),
            max_body_size: state.max_body_size,
        }
        .answer(&error)
        .map(ExchangeBody::Own),
    };
    Exchange {
        response,
        tried: tried.positions(),
        attempts: attempts.count(),
        waited,
        finished,
    }
}

/// The upstream call of a request, as `proxy` drives it.
type Call = tower::util::Oneshot<UpstreamClient, Request<crate::upstream::RequestBody>>;

/// A call in progress: dropped before its answer (the client went away), it is abandoned.
struct InFlight<'a> {
    call: Option<std::pin::Pin<Box<Call>>>,
    state: &'a Arc<State>,
    request: &'a RequestLabel,
    attempts: &'a Attempts,
    tried: &'a TriedKeys,
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

/// `.` and `..` segments (also percent-encoded) would let a request climb out of the
/// upstream's path prefix once the upstream normalises the path.
fn has_dot_segment(path: &str) -> bool {
    // Without a `.` or a `%` there is none: one vectorised scan for the usual path.
    memchr::memchr2(b'.', b'%', path.as_bytes()).is_some() && path.split('/').any(is_dot_segment)
}

/// `.` or `..`, each dot possibly written `%2e` or `%2E` (no allocation: this runs on
/// every request).
fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        rest = match rest {
            [b'.', tail @ ..] => tail,
            [b'%', b'2', e, tail @ ..] if e.eq_ignore_ascii_case(&b'e') => tail,
            _ => return false,
        };
        dots += 1;
    }
    dots == 1 || dots == 2
}

/// Absolute-form targets may name the upstream or this proxy, nothing else: a key must
/// never travel to a host the operator did not configure.
fn is_own_authority(state: &State, authority: &Authority) -> bool {
    if *authority == state.upstream_url.authority {
        return true;
    }
    let port_matches = authority.port_u16() == Some(state.listen.port());
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    port_matches
        && (host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip == state.listen.ip()))
}

/// Which message a field list belongs to (see [`remove_unforwarded`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Message {
    Request,
    Response,
}

/// Removes what the proxy never forwards: the hop-by-hop fields (RFC 9110 §7.6.1), which
/// describe one connection, not the message, and those `Connection` lists; and from a
/// request also the client's credentials (for this proxy: the key layer adds the
/// provider's). The client's `Host` stays: the upstream connections put the upstream's
/// in its place as they write the request (`Connections`).
fn remove_unforwarded(headers: &mut HeaderMap, message: Message) {
    // One pass over the names, no hashing: most messages carry none of them (an upstream's
    // answer at most `Connection`, which our HTTP/1 client already takes out). Names are matched as text (one length test for most):
    // comparing each with the `HeaderName`s cost ~100 instructions a field, and a remove
    // of an absent name ~150 (callgrind, benches/proxy_instructions.sh).
    let mut present = [false; UNFORWARDED.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = unforwarded_index(name.as_str()) {
            if i < HOP_BY_HOP || message == Message::Request {
                present[i] = true;
                any = true;
            }
        }
    }
    if !any {
        return;
    }
    // Names listed in `Connection` (present[0]) beyond those removed below: rarely any
    // (the usual list is `keep-alive`, compared as text, not parsed into a name).
    let mut listed: Vec<HeaderName> = Vec::new();
    if present[0] {
        for value in &headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                let known = UNFORWARDED[..HOP_BY_HOP]
                    .iter()
                    .any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(token));
                if !known {
                    if let Ok(name) = HeaderName::from_bytes(token) {
                        listed.push(name);
                    }
                }
            }
        }
    }
    for name in listed {
        headers.remove(name);
    }
    for (name, present) in UNFORWARDED.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

/// The position of `name` (lowercase, as `HeaderName`s are) in [`UNFORWARDED`].
fn unforwarded_index(name: &str) -> Option<usize> {
    match name {
        "connection" => Some(0),
        "te" => Some(1),
        "trailer" => Some(2),
        "transfer-encoding" => Some(3),
        "upgrade" => Some(4),
        "proxy-authenticate" => Some(5),
        "keep-alive" => Some(6),
        "proxy-connection" => Some(7),
        "authorization" => Some(8),
        "proxy-authorization" => Some(9),
        "x-api-key" => Some(10),
        "api-key" => Some(11),
        "x-goog-api-key" => Some(12),
        _ => None,
    }
}

/// How many of [`UNFORWARDED`] are hop-by-hop (the first ones); the rest are a request's.
const HOP_BY_HOP: usize = 8;

static UNFORWARDED: [HeaderName; 13] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    // The credentials a client may send, in every placement a provider reads (the
    // proxy's access token may arrive in any of them): the pool's key is the only one the
    // provider sees. A client's own key sent along would draw the provider's 401 for it.
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    X_API_KEY,
    HeaderName::from_static("api-key"),
    X_GOOG_API_KEY,
];

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_GOOG_API_KEY: HeaderName = HeaderName::from_static("x-goog-api-key");
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// The query parameter Google's APIs read a key from.
const KEY_PARAMETER: &str = "key";

/// The `path?query` of `target` without its `key` parameters, or `None` when it has none
/// (the usual request: one scan of the query, no allocation).
fn without_key_parameter(target: &http::uri::PathAndQuery) -> Option<http::uri::PathAndQuery> {
    let query = target.query()?;
    if !query.split('&').any(is_key_parameter) {
        return None;
    }
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !is_key_parameter(pair))
        .collect();
    let mut rebuilt = String::with_capacity(target.as_str().len());
    rebuilt.push_str(target.path());
    if !kept.is_empty() {
        rebuilt.push('?');
        rebuilt.push_str(&kept.join("&"));
    }
    // Made of the parts of a valid target: still valid.
    http::uri::PathAndQuery::try_from(rebuilt).ok()
}

/// `key=...` or a bare `key`.
fn is_key_parameter(pair: &str) -> bool {
    pair.split_once('=').map_or(pair, |(name, _)| name) == KEY_PARAMETER
}

/// The value of the first `key` parameter of a query, as sent (not percent-decoded).
fn key_parameter(query: &str) -> Option<&str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(name, value)| (name == KEY_PARAMETER).then_some(value))
}

/// Does the request present the proxy's access token, in any of the places a client's
/// SDK may put a credential (`Authorization: Bearer`, `x-api-key`, `api-key`,
/// `x-goog-api-key`, a `key` query parameter)?
fn presents(token: &AccessToken, req: &Request<ReceivedBody>) -> bool {
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let named = [X_API_KEY, API_KEY, X_GOOG_API_KEY]
        .into_iter()
        .filter_map(|name| headers.get(name).map(HeaderValue::as_bytes));
    let query = req.uri().query().and_then(key_parameter).map(str::as_bytes);
    bearer
        .into_iter()
        .chain(named)
        .chain(query)
        .any(|given| token.matches(given))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition `is_dot_segment` replaced (allocating), as the oracle.
    fn decoded_is_dot(segment: &str) -> bool {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded == "." || decoded == ".."
    }

    #[test]
    fn dot_segments_are_found_in_every_spelling_and_nothing_else() {
        for segment in [
            "",
            ".",
            "..",
            "...",
            "%2e",
            "%2E",
            "%2e%2E",
            ".%2e",
            "%2e.",
            "%2e%2e%2e",
            "%2",
            "%2f",
            "%%2e",
            "%2%2ee",
            ".a",
            "a.",
            "a",
            "%2ex",
            "x%2e",
            "%2E.",
            "..%2e",
        ] {
            assert_eq!(
                is_dot_segment(segment),
                decoded_is_dot(segment),
                "{segment:?}"
            );
        }
        assert!(has_dot_segment("/v4/%2E%2e/admin"));
        assert!(!has_dot_segment("/v4/chat/completions"));
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_lists_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        remove_unforwarded(&mut headers, Message::Response);
        let left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);

        let mut plain = HeaderMap::new();
        plain.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        remove_unforwarded(&mut plain, Message::Response);
        assert_eq!(plain.len(), 1);

        // Listed names in any case and spacing; a listed hop-by-hop name is removed once.
        let mut listed = HeaderMap::new();
        listed.insert(
            header::CONNECTION,
            HeaderValue::from_static(" Keep-Alive ,X-Hop,, close"),
        );
        listed.insert("x-hop", HeaderValue::from_static("1"));
        listed.insert("close", HeaderValue::from_static("1"));
        listed.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        listed.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        remove_unforwarded(&mut listed, Message::Response);
        let left: Vec<&str> = listed.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn a_requests_credentials_are_removed_and_a_responses_are_not() {
        let fields = |message| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_static("proxy.test"));
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
            headers.insert(
                header::PROXY_AUTHORIZATION,
                HeaderValue::from_static("Basic x"),
            );
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            remove_unforwarded(&mut headers, message);
            let left: Vec<String> = headers.keys().map(|n| n.as_str().to_owned()).collect();
            left
        };
        assert_eq!(fields(Message::Request), ["host", "accept"]);
        assert_eq!(
            fields(Message::Response),
            ["host", "authorization", "proxy-authorization", "accept"]
        );
    }

    #[test]
    fn every_unforwarded_name_is_found_at_its_position_and_no_other_name_is() {
        for (i, name) in UNFORWARDED.iter().enumerate() {
            assert_eq!(unforwarded_index(name.as_str()), Some(i), "{name}");
        }
        for name in ["content-type", "host", "connectio", "tes", "x-keep-alive"] {
            assert_eq!(unforwarded_index(name), None, "{name}");
        }
    }
}
