//! The dynamic prefork pool's rule (Apache prefork's, without its spawn
//! rate): keep between `min-spare` and `max-spare` idle workers, within
//! `workers` and `max-workers`. When spares run short, start the whole
//! shortfall at once (a fork costs well under a millisecond): the missing
//! spares, plus, when every worker is busy, the clients already waiting in
//! the listeners' accept queues, as the kernel counts them. Where it does
//! not count them, keep doubling the burst while every new worker turns
//! busy at once. A shortfall with at most one client waiting may be a
//! moment's (one client that reconnects at once: its next connection is
//! taken by the spare, or waits for it, while the worker that served the
//! last one is still closing it), so it is met only once it has lasted
//! [`SETTLE`]; one with more clients waiting is met at once. When there are too many idle, retire one a
//! second. Pure, so it is unit-tested; the master counts the workers and
//! acts.

use std::time::{Duration, Instant};

/// The largest burst started where the kernel does not say how many
/// clients wait.
pub const MAX_BURST: u32 = 1024;
const RETIRE_EVERY: Duration = Duration::from_secs(1);
/// How long a shortfall of spares with nobody waiting must last before
/// it is met: far longer than a worker takes to finish a connection, far
/// shorter than a person notices.
pub const SETTLE: Duration = Duration::from_millis(100);

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
    /// Spares are short with nobody waiting, maybe for a moment: decide
    /// again after this long.
    Recheck(Duration),
}

/// The burst size where the queue is unknown, and when a worker was last
/// retired.
#[derive(Debug)]
pub struct Pool {
    burst: u32,
    last_retire: Option<Instant>,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            burst: 1,
            last_retire: None,
        }
    }
}

/// Who waits for a worker, as the master sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    /// Clients in the accept queues (`None`: the kernel does not say).
    pub queued: Option<u32>,
    /// Connections handed over by retiring workers, waiting in the relay.
    pub relayed: u32,
    /// How long ago the last worker turned busy: how long the present
    /// shortfall may have lasted.
    pub busy_for: Duration,
}

impl Pool {
    /// Decides, given `idle` workers and `starting` ones (which count as
    /// spares: they will be, but are not yet surplus) out of `total`
    /// active ones, and who waits. `min-spare` 0 pins the pool at
    /// `workers`, but for connections handed over: an open conversation
    /// gets a worker, within `max-workers`.
    pub fn decide(
        &mut self,
        now: Instant,
        (idle, starting): (u32, u32),
        total: u32,
        d: Demand,
        b: Bounds,
    ) -> Action {
        let surplus = idle;
        let idle = idle + starting;
        // Waiting clients count only when nobody can take them: an idle
        // worker takes its client within microseconds, and counting it
        // would grow the pool on every transient.
        let (queued, relayed) = match (idle, b.min_spare) {
            (0, 0) => (Some(0), d.relayed),
            (_, 0) => (Some(0), 0),
            (0, _) => (d.queued, d.relayed),
            _ => (Some(0), 0),
        };
        let want = b
            .min_spare
            .saturating_add(queued.unwrap_or(0))
            .saturating_add(relayed);
        let busy_for = d.busy_for;
        if idle < want {
            if total >= b.max_workers {
                // Only worth a word when clients may have to wait.
                return if idle == 0 {
                    Action::AtMax
                } else {
                    Action::Nothing
                };
            }
            // One client that reconnects at once shows as a worker just
            // turned busy and at most one client (itself) in the queue:
            // that may be gone in microseconds. More waiting, or a
            // shortfall that lasts, is real.
            if relayed == 0 && queued.is_some_and(|q| q <= 1) && busy_for < SETTLE {
                return Action::Recheck(SETTLE - busy_for);
            }
            let mut n = want - idle;
            if queued.is_none() {
                n = n.max(self.burst);
                self.burst = (self.burst * 2).min(MAX_BURST);
            }
            return Action::Spawn(n.min(b.max_workers - total));
        }
        self.burst = 1;
        if surplus > b.max_spare
            && total > b.workers
            && self.last_retire.is_none_or(|t| now >= t + RETIRE_EVERY)
        {
            self.last_retire = Some(now);
            return Action::Retire;
        }
        Action::Nothing
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

    /// Decides for a shortfall that has lasted (met at once, if any).
    fn settled(
        p: &mut Pool,
        now: Instant,
        idle: (u32, u32),
        total: u32,
        waiting: Option<u32>,
        b: Bounds,
    ) -> Action {
        let d = Demand {
            queued: waiting,
            relayed: 0,
            busy_for: Duration::from_secs(5),
        };
        p.decide(now, idle, total, d, b)
    }

    const B: Bounds = Bounds {
        workers: 2,
        max_workers: 10,
        min_spare: 1,
        max_spare: 3,
    };

    /// B with another ceiling and other spares.
    fn bounds(max_workers: u32, min_spare: u32, max_spare: u32) -> Bounds {
        Bounds {
            max_workers,
            min_spare,
            max_spare,
            ..B
        }
    }

    #[test]
    fn the_whole_shortfall_starts_at_once_with_the_waiting_clients() {
        let (mut p, t) = (Pool::default(), Instant::now());
        let mut at =
            |idle, total, waiting| settled(&mut p, t, idle, total, waiting, bounds(2048, 2, 8));
        // 2,000 clients arrive at a pool of 2, both busy.
        assert_eq!(at((0, 0), 2, Some(1998)), Action::Spawn(2000));
        // They start (and count as spares, not as surplus): nothing more.
        assert_eq!(at((0, 2000), 2002, Some(1998)), Action::Nothing);
        // Never past max-workers.
        assert_eq!(at((0, 0), 2000, Some(500)), Action::Spawn(48));
        assert_eq!(at((0, 0), 2048, Some(500)), Action::AtMax);
    }

    #[test]
    fn a_momentary_shortfall_with_nobody_waiting_is_rechecked_not_met() {
        let (mut p, t) = (Pool::default(), Instant::now());
        let b = Bounds { min_spare: 1, ..B };
        // One client reconnecting: both workers busy for an instant.
        let just = Duration::from_micros(300);
        let demand = |queued, busy_for| Demand {
            queued,
            relayed: 0,
            busy_for,
        };
        assert_eq!(
            p.decide(t, (0, 0), 2, demand(Some(0), just), b),
            Action::Recheck(SETTLE - just)
        );
        // Still short a while later, nobody waiting: a real shortfall.
        let d = demand(Some(0), SETTLE);
        assert_eq!(p.decide(t, (0, 0), 2, d, b), Action::Spawn(1));
        // So is one in the queue: the same client, reconnecting.
        assert_eq!(
            p.decide(t, (0, 0), 2, demand(Some(1), just), b),
            Action::Recheck(SETTLE - just)
        );
        // More clients waiting are met at once, however young the shortfall.
        let d = demand(Some(3), just);
        assert_eq!(p.decide(t, (0, 0), 2, d, b), Action::Spawn(4));
        // Where the queue is unknown, as before: at once.
        let d = demand(None, just);
        assert_eq!(p.decide(t, (0, 0), 2, d, b), Action::Spawn(1));
    }

    #[test]
    fn handed_over_conversations_get_a_worker_even_in_a_pinned_pool() {
        let (mut p, t) = (Pool::default(), Instant::now());
        let pinned = Bounds { min_spare: 0, ..B };
        let d = Demand {
            queued: Some(0),
            relayed: 3,
            busy_for: Duration::ZERO,
        };
        assert_eq!(p.decide(t, (0, 0), 4, d, pinned), Action::Spawn(3));
        // An idle worker takes them first.
        assert_eq!(p.decide(t, (1, 0), 4, d, pinned), Action::Nothing);
        // Never past max-workers.
        assert_eq!(p.decide(t, (0, 0), 10, d, pinned), Action::AtMax);
    }

    #[test]
    fn a_transient_does_not_grow_the_pool() {
        let mut p = Pool::default();
        let t = Instant::now();
        let b = Bounds { min_spare: 1, ..B };
        // One client, one connection after another: one busy, one idle;
        // a client caught in the queue is the idle worker's.
        assert_eq!(settled(&mut p, t, (1, 0), 2, Some(1), b), Action::Nothing);
        assert_eq!(settled(&mut p, t, (2, 0), 2, Some(0), b), Action::Nothing);
        // min-spare 0 pins the pool, however many wait.
        let pinned = Bounds { min_spare: 0, ..B };
        assert_eq!(
            settled(&mut p, t, (0, 0), 2, Some(50), pinned),
            Action::Nothing
        );
    }

    #[test]
    fn without_a_queue_count_bursts_double_while_every_worker_is_busy() {
        let (mut p, t) = (Pool::default(), Instant::now());
        let big = bounds(1000, 1, B.max_spare);
        assert_eq!(settled(&mut p, t, (0, 0), 2, None, big), Action::Spawn(1));
        assert_eq!(settled(&mut p, t, (0, 0), 3, None, big), Action::Spawn(2));
        assert_eq!(settled(&mut p, t, (0, 0), 5, None, big), Action::Spawn(4));
        // Spares are back: the next burst starts small again.
        assert_eq!(settled(&mut p, t, (1, 0), 9, None, big), Action::Nothing);
        assert_eq!(settled(&mut p, t, (0, 0), 9, None, big), Action::Spawn(1));
    }

    #[test]
    fn spawns_only_the_shortfall_and_never_past_max_workers() {
        let mut p = Pool::default();
        let t = Instant::now();
        let wide = Bounds { min_spare: 3, ..B };
        assert_eq!(
            settled(&mut p, t, (1, 0), 4, Some(0), wide),
            Action::Spawn(2)
        );
        assert_eq!(
            settled(&mut p, t, (0, 0), 9, Some(0), wide),
            Action::Spawn(1),
            "one slot left"
        );
        assert_eq!(settled(&mut p, t, (0, 0), 10, Some(0), wide), Action::AtMax);
    }

    #[test]
    fn retires_one_idle_worker_a_second_down_to_the_floor() {
        let mut p = Pool::default();
        let t = Instant::now();
        assert_eq!(settled(&mut p, t, (6, 0), 8, Some(0), B), Action::Retire);
        assert_eq!(
            settled(&mut p, t, (5, 0), 7, Some(0), B),
            Action::Nothing,
            "one a second"
        );
        let later = t + Duration::from_secs(1);
        assert_eq!(
            settled(&mut p, later, (5, 0), 7, Some(0), B),
            Action::Retire
        );
        assert_eq!(
            settled(&mut p, later + RETIRE_EVERY, (4, 0), 2, Some(0), B),
            Action::Nothing,
            "floor"
        );
        assert_eq!(
            settled(&mut p, later + RETIRE_EVERY, (3, 0), 5, Some(0), B),
            Action::Nothing,
            "within spares"
        );
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
    }
}
