//! [`KeySet`]: a validated list of keys, parsed from a string, the environment, or specs.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;

use zeroize::Zeroizing;

use super::{ApiKey, ByteKind, KeyError, KeySpec};

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
            variable: Some(var.to_owned()),
        };
        let raw = Zeroizing::new(std::env::var(var).map_err(|_| not_configured())?);
        Self::parse_from(&raw, Some(var))
    }

    fn parse_from(list: &str, variable: Option<&str>) -> Result<Self, KeyError> {
        let variable = || variable.map(str::to_owned);
        if list.trim().is_empty() {
            return Err(KeyError::NotConfigured {
                variable: variable(),
            });
        }
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        let count = entries.len();
        let mut seen = FirstSeen::with_capacity(count);
        for (i, entry) in entries.iter().enumerate() {
            let position = i + 1;
            validate(entry, position).map_err(|e| e.with_context(count, variable()))?;
            if let Some(first) = seen.first(entry, position) {
                return Err(KeyError::Duplicate {
                    position,
                    first,
                    count,
                    variable: variable(),
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
            return Err(KeyError::NotConfigured { variable: None });
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
                    variable: None,
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

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeySet({} keys, <redacted>)", self.specs.len())
    }
}
pub(super) fn validate(key: &str, position: usize) -> Result<(), KeyError> {
    if key.is_empty() {
        return Err(KeyError::Empty {
            position,
            count: 1,
            variable: None,
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
            variable: None,
        });
    }
    Ok(())
}

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
