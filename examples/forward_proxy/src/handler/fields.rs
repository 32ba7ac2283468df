//! The fields of a JSON request body that route it ([`BodyFields`]): its model, the ids
//! that name its session, and whether it asks for a stream with usage. Read from the top
//! level of the buffered body without building a document: other values are skipped, not
//! kept.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

/// What the proxy read of a request's body, as a request extension for its router.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BodyFields {
    /// `model`.
    pub(crate) model: Option<Box<str>>,
    /// `prompt_cache_key` (OpenAI).
    pub(crate) prompt_cache_key: Option<Box<str>>,
    /// `metadata.user_id` (Anthropic).
    pub(crate) metadata_user_id: Option<Box<str>>,
    /// `user` (OpenAI, Zhipu).
    pub(crate) user: Option<Box<str>>,
    /// `stream`, when a boolean.
    pub(crate) stream: Option<bool>,
    /// Is there a `stream_options` field (of any value)?
    pub(crate) stream_options: bool,
    /// `stream_options.include_usage`, when a boolean.
    pub(crate) include_usage: Option<bool>,
    /// The output the request allows: `max_completion_tokens`, else `max_tokens` (OpenAI
    /// chat, Anthropic, Zhipu), else `max_output_tokens` (OpenAI responses), when a
    /// non-negative integer.
    pub(crate) max_output: Option<u64>,
}

impl BodyFields {
    /// The fields of `body`, a JSON object; none for anything else (a body that is not JSON
    /// is the provider's to refuse, not the proxy's). A field whose value is not a string is
    /// left out; the others are still read.
    pub(crate) fn read(body: &[u8]) -> Self {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        match Top::deserialize(&mut deserializer) {
            Ok(top) => Self {
                model: top.model.map(owned),
                prompt_cache_key: top.prompt_cache_key.map(owned),
                metadata_user_id: top.metadata.and_then(|m| m.user_id).map(owned),
                user: top.user.map(owned),
                stream: top.stream,
                stream_options: top.stream_options.is_some(),
                include_usage: top.stream_options.flatten().and_then(|o| o.include_usage),
                max_output: top
                    .max_completion_tokens
                    .or(top.max_tokens)
                    .or(top.max_output_tokens),
            },
            Err(_) => Self::default(),
        }
    }
}

fn owned(value: Cow<'_, str>) -> Box<str> {
    Box::from(value.as_ref())
}

/// The top level, borrowed from the body where the string has no escapes.
#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default, deserialize_with = "string")]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string")]
    prompt_cache_key: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string")]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "object")]
    metadata: Option<Metadata<'a>>,
    #[serde(default, deserialize_with = "boolean")]
    stream: Option<bool>,
    /// `Some(None)`: present, but not an object.
    #[serde(default, deserialize_with = "present_object")]
    stream_options: Option<Option<StreamOptions>>,
    #[serde(default, deserialize_with = "count")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    max_completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "count")]
    max_output_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default, deserialize_with = "boolean")]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default, deserialize_with = "string")]
    user_id: Option<Cow<'a, str>>,
}

/// A string, or `None` for any other value (skipped).
fn string<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    deserializer.deserialize_any(StringOrSkip)
}

/// An object with the fields of `T`, or `None` for any other value (skipped).
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    deserializer.deserialize_any(ObjectOrSkip(PhantomData))
}

/// As [`object`], `Some` when the field is there at all.
fn present_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    object(deserializer).map(Some)
}

/// A boolean, or `None` for any other value (skipped).
fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    deserializer.deserialize_any(BoolOrSkip)
}

struct StringOrSkip;

impl<'de> Visitor<'de> for StringOrSkip {
    type Value = Option<Cow<'de, str>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v)))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| None)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

struct ObjectOrSkip<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOrSkip<T> {
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// A non-negative integer, or `None` for any other value (skipped).
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    deserializer.deserialize_any(CountOrSkip)
}

struct CountOrSkip;

impl<'de> Visitor<'de> for CountOrSkip {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| None)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

struct BoolOrSkip;

impl<'de> Visitor<'de> for BoolOrSkip {
    type Value = Option<bool>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| None)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| None)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_routing_fields_wherever_they_are_at_the_top_level() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"there\""}],
            "metadata":{"user_id":"u-1","other":[1,2]},"stream":true,
            "model":"glm-4-plus","user":"alice","prompt_cache_key":"conv-9"}"#;
        assert_eq!(
            BodyFields::read(body),
            BodyFields {
                model: Some("glm-4-plus".into()),
                prompt_cache_key: Some("conv-9".into()),
                metadata_user_id: Some("u-1".into()),
                user: Some("alice".into()),
                stream: Some(true),
                stream_options: false,
                include_usage: None,
                max_output: None,
            }
        );
    }

    #[test]
    fn reads_the_output_a_request_allows() {
        let read = |body: &str| BodyFields::read(body.as_bytes()).max_output;
        assert_eq!(read(r#"{"max_tokens":100}"#), Some(100));
        assert_eq!(
            read(r#"{"max_tokens":100,"max_completion_tokens":50}"#),
            Some(50)
        );
        assert_eq!(read(r#"{"max_output_tokens":70}"#), Some(70));
        assert_eq!(read(r#"{"max_tokens":"many"}"#), None);
        assert_eq!(read(r#"{"max_tokens":-1}"#), None);
    }

    #[test]
    fn reads_whether_a_stream_asks_for_usage() {
        let fields =
            BodyFields::read(br#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert_eq!(
            (fields.stream, fields.stream_options, fields.include_usage),
            (Some(true), true, Some(true))
        );
        let fields = BodyFields::read(br#"{"stream":"yes","stream_options":{"x":1}}"#);
        assert_eq!(
            (fields.stream, fields.stream_options, fields.include_usage),
            (None, true, None)
        );
        let fields = BodyFields::read(br#"{"stream_options":null,"stream":false}"#);
        assert_eq!(
            (fields.stream, fields.stream_options, fields.include_usage),
            (Some(false), true, None)
        );
    }

    #[test]
    fn nested_fields_of_the_same_name_are_not_the_top_level_ones() {
        let body = br#"{"messages":[{"model":"not-this","user":"nor-this"}],"model":"gpt-4o"}"#;
        let fields = BodyFields::read(body);
        assert_eq!(fields.model.as_deref(), Some("gpt-4o"));
        assert_eq!(fields.user, None);
    }

    #[test]
    fn a_field_of_another_type_is_left_out_and_the_rest_still_read() {
        let body = br#"{"user":42,"metadata":"x","model":"claude-sonnet-4-5"}"#;
        let fields = BodyFields::read(body);
        assert_eq!(fields.model.as_deref(), Some("claude-sonnet-4-5"));
        assert_eq!((fields.user, fields.metadata_user_id), (None, None));
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let fields = BodyFields::read(br#"{"model":"a\u002db"}"#);
        assert_eq!(fields.model.as_deref(), Some("a-b"));
    }

    #[test]
    fn a_body_that_is_not_a_json_object_has_no_fields() {
        for body in [&b""[..], b"[]", b"not json", br#"{"model":"x""#] {
            assert_eq!(BodyFields::read(body), BodyFields::default(), "{body:?}");
        }
    }
}
