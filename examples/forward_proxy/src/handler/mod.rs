//! One client request: admit it (`admit`), rewrite it for the upstream (`rewrite`), send
//! it through the key layers, and stream the answer back (`body`); log it (`log`), and let
//! an attempt the provider is working on finish when its client goes away (`abandon`).

mod abandon;
mod admit;
mod body;
mod fields;
mod log;
mod rewrite;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;
use tower::ServiceExt;
use tower_key_rotation::KeyPool;
use tower_key_rotation::pool::TokenReservation;
use tower_key_rotation::retry::{self, ReplayBody, TriedKeys};

use crate::admin;
use crate::answer::{self, Body, ErrorFormat};
use crate::attempts::Attempts;
use crate::config::{AccessToken, LogFormat, Profile, ProxyConfig, TokenBudget, UpstreamUrl};
use crate::h1::server::ReceivedBody;
use crate::metrics::Metrics;
use crate::route::TokenCost;
use crate::upstream::UpstreamClient;
use crate::usage::estimate::{Estimated, Estimator};
use crate::usage::{UsageScan, UsageStrip};

use self::abandon::InFlight;
use self::body::{ClientBody, CountedBody, ExchangeBody, GoneNote, Settle};
pub(crate) use self::fields::BodyFields;
use self::log::access_log;

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
    /// Count the tokens answers report (`--count-tokens`).
    pub(crate) count_tokens: bool,
    /// Ask OpenAI chat streams for their usage (counting tokens, with the OpenAI profile).
    pub(crate) ask_for_usage: bool,
    /// Token budgets: estimates of each request's tokens (`None`: requests carry no cost).
    pub(crate) estimator: Option<Arc<Estimator>>,
    /// The provider, for the bucket a model is metered in.
    pub(crate) profile: Profile,
    /// A request naming no session takes its prompt prefix's hash as its affinity id
    /// (`--affinity prefix`).
    pub(crate) prefix_affinity: bool,
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
        let estimator = TokenBudget::is_on(config)
            .then(|| Arc::new(Estimator::new(config.tokens.default_output)));
        Self {
            metrics: Arc::new(Metrics::new(pool.clone(), estimator.clone())),
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
            count_tokens: config.count_tokens,
            ask_for_usage: config.count_tokens && config.profile == Profile::Openai,
            estimator,
            profile: config.profile,
            prefix_affinity: config.routing.affinity && config.routing.prefix_affinity,
        }
    }
}

/// The keys' names by 0-based index (`None` for a key without one).
pub(crate) type KeyNames = arc_swap::ArcSwap<Vec<Option<String>>>;

/// The names of `pool`'s keys, for [`KeyNames`].
pub(crate) fn key_names(pool: &KeyPool) -> Arc<Vec<Option<String>>> {
    Arc::new(pool.snapshot().into_iter().map(|key| key.name).collect())
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

/// A chat completions stream that did not ask for usage, asking for it: its new body,
/// its `Content-Length` (if any) set to match.
fn asks_for_usage(parts: &mut http::request::Parts, body: &[u8]) -> Option<bytes::Bytes> {
    if !parts.uri.path().ends_with("/chat/completions") {
        return None;
    }
    let asked = crate::usage::ask_for_usage(body)?;
    if parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, asked.len().into());
    }
    Some(asked)
}

/// What became of the request.
async fn proxy(state: &Arc<State>, req: Request<ReceivedBody>, request: &RequestLabel) -> Exchange {
    if let Some(response) = admit::answer_locally(state, &req) {
        return Exchange::local(response);
    }
    let (mut parts, body) = req.into_parts();
    if !rewrite::for_upstream(&mut parts) {
        let response = state.error_format.answer(
            StatusCode::BAD_REQUEST,
            "bad_path",
            "the request path is not valid",
        );
        return Exchange::local(response);
    }
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
    let mut body = match ReplayBody::buffer(body, state.retry_body_limit).await {
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
    // The router reads the model and session from here (a body too large to keep for a
    // retry is not read: it routes as a request naming neither, and a stream in it is not
    // asked for usage).
    let mut asked = None;
    let mut estimated: Option<Estimated> = None;
    if state.pool.routes() || state.ask_for_usage {
        if let Some(bytes) = body.buffered_bytes() {
            let mut fields = BodyFields::read(bytes);
            if state.prefix_affinity && state.pool.routes() && !fields.names_session() {
                fields.prefix = fields::prompt_prefix(bytes);
            }
            if state.ask_for_usage && fields.stream == Some(true) && !fields.stream_options {
                asked = asks_for_usage(&mut parts, bytes);
            }
            if let (Some(estimator), true) = (&state.estimator, state.pool.routes()) {
                // Token budgets: the estimated input and the output allowed.
                let model = fields.model.as_deref().unwrap_or_default();
                let bucket = crate::route::model_bucket(state.profile, model);
                let input = estimator.estimate(bucket, bytes.len());
                let output = fields.max_output.unwrap_or(estimator.default_output);
                parts
                    .extensions
                    .insert(TokenCost(input.input.saturating_add(output)));
                estimated = Some(input);
            }
            if state.pool.routes() {
                // Behind an `Arc`: the retry layer's copy of the extensions clones it.
                parts.extensions.insert(Arc::new(fields));
            }
        }
    }
    let strip_usage = asked.is_some();
    if let Some(asked) = asked {
        body = ReplayBody::buffered(asked);
    }
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
            rewrite::remove_unforwarded(&mut parts.headers, rewrite::Message::Response);
            if parts.extensions.get::<retry::Attempts>().is_some() {
                // We already retried or waited for this answer, or no key can take it
                // again within its wait budget: an SDK retrying it would only stack its
                // retries on ours, or wait past the budget.
                answer::no_more_retries(&mut parts.headers);
            }
            let body = match tried.last() {
                Some(key) if state.count_tokens && parts.status.is_success() => {
                    if strip_usage {
                        // Shorter by what is taken out: its length is not the upstream's.
                        parts.headers.remove(http::header::CONTENT_LENGTH);
                    }
                    let settle = state.estimator.as_ref().map(|estimator| Settle {
                        reservation: parts.extensions.get::<TokenReservation>().cloned(),
                        estimated: estimated.take(),
                        estimator: estimator.clone(),
                    });
                    ExchangeBody::Counted(Box::new(CountedBody {
                        inner: body,
                        scan: UsageScan::default(),
                        strip: strip_usage.then(UsageStrip::default),
                        count: Some((state.metrics.tokens().clone(), key)),
                        settle,
                        upstream_done: false,
                        trailers: None,
                    }))
                }
                _ => ExchangeBody::Upstream(body),
            };
            Response::from_parts(parts, body)
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
