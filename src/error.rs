//! The failures this middleware adds of its own.

use std::fmt;

/// Every key of the pool has been disabled (the provider rejected each with 401/403, or
/// as the classifier decided): waiting cannot produce a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllKeysDisabled {
    keys: usize,
}

impl AllKeysDisabled {
    pub(crate) fn new(keys: usize) -> Self {
        Self { keys }
    }

    /// Number of keys in the pool (all disabled).
    pub fn keys(&self) -> usize {
        self.keys
    }
}

impl fmt::Display for AllKeysDisabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "all {} API key(s) are disabled: the provider rejected each of them",
            self.keys
        )
    }
}

impl std::error::Error for AllKeysDisabled {}
