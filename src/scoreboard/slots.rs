//! The slots: one cache line per worker (pool, UDP, metrics), claimed by
//! the master before the fork and released once the worker is reaped; in
//! between only the worker writes its state, counts and the place it
//! holds, through its [`Slot`]. Also what reads across the slots: the
//! idle count that tells a worker when to wake the master, and turns.rs's
//! leader. Their words' offsets are with the rest of the layout in mod.rs.

use std::sync::atomic::{AtomicU64, Ordering};

use nix::unistd::Pid;

use super::{
    Scoreboard, GENERATION, HELD, HIGH, IDLE, LEADER, OPEN, PID, SERVED, SINCE_MS, STATE, TOLD,
    WAKE_BELOW,
};

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
    /// Connections open now (event workers; 0 or 1 for the others).
    pub open: u64,
}

impl Scoreboard {
    /// Master: idle workers below this make a worker that turns busy wake
    /// the master (0: do not wake it, it could not add a worker anyway).
    pub fn set_wake_below(&self, n: u32) {
        self.header(WAKE_BELOW)
            .store(u64::from(n), Ordering::Relaxed);
    }

    /// turns.rs: the slot whose worker leads (+1; 0: nobody).
    pub fn leader(&self) -> u64 {
        self.header(LEADER).load(Ordering::SeqCst)
    }

    /// turns.rs: makes `to` the leader if `from` still is.
    pub fn swap_leader(&self, from: u64, to: u64) -> bool {
        self.header(LEADER)
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// turns.rs: an idle worker other than the one in `except`, of the
    /// newest generation (an older one is about to retire), and its pid.
    /// Only pool workers are ever idle.
    pub fn idle_worker(&self, except: Option<usize>) -> Option<(usize, Pid)> {
        let high = self.header(HIGH).load(Ordering::Relaxed) as usize;
        let start = except.map_or(0, |s| s + 1);
        (0..high.min(self.slots))
            .map(|k| (start + k) % high.max(1))
            .filter(|&s| Some(s) != except)
            .filter_map(|s| self.get(s).map(|e| (s, e)))
            .filter(|(_, e)| e.state == State::Idle && e.pid.as_raw() > 0)
            .max_by_key(|(_, e)| e.generation)
            .map(|(s, e)| (s, e.pid))
    }

    /// Every slot in use, as it reads now.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        let high = self.header(HIGH).load(Ordering::Relaxed) as usize;
        (0..high.min(self.slots)).filter_map(|s| self.get(s))
    }

    /// Master, before fork: takes a free slot for a worker of `generation`;
    /// `None` when every slot is taken.
    pub fn claim(&mut self, generation: u32) -> Option<usize> {
        let slot = self.free.pop()?;
        self.header(HIGH)
            .fetch_max(slot as u64 + 1, Ordering::Relaxed);
        self.word(slot, PID).store(0, Ordering::Relaxed);
        self.word(slot, HELD).store(0, Ordering::Relaxed);
        self.word(slot, GENERATION)
            .store(u64::from(generation), Ordering::Relaxed);
        self.word(slot, SERVED).store(0, Ordering::Relaxed);
        self.word(slot, OPEN).store(0, Ordering::Relaxed);
        self.word(slot, TOLD).store(0, Ordering::Relaxed);
        self.word(slot, SINCE_MS)
            .store(self.now_ms(), Ordering::Relaxed);
        self.word(slot, STATE)
            .store(State::Starting.word(), Ordering::Release);
        Some(slot)
    }

    /// Master, before it closes the control pipe of the worker in `slot`:
    /// the end of the pipe means "stop", not "the master died" (a child
    /// can see the pipe end before the kernel gives it a new parent).
    pub fn tell(&self, slot: usize) {
        self.word(slot, TOLD).store(1, Ordering::Release);
    }

    /// Master, after fork: records the worker's pid.
    pub fn set_pid(&self, slot: usize, pid: Pid) {
        self.word(slot, PID)
            .store(pid.as_raw() as u64, Ordering::Relaxed);
    }

    /// The word where the worker in `slot` publishes the place it holds.
    pub fn slot_held(&self, slot: usize) -> &AtomicU64 {
        self.word(slot, HELD)
    }

    /// Master, after reaping the worker: frees its slot and returns what it
    /// last said.
    pub fn release(&mut self, slot: usize) -> Option<Entry> {
        let entry = self.get(slot);
        if self.word(slot, STATE).swap(0, Ordering::AcqRel) == State::Idle.word() {
            // It died idle: it never took itself off the count.
            self.header(IDLE).fetch_sub(1, Ordering::Relaxed);
        }
        self.word(slot, PID).store(0, Ordering::Relaxed);
        self.word(slot, HELD).store(0, Ordering::Relaxed);
        // Each claimed slot is released once: by the reap of its worker,
        // or by the failed spawn that claimed it.
        self.free.push(slot);
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
            open: self.word(slot, OPEN).load(Ordering::Relaxed),
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

impl<'a> Slot<'a> {
    /// Its index.
    pub fn index(&self) -> usize {
        self.slot
    }

    /// The scoreboard this slot is on.
    pub fn board(&self) -> &'a Scoreboard {
        self.board
    }

    /// Publishes a new state. True when the master should be woken: this
    /// worker stopped being idle and spares are now short.
    pub fn set(&self, state: State) -> bool {
        let b = self.board;
        b.word(self.slot, SINCE_MS)
            .store(b.now_ms(), Ordering::Relaxed);
        let old = b
            .word(self.slot, STATE)
            .swap(state.word(), Ordering::AcqRel);
        let idle = State::Idle.word();
        if old != idle && state == State::Idle {
            b.header(IDLE).fetch_add(1, Ordering::Relaxed);
        } else if old == idle && state != State::Idle {
            let left = b
                .header(IDLE)
                .fetch_sub(1, Ordering::Relaxed)
                .wrapping_sub(1);
            // Signed: a worker killed mid-update can leave the hint off by one.
            return (left as i64) < b.header(WAKE_BELOW).load(Ordering::Relaxed) as i64;
        }
        false
    }

    /// Where this worker publishes the place it holds for its client
    /// (`--max-per-ip`), so that the master can take it back if the
    /// worker dies.
    pub fn held(&self) -> &'a AtomicU64 {
        self.board.word(self.slot, HELD)
    }

    /// Whether the master closed this worker's control pipe on purpose
    /// (see [`Scoreboard::tell`]).
    pub fn told(&self) -> bool {
        self.board.word(self.slot, TOLD).load(Ordering::Acquire) == 1
    }

    /// Publishes how many connections this (event) worker has open.
    pub fn set_open(&self, n: usize) {
        self.board
            .word(self.slot, OPEN)
            .store(n as u64, Ordering::Relaxed);
    }

    /// Counts one more connection served.
    pub fn served_one(&self) {
        self.board
            .word(self.slot, SERVED)
            .fetch_add(1, Ordering::Relaxed);
    }
}
