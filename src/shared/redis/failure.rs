//! [`RedisFailure`]: why the store could not be reached, in words, naming the server's host
//! and port (never the URL, which may hold a password).

use std::error::Error as StdError;
use std::fmt;

/// Why the last call to the store failed: see [`RedisBackend::last_failure`].
///
/// Its `Display` names the server (`Redis at host:port: ...`) and the reason, never the
/// URL's user or password.
///
/// [`RedisBackend::last_failure`]: super::RedisBackend::last_failure
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisFailure {
    message: String,
    certificate: bool,
}

impl RedisFailure {
    /// The server's TLS certificate was refused: a configuration error (a missing or wrong
    /// CA, a name or date that does not fit), which waiting will not mend.
    pub fn is_certificate(&self) -> bool {
        self.certificate
    }

    /// A failure of a call to `server` (`host:port`, or a socket's path).
    pub(super) fn of(server: &str, error: &redis::RedisError) -> Self {
        // The kind and, for an I/O error, its words (the system's, or rustls's for a TLS
        // failure): neither holds the URL.
        let reason = match error.kind() {
            redis::ErrorKind::Io => match error.source() {
                Some(io) => format!("{io}"),
                None => "an I/O error".to_owned(),
            },
            kind => format!("{kind:?}"),
        };
        #[cfg(feature = "redis-tls")]
        if let Some(reason) = certificate_refused(&reason) {
            return Self {
                message: format!("Redis at {server}: its TLS certificate was refused: {reason}"),
                certificate: true,
            };
        }
        Self {
            message: format!("Redis at {server}: {reason}"),
            certificate: false,
        }
    }

    /// No answer within the budget.
    pub(super) fn timeout(server: &str, budget: std::time::Duration) -> Self {
        Self {
            message: format!("Redis at {server}: no answer within {budget:?}"),
            certificate: false,
        }
    }
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for RedisFailure {}

/// A refused certificate's reason in words, if `text` is rustls's refusal of one.
///
/// The redis crate keeps the rustls error inside an I/O error it does not hand out, so the
/// error is known by its text, compared with rustls's own wording of each case (the same
/// rustls builds both).
#[cfg(feature = "redis-tls")]
fn certificate_refused(text: &str) -> Option<String> {
    use rustls::CertificateError as E;
    let refused = |error: E| rustls::Error::InvalidCertificate(error).to_string();
    let prefix = refused(E::BadEncoding);
    let prefix = &prefix[..prefix.find(": ")? + 2];
    let detail = text.strip_prefix(prefix)?;
    let cases = [
        (
            E::UnknownIssuer,
            "it is signed by an unknown issuer: neither a public CA nor the CA given",
        ),
        (E::Expired, "it has expired"),
        (
            E::NotValidYet,
            "it is not valid yet (is this machine's clock right?)",
        ),
        (
            E::NotValidForName,
            "it is for another name than the server's host",
        ),
        (E::Revoked, "it has been revoked"),
        (E::BadSignature, "its signature is invalid"),
        (E::InvalidPurpose, "it is not meant for a TLS server"),
        (E::BadEncoding, "it cannot be parsed"),
    ];
    Some(
        cases
            .into_iter()
            .find(|(error, _)| refused(error.clone()) == text)
            .map_or_else(|| detail.to_owned(), |(_, words)| words.to_owned()),
    )
}

#[cfg(all(test, feature = "redis-tls"))]
mod tests {
    use super::*;

    #[test]
    fn a_refused_certificate_is_told_in_words() {
        let text =
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer).to_string();
        assert_eq!(
            certificate_refused(&text).as_deref(),
            Some("it is signed by an unknown issuer: neither a public CA nor the CA given")
        );
        assert_eq!(
            certificate_refused("Connection refused (os error 111)"),
            None
        );
    }
}
