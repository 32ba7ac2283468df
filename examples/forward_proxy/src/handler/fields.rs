//! The fields of a JSON request body that route it ([`BodyFields`]): its model, and the ids
//! that name its session. Read from the top level of the buffered body without building a
//! document: other values are skipped, not kept.

use std::borrow::Cow;
use std::fmt;

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
    #[serde(borrow, default, deserialize_with = "metadata")]
    metadata: Option<Metadata<'a>>,
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

/// An object with the fields of [`Metadata`], or `None` for any other value (skipped).
fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Metadata<'de>>, D::Error> {
    deserializer.deserialize_any(MetadataOrSkip)
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

struct MetadataOrSkip;

impl<'de> Visitor<'de> for MetadataOrSkip {
    type Value = Option<Metadata<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Metadata::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
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
            }
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
