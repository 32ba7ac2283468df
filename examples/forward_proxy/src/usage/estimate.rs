//! What a request will cost in tokens before it is sent ([`Estimator`]): its input from the
//! body's UTF-8 length over a bytes-per-token ratio, learned per model from the usage the
//! answers report, plus the output it allows. No tokenizer: a ratio learned from the
//! provider's own counts needs no model files, and the provider's rate-limit headers
//! correct what an estimate misses (the pool holds each key's token quota no looser than
//! the provider says).
//!
//! The ratio starts at [`START_BYTES_PER_TOKEN`] and follows each answer's reported input
//! (an exponentially weighted mean and mean deviation, weight 1/16). An estimate divides by
//! the mean less two deviations, so that it errs high: an estimate too low could send a
//! request the provider refuses, one too high only holds tokens until the answer settles
//! them.

use std::collections::HashMap;
use std::sync::Mutex;

/// Bytes per token before any answer taught one: English text is about 4 bytes a token in
/// OpenAI's and Anthropic's tokenizers, and a JSON request body adds its syntax.
pub(crate) const START_BYTES_PER_TOKEN: f64 = 4.0;

/// The output reserved for a request that names no limit (`--default-output-tokens`).
pub(crate) const DEFAULT_OUTPUT_TOKENS: u64 = 4096;

/// Models learned apart at most; further ones share one estimate.
const MAX_MODELS: usize = 64;

/// Weight of each new answer in the learned ratio.
const WEIGHT: f64 = 1.0 / 16.0;

/// Per-model estimates, shared by every worker.
#[derive(Debug)]
pub(crate) struct Estimator {
    models: Mutex<HashMap<Box<str>, Ratio>>,
    /// The output reserved for a request that names no limit.
    pub(crate) default_output: u64,
}

/// One model's learned ratio, and how far estimates were from the answers.
#[derive(Debug, Clone, Copy)]
struct Ratio {
    /// Mean bytes per reported input token.
    mean: f64,
    /// Mean absolute deviation of the ratio.
    deviation: f64,
    /// Answers learned from.
    samples: u64,
    /// Sum of |estimate - reported| / reported over the answers, for the mean error.
    error_sum: f64,
}

impl Default for Ratio {
    fn default() -> Self {
        Self {
            mean: START_BYTES_PER_TOKEN,
            deviation: START_BYTES_PER_TOKEN / 8.0,
            samples: 0,
            error_sum: 0.0,
        }
    }
}

impl Ratio {
    /// The ratio estimates divide by: the mean less two deviations, at least 1.
    fn careful(&self) -> f64 {
        (self.mean - 2.0 * self.deviation).max(1.0)
    }
}

/// One model's estimate, as the admin page and the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EstimateStats {
    pub(crate) model: String,
    /// Learned bytes per input token.
    pub(crate) bytes_per_token: f64,
    /// Answers learned from.
    pub(crate) samples: u64,
    /// Mean of |estimated - reported| / reported input tokens.
    pub(crate) mean_error: f64,
}

/// What a request's input was estimated at, kept to learn from its answer.
#[derive(Debug, Clone)]
pub(crate) struct Estimated {
    pub(crate) model: Box<str>,
    pub(crate) bytes: usize,
    pub(crate) input: u64,
}

impl Estimator {
    pub(crate) fn new(default_output: u64) -> Self {
        Self {
            models: Mutex::new(HashMap::new()),
            default_output,
        }
    }

    fn key(models: &HashMap<Box<str>, Ratio>, model: &str) -> Box<str> {
        if models.contains_key(model) || models.len() < MAX_MODELS {
            model.into()
        } else {
            "(other)".into()
        }
    }

    /// The input tokens of a body of `bytes` for `model`.
    pub(crate) fn estimate(&self, model: &str, bytes: usize) -> Estimated {
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(&models, model);
        let ratio = models.get(&key).copied().unwrap_or_default();
        let input = (bytes as f64 / ratio.careful()).ceil() as u64;
        Estimated {
            model: key,
            bytes,
            input: input.max(1),
        }
    }

    /// Learns from an answer that reported `input` tokens for a request `estimated`.
    pub(crate) fn learn(&self, estimated: &Estimated, input: u64) {
        if input == 0 {
            return;
        }
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let key = Self::key(&models, &estimated.model);
        let ratio = models.entry(key).or_default();
        let seen = estimated.bytes as f64 / input as f64;
        if ratio.samples == 0 {
            ratio.mean = seen;
            ratio.deviation = seen / 16.0;
        } else {
            ratio.deviation += WEIGHT * ((seen - ratio.mean).abs() - ratio.deviation);
            ratio.mean += WEIGHT * (seen - ratio.mean);
        }
        ratio.samples += 1;
        ratio.error_sum += (estimated.input as f64 - input as f64).abs() / input as f64;
    }

    /// Every model's estimate, by name.
    pub(crate) fn snapshot(&self) -> Vec<EstimateStats> {
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<_> = models
            .iter()
            .map(|(model, ratio)| EstimateStats {
                model: model.to_string(),
                bytes_per_token: ratio.mean,
                samples: ratio.samples,
                mean_error: if ratio.samples == 0 {
                    0.0
                } else {
                    ratio.error_sum / ratio.samples as f64
                },
            })
            .collect();
        all.sort_by(|a, b| a.model.cmp(&b.model));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_start_careful_and_follow_the_reported_usage() {
        let estimator = Estimator::new(DEFAULT_OUTPUT_TOKENS);
        // Before any answer: 4 bytes a token, less two deviations (1 byte): 3.
        assert_eq!(estimator.estimate("m", 3_000).input, 1_000);
        // The provider counts 3 bytes a token for this model.
        for _ in 0..50 {
            let estimated = estimator.estimate("m", 3_000);
            estimator.learn(&estimated, 1_000);
        }
        let estimate = estimator.estimate("m", 3_000).input;
        assert!((1_000..1_100).contains(&estimate), "{estimate}");
        let stats = estimator.snapshot();
        assert_eq!(stats[0].samples, 50);
        assert!(stats[0].mean_error < 0.2, "{stats:?}");
        // Another model has learned nothing.
        assert_eq!(estimator.estimate("other", 3_000).input, 1_000);
    }

    #[test]
    fn models_beyond_the_bound_share_one_estimate() {
        let estimator = Estimator::new(DEFAULT_OUTPUT_TOKENS);
        for i in 0..MAX_MODELS + 5 {
            let estimated = estimator.estimate(&format!("m{i}"), 400);
            estimator.learn(&estimated, 100);
        }
        let stats = estimator.snapshot();
        assert_eq!(stats.len(), MAX_MODELS + 1);
        assert!(stats.iter().any(|s| s.model == "(other)" && s.samples == 5));
    }
}
