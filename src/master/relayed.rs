//! The master's side of the relay (relay/): what it takes from it for a
//! fork-mode child, what it puts on it for the workers (connections
//! taken out of the vault at a restart), and what it takes out of it all
//! at once (into the vault at a restart, or closed when no worker takes
//! any for `--shutdown-timeout`). The children's side is worker/ctx.rs
//! (offering) and accept.rs (taking).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use log::warn;

use super::Master;
use crate::config::Mode;
use crate::relay::{Carried, Offer};
use crate::time::after;

impl Master {
    /// fork mode: a connection a retiring worker handed over, if one
    /// waits (looked for when the relay woke the master, `woke`, or the
    /// scoreboard counts one) and a descriptor is free for it.
    pub(super) fn take_relayed(&mut self, woke: bool) -> Option<(OwnedFd, Carried)> {
        let r = self.chan.relay.as_mut()?;
        if woke {
            r.rx.woke();
        }
        // Only with a descriptor free for it (the kernel closes one that
        // does not fit).
        r.rx.take(&self.scoreboard, crate::relay::room_for_one)
    }

    /// Offers a connection taken out of the vault to the workers.
    pub(super) fn offer_restored(&self, conn: BorrowedFd<'_>, c: &Carried) -> Offer {
        match &self.chan.relay {
            Some(r) => r.tx.offer(conn, c, &self.scoreboard),
            None => Offer::Failed(nix::errno::Errno::EBADF),
        }
    }

    /// Everything waiting in the relay, its places given back.
    pub(super) fn drain_relay(&self) -> Vec<(OwnedFd, Carried)> {
        self.chan
            .relay
            .as_ref()
            .map(|r| r.rx.drain(&self.scoreboard))
            .unwrap_or_default()
    }

    /// Handed-over connections wait in the relay and no worker takes
    /// one (every worker at its limit: prefork at `max-workers`, every
    /// event worker at `worker-connections` or out of descriptors, fork
    /// mode at `max-children`): once nothing was taken for
    /// `shutdown-timeout`, they are closed, and the log says so and why.
    /// A relay that is slow delays a connection; only one that stays
    /// stuck cuts it.
    pub(super) fn watch_relay(&mut self, now: Instant) {
        let n = self.scoreboard.relayed().load(Ordering::Acquire);
        self.chan.relay_wait = match self.chan.relay_wait {
            _ if n == 0 => None,
            // Taken since: it moves.
            Some((_, last)) if n < last => Some((now, n)),
            Some((since, _)) => Some((since, n)),
            None => Some((now, n)),
        };
        let Some((since, _)) = self.chan.relay_wait else {
            return;
        };
        if now < after(since, self.cfg.shutdown_timeout) {
            return;
        }
        self.chan.relay_wait = None;
        let closed = self.drain_relay().len() as u64;
        if closed == 0 {
            return;
        }
        self.scoreboard
            .cut(crate::scoreboard::Cut::Unplaced, closed);
        let why = match self.cfg.mode {
            Mode::Prefork => format!(
                "max-workers ({}) is reached and every worker is busy",
                self.cfg.max_workers
            ),
            Mode::Event => format!(
                "every worker is at worker-connections ({}) or out of descriptors",
                self.cfg.worker_connections
            ),
            Mode::Fork => format!("max-children ({}) is reached", self.cfg.max_children),
        };
        warn!(
            "closed {} handed over by retiring workers: no worker took one within {} s, as {why}",
            crate::logging::counted(closed, "connection", "connections"),
            self.cfg.shutdown_timeout.as_secs()
        );
    }
}
