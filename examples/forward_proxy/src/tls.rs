//! TLS to the upstream: rustls with the Mozilla roots plus `--upstream-ca`, a self-signed
//! certificate given with `--upstream-ca` usable as the server's own, and failures told in
//! words.
//!
//! webpki refuses a CA certificate presented as a server's certificate
//! (`CaUsedAsEndEntity`), and `openssl req -x509` makes exactly that by default. When the
//! server presents, byte for byte, a certificate the operator passed with `--upstream-ca`,
//! [`UpstreamVerifier`] accepts it anyway, after webpki has checked its validity period
//! (webpki checks it before the CA flag) and after checking the name; the handshake
//! signature is still checked by webpki, so the server must hold the certificate's key.
//! Everything else is webpki's verdict.

use std::error::Error as StdError;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

use crate::error::StartError;

/// The client configuration for an https upstream.
pub(crate) fn client_config(
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<rustls::ClientConfig, StartError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for cert in &extra_roots {
        roots
            .add(cert.clone())
            .map_err(|e| StartError::caused("--upstream-ca: unusable certificate", e))?;
    }
    // ring, named here rather than left to rustls' process-wide default: it builds with
    // nothing but a C compiler (aws-lc-rs wants cmake).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| StartError::caused("TLS setup", e))?;
    let verifier = UpstreamVerifier {
        webpki,
        pinned: extra_roots,
    };
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::caused("TLS setup", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// webpki, except that a `--upstream-ca` certificate may be the server's own.
#[derive(Debug)]
struct UpstreamVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    /// The `--upstream-ca` certificates.
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for UpstreamVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(error))
                if is_ca_used_as_end_entity(&error)
                    && self
                        .pinned
                        .iter()
                        .any(|c| c.as_ref() == end_entity.as_ref()) =>
            {
                // The validity period passed: webpki checks it before the CA flag.
                let cert = ParsedCertificate::try_from(end_entity)?;
                rustls::client::verify_server_name(&cert, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            verdict => verdict,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

fn is_ca_used_as_end_entity(error: &CertificateError) -> bool {
    matches!(error, CertificateError::Other(other)
        if matches!(other.0.downcast_ref::<webpki::Error>(), Some(webpki::Error::CaUsedAsEndEntity)))
}

/// A TLS failure with the upstream, for the log and the client.
#[derive(Debug)]
pub(crate) struct TlsFailure {
    /// The certificate was refused (else the handshake failed otherwise).
    pub(crate) certificate: bool,
    /// What is wrong, in words.
    pub(crate) reason: String,
}

/// The TLS failure somewhere in `error`'s source chain, told in words.
pub(crate) fn failure(error: &(dyn StdError + 'static)) -> Option<TlsFailure> {
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(describe(tls));
        }
        // An io::Error's `source()` skips the error it wraps (hyper-rustls wraps
        // tokio-rustls' io::Error in another): look inside instead.
        source = match error
            .downcast_ref::<std::io::Error>()
            .and_then(|e| e.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => error.source(),
        };
    }
    None
}

fn describe(error: &rustls::Error) -> TlsFailure {
    let rustls::Error::InvalidCertificate(error) = error else {
        return TlsFailure {
            certificate: false,
            reason: format!("the TLS handshake failed: {error}"),
        };
    };
    use CertificateError as E;
    let reason = match error {
        E::Expired | E::ExpiredContext { .. } => "it has expired".to_owned(),
        E::NotValidYet | E::NotValidYetContext { .. } => {
            "it is not valid yet (is this machine's clock right?)".to_owned()
        }
        E::UnknownIssuer => "it is signed by an unknown issuer: neither a public CA nor one \
                             given with --upstream-ca"
            .to_owned(),
        E::NotValidForName | E::NotValidForNameContext { .. } => {
            "it is for another name than the upstream's host".to_owned()
        }
        E::Revoked => "it has been revoked".to_owned(),
        E::BadSignature => "its signature is invalid".to_owned(),
        E::InvalidPurpose | E::InvalidPurposeContext { .. } => {
            "it is not meant for a TLS server".to_owned()
        }
        E::BadEncoding => "it cannot be parsed".to_owned(),
        other if is_ca_used_as_end_entity(other) => "it is a CA certificate used as the \
                                                     server's own (self-signed?); to trust \
                                                     it, pass that certificate with \
                                                     --upstream-ca"
            .to_owned(),
        other => format!("{other}"),
    };
    TlsFailure {
        certificate: true,
        reason: format!("the upstream's certificate was refused: {reason}"),
    }
}
