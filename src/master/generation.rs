//! Configurations and their generations: readiness at startup (and after
//! an upgrade), told to the lifecycle, and a reload on SIGHUP, which
//! prepares the new generation (the file read and checked, new listeners
//! bound, new workers forked), commits it once every new worker is ready
//! (then the old ones retire), or abandons it and keeps the configuration
//! in force. The lifecycle decides when; this does it.

use std::os::fd::AsFd;
use std::time::Instant;

use log::{error, info, warn};

use super::lifecycle::Event;
use super::Master;
use crate::accept::Acceptor;
use crate::config::{self, Config, LogTarget, Mode};
use crate::daemon::Identity;
use crate::listen::{self, Listener};
use crate::reload::{self, Planned};
use crate::time::after;

/// A reload under way: the new generation is starting and the old one
/// still serves.
pub(super) struct Pending {
    pub(super) cfg: Config,
    pub(super) identity: Identity,
    /// The new listener set, in the new configuration's order.
    pub(super) plan: Vec<Planned>,
}

/// Which configuration a worker is started for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// The one in force.
    InForce,
    /// The one a reload is starting.
    Pending,
}

/// What is under way beside serving, each while its phase lasts (the
/// lifecycle says which).
#[derive(Default)]
pub(super) struct Underway {
    /// Reloading: the new configuration and its listeners.
    pub(super) pending: Option<Pending>,
    /// Checking an upgrade: the new executable's `-t`, while it runs.
    pub(super) check: Option<super::helper::Helper>,
    /// Asking (a TERM under systemd): whether it is a restart.
    pub(super) query: Option<super::helper::Helper>,
}

impl Master {
    /// What to tell the lifecycle of what it waits for: a starting
    /// generation whose workers are all ready, and the time (its
    /// deadlines).
    pub(super) fn progress(&mut self, now: Instant) -> impl Iterator<Item = Event> {
        // An array, not a Vec: this runs on every wake-up, and a fork-mode
        // master pays a copied page for each heap page it writes between
        // forks.
        let mut ready = None;
        let generation = self.life.generation();
        if self.life.starting()
            && (self.cfg.mode == Mode::Fork || {
                // After an upgrade: with a worker for each connection the
                // old code's workers will hand over (see NextReady below).
                let ready = self.ready_workers(generation);
                ready >= self.cfg.workers as usize
                    && (ready >= self.taking_over(generation, &self.cfg) as usize
                        || self.prefork.fill_stuck)
            })
        {
            // Ready once the workers have what the vault held, too: a
            // stop that follows a restart then drains them with the rest.
            let since = *self.kept.workers_ready_at.get_or_insert(now);
            if !self.carried_waiting(now, since) {
                ready = Some(Event::Ready);
            }
        }
        let next_ready = match (self.life.next(), &self.underway.pending) {
            (Some(next), Some(p)) => {
                p.cfg.mode == Mode::Fork || {
                    // Every worker it takes over with, not only its
                    // floor: a commit as the first few were ready left
                    // thousands of handed-over connections waiting for
                    // forks.
                    let want = self.taking_over(next, &p.cfg) as usize;
                    let ready = self.ready_workers(next);
                    ready >= p.cfg.workers as usize && (ready >= want || self.prefork.fill_stuck)
                }
            }
            _ => false,
        };
        let next_ready = next_ready.then_some(Event::NextReady);
        [ready, next_ready, Some(Event::Tick)].into_iter().flatten()
    }

    /// Startup failed after the master began: say why (the stop and the
    /// exit status 1 follow).
    pub(super) fn fatal(&mut self, why: &str) {
        error!("{why}; stopping");
        if self.estate.ready.is_some() && self.cfg.log == LogTarget::Syslog {
            // The launcher is still waiting, and its stderr is still ours.
            crate::logging::say(why);
        }
    }

    /// SIGHUP: reads the configuration again and, if it is valid, starts
    /// generation `next`; the old one is retired once it is ready. `Some`:
    /// it could not be prepared.
    pub(super) fn reload(&mut self, now: Instant, next: u32) -> Option<Event> {
        match &self.cfg.config_file {
            Some(f) => info!("SIGHUP: reloading {}", f.display()),
            None => info!("SIGHUP: reloading (no config file: restarting the workers)"),
        }
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::time::monotonic_usec()
        ));
        self.prepare(now, next).err().map(Event::ReloadFailed)
    }

    /// Validates the new configuration, binds its new listeners and forks
    /// its workers (generation `next`).
    fn prepare(&mut self, now: Instant, next: u32) -> Result<(), String> {
        let mut cfg = config::load(self.source.cli.clone(), &self.source.base)?;
        for name in reload::keep_fixed(&self.cfg, &mut cfg) {
            warn!("{name} cannot change on reload; restart echo-forkd to change it");
        }
        let identity = Identity::resolve(
            cfg.user.as_deref(),
            cfg.group.as_deref(),
            cfg.chroot.as_deref(),
        )?;
        let cfg = config::with_engine(cfg, identity.engine_workers())?;
        let opts = cfg.bind_options(identity.socket_group());
        let plan = if self.source.activated {
            (0..self.acceptor.listeners().len())
                .map(Planned::Kept)
                .collect()
        } else {
            let current: Vec<_> = self
                .acceptor
                .listeners()
                .iter()
                .map(Listener::configured)
                .collect();
            let matched = reload::match_listeners(&current, &cfg.listen);
            let mut plan = Vec::with_capacity(matched.len());
            for (addr, m) in cfg.listen.iter().zip(matched) {
                plan.push(match m {
                    Some(i) => Planned::Kept(i),
                    None => Planned::Bound(listen::bind(addr, &opts)?),
                });
            }
            plan
        };
        for p in &plan {
            if let Planned::Bound(l) = p {
                info!("listening on {}", l.name());
            }
        }
        let workers = if cfg.mode.pooled() { cfg.workers } else { 0 };
        // Each new worker costs the master a descriptor until the old
        // generation is gone: check for room before forking any.
        let open = crate::sys::open_fds().unwrap_or(0);
        crate::daemon::ensure_nofile(open + u64::from(workers) + 8, "the reload", "workers")?;
        crate::daemon::make_room_for_descriptors(&cfg, plan.len());
        self.prefork.fill_stuck = false;
        self.underway.pending = Some(Pending {
            cfg,
            identity,
            plan,
        });
        for _ in 0..workers {
            self.spawn_worker(Target::Pending, crate::children::Kind::Pool, now)
                .map_err(|e| format!("cannot fork a new worker: {e}"))?;
        }
        debug_assert_eq!(self.life.next(), Some(next));
        Ok(())
    }

    /// The new generation is ready: switch to its listeners and settings,
    /// and tell the old workers to stop accepting.
    pub(super) fn commit(&mut self, now: Instant) {
        let Some(p) = self.underway.pending.take() else {
            return;
        };
        let mut current: Vec<Option<Listener>> =
            self.acceptor.take().into_iter().map(Some).collect();
        self.acceptor = Acceptor::new(take_planned(&mut current, p.plan));
        let store = self.estate.notify.as_ref();
        for l in current.into_iter().flatten() {
            info!("no longer listening on {}", l.name());
            if let (Some(n), Some(addr)) = (store, l.configured()) {
                n.unstore(&crate::systemd::listener_name(&addr.to_string()));
            }
        }
        // The new ones wait in the store across a restart too (one that
        // is there already is kept once).
        if let Some(n) = store {
            for l in self.acceptor.listeners() {
                if let Some(addr) = l.configured() {
                    let _ = n.store(
                        &[l.as_fd()],
                        &crate::systemd::listener_name(&addr.to_string()),
                    );
                }
            }
        }
        let opts = p.cfg.bind_options(p.identity.socket_group());
        if opts != self.cfg.bind_options(self.identity.socket_group()) {
            for l in self.acceptor.listeners() {
                if let Err(e) = l.set_backlog(opts.backlog).and(l.set_permissions(&opts)) {
                    warn!("{e}");
                }
            }
        }
        // The lifecycle has put it in force.
        let generation = self.life.generation();
        let retiring = self
            .children
            .iter()
            .filter(|(_, c)| {
                c.generation < generation && c.kind.is_worker() && c.retire_by.is_none()
            })
            .count();
        self.scoreboard.reloaded();
        self.life.set_shutdown(p.cfg.shutdown_timeout);
        // The engine line again when the one in force changes.
        if let Some(e) = &p.cfg.engine {
            if self.cfg.engine.as_ref().map(|old| old.engine) != Some(e.engine) {
                info!("{}", e.line());
            }
        }
        self.cfg = p.cfg;
        self.retire_older(now);
        self.identity = p.identity;
        self.fork.policy = self.cfg.policy();
        log::set_max_level(self.cfg.log_level.filter());
        info!(
            "reloaded: generation {generation} serves; {} retiring",
            crate::logging::counted(retiring as u64, "old worker", "old workers")
        );
        self.announce_ready(now);
    }

    /// Gives up a reload: the new workers (if any) are retired and the
    /// configuration in force stays.
    pub(super) fn abandon(&mut self, why: &str) {
        error!("reload failed: {why}; the configuration in force is unchanged");
        let now = Instant::now();
        self.underway.pending = None;
        // Workers newer than the generation in force are the reload's.
        let in_force = self.life.generation();
        self.children.retire_where(
            after(now, self.cfg.shutdown_timeout),
            &self.scoreboard,
            |g| g > in_force,
        );
        self.announce_ready(now);
    }

    /// Tells systemd the daemon serves (at startup, and at the end of a
    /// reload or an upgrade, good or bad), with its pid, which an upgrade
    /// keeps, and the status line.
    pub(super) fn announce_ready(&self, now: Instant) {
        self.notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS={}",
            self.pid,
            self.status_text(now)
        ));
    }
}

/// Builds a listener set from a plan, taking kept listeners out of
/// `current` (what is left there is what the plan dropped).
pub(super) fn take_planned(current: &mut [Option<Listener>], plan: Vec<Planned>) -> Vec<Listener> {
    plan.into_iter()
        .filter_map(|p| match p {
            Planned::Kept(i) => current.get_mut(i).and_then(Option::take),
            Planned::Bound(l) => Some(l),
        })
        .collect()
}
