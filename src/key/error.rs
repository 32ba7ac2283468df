//! [`KeyError`]: what is wrong with a key list, by position, never by value.

use std::fmt;

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
    pub(super) fn of(byte: u8) -> Self {
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
        variable: Option<String>,
    },
    /// An entry is empty, as in `k1,,k2` or a trailing comma.
    Empty {
        /// 1-based position of the entry.
        position: usize,
        /// Number of entries in the list.
        count: usize,
        /// The environment variable read, if any.
        variable: Option<String>,
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
        variable: Option<String>,
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
        variable: Option<String>,
    },
}

impl KeyError {
    pub(super) fn with_context(mut self, list_len: usize, from: Option<String>) -> Self {
        match &mut self {
            Self::NotConfigured { variable } => *variable = from,
            Self::Empty {
                count, variable, ..
            }
            | Self::InvalidByte {
                count, variable, ..
            }
            | Self::Duplicate {
                count, variable, ..
            } => {
                *count = list_len;
                *variable = from;
            }
            Self::InvalidSetting { count, .. } => *count = list_len,
        }
        self
    }
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotConfigured {
                variable: Some(var),
            } => {
                write!(f, "no API key configured in {var}")
            }
            Self::NotConfigured { variable: None } => f.write_str("no API key configured"),
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
            Self::Empty { variable, .. }
            | Self::InvalidByte { variable, .. }
            | Self::Duplicate { variable, .. } => match variable {
                Some(var) => write!(f, " (in {var})"),
                None => Ok(()),
            },
        }
    }
}

impl std::error::Error for KeyError {}
