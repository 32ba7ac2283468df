//! Loom models of the pool's concurrency protocols, run on the pool's own code: the
//! atomics and `Notify` come from `crate::sync`, which hands out loom's under
//! `--cfg tkr_loom`. Loom explores every interleaving (and the weak-memory outcomes it
//! models) of 2-3 threads; a lost wake-up shows as a deadlock.
//!
//! ```text
//! RUSTFLAGS="--cfg tkr_loom" cargo test --release --lib loom_
//! ```

use std::future::poll_fn;
use std::task::Poll;

use loom::thread;

use super::rest::{Claim, Deadline, Probe, RestWord};
use super::wait::{Reserve, Waiter};
use super::{KeyPool, LazyNow};
use crate::key::KeySet;
use crate::pool_time::PoolTime;
use crate::sync::Ordering;

/// Loom's default preemption bound keeps these models to seconds.
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(3);
    }
    builder.check(f);
}

fn pool(keys: &str, cap: u32) -> KeyPool {
    KeyPool::builder(KeySet::parse(keys).unwrap())
        .max_in_flight_per_key(cap)
        .learn_concurrency(false)
        .build()
}

/// Waits for a key the way `KeyRotation::poll_ready` does (no deadline).
fn wait_for_key(pool: &KeyPool) -> super::Lease {
    let mut waiter = Waiter::new();
    loom::future::block_on(poll_fn(|cx| {
        match pool.poll_reserve(&mut waiter, None, cx) {
            Poll::Ready(Reserve::Lease(lease)) => Poll::Ready(lease),
            Poll::Ready(_) => panic!("no key, with every key usable"),
            Poll::Pending => Poll::Pending,
        }
    }))
}

fn in_flight(pool: &KeyPool) -> u32 {
    pool.inner.table.load().slots[0]
        .in_flight
        .load(Ordering::SeqCst)
}

#[test]
fn loom_a_released_slot_always_wakes_a_waiter_and_the_cap_holds() {
    model(|| {
        let pool = pool("k1", 1);
        let held = pool.try_reserve().expect("a free slot");
        let releaser = thread::spawn(move || drop(held));
        // Either the release came first (the waiter's look sees the slot) or the waiter
        // registered first (the release notifies it): never a sleep with a free slot.
        let lease = wait_for_key(&pool);
        assert_eq!(in_flight(&pool), 1, "the cap holds");
        releaser.join().unwrap();
        drop(lease);
        assert_eq!(in_flight(&pool), 0);
    });
}

#[test]
fn loom_concurrent_releases_never_lose_the_waiter() {
    model(|| {
        let pool = pool("k1", 2);
        let (a, b) = (pool.try_reserve().unwrap(), pool.try_reserve().unwrap());
        let first = thread::spawn(move || drop(a));
        let second = thread::spawn(move || drop(b));
        let lease = wait_for_key(&pool);
        first.join().unwrap();
        second.join().unwrap();
        drop(lease);
        assert_eq!(in_flight(&pool), 0);
    });
}

#[test]
fn loom_an_owed_probe_goes_to_exactly_one_taker() {
    model(|| {
        let probe = std::sync::Arc::new(Probe::new());
        probe.owe();
        let other = {
            let probe = probe.clone();
            thread::spawn(move || probe.claim())
        };
        let mine = probe.claim();
        let theirs = other.join().unwrap();
        let won = [mine, theirs]
            .iter()
            .filter(|claim| **claim == Claim::Probe)
            .count();
        assert_eq!(won, 1, "{mine:?} {theirs:?}");
        // The loser saw it running: it takes nothing until the probe answers.
        assert!(mine == Claim::Running || theirs == Claim::Running);
    });
}

#[test]
fn loom_a_rest_is_never_lost_to_a_concurrent_clear() {
    model(|| {
        let pool = pool("k1", 1);
        let deadline = std::sync::Arc::new(Deadline::new());
        // An expired rest (until 10), seen by a reader at time 20 ...
        deadline.extend(PoolTime::from_nanos(10));
        let extender = {
            let deadline = deadline.clone();
            // ... while another thread rests the key until 50.
            thread::spawn(move || deadline.extend(PoolTime::from_nanos(50)))
        };
        let mut now = LazyNow::new(&pool.inner.signals);
        now.now = Some(PoolTime::from_nanos(20));
        let _ = deadline.is_resting(&mut now);
        extender.join().unwrap();
        // Clearing the expired rest never wipes the new one.
        assert_eq!(deadline.read(), RestWord::Until(PoolTime::from_nanos(50)));
    });
}

#[test]
fn loom_a_lease_taken_before_a_cool_down_starts_can_never_escalate_it() {
    model(|| {
        let pool = pool("k1", 8);
        let slot = pool.inner.table.load().slots[0].clone();
        let taker = {
            let pool = pool.clone();
            thread::spawn(move || pool.try_reserve().map(|lease| lease.generation))
        };
        // A 429 on a lease of generation 0 starts a cool-down (raises the generation),
        // noting first whether the other take was already visible.
        let took_before = slot.in_flight.load(Ordering::SeqCst) == 1;
        let (_, level, _) = slot.rate_limited(0, Some(std::time::Duration::ZERO));
        assert_eq!(level, 1);
        let taken = taker.join().unwrap();
        if took_before {
            // A straggler: its own 429 must not count as fresh.
            assert_eq!(
                taken,
                Some(0),
                "a lease taken before the cool-down counts as fresh"
            );
        }
    });
}
