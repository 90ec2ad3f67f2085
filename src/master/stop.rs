//! The stop: listeners closed at once (or, for a restart, kept in the
//! service manager's store), children told to finish or hand their
//! connections to the next master, killed if they outstay
//! `--shutdown-timeout` or a second signal says so.

use std::time::Instant;

use log::info;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::Master;
use crate::scoreboard::HandOver;
use crate::time::after;

impl Master {
    /// Begins a stop: listeners are closed at once, children are told to
    /// stop accepting; `immediate` kills them instead of letting them
    /// finish. A `restart` under systemd keeps the listeners in its store
    /// and has the children put their connections in the vault, which is
    /// there too (see store.rs).
    pub(super) fn stop(&mut self, now: Instant, why: &str, immediate: bool, restart: bool) {
        if restart {
            info!(
                "{why}: restarting: the listeners and the open connections wait in the service manager's store for the next instance"
            );
            // Its files stay too: the next instance listens there.
            for l in self.acceptor.listeners_mut() {
                l.keep_file();
            }
        } else if immediate {
            info!("{why}: stopping now");
        } else {
            // Say the way out: an operator at a terminal who pressed
            // Ctrl-C should not wait in silence for the timeout.
            let again = if why == "SIGINT" {
                "another Ctrl-C (SIGINT)"
            } else {
                "a second SIGTERM or SIGINT"
            };
            info!(
                "{why}: stopping; open connections may continue for {} s ({again} stops at once)",
                self.cfg.shutdown_timeout.as_secs()
            );
        }
        if !restart {
            self.unstore_listeners();
        }
        // Closing our copies (and removing unix socket files) plus the
        // children closing theirs on their pipe's EOF refuses new clients
        // (unless the store keeps them).
        self.acceptor.close();
        self.underway.pending = None;
        // Before the pipes close: a child then knows it was told.
        self.scoreboard.set_stopping();
        // A restart hands every connection to the next master; a stop has
        // no one to hand them to: they finish.
        self.scoreboard.set_hand_over(if restart {
            HandOver::ToNextMaster
        } else {
            HandOver::Finish
        });
        self.fork.ctl_w = None;
        // A fork-mode child waiting for its client in a blocking read does
        // not watch the pipe: SIGTERM (which a child ignores) wakes it to
        // look (echo/block.rs). After the pipe closed, so it finds the
        // news there.
        for (pid, child) in self.children.iter() {
            if child.kind == crate::children::Kind::Conn {
                let _ = kill(pid, Signal::SIGTERM);
            }
        }
        self.children.retire_where(
            after(now, self.cfg.shutdown_timeout),
            &self.scoreboard,
            |_| true,
        );
        self.notify("STOPPING=1\nSTATUS=stopping");
        if immediate {
            self.kill_all();
        }
    }

    pub(super) fn kill_all(&mut self) {
        for pid in self.children.pids() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }

    /// The connections open in child `pid`, as its slot says (a fork-mode
    /// child has one).
    pub(super) fn open_in(&self, pid: Pid) -> u64 {
        let Some(c) = self
            .children
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, c)| c)
        else {
            return 0;
        };
        match c.kind {
            crate::children::Kind::Conn => 1,
            _ => c
                .slot
                .and_then(|s| self.scoreboard.get(s))
                .map_or(0, |e| e.open),
        }
    }
}
