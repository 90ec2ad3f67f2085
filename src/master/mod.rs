//! The master: one supervisor for every process model.
//!
//! It is single-threaded and sleeps in one `poll` on the signal pipe and
//! the workers' notice pipe (plus, in fork mode, the listeners while it is
//! under `max-children`), with a timeout that is the nearest deadline. On
//! each wake-up it drains signals, acts on stop requests, reaps every
//! exited child, then accepts (fork) or tends the pool (prefork). Like
//! nginx's master cycle, the order is fixed, and handlers only set flags.
//!
//! Where the master is in its life (starting, serving, reloading,
//! checking an upgrade, stopping) is decided in `lifecycle`, pure and
//! unit-tested: the master tells it what happened ([`Event`]) and does
//! what it says ([`Action`], in [`Master::act`]); only the loop tells
//! it, handlers return the events they find. What a phase carries lives
//! in the phase (a stop's restart, the exit status) or beside it, owned
//! by the room that acts on it. Each concern has a room: `start` (what
//! the master makes or adopts at start), `generation` (SIGHUP: prepare,
//! commit or abandon a reload; what is under way), `workers` (the pool:
//! filling, spares, retiring, TTIN/TTOU), `spawn` (the one fork of a
//! child that serves), `fork` (accepting and forking per connection, the
//! max-children bound), `reap` (children's deaths and crash-loop
//! protection), `upgrade` (USR2), `stop`, `store` (systemd's fd store:
//! restart or stop, connections kept across a restart) and `status`
//! (USR1, STATUS=, periodic reports). This file holds the struct, the
//! loop, the wait, and the acting on the lifecycle's decisions.

mod fork;
mod generation;
mod helper;
mod kinds;
mod lifecycle;
mod reap;
mod relayed;
mod spawn;
mod start;
mod status;
mod stop;
mod store;
mod upgrade;
mod workers;

pub use start::run;
pub use upgrade::{take_inheritance, take_passed};

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};

use nix::unistd::Pid;

use crate::accept::Acceptor;
use crate::admission::Policy;
use crate::backoff::Backoff;
use crate::children::{Children, IndexPool};
use crate::config::{Config, Mode, Options, MAX_WORKERS_LIMIT};
use crate::daemon::{Identity, PidFile, ReadyPipe};
use crate::listen::Listener;
use crate::logging::{counted, RateLimit, REPORT_EVERY};
use crate::pool::{Pool, Saturation};
use crate::relay::Relay;
use crate::scoreboard::{Cut, Scoreboard};
use crate::signals::Signals;
use crate::sys::IoBuffer;
use crate::systemd::Notify;
use crate::time::after;

use generation::Underway;
use lifecycle::{Action, Event, Life};
use store::Kept;

/// How often the master looks at the pool and the refusal counters even
/// when nothing woke it.
const TICK: Duration = Duration::from_secs(1);

/// The master's estate: what startup gives it to hold for its life,
/// besides the configuration and the listeners (a USR2 successor gets it
/// through the inheritance, upgrade.rs). Children drop all of it right
/// after fork.
pub struct Estate {
    /// Locked for the master's life, removed when it exits.
    pub pidfile: Option<PidFile>,
    /// Detached: the launcher waits on this for "ready".
    pub ready: Option<ReadyPipe>,
    /// systemd's notification socket.
    pub notify: Option<Notify>,
    /// What systemd's file descriptor store kept besides the listeners.
    pub store: Stored,
}

/// What systemd's file descriptor store gave back at start, besides the
/// listeners taken for the configured addresses.
#[derive(Default)]
pub struct Stored {
    /// The vault's two ends (vault.rs), with the connections the last
    /// master left there for the workers.
    pub vault: Vec<OwnedFd>,
    /// Connections an earlier release stored one by one: name, what each
    /// carries (encoded), socket. They go into the vault, then out of the
    /// store.
    pub connections: Vec<(String, Vec<u8>, OwnedFd)>,
    /// The store names of listeners no longer configured: out of the store.
    pub stale: Vec<String>,
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
    /// The executable it was started from, made absolute at startup: what
    /// an upgrade (USR2) runs.
    pub exe: PathBuf,
    /// The arguments it was started with (not the program's name).
    pub args: Vec<std::ffi::OsString>,
}

/// Fork mode's state. It lives beside the pool's whatever the mode, as a
/// reload may switch between them.
struct ForkState {
    /// The control pipe: children hold the read end; the master holds the
    /// only write end, and closing it tells them to stop. (Each prefork
    /// worker has a pipe of its own, in `children`.)
    ctl_r: OwnedFd,
    ctl_w: Option<OwnedFd>,
    /// The children's buffer, mapped once and never touched here, so each
    /// child writes only its own zero-filled pages.
    conn_buf: Option<IoBuffer>,
    /// Connections handed to a child.
    accepted: u64,
    /// The client checks each child makes (the master accepts none).
    policy: Policy,
    /// Children forked to accept that have not said they took a
    /// connection yet, with their word in the fork table: while there
    /// are any, the master does not poll the listeners.
    in_flight: fork::InFlight,
    /// Where the next child forked to accept starts its round of the
    /// listeners.
    next_door: usize,
    /// `max-children` reached, counted and reported.
    saturation: Saturation,
    /// The children's words in the scoreboard's fork table, where each
    /// says it took its connection and publishes its client's place.
    slots: IndexPool,
}

/// The prefork pool's state.
struct PreforkState {
    /// The spare policy's state.
    pool: Pool,
    /// Connections served by workers that have exited.
    served_by_gone: u64,
    /// For each worker's share of `max-requests-jitter`.
    seed: u64,
    /// `max-workers` reached with every worker busy, counted and reported.
    at_max: RateLimit,
    /// When to look at spares again, short for what may be a moment.
    recheck: Option<Instant>,
    /// Idle workers take turns to wait for connections (turns.rs): the
    /// master names a leader when one dies leading, or when none leads.
    turns: bool,
    /// The pool could not be forked whole (a fork failed, or every slot
    /// is taken): a reload's new generation commits, and an upgraded
    /// master says it is ready, with the workers that are.
    fill_stuck: bool,
    /// Older generations' busy workers are still being told to hand
    /// over, a batch at a time (`retire_older`).
    retiring_older: bool,
    /// The pool's fill stopped at its share of one turn: the next turn
    /// comes at once.
    fill_more: bool,
}

/// When the master reports, and what it reported last.
struct Reports {
    /// When the daemon started (an upgrade keeps it).
    started: Instant,
    next_tick: Instant,
    /// Refused connections, by kind, as last logged.
    refused: status::Counted<4>,
    /// Dropped datagrams, by reason, as last logged.
    dropped: status::Counted<6>,
    /// Open connections cut, by why, as last logged.
    cut: status::Counted<4>,
    /// accept or fork errors.
    errors: RateLimit,
    /// Escalations of the crash-loop back-off after the first.
    crash: RateLimit,
    /// The figures of the last STATUS= (its line without the uptime).
    status_sent: String,
}

/// What the master sleeps on and talks to its workers through (the
/// wait, in this file).
struct Channels {
    /// `None` only in a child, after it closed the self-pipe.
    signals: Option<Signals>,
    /// Where retiring children hand their connections over (relay/);
    /// `None` only in a child, which took it.
    relay: Option<Relay>,
    /// Since when handed-over connections wait in the relay with none
    /// taken, and how many waited last (see `watch_relay`).
    relay_wait: Option<(Instant, u64)>,
    /// Workers write a byte here once they are ready.
    notice_r: Option<OwnedFd>,
    notice_w: Option<OwnedFd>,
}

/// The master's state, in declaration order (`repr(C)`): what a
/// fork-mode master writes on
/// every connection first, together, then what it only reads there. A
/// fork makes every page of the master copy-on-write, so each page of
/// it the master writes again costs a copy per connection: its hot
/// fields share as few pages as they can.
#[repr(C)]
struct Master {
    children: Children,
    /// The listeners in force, and (fork mode) accepting from them.
    acceptor: Acceptor,
    backoff: Backoff,
    fork: ForkState,
    chan: Channels,
    reports: Reports,
    /// The phase, the generation in force, the requests that wait, and
    /// at the end the exit status.
    life: Life,
    underway: Underway,
    pid: Pid,
    scoreboard: Scoreboard,
    /// Who children run as.
    identity: Identity,
    estate: Estate,
    source: Source,
    cfg: Config,
    kept: Kept,
    prefork: PreforkState,
}

impl Master {
    /// The master cycle, in a fixed order: wait, read the workers'
    /// notices and the signals, act on them, then tend the pool or accept
    /// while running, or finish the stop.
    fn run(&mut self) -> i32 {
        let now = Instant::now();
        if let Some(e) = &self.cfg.engine {
            info!("{}", e.line());
        }
        // The vault first: every worker inherits it.
        self.use_store(now);
        self.start_carrier(now);
        self.fill_pool(now);
        self.restore(now);
        for event in self.progress(now) {
            self.apply(event, now);
        }
        loop {
            let Woke {
                noticed,
                ready,
                relay_ready,
                piped,
                exited,
            } = self.wait();
            let now = Instant::now();
            if noticed {
                self.drain_notices();
            }
            if let Some(n) = &self.estate.notify {
                n.flush();
            }
            if self.restoring() {
                self.restore(now);
            }
            let Some(signals) = self.chan.signals.as_mut() else {
                return 1;
            };
            // Stops first, then deaths, then what waits for them.
            let p = signals.drain(piped, exited);
            for event in stops(&p) {
                self.apply(event, now);
            }
            if p.chld {
                for event in self.reap(now) {
                    self.apply(event, now);
                }
            }
            for event in requests(&p) {
                self.apply(event, now);
            }
            self.on_signals(&p, now);
            // For the metrics: fork-mode children are the busy ones.
            let accepting = self.fork.in_flight.len();
            self.scoreboard
                .set_fork_children(self.children.conns().saturating_sub(accepting));
            if !self.life.stopping() {
                // Readiness and reloads first: a commit puts the new
                // generation in force before the pool is tended.
                for event in self.progress(now) {
                    self.apply(event, now);
                }
                self.tend(now, ready, relay_ready);
            } else if self.children.is_empty() {
                // What waits in the relay goes with the rest.
                if self.life.restarting() {
                    self.put_back(now);
                }
                self.apply(Event::ChildrenGone, now);
            } else {
                self.apply(Event::Tick, now);
            }
            if let Some(code) = self.life.exited() {
                info!("exiting");
                if let Some(n) = &self.estate.notify {
                    n.flush_within(Duration::from_secs(2));
                }
                return code;
            }
        }
    }

    /// Tells the lifecycle what happened and does what it decides, in
    /// order; what the doing brings about (a reload that could not be
    /// prepared, say) is told next. Only `run` calls it: handlers return
    /// the events they find.
    fn apply(&mut self, event: Event, now: Instant) {
        // Empty, the queue allocates nothing: most events (a Tick on every
        // wake-up) bring nothing about.
        let mut events = std::collections::VecDeque::new();
        let mut next = Some(event);
        while let Some(event) = next {
            for action in self.life.on(event, now) {
                events.extend(self.act(action, now));
            }
            next = events.pop_front();
        }
    }

    /// Does one of the lifecycle's decisions; `Some` is what came of it.
    fn act(&mut self, action: Action, now: Instant) -> Option<Event> {
        match action {
            Action::AnnounceReady => {
                info!("ready");
                self.announce_ready(now);
                if let Some(ready) = self.estate.ready.take() {
                    ready.ready();
                }
            }
            Action::RetireUpgraded { old } => self.upgrade_done(now, old),
            Action::UpgradeFailed { old, why } => self.upgrade_failed(now, old, &why),
            Action::Fatal(why) => self.fatal(&why),
            Action::PrepareReload { next } => return self.reload(now, next),
            Action::Commit => self.commit(now),
            Action::Abandon(why) => self.abandon(&why),
            Action::DropReload => self.underway.pending = None,
            Action::StartCheck => return self.start_check(now),
            Action::EndCheck => self.end_check(),
            Action::RefuseUpgrade(why) => error!(
                "upgrade refused: {} {why}; the running code goes on",
                self.source.exe.display()
            ),
            Action::Exec => return self.exec(now),
            Action::ExecFailed(why) => {
                error!("upgrade failed: {why}; the running code goes on");
                self.announce_ready(now);
            }
            Action::Defer(sig) => {
                let what = if sig == "SIGHUP" { "reload" } else { "upgrade" };
                info!("{sig}: will {what} once what is under way is done");
            }
            Action::Ignore(sig) => info!("{sig} ignored: stopping"),
            Action::AskRestart => return self.ask_restart(),
            Action::BeginStop {
                why,
                immediate,
                restart,
            } => self.stop(now, why, immediate, restart),
            Action::StopNow(why) => {
                if !self.children.is_empty() {
                    info!(
                        "{why} again: the stop is now immediate; killing {}",
                        counted(self.children.len() as u64, "child", "children")
                    );
                }
                self.kill_all();
            }
            Action::KillAll => {
                let open = self.children.pids().map(|p| self.open_in(p)).sum();
                self.scoreboard.cut(Cut::Timeout, open);
                warn!(
                    "shutdown timeout ({} s) reached: killing {}, cutting {}",
                    self.cfg.shutdown_timeout.as_secs(),
                    counted(self.children.len() as u64, "child", "children"),
                    counted(open, "open connection", "open connections")
                );
                self.kill_all();
            }
            // The lifecycle keeps the status: `run` returns it.
            Action::Exit(_) => {}
        }
        None
    }

    /// Acts on the signals the lifecycle has no say in.
    fn on_signals(&mut self, p: &crate::signals::Pending, now: Instant) {
        if p.usr1 {
            self.status(now);
        }
        if p.ttin {
            self.resize(true, now);
        }
        if p.ttou {
            self.resize(false, now);
        }
    }

    /// While running: overdue children, crash-loop probes, accepting
    /// (fork mode; `readable`: a listener is), the pool, and the periodic
    /// reports.
    fn tend(&mut self, now: Instant, readable: bool, relay_ready: bool) {
        self.kill_overdue(now);
        self.check_probes(now);
        if self.cfg.mode == Mode::Fork {
            self.accept(now, readable, relay_ready);
            self.watch_limit(now);
        }
        self.fill_pool(now);
        self.maintain(now);
        if self.prefork.retiring_older {
            self.retire_older(now);
        }
        self.watch_relay(now);
        if self.prefork.turns {
            // Nobody leads, yet a worker is idle: it missed its chance.
            crate::turns::pass(&self.scoreboard, None);
        }
        self.tick(now);
    }

    /// Whether connections from the vault are yet to be handed to the
    /// workers (not once a stop began: then they stay there).
    pub(super) fn restoring(&self) -> bool {
        self.kept.vault.is_some()
            && self.kept.carried.may_have_more()
            && !self.life.stopping()
            && !self.carrier_reading()
    }

    /// Sleeps until a signal, a worker's notice, a listener (fork mode,
    /// under the limit), a child's exit or the nearest deadline; says
    /// what is ready.
    fn wait(&self) -> Woke {
        let now = Instant::now();
        let serving = self.serving();
        let running = !self.life.stopping();
        let accepting = self.cfg.mode == Mode::Fork
            && running
            && self.acceptor.paused_until(now).is_none()
            // Crash-loop back-off: clients wait in the backlog rather than
            // meet a child that fails to start.
            && self.backoff.hold_until(now, serving).is_none()
            // Like tcpserver -c: at the limit we stop polling the listeners
            // and new clients wait in the kernel's backlog.
            && self.children.conns() < self.cfg.max_children as usize;
        let (Some(signals), Some(notice)) = (&self.chan.signals, &self.chan.notice_r) else {
            return Woke::default();
        };
        let mut fds = PollSet::new(PollFd::new(signals.fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(notice.as_fd(), PollFlags::POLLIN));
        // Children's exits (Linux): at 2 when there, the listeners after.
        let exits_at = signals.exits_fd().map(|fd| {
            fds.push(PollFd::new(fd, PollFlags::POLLIN));
            fds.len() - 1
        });
        let first_listener = fds.len();
        // While children forked to accept are on their way, the listeners
        // are still readable: their notices wake the master instead.
        if accepting && self.fork.in_flight.is_empty() {
            for (_, l) in self.acceptor.streams() {
                fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
            }
        }
        let listening = first_listener..fds.len();
        let mut relay_at = None;
        if let Some(r) = &self.chan.relay {
            // Connections that retiring workers of another mode hand
            // over.
            if accepting {
                relay_at = Some(fds.len());
                fds.push(PollFd::new(r.rx.as_fd(), PollFlags::POLLIN));
            }
            // Connections kept across a restart wait for room.
            if self.restoring() && self.kept.carried_retry.is_none() {
                fds.push(PollFd::new(r.tx.as_fd(), PollFlags::POLLOUT));
            }
        }
        // What must reach the service manager waits for room.
        if let Some(n) = self.estate.notify.as_ref().filter(|n| n.wants_write()) {
            fds.push(PollFd::new(n.fd(), PollFlags::POLLOUT));
        }
        let deadlines = [
            self.life.deadline(),
            self.acceptor.paused_until(now).filter(|_| running),
            self.backoff.hold_until(now, serving).filter(|_| running),
            self.probe_deadline(now).filter(|_| running),
            self.children.next_deadline().filter(|_| running),
            self.prefork.recheck.filter(|_| running),
            self.prefork.fill_more.then_some(now).filter(|_| running),
            (!self.fork.in_flight.is_empty())
                .then(|| now + fork::IN_FLIGHT_RECHECK)
                .filter(|_| running),
            self.chan
                .relay_wait
                .map(|(t, _)| after(t, self.cfg.shutdown_timeout))
                .filter(|_| running),
            Some(self.reports.next_tick).filter(|_| running),
            self.kept.carried_retry.filter(|_| running),
            self.kept
                .workers_ready_at
                .map(|t| t + store::CARRIED_WAIT)
                .filter(|_| self.life.starting()),
        ];
        let timeout = deadlines
            .iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now));
        let fds = fds.as_mut_slice();
        match poll(fds, crate::time::poll_timeout(timeout)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => warn!("poll failed: {e}"),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let relay_ready = relay_at.is_some_and(|i| ready(&fds[i]));
        let readable = fds[listening].iter().any(ready);
        Woke {
            noticed: ready(&fds[1]),
            ready: readable,
            relay_ready,
            piped: ready(&fds[0]),
            exited: exits_at.is_some_and(|i| ready(&fds[i])),
        }
    }

    /// Empties the notice pipe; what the workers said is in the scoreboard.
    fn drain_notices(&self) {
        if let Some(fd) = &self.chan.notice_r {
            // A short read means the pipe is empty.
            let mut sink = [0u8; 256];
            while matches!(nix::unistd::read(fd, &mut sink), Ok(n) if n == sink.len()) {}
        }
    }

    fn notify(&self, msg: &str) {
        if let Some(n) = &self.estate.notify {
            n.send(msg);
        }
    }
}

/// What a wait found ready.
#[derive(Default)]
struct Woke {
    /// A worker's notice.
    noticed: bool,
    /// A listener (fork mode: a connection waits).
    ready: bool,
    /// The relay.
    relay_ready: bool,
    /// The signal pipe.
    piped: bool,
    /// Children's exits (Linux).
    exited: bool,
}

/// The descriptors the master waits on: in place up to [`PollSet::INLINE`]
/// (every wake-up of a fork-mode master would otherwise write a heap page,
/// copied after each fork), in a Vec beyond.
struct PollSet<'a> {
    inline: [PollFd<'a>; PollSet::INLINE],
    n: usize,
    more: Vec<PollFd<'a>>,
}

impl<'a> PollSet<'a> {
    const INLINE: usize = 8;

    fn new(first: PollFd<'a>) -> PollSet<'a> {
        PollSet {
            inline: std::array::from_fn(|_| first.clone()),
            n: 1,
            more: Vec::new(),
        }
    }

    fn push(&mut self, fd: PollFd<'a>) {
        if self.more.is_empty() && self.n < PollSet::INLINE {
            self.inline[self.n] = fd;
            self.n += 1;
            return;
        }
        if self.more.is_empty() {
            self.more.extend_from_slice(&self.inline[..self.n]);
        }
        self.more.push(fd);
    }

    fn len(&self) -> usize {
        if self.more.is_empty() {
            self.n
        } else {
            self.more.len()
        }
    }

    fn as_mut_slice(&mut self) -> &mut [PollFd<'a>] {
        if self.more.is_empty() {
            &mut self.inline[..self.n]
        } else {
            &mut self.more
        }
    }
}

/// What the stop signals among `p` tell the lifecycle, the immediate
/// one first.
fn stops(p: &crate::signals::Pending) -> Vec<Event> {
    let mut events = Vec::new();
    if p.quit {
        events.push(Event::Quit);
    }
    if p.term || p.int {
        events.push(Event::Stop(if p.term { "SIGTERM" } else { "SIGINT" }));
    }
    events
}

/// What the reload and upgrade requests among `p` tell the lifecycle.
fn requests(p: &crate::signals::Pending) -> Vec<Event> {
    let hup = p.hup.then_some(Event::Hup);
    let usr2 = p.usr2.then_some(Event::Usr2);
    hup.into_iter().chain(usr2).collect()
}
