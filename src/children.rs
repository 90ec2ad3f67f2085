//! The master's table of children and its respawn decisions. Pure: no
//! syscalls, so it is unit-tested without forking.

use std::collections::HashMap;
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
#[derive(Clone, Copy, Debug)]
pub struct Child {
    pub role: Role,
    pub started: Instant,
}

/// Every live child of the master, by pid.
#[derive(Debug, Default)]
pub struct Children {
    map: HashMap<Pid, Child>,
    workers: usize,
}

impl Children {
    /// Records a child just forked.
    pub fn insert(&mut self, pid: Pid, role: Role, now: Instant) {
        if role == Role::Worker {
            self.workers += 1;
        }
        self.map.insert(pid, Child { role, started: now });
    }

    /// Forgets a child that was reaped; `None` if it was not ours.
    pub fn remove(&mut self, pid: Pid) -> Option<Child> {
        let child = self.map.remove(&pid)?;
        if child.role == Role::Worker {
            self.workers -= 1;
        }
        Some(child)
    }

    /// All live children.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no child is alive.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Live prefork workers.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The pids of all live children.
    pub fn pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.map.keys().copied()
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

/// Crash-loop protection: workers that die right after starting (or forks
/// that fail) are respawned after a delay that doubles each time, up to
/// [`MAX_DELAY`]; any healthy exit resets it.
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
        c.insert(Pid::from_raw(10), Role::Worker, now);
        c.insert(Pid::from_raw(11), Role::Conn, now);
        assert_eq!((c.len(), c.workers()), (2, 1));
        assert!(c.remove(Pid::from_raw(12)).is_none());
        assert_eq!(c.remove(Pid::from_raw(10)).unwrap().role, Role::Worker);
        assert_eq!((c.len(), c.workers()), (1, 0));
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
