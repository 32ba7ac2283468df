//! Prompt-cache affinity through the real proxy, default flags, in front of a provider
//! stand-in that keeps a prompt-prefix cache per key (as providers keep one per account)
//! and reports `usage.prompt_tokens_details.cached_tokens`.
//!
//! The workload: 500 conversations of 5 turns, turns of a conversation in order, 100
//! conversations at a time, each naming its session in `prompt_cache_key` and `user`.
//! Each turn sends the whole conversation so far, as chat clients do; the stand-in counts
//! as cached the longest prefix of whole messages it has served on that key within the
//! cache lifetime (5 minutes). The run takes a few seconds of real time, well inside that
//! lifetime: what decides a hit is the key a turn lands on, which is what is tested.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{MockUpstream, ProxyConfig, Seen, client, keys, reply, within};
use tokio::sync::Semaphore;
use tokio::time::Instant;

const KEYS: [&str; 3] = ["ck-one", "ck-two", "ck-three"];
const CONVERSATIONS: usize = 500;
const TURNS: usize = 5;
const AT_ONCE: usize = 100;
/// The providers' cache lifetime after a prefix's last use.
const CACHE_TTL: Duration = Duration::from_secs(300);
/// How long the stand-in works on a request.
const WORK: Duration = Duration::from_millis(10);

/// A prompt's "tokens": what the stand-in counts, 4 bytes a token plus 4 per message.
fn tokens(message: &Value) -> u64 {
    message["content"].as_str().map_or(0, |c| c.len() as u64) / 4 + 4
}

/// One answered turn, as the stand-in saw it.
#[derive(Debug, Clone)]
struct Served {
    session: String,
    turn: usize,
    key: usize,
    cached: u64,
}

/// The stand-in's state: per key, when each prefix (hashed) was last used; what it served;
/// and a rest to impose on one key.
#[derive(Default)]
struct Provider {
    caches: HashMap<String, HashMap<u64, Instant>>,
    served: Vec<Served>,
    /// Key (1-based) to refuse with 429 once `rest_after` turns were served, for `rest_for`.
    rest: Option<(usize, usize, Duration)>,
    resting_until: Option<(usize, Instant)>,
    refused: usize,
}

fn prefix_hashes(messages: &[Value]) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    messages
        .iter()
        .map(|m| {
            m.to_string().hash(&mut hasher);
            hasher.finish()
        })
        .collect()
}

async fn cache_provider(
    rest: Option<(usize, usize, Duration)>,
) -> (MockUpstream, Arc<Mutex<Provider>>) {
    let provider = Arc::new(Mutex::new(Provider {
        rest,
        ..Provider::default()
    }));
    let state = provider.clone();
    let upstream = MockUpstream::start(move |seen: Seen| {
        let state = state.clone();
        async move {
            let key_value = seen.bearer().unwrap_or_default();
            let key = KEYS.iter().position(|k| *k == key_value).map_or(0, |i| i + 1);
            let body: Value = serde_json::from_slice(&seen.body).unwrap_or_default();
            let messages = body["messages"].as_array().cloned().unwrap_or_default();
            // A conversation naming no session is told by its system prompt.
            let session = match body["prompt_cache_key"].as_str() {
                Some(session) => session.to_owned(),
                None => messages.first().map(|m| m["content"].to_string()).unwrap_or_default(),
            };
            {
                let mut provider = state.lock().unwrap();
                let now = Instant::now();
                if let Some((resting, until)) = provider.resting_until {
                    if resting == key && now < until {
                        provider.refused += 1;
                        let mut response = reply(
                            429,
                            "{\"error\":{\"message\":\"rate limited\",\"type\":\"rate_limit_error\"}}",
                        );
                        // OpenAI's request window used up, as its rate-limit headers say
                        // (https://platform.openai.com/docs/guides/rate-limits): a rate
                        // refusal, not a concurrency one, so no limit is learned from it.
                        let headers = response.headers_mut();
                        headers.insert("retry-after", "1".parse().unwrap());
                        headers.insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
                        headers.insert("x-ratelimit-reset-requests", "1s".parse().unwrap());
                        return response;
                    }
                }
            }
            tokio::time::sleep(WORK).await;
            let mut provider = state.lock().unwrap();
            let now = Instant::now();
            let hashes = prefix_hashes(&messages);
            let cache = provider.caches.entry(key_value).or_default();
            // The longest prefix of whole messages served on this key within the lifetime;
            // the last message (the new turn) is never cached.
            let hit = hashes[..hashes.len().saturating_sub(1)]
                .iter()
                .rposition(|h| cache.get(h).is_some_and(|&at| now.duration_since(at) < CACHE_TTL));
            let cached: u64 = hit.map_or(0, |k| messages[..=k].iter().map(tokens).sum());
            for hash in hashes {
                cache.insert(hash, now);
            }
            let prompt: u64 = messages.iter().map(tokens).sum();
            let turn = messages.iter().filter(|m| m["role"] == "user").count();
            provider.served.push(Served {
                session,
                turn,
                key,
                cached,
            });
            if let Some((resting, after, rest_for)) = provider.rest {
                if provider.served.len() == after {
                    provider.resting_until = Some((resting, now + rest_for));
                }
            }
            let answer = json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("Answer to turn {turn}: noted.")}, "finish_reason": "stop"}],
                "usage": {
                    "prompt_tokens": prompt,
                    "completion_tokens": 8,
                    "total_tokens": prompt + 8,
                    "prompt_tokens_details": {"cached_tokens": cached},
                },
            });
            reply(200, &answer.to_string())
        }
    })
    .await;
    (upstream, provider)
}

/// What the clients saw: statuses, and `usage` totals.
#[derive(Debug, Default)]
struct Run {
    statuses: BTreeMap<u16, usize>,
    prompt: u64,
    cached: u64,
}

impl Run {
    fn cached_share(&self) -> f64 {
        self.cached as f64 / self.prompt as f64
    }
}

/// Runs the conversations through the proxy at `url`.
async fn conversations(url: &str, name_sessions: bool) -> Run {
    let run = Arc::new(Mutex::new(Run::default()));
    let at_once = Arc::new(Semaphore::new(AT_ONCE));
    let client = client();
    let tasks: Vec<_> = (0..CONVERSATIONS)
        .map(|c| {
            let (run, at_once, client, url) =
                (run.clone(), at_once.clone(), client.clone(), url.to_owned());
            tokio::spawn(async move {
                let _turn = at_once.acquire().await.unwrap();
                let session = format!("conversation-{c}");
                let mut messages = vec![json!({
                    "role": "system",
                    "content": format!("You are assistant {c}. {}", "Follow the house rules. ".repeat(40)),
                })];
                for turn in 1..=TURNS {
                    messages.push(json!({
                        "role": "user",
                        "content": format!("Turn {turn} of conversation {c}: {}", "some context ".repeat(20)),
                    }));
                    let mut body = json!({"model": "gpt-4o-mini", "messages": messages});
                    if name_sessions {
                        body["prompt_cache_key"] = json!(session);
                        body["user"] = json!(session);
                    }
                    let request = Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.to_string())))
                        .unwrap();
                    let response = within("an answer", client.request(request)).await.unwrap();
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    let answer: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let mut run = run.lock().unwrap();
                    *run.statuses.entry(status).or_default() += 1;
                    if status != 200 {
                        return;
                    }
                    run.prompt += answer["usage"]["prompt_tokens"].as_u64().unwrap();
                    run.cached += answer["usage"]["prompt_tokens_details"]["cached_tokens"]
                        .as_u64()
                        .unwrap();
                    messages.push(answer["choices"][0]["message"].clone());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(run).unwrap().into_inner().unwrap()
}

/// A session's turns in order: (turn, key, cached tokens).
type Turns = Vec<(usize, usize, u64)>;

/// Requests served per key (1-based), and which keys each session used, in order.
fn placement(served: &[Served]) -> (BTreeMap<usize, usize>, HashMap<String, Turns>) {
    let mut per_key = BTreeMap::new();
    let mut sessions: HashMap<String, Turns> = HashMap::new();
    for s in served {
        *per_key.entry(s.key).or_default() += 1;
        sessions
            .entry(s.session.clone())
            .or_default()
            .push((s.turn, s.key, s.cached));
    }
    (per_key, sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_keep_their_cache_warm_over_three_keys_with_default_flags() {
    // A single key: every turn after the first finds its prefix cached. The measure.
    let (upstream, _) = cache_provider(None).await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS[0]).start().await;
    let single = conversations(&proxy.url("/chat/completions"), true).await;
    drop(proxy);

    // Three keys, default flags: affinity on for requests naming a session.
    let (upstream, provider) = cache_provider(None).await;
    let proxy = ProxyConfig::new(&upstream.url(""), &KEYS.join(","))
        .start()
        .await;
    let three = conversations(&proxy.url("/chat/completions"), true).await;
    let served = provider.lock().unwrap().served.clone();
    let (per_key, sessions) = placement(&served);

    // The same three keys without affinity (round-robin): what affinity is worth.
    let (upstream, _) = cache_provider(None).await;
    let off = ProxyConfig::new(&upstream.url(""), &KEYS.join(","))
        .arg("--affinity", "off")
        .start()
        .await;
    let rotated = conversations(&off.url("/chat/completions"), true).await;

    println!(
        "cached share of input: 1 key {:.1} %, 3 keys with affinity {:.1} %, 3 keys round-robin {:.1} %; requests per key {per_key:?}",
        100.0 * single.cached_share(),
        100.0 * three.cached_share(),
        100.0 * rotated.cached_share(),
    );
    for run in [&single, &three, &rotated] {
        assert_eq!(run.statuses, BTreeMap::from([(200, CONVERSATIONS * TURNS)]));
    }
    assert!(
        three.cached_share() >= 0.95 * single.cached_share(),
        "{:.3} against {:.3} with one key",
        three.cached_share(),
        single.cached_share()
    );
    assert!(rotated.cached_share() < 0.8 * single.cached_share());
    // Each key's share of requests within 20 % of its weight's (a third).
    let third = (CONVERSATIONS * TURNS) as f64 / 3.0;
    for key in 1..=3 {
        let count = per_key.get(&key).copied().unwrap_or(0) as f64;
        assert!(
            (count - third).abs() <= 0.2 * third,
            "key {key}: {count} of {} requests",
            CONVERSATIONS * TURNS
        );
    }
    // Every conversation stayed on one key.
    assert!(
        sessions
            .values()
            .all(|turns| turns.iter().all(|t| t.1 == turns[0].1))
    );
    // The proxy counted them as affinity hits, and no spill.
    let stats = keys(&proxy).await;
    let hits: u64 = stats
        .iter()
        .map(|k| k["affinity_hits"].as_u64().unwrap())
        .sum();
    let spills: u64 = stats
        .iter()
        .map(|k| k["affinity_spills"].as_u64().unwrap())
        .sum();
    assert_eq!((hits, spills), ((CONVERSATIONS * TURNS) as u64, 0));
}

/// Conversations naming no session, with `--affinity prefix`: the turns of each share
/// their prompt's prefix (model, system prompt, first user message), whose hash is their
/// affinity id, so each conversation stays on one key and keeps its cache warm there. With
/// default flags they name no session and go round-robin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_mode_keeps_conversations_naming_no_session_on_one_key() {
    let (upstream, _) = cache_provider(None).await;
    let proxy = ProxyConfig::new(&upstream.url(""), KEYS[0]).start().await;
    let single = conversations(&proxy.url("/chat/completions"), false).await;
    drop(proxy);

    let (upstream, provider) = cache_provider(None).await;
    let proxy = ProxyConfig::new(&upstream.url(""), &KEYS.join(","))
        .arg("--affinity", "prefix")
        .start()
        .await;
    let prefixed = conversations(&proxy.url("/chat/completions"), false).await;
    let served = provider.lock().unwrap().served.clone();
    let (per_key, sessions) = placement(&served);

    let (upstream, _) = cache_provider(None).await;
    let default = ProxyConfig::new(&upstream.url(""), &KEYS.join(","))
        .start()
        .await;
    let rotated = conversations(&default.url("/chat/completions"), false).await;

    println!(
        "no session named: cached share of input: 1 key {:.1} %, 3 keys by prefix {:.1} %, 3 keys default flags {:.1} %; requests per key {per_key:?}",
        100.0 * single.cached_share(),
        100.0 * prefixed.cached_share(),
        100.0 * rotated.cached_share(),
    );
    for run in [&single, &prefixed, &rotated] {
        assert_eq!(run.statuses, BTreeMap::from([(200, CONVERSATIONS * TURNS)]));
    }
    assert_eq!(sessions.len(), CONVERSATIONS);
    assert!(
        sessions
            .values()
            .all(|turns| turns.iter().all(|t| t.1 == turns[0].1)),
        "every conversation on one key"
    );
    assert!(prefixed.cached_share() >= 0.95 * single.cached_share());
    assert!(rotated.cached_share() < 0.8 * single.cached_share());
    let third = (CONVERSATIONS * TURNS) as f64 / 3.0;
    for key in 1..=3 {
        let count = per_key.get(&key).copied().unwrap_or(0) as f64;
        assert!(
            (count - third).abs() <= 0.2 * third,
            "key {key}: {count} of {} requests",
            CONVERSATIONS * TURNS
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_resting_mid_run_moves_each_of_its_sessions_to_one_other_key() {
    // Key 2 refuses every request for 1.5 s once 1,000 turns were served.
    let (upstream, provider) = cache_provider(Some((2, 1000, Duration::from_millis(1500)))).await;
    let proxy = ProxyConfig::new(&upstream.url(""), &KEYS.join(","))
        .start()
        .await;
    let run = conversations(&proxy.url("/chat/completions"), true).await;
    let (served, refused) = {
        let provider = provider.lock().unwrap();
        (provider.served.clone(), provider.refused)
    };
    let (_, sessions) = placement(&served);

    // No client saw an error.
    assert_eq!(run.statuses, BTreeMap::from([(200, CONVERSATIONS * TURNS)]));
    assert!(refused > 0, "the rest never met a request");
    // The sessions that left key 2: each went to one other key, and stayed there (after
    // key 2 came back too), hitting its cache from its second turn there on.
    let mut moved = 0;
    let mut misses_after_move = 0;
    for (session, turns) in &sessions {
        let Some(left) = turns.windows(2).position(|w| w[0].1 == 2 && w[1].1 != 2) else {
            continue;
        };
        moved += 1;
        let after = &turns[left + 1..];
        let keys: BTreeSet<usize> = after.iter().map(|t| t.1).collect();
        assert_eq!(keys.len(), 1, "{session} spread over {keys:?}: {turns:?}");
        misses_after_move += after[1..].iter().filter(|t| t.2 == 0).count();
    }
    println!(
        "{moved} sessions moved off the resting key; {refused} refusals; cached share {:.1} %",
        100.0 * run.cached_share()
    );
    assert!(moved > 0, "no session was moved: {sessions:?}");
    assert_eq!(
        misses_after_move, 0,
        "moved sessions missed their new key's cache"
    );
    let stats = keys(&proxy).await;
    let spills: u64 = stats
        .iter()
        .map(|k| k["affinity_spills"].as_u64().unwrap())
        .sum();
    assert!(spills >= moved as u64);
}
