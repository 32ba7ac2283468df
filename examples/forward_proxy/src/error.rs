//! [`StartError`]: why the proxy did not start.

use std::error::Error;
use std::fmt;

/// Why the proxy could not start: a flag, a file or a variable it could not use.
///
/// Its `Display` names what is at fault (`--upstream-ca ca.pem`, `--listen
/// 127.0.0.1:80: cannot listen on 127.0.0.1:80`, `BIGMODEL_API_KEY is not set: ...`);
/// the underlying error, when there is one (an I/O or TLS error), is its
/// [`source`](Error::source). The alternate form (`{:#}`) writes the whole chain on one
/// line, as the proxy prints it: `--upstream-ca ca.pem: No such file or directory (os
/// error 2)`. Never a secret: errors name variables and positions, not values.
#[derive(Debug)]
pub struct StartError {
    what: String,
    source: Option<Box<dyn Error + Send + Sync>>,
}

impl StartError {
    /// An error that `what` describes in full.
    pub(crate) fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            source: None,
        }
    }

    /// An error about `what` (the flag, file or variable), caused by `source`.
    pub(crate) fn caused(
        what: impl Into<String>,
        source: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        Self {
            what: what.into(),
            source: Some(source.into()),
        }
    }

    /// The same error, with `context` (a flag, say) in front of what it says.
    pub(crate) fn context(mut self, context: impl fmt::Display) -> Self {
        self.what = format!("{context}: {}", self.what);
        self
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.what)?;
        if f.alternate() {
            let mut source = self.source();
            while let Some(error) = source {
                write!(f, ": {error}")?;
                source = error.source();
            }
        }
        Ok(())
    }
}

impl Error for StartError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alternate_form_writes_the_chain_and_the_plain_one_what_failed() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = StartError::caused("--upstream-ca ca.pem", io);
        assert_eq!(error.to_string(), "--upstream-ca ca.pem");
        assert_eq!(format!("{error:#}"), "--upstream-ca ca.pem: no such file");
        assert!(error.source().is_some());
        assert_eq!(format!("{:#}", StartError::new("plain")), "plain");
    }
}
