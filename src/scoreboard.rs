//! The scoreboard: one slot per prefork worker in memory shared by the
//! master and its workers (Apache's scoreboard).
//!
//! The master claims a slot before it forks a worker and releases it once
//! the worker is reaped; in between only the worker writes its state and
//! count. Every field is an atomic word, so nobody ever waits on a lock
//! held by a process that died. The master reads the slots to know which
//! workers are ready, idle or busy: for reloads, TTIN/TTOU and the status
//! line.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use nix::unistd::Pid;

use crate::sys::SharedWords;

/// What a worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Forked, not yet accepting.
    Starting,
    /// Waiting for a connection.
    Idle,
    /// Serving a connection.
    Busy,
    /// Told to stop: finishing its connection, accepting no more.
    Stopping,
}

impl State {
    fn from_word(w: u64) -> Option<State> {
        match w {
            1 => Some(State::Starting),
            2 => Some(State::Idle),
            3 => Some(State::Busy),
            4 => Some(State::Stopping),
            _ => None,
        }
    }

    fn word(self) -> u64 {
        match self {
            State::Starting => 1,
            State::Idle => 2,
            State::Busy => 3,
            State::Stopping => 4,
        }
    }

    /// The word used in the status line.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Idle => "idle",
            State::Busy => "busy",
            State::Stopping => "stopping",
        }
    }
}

// Word offsets within a slot; a slot is one 64-byte cache line.
const PID: usize = 0;
const GENERATION: usize = 1;
const STATE: usize = 2;
const SERVED: usize = 3;
const SINCE_MS: usize = 4;
const WORDS: usize = 8;

/// A copy of one slot, as the master reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pid: Pid,
    pub generation: u32,
    pub state: State,
    /// Connections served by this worker so far.
    pub served: u64,
    /// Milliseconds since the scoreboard was made, at the last state change.
    pub since_ms: u64,
}

/// The shared slots, and (in the master) which of them are free.
pub struct Scoreboard {
    mem: SharedWords,
    epoch: Instant,
    free: Vec<usize>,
}

impl Scoreboard {
    /// Maps `slots` slots; call before the first fork.
    pub fn new(slots: usize) -> io::Result<Scoreboard> {
        Ok(Scoreboard {
            mem: SharedWords::new(slots * WORDS)?,
            epoch: Instant::now(),
            // Popped from the end: slot 0 is handed out first.
            free: (0..slots).rev().collect(),
        })
    }

    fn word(&self, slot: usize, field: usize) -> &AtomicU64 {
        &self.mem.words()[slot * WORDS + field]
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Master, before fork: takes a free slot for a worker of `generation`;
    /// `None` when every slot is taken.
    pub fn claim(&mut self, generation: u32) -> Option<usize> {
        let slot = self.free.pop()?;
        self.word(slot, PID).store(0, Ordering::Relaxed);
        self.word(slot, GENERATION)
            .store(u64::from(generation), Ordering::Relaxed);
        self.word(slot, SERVED).store(0, Ordering::Relaxed);
        self.word(slot, SINCE_MS)
            .store(self.now_ms(), Ordering::Relaxed);
        self.word(slot, STATE)
            .store(State::Starting.word(), Ordering::Release);
        Some(slot)
    }

    /// Master, after fork: records the worker's pid.
    pub fn set_pid(&self, slot: usize, pid: Pid) {
        self.word(slot, PID)
            .store(pid.as_raw() as u64, Ordering::Relaxed);
    }

    /// Master, after reaping the worker: frees its slot and returns what it
    /// last said.
    pub fn release(&mut self, slot: usize) -> Option<Entry> {
        let entry = self.get(slot);
        self.word(slot, STATE).store(0, Ordering::Release);
        self.word(slot, PID).store(0, Ordering::Relaxed);
        if !self.free.contains(&slot) {
            self.free.push(slot);
        }
        entry
    }

    /// Reads one slot; `None` if it is free.
    pub fn get(&self, slot: usize) -> Option<Entry> {
        let state = State::from_word(self.word(slot, STATE).load(Ordering::Acquire))?;
        Some(Entry {
            pid: Pid::from_raw(self.word(slot, PID).load(Ordering::Relaxed) as i32),
            generation: self.word(slot, GENERATION).load(Ordering::Relaxed) as u32,
            state,
            served: self.word(slot, SERVED).load(Ordering::Relaxed),
            since_ms: self.word(slot, SINCE_MS).load(Ordering::Relaxed),
        })
    }

    /// In the worker: its own slot.
    pub fn slot(&self, slot: usize) -> Slot<'_> {
        Slot { board: self, slot }
    }
}

/// A worker's handle on its own slot.
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    board: &'a Scoreboard,
    slot: usize,
}

impl Slot<'_> {
    /// Publishes a new state.
    pub fn set(&self, state: State) {
        self.board
            .word(self.slot, SINCE_MS)
            .store(self.board.now_ms(), Ordering::Relaxed);
        self.board
            .word(self.slot, STATE)
            .store(state.word(), Ordering::Release);
    }

    /// Counts one more connection served.
    pub fn served_one(&self) {
        self.board
            .word(self.slot, SERVED)
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_written_and_released() {
        let mut board = Scoreboard::new(2).unwrap();
        let a = board.claim(1).unwrap();
        let b = board.claim(1).unwrap();
        assert_ne!(a, b);
        assert!(board.claim(1).is_none(), "only two slots");
        board.set_pid(a, Pid::from_raw(42));
        let e = board.get(a).unwrap();
        assert_eq!(
            (e.pid.as_raw(), e.generation, e.state),
            (42, 1, State::Starting)
        );
        let slot = board.slot(a);
        slot.set(State::Busy);
        slot.served_one();
        slot.set(State::Idle);
        let e = board.release(a).unwrap();
        assert_eq!((e.state, e.served), (State::Idle, 1));
        assert!(board.get(a).is_none());
        // A reused slot starts from scratch.
        let c = board.claim(2).unwrap();
        assert_eq!(c, a);
        let e = board.get(c).unwrap();
        assert_eq!((e.generation, e.served, e.state), (2, 0, State::Starting));
    }

    #[test]
    fn a_child_writes_what_the_parent_reads() {
        let mut board = Scoreboard::new(1).unwrap();
        let s = board.claim(1).unwrap();
        let pid = crate::sys::spawn(&[], &[], || {
            board.slot(s).served_one();
            board.slot(s).set(State::Busy);
            0
        })
        .unwrap();
        let _ = nix::sys::wait::waitpid(pid, None).unwrap();
        let e = board.get(s).unwrap();
        assert_eq!((e.state, e.served), (State::Busy, 1));
    }
}
