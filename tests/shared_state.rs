//! Several pools (replicas) sharing their keys' state through a real `redis-server`
//! (`shared::redis`): rests, disables and in-flight caps seen by one replica hold in the
//! others; the store going away degrades, and its return resumes sharing.

mod redis_support;

use std::time::Duration;

use redis_support::RedisServer;
use tokio::time::{Instant, timeout};
use tower_key_rotation::shared::redis::{RedisBackend, RedisOptions};
use tower_key_rotation::{KeyPool, KeySet, KeyState, Outcome};

const KEYS: &str = "sk-one,sk-two,sk-three";
const SECRET: &[u8] = b"test deployment secret";

fn options(namespace: &str) -> RedisOptions {
    let mut options = RedisOptions::default();
    options.namespace = namespace.to_owned();
    options
}

/// A replica: a backend connected to `server`, and a pool over [`KEYS`] sharing through it.
async fn replica(
    server: &RedisServer,
    namespace: &str,
    cap: Option<u32>,
) -> (KeyPool, RedisBackend) {
    let backend = RedisBackend::new(&server.url(), SECRET, options(namespace)).unwrap();
    assert!(backend.connect().await, "the test server answers");
    let mut pool = KeyPool::builder(KeySet::parse(KEYS).unwrap()).state_backend(backend.clone());
    if let Some(cap) = cap {
        pool = pool.max_in_flight_per_key(cap);
    }
    let pool = pool.build();
    timeout(Duration::from_secs(5), backend.subscribed())
        .await
        .expect("subscribed within 5 s");
    (pool, backend)
}

#[tokio::test]
async fn a_429_seen_by_one_replica_rests_the_key_in_another_within_50_ms() {
    let server = RedisServer::start().await;
    let (a, _) = replica(&server, "rest", None).await;
    let (b, b_backend) = replica(&server, "rest", None).await;
    let mut applied = b_backend.applied();
    applied.borrow_and_update();

    let lease = a.try_reserve().unwrap();
    assert_eq!(lease.position(), 1);
    lease.mark_sent();
    let refused = Instant::now();
    lease.record(Outcome::RateLimited {
        retry_after: Some(Duration::from_secs(20)),
    });
    drop(lease);
    timeout(Duration::from_secs(2), applied.changed())
        .await
        .expect("replica B hears of the rest")
        .unwrap();
    let took = refused.elapsed();
    eprintln!("replica B rested key 1 {took:?} after replica A's 429");
    assert!(took < Duration::from_millis(50), "took {took:?}");

    // B rests key 1 from its own atomics: no round trip on its request path.
    let key = &b.snapshot()[0];
    assert_eq!(key.state, KeyState::Resting);
    let left = key.cooling_down_for.unwrap();
    assert!(
        left > Duration::from_secs(19) && left <= Duration::from_secs(20),
        "{left:?}"
    );
    for _ in 0..6 {
        let lease = b.try_reserve().unwrap();
        assert_ne!(lease.position(), 1);
    }
}

#[tokio::test]
async fn a_disable_reaches_every_replica_and_a_new_one_syncs_it() {
    let server = RedisServer::start().await;
    let (a, _) = replica(&server, "disable", None).await;
    let (b, b_backend) = replica(&server, "disable", None).await;
    let mut applied = b_backend.applied();
    applied.borrow_and_update();

    let lease = a.try_reserve().unwrap();
    lease.mark_sent();
    lease.record(Outcome::KeyRejected);
    drop(lease);
    timeout(Duration::from_secs(2), applied.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(b.snapshot()[0].disabled);

    // A replica started later reads it at its first sync.
    let (c, c_backend) = replica(&server, "disable", None).await;
    timeout(
        Duration::from_secs(5),
        c_backend.syncs().wait_for(|&syncs| syncs > 0),
    )
    .await
    .expect("synced within 5 s")
    .unwrap();
    assert!(c.snapshot()[0].disabled);
    // Another namespace shares nothing.
    let (other, _) = replica(&server, "elsewhere", None).await;
    assert!(!other.snapshot()[0].disabled);
}

#[test]
fn neither_the_url_nor_its_password_shows_in_errors_or_debug() {
    let error = RedisBackend::new("redis://:hunter2-pass@", SECRET, RedisOptions::default())
        .err()
        .map(|e| e.to_string());
    if let Some(error) = error {
        assert!(!error.contains("hunter2"), "{error}");
    }
    let error = RedisBackend::new(
        "http://user:hunter2-pass@host",
        SECRET,
        RedisOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(!error.contains("hunter2"), "{error}");
    let backend = RedisBackend::new(
        "redis://user:hunter2-pass@127.0.0.1:1/0",
        SECRET,
        RedisOptions::default(),
    )
    .unwrap();
    let debug = format!("{backend:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("127.0.0.1"),
        "{debug}"
    );
}
