//! API keys as secrets, and the parsing of a key list.
//!
//! A key is read once, from a string or an environment variable, validated once, and from
//! then on only ever referred to by its 1-based position (`key 2/3`). Nothing in this crate
//! prints a key's value: [`ApiKey`]'s `Debug` and `Display` are redacted and every error names
//! a position, never the text at that position.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use bytes::Bytes;
use http::HeaderValue;
use zeroize::Zeroizing;

use crate::quota::Quota;

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
        validate(value.trim(), 1)?;
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

/// A validated, non-empty list of distinct API keys.
///
/// # Examples
///
/// ```
/// use tower_key_rotation::KeySet;
///
/// // White space after the commas is fine.
/// let keys = KeySet::parse("k1, k2,k3").unwrap();
/// assert_eq!(keys.len(), 3);
///
/// // Errors name the position, never the key.
/// let err = KeySet::parse("k1,,k2").unwrap_err();
/// assert_eq!(err.to_string(), "key 2 of 3 is empty (two commas in a row?)");
/// ```
#[derive(Clone)]
pub struct KeySet {
    specs: Vec<KeySpec>,
}

impl KeySet {
    /// Parses a comma-separated key list such as `k1,k2,k3`.
    ///
    /// White space around each key is trimmed.
    ///
    /// # Errors
    ///
    /// A [`KeyError`] naming the first bad entry's 1-based position: the list is empty, an
    /// entry is empty, an entry holds a byte not allowed in a header value, or an entry
    /// repeats an earlier one.
    pub fn parse(list: &str) -> Result<Self, KeyError> {
        Self::parse_from(list, None)
    }

    /// Reads and parses the key list in environment variable `var`.
    ///
    /// # Errors
    ///
    /// [`KeyError::NotConfigured`] when the variable is unset, empty or not Unicode; otherwise
    /// as [`KeySet::parse`], with the variable's name in the message.
    pub fn from_env(var: &str) -> Result<Self, KeyError> {
        let not_configured = || KeyError::NotConfigured {
            source: Some(var.to_owned()),
        };
        let raw = Zeroizing::new(std::env::var(var).map_err(|_| not_configured())?);
        Self::parse_from(&raw, Some(var))
    }

    fn parse_from(list: &str, source: Option<&str>) -> Result<Self, KeyError> {
        let source = || source.map(str::to_owned);
        if list.trim().is_empty() {
            return Err(KeyError::NotConfigured { source: source() });
        }
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut seen = FirstSeen::with_capacity(count);
        for (i, entry) in entries.iter().enumerate() {
            let position = i + 1;
            validate(entry, position).map_err(|e| e.with_context(count, source()))?;
            if let Some(first) = seen.first(entry, position) {
                return Err(KeyError::Duplicate {
                    position,
                    first,
                    count,
                    source: source(),
                });
            }
        }
        Ok(Self {
            specs: entries
                .into_iter()
                .map(|entry| KeySpec::new(ApiKey::trusted(entry)))
                .collect(),
        })
    }

    /// Builds a key set from keys already wrapped.
    ///
    /// # Errors
    ///
    /// As [`KeySet::from_specs`].
    pub fn from_keys(keys: impl IntoIterator<Item = ApiKey>) -> Result<Self, KeyError> {
        Self::from_specs(keys.into_iter().map(KeySpec::new))
    }

    /// Builds a key set from keys with their own settings (name, weight, cap, quota,
    /// account).
    ///
    /// # Errors
    ///
    /// [`KeyError::NotConfigured`] for no keys, [`KeyError::Duplicate`] for a repeated key
    /// or name, [`KeyError::InvalidSetting`] for a zero weight or cap.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::{ApiKey, KeySet, KeySpec, Quota};
    ///
    /// let keys = KeySet::from_specs([
    ///     KeySpec::new(ApiKey::new("sk-paid-tier")?).name("paid").weight(3).max_in_flight(8),
    ///     KeySpec::new(ApiKey::new("sk-free-tier")?).name("free").quota(Quota::per_minute(3)),
    /// ])?;
    /// assert_eq!(keys.len(), 2);
    /// # Ok::<(), tower_key_rotation::KeyError>(())
    /// ```
    pub fn from_specs(specs: impl IntoIterator<Item = KeySpec>) -> Result<Self, KeyError> {
        let specs: Vec<KeySpec> = specs.into_iter().collect();
        if specs.is_empty() {
            return Err(KeyError::NotConfigured { source: None });
        }
        let count = specs.len();
        let mut values = FirstSeen::with_capacity(count);
        let mut names = FirstSeen::default();
        for (i, spec) in specs.iter().enumerate() {
            let position = i + 1;
            let invalid = |reason| KeyError::InvalidSetting {
                position,
                count,
                name: spec.name.clone(),
                reason,
            };
            if spec.weight == 0 {
                return Err(invalid("weight must be at least 1"));
            }
            if spec.max_in_flight == Some(0) {
                return Err(invalid("max in flight must be at least 1"));
            }
            let same_value = values.first(&spec.key.value, position);
            let same_name = spec
                .name
                .as_deref()
                .and_then(|name| names.first(name, position));
            if let Some(first) = same_value.or(same_name) {
                return Err(KeyError::Duplicate {
                    position,
                    first,
                    count,
                    source: None,
                });
            }
        }
        Ok(Self { specs })
    }

    /// Number of keys (at least one).
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Always `false`: a key set holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The keys in order; the `i`-th is `key {i+1}`.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &ApiKey> {
        self.specs.iter().map(|spec| &spec.key)
    }

    /// The keys with their settings, in order.
    pub fn specs(&self) -> &[KeySpec] {
        &self.specs
    }
}

/// The 1-based position at which each string was first seen: finds duplicates in one pass
/// (comparing every pair took seconds for 100,000 keys).
///
/// It borrows the strings, so a key's value is never copied out of its zeroizing buffer;
/// it is hashed with the standard library's randomly keyed SipHash, and the map is dropped
/// with the parse.
#[derive(Default)]
struct FirstSeen<'a>(HashMap<&'a str, usize>);

impl<'a> FirstSeen<'a> {
    fn with_capacity(capacity: usize) -> Self {
        Self(HashMap::with_capacity(capacity))
    }

    /// Where `value` was first seen, if before; else remembers it at `position`.
    fn first(&mut self, value: &'a str, position: usize) -> Option<usize> {
        match self.0.entry(value) {
            Entry::Occupied(first) => Some(*first.get()),
            Entry::Vacant(slot) => {
                slot.insert(position);
                None
            }
        }
    }
}

/// One key and its own settings: a name for logs, a weight (share of requests), a cap on
/// requests in flight, a request quota, and the account it belongs to.
///
/// Settings left unset fall back to the pool's defaults
/// ([`KeyPoolBuilder`](crate::KeyPoolBuilder)).
#[derive(Clone)]
pub struct KeySpec {
    pub(crate) key: ApiKey,
    pub(crate) name: Option<String>,
    pub(crate) weight: u32,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) quota: Option<Quota>,
    pub(crate) account: Option<String>,
}

impl KeySpec {
    /// A key with default settings: weight 1, the pool's cap and quota, no account.
    pub fn new(key: ApiKey) -> Self {
        Self {
            key,
            name: None,
            weight: 1,
            max_in_flight: None,
            quota: None,
            account: None,
        }
    }

    /// A name shown in logs and stats beside the position (`key 2/3 (paid)`). Never put a
    /// secret here.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The key's share of requests relative to the others (default 1): with weights 3 and
    /// 1, round-robin sends three requests to the first for each to the second, smoothly
    /// interleaved as nginx does; least-in-flight compares in-flight counts per unit of
    /// weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// This key's cap on requests in flight (overrides the pool's).
    pub fn max_in_flight(mut self, max: u32) -> Self {
        self.max_in_flight = Some(max);
        self
    }

    /// This key's request quota (overrides the pool's).
    pub fn quota(mut self, quota: Quota) -> Self {
        self.quota = Some(quota);
        self
    }

    /// The account (or organisation) the key belongs to. Providers limit per account: an
    /// [`Outcome::AccountLimited`](crate::Outcome::AccountLimited) on one key rests every
    /// key of the same account.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// The key.
    pub fn key(&self) -> &ApiKey {
        &self.key
    }

    /// The name, if any.
    pub fn name_str(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The account, if any.
    pub fn account_str(&self) -> Option<&str> {
        self.account.as_deref()
    }

    /// The weight.
    pub fn weight_value(&self) -> u32 {
        self.weight
    }

    /// Same key and same settings?
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.key.value == other.key.value
            && self.name == other.name
            && self.weight == other.weight
            && self.max_in_flight == other.max_in_flight
            && self.quota == other.quota
            && self.account == other.account
    }
}

impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySpec")
            .field("key", &self.key)
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("max_in_flight", &self.max_in_flight)
            .field("quota", &self.quota)
            .field("account", &self.account)
            .finish()
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySet({} keys, <redacted>)", self.specs.len())
    }
}

fn validate(key: &str, position: usize) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty {
            position,
            count: 1,
            source: None,
        });
    }
    // Visible ASCII only: what every provider issues, and what a header value carries
    // without surprises (no control characters, no inner white space, no obs-text). No
    // quotes or semicolons either: no provider issues them, and they are the marks of a
    // list written wrong (`'k1','k2'` sends the quotes; `k1;k2` would be one key).
    let rejected = |b: &u8| !(0x21..=0x7e).contains(b) || matches!(b, b'"' | b'\'' | b'`' | b';');
    if let Some(offset) = key.bytes().position(|b| rejected(&b)) {
        let byte = key.as_bytes()[offset];
        return Err(KeyError::InvalidByte {
            position,
            offset: offset + 1,
            kind: ByteKind::of(byte),
            count: 1,
            source: None,
        });
    }
    Ok(())
}

/// What kind of byte made a key invalid (never the byte itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteKind {
    /// A control character such as a newline or NUL.
    Control,
    /// White space inside the key.
    Whitespace,
    /// A byte outside ASCII (a non-ASCII character).
    NonAscii,
    /// A quote (`"`, `'` or `` ` ``): the list was quoted, or a key was.
    Quote,
    /// A semicolon: keys are separated by commas.
    Semicolon,
}

impl ByteKind {
    fn of(byte: u8) -> Self {
        match byte {
            b' ' | b'\t' => Self::Whitespace,
            b'"' | b'\'' | b'`' => Self::Quote,
            b';' => Self::Semicolon,
            0x80.. => Self::NonAscii,
            _ => Self::Control,
        }
    }
}

impl fmt::Display for ByteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Control => "a control character",
            Self::Whitespace => "white space",
            Self::NonAscii => "a non-ASCII character",
            Self::Quote => "a quote",
            Self::Semicolon => "a semicolon",
        })
    }
}

impl ByteKind {
    /// What to do about it.
    pub fn hint(self) -> &'static str {
        match self {
            Self::Quote => "remove the quotes: keys are never quoted",
            Self::Semicolon => "separate keys with commas",
            Self::Control | Self::Whitespace | Self::NonAscii => "keys must be visible ASCII",
        }
    }
}

/// Why a key list was rejected. Names positions (1-based), never key values.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// No key at all: empty list, or the environment variable is unset or empty.
    NotConfigured {
        /// The environment variable read, if any.
        source: Option<String>,
    },
    /// An entry is empty, as in `k1,,k2` or a trailing comma.
    Empty {
        /// 1-based position of the entry.
        position: usize,
        /// Number of entries in the list.
        count: usize,
        /// The environment variable read, if any.
        source: Option<String>,
    },
    /// An entry holds a byte an HTTP header value cannot carry.
    InvalidByte {
        /// 1-based position of the entry.
        position: usize,
        /// 1-based byte offset of the first bad byte inside the entry.
        offset: usize,
        /// What kind of byte it is.
        kind: ByteKind,
        /// Number of entries in the list.
        count: usize,
        /// The environment variable read, if any.
        source: Option<String>,
    },
    /// A key's setting is out of range (a zero weight or cap).
    InvalidSetting {
        /// 1-based position of the key.
        position: usize,
        /// Number of keys.
        count: usize,
        /// The key's name, if it has one.
        name: Option<String>,
        /// What is wrong.
        reason: &'static str,
    },
    /// An entry repeats an earlier one (the same key, or the same name).
    Duplicate {
        /// 1-based position of the repeat.
        position: usize,
        /// 1-based position of the first occurrence.
        first: usize,
        /// Number of entries in the list.
        count: usize,
        /// The environment variable read, if any.
        source: Option<String>,
    },
}

impl KeyError {
    fn with_context(mut self, list_len: usize, from: Option<String>) -> Self {
        match &mut self {
            Self::NotConfigured { source } => *source = from,
            Self::Empty { count, source, .. }
            | Self::InvalidByte { count, source, .. }
            | Self::Duplicate { count, source, .. } => {
                *count = list_len;
                *source = from;
            }
            Self::InvalidSetting { count, .. } => *count = list_len,
        }
        self
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConfigured { source: Some(var) } => {
                write!(f, "no API key configured in {var}")
            }
            Self::NotConfigured { source: None } => f.write_str("no API key configured"),
            Self::Empty {
                position, count, ..
            } => write!(
                f,
                "key {position} of {count} is empty (two commas in a row?)"
            ),
            Self::InvalidByte {
                position,
                offset,
                kind,
                count,
                ..
            } => write!(
                f,
                "key {position} of {count} contains {kind} at byte {offset}; {}",
                kind.hint()
            ),
            Self::Duplicate {
                position,
                first,
                count,
                ..
            } => write!(f, "key {position} of {count} repeats key {first}"),
            Self::InvalidSetting {
                position,
                count,
                name,
                reason,
            } => match name {
                Some(name) => write!(f, "key {position} of {count} ({name}): {reason}"),
                None => write!(f, "key {position} of {count}: {reason}"),
            },
        }?;
        match self {
            Self::NotConfigured { .. } | Self::InvalidSetting { .. } => Ok(()),
            Self::Empty { source, .. }
            | Self::InvalidByte { source, .. }
            | Self::Duplicate { source, .. } => match source {
                Some(var) => write!(f, " (in {var})"),
                None => Ok(()),
            },
        }
    }
}

impl std::error::Error for KeyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spaces_after_commas_are_trimmed() {
        let keys = KeySet::parse(" k1 , k2,\tk3 ").unwrap();
        let values: Vec<_> = keys.keys().map(ApiKey::expose_secret).collect();
        assert_eq!(values, ["k1", "k2", "k3"]);
    }

    #[test]
    fn empty_list_is_not_configured() {
        assert_eq!(
            KeySet::parse("  ").unwrap_err().to_string(),
            "no API key configured"
        );
    }

    #[test]
    fn empty_entry_names_its_position() {
        let err = KeySet::parse("k1,k2,").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key 3 of 3 is empty (two commas in a row?)"
        );
    }

    #[test]
    fn invalid_byte_names_position_and_kind_not_value() {
        let err = KeySet::parse("good,bad\u{7}secret").unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            msg,
            "key 2 of 2 contains a control character at byte 4; keys must be visible ASCII"
        );
        assert!(!msg.contains("secret"));
        let err = KeySet::parse("inner space").unwrap_err();
        assert!(err.to_string().contains("white space"));
        let err = KeySet::parse("k1,clé").unwrap_err();
        assert!(err.to_string().contains("non-ASCII"));
    }

    #[test]
    fn quotes_and_semicolons_are_refused_by_position() {
        let err = KeySet::parse("k1, k2 ,'k3'").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key 3 of 3 contains a quote at byte 1; remove the quotes: keys are never quoted"
        );
        let err = KeySet::parse("\"sk-a\",sk-b").unwrap_err();
        assert!(err.to_string().starts_with("key 1 of 2 contains a quote"));
        let err = KeySet::parse("sk-first;sk-second").unwrap_err();
        assert_eq!(
            err.to_string(),
            "key 1 of 1 contains a semicolon at byte 9; separate keys with commas"
        );
        assert!(!err.to_string().contains("sk-"));
        assert!(ApiKey::new("`sk`").is_err());
    }

    #[test]
    fn duplicate_names_both_positions() {
        let err = KeySet::parse("a1,b2,a1").unwrap_err();
        assert_eq!(err.to_string(), "key 3 of 3 repeats key 1");
    }

    #[test]
    fn duplicates_far_apart_name_both_positions() {
        let mut keys: Vec<String> = (0..100_000).map(|i| format!("key-{i}")).collect();
        keys[99_999] = keys[0].clone();
        let err = KeySet::parse(&keys.join(",")).unwrap_err();
        assert_eq!(err.to_string(), "key 100000 of 100000 repeats key 1");

        let specs = |keys: &[String]| {
            keys.iter()
                .enumerate()
                .map(|(i, key)| {
                    KeySpec::new(ApiKey::new(key.as_str()).unwrap()).name(format!("n{i}"))
                })
                .collect::<Vec<_>>()
        };
        let err = KeySet::from_specs(specs(&keys)).unwrap_err();
        assert_eq!(err.to_string(), "key 100000 of 100000 repeats key 1");

        // The same name on two distinct keys.
        keys[99_999] = "key-last".to_owned();
        let mut named = specs(&keys);
        named[99_999] = named[99_999].clone().name("n1");
        let err = KeySet::from_specs(named).unwrap_err();
        assert_eq!(err.to_string(), "key 100000 of 100000 repeats key 2");

        keys[99_999] = "key-last".to_owned();
        assert_eq!(KeySet::parse(&keys.join(",")).unwrap().len(), 100_000);
        assert_eq!(KeySet::from_specs(specs(&keys)).unwrap().len(), 100_000);
    }

    #[test]
    fn header_value_is_sensitive_and_prefixed() {
        let key = ApiKey::new("abc").unwrap();
        let value = key.header_value("Bearer ");
        assert!(value.is_sensitive());
        assert_eq!(value.as_bytes(), b"Bearer abc");
        assert_eq!(format!("{value:?}"), "Sensitive");
    }
}
