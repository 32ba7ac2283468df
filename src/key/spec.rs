//! [`KeySpec`]: one key and its own settings.

use std::fmt;

use super::ApiKey;
use crate::quota::Quota;

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
    /// Limits of this key in named buckets (models), overriding `max_in_flight` and `quota`
    /// there.
    pub(crate) buckets: Vec<BucketLimits>,
}

/// A key's own limits in one bucket (see [`KeySpec::bucket_max_in_flight`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BucketLimits {
    pub(crate) name: String,
    pub(crate) max_in_flight: Option<u32>,
    pub(crate) quota: Option<Quota>,
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
            buckets: Vec::new(),
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
    /// [`Outcome::AccountLimited`](crate::classify::Outcome::AccountLimited) on one key rests every
    /// key of the same account.
    pub fn account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// This key's cap on requests in flight in one bucket (a model, in a pool whose
    /// [router](crate::KeyPoolBuilder::router) names buckets by model), overriding
    /// [`max_in_flight`](Self::max_in_flight) there. In a pool with buckets, a key's cap and
    /// quota apply to each of its buckets apart, as providers meter each model apart.
    ///
    /// # Panics
    ///
    /// If `max` is zero: no request of that bucket could ever be sent.
    ///
    /// # Examples
    ///
    /// ```
    /// use tower_key_rotation::{ApiKey, KeySpec, Quota};
    ///
    /// let spec = KeySpec::new(ApiKey::new("k1").unwrap())
    ///     .max_in_flight(8)
    ///     .bucket_max_in_flight("glm-4-plus", 2)
    ///     .bucket_quota("glm-4-plus", Quota::per_minute(60));
    /// # let _ = spec;
    /// ```
    pub fn bucket_max_in_flight(mut self, bucket: impl Into<String>, max: u32) -> Self {
        assert!(max > 0, "a bucket's max_in_flight must be at least 1");
        self.bucket_entry(bucket.into()).max_in_flight = Some(max);
        self
    }

    /// This key's request quota in one bucket, overriding [`quota`](Self::quota) there
    /// (see [`bucket_max_in_flight`](Self::bucket_max_in_flight)).
    pub fn bucket_quota(mut self, bucket: impl Into<String>, quota: Quota) -> Self {
        self.bucket_entry(bucket.into()).quota = Some(quota);
        self
    }

    fn bucket_entry(&mut self, name: String) -> &mut BucketLimits {
        let index = match self.buckets.iter().position(|b| b.name == name) {
            Some(index) => index,
            None => {
                self.buckets.push(BucketLimits {
                    name,
                    max_in_flight: None,
                    quota: None,
                });
                self.buckets.len() - 1
            }
        };
        &mut self.buckets[index]
    }

    /// This key's own limits in the bucket `name`, if it has any.
    pub(crate) fn bucket_limits(&self, name: &str) -> Option<&BucketLimits> {
        self.buckets.iter().find(|b| b.name == name)
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
            && self.buckets == other.buckets
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
            .field("buckets", &self.buckets)
            .finish()
    }
}
