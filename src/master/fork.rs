//! Fork mode: the master accepts and forks one child per connection, like
//! tcpserver and inetd `nowait`; the per-address checks it makes before
//! forking, and the `max-children` bound, at which it stops accepting.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use log::{error, warn};

use super::Master;
use crate::access::Policy;
use crate::children::{Child, Role};
use crate::listen::Listener;
use crate::pool;
use crate::scoreboard::Refusal;
use crate::{signals, sys, worker};

/// Connections accepted per wakeup. Under steady load the backlog never
/// empties, and without a bound the master would fork until max-children
/// while the children that already finished wait, unreaped, for it to
/// look at SIGCHLD again.
const ACCEPT_BATCH: u32 = 16;

impl Master {
    /// fork mode: accepts (in fair rotation over the listeners) and forks
    /// a child per connection, until none waits, the limit or a pause is
    /// reached, or [`ACCEPT_BATCH`] were taken.
    pub(super) fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if self.children.conns() >= self.cfg.max_children as usize
                || self.backoff.hold_until(now, false).is_some()
            {
                return;
            }
            let Some((i, conn)) = self.acceptor.accept(now) else {
                return;
            };
            let tcp = self.acceptor.listeners()[i].is_tcp();
            if !self.fork_for(conn, tcp, now) {
                return;
            }
        }
    }

    /// Forks the child that serves `conn`, unless its client is refused
    /// (closed at once, unread); false when fork failed.
    pub(super) fn fork_for(&mut self, conn: OwnedFd, tcp: bool, now: Instant) -> bool {
        let peer = if tcp && !self.fork.policy.is_open() {
            crate::access::peer_key(&conn)
        } else {
            None
        };
        // What --max-per-ip counts it by.
        let source = peer.map(|key| self.fork.policy.source(key));
        // Behind a proxy the client's address is in the header, which the
        // child reads: here only the proxy is checked.
        let proxied = tcp && self.fork.policy.proxy.is_some();
        let refused = match (&self.fork.policy.proxy, peer) {
            (Some(trusted), Some(key)) if tcp && !trusted.contains(key) => Some(Refusal::Proxy),
            (Some(_), None) if tcp => Some(Refusal::Proxy),
            (None, Some(key)) => self.admit(key),
            _ => None,
        };
        if let Some(why) = refused {
            self.scoreboard.refused(why);
            return true;
        }
        let source = source.filter(|_| !proxied);
        let policy = if proxied {
            self.fork.policy.clone()
        } else {
            Policy::default()
        };
        let fork_slot =
            (proxied && self.fork.policy.max_per_ip > 0).then(|| self.fork.slots.take());
        let master = self.pid;
        let limits = self.cfg.limits();
        let count_bytes = self.acceptor.listeners().iter().any(Listener::is_metrics);
        if self.fork.conn_buf.is_none() {
            self.fork.conn_buf = worker::buffer();
        }
        // SAFETY: the master is single-threaded: it never starts a thread.
        #[allow(unsafe_code)]
        let forked = unsafe {
            sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, || {
                if let Err(code) = self.enter_child() {
                    return code;
                }
                let ctx = worker::Ctx {
                    ctl: self.fork.ctl_r.as_fd(),
                    master,
                    limits,
                    policy,
                    slot: None,
                    board: &self.scoreboard,
                    count_bytes,
                    fork_slot,
                    notice: None,
                };
                worker::fork_child(conn, tcp, ctx, self.fork.conn_buf.as_mut())
            })
        };
        // The connection now belongs to the child; the closure (and with it
        // the master's copy of the socket) was dropped here.
        match forked {
            Ok(pid) => {
                let mut child = Child::new(Role::Conn, now);
                child.fork_slot = fork_slot;
                if self.fork.policy.max_per_ip > 0 {
                    child.peer = source;
                    if let Some(source) = source {
                        self.fork.per_ip.add(source);
                    }
                }
                self.children.insert(pid, child);
                self.fork.accepted += 1;
                self.backoff.forked(now);
                true
            }
            Err(e) => {
                if let Some(index) = fork_slot {
                    self.fork.slots.give_back(index);
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

    /// fork mode: checks a client before a child is forked for it.
    pub(super) fn admit(&mut self, key: u128) -> Option<Refusal> {
        if let Some(why) = self.scoreboard.screen(&self.fork.policy, key) {
            Some(why)
        } else if self.fork.policy.max_per_ip > 0
            && self.fork.per_ip.count(self.fork.policy.source(key)) >= self.fork.policy.max_per_ip
        {
            Some(Refusal::PerIp)
        } else {
            None
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
