//! Crash-loop protection, a property of the pool rather than of one
//! child: children that fail to start, or too many that die young, hold
//! spawning back for a growing delay, one probe at a time, until one
//! proves healthy. Pure, so it is unit-tested; the master feeds it the
//! deaths it reaps and asks it when the next child may start.

use std::time::{Duration, Instant};

use crate::children::{Exit, QUICK_DEATH};

const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(30);
/// While nothing serves, a new try never waits longer than this.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// Young deaths of ready workers tolerated within [`QUICK_DEATH`] before
/// spawning is held back: in a busy pool a random kill often hits a
/// worker that was just started, and the pool must refill at once.
const TOLERATED: u32 = 4;

/// Crash-loop protection, a property of the pool rather than of one
/// worker. Children that fail to start, or too many that die young, hold
/// spawning back for a delay that doubles once per spawn round (children
/// started before the last escalation add nothing: sixteen that fail
/// together are one failure of the pool), up to [`MAX_DELAY`], or
/// [`PROBE_EVERY`] while nothing serves. While held back, one child (a
/// probe) is started per delay; the first probe that proves healthy, or
/// a successful fork after fork failures, ends the back-off.
#[derive(Debug, Default)]
pub struct Backoff {
    delay: Duration,
    /// When the back-off began: children started since are probes.
    since: Option<Instant>,
    /// When the delay last grew: deaths of children started before it
    /// belong to a round already counted.
    escalated: Option<Instant>,
    /// The last escalation or probe, which the delay counts from.
    last: Option<Instant>,
    /// Only fork(2) failed: a fork that works again ends the back-off.
    fork_only: bool,
    /// Early deaths since the back-off began, for the log.
    deaths: u64,
    /// Young deaths of ready children in the current window.
    young: (Option<Instant>, u32),
}

impl Backoff {
    /// Records an early death (`FailedStart` or `DiedYoung`) of a child
    /// started at `started`. Returns the new delay when spawning is held
    /// back anew or for longer.
    pub fn early_death(&mut self, now: Instant, started: Instant, exit: Exit) -> Option<Duration> {
        if self.is_active() {
            self.deaths += 1;
        }
        if exit == Exit::DiedYoung && !self.is_active() {
            let (start, n) = &mut self.young;
            if start.is_none_or(|t| now >= t + QUICK_DEATH) {
                *start = Some(now);
                *n = 0;
            }
            *n += 1;
            if *n <= TOLERATED {
                return None;
            }
        }
        if self.escalated.is_some_and(|t| started < t) {
            return None;
        }
        self.fork_only = false;
        Some(self.escalate(now))
    }

    /// Records a failed fork; returns the delay before the next try.
    pub fn fork_failed(&mut self, now: Instant) -> Duration {
        if !self.is_active() {
            self.fork_only = true;
        }
        self.escalate(now)
    }

    /// Records a successful fork: the end of a back-off that only fork
    /// failures caused, or else one probe, after which the next waits a
    /// delay.
    pub fn forked(&mut self, now: Instant) {
        if self.fork_only {
            *self = Backoff::default();
        } else if self.is_active() {
            self.last = Some(now);
        }
    }

    /// A probe proved healthy: spawning is free again. Returns how many
    /// early deaths the back-off saw, if there was one.
    pub fn healthy(&mut self) -> Option<u64> {
        let was = self.is_active().then_some(self.deaths);
        *self = Backoff::default();
        was
    }

    fn escalate(&mut self, now: Instant) -> Duration {
        self.delay = if self.delay.is_zero() {
            FIRST_DELAY
        } else {
            (self.delay * 2).min(MAX_DELAY)
        };
        self.since.get_or_insert(now);
        self.escalated = Some(now);
        self.last = Some(now);
        self.delay
    }

    /// Whether spawning is held back or rationed to probes.
    pub fn is_active(&self) -> bool {
        !self.delay.is_zero()
    }

    /// Children started at or after this instant are probes.
    pub fn probes_since(&self) -> Option<Instant> {
        self.since
    }

    /// When the next child may be started, if not now; `serving` says
    /// whether anything still serves clients (if not, at most
    /// [`PROBE_EVERY`]).
    pub fn hold_until(&self, now: Instant, serving: bool) -> Option<Instant> {
        let last = self.last?;
        let wait = if serving {
            self.delay
        } else {
            self.delay.min(PROBE_EVERY)
        };
        Some(last + wait).filter(|&t| t > now)
    }

    /// The current delay (zero when not backing off).
    #[cfg(test)]
    pub fn delay(&self) -> Duration {
        self.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_of_one_round_escalate_once() {
        let mut b = Backoff::default();
        let t = Instant::now();
        let ms = Duration::from_millis;
        // Sixteen workers started together all fail: one round.
        let reaped = t + ms(1);
        assert_eq!(
            b.early_death(reaped, t, Exit::FailedStart),
            Some(FIRST_DELAY)
        );
        for _ in 0..15 {
            assert_eq!(b.early_death(reaped + ms(1), t, Exit::FailedStart), None);
        }
        assert_eq!(b.delay(), FIRST_DELAY);
        assert_eq!(b.hold_until(reaped, true), Some(reaped + FIRST_DELAY));
        // A probe started after it fails: the next round, twice as long.
        let probe = reaped + FIRST_DELAY;
        b.forked(probe);
        assert_eq!(b.hold_until(probe, true), Some(probe + FIRST_DELAY));
        assert_eq!(
            b.early_death(probe + ms(5), probe, Exit::FailedStart),
            Some(FIRST_DELAY * 2)
        );
        assert_eq!(b.probes_since(), Some(reaped));
        assert_eq!(b.healthy(), Some(16));
        assert!(!b.is_active());
        assert_eq!(b.hold_until(t, true), None);
    }

    #[test]
    fn the_delay_is_capped_and_short_while_nothing_serves() {
        let mut b = Backoff::default();
        let mut t = Instant::now();
        for _ in 0..20 {
            t += Duration::from_secs(60);
            b.early_death(t, t, Exit::FailedStart);
        }
        assert_eq!(b.delay(), MAX_DELAY);
        assert_eq!(b.hold_until(t, true), Some(t + MAX_DELAY));
        assert_eq!(b.hold_until(t, false), Some(t + PROBE_EVERY));
    }

    #[test]
    fn a_few_young_deaths_of_ready_workers_are_tolerated() {
        let mut b = Backoff::default();
        let t = Instant::now();
        for k in 0..TOLERATED {
            let now = t + Duration::from_millis(u64::from(k));
            assert_eq!(b.early_death(now, t, Exit::DiedYoung), None);
        }
        assert!(!b.is_active(), "chaos must not hold the pool back");
        // A storm: more than tolerated within a second.
        assert_eq!(
            b.early_death(t + Duration::from_millis(10), t, Exit::DiedYoung),
            Some(FIRST_DELAY)
        );
        // A new window forgets the old deaths.
        let mut b = Backoff::default();
        for k in 0..10u64 {
            let now = t + Duration::from_millis(600 * k);
            assert_eq!(b.early_death(now, now, Exit::DiedYoung), None, "death {k}");
        }
    }

    #[test]
    fn a_fork_that_works_again_ends_a_fork_failure_back_off() {
        let mut b = Backoff::default();
        let t = Instant::now();
        for _ in 0..6 {
            b.fork_failed(t);
        }
        assert_eq!(b.delay(), FIRST_DELAY * 32);
        b.forked(t);
        assert!(!b.is_active());
        // One later failure starts from the first delay again.
        assert_eq!(b.fork_failed(t), FIRST_DELAY);
        // But a fork does not end a back-off that dying children caused.
        let mut b = Backoff::default();
        b.early_death(t, t, Exit::FailedStart);
        b.forked(t);
        assert!(b.is_active());
    }
}
