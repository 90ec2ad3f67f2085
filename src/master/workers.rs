//! The workers: keeping the pool (prefork or event) at its size and its
//! spares (pool.rs decides, this acts), the helpers beside it, spawning
//! any kind of worker from the kinds table (kind.rs) and retiring them,
//! TTIN/TTOU.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::unistd::Pid;

use super::generation::{take_planned, Target};
use super::kinds::{self, Params};
use super::spawn::{Brief, Ctl};
use super::Master;
use crate::children::{Child, Kind};
use crate::config::Mode;
use crate::listen::Listener;
use crate::pool;
use crate::scoreboard::{Entry, HandOver, State};
use crate::time::after;

/// Busy workers of an older generation told to hand over at once.
const HAND_OVER_AT_ONCE: usize = 128;

/// Workers a pool's fill forks per turn of the master's loop.
const FORK_AT_ONCE: u32 = 64;

impl Master {
    /// SIGTTIN/SIGTTOU: moves the pool's floor by one; TTOU also retires
    /// one worker (an idle one if there is one) while above the floor.
    pub(super) fn resize(&mut self, up: bool, now: Instant) {
        let sig = if up { "SIGTTIN" } else { "SIGTTOU" };
        if !self.cfg.mode.pooled() {
            warn!("{sig} ignored: the pool size applies to prefork and event modes only");
            return;
        }
        let old = self.cfg.workers;
        let new = if up {
            (old + 1).min(self.cfg.max_workers)
        } else {
            old.saturating_sub(1).max(1)
        };
        if new == old {
            warn!(
                "{sig}: the pool stays at {old} workers ({})",
                if up {
                    "max-workers"
                } else {
                    "the least there can be"
                }
            );
        } else {
            self.cfg.workers = new;
            info!("{sig}: the pool's floor is now {new} workers");
            if !up && self.children.active(self.life.generation()) > new as usize {
                self.retire_one(now, "SIGTTOU");
            }
        }
    }

    /// prefork: forks workers until the pool is at its size, unless crash-loop
    /// back-off holds spawning back. During a reload the new generation's
    /// pool is kept full too (its workers may recycle before it takes over).
    /// A prefork generation that takes over from an older one (a reload,
    /// an upgrade) starts with a worker for each conversation the older
    /// one will hand over, besides its spares: they are ready when the
    /// connections come, rather than forked one burst after they wait.
    ///
    /// At most [`FORK_AT_ONCE`] per turn of the master's loop, which comes
    /// straight back for more: 4,000 forked in one go kept the master
    /// from its signals, its children's exits and its spares for 4 s.
    pub(super) fn fill_pool(&mut self, now: Instant) {
        let mut budget = FORK_AT_ONCE;
        self.prefork.fill_more = false;
        for target in [Target::InForce, Target::Pending] {
            let (generation, size) = match (target, &self.underway.pending, self.life.next()) {
                (Target::InForce, _, _) if self.cfg.mode.pooled() => {
                    let g = self.life.generation();
                    (g, self.taking_over(g, &self.cfg))
                }
                (Target::Pending, Some(p), Some(next)) if p.cfg.mode.pooled() => {
                    (next, self.taking_over(next, &p.cfg))
                }
                _ => continue,
            };
            while self.children.active(generation) < size as usize {
                if budget == 0 {
                    self.prefork.fill_more = true;
                    break;
                }
                budget -= 1;
                if !self.try_spawn(target, Kind::Pool, now) {
                    // A new generation commits without the rest (progress).
                    self.prefork.fill_stuck = true;
                    break;
                }
            }
        }
        self.fill_helpers(now);
    }

    /// After a reload or an upgrade committed: tells the older
    /// generations' workers to stop, the idle ones at once and the busy
    /// ones [`HAND_OVER_AT_ONCE`] at a time (more as those exit). Told all
    /// at once, 4,000 busy workers woke together to hand over and exit,
    /// and every other process on two CPUs (the clients among them) got a
    /// 4,000th of a CPU for seconds; untold, a busy worker goes on serving.
    pub(super) fn retire_older(&mut self, now: Instant) {
        let generation = self.life.generation();
        let busy = |c: &Child| {
            c.slot
                .and_then(|s| self.scoreboard.get(s))
                .is_some_and(|e| e.open > 0)
        };
        let older = |c: &Child| c.kind.is_worker() && c.generation < generation;
        let handing = self
            .children
            .iter()
            .filter(|(_, c)| older(c) && c.retire_by.is_some() && !c.killed && busy(c))
            .count();
        let mut room = HAND_OVER_AT_ONCE.saturating_sub(handing);
        let tell: Vec<Pid> = self
            .children
            .iter()
            .filter(|(_, c)| older(c) && c.retire_by.is_none())
            .filter(|(_, c)| {
                if !busy(c) {
                    return true;
                }
                let fits = room > 0;
                room = room.saturating_sub(1);
                fits
            })
            .map(|(p, _)| p)
            .collect();
        // More to tell once some of these are gone.
        let untold = self
            .children
            .iter()
            .filter(|(_, c)| older(c) && c.retire_by.is_none())
            .count();
        self.prefork.retiring_older = untold > tell.len();
        let by = after(now, self.cfg.shutdown_timeout);
        for pid in tell {
            self.children.retire(pid, by, &self.scoreboard);
        }
    }

    /// The size of a pool of `generation` with `cfg`: its floor, or, in
    /// prefork, a worker for each connection open in an older
    /// generation's workers (which hand them over) plus `min-spare`,
    /// within `max-workers`.
    pub(super) fn taking_over(&self, generation: u32, cfg: &crate::config::Config) -> u32 {
        if cfg.mode != Mode::Prefork || self.scoreboard.hand_over() != HandOver::ToWorkers {
            return cfg.workers;
        }
        let open = u32::try_from(self.held_by(|c| c.generation < generation)).unwrap_or(u32::MAX);
        if open == 0 {
            return cfg.workers;
        }
        (open + cfg.min_spare).clamp(cfg.workers, cfg.max_workers)
    }

    /// The connections held by the workers `which` picks, which each
    /// offers the pool when it retires: one at most for a prefork worker,
    /// as many as it serves for an event worker (after a reload from event
    /// mode) or a carrier.
    fn held_by(&self, which: impl Fn(&Child) -> bool) -> u64 {
        self.children
            .iter()
            .filter(|(_, c)| c.kind.is_worker() && c.kind.relays() && which(c))
            .filter_map(|(_, c)| self.scoreboard.get(c.slot?))
            .map(|e| e.open)
            .sum()
    }

    /// Forks the helpers the generation in force needs: as many of each
    /// helper kind as the configuration wants while a listener of its service is
    /// open (`udp-workers` for `udp:`, one for `--metrics`). (A reload's
    /// new generation gets its own once it is in force: until then the
    /// old ones serve, and clients wait in the sockets meanwhile.)
    fn fill_helpers(&mut self, now: Instant) {
        if self.life.stopping() {
            return;
        }
        for kind in Kind::helpers() {
            let listens = kind.keeps().is_some_and(|service| {
                self.acceptor
                    .listeners()
                    .iter()
                    .any(|l| l.service() == service)
            });
            let want = if listens {
                kinds::wanted(kind, &self.cfg)
            } else {
                0
            };
            while self.children.serving(kind, self.life.generation()) < want {
                if !self.try_spawn(Target::InForce, kind, now) {
                    return;
                }
            }
        }
    }

    /// Starts a worker unless crash-loop back-off holds spawning back; a
    /// failed fork starts (or grows) the back-off. False: none started.
    pub(super) fn try_spawn(&mut self, target: Target, kind: Kind, now: Instant) -> bool {
        if self.backoff.hold_until(now, self.serving()).is_some() {
            return false;
        }
        match self.spawn_worker(target, kind, now) {
            Ok(_) => {
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                self.backoff.fork_failed(now);
                let wait = self.respawn_wait(now);
                if let Some(more) = self.reports.errors.hit(now) {
                    error!(
                        "cannot fork a worker: {e}; retrying in {} ms ({more} more failures since the last report)",
                        wait.as_millis()
                    );
                }
                false
            }
        }
    }

    /// Whether the generation in force has a worker accepting or serving
    /// (fork mode: never, as a held-back master serves no one new).
    pub(super) fn serving(&self) -> bool {
        self.cfg.mode.pooled() && self.ready_workers(self.life.generation()) > 0
    }

    /// How long until the next child may be started.
    pub(super) fn respawn_wait(&self, now: Instant) -> Duration {
        self.backoff
            .hold_until(now, self.serving())
            .map_or(Duration::ZERO, |t| t - now)
    }

    /// prefork: the spare policy (pool.rs) for the generation in force:
    /// starts workers in bursts when idle ones run short, retires one a
    /// second when there are too many, and arms the workers' wake-up.
    pub(super) fn maintain(&mut self, now: Instant) {
        if self.cfg.mode != Mode::Prefork {
            self.scoreboard.set_wake_below(0);
            return;
        }
        let (mut idle, mut starting, mut total) = (0u32, 0u32, 0u32);
        // When the last worker turned busy: how long spares may have been short.
        let mut last_busy = None;
        for (_, e) in self.pool_of(self.life.generation()) {
            total += 1;
            match e {
                Some(e) if e.state == State::Idle => idle += 1,
                Some(e) if e.state == State::Starting => starting += 1,
                Some(e) if e.state == State::Busy => {
                    last_busy = last_busy.max(Some(e.since_ms));
                }
                _ => {}
            }
        }
        let busy_for = last_busy.map_or(Duration::MAX, |ms| self.scoreboard.age(ms));
        let bounds = pool::Bounds {
            workers: self.cfg.workers,
            max_workers: self.cfg.max_workers,
            min_spare: self.cfg.min_spare,
            max_spare: self.cfg.max_spare,
        };
        let waiting = if idle + starting == 0 {
            self.acceptor
                .streams()
                .map(|(_, l)| l.queued())
                .try_fold(0u32, |sum, n| Some(sum.saturating_add(n?)))
        } else {
            Some(0)
        };
        // Connections handed over by retiring workers wait in the relay
        // for a free worker, and so do those of retiring workers still
        // busy, which will offer theirs (the relay may be full): the pool
        // grows for all of them, within max-workers.
        let offered = if self.scoreboard.hand_over() == HandOver::ToWorkers {
            self.held_by(|c| c.retire_by.is_some())
        } else {
            0
        };
        // And those the vault still holds from the last master.
        let carried = if self.restoring() {
            self.kept.carried.waiting() as u64
        } else {
            0
        };
        let relayed = self.scoreboard.relayed().load(Ordering::Acquire) + offered + carried;
        let demand = pool::Demand {
            queued: waiting,
            relayed: u32::try_from(relayed).unwrap_or(u32::MAX),
            busy_for,
        };
        self.prefork.recheck = None;
        match self
            .prefork
            .pool
            .decide(now, (idle, starting), total, demand, bounds)
        {
            pool::Action::Nothing => {}
            pool::Action::Recheck(after) => self.prefork.recheck = Some(now + after),
            pool::Action::Spawn(n) => {
                debug!(
                    "{idle} idle workers (min-spare {}), {} clients waiting: starting {n}",
                    bounds.min_spare,
                    waiting.map_or("some".into(), |w| w.to_string())
                );
                for _ in 0..n {
                    if !self.try_spawn(Target::InForce, Kind::Pool, now) {
                        break;
                    }
                }
            }
            pool::Action::Retire => self.retire_one(now, "more than max-spare idle"),
            pool::Action::AtMax => {
                if let Some(more) = self.prefork.at_max.hit(now) {
                    warn!(
                        "max-workers ({}) reached: all busy, new clients wait in the backlog ({}, {more} since the last report)",
                        bounds.max_workers,
                        crate::logging::counted(self.prefork.at_max.total(), "time", "times")
                    );
                }
            }
        }
        let total = self.children.active(self.life.generation()) as u32;
        let arm = total < bounds.max_workers;
        self.scoreboard
            .set_wake_below(if arm { bounds.min_spare } else { 0 });
    }

    /// Retires one worker of the generation in force: the one idle the
    /// longest, else one still starting, else a busy one (it finishes its
    /// connection first).
    pub(super) fn retire_one(&mut self, now: Instant, why: &str) {
        let rank = |s: Option<Entry>| match s {
            Some(e) if e.state == State::Idle => (0, e.since_ms),
            Some(e) if e.state == State::Starting => (1, 0),
            _ => (2, 0),
        };
        let victim = self
            .pool_of(self.life.generation())
            .map(|(pid, e)| (rank(e), pid))
            .min()
            .map(|(_, pid)| pid);
        if let Some(pid) = victim {
            if self
                .children
                .retire(pid, after(now, self.cfg.shutdown_timeout), &self.scoreboard)
            {
                info!("worker {pid} retiring ({why})");
            }
        }
    }

    /// The active workers of `generation`, with what their slots say.
    pub(super) fn pool_of(
        &self,
        generation: u32,
    ) -> impl Iterator<Item = (Pid, Option<Entry>)> + '_ {
        self.children
            .iter()
            .filter(move |(_, c)| c.active() && c.generation == generation)
            .map(|(pid, c)| (pid, c.slot.and_then(|s| self.scoreboard.get(s))))
    }

    /// Workers of `generation` that are accepting or serving.
    pub(super) fn ready_workers(&self, generation: u32) -> usize {
        self.pool_of(generation)
            .filter(|(_, e)| e.is_some_and(|e| matches!(e.state, State::Idle | State::Busy)))
            .count()
    }

    /// Forks one worker of `kind` for `target`'s configuration: it keeps
    /// the listeners of its service and runs what its kind runs. Err says
    /// why not.
    pub(super) fn spawn_worker(
        &mut self,
        target: Target,
        kind: Kind,
        now: Instant,
    ) -> Result<Pid, String> {
        let Some(run) = kinds::entry(kind) else {
            return Err(format!("a {} is forked for a connection", kind.name()));
        };
        let (generation, cfg, identity) = match (&self.underway.pending, self.life.next(), target) {
            (Some(p), Some(next), Target::Pending) => (next, &p.cfg, p.identity.clone()),
            _ => (self.life.generation(), &self.cfg, self.identity.clone()),
        };
        let limits = cfg.limits();
        let policy = cfg.policy();
        let shutdown = cfg.shutdown_timeout;
        let params = Params {
            mode: cfg.mode,
            max_open: cfg.worker_connections as usize,
            max_requests: pool::max_requests(
                cfg.max_requests,
                cfg.max_requests_jitter,
                &mut self.prefork.seed,
            ),
            udp_rate: cfg.udp_rate,
            engine: cfg.engine.as_ref().map(|e| e.engine).unwrap_or_default(),
        };
        let Some(slot) = self.scoreboard.claim(generation) else {
            return Err("every scoreboard slot is taken".into());
        };
        // Linux: the worker makes its own pipe and the master holds
        // nothing for it (sys/told.rs); elsewhere the master keeps the
        // write end.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let (ctl, mut ctl_w) = (Ctl::Own, None::<std::os::fd::OwnedFd>);
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let (ctl, mut ctl_w) = match crate::sys::pipe(false) {
            Ok((r, w)) => (Ctl::Given(r), Some(w)),
            Err(e) => {
                self.scoreboard.release(slot);
                let hint = if matches!(e, nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE) {
                    let (soft, _) = crate::sys::nofile_limit();
                    format!(
                        " (RLIMIT_NOFILE is {soft}; the master holds one descriptor per worker)"
                    )
                } else {
                    String::new()
                };
                return Err(format!(
                    "cannot create a control pipe: {}{hint}",
                    e.desc().to_lowercase()
                ));
            }
        };
        let brief = Brief {
            identity: Some(identity),
            limits,
            policy,
            slot: Some(slot),
            fork_slot: None,
            count_bytes: true,
            ctl,
            relays: kind.relays(),
            vault: kind.relays(),
            notice: true,
            shutdown,
            lean: None,
            fork_policy: false,
        };
        let forked = self.fork_child(
            brief,
            |m| {
                drop(ctl_w.take());
                let mut listeners = m.take_listeners(target);
                Listener::keep_in_child(&mut listeners, |l| kind.keeps() == Some(l.service()));
                listeners
            },
            |listeners, ctx| run(listeners, ctx, params),
        );
        match forked {
            Ok(pid) => {
                self.scoreboard.set_pid(slot, pid);
                let mut child = Child::new(kind, now);
                child.generation = generation;
                child.slot = Some(slot);
                child.told_by_signal = ctl_w.is_none();
                child.ctl = ctl_w;
                self.children.insert(pid, child);
                info!("{} {pid} started", kind.name());
                Ok(pid)
            }
            Err(e) => {
                self.scoreboard.release(slot);
                Err(crate::logging::error_text(&e))
            }
        }
    }

    /// The listeners of `target`'s configuration (in a child: the
    /// master's list is left empty).
    pub(super) fn take_listeners(&mut self, target: Target) -> Vec<Listener> {
        let current = self.acceptor.take();
        match (self.underway.pending.as_mut(), target) {
            (Some(p), Target::Pending) => {
                let mut current: Vec<Option<Listener>> = current.into_iter().map(Some).collect();
                take_planned(&mut current, std::mem::take(&mut p.plan))
            }
            _ => current,
        }
    }
}
