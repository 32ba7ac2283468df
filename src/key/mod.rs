//! API keys as secrets, and the parsing of a key list.
//!
//! A key is read once, from a string or an environment variable, validated once, and from
//! then on only ever referred to by its 1-based position (`key 2/3`). Nothing in this crate
//! prints a key's value: [`ApiKey`]'s `Debug` and `Display` are redacted and every error names
//! a position, never the text at that position.

mod error;
mod set;
mod spec;

use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use zeroize::Zeroizing;

pub use error::{ByteKind, KeyError};
pub use set::KeySet;
pub use spec::KeySpec;

/// One API key: a secret.
///
/// `Debug` and `Display` print `<redacted>`; the value is zeroized when the key is dropped.
/// The only way to read it is [`ApiKey::expose_secret`], which custom placements use to build
/// their header.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::ApiKey;
///
/// let key = ApiKey::new("sk-secret").unwrap();
/// assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
/// assert_eq!(key.to_string(), "<redacted>");
/// assert_eq!(key.expose_secret(), "sk-secret");
/// ```
pub struct ApiKey {
    value: Zeroizing<String>,
}

impl ApiKey {
    /// Wraps one key, checking that it can travel in an HTTP header.
    ///
    /// White space around the key is trimmed.
    ///
    /// # Errors
    ///
    /// [`KeyError::Empty`] for an empty (or all-blank) key, [`KeyError::InvalidByte`] for a
    /// byte that an HTTP header value cannot carry. The errors name position 1.
    pub fn new(value: impl Into<String>) -> Result<Self, KeyError> {
        let value = Zeroizing::new(value.into());
        set::validate(value.trim(), 1)?;
        Ok(Self::trusted(value.trim()))
    }

    fn trusted(value: &str) -> Self {
        Self {
            value: Zeroizing::new(value.to_owned()),
        }
    }

    /// The key's value. Handle with care: never log it.
    pub fn expose_secret(&self) -> &str {
        &self.value
    }

    /// Builds the header value `prefix` + key, marked sensitive.
    ///
    /// The bytes live in a zeroizing buffer that is wiped when the last copy of the header
    /// value is dropped, so the key does not linger in freed memory.
    pub fn header_value(&self, prefix: &str) -> HeaderValue {
        let mut buf = Zeroizing::new(Vec::with_capacity(prefix.len() + self.value.len()));
        buf.extend_from_slice(prefix.as_bytes());
        buf.extend_from_slice(self.value.as_bytes());
        let mut value = HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
            .expect("a validated key with a valid prefix is a valid header value");
        value.set_sensitive(true);
        value
    }
}

impl Clone for ApiKey {
    fn clone(&self) -> Self {
        Self::trusted(&self.value)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
