//! No key value in any log line or `Debug`/`Display` output of a run with successes,
//! cool-downs, a disabled key and errors.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use support::{Upstream, get, rotated, status, too_many};
use tower_key_rotation::{
    ApiKey, KeyPool, KeyRotationLayer, KeySet, Placement, Selection, retry::TriedKeys,
};

const KEYS: [&str; 3] = [
    "sk-SECRET-alpha-7f3a",
    "sk-SECRET-bravo-91c2",
    "sk-SECRET-charlie-0d44",
];

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn no_key_value_appears_in_logs_or_debug_output() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // Key 1 answers 429 once, key 3 is rejected, everything else succeeds.
    let upstream = Upstream::start(&KEYS, |key, n| async move {
        match (key, n) {
            (1, 1) => too_many(&[("retry-after", "30")]),
            (3, _) => status(StatusCode::UNAUTHORIZED),
            _ => status(StatusCode::OK),
        }
    })
    .await;
    let keys = KeySet::parse(&KEYS.join(", ")).unwrap();
    let pool = KeyPool::builder(keys.clone())
        .selection(Selection::RoundRobin)
        .max_in_flight_per_key(4)
        .build();
    let mut client = rotated(&pool);
    for _ in 0..6 {
        get(&mut client, &upstream.url("/")).await.unwrap();
    }
    // Key 1 cooling; key 3 refused but not disabled (nothing proves the key to blame).
    assert_eq!(upstream.keys_seen(), [1, 2, 3, 2, 3, 2]);
    // Proof that key 3 is to blame (another key served the same request): disabled.
    assert!(pool.try_reserve_where(|p| p == 3).unwrap().disable());

    let lease = pool.try_reserve().unwrap();
    let tried = TriedKeys::new();
    tried.insert(lease.position());
    let layer = KeyRotationLayer::new(pool.clone()).placement(Placement::header(
        http::HeaderName::from_static("x-api-key"),
    ));
    let mut request = http::Request::new(());
    request.headers_mut().insert(
        "authorization",
        keys.specs()[0].key().header_value("Bearer "),
    );
    let mut shown = vec![
        format!("{pool:?}"),
        format!("{keys:?}"),
        format!("{:?}", keys.specs()),
        format!("{}", keys.specs()[1].key()),
        format!("{:?}", ApiKey::new(KEYS[0]).unwrap()),
        format!("{layer:?}"),
        format!("{client:?}"),
        format!("{lease:?}"),
        format!("{tried:?}"),
        format!("{request:?}"),
        format!("{:?}", pool.snapshot()),
        format!("{:?}", KeySet::parse(&format!("{},{}", KEYS[0], KEYS[0]))),
    ];
    shown.extend(pool.snapshot().iter().map(ToString::to_string));
    drop(lease);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // The run did log what it should, by position.
    assert!(logs.contains("Using key 2/3"), "{logs}");
    assert!(
        logs.contains("key 1/3 rate limited; cooling down for 30"),
        "{logs}"
    );
    assert!(
        logs.contains("key 3/3 rejected by the provider; disabled"),
        "{logs}"
    );
    shown.push(logs);
    for text in &shown {
        for key in KEYS {
            assert!(!text.contains(key), "a key value leaked into: {text}");
        }
        assert!(!text.contains("SECRET"), "a key value leaked into: {text}");
    }
}
