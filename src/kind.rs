//! The kinds of child the master keeps, one row each, in the spirit of
//! nginx's spawn callbacks and its `signals[]` table: what the log calls
//! one, its letter in the upgrade handover, which listeners it keeps after
//! the fork, how many the configuration in force wants, and the function
//! it runs. The master's supervision (spawning, retiring, reaping, the
//! status line, the handover) reads the table; a new kind of child is a
//! new row, not a flag in seven files.

use crate::config::{Config, Mode};
use crate::listen::{Listener, Service};
use crate::worker::Ctx;

/// What a child is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A worker of the pool: prefork (one connection at a time) or event
    /// (many), by the mode.
    Pool,
    /// A fork-mode child serving one connection.
    Conn,
    /// A process serving the `udp:` listeners (any mode).
    Udp,
    /// The process serving `--metrics` (any mode).
    Metrics,
    /// prefork: an event loop that serves the connections a restart or a
    /// crash kept in the vault from the moment the new master starts,
    /// instead of making them wait for a process each to be forked (a
    /// thousand forks take this machine half a second); it takes no new
    /// connection, hands what it holds to the workers on a reload as any
    /// worker does, and exits when its last connection ends.
    Carrier,
}

/// What a worker needs from the configuration it is started for, besides
/// its context.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub mode: Mode,
    /// event: `--worker-connections`.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub max_open: usize,
    /// Its `--max-requests`, jitter included (0: none).
    pub max_requests: u64,
    /// `--udp-rate`.
    pub udp_rate: u32,
}

/// What a worker runs after the fork: its listeners, its context and
/// its parameters in, its exit code out.
pub type Entry = fn(Vec<Listener>, Ctx<'_>, Params) -> i32;

/// A kind's row.
pub struct Row {
    pub kind: Kind,
    /// What the log calls one.
    pub name: &'static str,
    /// Its letter in the upgrade handover.
    pub tag: &'static str,
    /// The listeners it keeps after the fork (`None`: none; a fork-mode
    /// child keeps its connection only).
    pub keeps: Option<Service>,
    /// Whether it serves connections, which it hands over through the
    /// relay when it retires (and, a pool worker, takes from it).
    pub relays: bool,
    /// How many of it the configuration wants while it has a listener of
    /// its service (the pool's size is the pool's own affair).
    pub wanted: fn(&Config) -> usize,
    /// What it runs, with the listeners it kept (`None`: it is forked
    /// for a connection, not started).
    pub run: Option<Entry>,
}

/// Every kind, in [`Kind`] order.
pub const KINDS: [Row; 5] = [
    Row {
        kind: Kind::Pool,
        name: "worker",
        tag: "w",
        keeps: Some(Service::Echo),
        relays: true,
        wanted: |cfg| cfg.workers as usize,
        run: Some(pool),
    },
    Row {
        kind: Kind::Conn,
        name: "child",
        tag: "c",
        keeps: None,
        relays: true,
        wanted: |_| 0,
        run: None,
    },
    Row {
        kind: Kind::Udp,
        name: "udp worker",
        tag: "u",
        keeps: Some(Service::Datagrams),
        relays: false,
        wanted: |cfg| cfg.udp_workers as usize,
        run: Some(|l, ctx, p| crate::udp::run(l, ctx, p.udp_rate)),
    },
    Row {
        kind: Kind::Metrics,
        name: "metrics worker",
        tag: "m",
        keeps: Some(Service::Metrics),
        relays: false,
        wanted: |_| 1,
        run: Some(|l, ctx, _| crate::metrics::run(l, ctx)),
    },
    Row {
        kind: Kind::Carrier,
        name: "carrier",
        tag: "k",
        keeps: None,
        relays: true,
        wanted: |_| 0,
        run: Some(carry),
    },
];

/// A carrier: the event loop where there is one (elsewhere none is
/// started: the master hands what the vault holds to the pool).
fn carry(_: Vec<Listener>, ctx: Ctx<'_>, _: Params) -> i32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return crate::event::carry(ctx);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        drop(ctx);
        1
    }
}

/// A pool worker of the mode in force.
fn pool(listeners: Vec<Listener>, ctx: Ctx<'_>, p: Params) -> i32 {
    match p.mode {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Mode::Event => crate::event::run(listeners, ctx, p.max_open, p.max_requests),
        _ => crate::worker::prefork(listeners, ctx, p.max_requests),
    }
}

impl Kind {
    /// Its row.
    pub fn row(self) -> &'static Row {
        &KINDS[self.index()]
    }

    /// Its place in [`KINDS`], and in per-kind counts.
    pub fn index(self) -> usize {
        self as usize
    }

    /// What the log calls one.
    pub fn name(self) -> &'static str {
        self.row().name
    }

    /// The kind a handover's letter names.
    pub fn from_tag(tag: &str) -> Option<Kind> {
        KINDS.iter().find(|r| r.tag == tag).map(|r| r.kind)
    }

    /// Whether it is started from a configuration, with listeners, and
    /// supervised through a control pipe and a scoreboard slot (every kind
    /// but a fork-mode child).
    pub fn is_worker(self) -> bool {
        self.row().run.is_some()
    }

    /// The helpers: kinds started beside the pool, as many as
    /// [`Row::wanted`] says while a listener of theirs is open.
    pub fn helpers() -> impl Iterator<Item = Kind> {
        [Kind::Udp, Kind::Metrics].into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_kind_order_and_its_tags_are_unique() {
        for (i, row) in KINDS.iter().enumerate() {
            assert_eq!(row.kind.index(), i);
            assert_eq!(Kind::from_tag(row.tag), Some(row.kind));
        }
        assert_eq!(Kind::from_tag("x"), None);
        assert!(!Kind::Conn.is_worker());
        assert!(Kind::helpers().all(|k| k.is_worker() && k != Kind::Pool));
    }
}
