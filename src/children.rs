//! The master's table of children and its respawn decisions. No syscalls
//! (beyond closing a retired worker's control pipe), so it is unit-tested
//! without forking.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

/// What a child is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A prefork worker, part of the pool.
    Worker,
    /// A fork-mode child serving one connection.
    Conn,
}

/// One live child.
#[derive(Debug)]
pub struct Child {
    pub role: Role,
    pub started: Instant,
    /// The configuration generation it was started with (workers).
    pub generation: u32,
    /// Its scoreboard slot (workers).
    pub slot: Option<usize>,
    /// The write end of its own control pipe (workers); dropping it tells
    /// the worker to stop accepting.
    pub ctl: Option<OwnedFd>,
    /// Set once it was told to stop: when it is killed if still alive.
    pub retire_by: Option<Instant>,
    /// It was sent SIGKILL.
    pub killed: bool,
    /// fork mode: its client's address, counted for max-per-ip.
    pub peer: Option<u128>,
}

impl Child {
    /// A child just forked.
    pub fn new(role: Role, started: Instant) -> Child {
        Child {
            role,
            started,
            generation: 0,
            slot: None,
            ctl: None,
            retire_by: None,
            killed: false,
            peer: None,
        }
    }

    /// A pool member still expected to accept: a worker not told to stop.
    pub fn active(&self) -> bool {
        self.role == Role::Worker && self.retire_by.is_none()
    }
}

/// Every live child of the master, by pid.
#[derive(Debug, Default)]
pub struct Children {
    map: HashMap<Pid, Child>,
}

impl Children {
    /// Records a child just forked.
    pub fn insert(&mut self, pid: Pid, child: Child) {
        self.map.insert(pid, child);
    }

    /// Forgets a child that was reaped; `None` if it was not ours.
    pub fn remove(&mut self, pid: Pid) -> Option<Child> {
        self.map.remove(&pid)
    }

    /// In a child right after fork: closes the control pipes of the
    /// master's other children, then leaks the table rather than free it.
    /// Freeing would write the allocator's metadata and copy pages the
    /// child otherwise shares with the master: 12 KiB more private memory
    /// per worker on average (16 at most) in a pool of 104.
    pub fn close_in_child(self) {
        for fd in self.map.values().filter_map(|c| c.ctl.as_ref()) {
            // The OwnedFd is forgotten with the table below and never
            // dropped, so this is the descriptor's one and only close.
            let _ = nix::unistd::close(fd.as_raw_fd());
        }
        std::mem::forget(self);
    }

    /// All live children.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no child is alive.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Live prefork workers, retiring ones included.
    pub fn workers(&self) -> usize {
        self.map.values().filter(|c| c.role == Role::Worker).count()
    }

    /// Active workers of `generation`.
    pub fn active(&self, generation: u32) -> usize {
        self.map
            .values()
            .filter(|c| c.active() && c.generation == generation)
            .count()
    }

    /// The pids of all live children.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.map.keys().copied()
    }

    /// Every live child.
    pub fn iter(&self) -> impl Iterator<Item = (Pid, &Child)> + '_ {
        self.map.iter().map(|(p, c)| (*p, c))
    }

    /// Tells one worker to stop accepting (closes its control pipe); it
    /// must be gone by `deadline`. False if it is not an active worker.
    pub fn retire(&mut self, pid: Pid, deadline: Instant) -> bool {
        match self.map.get_mut(&pid) {
            Some(c) if c.active() => {
                c.ctl = None;
                c.retire_by = Some(deadline);
                true
            }
            _ => false,
        }
    }

    /// Retires every active worker whose generation `retire` selects;
    /// returns how many.
    pub fn retire_where(&mut self, deadline: Instant, retire: impl Fn(u32) -> bool) -> usize {
        let pids: Vec<Pid> = self
            .map
            .iter()
            .filter(|(_, c)| c.active() && retire(c.generation))
            .map(|(p, _)| *p)
            .collect();
        pids.iter().filter(|&&p| self.retire(p, deadline)).count()
    }

    /// Retiring children still alive at their deadline, not yet killed.
    pub fn overdue(&self, now: Instant) -> Vec<Pid> {
        self.map
            .iter()
            .filter(|(_, c)| !c.killed && c.retire_by.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect()
    }

    /// The nearest retirement deadline of a child not yet killed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.map
            .values()
            .filter(|c| !c.killed)
            .filter_map(|c| c.retire_by)
            .min()
    }

    /// Marks a child as sent SIGKILL.
    pub fn mark_killed(&mut self, pid: Pid) {
        if let Some(c) = self.map.get_mut(&pid) {
            c.killed = true;
        }
    }
}

/// How a reaped child ended, in words for the log; `abnormal` is true for a
/// signal or a non-zero exit code.
pub fn describe(status: &WaitStatus) -> (bool, String) {
    match *status {
        WaitStatus::Exited(_, 0) => (false, "exited".into()),
        WaitStatus::Exited(_, code) => (true, format!("exited with status {code}")),
        WaitStatus::Signaled(_, sig, core) => (
            true,
            format!(
                "killed by signal {}{}",
                sig.as_str(),
                if core { " (core dumped)" } else { "" }
            ),
        ),
        ref other => (false, format!("changed state ({other:?})")),
    }
}

/// A worker that dies sooner than this after starting counts as a crash.
pub const QUICK_DEATH: Duration = Duration::from_secs(1);
const FIRST_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(30);

/// Crash-loop protection: workers that fail right after starting (the
/// master passes "died abnormally before it was ready") or forks that fail
/// are respawned after a delay that doubles each time, up to
/// [`MAX_DELAY`]; any other exit resets it.
#[derive(Debug, Default)]
pub struct Backoff {
    delay: Duration,
    until: Option<Instant>,
}

impl Backoff {
    /// Records a worker exit; returns the new delay when it starts or grows.
    pub fn on_exit(&mut self, now: Instant, lived: Duration, abnormal: bool) -> Option<Duration> {
        if abnormal && lived < QUICK_DEATH {
            Some(self.fail(now))
        } else {
            self.delay = Duration::ZERO;
            None
        }
    }

    /// Records a failure to fork; returns the delay before the next try.
    pub fn fail(&mut self, now: Instant) -> Duration {
        self.delay = if self.delay.is_zero() {
            FIRST_DELAY
        } else {
            (self.delay * 2).min(MAX_DELAY)
        };
        self.until = Some(now + self.delay);
        self.delay
    }

    /// When spawning may resume, if it is held back.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|&t| t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn counts_workers_apart_from_connection_children() {
        let mut c = Children::default();
        let now = Instant::now();
        c.insert(Pid::from_raw(10), Child::new(Role::Worker, now));
        c.insert(Pid::from_raw(11), Child::new(Role::Conn, now));
        assert_eq!((c.len(), c.workers()), (2, 1));
        assert!(c.remove(Pid::from_raw(12)).is_none());
        assert_eq!(c.remove(Pid::from_raw(10)).unwrap().role, Role::Worker);
        assert_eq!((c.len(), c.workers()), (1, 0));
    }

    #[test]
    fn retiring_by_generation_keeps_the_new_one_active() {
        let mut c = Children::default();
        let now = Instant::now();
        for (pid, generation) in [(1, 1), (2, 1), (3, 2)] {
            let mut child = Child::new(Role::Worker, now);
            child.generation = generation;
            c.insert(Pid::from_raw(pid), child);
        }
        c.insert(Pid::from_raw(4), Child::new(Role::Conn, now));
        let by = now + Duration::from_secs(10);
        assert_eq!(c.retire_where(by, |g| g < 2), 2);
        assert_eq!((c.active(1), c.active(2), c.workers()), (0, 1, 3));
        assert!(!c.retire(Pid::from_raw(1), by), "already retiring");
        assert!(!c.retire(Pid::from_raw(4), by), "not a worker");
        assert_eq!(c.next_deadline(), Some(by));
        assert!(c.overdue(now).is_empty());
        let mut late = c.overdue(by);
        late.sort();
        assert_eq!(late, [Pid::from_raw(1), Pid::from_raw(2)]);
        c.mark_killed(Pid::from_raw(1));
        assert_eq!(c.overdue(by), [Pid::from_raw(2)]);
    }

    #[test]
    fn describes_exits_with_signal_names() {
        let pid = Pid::from_raw(1);
        assert_eq!(
            describe(&WaitStatus::Exited(pid, 0)),
            (false, "exited".into())
        );
        assert_eq!(
            describe(&WaitStatus::Exited(pid, 3)),
            (true, "exited with status 3".into())
        );
        let (bad, text) = describe(&WaitStatus::Signaled(pid, Signal::SIGSEGV, true));
        assert!(bad);
        assert_eq!(text, "killed by signal SIGSEGV (core dumped)");
    }

    #[test]
    fn backoff_doubles_on_quick_crashes_and_resets_when_healthy() {
        let mut b = Backoff::default();
        let t = Instant::now();
        let quick = Duration::from_millis(10);
        assert_eq!(b.on_exit(t, quick, true), Some(FIRST_DELAY));
        assert_eq!(b.on_exit(t, quick, true), Some(FIRST_DELAY * 2));
        assert!(b.until(t).is_some());
        assert!(b.until(t + MAX_DELAY).is_none());
        for _ in 0..20 {
            b.on_exit(t, quick, true);
        }
        assert_eq!(b.on_exit(t, quick, true), Some(MAX_DELAY));
        // A long-lived worker that was killed is not a crash loop.
        assert_eq!(b.on_exit(t, Duration::from_secs(5), true), None);
        assert_eq!(b.on_exit(t, quick, true), Some(FIRST_DELAY));
        // Nor is a quick but clean exit (max-requests).
        assert_eq!(b.on_exit(t, quick, false), None);
    }
}
