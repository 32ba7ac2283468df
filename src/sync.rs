//! The pool's synchronisation primitives: std's atomics and tokio's `Notify`, or, under
//! `--cfg tkr_loom`, loom's atomics and a loom-instrumented stand-in for `Notify`, so that
//! the loom tests (`src/pool/loom_tests.rs`) explore the pool's own code, as tokio's
//! `loom` module and bytes' `loom.rs` do. A custom cfg rather than `loom`: tokio reads
//! `cfg(loom)` for its own tests.
//!
//! ```text
//! RUSTFLAGS="--cfg tkr_loom" cargo test --release --lib loom_
//! ```

#[cfg(not(tkr_loom))]
pub(crate) use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, fence,
};

#[cfg(tkr_loom)]
pub(crate) use loom::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, fence,
};

pub(crate) use std::sync::atomic::Ordering;

/// Orders a sequentially consistent read-modify-write before a later sequentially
/// consistent load of another atomic. Nothing is needed for that in Rust's model (all
/// `SeqCst` operations form one total order), so this is empty; but loom models `SeqCst`
/// accesses as `AcqRel` (a documented limitation, which would show a wake-up the real code
/// cannot lose), so under loom a `SeqCst` fence stands in for that order.
#[inline(always)]
pub(crate) fn seq_cst_order() {
    #[cfg(tkr_loom)]
    fence(Ordering::SeqCst);
}

#[cfg(not(tkr_loom))]
pub(crate) use tokio::sync::{Notify, futures::OwnedNotified};

#[cfg(tkr_loom)]
pub(crate) use notify_model::{Notify, OwnedNotified};

/// tokio's `Notify`, as far as the pool uses it, over loom's mutex: registrations in a
/// list, a permit for a `notify_one` that found nobody, and `notify_waiters` waking every
/// registration. Like tokio's, a registration notified but dropped before it was consumed
/// passes its notification on.
#[cfg(tkr_loom)]
mod notify_model {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use loom::sync::Mutex;

    #[derive(Debug, Default)]
    pub(crate) struct Notify {
        state: Mutex<State>,
    }

    #[derive(Debug, Default)]
    struct State {
        permit: bool,
        next_id: usize,
        /// Registered and not notified: id and waker.
        waiting: Vec<(usize, Option<Waker>)>,
        /// Notified, not yet consumed.
        notified: Vec<usize>,
    }

    impl Notify {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        pub(crate) fn notified_owned(self: Arc<Self>) -> OwnedNotified {
            OwnedNotified {
                notify: self,
                id: None,
                done: false,
            }
        }

        pub(crate) fn notify_one(&self) {
            let mut state = self.state.lock().unwrap();
            if state.waiting.is_empty() {
                state.permit = true;
            } else {
                let (id, waker) = state.waiting.remove(0);
                state.notified.push(id);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }

        pub(crate) fn notify_waiters(&self) {
            let mut state = self.state.lock().unwrap();
            for (id, waker) in std::mem::take(&mut state.waiting) {
                state.notified.push(id);
                if let Some(waker) = waker {
                    waker.wake();
                }
            }
        }
    }

    #[derive(Debug)]
    pub(crate) struct OwnedNotified {
        notify: Arc<Notify>,
        id: Option<usize>,
        done: bool,
    }

    impl OwnedNotified {
        /// Registers (or takes a stored permit), as tokio's `Notified::enable`.
        pub(crate) fn enable(self: Pin<&mut Self>) {
            let this = self.get_mut();
            if this.id.is_some() || this.done {
                return;
            }
            let mut state = this.notify.state.lock().unwrap();
            if std::mem::take(&mut state.permit) {
                this.done = true;
                return;
            }
            let id = state.next_id;
            state.next_id += 1;
            state.waiting.push((id, None));
            this.id = Some(id);
        }
    }

    impl Future for OwnedNotified {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.as_mut().enable();
            let this = self.get_mut();
            if this.done {
                return Poll::Ready(());
            }
            let id = this.id.expect("enabled above");
            let mut state = this.notify.state.lock().unwrap();
            if let Some(at) = state.notified.iter().position(|&n| n == id) {
                state.notified.remove(at);
                this.done = true;
                this.id = None;
                return Poll::Ready(());
            }
            if let Some(entry) = state.waiting.iter_mut().find(|(n, _)| *n == id) {
                entry.1 = Some(cx.waker().clone());
            }
            Poll::Pending
        }
    }

    impl Drop for OwnedNotified {
        fn drop(&mut self) {
            let Some(id) = self.id else { return };
            let notified = {
                let mut state = self.notify.state.lock().unwrap();
                state.waiting.retain(|(n, _)| *n != id);
                match state.notified.iter().position(|&n| n == id) {
                    Some(at) => {
                        state.notified.remove(at);
                        true
                    }
                    None => false,
                }
            };
            if notified {
                // Notified but never consumed: pass it on (tokio's `drop_notified`).
                self.notify.notify_one();
            }
        }
    }
}
