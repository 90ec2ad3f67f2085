//! The supervisor loop, for both process models.
//!
//! The master is single-threaded and sleeps in one `poll` on the signal pipe
//! (plus, in fork mode, the listeners while it is under `max-children`),
//! with a timeout that is the nearest deadline. On each wake-up it drains
//! signals, acts on stop requests, reaps every exited child, then accepts
//! (fork) or refills the pool (prefork). Like nginx's master cycle, the order
//! is fixed, and handlers only set flags.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, pipe2, Pid};

use crate::accept::Acceptor;
use crate::access::Policy;
use crate::children::{
    classify, describe, Backoff, Child, Children, Exit, Role, EXIT_SETUP, QUICK_DEATH,
};
use crate::config::{self, Config, LogTarget, Mode, Options, MAX_WORKERS_LIMIT};
use crate::daemon::{Identity, PidFile, ReadyPipe};
use crate::listen::{self, Listener};
use crate::logging::RateLimit;
use crate::pool::{self, Pool, Saturation};
use crate::reload::{self, Planned};
use crate::scoreboard::{Entry, Refusal, Scoreboard, State};
use crate::signals::{self, Signals};
use crate::sys::IoBuffer;
use crate::systemd::Notify;
use crate::time::after;
use crate::{sys, worker};

/// fork mode: connections accepted per wakeup. Under steady load the
/// backlog never empties, and without a bound the master would fork until
/// max-children while the children that already finished wait, unreaped,
/// for it to look at SIGCHLD again.
const ACCEPT_BATCH: u32 = 16;
/// Repeated warnings (limits, accept or fork errors) are logged this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long a new generation of workers may take to become ready, at
/// startup or on reload.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the master looks at the pool and the refusal counters even
/// when nothing woke it.
const TICK: Duration = Duration::from_secs(1);
/// The most workers the USR1 line names one by one.
const NAMED_WORKERS: usize = 64;

/// What startup hands to the master besides the configuration and the
/// listeners. Children drop all of it right after fork.
pub struct Handoff {
    /// Locked for the master's life, removed when it exits.
    pub pidfile: Option<PidFile>,
    /// Detached: the launcher waits on this for "ready".
    pub ready: Option<ReadyPipe>,
    /// systemd's notification socket.
    pub notify: Option<Notify>,
}

/// Where the configuration came from, to read it again on SIGHUP.
pub struct Source {
    /// The command line, whose flags win over the file.
    pub cli: Options,
    /// The directory relative paths are taken from.
    pub base: PathBuf,
    /// The listeners were passed by the service manager: a reload keeps
    /// them and binds nothing.
    pub activated: bool,
}

/// Runs the master until it is stopped; returns the exit status.
pub fn run(
    cfg: Config,
    listeners: Vec<Listener>,
    identity: Identity,
    handoff: Handoff,
    source: Source,
) -> i32 {
    let fail = |what: &str, e: std::io::Error| {
        error!("cannot create {what}: {}", crate::error_text(&e));
        1
    };
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => return fail("the signal handlers", e),
    };
    let (ctl_r, ctl_w) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => return fail("the control pipe", e.into()),
    };
    let (notice_r, notice_w) = match pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
        Ok(p) => p,
        Err(e) => return fail("the notice pipe", e.into()),
    };
    // Two generations of a full pool may overlap during a reload.
    let scoreboard = match Scoreboard::new(2 * MAX_WORKERS_LIMIT as usize, seed()) {
        Ok(s) => s,
        Err(e) => return fail("the scoreboard", e),
    };
    // The master holds one descriptor per worker, and a reload may run
    // two full generations at once.
    if let Err(e) = crate::daemon::ensure_nofile(nofile_need(&cfg, listeners.len()), "max-workers")
    {
        warn!("{e}");
    }
    let now = Instant::now();
    let policy = cfg.policy();
    let mut master = Master {
        pid: getpid(),
        identity,
        handoff,
        source,
        cfg,
        acceptor: Acceptor::new(listeners),
        signals: Some(signals),
        ctl_r,
        conn_buf: None,
        ctl_w: Some(ctl_w),
        notice_r: Some(notice_r),
        notice_w: Some(notice_w),
        scoreboard,
        children: Children::default(),
        backoff: Backoff::default(),
        started: now,
        generation: 1,
        pending: None,
        hup_deferred: false,
        unannounced: Some(now + READY_TIMEOUT),
        exit_code: 0,
        stop_deadline: None,
        killed: false,
        accepted: 0,
        served_by_gone: 0,
        policy,
        per_ip: HashMap::new(),
        pool: Pool::default(),
        max_hits: 0,
        at_max: RateLimit::new(REPORT_EVERY),
        next_tick: now + TICK,
        reported: [0; 3],
        last_report: None,
        saturation: Saturation::new(REPORT_EVERY),
        errors: RateLimit::new(REPORT_EVERY),
        crash_reports: RateLimit::new(REPORT_EVERY),
        seed: seed(),
    };
    master.run()
}

/// A reload under way: the new generation is starting and the old one
/// still serves.
struct Pending {
    generation: u32,
    cfg: Config,
    identity: Identity,
    /// The new listener set, in the new configuration's order.
    plan: Vec<Planned>,
    /// When the reload is abandoned if the new workers are not all ready.
    deadline: Instant,
}

struct Master {
    pid: Pid,
    /// Who children run as.
    identity: Identity,
    handoff: Handoff,
    source: Source,
    cfg: Config,
    /// The listeners in force, and (fork mode) accepting from them.
    acceptor: Acceptor,
    /// `None` only in a child, after it closed the self-pipe.
    signals: Option<Signals>,
    /// fork mode's control pipe: children hold the read end; the master
    /// holds the only write end, and closing it tells them to stop. Each
    /// prefork worker has a pipe of its own (in `children`).
    ctl_r: OwnedFd,
    /// fork mode: the children's buffer, mapped once and never touched here,
    /// so each child writes only its own zero-filled pages.
    conn_buf: Option<IoBuffer>,
    ctl_w: Option<OwnedFd>,
    /// Workers write a byte here once they are ready.
    notice_r: Option<OwnedFd>,
    notice_w: Option<OwnedFd>,
    scoreboard: Scoreboard,
    children: Children,
    backoff: Backoff,
    started: Instant,
    /// The configuration in force is the n-th one (1 at startup).
    generation: u32,
    pending: Option<Pending>,
    /// A SIGHUP arrived while a reload or the startup was under way.
    hup_deferred: bool,
    /// Until "ready" is announced: when startup is given up.
    unannounced: Option<Instant>,
    exit_code: i32,
    /// Set once a stop began: when the remaining children are killed.
    stop_deadline: Option<Instant>,
    killed: bool,
    /// fork mode: connections handed to a child.
    accepted: u64,
    /// prefork: connections served by workers that have exited.
    served_by_gone: u64,
    /// fork mode: the client checks the master makes before forking.
    policy: Policy,
    /// fork mode: children serving each client address (max-per-ip).
    per_ip: HashMap<u128, u32>,
    /// prefork: the spare policy's state.
    pool: Pool,
    max_hits: u64,
    at_max: RateLimit,
    next_tick: Instant,
    /// Refusal counts as last logged, and when.
    reported: [u64; 3],
    last_report: Option<Instant>,
    /// fork mode: `max-children` reached, counted and reported.
    saturation: Saturation,
    errors: RateLimit,
    /// Escalations of the crash-loop back-off after the first.
    crash_reports: RateLimit,
    seed: u64,
}

impl Master {
    fn run(&mut self) -> i32 {
        let now = Instant::now();
        self.fill_pool(now);
        self.progress(now);
        loop {
            let (noticed, ready) = self.wait();
            let now = Instant::now();
            if noticed {
                self.drain_notices();
            }
            let p = match self.signals.as_mut() {
                Some(s) => s.drain(),
                None => return 1,
            };
            if p.quit {
                self.stop(now, true, "SIGQUIT");
            }
            if p.term || p.int {
                // A second TERM/INT during a graceful stop makes it immediate.
                let again = self.stop_deadline.is_some();
                self.stop(now, again, if p.term { "SIGTERM" } else { "SIGINT" });
            }
            if p.chld {
                self.reap(now);
            }
            if p.hup {
                self.hup(now);
            }
            if p.usr1 {
                self.status(now);
            }
            if p.ttin {
                self.resize(true, now);
            }
            if p.ttou {
                self.resize(false, now);
            }
            match self.stop_deadline {
                None => {
                    self.progress(now);
                    self.kill_overdue(now);
                    self.check_probes(now);
                    if self.cfg.mode == Mode::Fork {
                        // Only when a listener is readable: no EAGAIN per wake-up.
                        if ready.contains(&true) {
                            self.accept(now);
                        }
                        self.watch_limit(now);
                    }
                    self.fill_pool(now);
                    self.maintain(now);
                    self.tick(now);
                }
                Some(_) if self.children.is_empty() => break,
                Some(deadline) if now >= deadline && !self.killed => {
                    warn!(
                        "shutdown timeout ({} s) reached: killing {} children",
                        self.cfg.shutdown_timeout.as_secs(),
                        self.children.len()
                    );
                    self.kill_all();
                }
                Some(_) => {}
            }
        }
        info!("exiting");
        self.exit_code
    }

    /// Sleeps until a signal, a worker's notice, a listener (fork mode,
    /// under the limit) or the nearest deadline. Returns whether a notice
    /// came, and which listeners are readable.
    fn wait(&self) -> (bool, Vec<bool>) {
        let now = Instant::now();
        let serving = self.serving();
        let accepting = self.cfg.mode == Mode::Fork
            && self.stop_deadline.is_none()
            && self.acceptor.paused_until(now).is_none()
            // Crash-loop back-off: clients wait in the backlog rather than
            // meet a child that fails to start.
            && self.backoff.hold_until(now, serving).is_none()
            // Like tcpserver -c: at the limit we stop polling the listeners
            // and new clients wait in the kernel's backlog.
            && self.children.len() < self.cfg.max_children as usize;
        let (Some(signals), Some(notice)) = (&self.signals, &self.notice_r) else {
            return (false, Vec::new());
        };
        let listeners = self.acceptor.listeners();
        let mut fds = Vec::with_capacity(2 + listeners.len());
        fds.push(PollFd::new(signals.fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(notice.as_fd(), PollFlags::POLLIN));
        if accepting {
            fds.extend(
                listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
        }
        let running = self.stop_deadline.is_none();
        let deadlines = [
            self.stop_deadline.filter(|_| !self.killed),
            self.acceptor.paused_until(now).filter(|_| running),
            self.backoff.hold_until(now, serving).filter(|_| running),
            self.probe_deadline(now).filter(|_| running),
            self.children.next_deadline().filter(|_| running),
            self.pending.as_ref().map(|p| p.deadline),
            self.unannounced.filter(|_| running),
            Some(self.next_tick).filter(|_| running),
        ];
        let timeout = deadlines
            .iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now));
        match poll(&mut fds, crate::time::poll_timeout(timeout)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => warn!("poll failed: {e}"),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        (ready(&fds[1]), fds[2..].iter().map(ready).collect())
    }

    /// Empties the notice pipe; what the workers said is in the scoreboard.
    fn drain_notices(&self) {
        if let Some(fd) = &self.notice_r {
            // A short read means the pipe is empty.
            let mut sink = [0u8; 256];
            while matches!(nix::unistd::read(fd, &mut sink), Ok(n) if n == sink.len()) {}
        }
    }

    /// In a child right after fork: drops what only the master may hold,
    /// above all every control pipe's write end (or a worker would keep its
    /// siblings from ever seeing "stop").
    /// Nothing here is freed: a child that frees writes the allocator's
    /// metadata, and each heap page so written is copied from the master.
    fn close_in_child(&mut self) {
        crate::logging::forked();
        Listener::close_all_in_child(&mut self.acceptor.take());
        if let Some(p) = self.pending.take() {
            let mut plan = p.plan;
            for planned in plan.drain(..) {
                if let Planned::Bound(l) = planned {
                    l.close_in_child();
                }
            }
            std::mem::forget((plan, p.cfg, p.identity));
        }
        if let Some(s) = self.signals.take() {
            s.close_in_child();
        }
        self.ctl_w = None;
        std::mem::take(&mut self.children).close_in_child();
        self.notice_r = None;
        if let Some(ready) = self.handoff.ready.take() {
            ready.close_in_child();
        }
        if let Some(p) = self.handoff.pidfile.take() {
            p.close_in_child();
        }
        self.handoff.notify = None;
    }

    /// In a fork-mode child right after fork: drop the master's fds, then
    /// its privileges. Err is the exit code.
    fn enter_child(&mut self) -> Result<(), i32> {
        self.close_in_child();
        self.notice_w = None;
        enter(&self.identity, &self.scoreboard)
    }

    fn notify(&self, msg: &str) {
        if let Some(n) = &self.handoff.notify {
            n.send(msg);
        }
    }

    /// Announces readiness, completes or abandons a reload, and starts a
    /// reload that had to wait, as the workers' states allow.
    fn progress(&mut self, now: Instant) {
        if let Some(deadline) = self.unannounced {
            if self.cfg.mode == Mode::Fork
                || self.ready_workers(self.generation) >= self.cfg.workers as usize
            {
                self.unannounced = None;
                info!("ready");
                self.notify(&format!("READY=1\nSTATUS={}", self.status_text(now)));
                if let Some(ready) = self.handoff.ready.take() {
                    ready.ready();
                }
            } else if now >= deadline {
                self.fatal(
                    now,
                    &format!(
                        "the workers did not become ready within {} s",
                        READY_TIMEOUT.as_secs()
                    ),
                );
                return;
            }
        }
        if let Some(p) = &self.pending {
            if p.cfg.mode == Mode::Fork
                || self.ready_workers(p.generation) >= p.cfg.workers as usize
            {
                self.commit(now);
            } else if now >= p.deadline {
                self.abandon(&format!(
                    "the new workers did not become ready within {} s",
                    READY_TIMEOUT.as_secs()
                ));
            }
        }
        if self.hup_deferred && self.pending.is_none() && self.unannounced.is_none() {
            self.hup_deferred = false;
            self.reload(now);
        }
    }

    /// The active workers of `generation`, with what their slots say.
    fn pool_of(&self, generation: u32) -> impl Iterator<Item = (Pid, Option<Entry>)> + '_ {
        self.children
            .iter()
            .filter(move |(_, c)| c.active() && c.generation == generation)
            .map(|(pid, c)| (pid, c.slot.and_then(|s| self.scoreboard.get(s))))
    }

    /// Workers of `generation` that are accepting or serving.
    fn ready_workers(&self, generation: u32) -> usize {
        self.pool_of(generation)
            .filter(|(_, e)| e.is_some_and(|e| matches!(e.state, State::Idle | State::Busy)))
            .count()
    }

    /// Startup failed after the master began: stop and exit 1.
    fn fatal(&mut self, now: Instant, why: &str) {
        error!("{why}; stopping");
        if self.handoff.ready.is_some() && self.cfg.log == LogTarget::Syslog {
            // The launcher is still waiting, and its stderr is still ours.
            crate::logging::say(why);
        }
        self.exit_code = 1;
        self.stop(now, true, "startup failed");
    }

    fn hup(&mut self, now: Instant) {
        if self.stop_deadline.is_some() {
            info!("SIGHUP ignored: stopping");
        } else if self.pending.is_some() || self.unannounced.is_some() {
            info!("SIGHUP: will reload once the workers being started are ready");
            self.hup_deferred = true;
        } else {
            self.reload(now);
        }
    }

    /// SIGHUP: reads the configuration again and, if it is valid, starts
    /// the new generation; the old one is retired once it is ready.
    fn reload(&mut self, now: Instant) {
        match &self.cfg.config_file {
            Some(f) => info!("SIGHUP: reloading {}", f.display()),
            None => info!("SIGHUP: reloading (no config file: restarting the workers)"),
        }
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::time::monotonic_usec()
        ));
        if let Err(e) = self.prepare(now) {
            self.abandon(&e);
        } else {
            self.progress(now);
        }
    }

    /// Validates the new configuration, binds its new listeners and forks
    /// its workers.
    fn prepare(&mut self, now: Instant) -> Result<(), String> {
        let mut cfg = config::load(self.source.cli.clone(), &self.source.base)?;
        for name in reload::keep_fixed(&self.cfg, &mut cfg) {
            warn!("{name} cannot change on reload; restart echo-forkd to change it");
        }
        let identity = Identity::resolve(
            cfg.user.as_deref(),
            cfg.group.as_deref(),
            cfg.chroot.as_deref(),
        )?;
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
        let workers = if cfg.mode == Mode::Prefork {
            cfg.workers
        } else {
            0
        };
        // Each new worker costs the master a descriptor until the old
        // generation is gone: check for room before forking any.
        let open = crate::sys::open_fds().unwrap_or(0);
        crate::daemon::ensure_nofile(open + u64::from(workers) + 8, "the reload")?;
        if let Err(e) = crate::daemon::ensure_nofile(nofile_need(&cfg, plan.len()), "max-workers") {
            warn!("{e}");
        }
        self.pending = Some(Pending {
            generation: self.generation + 1,
            cfg,
            identity,
            plan,
            deadline: now + READY_TIMEOUT,
        });
        for _ in 0..workers {
            self.spawn_worker(true, now)
                .map_err(|e| format!("cannot fork a new worker: {e}"))?;
        }
        Ok(())
    }

    /// The new generation is ready: switch to its listeners and settings,
    /// and tell the old workers to stop accepting.
    fn commit(&mut self, now: Instant) {
        let Some(p) = self.pending.take() else {
            return;
        };
        let mut current: Vec<Option<Listener>> =
            self.acceptor.take().into_iter().map(Some).collect();
        self.acceptor = Acceptor::new(take_planned(&mut current, p.plan));
        for l in current.into_iter().flatten() {
            info!("no longer listening on {}", l.name());
        }
        let opts = p.cfg.bind_options(p.identity.socket_group());
        if opts != self.cfg.bind_options(self.identity.socket_group()) {
            for l in self.acceptor.listeners() {
                if let Err(e) = l.set_backlog(opts.backlog).and(l.set_permissions(&opts)) {
                    warn!("{e}");
                }
            }
        }
        let generation = p.generation;
        let retiring = self
            .children
            .retire_where(after(now, p.cfg.shutdown_timeout), |g| g < generation);
        self.generation = generation;
        self.cfg = p.cfg;
        self.identity = p.identity;
        self.policy = self.cfg.policy();
        log::set_max_level(self.cfg.log_level.filter());
        info!("reloaded: generation {generation} serves; {retiring} old workers retiring");
        self.notify(&format!("READY=1\nSTATUS={}", self.status_text(now)));
    }

    /// Gives up a reload: the new workers (if any) are retired and the
    /// configuration in force stays.
    fn abandon(&mut self, why: &str) {
        error!("reload failed: {why}; the configuration in force is unchanged");
        let now = Instant::now();
        if let Some(p) = self.pending.take() {
            self.children
                .retire_where(after(now, self.cfg.shutdown_timeout), |g| g == p.generation);
        }
        self.notify(&format!("READY=1\nSTATUS={}", self.status_text(now)));
    }

    /// SIGTTIN/SIGTTOU: moves the pool's floor by one; TTOU also retires
    /// one worker (an idle one if there is one) while above the floor.
    fn resize(&mut self, up: bool, now: Instant) {
        let sig = if up { "SIGTTIN" } else { "SIGTTOU" };
        if self.cfg.mode != Mode::Prefork {
            warn!("{sig} ignored: the pool size applies to prefork mode only");
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
            if !up && self.children.active(self.generation) > new as usize {
                self.retire_one(now, "SIGTTOU");
            }
        }
    }

    /// prefork: forks workers until the pool is at its size, unless crash-loop
    /// back-off holds spawning back. During a reload the new generation's
    /// pool is kept full too (its workers may recycle before it takes over).
    fn fill_pool(&mut self, now: Instant) {
        for next in [false, true] {
            let (generation, size) = match (next, &self.pending) {
                (false, _) if self.cfg.mode == Mode::Prefork => (self.generation, self.cfg.workers),
                (true, Some(p)) if p.cfg.mode == Mode::Prefork => (p.generation, p.cfg.workers),
                _ => continue,
            };
            while self.children.active(generation) < size as usize {
                if !self.try_spawn(next, now) {
                    break;
                }
            }
        }
    }

    /// Starts a worker unless crash-loop back-off holds spawning back; a
    /// failed fork starts (or grows) the back-off. False: none started.
    fn try_spawn(&mut self, next: bool, now: Instant) -> bool {
        if self.backoff.hold_until(now, self.serving()).is_some() {
            return false;
        }
        match self.spawn_worker(next, now) {
            Ok(_) => {
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                self.backoff.fork_failed(now);
                let wait = self.respawn_wait(now);
                if let Some(more) = self.errors.hit(now) {
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
    fn serving(&self) -> bool {
        self.cfg.mode == Mode::Prefork && self.ready_workers(self.generation) > 0
    }

    /// How long until the next child may be started.
    fn respawn_wait(&self, now: Instant) -> Duration {
        self.backoff
            .hold_until(now, self.serving())
            .map_or(Duration::ZERO, |t| t - now)
    }

    /// The probes started during a crash-loop back-off that are alive and
    /// may yet prove healthy: (started, proved so far).
    fn probes(&self) -> impl Iterator<Item = (Instant, bool)> + '_ {
        let since = self.backoff.probes_since();
        self.children
            .iter()
            .filter(move |(_, c)| since.is_some_and(|t| c.started >= t) && c.retire_by.is_none())
            .map(|(_, c)| {
                let ready = match c.role {
                    Role::Conn => true,
                    Role::Worker => c
                        .slot
                        .and_then(|s| self.scoreboard.get(s))
                        .is_some_and(|e| matches!(e.state, State::Idle | State::Busy)),
                };
                (c.started, ready)
            })
    }

    /// When a probe alive now will have lived long enough to prove healthy.
    fn probe_deadline(&self, now: Instant) -> Option<Instant> {
        self.probes()
            .map(|(started, _)| started + QUICK_DEATH)
            .filter(|&t| t > now)
            .min()
    }

    /// Ends a crash-loop back-off once a probe has been ready (a fork-mode
    /// child: alive) for [`QUICK_DEATH`].
    fn check_probes(&mut self, now: Instant) {
        if self.backoff.is_active()
            && self
                .probes()
                .any(|(started, ready)| ready && now >= started + QUICK_DEATH)
        {
            self.recovered();
        }
    }

    fn recovered(&mut self) {
        if let Some(deaths) = self.backoff.healthy() {
            info!("children start normally again: crash-loop back-off over after {deaths} early deaths");
        }
    }

    /// prefork: the spare policy (pool.rs) for the generation in force:
    /// starts workers in bursts when idle ones run short, retires one a
    /// second when there are too many, and arms the workers' wake-up.
    fn maintain(&mut self, now: Instant) {
        if self.cfg.mode != Mode::Prefork {
            self.scoreboard.set_wake_below(0);
            return;
        }
        let (mut idle, mut starting, mut total) = (0u32, 0u32, 0u32);
        for (_, e) in self.pool_of(self.generation) {
            total += 1;
            match e.map(|e| e.state) {
                Some(State::Idle) => idle += 1,
                Some(State::Starting) => starting += 1,
                _ => {}
            }
        }
        let bounds = pool::Bounds {
            workers: self.cfg.workers,
            max_workers: self.cfg.max_workers,
            min_spare: self.cfg.min_spare,
            max_spare: self.cfg.max_spare,
        };
        let waiting = if idle + starting == 0 {
            self.acceptor
                .listeners()
                .iter()
                .map(Listener::queued)
                .try_fold(0u32, |sum, n| Some(sum.saturating_add(n?)))
        } else {
            Some(0)
        };
        match self
            .pool
            .decide(now, (idle, starting), total, waiting, bounds)
        {
            pool::Action::Nothing => {}
            pool::Action::Spawn(n) => {
                debug!(
                    "{idle} idle workers (min-spare {}), {} clients waiting: starting {n}",
                    bounds.min_spare,
                    waiting.map_or("some".into(), |w| w.to_string())
                );
                for _ in 0..n {
                    if !self.try_spawn(false, now) {
                        break;
                    }
                }
            }
            pool::Action::Retire => self.retire_one(now, "more than max-spare idle"),
            pool::Action::AtMax => {
                self.max_hits += 1;
                if let Some(more) = self.at_max.hit(now) {
                    warn!(
                        "max-workers ({}) reached: all busy, new clients wait in the backlog ({} times, {more} since the last report)",
                        bounds.max_workers, self.max_hits
                    );
                }
            }
        }
        let total = self.children.active(self.generation) as u32;
        let arm = total < bounds.max_workers;
        self.scoreboard
            .set_wake_below(if arm { bounds.min_spare } else { 0 });
    }

    /// Retires one worker of the generation in force: the one idle the
    /// longest, else one still starting, else a busy one (it finishes its
    /// connection first).
    fn retire_one(&mut self, now: Instant, why: &str) {
        let rank = |s: Option<Entry>| match s {
            Some(e) if e.state == State::Idle => (0, e.since_ms),
            Some(e) if e.state == State::Starting => (1, 0),
            _ => (2, 0),
        };
        let victim = self
            .pool_of(self.generation)
            .map(|(pid, e)| (rank(e), pid))
            .min()
            .map(|(_, pid)| pid);
        if let Some(pid) = victim {
            if self
                .children
                .retire(pid, after(now, self.cfg.shutdown_timeout))
            {
                info!("worker {pid} retiring ({why})");
            }
        }
    }

    /// fork mode: checks a client before a child is forked for it.
    fn admit(&mut self, key: u128) -> Option<Refusal> {
        if let Some(why) = self.scoreboard.screen(&self.policy, key) {
            Some(why)
        } else if self.policy.max_per_ip > 0
            && self.per_ip.get(&key).copied().unwrap_or(0) >= self.policy.max_per_ip
        {
            Some(Refusal::PerIp)
        } else {
            None
        }
    }

    fn release_peer(&mut self, key: u128) {
        if let Some(n) = self.per_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&key);
            }
        }
    }

    /// Once a second: logs refused connections (counted by whoever
    /// refused them), at most every REPORT_EVERY, never dropping a count.
    fn tick(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        let counts = self.scoreboard.refusals();
        if counts != self.reported && self.last_report.is_none_or(|t| now >= t + REPORT_EVERY) {
            for (i, why) in Refusal::ALL.iter().enumerate() {
                let new = counts[i] - self.reported[i];
                if new > 0 {
                    warn!(
                        "refused {new} connections ({}) since the last report; {} in all",
                        why.name(),
                        counts[i]
                    );
                }
            }
            self.reported = counts;
            self.last_report = Some(now);
        }
    }

    /// Forks one worker of the configuration in force, or (`next`) of the
    /// one a reload is starting. Err says why not.
    fn spawn_worker(&mut self, next: bool, now: Instant) -> Result<Pid, String> {
        let (generation, cfg, identity) = match (&self.pending, next) {
            (Some(p), true) => (p.generation, &p.cfg, p.identity.clone()),
            _ => (self.generation, &self.cfg, self.identity.clone()),
        };
        let limits = cfg.limits();
        let policy = cfg.policy();
        let max_requests =
            pool::max_requests(cfg.max_requests, cfg.max_requests_jitter, &mut self.seed);
        let Some(slot) = self.scoreboard.claim(generation) else {
            return Err("every scoreboard slot is taken".into());
        };
        let (ctl_r, ctl_w) = match pipe2(OFlag::O_CLOEXEC) {
            Ok(p) => p,
            Err(e) => {
                self.scoreboard.release(slot);
                let hint = if matches!(e, Errno::EMFILE | Errno::ENFILE) {
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
        let mut ctl_w = Some(ctl_w);
        let master = self.pid;
        let forked = sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, || {
            drop(ctl_w.take());
            let listeners = self.take_listeners(next);
            self.close_in_child();
            if let Err(code) = enter(&identity, &self.scoreboard) {
                return code;
            }
            let ctx = worker::Ctx {
                ctl: ctl_r.as_fd(),
                master,
                limits,
                policy,
                slot: Some(self.scoreboard.slot(slot)),
                notice: self.notice_w.as_ref().map(|f| f.as_fd()),
            };
            worker::prefork(listeners, ctx, max_requests)
        });
        match forked {
            Ok(pid) => {
                self.scoreboard.set_pid(slot, pid);
                let mut child = Child::new(Role::Worker, now);
                child.generation = generation;
                child.slot = Some(slot);
                child.ctl = ctl_w;
                self.children.insert(pid, child);
                info!("worker {pid} started");
                Ok(pid)
            }
            Err(e) => {
                self.scoreboard.release(slot);
                Err(crate::error_text(&e))
            }
        }
    }

    /// The listeners of the configuration in force, or (`next`) of the one
    /// a reload is starting; the master's list is left empty.
    fn take_listeners(&mut self, next: bool) -> Vec<Listener> {
        let current = self.acceptor.take();
        match (self.pending.as_mut(), next) {
            (Some(p), true) => {
                let mut current: Vec<Option<Listener>> = current.into_iter().map(Some).collect();
                take_planned(&mut current, std::mem::take(&mut p.plan))
            }
            _ => current,
        }
    }

    /// fork mode: accepts (in fair rotation over the listeners) and forks
    /// a child per connection, until none waits, the limit or a pause is
    /// reached, or [`ACCEPT_BATCH`] were taken.
    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if self.children.len() >= self.cfg.max_children as usize
                || self.backoff.hold_until(now, false).is_some()
            {
                return;
            }
            let Some((i, conn)) = self.acceptor.accept(now) else {
                return;
            };
            let tcp = self.acceptor.listeners()[i].is_tcp();
            if !self.fork_for(conn, tcp, now) {
                return;
            }
        }
    }

    /// Forks the child that serves `conn`, unless its client is refused
    /// (closed at once, unread); false when fork failed.
    fn fork_for(&mut self, conn: OwnedFd, tcp: bool, now: Instant) -> bool {
        let peer = if tcp && !self.policy.is_open() {
            worker::peer_key(&conn)
        } else {
            None
        };
        if let Some(key) = peer {
            if let Some(why) = self.admit(key) {
                self.scoreboard.refused(why);
                return true;
            }
        }
        let master = self.pid;
        let limits = self.cfg.limits();
        if self.conn_buf.is_none() {
            self.conn_buf = worker::buffer();
        }
        let forked = sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, || {
            if let Err(code) = self.enter_child() {
                return code;
            }
            let ctx = worker::Ctx {
                ctl: self.ctl_r.as_fd(),
                master,
                limits,
                policy: Policy::default(),
                slot: None,
                notice: None,
            };
            worker::fork_child(conn, tcp, ctx, self.conn_buf.as_mut())
        });
        // The connection now belongs to the child; the closure (and with it
        // the master's copy of the socket) was dropped here.
        match forked {
            Ok(pid) => {
                let mut child = Child::new(Role::Conn, now);
                if self.policy.max_per_ip > 0 {
                    child.peer = peer;
                    if let Some(key) = peer {
                        *self.per_ip.entry(key).or_insert(0) += 1;
                    }
                }
                self.children.insert(pid, child);
                self.accepted += 1;
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                self.acceptor.pause_for_a_while(now);
                if let Some(more) = self.errors.hit(now) {
                    error!(
                        "cannot fork for a connection: {}; connection closed, pausing {} ms ({more} more since the last report)",
                        crate::error_text(&e),
                        crate::accept::PAUSE.as_millis()
                    );
                }
                false
            }
        }
    }

    /// fork mode: like tcpserver -c, at `max-children` the master stops
    /// polling the listeners and clients wait in the backlog; counted, and
    /// logged when it happens and every [`REPORT_EVERY`] while clients wait.
    fn watch_limit(&mut self, now: Instant) {
        let full = self.children.len() >= self.cfg.max_children as usize;
        let listeners = self.acceptor.listeners();
        let waiting = || listeners.iter().map(Listener::waiting).sum::<u32>();
        let report = self.saturation.observe(now, full, || waiting() > 0);
        let max = self.cfg.max_children;
        match report {
            Some(pool::Report::Reached { unreported }) => warn!(
                "max-children ({max}) reached: not accepting, new clients wait in the backlog ({} times, {unreported} more since the last report)",
                self.saturation.hits
            ),
            Some(pool::Report::Held(d)) => warn!(
                "max-children ({max}) reached {} s ago: {} clients wait in the backlog",
                d.as_secs(),
                waiting()
            ),
            None => {}
        }
    }

    /// Reaps every exited child: one SIGCHLD may stand for many exits.
    fn reap(&mut self, now: Instant) {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    return;
                }
            };
            let Some(pid) = status.pid() else { continue };
            let Some(child) = self.children.remove(pid) else {
                continue;
            };
            if let Some(key) = child.peer {
                self.release_peer(key);
            }
            let last = child.slot.and_then(|s| self.scoreboard.release(s));
            self.served_by_gone += last.map_or(0, |e| e.served);
            let never_ready = last.is_some_and(|e| e.state == State::Starting);
            let (abnormal, how) = describe(&status);
            let stopping = self.stop_deadline.is_some();
            let pending = self.pending.as_ref().map(|p| p.generation);
            match child.role {
                Role::Worker if child.killed || stopping => debug!("worker {pid} {how}"),
                Role::Worker if child.retire_by.is_some() => {
                    if abnormal {
                        warn!("retiring worker {pid} {how}");
                    } else {
                        info!("worker {pid} {how}");
                    }
                }
                Role::Worker if never_ready && pending == Some(child.generation) => {
                    self.abandon(&format!("new worker {pid} {how} before it was ready"));
                }
                Role::Worker
                    if never_ready
                        && self.unannounced.is_some()
                        && child.generation == self.generation =>
                {
                    self.fatal(now, &format!("worker {pid} {how} before it was ready"));
                }
                Role::Conn if self.killed => debug!("child {pid} {how}"),
                role => {
                    let lived = now.duration_since(child.started);
                    let exit = classify(&status, role, lived, !never_ready);
                    self.note_exit(pid, &child, exit, &how, now);
                }
            }
        }
    }

    /// Logs how a child of the generation in force ended, and feeds the
    /// crash-loop protection: early deaths may hold spawning back (logged
    /// once when it starts, then rate-limited), a probe that exits cleanly
    /// ends it.
    fn note_exit(&mut self, pid: Pid, child: &Child, exit: Exit, how: &str, now: Instant) {
        let who = match child.role {
            Role::Worker => "worker",
            Role::Conn => "child",
        };
        let probe = self
            .backoff
            .probes_since()
            .is_some_and(|t| child.started >= t);
        match exit {
            Exit::Clean => {
                if child.role == Role::Worker {
                    info!("worker {pid} {how}");
                } else {
                    debug!("child {pid} {how}");
                }
                if probe {
                    self.recovered();
                }
            }
            Exit::Abnormal => warn!("{who} {pid} {how}"),
            Exit::FailedStart | Exit::DiedYoung => {
                let was_active = self.backoff.is_active();
                let escalated = self.backoff.early_death(now, child.started, exit);
                let when = if exit == Exit::FailedStart && child.role == Role::Worker {
                    "before it was ready"
                } else {
                    "right after it started"
                };
                let lived = now.duration_since(child.started).as_millis();
                let wait = self.respawn_wait(now).as_millis();
                match escalated {
                    Some(_) if !was_active => warn!(
                        "{who} {pid} {how} {lived} ms after it was forked, {when}: children are failing as they start; crash-loop back-off: one at a time, respawning in {wait} ms"
                    ),
                    Some(_) => match self.crash_reports.hit(now) {
                        Some(more) => warn!(
                            "children still fail as they start ({who} {pid} {how}, {when}); respawning in {wait} ms ({more} more early deaths since the last report)"
                        ),
                        None => debug!("{who} {pid} {how}, {when}; respawning in {wait} ms"),
                    },
                    None if was_active => debug!("{who} {pid} {how}, {when}"),
                    None => warn!("{who} {pid} {how}"),
                }
            }
        }
    }

    /// Kills workers that were told to stop but are still serving past
    /// their `shutdown-timeout`.
    fn kill_overdue(&mut self, now: Instant) {
        for pid in self.children.overdue(now) {
            warn!(
                "worker {pid} still busy {} s after it was told to stop: killing it",
                self.cfg.shutdown_timeout.as_secs()
            );
            let _ = kill(pid, Signal::SIGKILL);
            self.children.mark_killed(pid);
        }
    }

    /// Begins a stop: listeners are closed at once, children are told to
    /// stop accepting; `immediate` kills them instead of letting them finish.
    fn stop(&mut self, now: Instant, immediate: bool, why: &str) {
        if self.stop_deadline.is_none() {
            if immediate {
                info!("{why}: stopping now");
            } else {
                info!(
                    "{why}: stopping; open connections may continue for {} s",
                    self.cfg.shutdown_timeout.as_secs()
                );
            }
            // Closing our copies (and removing unix socket files) plus the
            // children closing theirs on their pipe's EOF refuses new clients.
            self.acceptor.close();
            self.pending = None;
            self.hup_deferred = false;
            self.ctl_w = None;
            let deadline = after(now, self.cfg.shutdown_timeout);
            self.children.retire_where(deadline, |_| true);
            self.stop_deadline = Some(deadline);
            self.notify("STOPPING=1\nSTATUS=stopping");
        }
        if immediate && !self.killed {
            self.kill_all();
        }
    }

    fn kill_all(&mut self) {
        for pid in self.children.pids() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        self.killed = true;
    }

    /// SIGUSR1: the status line, then every worker by pid and state.
    fn status(&self, now: Instant) {
        let text = self.status_text(now);
        info!("status: {text}");
        let mut workers: Vec<(Pid, String)> = self
            .children
            .iter()
            .filter(|(_, c)| c.role == Role::Worker)
            .filter_map(|(pid, c)| {
                let e = self.scoreboard.get(c.slot?)?;
                let retiring = if c.active() { "" } else { ", retiring" };
                Some((
                    pid,
                    format!(
                        "{pid} {} (generation {}, served {}{retiring})",
                        e.state.name(),
                        e.generation,
                        e.served
                    ),
                ))
            })
            .collect();
        if !workers.is_empty() {
            workers.sort();
            let more = workers.len().saturating_sub(NAMED_WORKERS);
            let named: Vec<String> = workers
                .into_iter()
                .take(NAMED_WORKERS)
                .map(|(_, w)| w)
                .collect();
            let more = if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            };
            info!("workers: {}{more}", named.join(", "));
        }
        self.notify(&format!("STATUS={text}"));
    }

    /// The USR1 line and systemd's STATUS=.
    fn status_text(&self, now: Instant) -> String {
        let uptime = now.duration_since(self.started).as_secs();
        let (mut busy, mut idle, mut other, mut served) = (0, 0, 0, self.served_by_gone);
        for (_, c) in self.children.iter() {
            if let Some(e) = c.slot.and_then(|s| self.scoreboard.get(s)) {
                served += e.served;
                match e.state {
                    State::Busy => busy += 1,
                    State::Idle if c.active() => idle += 1,
                    _ => other += 1,
                }
            }
        }
        let starting = if other > 0 {
            format!(", starting or stopping {other}")
        } else {
            String::new()
        };
        let refused = self.scoreboard.refusals();
        let refused = if refused.iter().any(|&n| n > 0) {
            let parts: Vec<String> = Refusal::ALL
                .iter()
                .zip(refused)
                .map(|(r, n)| format!("{} {n}", r.name()))
                .collect();
            format!(", refused ({})", parts.join(", "))
        } else {
            String::new()
        };
        match self.cfg.mode {
            Mode::Prefork => format!(
                "mode prefork, generation {}, workers {} (busy {busy}, idle {idle}{starting}; floor {}, max {}, max reached {} times), connections served {served}{refused}, uptime {uptime} s",
                self.generation,
                self.children.workers(),
                self.cfg.workers,
                self.cfg.max_workers,
                self.max_hits
            ),
            Mode::Fork => format!(
                "mode fork, generation {}, children {} of at most {}, connections {}, limit reached {} times{refused}, uptime {uptime} s",
                self.generation,
                self.children.len() - self.children.workers(),
                self.cfg.max_children,
                self.accepted + served,
                self.saturation.hits
            ),
        }
    }
}

/// The descriptors the master may hold with `cfg` in force: its own (the
/// signal pipe and its writers, notice and control pipes, log and notify
/// sockets, pidfile: under 32), the listeners of two configurations, and
/// one control pipe per worker of two full generations.
fn nofile_need(cfg: &Config, listeners: usize) -> u64 {
    let workers = match cfg.mode {
        Mode::Prefork => u64::from(cfg.max_workers),
        Mode::Fork => 0,
    };
    32 + 2 * listeners as u64 + 2 * workers
}

/// In a child: drops privileges as `identity` says; Err is the exit code.
/// A failure is logged at most once per [`REPORT_EVERY`] across all
/// children, as in a crash loop every child fails for the same reason.
fn enter(identity: &Identity, board: &Scoreboard) -> Result<(), i32> {
    identity.enter().map_err(|e| {
        if let Some(more) = board.setup_failure_report(REPORT_EVERY) {
            let more = if more > 0 {
                format!(" ({more} more children failed so since the last report)")
            } else {
                String::new()
            };
            error!("cannot drop privileges: {e}{more}");
        }
        EXIT_SETUP
    })
}

/// Builds a listener set from a plan, taking kept listeners out of
/// `current` (what is left there is what the plan dropped).
fn take_planned(current: &mut [Option<Listener>], plan: Vec<Planned>) -> Vec<Listener> {
    plan.into_iter()
        .filter_map(|p| match p {
            Planned::Kept(i) => current.get_mut(i).and_then(Option::take),
            Planned::Bound(l) => Some(l),
        })
        .collect()
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}
