//! The master's table of children and its respawn decisions. No syscalls
//! (beyond telling a retired worker: its control pipe closed, or the
//! signal that closes it), so it is unit-tested without forking.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::scoreboard::Scoreboard;

pub use crate::kind::Kind;

/// One live child.
#[derive(Debug)]
pub struct Child {
    pub kind: Kind,
    pub started: Instant,
    /// The configuration generation it was started with (workers).
    pub generation: u32,
    /// Its scoreboard slot (workers).
    pub slot: Option<usize>,
    /// The write end of its own control pipe (workers, where the master
    /// holds it); dropping it tells the worker to stop accepting.
    pub ctl: Option<OwnedFd>,
    /// A worker whose control pipe is its own (Linux): the master's
    /// signal closes it instead (sys/told.rs).
    pub told_by_signal: bool,
    /// Set once it was told to stop: when it is killed if still alive.
    pub retire_by: Option<Instant>,
    /// It was sent SIGKILL.
    pub killed: bool,
    /// fork mode: its client's place in `--max-per-ip`, which the master
    /// keeps and gives back when it reaps the child.
    pub place: Option<crate::scoreboard::Place>,
    /// fork mode behind a proxy: its index in the scoreboard's table of
    /// fork-mode clients (see [`IndexPool`]).
    pub fork_slot: Option<usize>,
}

impl Child {
    /// A child just forked.
    pub fn new(kind: Kind, started: Instant) -> Child {
        Child {
            kind,
            started,
            generation: 0,
            slot: None,
            ctl: None,
            told_by_signal: false,
            retire_by: None,
            killed: false,
            place: None,
            fork_slot: None,
        }
    }

    /// A pool member still expected to accept: a worker not told to stop.
    pub fn active(&self) -> bool {
        self.kind == Kind::Pool && self.retire_by.is_none()
    }

    /// A worker (of any kind) not told to stop: the master may retire it.
    fn retirable(&self) -> bool {
        self.kind.is_worker() && self.retire_by.is_none()
    }
}

/// Every live child of the master, by pid.
#[derive(Debug, Default)]
pub struct Children {
    map: HashMap<Pid, Child>,
    /// The control pipes' write ends the master holds (workers not yet
    /// retired), in order: a child closes them a run of numbers at a time.
    pipes: BTreeSet<RawFd>,
    /// How many of each kind, in [`Kind`] order: the fork-mode master
    /// checks `max-children` on every wake-up.
    counts: [usize; Kind::ALL.len()],
}

impl Children {
    /// Records a child just forked.
    pub fn insert(&mut self, pid: Pid, child: Child) {
        self.pipes
            .extend(child.ctl.as_ref().map(|fd| fd.as_raw_fd()));
        self.counts[child.kind.index()] += 1;
        if let Some(old) = self.map.insert(pid, child) {
            if let Some(fd) = &old.ctl {
                self.pipes.remove(&fd.as_raw_fd());
            }
            self.counts[old.kind.index()] -= 1;
        }
    }

    /// Forgets a child that was reaped; `None` if it was not ours.
    pub fn remove(&mut self, pid: Pid) -> Option<Child> {
        let child = self.map.remove(&pid)?;
        if let Some(fd) = &child.ctl {
            self.pipes.remove(&fd.as_raw_fd());
        }
        self.counts[child.kind.index()] -= 1;
        Some(child)
    }

    /// In a child right after fork: closes the control pipes of the
    /// master's other children, then leaks the table rather than free it.
    /// Freeing would write the allocator's metadata and copy pages the
    /// child otherwise shares with the master: 12 KiB more private memory
    /// per worker on average (16 at most) in a pool of 104. The pipes go
    /// a run of consecutive numbers at a time (`close_range`): one by one,
    /// a pool of 4,000 cost each new worker 4,000 system calls, and the
    /// pool as many millions (4,000 workers started in 2.7 s).
    pub fn close_in_child(self) {
        let mut run: Option<(RawFd, RawFd)> = None;
        // The OwnedFds are forgotten with the table below and never
        // dropped, so this is each descriptor's one and only close.
        for &fd in &self.pipes {
            run = match run {
                Some((lo, hi)) if fd == hi + 1 => Some((lo, fd)),
                Some((lo, hi)) => {
                    crate::sys::close_range(lo, hi);
                    Some((fd, fd))
                }
                None => Some((fd, fd)),
            };
        }
        if let Some((lo, hi)) = run {
            crate::sys::close_range(lo, hi);
        }
        std::mem::forget(self);
    }

    /// The live child `pid`.
    pub fn get(&self, pid: Pid) -> Option<&Child> {
        self.map.get(&pid)
    }

    /// All live children.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no child is alive.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Live children of `kind`, retiring ones included.
    pub fn count(&self, kind: Kind) -> usize {
        self.counts[kind.index()]
    }

    /// Live pool workers, retiring ones included.
    pub fn workers(&self) -> usize {
        self.count(Kind::Pool)
    }

    /// Live fork-mode children serving a connection.
    pub fn conns(&self) -> usize {
        self.count(Kind::Conn)
    }

    /// Workers of `kind` (UDP or metrics) of `generation` not told to stop.
    pub fn serving(&self, kind: Kind, generation: u32) -> usize {
        self.map
            .values()
            .filter(|c| c.kind == kind && c.retirable() && c.generation == generation)
            .count()
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

    /// Tells one worker (or UDP worker) to stop (marks its slot on
    /// `board`, then closes its control pipe); it must be gone by
    /// `deadline`. False if it is neither, or was told already.
    pub fn retire(&mut self, pid: Pid, deadline: Instant, board: &Scoreboard) -> bool {
        match self.map.get_mut(&pid) {
            Some(c) if c.retirable() => {
                if let Some(slot) = c.slot {
                    board.tell(slot);
                }
                if let Some(fd) = c.ctl.take() {
                    self.pipes.remove(&fd.as_raw_fd());
                }
                #[cfg(any(target_os = "linux", target_os = "android"))]
                if c.told_by_signal {
                    crate::sys::told::tell(pid);
                }
                c.retire_by = Some(deadline);
                true
            }
            _ => false,
        }
    }

    /// Retires every worker and UDP worker whose generation `retire`
    /// selects; returns how many.
    pub fn retire_where(
        &mut self,
        deadline: Instant,
        board: &Scoreboard,
        retire: impl Fn(u32) -> bool,
    ) -> usize {
        let pids: Vec<Pid> = self
            .map
            .iter()
            .filter(|(_, c)| c.retirable() && retire(c.generation))
            .map(|(p, _)| *p)
            .collect();
        pids.iter()
            .filter(|&&p| self.retire(p, deadline, board))
            .count()
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

/// Small indices handed out and given back: the lowest free first, so
/// that they stay below the number alive at once.
#[derive(Debug, Default)]
pub struct IndexPool {
    free: Vec<usize>,
    next: usize,
}

impl IndexPool {
    /// An index no one holds.
    pub fn take(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// `index` is free again.
    pub fn give_back(&mut self, index: usize) {
        self.free.push(index);
    }

    /// Marks `index` as held (by a child adopted after an upgrade).
    pub fn reserve(&mut self, index: usize) {
        if index >= self.next {
            self.free.extend(self.next..index);
            self.next = index + 1;
        } else {
            self.free.retain(|&i| i != index);
        }
    }
}

/// How a reaped child ended, in words for the log; `abnormal` is true for a
/// signal or a non-zero exit code. A clean exit, the common case,
/// allocates nothing: in fork mode the
/// master reaps a child per connection, and a heap write after a fork
/// copies the page it lands on.
pub fn describe(status: &WaitStatus) -> (bool, Cow<'static, str>) {
    match *status {
        WaitStatus::Exited(_, 0) => (false, Cow::Borrowed("exited")),
        WaitStatus::Exited(_, EXIT_REFUSED) => (false, Cow::Borrowed("refused its client")),
        WaitStatus::Exited(_, EXIT_UNUSED) => (false, Cow::Borrowed("found no connection waiting")),
        WaitStatus::Exited(_, EXIT_CANNOT_ACCEPT) => (false, Cow::Borrowed("could not accept")),
        WaitStatus::Exited(_, EXIT_HANDED_OVER) => {
            (false, Cow::Borrowed("handed its connection over"))
        }
        WaitStatus::Exited(_, code) => (true, format!("exited with status {code}").into()),
        WaitStatus::Signaled(_, sig, core) => (
            true,
            format!(
                "killed by signal {}{}",
                sig.as_str(),
                if core { " (core dumped)" } else { "" }
            )
            .into(),
        ),
        ref other => (false, format!("changed state ({other:?})").into()),
    }
}

/// How a reaped child ended, as far as crash-loop protection cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// A clean exit (status 0).
    Clean,
    /// It never got going: a worker that died before it was ready, or a
    /// fork-mode child that exited with [`EXIT_SETUP`] (chroot, setuid).
    FailedStart,
    /// Ready, but dead by a signal or an error within [`QUICK_DEATH`] of
    /// starting: an OOM killer, a watchdog, a library that crashes late.
    DiedYoung,
    /// Any other abnormal end (killed, or failed, after a life of its own).
    Abnormal,
}

/// Exit code of a child whose master went away.
pub const EXIT_ORPHAN: i32 = 3;
/// Exit code of a child that could not set itself up (privilege drop).
pub const EXIT_SETUP: i32 = 4;
/// Exit code of a fork-mode child that refused its client after reading
/// what the master could not (behind a proxy: the header, then the rules
/// and limits for the address it carries): a refusal, counted as such by
/// the child, not a connection served. A clean end, not a failure.
pub const EXIT_REFUSED: i32 = 5;
/// Exit code of a fork-mode child that handed its connection over to
/// another process (a restart under systemd): not a connection served
/// here, and a clean end.
pub const EXIT_HANDED_OVER: i32 = 6;
/// Exit code of a fork-mode child forked to accept that found no
/// connection waiting (another child took it, or its client left): no
/// connection, and a clean end.
pub const EXIT_UNUSED: i32 = 7;
/// Exit code of a fork-mode child forked to accept that could not, out
/// of a resource (descriptors, memory): no connection; the master pauses
/// accepting, as it did when it accepted itself.
pub const EXIT_CANNOT_ACCEPT: i32 = 8;

/// Classifies a reaped child: `lived` since its fork; `ready` for a worker
/// is whether it ever said so (a fork-mode child has nothing to say).
pub fn classify(status: &WaitStatus, kind: Kind, lived: Duration, ready: bool) -> Exit {
    let abnormal = match *status {
        WaitStatus::Exited(_, 0) => false,
        WaitStatus::Exited(
            _,
            EXIT_REFUSED | EXIT_HANDED_OVER | EXIT_UNUSED | EXIT_CANNOT_ACCEPT,
        ) if kind == Kind::Conn => false,
        WaitStatus::Exited(_, code) if kind == Kind::Conn && code == EXIT_SETUP => {
            return Exit::FailedStart
        }
        WaitStatus::Exited(..) | WaitStatus::Signaled(..) => true,
        _ => false,
    };
    match (abnormal, kind) {
        (false, _) => Exit::Clean,
        (true, Kind::Pool | Kind::Udp | Kind::Metrics | Kind::Carrier) if !ready => {
            Exit::FailedStart
        }
        (true, _) if lived < QUICK_DEATH => Exit::DiedYoung,
        (true, _) => Exit::Abnormal,
    }
}

/// A child that dies sooner than this after starting died young; one
/// that lives this long after it is ready has proved itself healthy.
pub const QUICK_DEATH: Duration = Duration::from_secs(1);
#[cfg(test)]
mod tests {
    #[test]
    fn indices_are_reused_lowest_first_and_reserved_on_adoption() {
        let mut p = IndexPool::default();
        assert_eq!((p.take(), p.take(), p.take()), (0, 1, 2));
        p.give_back(1);
        assert_eq!(p.take(), 1);
        let mut adopted = IndexPool::default();
        adopted.reserve(3);
        adopted.reserve(1);
        let mut got: Vec<usize> = (0..4).map(|_| adopted.take()).collect();
        got.sort();
        assert_eq!(got, [0, 2, 4, 5], "3 and 1 are held by adopted children");
    }

    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn counts_workers_apart_from_connection_children() {
        let mut c = Children::default();
        let now = Instant::now();
        c.insert(Pid::from_raw(10), Child::new(Kind::Pool, now));
        c.insert(Pid::from_raw(11), Child::new(Kind::Conn, now));
        assert_eq!((c.len(), c.workers()), (2, 1));
        assert!(c.remove(Pid::from_raw(12)).is_none());
        assert_eq!(c.remove(Pid::from_raw(10)).unwrap().kind, Kind::Pool);
        assert_eq!((c.len(), c.workers()), (1, 0));
    }

    #[test]
    fn retiring_by_generation_keeps_the_new_one_active() {
        let mut c = Children::default();
        let now = Instant::now();
        for (pid, generation) in [(1, 1), (2, 1), (3, 2)] {
            let mut child = Child::new(Kind::Pool, now);
            child.generation = generation;
            c.insert(Pid::from_raw(pid), child);
        }
        c.insert(Pid::from_raw(4), Child::new(Kind::Conn, now));
        let by = now + Duration::from_secs(10);
        let board = Scoreboard::new(8, 1).unwrap();
        assert_eq!(c.retire_where(by, &board, |g| g < 2), 2);
        assert_eq!((c.active(1), c.active(2), c.workers()), (0, 1, 3));
        assert!(!c.retire(Pid::from_raw(1), by, &board), "already retiring");
        assert!(!c.retire(Pid::from_raw(4), by, &board), "not a worker");
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
    fn exits_are_classified_by_role_readiness_and_age() {
        let pid = Pid::from_raw(1);
        let young = Duration::from_millis(10);
        let old = Duration::from_secs(5);
        let killed = WaitStatus::Signaled(pid, Signal::SIGKILL, false);
        let w = Kind::Pool;
        assert_eq!(
            classify(&WaitStatus::Exited(pid, 0), w, young, true),
            Exit::Clean
        );
        assert_eq!(classify(&killed, w, young, false), Exit::FailedStart);
        assert_eq!(classify(&killed, w, old, false), Exit::FailedStart);
        assert_eq!(
            classify(&WaitStatus::Exited(pid, 4), w, young, false),
            Exit::FailedStart
        );
        assert_eq!(classify(&killed, w, young, true), Exit::DiedYoung);
        assert_eq!(classify(&killed, w, old, true), Exit::Abnormal);
        let c = Kind::Conn;
        assert_eq!(
            classify(&WaitStatus::Exited(pid, EXIT_SETUP), c, young, false),
            Exit::FailedStart
        );
        assert_eq!(
            classify(&WaitStatus::Exited(pid, 0), c, young, false),
            Exit::Clean
        );
        assert_eq!(
            classify(&WaitStatus::Exited(pid, EXIT_REFUSED), c, young, false),
            Exit::Clean,
            "a refusal is not a failure to start"
        );
        assert_eq!(classify(&killed, c, young, false), Exit::DiedYoung);
        assert_eq!(
            classify(&WaitStatus::Exited(pid, 70), c, old, false),
            Exit::Abnormal
        );
    }
}
