//! What the header's counters count, by kind: connections refused by
//! reason, datagrams dropped by reason, workers' ends by cause, open
//! connections cut.

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
