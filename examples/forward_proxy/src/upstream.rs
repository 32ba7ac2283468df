//! The client side: each worker's upstream connections (`connections`) over rustls,
//! wrapped in the key layers.
//!
//! Order matters (see the crate docs): retry outside, so each attempt reserves its own key
//! (and waits for one within the pool's wait budget, `--max-wait`); the response-head
//! timeout inside, so that a key which timed out is counted as a failure of that key.

use std::time::Duration;

use http_body_util::Limited;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::CertificateDer;
use tower::timeout::{Timeout, TimeoutLayer};
use tower::{BoxError, ServiceBuilder};
use tower_key_rotation::retry::{ReplayBody, Retry, RetryLayer};
use tower_key_rotation::{KeyPool, KeyRotation, KeyRotationLayer, Placement};

use crate::attempts::{AttemptTimer, AttemptTimerLayer};
use crate::config::{ProxyConfig, UpstreamUrl};
use crate::connections::{ConnectError, Connections};
use crate::error::StartError;
use crate::h1::server::ReceivedBody;

/// A client's request body as sent upstream: cut at `--max-body-size`, buffered for a
/// retry up to `--retry-body-limit`.
pub(crate) type RequestBody = ReplayBody<Limited<ReceivedBody>>;
/// The whole client stack, one clone per request.
pub(crate) type UpstreamClient =
    Retry<KeyRotation<AttemptTimer<Timeout<Connections<RequestBody>>>>>;

/// What a worker's client stack is made of.
#[derive(Clone)]
pub(crate) struct Options {
    /// The upstream's URL (its scheme, host, port and path).
    pub(crate) upstream: UpstreamUrl,
    pub(crate) placement: Placement,
    pub(crate) retries: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    /// Trusted besides the public web roots (`--upstream-ca`).
    pub(crate) extra_roots: Vec<CertificateDer<'static>>,
}

impl Options {
    /// The options `config` gives, with `extra_roots` read from its `upstream_ca` by the
    /// caller.
    pub(crate) fn new(config: &ProxyConfig, extra_roots: Vec<CertificateDer<'static>>) -> Self {
        Self {
            upstream: config.upstream.clone(),
            placement: config.placement(),
            retries: config.retries,
            connect_timeout: config.connect_timeout,
            request_timeout: config.request_timeout,
            extra_roots,
        }
    }
}

/// A worker's client stack over `pool`.
pub(crate) fn build(pool: &KeyPool, options: Options) -> Result<UpstreamClient, StartError> {
    let tls = crate::tls::client_config(options.extra_roots)?;
    let mut http = HttpConnector::new();
    // The scheme is checked by the TLS connector, which lets `http://` through as plain.
    http.enforce_http(false);
    http.set_connect_timeout(Some(options.connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let client = Connections::new(https, &options.upstream);

    Ok(ServiceBuilder::new()
        .layer(
            RetryLayer::new(pool.clone())
                .max_retries(options.retries)
                .retry_error_if(is_connect_error),
        )
        .layer(KeyRotationLayer::new(pool.clone()).placement(options.placement))
        .layer(AttemptTimerLayer)
        .layer(TimeoutLayer::new(options.request_timeout))
        .service(client))
}

/// A connection that failed before any byte of the request was sent (refused, DNS, TLS
/// handshake): safe to send again. A connect timeout is not retried: it already took
/// `--connect-timeout`, and another key would not reach the host any faster.
fn is_connect_error(error: &BoxError) -> bool {
    error.is::<ConnectError>() && !crate::answer::is_timeout(error.as_ref())
}
