//! The encodings of a key's rest and probe: each one atomic word, and the newtype that
//! owns what its values mean.

use crate::pool_time::PoolTime;
use crate::sync::{AtomicU8, AtomicU64, Ordering};

use super::LazyNow;

/// A key's rest, in one word: whether it rests, until when, or is disabled for good.
///
/// | word | meaning |
/// | --- | --- |
/// | `0` | not resting |
/// | `u64::MAX` | disabled (the provider rejected the key) |
/// | anything else | resting until then ([`PoolTime::as_nanos`]) |
///
/// A rest only ever extends (`fetch_max`), and disabled is above every rest, so no
/// extension can undo it. An expired rest is cleared back to `0` by whoever notices, so
/// that the common path, a key not resting, never reads the clock.
pub(super) struct Deadline(AtomicU64);

/// What a [`Deadline`] word says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RestWord {
    /// Not resting (or a rest that has not been cleared yet, if `Until` is in the past).
    Clear,
    /// Resting until this time.
    Until(PoolTime),
    /// Disabled for good.
    Disabled,
}

impl Deadline {
    const CLEAR: u64 = 0;
    const DISABLED: u64 = u64::MAX;
    /// The latest rest end a word can hold.
    pub(super) const LATEST: PoolTime = PoolTime::from_nanos(Self::DISABLED - 1);

    pub(super) fn new() -> Self {
        Self(AtomicU64::new(Self::CLEAR))
    }

    fn decode(word: u64) -> RestWord {
        match word {
            Self::CLEAR => RestWord::Clear,
            Self::DISABLED => RestWord::Disabled,
            until => RestWord::Until(PoolTime::from_nanos(until)),
        }
    }

    /// Not resting, and no expired rest left to clear: the common case, one load.
    #[inline]
    pub(super) fn is_clear(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::CLEAR
    }

    pub(super) fn read(&self) -> RestWord {
        Self::decode(self.0.load(Ordering::Acquire))
    }

    /// Disabled? Sequentially consistent: a waiter deciding that every key is disabled
    /// must see a disable that notified it.
    pub(super) fn is_disabled(&self) -> bool {
        self.0.load(Ordering::SeqCst) == Self::DISABLED
    }

    /// Resting (or disabled) at `now`? Clears an expired rest.
    #[inline]
    pub(super) fn is_resting(&self, now: &mut LazyNow<'_>) -> bool {
        let word = self.0.load(Ordering::Acquire);
        if word == Self::CLEAR {
            return false;
        }
        if word == Self::DISABLED || word > now.get().as_nanos() {
            return true;
        }
        // Resting => Probing (or Healthy). A concurrent extension makes this fail, which
        // is right.
        let _ = self
            .0
            .compare_exchange(word, Self::CLEAR, Ordering::AcqRel, Ordering::Relaxed);
        false
    }

    /// Rests until at least `until` (capped at [`Self::LATEST`]); returns what the word
    /// said before.
    pub(super) fn extend(&self, until: PoolTime) -> RestWord {
        let until = until.min(Self::LATEST).as_nanos();
        Self::decode(self.0.fetch_max(until, Ordering::AcqRel))
    }

    /// Disables for good; `true` if it was not disabled yet.
    pub(super) fn disable(&self) -> bool {
        self.0.swap(Self::DISABLED, Ordering::SeqCst) != Self::DISABLED
    }
}

/// The single probe a key owes after a rest: none, owed (the next taker is the probe), or
/// running (no other request may take the key until it answers).
pub(super) struct Probe(AtomicU8);

/// What taking a key means for its probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// No probe owed: an ordinary request.
    Ordinary,
    /// This taker won the probe.
    Probe,
    /// Another request's probe is running: the key takes nothing else.
    Running,
}

impl Probe {
    const NONE: u8 = 0;
    const OWED: u8 = 1;
    const RUNNING: u8 = 2;

    pub(super) fn new() -> Self {
        Self(AtomicU8::new(Self::NONE))
    }

    /// Owed or running: the key is coming back from a rest.
    #[inline]
    pub(super) fn is_pending(&self) -> bool {
        self.0.load(Ordering::Acquire) != Self::NONE
    }

    pub(super) fn is_running(&self) -> bool {
        self.0.load(Ordering::Acquire) == Self::RUNNING
    }

    /// A taker's claim: exactly one wins an owed probe (Owed => Running).
    #[inline]
    pub(super) fn claim(&self) -> Claim {
        match self.0.load(Ordering::Acquire) {
            Self::NONE => Claim::Ordinary,
            Self::OWED => match self.0.compare_exchange(
                Self::OWED,
                Self::RUNNING,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => Claim::Probe,
                Err(Self::NONE) => Claim::Ordinary,
                Err(_) => Claim::Running,
            },
            _ => Claim::Running,
        }
    }

    /// A rest started: the key comes back with one probe (None => Owed; a running probe
    /// settles by its own answer).
    pub(super) fn owe(&self) {
        let _ =
            self.0
                .compare_exchange(Self::NONE, Self::OWED, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// A probe given back unanswered (not sent, or dropped): the next taker probes.
    pub(super) fn give_back(&self) {
        self.0.store(Self::OWED, Ordering::Release);
    }

    /// Another replica's probe answered: this replica owes none (Owed => None; a probe
    /// running here settles by its own answer).
    pub(super) fn forgive(&self) {
        let _ =
            self.0
                .compare_exchange(Self::OWED, Self::NONE, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// The probe's answer: back (Running => None) or not (Running => Owed).
    pub(super) fn settle(&self, back: bool) {
        self.0.store(
            if back { Self::NONE } else { Self::OWED },
            Ordering::Release,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_word_says_clear_until_or_disabled() {
        let at = PoolTime::from_nanos;
        let deadline = Deadline::new();
        assert_eq!(deadline.read(), RestWord::Clear);
        assert_eq!(deadline.extend(at(500)), RestWord::Clear);
        assert_eq!(deadline.read(), RestWord::Until(at(500)));
        // Only extends.
        assert_eq!(deadline.extend(at(100)), RestWord::Until(at(500)));
        assert_eq!(deadline.read(), RestWord::Until(at(500)));
        // No rest reaches the disabled word, and disabling is for good.
        assert_eq!(deadline.extend(PoolTime::MAX), RestWord::Until(at(500)));
        assert_eq!(deadline.read(), RestWord::Until(Deadline::LATEST));
        assert!(deadline.disable());
        assert!(!deadline.disable());
        assert_eq!(deadline.extend(Deadline::LATEST), RestWord::Disabled);
        assert!(deadline.is_disabled());
    }

    #[test]
    fn exactly_one_taker_wins_an_owed_probe() {
        let probe = Probe::new();
        assert_eq!(probe.claim(), Claim::Ordinary);
        probe.owe();
        assert!(probe.is_pending());
        assert_eq!(probe.claim(), Claim::Probe);
        assert_eq!(probe.claim(), Claim::Running);
        // Refused again: owed once more; answered: clear.
        probe.settle(false);
        assert_eq!(probe.claim(), Claim::Probe);
        probe.settle(true);
        assert!(!probe.is_pending());
        // Owing while a probe runs changes nothing: the probe's answer decides.
        assert_eq!(probe.claim(), Claim::Ordinary);
        probe.owe();
        assert_eq!(probe.claim(), Claim::Probe);
        probe.owe();
        assert_eq!(probe.claim(), Claim::Running);
        probe.give_back();
        assert_eq!(probe.claim(), Claim::Probe);
    }
}
