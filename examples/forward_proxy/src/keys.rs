//! Where the keys come from: a TOML key file (`--keys-file`), or a comma-separated list in
//! an environment variable (`--keys-env`, possibly set by `.env`). Read at start and again
//! on every reload; errors name the file, the key's position and name, and what is wrong,
//! never a value.
//!
//! A key file lists keys by name; each takes its value from an environment variable or a
//! file (a path relative to the key file), and may set its own weight, quota and cap:
//!
//! ```toml
//! [[key]]
//! name = "paid"            # required, unique: logs and /_keyrotation/keys show it
//! env = "PAID_KEY"         # the value: exactly one of env, file or value
//! weight = 3               # share of requests (default 1)
//! rpm = 500                # requests per minute sent with this key, at most
//! max_in_flight = 8        # requests in flight with this key, at most
//! account = "acme"         # keys of one account share its limit
//!
//! [key.models."glm-4-plus"] # this key's own limits for one model (a bucket)
//! max_in_flight = 2
//! rpm = 60
//!
//! [[key]]
//! name = "free"
//! file = "secrets/free.key"
//! ```
//!
//! Providers meter each key per model, and the proxy keeps each (key, model) apart (see
//! `--help`, "Buckets"): a key's `rpm` and `max_in_flight` apply to each of its models, and
//! a `[key.models."NAME"]` table sets other limits for the model NAME (as the profile names
//! it: an OpenAI snapshot such as `gpt-4o-2024-08-06` counts as `gpt-4o`).
//!
//! `value = "..."` (the key written in the file) is accepted but warned about: the file is
//! then a secret itself, and easily ends up in a repository or a support ticket.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tower_key_rotation::{ApiKey, KeyError, KeySet, KeySpec, Quota};
use zeroize::Zeroizing;

use crate::dotenv::DotEnv;
use crate::error::StartError;

/// Where the proxy's keys are read from, at start and on reload.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    /// `--keys-file`.
    File(PathBuf),
    /// `--keys-env`. `from_dotenv`: the variable was not in the process environment at
    /// start, so its value came from `.env`, which a reload can read again.
    Env { var: String, from_dotenv: bool },
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Env {
                var,
                from_dotenv: true,
            } => write!(f, "{var} in .env"),
            Self::Env { var, .. } => f.write_str(var),
        }
    }
}

/// The whole key file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(rename = "key", default, deserialize_with = "key_tables")]
    keys: Vec<KeyEntry>,
}

/// The `[[key]]` tables; a single `[key]` table (one bracket) is told in words, not as
/// serde's `invalid type: map, expected a sequence`.
fn key_tables<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<KeyEntry>, D::Error> {
    struct Tables;

    impl<'de> serde::de::Visitor<'de> for Tables {
        type Value = Vec<KeyEntry>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("`[[key]]` tables")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(serde::de::Error::custom(
                "`[key]` is a single table: write `[[key]]`, with double brackets, above each key",
            ))
        }
    }

    deserializer.deserialize_any(Tables)
}

/// One `[[key]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    env: Option<String>,
    file: Option<PathBuf>,
    value: Option<InlineSecret>,
    weight: Option<u32>,
    rpm: Option<u32>,
    max_in_flight: Option<u32>,
    account: Option<String>,
    /// `[key.models."NAME"]`: this key's own limits for a model.
    #[serde(default)]
    models: std::collections::BTreeMap<String, ModelLimits>,
}

/// One `[key.models."NAME"]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelLimits {
    rpm: Option<u32>,
    max_in_flight: Option<u32>,
}

/// A key written in the key file itself: wiped when dropped.
struct InlineSecret(Zeroizing<String>);

impl<'de> Deserialize<'de> for InlineSecret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(|s| Self(Zeroizing::new(s)))
    }
}

/// Reads the keys from `source`.
pub(crate) fn load(source: &KeySource) -> Result<KeySet, StartError> {
    match source {
        KeySource::File(path) => load_file(path),
        KeySource::Env {
            var,
            from_dotenv: false,
        } => from_env(var),
        KeySource::Env {
            var,
            from_dotenv: true,
        } => load_dotenv_var(var),
    }
}

/// Reads the comma-separated keys of the environment variable `var`. Unset or empty, the
/// error says so and where else keys can come from.
pub(crate) fn from_env(var: &str) -> Result<KeySet, StartError> {
    KeySet::from_env(var).map_err(|e| match e {
        KeyError::NotConfigured { .. } => {
            let what = match std::env::var_os(var) {
                None => "is not set",
                Some(value) if value.to_str().is_none() => "is not valid Unicode",
                Some(_) => "is empty",
            };
            StartError::new(format!(
                "{var} {what}: give the keys (comma-separated) in {var}, or in a .env file in \
                 the working directory ({var}=key1,key2), or name another variable with \
                 --keys-env NAME, or a key file with --keys-file FILE"
            ))
        }
        other => StartError::new(other.to_string()),
    })
}

/// Reads `var` from the `.env` file found as at start (the working directory or one of its
/// parents), without touching the process environment (which other threads may be
/// reading). The first definition wins, as it did at start; lines setting other variables
/// do not matter, even unreadable ones.
fn load_dotenv_var(var: &str) -> Result<KeySet, StartError> {
    let value = match DotEnv::find()? {
        Some(dotenv) => dotenv.var(var)?,
        None => None,
    };
    match value {
        Some(value) => KeySet::parse(&value).map_err(|e| match e {
            KeyError::NotConfigured { .. } => StartError::new(format!("{var} is empty in .env")),
            e => StartError::new(format!("{e} (in {var} in .env)")),
        }),
        None => Err(StartError::new(format!("{var} is no longer set in .env"))),
    }
}

/// The environment variables a key file takes values from (`env = "..."`), for `.env`;
/// empty if the file cannot be read (the error comes when the keys are loaded).
pub(crate) fn env_names(path: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path).map(Zeroizing::new) else {
        return Vec::new();
    };
    toml::from_str::<KeyFile>(&text).map_or_else(
        |_| Vec::new(),
        |file| file.keys.into_iter().filter_map(|key| key.env).collect(),
    )
}

fn load_file(path: &Path) -> Result<KeySet, StartError> {
    let flag = || format!("--keys-file {}", path.display());
    let fail = |what: &dyn fmt::Display| StartError::new(format!("{}: {what}", flag()));
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| StartError::caused(flag(), e))?);
    let file: KeyFile = toml::from_str(&text).map_err(|e| fail(&toml_error(&e, &text)))?;
    if file.keys.is_empty() {
        return Err(fail(&"no [[key]] table: the file lists no key"));
    }
    let count = file.keys.len();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut specs = Vec::with_capacity(count);
    for (i, entry) in file.keys.into_iter().enumerate() {
        let label = format!("key {} of {count} ({})", i + 1, entry.name);
        let spec = spec(entry, dir).map_err(|what| fail(&format!("{label}: {what}")))?;
        specs.push(spec);
    }
    // Zero weights and caps are caught above; what is left is a repeated key or name,
    // which the library names by position.
    KeySet::from_specs(specs).map_err(|e| fail(&e))
}

/// One entry's key and settings, or what is wrong with it (without the key's position,
/// which the caller adds).
fn spec(entry: KeyEntry, dir: &Path) -> Result<KeySpec, String> {
    if entry.name.trim().is_empty() {
        return Err("the name is empty".to_owned());
    }
    let value: Zeroizing<String> = match (entry.env, entry.file, entry.value) {
        (Some(var), None, None) => Zeroizing::new(
            std::env::var(&var).map_err(|_| format!("environment variable {var} is not set"))?,
        ),
        (None, Some(file), None) => {
            let file = dir.join(file);
            Zeroizing::new(
                std::fs::read_to_string(&file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
            )
        }
        (None, None, Some(InlineSecret(value))) => {
            tracing::warn!(
                "key {name:?} is written in the key file itself: keep the file out of \
                 repositories and tickets, or use env or file instead",
                name = entry.name.trim()
            );
            value
        }
        (None, None, None) => return Err("no value: set one of env, file or value".to_owned()),
        _ => return Err("more than one of env, file and value".to_owned()),
    };
    let key = ApiKey::new(value.as_str()).map_err(|e| match e {
        KeyError::Empty { .. } | KeyError::NotConfigured { .. } => "the key is empty".to_owned(),
        KeyError::InvalidByte { offset, kind, .. } => {
            format!("the key contains {kind} at byte {offset}; {}", kind.hint())
        }
        other => other.to_string(),
    })?;
    let positive = |field: &str, n: Option<u32>| match n {
        Some(0) => Err(format!("{field} must be at least 1")),
        _ => Ok(n),
    };
    let mut spec = KeySpec::new(key).name(entry.name.trim());
    if let Some(weight) = positive("weight", entry.weight)? {
        spec = spec.weight(weight);
    }
    if let Some(rpm) = positive("rpm", entry.rpm)? {
        spec = spec.quota(Quota::per_minute(rpm));
    }
    if let Some(max) = positive("max_in_flight", entry.max_in_flight)? {
        spec = spec.max_in_flight(max);
    }
    if let Some(account) = entry.account {
        spec = spec.account(account);
    }
    for (model, limits) in entry.models {
        if model.trim().is_empty() {
            return Err("a [key.models] table has an empty model name".to_owned());
        }
        let field = |name: &str| format!("models.\"{model}\".{name}");
        if let Some(rpm) = positive(&field("rpm"), limits.rpm)? {
            spec = spec.bucket_quota(model.clone(), Quota::per_minute(rpm));
        }
        if let Some(max) = positive(&field("max_in_flight"), limits.max_in_flight)? {
            spec = spec.bucket_max_in_flight(model.clone(), max);
        }
    }
    Ok(spec)
}

/// A TOML error as `line N: message`. toml's own `Display` prints the offending line,
/// which may hold a key written in the file, and serde's messages quote wrong values
/// (`invalid type: string "sk-…"`): quoted text is left out.
fn toml_error(error: &toml::de::Error, text: &str) -> String {
    let message = redact_quoted(error.message().trim());
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Replaces every `"…"` pair in `message` with `"<redacted>"` (a lone `"`, as in
/// "expected `\"`", stays).
fn redact_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        let Some(len) = rest[open + 1..].find('"') else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str("\"<redacted>\"");
        rest = &rest[open + len + 2..];
    }
    out.push_str(rest);
    out
}

/// A fingerprint of everything a key file's keys are read from: the file and the files
/// it names. `None` if the key file cannot be read.
pub(crate) fn fingerprint(path: &Path) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let text = Zeroizing::new(std::fs::read(path).ok()?);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    // Secret files (a Kubernetes secret volume, say) change without the key file changing.
    let parsed = std::str::from_utf8(&text)
        .ok()
        .and_then(|text| toml::from_str::<KeyFile>(text).ok());
    if let Some(file) = parsed {
        let dir = path.parent().unwrap_or(Path::new("."));
        for entry in file.keys {
            if let Some(file) = entry.file {
                let bytes = Zeroizing::new(std::fs::read(dir.join(file)).unwrap_or_default());
                bytes.hash(&mut hasher);
            }
        }
    }
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(text: &str) -> String {
        match toml::from_str::<KeyFile>(text) {
            Ok(_) => panic!("{text:?} parsed"),
            Err(e) => toml_error(&e, text),
        }
    }

    #[test]
    fn a_single_bracket_key_table_is_told_in_words() {
        assert_eq!(
            parse_error("[key]\nname = \"a\"\nenv = \"A\"\n"),
            "line 1: `[key]` is a single table: write `[[key]]`, with double brackets, above \
             each key"
        );
        // Mistakes inside `[[key]]` tables keep their own message.
        assert_eq!(
            parse_error("[[key]]\nname = \"a\"\nvalu = \"x\"\n"),
            "line 3: unknown field `valu`, expected one of `name`, `env`, `file`, `value`, \
             `weight`, `rpm`, `max_in_flight`, `account`, `models`"
        );
    }

    #[test]
    fn per_model_limits_go_under_each_key() {
        let text = "[[key]]\nname = \"a\"\nenv = \"A\"\nmax_in_flight = 8\n\
                    [key.models.\"glm-4-plus\"]\nmax_in_flight = 2\nrpm = 60\n\
                    [key.models.\"glm-4-flash\"]\nrpm = 600\n\n\
                    [[key]]\nname = \"b\"\nenv = \"B\"\n";
        let file: KeyFile = toml::from_str(text).unwrap();
        let models: Vec<(&str, Option<u32>, Option<u32>)> = file.keys[0]
            .models
            .iter()
            .map(|(name, limits)| (name.as_str(), limits.max_in_flight, limits.rpm))
            .collect();
        assert_eq!(
            models,
            [
                ("glm-4-flash", None, Some(600)),
                ("glm-4-plus", Some(2), Some(60))
            ]
        );
        assert!(file.keys[1].models.is_empty());
        // A mistake in a model's table names the field.
        assert_eq!(
            parse_error("[[key]]\nname = \"a\"\nenv = \"A\"\n[key.models.m]\nrpn = 1\n"),
            "line 5: unknown field `rpn`, expected `rpm` or `max_in_flight`"
        );
    }

    #[test]
    fn quoted_text_is_redacted() {
        assert_eq!(
            redact_quoted(r#"invalid type: string "sk-secret", expected u32"#),
            r#"invalid type: string "<redacted>", expected u32"#
        );
        assert_eq!(
            redact_quoted("unknown field `valu`"),
            "unknown field `valu`"
        );
        assert_eq!(redact_quoted("expected `\"`"), "expected `\"`");
    }
}
