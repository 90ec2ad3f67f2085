//! The scoreboard: memory shared by the master and every child (Apache's
//! scoreboard), and nothing but storage: what the words mean to the
//! pool, the admission of clients or the metrics is decided elsewhere.
//!
//! Every field is an atomic word, so nobody ever waits on a lock held by a
//! process that died. The memory is laid out in regions ([`Region`]), each
//! reached through its own accessor:
//!
//! - the header: counters every process adds to (connections, bytes,
//!   refusals, datagrams, exits, reloads), the idle count that tells a
//!   worker when to wake the master, and the seed and clock all share;
//! - one slot per worker (pool, UDP, metrics): the master claims it before
//!   the fork and releases it once the worker is reaped; in between only
//!   the worker writes its state, counts and the place it holds;
//! - the tables (tables.rs): per-source counts in one-second windows for
//!   the connection and datagram rates, per-source places for
//!   `--max-per-ip`, and the place each fork-mode child holds.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::unistd::Pid;

use crate::sys::SharedWords;

mod counters;
mod tables;
pub use counters::{Cut, Dropped, Exited, Refusal};
pub use tables::{hold, take_held, Place, MAX_CHILDREN};

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

/// What a child told to stop does with its open connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandOver {
    /// Finishes them (a stop).
    Finish = 0,
    /// Hands each to a worker that serves on, through the relay (a
    /// reload, an upgrade, a smaller pool, `max-requests`).
    ToWorkers = 1,
    /// Puts them in the vault for the next master (a restart under
    /// systemd; see vault.rs).
    ToNextMaster = 2,
}

// Header words.
const IDLE: usize = 0;
const WAKE_BELOW: usize = 1;
const HIGH: usize = 2;
const ABANDONED: usize = 3; // connections whose client went away before they could be served
const HASH_SEED: usize = 6;
const SETUP_REPORTED_MS: usize = 7; // when a setup failure was last logged (+1)
const SETUP_UNREPORTED: usize = 8; // setup failures not logged since
const PLACES_EPOCH: usize = 9; // bumped when the places table is rebuilt
const EPOCH_US: usize = 10; // CLOCK_MONOTONIC at creation: one clock for every process
const LAYOUT_WORD: usize = 11; // which layout this is, for a new master adopting it
const HAND_OVER: usize = 12; // what a child told to stop does with its connections (HandOver)
const RELAYED: usize = 13; // connections waiting in the relay
const LEADER: usize = 14; // turns.rs: the slot of the worker that waits for connections (+1; 0: none)
const STOPPING: usize = 15; // 1: the master stops (it closed the fork-mode control pipe for that)
const UDP_ECHOED: usize = 16; // datagrams answered
const UDP_DROPPED: usize = 17; // one word per Dropped, room for 7
const REFUSED: usize = 24; // one word per Refusal, room for 8
const CONNECTIONS: usize = 32; // connections served, all modes
const BYTES: usize = 33; // bytes echoed back on them
const FORK_CHILDREN: usize = 34; // fork-mode children alive (the master writes it)
const RELOADS: usize = 35; // configurations put in force by SIGHUP
const EXITS: usize = 36; // one word per Exited
const START_SECS: usize = 39; // when the daemon started, Unix seconds
const CUT: usize = 40; // one word per Cut, room for 8
const HEADER: usize = 48; // six cache lines, so slots stay aligned

/// Changes whenever a word changes meaning, so that a new master never
/// reads an old layout as its own (it starts a new scoreboard instead).
const LAYOUT: u64 = 3;

// Word offsets within a slot; a slot is one 64-byte cache line.
const PID: usize = 0;
const GENERATION: usize = 1;
const STATE: usize = 2;
const SERVED: usize = 3;
const SINCE_MS: usize = 4;
const HELD: usize = 5; // the place this worker holds for its client (+1; 0: none)
const TOLD: usize = 6; // 1: the master closed this worker's control pipe on purpose
const OPEN: usize = 7; // event workers: connections open now
const WORDS: usize = 8;

/// The regions of the shared memory, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Header,
    Slots,
    /// `--max-conn-rate`: (second << 32) | count, per bucket.
    ConnRate,
    /// `--max-per-ip`: places taken, per bucket.
    Places,
    /// `--udp-rate`, apart so that a flood of datagrams never counts
    /// against a TCP client.
    DatagramRate,
    /// The place each fork-mode child behind a proxy holds (+1; 0: none).
    ForkHeld,
}

impl Region {
    const ALL: [Region; 6] = [
        Region::Header,
        Region::Slots,
        Region::ConnRate,
        Region::Places,
        Region::DatagramRate,
        Region::ForkHeld,
    ];

    /// Its length in words, for a board of `slots` slots.
    fn len(self, slots: usize) -> usize {
        match self {
            Region::Header => HEADER,
            Region::Slots => slots * WORDS,
            Region::ConnRate => tables::RATE_BUCKETS,
            Region::Places => tables::PLACE_BUCKETS,
            Region::DatagramRate => tables::RATE_BUCKETS,
            Region::ForkHeld => tables::FORK_HELD,
        }
    }

    /// Where it starts and ends, in words.
    fn range(self, slots: usize) -> std::ops::Range<usize> {
        let start = Region::ALL
            .iter()
            .take_while(|&&r| r != self)
            .map(|r| r.len(slots))
            .sum();
        start..start + self.len(slots)
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

/// The shared slots, and (in the master) which of them are free.
pub struct Scoreboard {
    mem: SharedWords,
    slots: usize,
    free: Vec<usize>,
}

impl Scoreboard {
    fn words(slots: usize) -> usize {
        Region::ALL.iter().map(|r| r.len(slots)).sum()
    }

    /// Maps `slots` slots; call before the first fork. `seed` keys the
    /// rate table's hash, so clients cannot choose their collisions.
    pub fn new(slots: usize, seed: u64) -> io::Result<Scoreboard> {
        let board = Scoreboard {
            mem: SharedWords::new(Self::words(slots))?,
            slots,
            // Popped from the end: slot 0 is handed out first.
            free: (0..slots).rev().collect(),
        };
        board.header(HASH_SEED).store(seed, Ordering::Relaxed);
        board.header(LAYOUT_WORD).store(LAYOUT, Ordering::Relaxed);
        board
            .header(EPOCH_US)
            .store(crate::time::monotonic_usec(), Ordering::Relaxed);
        Ok(board)
    }

    /// A new master after an upgrade: maps again the scoreboard its
    /// predecessor made (`fd`, of `slots` slots), where the old workers
    /// still write; the slots in `in_use` are theirs.
    pub fn adopt(
        fd: std::os::fd::OwnedFd,
        slots: usize,
        in_use: &[usize],
    ) -> io::Result<Scoreboard> {
        let mem = SharedWords::adopt(fd, Self::words(slots))?;
        let board = Scoreboard {
            mem,
            slots,
            free: (0..slots).rev().filter(|s| !in_use.contains(s)).collect(),
        };
        let layout = board.header(LAYOUT_WORD).load(Ordering::Relaxed);
        if layout != LAYOUT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("its layout is {layout}, not {LAYOUT}"),
            ));
        }
        Ok(board)
    }

    /// The memfd behind the scoreboard, to pass to a new master.
    pub fn fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.mem.fd()
    }

    /// How many slots it has.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// In a forked child: it needs the mapping, not the descriptor.
    pub fn close_fd_in_child(&mut self) {
        self.mem.close_fd_in_child();
    }

    /// Microseconds since the scoreboard was made, on the one clock all
    /// processes share (CLOCK_MONOTONIC), so old and new workers agree
    /// across a master's re-exec.
    fn elapsed_us(&self) -> u64 {
        crate::time::monotonic_usec().saturating_sub(self.header(EPOCH_US).load(Ordering::Relaxed))
    }

    fn header(&self, field: usize) -> &AtomicU64 {
        &self.region(Region::Header)[field]
    }

    fn word(&self, slot: usize, field: usize) -> &AtomicU64 {
        &self.region(Region::Slots)[slot * WORDS + field]
    }

    /// Master: what a child told to stop does with its open connections.
    pub fn set_hand_over(&self, h: HandOver) {
        self.header(HAND_OVER).store(h as u64, Ordering::Release);
    }

    /// What a child told to stop does with its open connections.
    pub fn hand_over(&self) -> HandOver {
        match self.header(HAND_OVER).load(Ordering::Acquire) {
            1 => HandOver::ToWorkers,
            2 => HandOver::ToNextMaster,
            _ => HandOver::Finish,
        }
    }

    /// The count of connections waiting in the relay (see relay.rs).
    pub fn relayed(&self) -> &AtomicU64 {
        self.header(RELAYED)
    }

    /// Master: idle workers below this make a worker that turns busy wake
    /// the master (0: do not wake it, it could not add a worker anyway).
    pub fn set_wake_below(&self, n: u32) {
        self.header(WAKE_BELOW)
            .store(u64::from(n), Ordering::Relaxed);
    }

    /// Counts a refused connection.
    pub fn refused(&self, why: Refusal) {
        self.header(REFUSED + why.index())
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Refused connections so far, by kind (in [`Refusal::ALL`] order).
    pub fn refusals(&self) -> [u64; 4] {
        Refusal::ALL.map(|r| self.header(REFUSED + r.index()).load(Ordering::Relaxed))
    }

    /// Counts a connection whose client went away before it could be
    /// served: it reset or closed before its PROXY header was complete, or
    /// before its address could be read (a balancer's health check). Not
    /// a refusal: nothing for an operator to act on.
    pub fn abandoned(&self) {
        self.header(ABANDONED).fetch_add(1, Ordering::Relaxed);
    }

    /// Connections whose client went away before they could be served.
    pub fn abandoned_total(&self) -> u64 {
        self.header(ABANDONED).load(Ordering::Relaxed)
    }

    /// Counts a connection served, and the bytes echoed on it.
    pub fn served(&self, bytes: u64) {
        self.connections_ended(1);
        self.echoed_bytes(bytes);
    }

    /// Counts `n` connections served (the fork-mode master, as it reaps
    /// their children).
    pub fn connections_ended(&self, n: u64) {
        self.header(CONNECTIONS).fetch_add(n, Ordering::Relaxed);
    }

    /// Counts bytes echoed back.
    pub fn echoed_bytes(&self, n: u64) {
        self.header(BYTES).fetch_add(n, Ordering::Relaxed);
    }

    /// Connections served, and bytes echoed on them, so far.
    pub fn served_totals(&self) -> (u64, u64) {
        (
            self.header(CONNECTIONS).load(Ordering::Relaxed),
            self.header(BYTES).load(Ordering::Relaxed),
        )
    }

    /// Master: publishes how many fork-mode children are alive.
    pub fn set_fork_children(&self, n: usize) {
        self.header(FORK_CHILDREN)
            .store(n as u64, Ordering::Relaxed);
    }

    /// Fork-mode children alive, as the master last said.
    pub fn fork_children(&self) -> u64 {
        self.header(FORK_CHILDREN).load(Ordering::Relaxed)
    }

    /// Master: counts a reload put in force.
    pub fn reloaded(&self) {
        self.header(RELOADS).fetch_add(1, Ordering::Relaxed);
    }

    /// Reloads put in force so far.
    pub fn reloads(&self) -> u64 {
        self.header(RELOADS).load(Ordering::Relaxed)
    }

    /// Master: counts a worker's end.
    pub fn exited(&self, how: Exited) {
        self.header(EXITS + how as usize)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Workers' ends so far, in [`Exited::ALL`] order.
    pub fn exits(&self) -> [u64; 3] {
        Exited::ALL.map(|e| self.header(EXITS + e as usize).load(Ordering::Relaxed))
    }

    /// Counts an open connection closed because it could not be placed.
    pub fn cut(&self, why: Cut, n: u64) {
        self.header(CUT + why as usize)
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Open connections closed because they could not be placed, by why.
    pub fn cuts(&self) -> [u64; 4] {
        Cut::ALL.map(|c| self.header(CUT + c as usize).load(Ordering::Relaxed))
    }

    /// Master: records when the daemon started (kept across an upgrade).
    pub fn set_start_secs(&self, secs: u64) {
        self.header(START_SECS).store(secs, Ordering::Relaxed);
    }

    /// When the daemon started, in Unix seconds.
    pub fn start_secs(&self) -> u64 {
        self.header(START_SECS).load(Ordering::Relaxed)
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

    /// Counts `n` datagrams answered.
    pub fn udp_echoed(&self, n: u64) {
        self.header(UDP_ECHOED).fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a datagram dropped unanswered.
    pub fn udp_dropped(&self, why: Dropped) {
        self.header(UDP_DROPPED + why.index())
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Datagrams answered, and dropped by reason (in [`Dropped::ALL`]
    /// order).
    pub fn udp_counts(&self) -> (u64, [u64; 6]) {
        let dropped =
            Dropped::ALL.map(|d| self.header(UDP_DROPPED + d.index()).load(Ordering::Relaxed));
        (self.header(UDP_ECHOED).load(Ordering::Relaxed), dropped)
    }

    /// A child that failed to set itself up asks whether to log it: yes at
    /// most once per `interval` across all processes (with the count of
    /// failures not logged since), since every child forked in a crash
    /// loop fails for the same reason.
    pub fn setup_failure_report(&self, interval: std::time::Duration) -> Option<u64> {
        let now = self.now_ms() + 1; // 0 means "never"
        let last = self.header(SETUP_REPORTED_MS).load(Ordering::Relaxed);
        let due = last == 0 || now >= last.saturating_add(interval.as_millis() as u64);
        let claimed = due
            && self
                .header(SETUP_REPORTED_MS)
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if claimed {
            Some(self.header(SETUP_UNREPORTED).swap(0, Ordering::Relaxed))
        } else {
            self.header(SETUP_UNREPORTED)
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    fn now_ms(&self) -> u64 {
        self.elapsed_us() / 1000
    }

    /// How long ago a slot's state changed, from its `since_ms`.
    pub fn age(&self, since_ms: u64) -> std::time::Duration {
        std::time::Duration::from_millis(self.now_ms().saturating_sub(since_ms))
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

    /// Master, before it closes the fork-mode control pipe: it stops.
    pub fn set_stopping(&self) {
        self.header(STOPPING).store(1, Ordering::Release);
    }

    /// Whether the master stops (see [`Scoreboard::set_stopping`]).
    pub fn stopping(&self) -> bool {
        self.header(STOPPING).load(Ordering::Acquire) == 1
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

    /// Publishes how many connections this (event) worker has open.
    /// Whether the master closed this worker's control pipe on purpose
    /// (see [`Scoreboard::tell`]).
    pub fn told(&self) -> bool {
        self.board.word(self.slot, TOLD).load(Ordering::Acquire) == 1
    }

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

#[cfg(test)]
mod tests;
