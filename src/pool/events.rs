//! Log events for what an outcome did to a key ([`Transition`]): the pool's state changes
//! in `slot`, what people read about them here. Keys are named by position and name,
//! never by value.

use std::fmt;
use std::time::Duration;

use super::record::{Rest, RestCause, Transition};
use crate::human::HumanDuration;

/// `key 2/3` or `key 2/3 (name)`, for logs; in a pool with buckets, the lines about a
/// lane are in a `bucket{model=...}` span.
pub(super) struct Label<'a> {
    pub(super) position: usize,
    pub(super) keys: usize,
    pub(super) name: Option<&'a str>,
    /// The bucket (a model name, not a secret) of a lease on a lane.
    pub(super) bucket: Option<&'a str>,
}

impl fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {}/{}", self.position, self.keys)?;
        match self.name {
            Some(name) => write!(f, " ({name})"),
            None => Ok(()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Logs what an outcome did to the key `label` names (callers skip a transition that is
/// not [eventful](Transition::is_eventful): nothing to log).
#[cold]
pub(super) fn log(label: &Label<'_>, transition: &Transition) {
    let Some(bucket) = label.bucket else {
        return log_lines(label, transition);
    };
    if transition.is_eventful() {
        let _bucket = tracing::info_span!("bucket", model = bucket).entered();
        log_lines(label, transition);
    }
}

fn log_lines(label: &Label<'_>, transition: &Transition) {
    let (key, keys) = (label.position, label.keys);
    // At debug: a burst of refusals lowers the limit step by step, one line each; what
    // it settled at shows in the key's stats (`concurrency_limit`) and the proxy's metrics.
    if let Some((before, limit)) = transition.learned {
        let before = if before == u32::MAX {
            "none".to_string()
        } else {
            before.to_string()
        };
        tracing::debug!(
            key,
            keys,
            limit,
            "{label} refused with {limit} other request(s) in flight; at most {limit} at once from now on (was {before})"
        );
    }
    if let Some(change) = &transition.rest {
        let wait = HumanDuration(change.wait);
        let wait_ms = millis(change.wait);
        match (change.cause, change.rest) {
            (RestCause::Window { exact: true }, Rest::Started) => tracing::info!(
                key,
                keys,
                wait_ms,
                "{label} used up its window; resting for {wait}, until it resets (rate-limit headers)"
            ),
            (RestCause::Window { exact: false }, Rest::Started) => tracing::info!(
                key,
                keys,
                wait_ms,
                "{label} used up its window; resting for {wait} (rate-limit headers, capped), then one probe request"
            ),
            (RestCause::RateLimited { explicit }, rest) => {
                let why = if explicit { "Retry-After" } else { "backoff" };
                match rest {
                    Rest::Started => tracing::warn!(
                        key,
                        keys,
                        wait_ms,
                        level = change.level,
                        "{label} rate limited; cooling down for {wait} ({why})"
                    ),
                    Rest::Extended => tracing::debug!(
                        key,
                        keys,
                        wait_ms,
                        "{label} rate limited again; cooling down until {wait} from now ({why})"
                    ),
                    Rest::Unchanged => {}
                }
            }
            (RestCause::Account, rest) if rest == Rest::Started || change.mates > 0 => {
                let mates = change.mates;
                tracing::warn!(
                    key,
                    keys,
                    wait_ms,
                    "{label} hit its account's limit; it and {mates} other key(s) of the account cool down for {wait}"
                );
            }
            (RestCause::Quota, rest) if rest != Rest::Unchanged => tracing::warn!(
                key,
                keys,
                wait_ms,
                "{label} quota exhausted; suspended for {wait}, then one probe request"
            ),
            _ => {}
        }
    }
    if transition.disabled {
        tracing::warn!(key, keys, "{label} rejected by the provider; disabled");
    }
    if transition.back && transition.rest.is_some() {
        tracing::debug!(
            key,
            keys,
            "{label} answered its probe; back in rotation when its window resets"
        );
    } else if transition.back {
        tracing::debug!(key, keys, "{label} answered its probe; back in rotation");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let read = |d: Duration| HumanDuration(d).to_string();
        assert_eq!(read(Duration::from_millis(850)), "850 ms");
        assert_eq!(read(Duration::from_millis(2500)), "2.5 s");
        assert_eq!(read(Duration::from_secs(200)), "3 min 20 s");
        assert_eq!(read(Duration::from_secs(3900)), "1 h 5 min");
    }
}
