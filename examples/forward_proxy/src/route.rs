//! How the proxy routes a request within the pool ([`Routing`], [`ProxyRouter`]): the
//! bucket its provider meters it in, and the session it belongs to, read from what the
//! handler found in its body ([`BodyFields`]) and its header fields.

use std::sync::Arc;

use http::HeaderName;
use tower_key_rotation::route::{RequestHead, Router};

use crate::config::Profile;
use crate::handler::BodyFields;

/// What the proxy routes requests by. By default each key is metered apart per model,
/// as providers do (`--buckets none` turns it off), and requests naming a session go to
/// its key (`--affinity off` turns it off). Both off: the key is chosen before the request
/// is read, as the configured strategy says, and bodies are not looked into.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Routing {
    /// Meter each key apart per model: a request's bucket is its body's top-level `model`.
    pub bucket_by_model: bool,
    /// Keep each session on one key: a request's affinity id is its body's
    /// `prompt_cache_key`, else `metadata.user_id`, else `user`, else the
    /// [`session_header`](Self::session_header).
    pub affinity: bool,
    /// The header naming a request's session, when its body names none.
    pub session_header: HeaderName,
    /// With [`affinity`](Self::affinity): a request naming no session (neither in its
    /// body nor in the header) takes the hash of its prompt's stable prefix (model, system
    /// prompt, first user message; bounded bytes) as its affinity id, so that the turns of
    /// one conversation go to one key. Off by default (`--affinity prefix` turns it on):
    /// conversations sharing a prefix share a key, which spreads load less evenly than the
    /// configured strategy.
    pub prefix_affinity: bool,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            bucket_by_model: true,
            affinity: true,
            session_header: HeaderName::from_static("x-session-id"),
            prefix_affinity: false,
        }
    }
}

impl Routing {
    /// Does anything route requests?
    pub(crate) fn is_on(&self) -> bool {
        self.bucket_by_model || self.affinity
    }
}

/// A request's token cost (estimated input plus the output it allows), as the handler
/// found it when token budgets are on: read by [`ProxyRouter`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenCost(pub(crate) u64);

/// The pool's [`Router`] in the proxy.
#[derive(Debug)]
pub(crate) struct ProxyRouter(pub(crate) Routing, pub(crate) Profile);

impl Router for ProxyRouter {
    fn bucket<'a>(&self, head: &RequestHead<'a>) -> Option<&'a str> {
        if !self.0.bucket_by_model {
            return None;
        }
        if self.1 == Profile::Gemini {
            return gemini_model(head.uri.path());
        }
        let model = head.extensions.get::<Arc<BodyFields>>()?.model.as_deref()?;
        Some(model_bucket(self.1, model))
    }

    fn tokens(&self, head: &RequestHead<'_>) -> Option<u64> {
        head.extensions.get::<TokenCost>().map(|cost| cost.0)
    }

    fn affinity<'a>(&self, head: &RequestHead<'a>) -> Option<&'a [u8]> {
        if !self.0.affinity {
            return None;
        }
        let fields = head.extensions.get::<Arc<BodyFields>>();
        fields
            .and_then(|fields| {
                fields
                    .prompt_cache_key
                    .as_deref()
                    .or(fields.metadata_user_id.as_deref())
                    .or(fields.user.as_deref())
            })
            .map(str::as_bytes)
            .or_else(|| {
                head.headers
                    .get(&self.0.session_header)
                    .map(|value| value.as_bytes())
            })
            .or_else(|| {
                let prefix = fields.filter(|_| self.0.prefix_affinity)?.prefix.as_ref()?;
                Some(&prefix[..])
            })
    }
}

/// The bucket `profile`'s provider meters `model` in.
pub(crate) fn model_bucket(profile: Profile, model: &str) -> &str {
    match profile {
        Profile::Openai => openai_bucket(model),
        Profile::Anthropic => anthropic_bucket(model),
        Profile::Generic | Profile::Bigmodel | Profile::Gemini => model,
    }
}

/// Gemini's model, from the path: `/v1beta/models/{model}:generateContent` (or any other
/// method of a model: `:streamGenerateContent`, `:countTokens`).
fn gemini_model(path: &str) -> Option<&str> {
    let (_, rest) = path.split_once("/models/")?;
    let model = rest.split([':', '/']).next()?;
    (!model.is_empty()).then_some(model)
}

/// OpenAI meters a model's dated snapshots with the model (the project `rate_limits` API
/// lists limits per model): `gpt-4o-2024-08-06` and `gpt-4o` share the `gpt-4o` bucket, as
/// do `gpt-4-0613` and `gpt-4`.
fn openai_bucket(model: &str) -> &str {
    let bytes = model.as_bytes();
    let dated = |suffix: &[u8]| {
        suffix
            .iter()
            .zip(b"-dddd-dd-dd")
            .all(|(c, shape)| match shape {
                b'd' => c.is_ascii_digit(),
                _ => c == shape,
            })
    };
    // `-YYYY-MM-DD`, else `-MMDD`.
    if bytes.len() > 11 && dated(&bytes[bytes.len() - 11..]) {
        return &model[..model.len() - 11];
    }
    let n = bytes.len();
    if n > 5 && bytes[n - 5] == b'-' && bytes[n - 4..].iter().all(u8::is_ascii_digit) {
        return &model[..n - 5];
    }
    model
}

/// Anthropic meters per model class (its rate-limits page: one limit for the Claude Opus
/// 4.x models combined, one for Sonnet 4.x): a date or `-latest` suffix goes, and the
/// 4.x models of a family share `claude-{family}-4`.
fn anthropic_bucket(model: &str) -> &str {
    let mut name = model;
    if let Some(base) = name.strip_suffix("-latest") {
        name = base;
    } else if let Some((base, date)) = name.rsplit_once('-') {
        if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) {
            name = base;
        }
    }
    for family in ["opus", "sonnet", "haiku"] {
        let class = match family {
            "opus" => "claude-opus-4",
            "sonnet" => "claude-sonnet-4",
            _ => "claude-haiku-4",
        };
        if name == class
            || name
                .strip_prefix(class)
                .is_some_and(|rest| rest.starts_with('-'))
        {
            return &model[..class.len()];
        }
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_snapshots_share_their_models_bucket() {
        for (model, bucket) in [
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("gpt-4o", "gpt-4o"),
            ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
            ("gpt-4-0613", "gpt-4"),
            ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
            ("o1-2024-12-17", "o1"),
            ("gpt-4.1", "gpt-4.1"),
            ("gpt-4-turbo-preview", "gpt-4-turbo-preview"),
        ] {
            assert_eq!(openai_bucket(model), bucket, "{model}");
        }
    }

    #[test]
    fn anthropic_models_share_their_class() {
        for (model, bucket) in [
            ("claude-opus-4-1-20250805", "claude-opus-4"),
            ("claude-opus-4-20250514", "claude-opus-4"),
            ("claude-sonnet-4-5", "claude-sonnet-4"),
            ("claude-haiku-4-5-20251001", "claude-haiku-4"),
            ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
            ("claude-3-7-sonnet-latest", "claude-3-7-sonnet"),
            ("claude-opus-5", "claude-opus-5"),
        ] {
            assert_eq!(anthropic_bucket(model), bucket, "{model}");
        }
    }

    #[test]
    fn gemini_models_come_from_the_path() {
        for (path, model) in [
            (
                "/v1beta/models/gemini-2.0-flash:generateContent",
                Some("gemini-2.0-flash"),
            ),
            (
                "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
                Some("gemini-2.5-pro"),
            ),
            (
                "/v1/models/gemini-1.5-flash:countTokens",
                Some("gemini-1.5-flash"),
            ),
            ("/v1beta/models", None),
            ("/v1beta/models/:generateContent", None),
            ("/v1beta/files", None),
        ] {
            assert_eq!(gemini_model(path), model, "{path}");
        }
    }
}
