//! The dynamic prefork pool's rule (Apache prefork's): keep between
//! `min-spare` and `max-spare` idle workers, within `workers` and
//! `max-workers`. When spares run short, spawn in bursts that double each
//! second they stay short (1, 2, 4, … up to 32 a second); when there are
//! too many, retire one idle worker a second. Pure, so it is unit-tested;
//! the master counts the workers and acts.

use std::time::{Duration, Instant};

/// The most workers started in one second.
pub const MAX_RATE: u32 = 32;
const WINDOW: Duration = Duration::from_secs(1);

/// The pool's bounds, from the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    pub workers: u32,
    pub max_workers: u32,
    pub min_spare: u32,
    pub max_spare: u32,
}

/// What to do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Start this many workers.
    Spawn(u32),
    /// Retire one idle worker.
    Retire,
    /// Every worker is busy and the pool is at `max-workers`.
    AtMax,
}

/// The spawn rate and its one-second window.
#[derive(Debug)]
pub struct Pool {
    rate: u32,
    window: Option<Instant>,
    spawned: u32,
    last_retire: Option<Instant>,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            rate: 1,
            window: None,
            spawned: 0,
            last_retire: None,
        }
    }
}

impl Pool {
    /// Decides, given `idle` workers (starting ones count: they will be)
    /// out of `total` active ones.
    pub fn decide(&mut self, now: Instant, idle: u32, total: u32, b: Bounds) -> Action {
        let short = idle < b.min_spare;
        if self.window.is_none_or(|w| now >= w + WINDOW) {
            self.rate = match (short, self.spawned >= self.rate) {
                // Short all through the last second: grow faster.
                (true, true) if self.window.is_some() => (self.rate * 2).min(MAX_RATE),
                (true, _) => self.rate,
                (false, _) => 1,
            };
            self.window = Some(now);
            self.spawned = 0;
        }
        if short {
            if total >= b.max_workers {
                // Only worth a word when clients may have to wait.
                return if idle == 0 {
                    Action::AtMax
                } else {
                    Action::Nothing
                };
            }
            let n = (b.min_spare - idle)
                .min(self.rate - self.spawned)
                .min(b.max_workers - total);
            if n == 0 {
                return Action::Nothing;
            }
            self.spawned += n;
            return Action::Spawn(n);
        }
        if idle > b.max_spare
            && total > b.workers
            && self.last_retire.is_none_or(|t| now >= t + WINDOW)
        {
            self.last_retire = Some(now);
            return Action::Retire;
        }
        Action::Nothing
    }

    /// Whether a worker may still be started in this second (if not, the
    /// master need not be woken until the next one).
    pub fn can_spawn(&self, now: Instant) -> bool {
        self.spawned < self.rate || self.window.is_none_or(|w| now >= w + WINDOW)
    }
}

/// A bound the accepting process stops at (fork mode's `max-children`):
/// counts each time it is reached and says when to tell the operator —
/// when it is reached (at most once per `every`), and every `every`
/// while it holds and clients wait in the backlog.
#[derive(Debug)]
pub struct Saturation {
    every: Duration,
    since: Option<Instant>,
    reported: Option<Instant>,
    /// Times the bound was reached.
    pub hits: u64,
    unreported: u64,
}

/// What [`Saturation::observe`] says to log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// The bound was just reached; `unreported` earlier times were not logged.
    Reached { unreported: u64 },
    /// It has held for this long and clients wait.
    Held(Duration),
}

impl Saturation {
    /// A bound reported at most once per `every`.
    pub const fn new(every: Duration) -> Saturation {
        Saturation {
            every,
            since: None,
            reported: None,
            hits: 0,
            unreported: 0,
        }
    }

    /// Records whether the bound holds at `now`; `waiting` (asked only
    /// when it may be logged) says whether clients wait meanwhile.
    pub fn observe(
        &mut self,
        now: Instant,
        full: bool,
        waiting: impl FnOnce() -> bool,
    ) -> Option<Report> {
        if !full {
            self.since = None;
            return None;
        }
        let due = self.reported.is_none_or(|t| now >= t + self.every);
        match self.since {
            None => {
                self.since = Some(now);
                self.hits += 1;
                if !due {
                    self.unreported += 1;
                    return None;
                }
                self.reported = Some(now);
                Some(Report::Reached {
                    unreported: std::mem::take(&mut self.unreported),
                })
            }
            Some(since) if due && waiting() => {
                self.reported = Some(now);
                Some(Report::Held(now - since))
            }
            Some(_) => None,
        }
    }

    /// Whether the bound holds now (as last observed).
    pub fn is_full(&self) -> bool {
        self.since.is_some()
    }
}

/// A worker's `max-requests` (0: no limit) plus its share of the jitter:
/// a value from `base` to `base + jitter`.
pub fn max_requests(base: u32, jitter: u32, seed: &mut u64) -> u64 {
    let base = u64::from(base);
    if base == 0 || jitter == 0 {
        return base;
    }
    // xorshift: spreading recycling needs no better randomness.
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    base + *seed % (u64::from(jitter) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        workers: 2,
        max_workers: 10,
        min_spare: 1,
        max_spare: 3,
    };

    #[test]
    fn bursts_double_each_second_while_short() {
        let mut p = Pool::default();
        let t = Instant::now();
        let s = |k: u64| t + Duration::from_millis(1000 * k + 1);
        // Deep shortage, so the rate is the limit.
        let big = Bounds {
            min_spare: 100,
            max_spare: 200,
            max_workers: 1000,
            ..B
        };
        assert_eq!(p.decide(t, 0, 2, big), Action::Spawn(1));
        assert_eq!(p.decide(t, 0, 3, big), Action::Nothing, "budget spent");
        assert!(!p.can_spawn(t));
        assert_eq!(p.decide(s(1), 0, 3, big), Action::Spawn(2));
        assert_eq!(p.decide(s(2), 0, 5, big), Action::Spawn(4));
        for k in 3..9 {
            p.decide(s(k), 0, 100, big);
        }
        assert_eq!(p.decide(s(9), 0, 200, big), Action::Spawn(MAX_RATE));
        // Not short any more: back to one.
        assert_eq!(p.decide(s(10), 100, 300, big), Action::Nothing);
        assert_eq!(p.decide(s(11), 0, 300, big), Action::Spawn(1));
    }

    #[test]
    fn spawns_only_the_shortfall_and_never_past_max_workers() {
        let mut p = Pool::default();
        let t = Instant::now();
        let wide = Bounds { min_spare: 3, ..B };
        p.rate = 8;
        p.window = Some(t);
        assert_eq!(p.decide(t, 1, 4, wide), Action::Spawn(2));
        assert_eq!(p.decide(t, 0, 9, wide), Action::Spawn(1), "one slot left");
        assert_eq!(p.decide(t, 0, 10, wide), Action::AtMax);
    }

    #[test]
    fn saturation_is_counted_each_time_and_repeated_while_clients_wait() {
        let every = Duration::from_secs(10);
        let mut s = Saturation::new(every);
        let t = Instant::now();
        let at = |k: u64| t + Duration::from_secs(k);
        assert_eq!(s.observe(t, false, || true), None);
        assert_eq!(
            s.observe(t, true, || true),
            Some(Report::Reached { unreported: 0 })
        );
        assert_eq!(
            s.observe(at(5), true, || true),
            None,
            "held, but reported 5 s ago"
        );
        assert_eq!(s.observe(at(10), true, || false), None, "nobody waits");
        assert_eq!(
            s.observe(at(11), true, || true),
            Some(Report::Held(Duration::from_secs(11)))
        );
        // Reached again and again within an interval: counted, logged once.
        s.observe(at(12), false, || true);
        assert_eq!(s.observe(at(13), true, || true), None);
        s.observe(at(14), false, || true);
        assert_eq!(s.observe(at(15), true, || true), None);
        s.observe(at(16), false, || true);
        assert_eq!(
            s.observe(at(21), true, || true),
            Some(Report::Reached { unreported: 2 })
        );
        assert_eq!(s.hits, 4);
        assert!(s.is_full());
    }

    #[test]
    fn retires_one_idle_worker_a_second_down_to_the_floor() {
        let mut p = Pool::default();
        let t = Instant::now();
        assert_eq!(p.decide(t, 6, 8, B), Action::Retire);
        assert_eq!(p.decide(t, 5, 7, B), Action::Nothing, "one a second");
        let later = t + Duration::from_secs(1);
        assert_eq!(p.decide(later, 5, 7, B), Action::Retire);
        assert_eq!(p.decide(later + WINDOW, 4, 2, B), Action::Nothing, "floor");
        assert_eq!(
            p.decide(later + WINDOW, 3, 5, B),
            Action::Nothing,
            "within spares"
        );
    }
}
