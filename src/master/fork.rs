//! Fork mode: the master accepts and forks one child per connection, like
//! tcpserver and inetd `nowait`, after admitting its client (or, behind
//! a proxy, its proxy); and the `max-children` bound, at which it stops
//! accepting.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use log::{error, warn};

use super::spawn::{Brief, Ctl};
use super::Master;
use crate::admission::{self, Gate, Holder, Policy, Ticket};
use crate::children::{Child, Kind};
use crate::listen::Service;
use crate::pool;
use crate::relay::Carried;
use crate::worker;

/// Connections accepted per wakeup. Under steady load the backlog never
/// empties, and without a bound the master would fork until max-children
/// while the children that already finished wait, unreaped, for it to
/// look at SIGCHLD again.
const ACCEPT_BATCH: u32 = 16;

impl Master {
    /// fork mode: accepts (in fair rotation over the listeners) and forks
    /// a child per connection, until none waits, the limit or a pause is
    /// reached, or [`ACCEPT_BATCH`] were taken; a connection that a
    /// retiring worker handed over (after a reload from another mode) is
    /// taken first: looked for only when the relay woke the master or the
    /// scoreboard counts one, so that an accept costs no `recvmsg`.
    pub(super) fn accept(&mut self, now: Instant, relay_ready: bool) {
        let mut relay_ready = relay_ready;
        for _ in 0..ACCEPT_BATCH {
            if self.children.conns() >= self.cfg.max_children as usize
                || self.backoff.hold_until(now, false).is_some()
            {
                return;
            }
            // Connections handed over first: their clients have waited.
            let relayed = self.take_relayed(relay_ready);
            relay_ready &= relayed.is_some();
            let forked = match relayed {
                Some((conn, c)) => self.fork_for(conn, c.tcp, Some(c), now),
                None => {
                    let Some((i, conn)) = self.acceptor.accept(now) else {
                        return;
                    };
                    let tcp = self.acceptor.listeners()[i].is_tcp();
                    self.fork_for(conn, tcp, None, now)
                }
            };
            if !forked {
                return;
            }
        }
    }

    /// Forks the child that serves `conn`, unless its client is refused
    /// (closed at once, unread); false when fork failed. A connection
    /// handed over by a retiring worker (`carried`) was admitted where it
    /// was accepted, and brings its client and its place.
    pub(super) fn fork_for(
        &mut self,
        conn: OwnedFd,
        tcp: bool,
        carried: Option<Carried>,
        now: Instant,
    ) -> bool {
        // Behind a proxy the client's address is in the header, which the
        // child reads (and checks): here only the proxy is checked.
        // Otherwise the client is checked here, and its place kept by the
        // master until it reaps the child.
        let policy = &self.fork.policy;
        let (place, proxied) = match &carried {
            Some(c) => (c.place, false),
            None => match policy.gate(&self.scoreboard, conn.as_fd(), tcp, Holder::Here) {
                Gate::Admit(_, ticket) => (ticket.and_then(Ticket::into_place), false),
                Gate::Header(_) => (None, true),
                Gate::Refuse => return true,
            },
        };
        let policy = if proxied {
            policy.clone()
        } else {
            Policy::default()
        };
        // Behind a proxy the child takes its client's place itself, and
        // publishes it in its word of the fork table.
        let fork_slot = proxied.then(|| self.fork.slots.take());
        let count_bytes = self
            .acceptor
            .listeners()
            .iter()
            .any(|l| l.service() == Service::Metrics);
        if self.fork.conn_buf.is_none() {
            self.fork.conn_buf = worker::buffer();
        }
        let brief = Brief {
            identity: None,
            limits: self.cfg.limits(),
            policy,
            slot: None,
            fork_slot,
            count_bytes,
            ctl: Ctl::Shared,
            relays: false,
            // Where its connection waits for the next master at a
            // restart (or should the master die).
            vault: true,
            notice: false,
            shutdown: self.cfg.shutdown_timeout,
            lean: Some(conn.as_raw_fd()),
        };
        // Lent to the child, not taken out of the master's state: the
        // child writes none of it (see spawn.rs); the mapping goes with
        // its process (no munmap per connection).
        let mut buf = self.fork.conn_buf.take();
        let forked = self.fork_child(
            brief,
            |_| (),
            |(), ctx| worker::fork_child(conn, tcp, carried, now, ctx, buf.as_mut()),
        );
        self.fork.conn_buf = buf;
        // The connection now belongs to the child; the closure (and with it
        // the master's copy of the socket) was dropped here.
        match forked {
            Ok(pid) => {
                let mut child = Child::new(Kind::Conn, now);
                child.fork_slot = fork_slot;
                child.place = place;
                self.children.insert(pid, child);
                self.fork.accepted += 1;
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                if let Some(index) = fork_slot {
                    self.fork.slots.give_back(index);
                }
                if let Some(place) = place {
                    admission::give_back(&self.scoreboard, place);
                }
                self.acceptor.pause_for_a_while(now);
                if let Some(more) = self.reports.errors.hit(now) {
                    error!(
                        "cannot fork for a connection: {}; connection closed, pausing {} ms ({more} more since the last report)",
                        crate::logging::error_text(&e),
                        crate::accept::PAUSE.as_millis()
                    );
                }
                false
            }
        }
    }

    /// fork mode: like tcpserver -c, at `max-children` the master stops
    /// polling the listeners and clients wait in the backlog; counted, and
    /// logged when it happens and every [`REPORT_EVERY`] while clients wait.
    pub(super) fn watch_limit(&mut self, now: Instant) {
        let full = self.children.conns() >= self.cfg.max_children as usize;
        let acceptor = &self.acceptor;
        let waiting = || acceptor.streams().map(|(_, l)| l.waiting()).sum::<u32>();
        let report = self.fork.saturation.observe(now, full, || waiting() > 0);
        let max = self.cfg.max_children;
        match report {
            Some(pool::Report::Reached { unreported }) => warn!(
                "max-children ({max}) reached: not accepting, new clients wait in the backlog ({}, {unreported} more since the last report)",
                crate::logging::counted(self.fork.saturation.hits, "time", "times")
            ),
            Some(pool::Report::Held(d)) => warn!(
                "max-children ({max}) reached {} s ago: {} clients wait in the backlog",
                d.as_secs(),
                waiting()
            ),
            None => {}
        }
    }
}
