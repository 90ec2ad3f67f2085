//! The kinds of child the master keeps, in the spirit of nginx's spawn
//! callbacks and its `signals[]` table: what the log calls one, its letter
//! in the upgrade inheritance, which listeners it keeps after the fork, and
//! whether it serves connections it may hand over. What each runs, and how
//! many the configuration wants, is the master's table (master/kinds.rs):
//! this module stays below everything a child runs.

use crate::listen::Service;

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

impl Kind {
    /// Every kind, in index order.
    pub const ALL: [Kind; 5] = [
        Kind::Pool,
        Kind::Conn,
        Kind::Udp,
        Kind::Metrics,
        Kind::Carrier,
    ];

    /// Its place in [`Kind::ALL`], and in per-kind counts.
    pub fn index(self) -> usize {
        self as usize
    }

    /// What the log calls one.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Pool => "worker",
            Kind::Conn => "child",
            Kind::Udp => "udp worker",
            Kind::Metrics => "metrics worker",
            Kind::Carrier => "carrier",
        }
    }

    /// Its letter in the upgrade inheritance.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Pool => "w",
            Kind::Conn => "c",
            Kind::Udp => "u",
            Kind::Metrics => "m",
            Kind::Carrier => "k",
        }
    }

    /// The kind a inheritance's letter names.
    pub fn from_tag(tag: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.tag() == tag)
    }

    /// The listeners it keeps after the fork (`None`: none; a fork-mode
    /// child keeps its connection only).
    pub fn keeps(self) -> Option<Service> {
        match self {
            Kind::Pool => Some(Service::Echo),
            Kind::Udp => Some(Service::Datagrams),
            Kind::Metrics => Some(Service::Metrics),
            Kind::Conn | Kind::Carrier => None,
        }
    }

    /// Whether it serves connections, which it hands over through the
    /// relay when it retires (and, a pool worker, takes from it).
    pub fn relays(self) -> bool {
        matches!(self, Kind::Pool | Kind::Conn | Kind::Carrier)
    }

    /// Whether it is started from a configuration and supervised through
    /// a control pipe and a scoreboard slot (every kind but a fork-mode
    /// child, which is forked for a connection).
    pub fn is_worker(self) -> bool {
        self != Kind::Conn
    }

    /// The helpers: kinds started beside the pool, as many as the
    /// configuration wants while a listener of theirs is open.
    pub fn helpers() -> impl Iterator<Item = Kind> {
        [Kind::Udp, Kind::Metrics].into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kinds_are_in_index_order_and_their_tags_are_unique() {
        for (i, kind) in Kind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i);
            assert_eq!(Kind::from_tag(kind.tag()), Some(kind));
        }
        assert_eq!(Kind::from_tag("x"), None);
        assert!(!Kind::Conn.is_worker());
        assert!(Kind::helpers().all(|k| k.is_worker() && k != Kind::Pool));
    }
}
