//! A loom model of the key pool's concurrency protocols.
//!
//! This **models** `src/pool.rs`; it does not run it. The pool uses std atomics and tokio's
//! `Notify`, which loom cannot instrument without swapping them under `cfg(loom)` in the
//! pool itself. So each protocol is restated here, line for line, over loom's atomics, and
//! loom explores every interleaving (and every weak-memory outcome it models) of 2-3
//! threads. Mirrored code, as of the commit that added this file:
//!
//! - `Slot::try_take` (capped branch): `in_flight.fetch_update(AcqRel, Relaxed, n < cap)`;
//!   the probe claim `probe.compare_exchange(PROBE_OWED, PROBE_IN_FLIGHT, AcqRel, Relaxed)`.
//! - `Slot::release` + `Signals::wake_one`: `in_flight.fetch_sub(1, SeqCst)`, then
//!   `if waiters.load(SeqCst) != 0 { notify.notify_one() }`.
//! - `Waiter::arm`: `notified.enable()`, `waiters.fetch_add(1, SeqCst)`, `fence(SeqCst)`;
//!   `Armed::drop`: `waiters.fetch_sub(1, SeqCst)`, then the `OwnedNotified` is dropped.
//! - `KeyPool::poll_reserve`: try; if nothing, arm and try again; if still nothing, wait
//!   for the notification (loom blocks the thread where the pool returns `Pending`);
//!   when notified, disarm and start over.
//! - `Slot::extend` / `Slot::is_resting`: `deadline.fetch_max(until)` against the
//!   clearing `compare_exchange(expired, 0)`.
//! - `Lease::drop` of an unanswered probe: `probe.store(PROBE_OWED, Release)`.
//! - `Slot::try_take` reads `generation.load(Acquire)` before its `AcqRel` take;
//!   `Slot::rate_limited` raises it with `compare_exchange(g, g + 1, AcqRel, Acquire)`.
//!
//! tokio's `Notify` is modelled by [`NotifyModel`] (its list and permit under one mutex,
//! as tokio keeps them under its own lock): `enable` registers or takes a stored permit;
//! `notify_one` wakes one registered waiter or stores a permit; dropping a registration
//! that was notified but not yet consumed passes the notification on (tokio's
//! `drop_notified`).
//!
//! One deliberate difference: loom treats `SeqCst` loads, stores and read-modify-writes as
//! `AcqRel` (a documented limitation that yields false alarms for store-buffering patterns;
//! `fence(SeqCst)` is modelled exactly). The releaser's `SeqCst` `fetch_sub` followed by a
//! `SeqCst` load is therefore written as those operations with a `fence(SeqCst)` between
//! them, which is what the two `SeqCst` operations guarantee for this pattern. Without
//! that fence loom reports the store-buffering outcome the real code rules out (see
//! `TESTING.md`).
//!
//! Run: `cargo test --manifest-path loom/Cargo.toml --release`.

use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering, fence};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;

/// tokio's `Notify`, as far as the pool uses it for slot releases.
#[derive(Default)]
struct NotifyModel {
    state: Mutex<NotifyState>,
    changed: Condvar,
}

#[derive(Default)]
struct NotifyState {
    /// A `notify_one` that found nobody registered.
    permit: bool,
    /// Registered (`enable`d) and not yet notified.
    waiting: Vec<usize>,
    /// Notified by `notify_one`, not yet consumed.
    notified: Vec<usize>,
}

impl NotifyState {
    fn notify_one(&mut self) -> bool {
        if self.waiting.is_empty() {
            self.permit = true;
            false
        } else {
            let id = self.waiting.remove(0);
            self.notified.push(id);
            true
        }
    }
}

impl NotifyModel {
    /// `OwnedNotified::enable`.
    fn enable(&self, id: usize) {
        let mut state = self.state.lock().unwrap();
        if state.permit {
            state.permit = false;
            state.notified.push(id);
        } else {
            state.waiting.push(id);
        }
    }

    /// `Notify::notify_one`.
    fn notify_one(&self) {
        if self.state.lock().unwrap().notify_one() {
            self.changed.notify_all();
        }
    }

    /// Polling the `OwnedNotified` until it is ready (the pool's `Pending`, then its
    /// wake-up): consumes the notification.
    fn wait(&self, id: usize) {
        let mut state = self.state.lock().unwrap();
        while !state.notified.contains(&id) {
            state = self.changed.wait(state).unwrap();
        }
        state.notified.retain(|&n| n != id);
    }

    /// Dropping the `OwnedNotified`: an unconsumed notification goes to the next waiter.
    fn drop_registration(&self, id: usize) {
        let mut state = self.state.lock().unwrap();
        state.waiting.retain(|&n| n != id);
        if state.notified.contains(&id) {
            state.notified.retain(|&n| n != id);
            if state.notify_one() {
                drop(state);
                self.changed.notify_all();
            }
        }
    }
}

/// One key with a cap, its waiters, and the pool's `Notify`.
struct SlotModel {
    in_flight: AtomicU32,
    cap: u32,
    waiters: AtomicUsize,
    notify: NotifyModel,
    /// Not in the pool: the most requests ever seen in flight at once.
    peak: AtomicU32,
}

impl SlotModel {
    fn new(cap: u32, in_flight: u32) -> Self {
        Self {
            in_flight: AtomicU32::new(in_flight),
            cap,
            waiters: AtomicUsize::new(0),
            notify: NotifyModel::default(),
            peak: AtomicU32::new(in_flight),
        }
    }

    /// `Slot::try_take`, capped branch.
    fn try_take(&self) -> bool {
        let took = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.cap).then_some(n + 1)
            });
        if let Ok(before) = took {
            self.peak.fetch_max(before + 1, Ordering::Relaxed);
        }
        took.is_ok()
    }

    /// `Slot::release` and `Signals::wake_one`.
    fn release(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Stands for the SeqCst ordering of the two operations, which loom models as AcqRel.
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) != 0 {
            self.notify.notify_one();
        }
    }

    /// `KeyPool::poll_reserve`, with `Pending` + wake-up as a blocking wait.
    fn reserve(&self, id: usize) {
        let mut armed = false;
        loop {
            if self.try_take() {
                if armed {
                    self.disarm(id);
                }
                return;
            }
            if !armed {
                // Waiter::arm: register interest, then look again before sleeping.
                self.notify.enable(id);
                self.waiters.fetch_add(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                armed = true;
                continue;
            }
            self.notify.wait(id);
            self.disarm(id);
            armed = false;
        }
    }

    /// `Waiter::disarm`: `Armed::drop`, then the `OwnedNotified` drops.
    fn disarm(&self, id: usize) {
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        self.notify.drop_registration(id);
    }
}

/// Three threads with a mutex-based `Notify` have too many interleavings to explore in
/// full within CI's budget (unbounded ran for over 9 minutes): bound the preemptions per
/// execution, loom's recommended knob. 4 takes about 5 s; `LOOM_MAX_PREEMPTIONS` overrides.
fn bounded() -> loom::model::Builder {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(4);
    }
    builder
}

/// A key at its cap of 1, held by the main thread; two callers wait for it. Every caller
/// must get the key (a lost wake-up leaves one blocked forever, which loom reports as a
/// deadlock), the cap must hold, and the counts must end at zero.
#[test]
fn a_released_slot_always_wakes_a_waiter_and_the_cap_holds() {
    bounded().check(|| {
        let slot = Arc::new(SlotModel::new(1, 1));
        let callers: Vec<_> = (0..2)
            .map(|id| {
                let slot = slot.clone();
                thread::spawn(move || {
                    slot.reserve(id);
                    slot.release();
                })
            })
            .collect();
        slot.release(); // the lease held since the start
        for caller in callers {
            caller.join().unwrap();
        }
        assert_eq!(slot.in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(slot.waiters.load(Ordering::SeqCst), 0);
        assert!(slot.peak.load(Ordering::SeqCst) <= 1, "cap exceeded");
    });
}

/// Cap 2, two leases held by two threads that release concurrently while a caller waits:
/// no lost wake-up when both releases race the caller's registration.
#[test]
fn concurrent_releases_never_lose_the_waiter() {
    bounded().check(|| {
        let slot = Arc::new(SlotModel::new(2, 2));
        let releasers: Vec<_> = (0..2)
            .map(|_| {
                let slot = slot.clone();
                thread::spawn(move || slot.release())
            })
            .collect();
        slot.reserve(0);
        slot.release();
        for releaser in releasers {
            releaser.join().unwrap();
        }
        assert_eq!(slot.in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(slot.waiters.load(Ordering::SeqCst), 0);
        assert!(slot.peak.load(Ordering::SeqCst) <= 2, "cap exceeded");
    });
}

const DISABLED: u64 = u64::MAX;

/// `Slot::is_resting`: clears an expired deadline, unless it changed meanwhile.
fn is_resting(deadline: &AtomicU64, now: u64) -> bool {
    let seen = deadline.load(Ordering::Acquire);
    if seen == 0 {
        return false;
    }
    if seen == DISABLED || seen > now {
        return true;
    }
    let _ = deadline.compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Relaxed);
    false
}

/// A 429 extends an expired cool-down while another caller clears it: the extension is
/// never lost, and a disabled key stays disabled.
#[test]
fn a_cool_down_is_never_lost_to_a_concurrent_clear() {
    loom::model(|| {
        let now = 10;
        let deadline = Arc::new(AtomicU64::new(5)); // expired
        let extender = {
            let deadline = deadline.clone();
            thread::spawn(move || {
                deadline.fetch_max(now + 20, Ordering::AcqRel);
            })
        };
        let clearer = {
            let deadline = deadline.clone();
            thread::spawn(move || is_resting(&deadline, now))
        };
        extender.join().unwrap();
        let _ = clearer.join().unwrap();
        assert_eq!(deadline.load(Ordering::SeqCst), now + 20);
        assert!(is_resting(&deadline, now));

        let disabled = Arc::new(AtomicU64::new(5));
        let disabler = {
            let disabled = disabled.clone();
            thread::spawn(move || disabled.swap(DISABLED, Ordering::SeqCst))
        };
        disabled.fetch_max(now + 20, Ordering::AcqRel);
        let _ = is_resting(&disabled, now);
        disabler.join().unwrap();
        assert_eq!(disabled.load(Ordering::SeqCst), DISABLED);
    });
}

const PROBE_NONE: u8 = 0;
const PROBE_OWED: u8 = 1;
const PROBE_IN_FLIGHT: u8 = 2;

/// Two callers race for a suspended key's probe; the winner's request goes unanswered
/// (its lease is dropped). At most one probe is ever out, and afterwards one is owed again.
#[test]
fn a_suspended_key_lets_out_one_probe_at_a_time() {
    loom::model(|| {
        let probe = Arc::new(AtomicU8::new(PROBE_OWED));
        let out = Arc::new(AtomicUsize::new(0));
        let callers: Vec<_> = (0..2)
            .map(|_| {
                let probe = probe.clone();
                let out = out.clone();
                thread::spawn(move || {
                    let won = probe.load(Ordering::Acquire) == PROBE_OWED
                        && probe
                            .compare_exchange(
                                PROBE_OWED,
                                PROBE_IN_FLIGHT,
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            )
                            .is_ok();
                    if won {
                        assert_eq!(out.fetch_add(1, Ordering::SeqCst), 0, "two probes out");
                        out.fetch_sub(1, Ordering::SeqCst);
                        // Lease::drop of an unanswered probe.
                        probe.store(PROBE_OWED, Ordering::Release);
                    }
                    won
                })
            })
            .collect();
        let winners = callers
            .into_iter()
            .map(|c| c.join().unwrap())
            .filter(|&won| won)
            .count();
        assert!(winners >= 1);
        assert_eq!(probe.load(Ordering::SeqCst), PROBE_OWED);
        assert_ne!(probe.load(Ordering::SeqCst), PROBE_NONE);
    });
}

/// `Slot::try_take` reads the key's cool-down generation, then takes the slot; the first
/// fresh 429 (`Slot::rate_limited`) raises the generation. Run as the lease being taken
/// (thread A) against a 429 being recorded (thread B), which notes whether A's take was
/// already visible when it raised the generation. A lease whose take came before the
/// raise is a straggler and must carry the old generation, or its own 429 would count as
/// fresh and raise the backoff level a second time.
fn straggler_model(read_generation_first: bool) {
    loom::model(move || {
        let generation = Arc::new(AtomicU32::new(0));
        let in_flight = Arc::new(AtomicU32::new(0));

        let taker = {
            let (generation, in_flight) = (generation.clone(), in_flight.clone());
            thread::spawn(move || {
                if read_generation_first {
                    // Today's `try_take`: the generation, then the take.
                    let seen = generation.load(Ordering::Acquire);
                    in_flight.fetch_add(1, Ordering::AcqRel);
                    seen
                } else {
                    // Before issue 10: `Lease::new` read it after the take.
                    in_flight.fetch_add(1, Ordering::AcqRel);
                    generation.load(Ordering::Acquire)
                }
            })
        };
        let took_before_raise = in_flight.load(Ordering::Acquire) == 1;
        let raised = generation
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        let lease_generation = taker.join().unwrap();
        if raised && took_before_raise {
            assert_eq!(lease_generation, 0, "a straggler counts as fresh");
        }
    });
}

#[test]
fn a_lease_taken_before_a_cool_down_starts_can_never_escalate_it() {
    straggler_model(true);
}

/// The order `Lease::new` used before: loom finds the interleaving where a straggler reads
/// the raised generation (the regression this model guards against).
#[test]
#[should_panic(expected = "a straggler counts as fresh")]
fn reading_the_generation_after_the_take_lets_a_straggler_escalate() {
    straggler_model(false);
}
