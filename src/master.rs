//! The supervisor loop, for both process models.
//!
//! The master is single-threaded and sleeps in one `poll` on the signal pipe
//! (plus, in fork mode, the listeners while it is under `max-children`),
//! with a timeout that is the nearest deadline. On each wake-up it drains
//! signals, acts on stop requests, reaps every exited child, then accepts
//! (fork) or refills the pool (prefork). Like nginx's master cycle, the order
//! is fixed, and handlers only set flags.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};

use log::{debug, error, info, warn};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{getpid, pipe2, Pid};

use crate::children::{describe, Backoff, Children, Role};
use crate::config::{Config, Mode};
use crate::daemon::{Identity, PidFile, ReadyPipe};
use crate::listen::Listener;
use crate::logging::RateLimit;
use crate::signals::{self, Signals};
use crate::systemd::Notify;
use crate::{sys, worker};

/// How long accepting pauses in fork mode after a resource error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(500);
/// Repeated warnings (limits, accept or fork errors) are logged this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);

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

/// Runs the master until it is stopped; returns the exit status.
pub fn run(cfg: Config, listeners: Vec<Listener>, identity: Identity, handoff: Handoff) -> i32 {
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot install signal handlers: {}", crate::error_text(&e));
            return 1;
        }
    };
    let (ctl_r, ctl_w) = match pipe2(OFlag::O_CLOEXEC) {
        Ok(p) => p,
        Err(e) => {
            error!(
                "cannot create the control pipe: {}",
                crate::error_text(&e.into())
            );
            return 1;
        }
    };
    let now = Instant::now();
    let mut master = Master {
        pid: getpid(),
        identity,
        handoff,
        cfg,
        listeners,
        signals: Some(signals),
        ctl_r,
        ctl_w: Some(ctl_w),
        children: Children::default(),
        backoff: Backoff::default(),
        started: now,
        stop_deadline: None,
        killed: false,
        accept_pause: None,
        next_listener: 0,
        accepted: 0,
        at_limit: RateLimit::new(REPORT_EVERY),
        limit_hits: 0,
        errors: RateLimit::new(REPORT_EVERY),
        seed: seed(),
    };
    master.run()
}

struct Master {
    pid: Pid,
    /// Who children run as.
    identity: Identity,
    handoff: Handoff,
    cfg: Config,
    listeners: Vec<Listener>,
    /// `None` only in a child, after it closed the self-pipe.
    signals: Option<Signals>,
    /// The control pipe: children hold the read end; the master holds the
    /// only write end, and closing it tells children to stop accepting.
    ctl_r: OwnedFd,
    ctl_w: Option<OwnedFd>,
    children: Children,
    backoff: Backoff,
    started: Instant,
    /// Set once a stop began: when the remaining children are killed.
    stop_deadline: Option<Instant>,
    killed: bool,
    accept_pause: Option<Instant>,
    next_listener: usize,
    /// fork mode: connections handed to a child.
    accepted: u64,
    at_limit: RateLimit,
    limit_hits: u64,
    errors: RateLimit,
    seed: u64,
}

impl Master {
    fn run(&mut self) -> i32 {
        if self.cfg.mode == Mode::Prefork {
            self.fill_pool(Instant::now());
        }
        info!("ready");
        self.notify(&format!(
            "READY=1\nSTATUS={}",
            self.status_text(Instant::now())
        ));
        if let Some(ready) = self.handoff.ready.take() {
            ready.ready();
        }
        loop {
            let ready = self.wait();
            let now = Instant::now();
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
                warn!("reload on SIGHUP is not supported yet in this version; configuration unchanged");
            }
            if p.usr1 {
                self.status(now);
            }
            if p.ttin || p.ttou {
                warn!(
                    "resizing the pool with SIGTTIN/SIGTTOU is not supported yet in this version"
                );
            }
            match self.stop_deadline {
                None if self.cfg.mode == Mode::Fork => self.accept(&ready, now),
                None => self.fill_pool(now),
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
        0
    }

    /// Sleeps until a signal, a listener (fork mode, under the limit) or the
    /// nearest deadline. Returns which listeners are readable.
    fn wait(&self) -> Vec<bool> {
        let now = Instant::now();
        let accepting = self.cfg.mode == Mode::Fork
            && self.stop_deadline.is_none()
            && self.accept_pause.is_none_or(|t| t <= now)
            // Like tcpserver -c: at the limit we stop polling the listeners
            // and new clients wait in the kernel's backlog.
            && self.children.len() < self.cfg.max_children as usize;
        let Some(signals) = &self.signals else {
            return Vec::new();
        };
        let mut fds = Vec::with_capacity(1 + self.listeners.len());
        fds.push(PollFd::new(signals.fd(), PollFlags::POLLIN));
        if accepting {
            fds.extend(
                self.listeners
                    .iter()
                    .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
        }
        let deadlines = [
            self.stop_deadline.filter(|_| !self.killed),
            self.accept_pause.filter(|_| self.stop_deadline.is_none()),
            self.backoff
                .until(now)
                .filter(|_| self.cfg.mode == Mode::Prefork),
        ];
        let timeout = deadlines
            .iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now));
        match poll(&mut fds, crate::poll_timeout(timeout)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => warn!("poll failed: {e}"),
        }
        fds[1..]
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect()
    }

    /// In a child right after fork: drops what only the master may hold.
    fn close_in_child(&mut self) {
        self.listeners.clear();
        if let Some(s) = self.signals.take() {
            s.close_in_child();
        }
        self.ctl_w = None;
        if let Some(ready) = self.handoff.ready.take() {
            ready.close_in_child();
        }
        self.handoff = Handoff {
            pidfile: None,
            ready: None,
            notify: None,
        };
    }

    /// In a child right after fork: drop the master's fds, then its
    /// privileges. Err is the exit code.
    fn enter_child(&mut self) -> Result<(), i32> {
        self.close_in_child();
        self.identity.enter().map_err(|e| {
            error!("cannot drop privileges: {e}");
            worker::EXIT_SETUP
        })
    }

    fn notify(&self, msg: &str) {
        if let Some(n) = &self.handoff.notify {
            n.send(msg);
        }
    }

    /// prefork: forks workers until the pool is at its size, unless crash-loop
    /// back-off holds spawning back.
    fn fill_pool(&mut self, now: Instant) {
        while self.children.workers() < self.cfg.workers as usize
            && self.backoff.until(now).is_none()
        {
            let master = self.pid;
            let limits = self.cfg.limits();
            let max_requests = self.max_requests();
            let forked = sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, || {
                let listeners = std::mem::take(&mut self.listeners);
                if let Err(code) = self.enter_child() {
                    return code;
                }
                let ctx = worker::Ctx {
                    ctl: self.ctl_r.as_fd(),
                    master,
                    limits,
                };
                worker::prefork(listeners, ctx, max_requests)
            });
            match forked {
                Ok(pid) => {
                    self.children.insert(pid, Role::Worker, now);
                    info!("worker {pid} started");
                }
                Err(e) => {
                    let delay = self.backoff.fail(now);
                    error!(
                        "cannot fork a worker: {}; retrying in {} ms",
                        crate::error_text(&e),
                        delay.as_millis()
                    );
                    break;
                }
            }
        }
    }

    /// `max-requests` plus this worker's share of the jitter.
    fn max_requests(&mut self) -> u64 {
        let base = u64::from(self.cfg.max_requests);
        if base == 0 || self.cfg.max_requests_jitter == 0 {
            return base;
        }
        // xorshift: spreading recycling needs no better randomness.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        base + self.seed % (u64::from(self.cfg.max_requests_jitter) + 1)
    }

    /// fork mode: accepts from the readable listeners, one connection from
    /// each in turn so none starves, until they are drained or the limit is
    /// reached.
    fn accept(&mut self, ready: &[bool], now: Instant) {
        let n = ready.len().min(self.listeners.len());
        let mut live: Vec<usize> = (0..n)
            .map(|k| (self.next_listener + k) % n)
            .filter(|&i| ready[i])
            .collect();
        while !live.is_empty() {
            live.retain(|&i| self.accept_one(i, now));
        }
        self.next_listener = self.next_listener.wrapping_add(1);
    }

    /// Accepts one connection from listener `i` and forks its child; false
    /// when nothing more should be taken from it now.
    fn accept_one(&mut self, i: usize, now: Instant) -> bool {
        if self.accept_pause.is_some_and(|t| t > now) {
            return false;
        }
        if self.children.len() >= self.cfg.max_children as usize {
            self.limit_hits += 1;
            if let Some(more) = self.at_limit.hit(now) {
                warn!(
                    "max-children ({}) reached: new clients wait in the backlog ({} times, {more} since the last report)",
                    self.cfg.max_children, self.limit_hits
                );
            }
            return false;
        }
        let conn = match self.listeners[i].accept() {
            Ok(c) => c,
            Err(e) => {
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => false,
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO) => true,
                    _ => {
                        // EMFILE, ENFILE, ENOBUFS…: retrying at once would spin.
                        self.accept_pause = Some(now + ACCEPT_PAUSE);
                        if let Some(more) = self.errors.hit(now) {
                            warn!(
                                "accept on {} failed: {}; pausing {} ms ({more} more since the last report)",
                                self.listeners[i].name(),
                                crate::error_text(&e),
                                ACCEPT_PAUSE.as_millis()
                            );
                        }
                        false
                    }
                };
            }
        };
        self.accept_pause = None;
        let tcp = self.listeners[i].is_tcp();
        let master = self.pid;
        let limits = self.cfg.limits();
        let forked = sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, || {
            if let Err(code) = self.enter_child() {
                return code;
            }
            let ctx = worker::Ctx {
                ctl: self.ctl_r.as_fd(),
                master,
                limits,
            };
            worker::fork_child(conn, tcp, ctx)
        });
        // The connection now belongs to the child; the closure (and with it
        // the master's copy of the socket) was dropped here.
        match forked {
            Ok(pid) => {
                self.children.insert(pid, Role::Conn, now);
                self.accepted += 1;
                true
            }
            Err(e) => {
                self.accept_pause = Some(now + ACCEPT_PAUSE);
                if let Some(more) = self.errors.hit(now) {
                    error!(
                        "cannot fork for a connection: {}; connection closed, pausing {} ms ({more} more since the last report)",
                        crate::error_text(&e),
                        ACCEPT_PAUSE.as_millis()
                    );
                }
                false
            }
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
            let (abnormal, how) = describe(&status);
            let stopping = self.stop_deadline.is_some();
            match child.role {
                Role::Worker if abnormal && !stopping => {
                    warn!("worker {pid} {how}");
                    let lived = now.duration_since(child.started);
                    if let Some(delay) = self.backoff.on_exit(now, lived, abnormal) {
                        warn!(
                            "worker {pid} died {} ms after starting: respawning in {} ms",
                            lived.as_millis(),
                            delay.as_millis()
                        );
                    }
                }
                Role::Worker => {
                    self.backoff
                        .on_exit(now, now.duration_since(child.started), abnormal);
                    info!("worker {pid} {how}");
                }
                Role::Conn if abnormal && !self.killed => warn!("child {pid} {how}"),
                Role::Conn => debug!("child {pid} {how}"),
            }
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
            // children closing theirs on the pipe's EOF refuses new clients.
            self.listeners.clear();
            self.ctl_w = None;
            self.stop_deadline = Some(now + self.cfg.shutdown_timeout);
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

    fn status(&self, now: Instant) {
        let text = self.status_text(now);
        info!("status: {text}");
        self.notify(&format!("STATUS={text}"));
    }

    /// The USR1 line and systemd's STATUS=.
    fn status_text(&self, now: Instant) -> String {
        let uptime = now.duration_since(self.started).as_secs();
        match self.cfg.mode {
            Mode::Prefork => format!(
                "mode prefork, workers {} (floor {}, ceiling {}), uptime {uptime} s",
                self.children.workers(),
                self.cfg.workers,
                self.cfg.max_workers
            ),
            Mode::Fork => format!(
                "mode fork, children {} of at most {}, connections {}, limit reached {} times, uptime {uptime} s",
                self.children.len(),
                self.cfg.max_children,
                self.accepted,
                self.limit_hits
            ),
        }
    }
}

fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}
