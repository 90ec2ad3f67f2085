//! Taking turns to wait for connections, where the kernel would wake every
//! waiting worker for each one (no `EPOLLEXCLUSIVE`: the BSDs, macOS).
//!
//! Of the idle prefork workers one, the leader, polls the listeners and the
//! relay; the others, its followers, wait on nothing but their control
//! pipe, so a connection wakes none of them. The leader that takes a
//! connection names the next one itself: it writes that worker's slot in
//! the scoreboard's leader word and sends it [`CALL`]. A connection wakes
//! two processes, whatever the pool size. When no worker is idle the place
//! stays empty, and the first to come back idle takes it; the master names
//! a leader when one dies holding the place, and whenever it finds the
//! place empty with a worker idle.
//!
//! A signal wakes exactly the process it is sent to, and `pselect` lets it
//! in only while the follower waits: one sent before the wait stays
//! pending and ends the wait at once, so none is lost. Apache's accept
//! mutex, an `fcntl` lock, was tried first: the kernel's hand-over of a
//! lock woke most of the waiters under load (81 of 128 per connection on
//! Linux), and a waiter in `F_SETLKW` cannot see its control pipe.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};

use nix::errno::Errno;
use nix::sys::select::{pselect, FdSet, FD_SETSIZE};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};

use crate::scoreboard::{Scoreboard, Slot, State};

/// The signal that names a follower the leader.
pub const CALL: Signal = Signal::SIGURG;

/// Set to `1` on Linux, prefork workers take turns instead of waiting with
/// `EPOLLEXCLUSIVE`, so that this path is tested where it can run.
pub const ENV: &str = "ECHO_FORKD_TAKE_TURNS";

/// Whether prefork workers take turns: where the kernel has no wake-one
/// wait, or when [`ENV`] asks for it. Read once, by the master at start:
/// a worker finds the answer in what it inherited instead of searching
/// the environment (5 % of a new worker's start, in a pool of 1,000).
pub fn wanted() -> bool {
    static WANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| {
        !cfg!(any(target_os = "linux", target_os = "android"))
            || std::env::var_os(ENV).is_some_and(|v| v == "1")
    })
}

/// What [`Turns::wait`] ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    /// This worker leads: it may wait for a connection.
    Lead,
    /// The watched fd became readable: stop.
    Stop,
}

/// A worker's part in the turns.
pub struct Turns<'a> {
    slot: Slot<'a>,
    /// The control pipe again, at a number `pselect` can watch.
    watched: OwnedFd,
    /// The signal mask to wait with: this process's, with [`CALL`] let in.
    waiting: SigSet,
}

impl<'a> Turns<'a> {
    /// In a worker, before it first says it is idle: blocks [`CALL`] (but
    /// for the waits) and gives it a handler, so that it interrupts them.
    pub fn new(slot: Slot<'a>, watched: BorrowedFd<'_>) -> io::Result<Turns<'a>> {
        // close-on-exec, at the lowest free number from 3 on.
        let watched = watched.try_clone_to_owned()?;
        if std::os::fd::AsRawFd::as_raw_fd(&watched) as usize >= FD_SETSIZE {
            return Err(io::Error::other("no descriptor below FD_SETSIZE"));
        }
        crate::sys::interrupt_on_signal(CALL)?;
        let mut old = SigSet::empty();
        sigprocmask(
            SigmaskHow::SIG_BLOCK,
            Some(&SigSet::from(CALL)),
            Some(&mut old),
        )?;
        old.remove(CALL);
        Ok(Turns {
            slot,
            watched,
            waiting: old,
        })
    }

    fn me(&self) -> u64 {
        self.slot.index() as u64 + 1
    }

    /// Whether this worker leads now.
    pub fn leading(&self) -> bool {
        self.slot.board().leader() == self.me()
    }

    /// Waits until this worker leads (at once if it does, or if nobody
    /// does and it takes the place), or until the control pipe is
    /// readable.
    pub fn wait(&self) -> io::Result<Turn> {
        let board = self.slot.board();
        loop {
            // After this worker said it is idle (the caller did): a leader
            // that looked for an idle worker before that emptied the place,
            // and is seen empty here.
            fence(Ordering::SeqCst);
            match board.leader() {
                l if l == self.me() => return Ok(Turn::Lead),
                0 if board.swap_leader(0, self.me()) => return Ok(Turn::Lead),
                _ => {}
            }
            let mut fds = FdSet::new();
            fds.insert(self.watched.as_fd());
            match pselect(None, &mut fds, None, None, None, &self.waiting) {
                Ok(_) => {
                    // Named just before? Then the place goes on.
                    self.pass();
                    return Ok(Turn::Stop);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Names the next leader, if this worker leads: after it took a
    /// connection (and again once it says it is busy: it may have been
    /// named meanwhile), or before it stops.
    pub fn pass(&self) {
        fence(Ordering::SeqCst);
        if self.leading() {
            pass(self.slot.board(), Some(self.slot.index()));
        }
    }
}

/// If the worker in slot `from` leads (`None`: if nobody does), names an
/// idle worker other than it the leader and calls it; with none idle, the
/// place is left empty for the next worker that comes back idle.
pub fn pass(board: &Scoreboard, from: Option<usize>) {
    let (mut holder, mut except) = (from.map_or(0, |s| s as u64 + 1), from);
    loop {
        match board.idle_worker(except) {
            Some((slot, pid)) => {
                if !board.swap_leader(holder, slot as u64 + 1) {
                    return;
                }
                // Gone meanwhile (ESRCH): the master names another when it
                // reaps it.
                let _ = kill(pid, CALL);
                // It may have taken a connection of its own since it was
                // seen idle; then it, or this, passes the place on.
                fence(Ordering::SeqCst);
                if board.get(slot).is_some_and(|e| e.state == State::Idle) {
                    return;
                }
                (holder, except) = (slot as u64 + 1, Some(slot));
            }
            None if holder == 0 => return,
            None => {
                if !board.swap_leader(holder, 0) {
                    return;
                }
                // A worker that became idle after the look above may have
                // seen this one still leading: look again.
                fence(Ordering::SeqCst);
                holder = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A board with a worker in each of `states`, all of them this process
    /// (so a call is a signal it ignores), and their leader words.
    fn board(states: &[(u32, State)]) -> (Scoreboard, Vec<u64>) {
        let mut b = Scoreboard::new(8, 1).unwrap();
        let mut words = Vec::new();
        for &(generation, state) in states {
            let s = b.claim(generation).unwrap();
            b.set_pid(s, nix::unistd::getpid());
            b.slot(s).set(state);
            words.push(s as u64 + 1);
        }
        (b, words)
    }

    fn slot(word: u64) -> Option<usize> {
        Some(word as usize - 1)
    }

    #[test]
    fn a_leader_that_took_a_connection_names_an_idle_worker() {
        let (b, w) = board(&[(1, State::Busy), (1, State::Idle)]);
        assert!(b.swap_leader(0, w[0]));
        pass(&b, slot(w[0]));
        assert_eq!(b.leader(), w[1]);
    }

    #[test]
    fn with_nobody_idle_the_place_is_left_empty() {
        let (b, w) = board(&[(1, State::Busy), (1, State::Busy)]);
        assert!(b.swap_leader(0, w[0]));
        pass(&b, slot(w[0]));
        assert_eq!(b.leader(), 0);
    }

    #[test]
    fn a_worker_named_as_it_turned_busy_is_passed_over() {
        let (b, w) = board(&[(1, State::Busy), (1, State::Busy), (1, State::Idle)]);
        // Named while idle, busy since: its place goes on to one idle.
        assert!(b.swap_leader(0, w[1]));
        pass(&b, slot(w[1]));
        assert_eq!(b.leader(), w[2]);
    }

    #[test]
    fn only_the_leader_passes_the_place() {
        let (b, w) = board(&[(1, State::Idle), (1, State::Idle), (1, State::Idle)]);
        assert!(b.swap_leader(0, w[0]));
        pass(&b, slot(w[2]));
        assert_eq!(
            b.leader(),
            w[0],
            "a worker that does not lead passes nothing"
        );
    }

    #[test]
    fn the_master_fills_an_empty_place_and_leaves_a_taken_one() {
        let (b, w) = board(&[(1, State::Busy), (1, State::Idle)]);
        pass(&b, None);
        assert_eq!(b.leader(), w[1]);
        let (b, w) = board(&[(1, State::Idle), (1, State::Idle)]);
        assert!(b.swap_leader(0, w[0]));
        pass(&b, None);
        assert_eq!(b.leader(), w[0]);
    }

    #[test]
    fn the_newest_generation_is_named_first() {
        let (b, w) = board(&[(1, State::Idle), (2, State::Idle), (1, State::Idle)]);
        pass(&b, None);
        assert_eq!(b.leader(), w[1]);
    }
}
