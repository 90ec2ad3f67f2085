//! The header's counters: what they count, by kind (connections refused
//! by reason, datagrams dropped by reason, workers' ends by cause, open
//! connections cut), and the [`Scoreboard`]'s methods that add to them
//! and read them, for the status line and the metrics. Every process
//! adds; nobody waits.

use std::sync::atomic::Ordering;

use super::{
    Scoreboard, ABANDONED, BYTES, CONNECTIONS, CUT, EXITS, FORK_CHILDREN, REFUSED, RELOADS,
    SETUP_REPORTED_MS, SETUP_UNREPORTED, START_SECS, UDP_DROPPED, UDP_ECHOED,
};

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

    pub(super) fn index(self) -> usize {
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

/// Why an open connection was closed by us rather than its client or a
/// limit: it could not be placed where it was to go on. Each is logged
/// (rate-limited) and counted in `echo_forkd_connections_cut_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Handed over, no worker took it within `--shutdown-timeout`
    /// (prefork at `max-workers` with every worker busy).
    Unplaced,
    /// It could not be kept for the next master (restart, crash).
    Vault,
    /// A worker took it without a descriptor free for it.
    Descriptors,
    /// Its worker was killed at `--shutdown-timeout` with it open: a stop
    /// that lasted too long, or a hand-over that never found room.
    Timeout,
}

impl Cut {
    /// Every kind, in counter order.
    pub const ALL: [Cut; 4] = [Cut::Unplaced, Cut::Vault, Cut::Descriptors, Cut::Timeout];

    /// The `reason` label.
    pub fn name(self) -> &'static str {
        match self {
            Cut::Unplaced => "unplaced",
            Cut::Vault => "vault",
            Cut::Descriptors => "descriptors",
            Cut::Timeout => "timeout",
        }
    }

    /// The reason in words, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Cut::Unplaced => "handed over, no worker free to take them within shutdown-timeout",
            Cut::Vault => "they could not be kept for the next master",
            Cut::Descriptors => "the worker that took them had no descriptor free",
            Cut::Timeout => "their worker was killed at shutdown-timeout",
        }
    }
}

/// Why a connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--deny`, or no `--allow` matched.
    Denied,
    /// `--max-per-ip`.
    PerIp,
    /// `--max-conn-rate` (for a datagram: `--udp-rate`).
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

    /// Its counter's index.
    pub fn index(self) -> usize {
        self as usize
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

impl Scoreboard {
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
}
