//! The fields of a JSON request body that route it ([`BodyFields`]): its model, the ids
//! that name its session, and whether it asks for a stream with usage. Read from the top
//! level of the buffered body without building a document: other values are skipped, not
//! kept.
//!
//! In the opt-in prefix mode (`--affinity prefix`), a request naming no session gets the
//! hash of its prompt's stable prefix as its affinity id ([`prompt_prefix`]): the model,
//! the system prompt and the first user message, each read up to [`PREFIX_PART_BYTES`].
//! The turns of one conversation share that prefix, so they go to one key, whose prompt
//! cache holds it.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use xxhash_rust::xxh3::Xxh3Default;

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
    /// The hash of the prompt's stable prefix ([`prompt_prefix`]), in the prefix mode, for
    /// a request whose body names no session.
    pub(crate) prefix: Option<[u8; 8]>,
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
                prefix: None,
            },
            Err(_) => Self::default(),
        }
    }

    /// Does the body name the request's session?
    pub(crate) fn names_session(&self) -> bool {
        self.prompt_cache_key.is_some() || self.metadata_user_id.is_some() || self.user.is_some()
    }
}

/// The most bytes of each part of a prompt's prefix (the model, the system prompt, the
/// first user message) that [`prompt_prefix`] hashes: enough to tell conversations apart,
/// bounded so that a long prompt costs no more than a short one.
pub(crate) const PREFIX_PART_BYTES: usize = 4096;

/// The hash of the stable prefix of the prompt in `body`, a JSON request of any of the
/// providers' shapes: the top-level `model`; the system prompt (`system` (Anthropic),
/// `instructions` (OpenAI Responses), `systemInstruction` (Gemini), or the `system` and
/// `developer` messages before the first user message); and the first user message of
/// `messages` (OpenAI, Anthropic, Zhipu), `contents` (Gemini) or `input` (OpenAI Responses,
/// a string or messages). Each part is read up to [`PREFIX_PART_BYTES`] of its text (every
/// string of it, with the names of its fields), so that the same conversation hashes the
/// same in every turn, whatever else the request carries. `None` when the body is not a
/// JSON object, or has neither a system prompt nor a user message.
///
/// xxh3 (64 bits), as specified: replicas of the proxy agree on a conversation's id.
pub(crate) fn prompt_prefix(body: &[u8]) -> Option<[u8; 8]> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let parts = PrefixParts::deserialize(&mut deserializer).ok()?;
    if parts.system.is_none() && parts.first_user.is_none() {
        return None;
    }
    let mut hasher = Xxh3Default::new();
    for part in [parts.model, parts.system, parts.first_user] {
        // A part's absence hashes apart from any digest.
        match part {
            Some(digest) => {
                hasher.update(&[1]);
                hasher.update(&digest.to_le_bytes());
            }
            None => hasher.update(&[0]),
        }
    }
    Some(hasher.digest().to_le_bytes())
}

/// The digests of a prompt's prefix parts, read from the top level of its body.
#[derive(Default)]
struct PrefixParts {
    model: Option<u64>,
    system: Option<u64>,
    first_user: Option<u64>,
}

impl<'de> Deserialize<'de> for PrefixParts {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PrefixVisitor)
    }
}

struct PrefixVisitor;

impl<'de> Visitor<'de> for PrefixVisitor {
    type Value = PrefixParts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PrefixParts, A::Error> {
        let mut parts = PrefixParts::default();
        // The system prompt of the messages, if the top level has none.
        let mut in_messages = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "model" => parts.model = Some(map.next_value_seed(Digest)?),
                "system" | "instructions" | "systemInstruction" => {
                    parts.system = Some(map.next_value_seed(Digest)?);
                }
                "messages" | "contents" | "input" => {
                    let messages = map.next_value_seed(Messages)?;
                    in_messages = messages.system.or(in_messages);
                    parts.first_user = messages.first_user.or(parts.first_user);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        parts.system = parts.system.or(in_messages);
        Ok(parts)
    }
}

/// A JSON value's digest: every string, number and field name in it, in order, up to
/// [`PREFIX_PART_BYTES`].
struct Digest;

impl<'de> de::DeserializeSeed<'de> for Digest {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        let mut hasher = Bounded::new();
        de::DeserializeSeed::deserialize(Feed(&mut hasher), deserializer)?;
        Ok(hasher.digest())
    }
}

/// A hasher that takes at most [`PREFIX_PART_BYTES`].
struct Bounded {
    hasher: Xxh3Default,
    left: usize,
}

impl Bounded {
    fn new() -> Self {
        Self {
            hasher: Xxh3Default::new(),
            left: PREFIX_PART_BYTES,
        }
    }

    /// `tag` tells a string from a field name or a number of the same bytes; 0xff is no
    /// byte of UTF-8, so it ends each text.
    fn feed(&mut self, tag: u8, bytes: &[u8]) {
        if self.left == 0 {
            return;
        }
        let bytes = &bytes[..bytes.len().min(self.left)];
        self.left -= bytes.len();
        self.hasher.update(&[tag]);
        self.hasher.update(bytes);
        self.hasher.update(&[0xff]);
    }

    fn digest(&self) -> u64 {
        self.hasher.digest()
    }
}

/// Feeds a JSON value into a [`Bounded`] hasher.
struct Feed<'h>(&'h mut Bounded);

impl<'de> de::DeserializeSeed<'de> for Feed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Feed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.feed(b's', v.as_bytes());
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0.feed(b'b', &[u8::from(v)]);
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.feed(b'i', &v.to_le_bytes());
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.feed(b'u', &v.to_le_bytes());
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.0.feed(b'f', &v.to_le_bytes());
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.feed(b'n', &[]);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.feed(b'{', &[]);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            self.0.feed(b'k', key.as_bytes());
            map.next_value_seed(Feed(self.0))?;
        }
        self.0.feed(b'}', &[]);
        Ok(())
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.feed(b'[', &[]);
        while seq.next_element_seed(Feed(self.0))?.is_some() {}
        self.0.feed(b']', &[]);
        Ok(())
    }
}

/// What a list of messages says of the prefix: the digests of its system messages before
/// the first user message, and of that message.
#[derive(Default)]
struct MessagesPrefix {
    system: Option<u64>,
    first_user: Option<u64>,
}

/// Reads a list of messages (or, as OpenAI's Responses `input` may be, one string: the
/// user's message).
struct Messages;

impl<'de> de::DeserializeSeed<'de> for Messages {
    type Value = MessagesPrefix;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(OrSkip(self))
    }
}

impl<'de> Take<'de> for Messages {
    type Value = MessagesPrefix;

    fn skipped(self) -> MessagesPrefix {
        MessagesPrefix::default()
    }

    fn str<E: de::Error>(self, v: &str) -> Result<MessagesPrefix, E> {
        let mut hasher = Bounded::new();
        hasher.feed(b's', v.as_bytes());
        Ok(MessagesPrefix {
            system: None,
            first_user: Some(hasher.digest()),
        })
    }

    fn seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<MessagesPrefix, A::Error> {
        let mut prefix = MessagesPrefix::default();
        let mut system = Bounded::new();
        let mut any_system = false;
        while let Some(message) = seq.next_element::<Message>()? {
            match message.role {
                Role::System => {
                    any_system = true;
                    system.feed(b'm', &message.content.to_le_bytes());
                }
                Role::User => {
                    prefix.first_user = Some(message.content);
                    break;
                }
                Role::Other => {}
            }
        }
        // The rest of the conversation is not the prefix: skipped.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        prefix.system = any_system.then(|| system.digest());
        Ok(prefix)
    }
}

/// Whose message it is, as far as the prefix goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `system`, `developer`.
    System,
    /// `user`.
    User,
    /// Anything else (`assistant`, `model`, `tool`), or none.
    Other,
}

/// One message: its role, and the digest of its `content` (`parts` for Gemini).
struct Message {
    role: Role,
    content: u64,
}

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OrSkip(MessageFields))
    }
}

/// Reads a [`Message`]; anything but an object is a message of no role.
struct MessageFields;

impl<'de> Take<'de> for MessageFields {
    type Value = Message;

    fn skipped(self) -> Message {
        Message {
            role: Role::Other,
            content: 0,
        }
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
        let mut role = Role::Other;
        let mut content = Bounded::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match &*key {
                "role" => {
                    role = match map.next_value_seed(Text)? {
                        Some(r) if r == "system" || r == "developer" => Role::System,
                        Some(r) if r == "user" => Role::User,
                        _ => Role::Other,
                    };
                }
                "content" | "parts" => map.next_value_seed(Feed(&mut content))?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Message {
            role,
            content: content.digest(),
        })
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
    deserializer.deserialize_any(OrSkip(StringField))
}

/// An object with the fields of `T`, or `None` for any other value (skipped).
fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    deserializer.deserialize_any(OrSkip(ObjectField(PhantomData)))
}

/// As [`object`], `Some` when the field is there at all.
fn present_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    object(deserializer).map(Some)
}

/// A boolean, or `None` for any other value (skipped).
fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<bool>, D::Error> {
    deserializer.deserialize_any(OrSkip(BoolField))
}

/// A non-negative integer, or `None` for any other value (skipped).
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    deserializer.deserialize_any(OrSkip(CountField))
}

/// [`string`] as a seed.
struct Text;

impl<'de> de::DeserializeSeed<'de> for Text {
    type Value = Option<Cow<'de, str>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        string(deserializer)
    }
}

/// What a field takes of a JSON value. Every kind it does not take is read past and
/// gives [`Take::skipped`]: a body whose field has an unexpected type still routes, by
/// what else it names, instead of failing the read.
trait Take<'de>: Sized {
    /// What the field reads as.
    type Value;

    /// The value of a field whose JSON value this does not take.
    fn skipped(self) -> Self::Value;

    /// A string, escapes undone.
    fn str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(self.skipped())
    }

    /// A string without escapes, borrowed from the body.
    fn borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.str(v)
    }

    /// `true` or `false`.
    fn bool(self, _: bool) -> Self::Value {
        self.skipped()
    }

    /// A non-negative integer.
    fn u64(self, _: u64) -> Self::Value {
        self.skipped()
    }

    /// An object.
    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_map(map).map(|_| self.skipped())
    }

    /// An array.
    fn seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        IgnoredAny.visit_seq(seq).map(|_| self.skipped())
    }
}

/// The visitor of a [`Take`]: any JSON value, given to the field or skipped.
struct OrSkip<T>(T);

impl<'de, T: Take<'de>> Visitor<'de> for OrSkip<T> {
    type Value = T::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.0.borrowed_str(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.0.str(v)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.map(map)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.seq(seq)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(self.0.bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.0.u64(v))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(self.0.skipped())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(self.0.skipped())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.0.skipped())
    }
}

/// Takes a string, borrowed where it has no escapes.
struct StringField;

impl<'de> Take<'de> for StringField {
    type Value = Option<Cow<'de, str>>;

    fn skipped(self) -> Self::Value {
        None
    }

    fn str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Owned(v.to_owned())))
    }

    fn borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(Cow::Borrowed(v)))
    }
}

/// Takes an object with the fields of `T`.
struct ObjectField<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Take<'de> for ObjectField<T> {
    type Value = Option<T>;

    fn skipped(self) -> Self::Value {
        None
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Some)
    }
}

/// Takes a non-negative integer.
struct CountField;

impl<'de> Take<'de> for CountField {
    type Value = Option<u64>;

    fn skipped(self) -> Self::Value {
        None
    }

    fn u64(self, v: u64) -> Self::Value {
        Some(v)
    }
}

/// Takes a boolean.
struct BoolField;

impl<'de> Take<'de> for BoolField {
    type Value = Option<bool>;

    fn skipped(self) -> Self::Value {
        None
    }

    fn bool(self, v: bool) -> Self::Value {
        Some(v)
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
                prefix: None,
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

    /// A conversation's turns, OpenAI's shape: the system prompt and first user message
    /// stay, later turns are appended.
    fn turn(system: &str, first: &str, turns: usize) -> Vec<u8> {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": system}),
            serde_json::json!({"role": "user", "content": first}),
        ];
        for t in 1..turns {
            messages
                .push(serde_json::json!({"role": "assistant", "content": format!("answer {t}")}));
            messages.push(serde_json::json!({"role": "user", "content": format!("question {t}")}));
        }
        serde_json::json!({"model": "gpt-4o", "messages": messages, "temperature": 0.2 * turns as f64})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn a_conversations_turns_share_their_prompt_prefix() {
        let first = prompt_prefix(&turn("You are terse.", "Hello", 1)).unwrap();
        for turns in 2..5 {
            assert_eq!(
                prompt_prefix(&turn("You are terse.", "Hello", turns)),
                Some(first)
            );
        }
        // Another first message, another system prompt: another conversation.
        assert_ne!(prompt_prefix(&turn("You are terse.", "Hi", 1)), Some(first));
        assert_ne!(
            prompt_prefix(&turn("You are brief.", "Hello", 1)),
            Some(first)
        );
        // Another model: another cache.
        let other_model = String::from_utf8(turn("You are terse.", "Hello", 1))
            .unwrap()
            .replace("gpt-4o", "gpt-4o-mini");
        assert_ne!(prompt_prefix(other_model.as_bytes()), Some(first));
    }

    #[test]
    fn the_prefix_reads_each_providers_shape() {
        // Anthropic: `system` at the top level (a string or blocks), content blocks.
        let anthropic = |first: &str| {
            serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
                "system": [{"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
                "messages": [{"content": [{"type": "text", "text": first}], "role": "user"}]})
            .to_string()
        };
        let a = prompt_prefix(anthropic("one").as_bytes()).unwrap();
        assert_ne!(prompt_prefix(anthropic("two").as_bytes()), Some(a));
        // Gemini: `systemInstruction`, `contents` of `parts`.
        let gemini = |first: &str| {
            serde_json::json!({"systemInstruction": {"parts": [{"text": "Be kind."}]},
                "contents": [{"role": "user", "parts": [{"text": first}]},
                             {"role": "model", "parts": [{"text": "ok"}]}]})
            .to_string()
        };
        let g = prompt_prefix(gemini("one").as_bytes()).unwrap();
        assert_ne!(prompt_prefix(gemini("two").as_bytes()), Some(g));
        // OpenAI Responses: `instructions` and `input` as a string.
        let responses = br#"{"model":"gpt-4.1","instructions":"Be kind.","input":"one"}"#;
        assert!(prompt_prefix(responses).is_some());
        // Nothing to key on: no prefix.
        assert_eq!(prompt_prefix(br#"{"model":"gpt-4o"}"#), None);
        assert_eq!(
            prompt_prefix(br#"{"model":"gpt-4o","messages":[{"role":"assistant","content":"x"}]}"#),
            None
        );
        assert_eq!(prompt_prefix(b"not json"), None);
    }

    #[test]
    fn the_prefix_reads_a_bounded_number_of_bytes_of_each_part() {
        let long = "x".repeat(PREFIX_PART_BYTES);
        let a = prompt_prefix(&turn(&format!("{long}a"), "Hello", 1));
        let b = prompt_prefix(&turn(&format!("{long}b"), "Hello", 1));
        assert!(a.is_some());
        assert_eq!(a, b, "past the bound, the system prompt is not read");
        let c = prompt_prefix(&turn(&long[..PREFIX_PART_BYTES - 8], "Hello", 1));
        let d = prompt_prefix(&turn(
            &format!("{}y", &long[..PREFIX_PART_BYTES - 9]),
            "Hello",
            1,
        ));
        assert_ne!(c, d, "within it, every byte counts");
    }

    #[test]
    fn fields_say_whether_the_body_names_a_session() {
        assert!(!BodyFields::read(&turn("s", "u", 1)).names_session());
        assert!(BodyFields::read(br#"{"user":"alice"}"#).names_session());
        assert!(BodyFields::read(br#"{"metadata":{"user_id":"u"}}"#).names_session());
        assert!(BodyFields::read(br#"{"prompt_cache_key":"k"}"#).names_session());
    }

    #[test]
    fn a_body_that_is_not_a_json_object_has_no_fields() {
        for body in [&b""[..], b"[]", b"not json", br#"{"model":"x""#] {
            assert_eq!(BodyFields::read(body), BodyFields::default(), "{body:?}");
        }
    }
}
