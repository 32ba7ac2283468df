//! The tokens an answer says it used ([`Usage`]), read as its body passes through
//! ([`UsageScan`]), and the usage an OpenAI stream carries only when asked: the proxy asks
//! for it ([`ask_for_usage`]) and takes the extra event out again ([`UsageStrip`]), so the
//! client gets the stream it would have got.
//!
//! Where providers put usage (each checked against the provider's reference):
//! - OpenAI chat completions: `usage.{prompt_tokens, completion_tokens}` in the JSON
//!   answer; in a stream only when the request sets `stream_options.include_usage`: then
//!   "an additional chunk will be streamed before the `data: [DONE]` message. The `usage`
//!   field on this chunk shows the token usage statistics for the entire request, and the
//!   `choices` field will always be an empty array. All other chunks will also include a
//!   `usage` field, but with a null value"
//!   (<https://platform.openai.com/docs/api-reference/chat/create#chat-create-stream_options>).
//! - OpenAI responses: `usage.{input_tokens, output_tokens}`, in a stream on the
//!   `response.completed` event's `response`
//!   (<https://platform.openai.com/docs/api-reference/responses-streaming/response/completed>).
//! - Anthropic messages: `usage.{input_tokens, output_tokens, cache_creation_input_tokens,
//!   cache_read_input_tokens}`; in a stream `message_start` carries the input and
//!   `message_delta` the output, "cumulative"
//!   (<https://docs.anthropic.com/en/docs/build-with-claude/streaming#event-types>).
//! - Zhipu BigModel: OpenAI's shape (`usage.{prompt_tokens, completion_tokens}`), in a
//!   stream on its last chunk (<https://docs.bigmodel.cn/api-reference/模型-api/对话补全>).
//!
//! The scan does not parse the answer: it looks for the key `"usage"` (one vectorised
//! search a frame) and parses only the object that follows it. A string containing
//! `"usage"` is escaped in JSON (`\"usage\"`), so it is never taken for the key; the last
//! object seen wins, field by field (Anthropic's `message_delta` after `message_start`).

use std::collections::VecDeque;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde::Deserialize;

/// The key searched for.
const KEY: &[u8] = b"\"usage\"";

/// Finds [`KEY`] (built once: building a searcher costs more than most searches).
static FIND_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(KEY));

/// A usage object larger than this is not usage (the largest real one is ~400 bytes).
const MAX_USAGE_OBJECT: usize = 4096;

/// The tokens an answer reported, each as the provider counts it. `None`: not reported.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    /// Prompt tokens: OpenAI's and Zhipu's `prompt_tokens` (cached ones included),
    /// OpenAI responses' and Anthropic's `input_tokens` (Anthropic: cache reads and writes
    /// not included).
    pub(crate) input: Option<u64>,
    /// `completion_tokens` or `output_tokens`.
    pub(crate) output: Option<u64>,
    /// Anthropic's `cache_creation_input_tokens`.
    pub(crate) cache_creation: Option<u64>,
    /// Anthropic's `cache_read_input_tokens`.
    pub(crate) cache_read: Option<u64>,
}

impl Usage {
    /// Did the answer report anything?
    pub(crate) fn is_reported(&self) -> bool {
        self.input.is_some() || self.output.is_some()
    }

    /// The fields `raw` reports replace these.
    fn merge(&mut self, raw: RawUsage) {
        let input = raw.prompt_tokens.or(raw.input_tokens);
        let output = raw.completion_tokens.or(raw.output_tokens);
        for (field, value) in [
            (&mut self.input, input),
            (&mut self.output, output),
            (&mut self.cache_creation, raw.cache_creation_input_tokens),
            (&mut self.cache_read, raw.cache_read_input_tokens),
        ] {
            if value.is_some() {
                *field = value;
            }
        }
    }
}

/// A usage object as the providers write it (other fields ignored).
#[derive(Deserialize)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

/// Reads the usage in an answer's body, fed frame by frame ([`feed`](Self::feed)), JSON
/// or a server-sent event stream alike. Allocates once, for the first usage object that
/// does not sit whole in one frame.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug, Default)]
pub(crate) struct UsageScan {
    usage: Usage,
    /// The last bytes of the body so far (up to one less than [`KEY`]): a key split
    /// between two frames.
    edge: [u8; KEY.len() - 1],
    edge_len: usize,
    /// After a key: where in the value that follows the scan is.
    capture: Option<Capture>,
    /// The usage object read so far, when it spans frames.
    object: Vec<u8>,
}

/// Where the scan is in the value after a `"usage"` key.
#[derive(Debug, Clone, Copy)]
enum Capture {
    /// Before the `:`.
    Colon,
    /// Before the value.
    Value,
    /// In the object, `depth` braces deep.
    Object {
        depth: u32,
        in_string: bool,
        escaped: bool,
    },
}

/// What a step of the capture came to.
enum Step {
    /// All of the frame was used: the value goes on in the next.
    More,
    /// Not an object (`null`, a string: `"type":"usage"`): the scan resumes at `at`.
    NotAnObject { at: usize },
    /// The object ends before `end` (exclusive): `object` plus `frame[..end]` is it.
    Object { end: usize },
}

impl UsageScan {
    /// The usage read so far.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn usage(&self) -> Usage {
        self.usage
    }

    /// Reads the next frame of the body.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn feed(&mut self, frame: &[u8]) {
        let mut rest = frame;
        loop {
            if self.capture.is_some() {
                match self.step(rest) {
                    Step::More => {
                        self.edge_len = 0;
                        return;
                    }
                    Step::NotAnObject { at } => {
                        self.object.clear();
                        rest = &rest[at..];
                    }
                    Step::Object { end } => {
                        self.finish_object();
                        rest = &rest[end..];
                    }
                }
                self.capture = None;
                self.edge_len = 0;
            }
            // A key across the last frame's end and this one's start.
            if self.edge_len > 0 {
                let mut joint = [0u8; 2 * (KEY.len() - 1)];
                let head = rest.len().min(KEY.len() - 1);
                joint[..self.edge_len].copy_from_slice(&self.edge[..self.edge_len]);
                joint[self.edge_len..self.edge_len + head].copy_from_slice(&rest[..head]);
                let joint = &joint[..self.edge_len + head];
                let found = FIND_KEY.find(joint).filter(|&at| at < self.edge_len);
                if let Some(at) = found {
                    // The key ends inside `rest`.
                    let after = at + KEY.len() - self.edge_len;
                    self.edge_len = 0;
                    self.capture = Some(Capture::Colon);
                    rest = &rest[after..];
                    continue;
                }
                if rest.len() < KEY.len() - 1 {
                    // A frame shorter than the key: the edge grows by it.
                    let mut edge = [0u8; KEY.len() - 1];
                    let keep = joint.len().min(KEY.len() - 1);
                    edge[..keep].copy_from_slice(&joint[joint.len() - keep..]);
                    self.edge = edge;
                    self.edge_len = keep;
                    return;
                }
            }
            match FIND_KEY.find(rest) {
                Some(at) => {
                    self.capture = Some(Capture::Colon);
                    rest = &rest[at + KEY.len()..];
                }
                None => {
                    let keep = rest.len().min(KEY.len() - 1);
                    self.edge[..keep].copy_from_slice(&rest[rest.len() - keep..]);
                    self.edge_len = keep;
                    return;
                }
            }
        }
    }

    /// Follows the value after a key through `frame`.
    fn step(&mut self, frame: &[u8]) -> Step {
        let mut capture = self.capture.expect("capturing");
        if let Capture::Object { .. } = capture {
            return self.step_object(frame, 0);
        }
        for (i, &byte) in frame.iter().enumerate() {
            capture = match capture {
                Capture::Colon | Capture::Value if byte.is_ascii_whitespace() => capture,
                Capture::Colon if byte == b':' => Capture::Value,
                Capture::Value if byte == b'{' => {
                    // The object starts here: what came before is not part of it.
                    self.object.clear();
                    return self.step_object(frame, i);
                }
                Capture::Colon | Capture::Value => return Step::NotAnObject { at: i },
                Capture::Object { .. } => unreachable!("followed in step_object"),
            };
        }
        self.capture = Some(capture);
        Step::More
    }

    /// Follows an object from `frame[start..]`, `frame[start]` being its `{` when it
    /// starts in this frame.
    fn step_object(&mut self, frame: &[u8], start: usize) -> Step {
        let (mut depth, mut in_string, mut escaped) = match self.capture {
            Some(Capture::Object {
                depth,
                in_string,
                escaped,
            }) => (depth, in_string, escaped),
            _ => (0, false, false),
        };
        for (i, &byte) in frame.iter().enumerate().skip(start) {
            if in_string {
                if escaped {
                    escaped = false;
                } else if byte == b'\\' {
                    escaped = true;
                } else if byte == b'"' {
                    in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        if self.object.is_empty() {
                            // Whole in this frame: no copy.
                            let object = &frame[start..=i];
                            if let Ok(raw) = serde_json::from_slice::<RawUsage>(object) {
                                self.usage.merge(raw);
                            }
                            return Step::Object { end: i + 1 };
                        }
                        if self.object.len() + i + 1 - start > MAX_USAGE_OBJECT {
                            self.object.clear();
                            return Step::NotAnObject { at: i + 1 };
                        }
                        self.object.extend_from_slice(&frame[start..=i]);
                        return Step::Object { end: i + 1 };
                    }
                }
                _ => {}
            }
        }
        if self.object.len() + frame.len() - start > MAX_USAGE_OBJECT {
            self.object.clear();
            return Step::NotAnObject { at: frame.len() };
        }
        self.object.extend_from_slice(&frame[start..]);
        self.capture = Some(Capture::Object {
            depth,
            in_string,
            escaped,
        });
        Step::More
    }

    /// The object in `self.object` is complete (empty when it sat whole in one frame and
    /// was parsed there).
    fn finish_object(&mut self) {
        if !self.object.is_empty() {
            if let Ok(raw) = serde_json::from_slice::<RawUsage>(&self.object) {
                self.usage.merge(raw);
            }
            self.object.clear();
        }
    }
}

/// `body`, a JSON request asking for a stream, with `"stream_options":{"include_usage":true}`
/// as its first field; `None` when it is not a JSON object.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
pub(crate) fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    const FIELD: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let mut asked = BytesMut::with_capacity(body.len() + FIELD.len());
    asked.extend_from_slice(&body[..=open]);
    asked.extend_from_slice(FIELD);
    asked.extend_from_slice(&body[open + 1..]);
    Some(asked.freeze())
}

/// Takes out of an OpenAI chat stream what `stream_options.include_usage` added: the
/// `"usage":null` field of each chunk and the extra chunk with empty `choices` carrying
/// the usage (read into the [`UsageScan`] on its way out). Whole events are passed on as
/// slices of the upstream's frames (no copy); an event split between frames is held until
/// its end. A stream that is not made of such events (no event end within 1 MiB) is
/// passed on unchanged from there.
#[cfg_attr(feature = "fuzzing", visibility::make(pub))]
#[derive(Debug, Default)]
pub(crate) struct UsageStrip {
    /// The start of an event whose end has not arrived.
    held: BytesMut,
    /// What to pass on, in order.
    ready: VecDeque<Bytes>,
    /// No event end came within the limit: pass everything on.
    given_up: bool,
}

/// The most of one event held while waiting for its end.
const MAX_HELD: usize = 1 << 20;

impl UsageStrip {
    /// Takes the next frame from the upstream.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn push(&mut self, frame: Bytes, scan: &mut UsageScan) {
        if self.given_up {
            scan.feed(&frame);
            self.ready.push_back(frame);
            return;
        }
        let data = if self.held.is_empty() {
            frame
        } else {
            self.held.extend_from_slice(&frame);
            self.held.split().freeze()
        };
        // Complete events end at the last blank line.
        let complete = last_event_end(&data);
        if complete < data.len() {
            if data.len() - complete > MAX_HELD {
                self.given_up = true;
                self.strip_events(data.slice(..complete), scan);
                let rest = data.slice(complete..);
                scan.feed(&rest);
                self.ready.push_back(rest);
                return;
            }
            self.held.extend_from_slice(&data[complete..]);
        }
        if complete > 0 {
            self.strip_events(data.slice(..complete), scan);
        }
    }

    /// The upstream's body ended: what is held goes as it is.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn finish(&mut self, scan: &mut UsageScan) {
        if !self.held.is_empty() {
            let rest = self.held.split().freeze();
            scan.feed(&rest);
            self.ready.push_back(rest);
        }
    }

    /// Is nothing waiting to be passed on?
    pub(crate) fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// The next piece to pass on.
    #[cfg_attr(feature = "fuzzing", visibility::make(pub))]
    pub(crate) fn pop(&mut self) -> Option<Bytes> {
        self.ready.pop_front()
    }

    /// Passes on `events` (whole events) without what the proxy asked for.
    fn strip_events(&mut self, events: Bytes, scan: &mut UsageScan) {
        let mut kept_from = 0;
        let mut start = 0;
        while start < events.len() {
            let end = next_event_end(&events[start..]).map_or(events.len(), |at| start + at);
            let event = &events[start..end];
            if let Some(key) = FIND_KEY.find(event) {
                match value_after_key(event, key + KEY.len()) {
                    Some(Value::Null { end: null_end }) => {
                        let (cut_start, cut_end) = null_field_span(event, key, null_end);
                        self.keep(&events, kept_from, start + cut_start);
                        kept_from = start + cut_end;
                    }
                    Some(Value::Object) if has_empty_choices(event) => {
                        scan.feed(event);
                        self.keep(&events, kept_from, start);
                        kept_from = end;
                    }
                    _ => {}
                }
            }
            start = end;
        }
        self.keep(&events, kept_from, events.len());
    }

    fn keep(&mut self, events: &Bytes, from: usize, to: usize) {
        if from < to {
            self.ready.push_back(events.slice(from..to));
        }
    }
}

/// Is the line feed at `data[at]` the end of a blank line (`\n\n` or `\n\r\n`), which
/// ends an event? (A lone `\r` as a line end is not followed: no provider sends it.)
fn ends_event(data: &[u8], at: usize) -> bool {
    at >= 1 && data[at - 1] == b'\n' || at >= 2 && data[at - 1] == b'\r' && data[at - 2] == b'\n'
}

/// Where the first event in `data` ends (exclusive), if it does.
fn next_event_end(data: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', data)
        .find(|&at| ends_event(data, at))
        .map(|at| at + 1)
}

/// Where the last complete event in `data` ends (exclusive); 0 when none does.
fn last_event_end(data: &[u8]) -> usize {
    memchr::memrchr_iter(b'\n', data)
        .find(|&at| ends_event(data, at))
        .map_or(0, |at| at + 1)
}

/// What follows a key.
enum Value {
    /// `null`, ending before `end`.
    Null { end: usize },
    /// An object.
    Object,
}

/// The value starting after `: ` at `event[at..]`.
fn value_after_key(event: &[u8], at: usize) -> Option<Value> {
    let mut i = at;
    let skip = |mut i: usize| {
        while event.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    i = skip(i);
    if event.get(i) != Some(&b':') {
        return None;
    }
    i = skip(i + 1);
    let value = &event[i..];
    if value.starts_with(b"null") {
        Some(Value::Null { end: i + 4 })
    } else if value.starts_with(b"{") {
        Some(Value::Object)
    } else {
        None
    }
}

/// The span to remove for the field `"usage":null` from `key` to `end`: with the comma
/// before it (and the white space between), or else the one after it.
fn null_field_span(event: &[u8], key: usize, end: usize) -> (usize, usize) {
    let before = event[..key]
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .filter(|&at| event[at] == b',');
    if let Some(comma) = before {
        return (comma, end);
    }
    let after = event[end..]
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map(|at| end + at)
        .filter(|&at| event[at] == b',');
    match after {
        Some(comma) => {
            // Up to the next field, so that `{"usage":null, "id"` becomes `{"id"`.
            let next = event[comma + 1..]
                .iter()
                .position(|b| !b.is_ascii_whitespace())
                .map_or(event.len(), |at| comma + 1 + at);
            (key, next)
        }
        None => (key, end),
    }
}

/// Does the event's chunk have `"choices":[]` (the usage chunk)?
fn has_empty_choices(event: &[u8]) -> bool {
    static FIND_CHOICES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\""));
    FIND_CHOICES.find_iter(event).any(|at| {
        let rest = &event[at + b"\"choices\"".len()..];
        let mut bytes = rest.iter().copied().filter(|b| !b.is_ascii_whitespace());
        bytes.next() == Some(b':') && bytes.next() == Some(b'[') && bytes.next() == Some(b']')
    })
}

pub(crate) mod estimate;

#[cfg(test)]
mod tests;
