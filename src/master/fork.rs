//! Fork mode: a child per connection, like tcpserver and inetd `nowait`,
//! except that the master never accepts: it forks a child to accept when
//! a connection waits, and the child takes it (a connection the master
//! held between accept and fork would die with it: the master may be
//! killed at any moment, and under systemd its children outlive it). It
//! forks one child per waiting connection, as the kernel counts them,
//! and looks at the listeners again once those have said they took one;
//! the `max-children` bound counts them, and at it the master stops.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{error, warn};
use nix::unistd::Pid;

use super::spawn::{Brief, Ctl, Lean};
use super::Master;
use crate::admission::{self, Policy};
use crate::children::{Child, Kind};
use crate::listen::Service;
use crate::pool;
use crate::relay::Carried;
use crate::worker;

/// Children forked to accept per wake-up, at most. Under steady load the
/// backlog never empties, and without a bound the master would fork until
/// max-children while the children that already finished wait, unreaped,
/// for it to look at SIGCHLD again.
const ACCEPT_BATCH: usize = 16;

/// While children forked to accept are on their way, the master looks at
/// the backlogs at least this often: one that is slow to start (or was
/// stopped) delays only the connection it was forked for.
pub(super) const IN_FLIGHT_RECHECK: Duration = Duration::from_millis(100);

/// The children forked to accept that have not said they took their
/// connection yet, with their word in the fork table: in place, as the
/// master writes it on every connection (on the heap it would be one
/// more page copied after each fork).
pub(super) struct InFlight {
    at: [(Pid, usize); InFlight::MOST],
    n: usize,
}

impl InFlight {
    /// At most this many at once; the master forks no more meanwhile.
    const MOST: usize = 64;

    pub(super) fn new() -> InFlight {
        InFlight {
            at: [(Pid::from_raw(0), 0); InFlight::MOST],
            n: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.n
    }

    pub(super) fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn is_full(&self) -> bool {
        self.n == InFlight::MOST
    }

    fn push(&mut self, child: (Pid, usize)) {
        if let Some(slot) = self.at.get_mut(self.n) {
            *slot = child;
            self.n += 1;
        }
    }

    /// Keeps those for which `keep` is true; says how many went.
    fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) -> usize {
        let before = self.n;
        let mut i = 0;
        while i < self.n {
            if keep(self.at[i].1) {
                i += 1;
            } else {
                self.n -= 1;
                self.at[i] = self.at[self.n];
            }
        }
        before - self.n
    }

    /// Takes `pid` out; its word's index, if it was there.
    fn remove(&mut self, pid: Pid) -> Option<usize> {
        let i = self.at[..self.n].iter().position(|&(p, _)| p == pid)?;
        let index = self.at[i].1;
        self.n -= 1;
        self.at[i] = self.at[self.n];
        Some(index)
    }
}

impl Master {
    /// fork mode: forks a child for each connection that waits (in the
    /// listeners' backlogs: looked at when one was `readable`, or while
    /// children forked to accept are on their way), until the limit, a
    /// pause or [`ACCEPT_BATCH`]; a connection that a retiring worker
    /// handed over (after a reload from another mode) is taken first:
    /// looked for only when the relay woke the master or the scoreboard
    /// counts one, so that a wake-up costs no `recvmsg`.
    pub(super) fn accept(&mut self, now: Instant, readable: bool, relay_ready: bool) {
        self.see_taken();
        for _ in 0..ACCEPT_BATCH {
            if !self.may_fork(now) {
                return;
            }
            // Connections handed over first: their clients have waited.
            let Some((conn, c)) = self.take_relayed(relay_ready) else {
                break;
            };
            if !self.fork_for(conn, c, now) {
                return;
            }
        }
        if !readable && self.fork.in_flight.is_empty() {
            return;
        }
        // The kernel counts each TCP listener's backlog; for another, a
        // readable one holds at least one, when no child is on its way.
        let mut waiting = 0;
        let mut uncounted = false;
        for (_, l) in self.acceptor.streams() {
            match crate::sys::accept_queue(l.as_fd()) {
                Some(n) => waiting += n as usize,
                None => uncounted = true,
            }
        }
        if uncounted && readable && self.fork.in_flight.is_empty() {
            waiting += 1;
        }
        let wanted = waiting.saturating_sub(self.fork.in_flight.len());
        for _ in 0..wanted.min(ACCEPT_BATCH) {
            if !self.may_fork(now) || !self.fork_to_accept(now) {
                return;
            }
        }
    }

    /// Whether a child may be forked for a connection now: under the
    /// limit, and neither paused nor held back.
    fn may_fork(&self, now: Instant) -> bool {
        self.children.conns() < self.cfg.max_children as usize
            && !self.fork.in_flight.is_full()
            && self.acceptor.paused_until(now).is_none()
            && self.backoff.hold_until(now, false).is_none()
    }

    /// The children forked to accept that took their connection since
    /// the last look are counted, and the master looks at the listeners
    /// again once none is on its way.
    pub(super) fn see_taken(&mut self) {
        let board = &self.scoreboard;
        let took = self
            .fork
            .in_flight
            .retain(|index| !crate::scoreboard::taken(board.fork_held(index)));
        self.fork.accepted += took as u64;
    }

    /// A child forked to accept is gone (`pid`, reaped): whether it took
    /// a connection. Any other child took one.
    pub(super) fn took_a_connection(&mut self, pid: Pid) -> bool {
        let Some(index) = self.fork.in_flight.remove(pid) else {
            return true;
        };
        let took = crate::scoreboard::taken(self.scoreboard.fork_held(index));
        self.fork.accepted += u64::from(took);
        took
    }

    /// Forks a child that accepts a connection (see
    /// [`worker::fork_acceptor`]); false when fork failed.
    fn fork_to_accept(&mut self, now: Instant) -> bool {
        let index = self.fork.slots.take();
        crate::scoreboard::clear(self.scoreboard.fork_held(index));
        let brief = Brief {
            policy: Policy::default(),
            fork_policy: true,
            fork_slot: Some(index),
            notice: true,
            lean: Some(Lean::Accept),
            ..self.fork_brief()
        };
        let start = self.fork.next_door;
        self.fork.next_door = start.wrapping_add(1);
        let mut buf = self.fork.conn_buf.take();
        let forked = self.fork_child(
            brief,
            |m| {
                let doors = m.acceptor.streams();
                worker::Doors::new(doors.map(|(_, l)| (l.as_fd().as_raw_fd(), l.is_tcp())))
            },
            |doors, ctx| worker::fork_acceptor(&doors, start, now, ctx, buf.as_mut()),
        );
        self.fork.conn_buf = buf;
        match forked {
            Ok(pid) => {
                let mut child = Child::new(Kind::Conn, now);
                child.fork_slot = Some(index);
                self.children.insert(pid, child);
                self.fork.in_flight.push((pid, index));
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                self.fork.slots.give_back(index);
                self.fork_failed(now, &e);
                false
            }
        }
    }

    /// What every fork-mode child is given; the caller says the rest.
    fn fork_brief(&mut self) -> Brief {
        let count_bytes = self
            .acceptor
            .listeners()
            .iter()
            .any(|l| l.service() == Service::Metrics);
        if self.fork.conn_buf.is_none() {
            self.fork.conn_buf = worker::buffer();
        }
        Brief {
            identity: None,
            limits: self.cfg.limits(),
            policy: Policy::default(),
            fork_policy: false,
            slot: None,
            fork_slot: None,
            count_bytes,
            ctl: Ctl::Shared,
            relays: false,
            // Where its connection waits for the next master at a
            // restart (or should the master die).
            vault: true,
            notice: false,
            shutdown: self.cfg.shutdown_timeout,
            lean: None,
        }
    }

    /// Forks the child that serves `conn`, which a retiring worker handed
    /// over (it was admitted where it was accepted, and brings its client
    /// and its place); false when fork failed.
    pub(super) fn fork_for(&mut self, conn: OwnedFd, carried: Carried, now: Instant) -> bool {
        let place = carried.place;
        let brief = Brief {
            lean: Some(Lean::Conn(conn.as_raw_fd())),
            ..self.fork_brief()
        };
        // Lent to the child, not taken out of the master's state: the
        // child writes none of it (see spawn.rs); the mapping goes with
        // its process (no munmap per connection).
        let mut buf = self.fork.conn_buf.take();
        let tcp = carried.tcp;
        let forked = self.fork_child(
            brief,
            |_| (),
            |(), ctx| worker::fork_child(conn, tcp, Some(carried), now, ctx, buf.as_mut()),
        );
        self.fork.conn_buf = buf;
        // The connection now belongs to the child; the closure (and with it
        // the master's copy of the socket) was dropped here.
        match forked {
            Ok(pid) => {
                let mut child = Child::new(Kind::Conn, now);
                child.place = place;
                self.children.insert(pid, child);
                self.fork.accepted += 1;
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                if let Some(place) = place {
                    admission::give_back(&self.scoreboard, place);
                }
                self.fork_failed(now, &e);
                false
            }
        }
    }

    /// A fork failed: accepting pauses, and it is logged (rate-limited).
    fn fork_failed(&mut self, now: Instant, e: &std::io::Error) {
        self.acceptor.pause_for_a_while(now);
        if let Some(more) = self.reports.errors.hit(now) {
            error!(
                "cannot fork for a connection: {}; pausing {} ms ({more} more since the last report)",
                crate::logging::error_text(e),
                crate::accept::PAUSE.as_millis()
            );
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
