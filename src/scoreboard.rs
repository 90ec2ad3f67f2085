//! The scoreboard: one slot per prefork worker in memory shared by the
//! master and its workers (Apache's scoreboard).
//!
//! The master claims a slot before it forks a worker and releases it once
//! the worker is reaped; in between only the worker writes its state,
//! count and current client. Every field is an atomic word, so nobody ever
//! waits on a lock held by a process that died. The master reads the slots
//! to know which workers are ready, idle or busy: for reloads, the spare
//! policy, TTIN/TTOU and the status line.
//!
//! A header holds what all workers share: a running count of idle workers
//! (a hint that tells a worker when to wake the master because spares ran
//! short), counters of refused connections, and after the slots a table of
//! per-address connection counts for `--max-conn-rate`, and one of the
//! connections each address has open in event workers, for `--max-per-ip`
//! (a prefork worker publishes its one client in its slot instead).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::unistd::Pid;

use crate::access::Policy;
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

// Header words.
const IDLE: usize = 0;
const WAKE_BELOW: usize = 1;
const HIGH: usize = 2;
const HASH_SEED: usize = 6;
const SETUP_REPORTED_MS: usize = 7; // when a setup failure was last logged (+1)
const SETUP_UNREPORTED: usize = 8; // setup failures not logged since
const PEERS_EPOCH: usize = 9; // bumped when the open-connection table is rebuilt
const EPOCH_US: usize = 10; // CLOCK_MONOTONIC at creation: one clock for every process
const UDP_ECHOED: usize = 16; // datagrams answered
const UDP_DROPPED: usize = 17; // one word per Dropped, room for 7
const REFUSED: usize = 24; // one word per Refusal, room for 8
const CONNECTIONS: usize = 32; // connections served, all modes
const BYTES: usize = 33; // bytes echoed back on them
const FORK_CHILDREN: usize = 34; // fork-mode children alive (the master writes it)
const RELOADS: usize = 35; // configurations put in force by SIGHUP
const EXITS: usize = 36; // one word per Exited
const START_SECS: usize = 39; // when the daemon started, Unix seconds
const HEADER: usize = 40; // five cache lines, so slots stay aligned

// Word offsets within a slot; a slot is one 64-byte cache line.
const PID: usize = 0;
const GENERATION: usize = 1;
const STATE: usize = 2;
const SERVED: usize = 3;
const SINCE_MS: usize = 4;
const PEER_HI: usize = 5;
const PEER_LO: usize = 6;
const OPEN: usize = 7; // event workers: connections open now
const WORDS: usize = 8;

/// Buckets of the connection-rate table: (second << 32) | count.
const RATE_BUCKETS: usize = 8192;
/// Buckets of the open-connection table of event workers: a count each.
/// Addresses that share a bucket share a count, which errs towards
/// refusing (as the rate table does); 64 Ki buckets keep that rare.
const PEER_BUCKETS: usize = 65_536;
/// Buckets of the datagram-rate table of `--udp-rate`, as the
/// connection-rate table, apart so that a flood of datagrams never
/// counts against a TCP client.
const UDP_RATE_BUCKETS: usize = 8192;
/// fork mode behind a proxy: the client of each child, by its index (two
/// words each), so that the master can take it off the open-connection
/// table however the child ends. One per `max-children` at most.
const FORK_PEERS: usize = crate::config::ceiling::MAX_CHILDREN as usize;

/// Why a connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--deny`, or no `--allow` matched.
    Denied,
    /// `--max-per-ip`.
    PerIp,
    /// `--max-conn-rate`.
    Rate,
    /// `--proxy-protocol`: not from a trusted proxy, or no valid header
    /// in time.
    Proxy,
}

impl Refusal {
    /// Every kind, in counter order.
    pub const ALL: [Refusal; 4] = [
        Refusal::Denied,
        Refusal::PerIp,
        Refusal::Rate,
        Refusal::Proxy,
    ];

    fn index(self) -> usize {
        match self {
            Refusal::Denied => 0,
            Refusal::PerIp => 1,
            Refusal::Rate => 2,
            Refusal::Proxy => 3,
        }
    }

    /// The `reason` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Denied => "deny",
            Refusal::PerIp => "per_ip",
            Refusal::Rate => "rate",
            Refusal::Proxy => "proxy",
        }
    }

    /// The limit's name, for the log.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::Denied => "allow/deny rules",
            Refusal::PerIp => "max-per-ip",
            Refusal::Rate => "max-conn-rate",
            Refusal::Proxy => "PROXY protocol",
        }
    }
}

/// Why a datagram was dropped unanswered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// From a source port below 1024: another service's, which would echo
    /// the echo back (the classic echo/chargen loop).
    Port,
    /// From a broadcast, multicast or unspecified address: forged.
    Source,
    /// `--deny`, or no `--allow` matched.
    Denied,
    /// Over `--udp-rate` from its source.
    Rate,
    /// Larger than the buffer: never echoed short.
    Truncated,
    /// The same bytes from one source again and again: an echo loop with
    /// another service (see `udp::screen`).
    Loop,
}

impl Dropped {
    /// Every kind, in counter order.
    pub const ALL: [Dropped; 6] = [
        Dropped::Port,
        Dropped::Source,
        Dropped::Denied,
        Dropped::Rate,
        Dropped::Truncated,
        Dropped::Loop,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// The reason in words, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Dropped::Port => "source port below 1024",
            Dropped::Source => "broadcast, multicast or unspecified source",
            Dropped::Denied => "allow/deny rules",
            Dropped::Rate => "over udp-rate",
            Dropped::Truncated => "larger than the buffer",
            Dropped::Loop => "an echo loop",
        }
    }

    /// The reason's name, for the log and the metrics' `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Dropped::Port => "port",
            Dropped::Source => "source",
            Dropped::Denied => "deny",
            Dropped::Rate => "rate",
            Dropped::Truncated => "truncated",
            Dropped::Loop => "loop",
        }
    }
}

/// How a worker (of the pool, or for UDP or metrics) ended, for the
/// metrics' `echo_forkd_worker_exits_total{cause}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exited {
    /// Exit status 0: retired, recycled (`max-requests`), or told to stop.
    Clean,
    /// Killed by a signal.
    Signal,
    /// A non-zero exit status.
    Error,
}

impl Exited {
    /// Every kind, in counter order.
    pub const ALL: [Exited; 3] = [Exited::Clean, Exited::Signal, Exited::Error];

    /// The `cause` label.
    pub fn name(self) -> &'static str {
        match self {
            Exited::Clean => "exit",
            Exited::Signal => "signal",
            Exited::Error => "error",
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

/// The shared slots, and (in the master) which of them are free.
pub struct Scoreboard {
    mem: SharedWords,
    slots: usize,
    free: Vec<usize>,
}

impl Scoreboard {
    fn words(slots: usize) -> usize {
        HEADER + slots * WORDS + RATE_BUCKETS + PEER_BUCKETS + UDP_RATE_BUCKETS + 2 * FORK_PEERS
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
        Ok(Scoreboard {
            mem,
            slots,
            free: (0..slots).rev().filter(|s| !in_use.contains(s)).collect(),
        })
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
        &self.mem.words()[field]
    }

    fn word(&self, slot: usize, field: usize) -> &AtomicU64 {
        &self.mem.words()[HEADER + slot * WORDS + field]
    }

    /// The key's hash, seeded so that clients cannot choose collisions.
    fn hash(&self, key: u128) -> usize {
        let mut h = self.header(HASH_SEED).load(Ordering::Relaxed)
            ^ (key as u64)
            ^ ((key >> 64) as u64).rotate_left(29);
        // splitmix64's finaliser.
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        h as usize
    }

    fn bucket(&self, key: u128) -> &AtomicU64 {
        &self.mem.words()[HEADER + self.slots * WORDS + self.hash(key) % RATE_BUCKETS]
    }

    fn peer_bucket(&self, key: u128) -> &AtomicU64 {
        let at = HEADER + self.slots * WORDS + RATE_BUCKETS + self.hash(key) % PEER_BUCKETS;
        &self.mem.words()[at]
    }

    /// Event workers: counts one more open connection from `key` if that
    /// keeps it within `limit`; false (nothing counted) if not.
    pub fn peer_open(&self, key: u128, limit: u32) -> bool {
        let b = self.peer_bucket(key);
        let mut cur = b.load(Ordering::Relaxed);
        loop {
            if cur >= u64::from(limit) {
                return false;
            }
            match b.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Event workers: counts an open connection from `key` whatever the
    /// limit (one counted before the table was rebuilt).
    pub fn peer_recount(&self, key: u128) {
        self.peer_bucket(key).fetch_add(1, Ordering::Relaxed);
    }

    /// Event workers: a connection from `key` closed.
    pub fn peer_closed(&self, key: u128) {
        let b = self.peer_bucket(key);
        // Never below zero, even for a count a rebuild already dropped.
        let _ = b.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The open-connection table's generation: when it changes, every
    /// event worker counts its open connections into it again.
    pub fn peers_epoch(&self) -> u64 {
        self.header(PEERS_EPOCH).load(Ordering::Acquire)
    }

    /// Master, after an event worker died holding connections (its counts
    /// would stay forever): empties the table and asks the live workers
    /// to count theirs again. Until they do, counts are low, which errs
    /// towards admitting, for a moment.
    pub fn peers_rebuild(&self) {
        let start = HEADER + self.slots * WORDS + RATE_BUCKETS;
        for w in &self.mem.words()[start..start + PEER_BUCKETS] {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.header(PEERS_EPOCH).fetch_add(1, Ordering::AcqRel);
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

    /// Master: records when the daemon started (kept across an upgrade).
    pub fn set_start_secs(&self, secs: u64) {
        self.header(START_SECS).store(secs, Ordering::Relaxed);
    }

    /// When the daemon started, in Unix seconds.
    pub fn start_secs(&self) -> u64 {
        self.header(START_SECS).load(Ordering::Relaxed)
    }

    /// Every slot in use, as it reads now.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        let high = self.header(HIGH).load(Ordering::Relaxed) as usize;
        (0..high.min(self.slots)).filter_map(|s| self.get(s))
    }

    fn fork_peer(&self, index: usize) -> (&AtomicU64, &AtomicU64) {
        let at = HEADER
            + self.slots * WORDS
            + RATE_BUCKETS
            + PEER_BUCKETS
            + UDP_RATE_BUCKETS
            + 2 * (index % FORK_PEERS);
        let w = self.mem.words();
        (&w[at], &w[at + 1])
    }

    /// A fork-mode child behind a proxy, at `index`: publishes its client
    /// (0: none), before it counts it in the open-connection table.
    pub fn set_fork_peer(&self, index: usize, key: u128) {
        let (hi, lo) = self.fork_peer(index);
        hi.store((key >> 64) as u64, Ordering::Relaxed);
        lo.store(key as u64, Ordering::Relaxed);
    }

    /// Master, reaping the child at `index`: its client, if it published
    /// one; the index is free again.
    pub fn take_fork_peer(&self, index: usize) -> Option<u128> {
        let (hi, lo) = self.fork_peer(index);
        let key = (u128::from(hi.swap(0, Ordering::Relaxed)) << 64)
            | u128::from(lo.swap(0, Ordering::Relaxed));
        (key != 0).then_some(key)
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

    /// Counts a new connection from `key` in the current one-second window
    /// and says whether it is within `limit`. Addresses that share a
    /// bucket share a count, which errs towards refusing; each window
    /// starts from zero, so a refusal is a pause, never a ban.
    pub fn conn_rate_ok(&self, key: u128, limit: u32) -> bool {
        self.count_in_window(self.bucket(key), limit)
    }

    /// As [`Scoreboard::conn_rate_ok`], for a datagram from `key`
    /// (`--udp-rate`), in a table of its own.
    pub fn datagram_rate_ok(&self, key: u128, limit: u32) -> bool {
        let at = HEADER
            + self.slots * WORDS
            + RATE_BUCKETS
            + PEER_BUCKETS
            + self.hash(key) % UDP_RATE_BUCKETS;
        self.count_in_window(&self.mem.words()[at], limit)
    }

    fn count_in_window(&self, b: &AtomicU64, limit: u32) -> bool {
        let second = (self.elapsed_us() / 1_000_000) & 0xffff_ffff;
        let mut cur = b.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == second {
                // The count stays in its 32 bits.
                (cur & !0xffff_ffff) | ((cur & 0xffff_ffff) + 1).min(0xffff_ffff)
            } else {
                (second << 32) | 1
            };
            match b.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next & 0xffff_ffff <= u64::from(limit),
                Err(seen) => cur = seen,
            }
        }
    }

    /// The checks every accepting process makes the same way: the
    /// allow/deny rules for the address, then the connection rate of its
    /// source (which counts this attempt). `--max-per-ip` is counted by
    /// the caller, by source too.
    pub fn screen(&self, policy: &Policy, key: u128) -> Option<Refusal> {
        if !policy.rules.allows(key) {
            Some(Refusal::Denied)
        } else if policy.max_conn_rate > 0
            && !self.conn_rate_ok(policy.source(key), policy.max_conn_rate)
        {
            Some(Refusal::Rate)
        } else {
            None
        }
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

    /// Workers now serving a client at `key` (slots in use only).
    pub fn peers(&self, key: u128) -> u32 {
        let (hi, lo) = ((key >> 64) as u64, key as u64);
        let high = (self.header(HIGH).load(Ordering::Relaxed) as usize).min(self.slots);
        (0..high)
            .filter(|&s| {
                self.word(s, PEER_LO).load(Ordering::Relaxed) == lo
                    && self.word(s, PEER_HI).load(Ordering::Relaxed) == hi
            })
            .count() as u32
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
        self.word(slot, PEER_HI).store(0, Ordering::Relaxed);
        self.word(slot, PEER_LO).store(0, Ordering::Relaxed);
        self.word(slot, GENERATION)
            .store(u64::from(generation), Ordering::Relaxed);
        self.word(slot, SERVED).store(0, Ordering::Relaxed);
        self.word(slot, OPEN).store(0, Ordering::Relaxed);
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
        if self.word(slot, STATE).swap(0, Ordering::AcqRel) == State::Idle.word() {
            // It died idle: it never took itself off the count.
            self.header(IDLE).fetch_sub(1, Ordering::Relaxed);
        }
        self.word(slot, PID).store(0, Ordering::Relaxed);
        self.word(slot, PEER_HI).store(0, Ordering::Relaxed);
        self.word(slot, PEER_LO).store(0, Ordering::Relaxed);
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

    /// Publishes the client being served (0: none), for `--max-per-ip`.
    pub fn set_peer(&self, key: u128) {
        self.board
            .word(self.slot, PEER_HI)
            .store((key >> 64) as u64, Ordering::Relaxed);
        self.board
            .word(self.slot, PEER_LO)
            .store(key as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_written_and_released() {
        let mut board = Scoreboard::new(2, 1).unwrap();
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
    fn idle_count_wakes_the_master_only_when_spares_run_short() {
        let mut board = Scoreboard::new(3, 1).unwrap();
        let (a, b) = (board.claim(1).unwrap(), board.claim(1).unwrap());
        board.set_wake_below(1);
        assert!(!board.slot(a).set(State::Idle));
        assert!(!board.slot(b).set(State::Idle));
        assert!(!board.slot(a).set(State::Busy), "one idle left");
        assert!(board.slot(b).set(State::Busy), "none idle left");
        board.set_wake_below(0);
        assert!(!board.slot(b).set(State::Idle));
        assert!(!board.slot(b).set(State::Busy), "waking disarmed");
        // A worker that dies idle is taken off the count by the master.
        board.set_wake_below(1);
        board.slot(a).set(State::Idle);
        board.release(a);
        assert!(!board.slot(b).set(State::Idle));
        assert!(board.slot(b).set(State::Busy), "a's death was counted");
    }

    #[test]
    fn peers_and_rates_are_counted_per_address() {
        let mut board = Scoreboard::new(4, 7).unwrap();
        let (a, b) = (board.claim(1).unwrap(), board.claim(1).unwrap());
        let (x, y) = (
            crate::access::key([127, 0, 0, 1].into()),
            crate::access::key([127, 0, 0, 2].into()),
        );
        board.slot(a).set_peer(x);
        board.slot(b).set_peer(x);
        assert_eq!((board.peers(x), board.peers(y)), (2, 0));
        board.slot(b).set_peer(0);
        assert_eq!(board.peers(x), 1);
        board.release(a);
        assert_eq!(board.peers(x), 0, "a released slot frees its peer");
        assert!((0..3).all(|_| board.conn_rate_ok(y, 3)));
        assert!(!board.conn_rate_ok(y, 3), "a fourth in the same second");
        board.refused(Refusal::Rate);
        assert_eq!(board.refusals(), [0, 0, 1, 0]);
    }

    #[test]
    fn open_connections_per_address_are_bounded_and_rebuilt() {
        let board = Scoreboard::new(1, 3).unwrap();
        let (x, y) = (
            crate::access::key([192, 0, 2, 1].into()),
            crate::access::key([192, 0, 2, 2].into()),
        );
        assert!(board.peer_open(x, 2) && board.peer_open(x, 2));
        assert!(!board.peer_open(x, 2), "a third would be one too many");
        assert!(board.peer_open(y, 2));
        board.peer_closed(x);
        assert!(board.peer_open(x, 2), "a place came free");
        // A worker died holding connections: the table starts over, and the
        // live ones count theirs again.
        let epoch = board.peers_epoch();
        board.peers_rebuild();
        assert_ne!(board.peers_epoch(), epoch);
        board.peer_recount(y);
        assert!(board.peer_open(x, 2) && board.peer_open(x, 2));
        assert!(!board.peer_open(y, 1));
        board.peer_closed(y);
        board.peer_closed(y);
        assert!(board.peer_open(y, 1), "never below zero");
    }

    #[test]
    fn setup_failures_are_reported_once_per_interval() {
        let board = Scoreboard::new(1, 1).unwrap();
        let every = std::time::Duration::from_secs(3600);
        assert_eq!(board.setup_failure_report(every), Some(0));
        assert_eq!(board.setup_failure_report(every), None);
        assert_eq!(board.setup_failure_report(every), None);
        let now = std::time::Duration::ZERO;
        assert_eq!(board.setup_failure_report(now), Some(2));
    }

    #[test]
    fn a_child_writes_what_the_parent_reads() {
        let mut board = Scoreboard::new(1, 1).unwrap();
        let s = board.claim(1).unwrap();
        // SAFETY: the test harness has other threads, but this child only
        // touches atomics in the shared mapping and `_exit`s: no heap, no
        // lock, which is what spawn's contract guards.
        #[allow(unsafe_code)]
        let pid = unsafe {
            crate::sys::spawn(&[], &[], || {
                board.slot(s).served_one();
                board.slot(s).set(State::Busy);
                0
            })
        }
        .unwrap();
        let _ = nix::sys::wait::waitpid(pid, None).unwrap();
        let e = board.get(s).unwrap();
        assert_eq!((e.state, e.served), (State::Busy, 1));
    }
}
