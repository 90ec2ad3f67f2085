//! The scoreboard: memory shared by the master and every child (Apache's
//! scoreboard), and nothing but storage: what the words mean to the
//! pool, the admission of clients or the metrics is decided elsewhere.
//!
//! Every field is an atomic word, so nobody ever waits on a lock held by a
//! process that died. The memory is laid out in regions ([`Region`]), each
//! reached through its own accessor:
//!
//! - the header: counters every process adds to (connections, bytes,
//!   refusals, datagrams, exits, reloads; counters.rs), the idle count
//!   that tells a worker when to wake the master (slots.rs), what the
//!   master tells every child, and the seed and clock all share;
//! - one slot per worker (pool, UDP, metrics; slots.rs): the master claims
//!   it before the fork and releases it once the worker is reaped; in
//!   between only the worker writes its state, counts and the place it
//!   holds;
//! - the tables (tables.rs): per-source counts in one-second windows for
//!   the connection and datagram rates, per-source places for
//!   `--max-per-ip`, and the place each fork-mode child holds.
//!
//! Here: the layout (every word's offset, so that a change of meaning
//! bumps [`LAYOUT`] in one place), making and adopting the memory, and
//! the header words through which the master tells every child something.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys::SharedWords;

mod counters;
mod slots;
mod tables;
pub use counters::{Cut, Dropped, Exited, Refusal};
pub use slots::{Entry, Slot, State};
pub use tables::{clear, hold, mark_taken, take_held, taken, Place, MAX_CHILDREN};

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

    /// The count of connections waiting in the relay (see relay/).
    pub fn relayed(&self) -> &AtomicU64 {
        self.header(RELAYED)
    }

    /// Master, before it closes the fork-mode control pipe: it stops.
    pub fn set_stopping(&self) {
        self.header(STOPPING).store(1, Ordering::Release);
    }

    /// Whether the master stops (see [`Scoreboard::set_stopping`]).
    pub fn stopping(&self) -> bool {
        self.header(STOPPING).load(Ordering::Acquire) == 1
    }

    fn now_ms(&self) -> u64 {
        self.elapsed_us() / 1000
    }

    /// How long ago a slot's state changed, from its `since_ms`.
    pub fn age(&self, since_ms: u64) -> std::time::Duration {
        std::time::Duration::from_millis(self.now_ms().saturating_sub(since_ms))
    }
}

#[cfg(test)]
mod tests;
