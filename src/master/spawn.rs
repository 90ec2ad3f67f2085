//! Forking a child with its context: the one place the master forks a
//! child that serves (a pool worker, a helper worker, the carrier, a
//! fork-mode child); its short helpers (helper.rs) are the other. In the
//! child, right after fork: what it keeps is taken, what only the master
//! may hold is closed, privileges are dropped, and it runs with a
//! [`worker::Ctx`] built here, the same for every kind.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use log::error;
use nix::unistd::Pid;

use super::Master;
use crate::admission::Policy;
use crate::children::EXIT_SETUP;
use crate::daemon::Identity;
use crate::echo::Limits;
use crate::listen::Listener;
use crate::logging::REPORT_EVERY;
use crate::reload::Planned;
use crate::scoreboard::Scoreboard;
use crate::{signals, sys, worker};

/// What a child is given besides what every child shares.
pub(super) struct Brief {
    /// Who it runs as; `None`: the identity in force.
    pub identity: Option<Identity>,
    pub limits: Limits,
    pub policy: Policy,
    /// A pool worker's scoreboard slot.
    pub slot: Option<usize>,
    /// A fork-mode child's word in the fork table (behind a proxy).
    pub fork_slot: Option<usize>,
    /// Whether it adds its bytes to the scoreboard.
    pub count_bytes: bool,
    /// The control pipe it watches.
    pub ctl: Ctl,
    /// It takes the relay (to hand over and, a pool worker, to take).
    pub relays: bool,
    /// It takes the vault (its connections go there for the next master).
    pub vault: bool,
    /// It tells the master when it is ready (the notice pipe).
    pub notice: bool,
    /// `--shutdown-timeout`.
    pub shutdown: Duration,
    /// A fork-mode child, forked lean: the master's handlers are left as
    /// they are (in a child they act as its dispositions: see
    /// signals.rs), and what it must not hold is closed by number, all
    /// but what it keeps, in one `close_range` per gap. No system call
    /// per signal, none per descriptor.
    pub lean: Option<Lean>,
    /// It checks its clients with the master's fork-mode policy (read
    /// where the master keeps it: not copied for each child), not
    /// `policy`.
    pub fork_policy: bool,
}

/// What a lean fork-mode child keeps of the master's descriptors, besides
/// what every child keeps (control pipe, vault, log).
#[derive(Clone, Copy)]
pub(super) enum Lean {
    /// The connection it serves (one the master took from the relay).
    Conn(RawFd),
    /// The listeners it accepts its connection from, and the notice
    /// pipe where it says it took one.
    Accept,
}

/// Descriptors a lean child keeps besides its listeners.
const LEAN_KEEP: usize = 6;
/// Listeners whose numbers a lean child keeps in place; beyond, on the heap.
pub(super) const LEAN_LISTENERS: usize = 16;

/// Which control pipe a child watches (its end-of-file: stop).
pub(super) enum Ctl {
    /// The fork-mode children's shared pipe.
    Shared,
    /// The read end of a pipe of its own, whose write end the master
    /// holds (a pool worker where there is no [`sys::told`]).
    #[cfg_attr(any(target_os = "linux", target_os = "android"), allow(dead_code))]
    Given(OwnedFd),
    /// A pipe it makes itself, which the master's signal closes (a pool
    /// worker on Linux: see sys/told.rs).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Own,
}

impl Master {
    /// Forks a child as `brief` says: in the child, `keep` takes what it
    /// keeps of the master's (its listeners, its connection) before the
    /// rest is closed, and `run` gets that and the child's context; its
    /// return is the child's exit code.
    pub(super) fn fork_child<T>(
        &mut self,
        brief: Brief,
        keep: impl FnOnce(&mut Master) -> T,
        run: impl FnOnce(T, worker::Ctx<'_>) -> i32,
    ) -> std::io::Result<Pid> {
        let master = self.pid;
        let lean = brief.lean;
        let body = || {
            let kept = keep(self);
            let (relay_tx, relay_rx) = match self.chan.relay.as_ref().filter(|_| brief.relays) {
                Some(_) => match self.chan.relay.take() {
                    Some(r) => (Some(r.tx), Some(r.rx)),
                    None => (None, None),
                },
                None => (None, None),
            };
            // A lean child writes nothing of the master's (each page of it
            // written would be copied, on every connection): it borrows
            // the vault where the master keeps it. Any other child takes
            // it out before the rest is closed.
            let taken_vault = match brief.vault && lean.is_none() {
                true => self.kept.vault.take(),
                false => None,
            };
            let ctl = match &brief.ctl {
                Ctl::Given(fd) => fd.as_raw_fd(),
                _ => self.fork.ctl_r.as_raw_fd(),
            };
            // Lean: what it must not hold goes by number, and the objects
            // that held it are never dropped (the child `_exit`s), so
            // nothing closes a number twice.
            let closed = lean.is_some_and(|lean| self.close_lean(lean, ctl, brief.vault));
            if closed {
                crate::logging::forked();
            } else {
                // Not lean, or no close_range here: one by one.
                if !brief.relays {
                    self.chan.relay = None;
                }
                // A child forked to accept keeps its listeners.
                let doors = matches!(lean, Some(Lean::Accept)).then(|| self.acceptor.take());
                self.close_in_child();
                if let Some(doors) = doors {
                    self.acceptor.put_back(doors);
                }
                if !brief.notice {
                    self.chan.notice_w = None;
                }
            }
            let vault = match lean {
                Some(_) => self.kept.vault.as_ref().filter(|_| brief.vault),
                None => taken_vault.as_ref(),
            };
            // Made after the master's descriptors are gone: it takes the
            // lowest free numbers.
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let own = match brief.ctl {
                Ctl::Own => match sys::told::own_pipe() {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        crate::logging::say(format_args!(
                            "cannot create a worker's control pipe: {}",
                            crate::logging::error_text(&e)
                        ));
                        return worker::EXIT_SETUP;
                    }
                },
                _ => None,
            };
            let identity = brief.identity.as_ref().unwrap_or(&self.identity);
            if let Err(code) = enter(identity, &self.scoreboard) {
                return code;
            }
            let ctx = worker::Ctx {
                ctl: match &brief.ctl {
                    Ctl::Given(fd) => fd.as_fd(),
                    #[cfg(any(target_os = "linux", target_os = "android"))]
                    Ctl::Own => match &own {
                        Some(fd) => fd.as_fd(),
                        None => self.fork.ctl_r.as_fd(),
                    },
                    Ctl::Shared => self.fork.ctl_r.as_fd(),
                },
                master,
                limits: brief.limits,
                policy: match brief.fork_policy {
                    true => &self.fork.policy,
                    false => &brief.policy,
                },
                slot: brief.slot.map(|s| self.scoreboard.slot(s)),
                board: &self.scoreboard,
                count_bytes: brief.count_bytes,
                fork_slot: brief.fork_slot,
                notice: match brief.notice {
                    true => self.chan.notice_w.as_ref().map(|f| f.as_fd()),
                    false => None,
                },
                relay_tx,
                relay_rx,
                vault,
                shutdown: brief.shutdown,
                orphaned: Default::default(),
                blocking_reads: lean.is_some(),
            };
            run(kept, ctx)
        };
        // SAFETY: the master is single-threaded: it never starts a thread;
        // lean, its handlers are signals.rs's, which act in a child as the
        // child's dispositions.
        #[allow(unsafe_code)]
        unsafe {
            match lean {
                Some(_) => sys::spawn_keeping_handlers(body),
                None => sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, body),
            }
        }
    }

    /// In a lean child right after fork: closes every descriptor but
    /// what `lean` says it keeps, `ctl`, the vault (if it takes it) and
    /// the log's; false if that could not be done by number here.
    fn close_lean(&self, lean: Lean, ctl: RawFd, vault: bool) -> bool {
        let v = self.kept.vault.as_ref().filter(|_| vault);
        let mut keep = [-1; LEAN_KEEP + LEAN_LISTENERS];
        keep[0] = ctl;
        if let Some([a, b]) = v.map(|v| v.raw_fds()) {
            keep[1] = a;
            keep[2] = b;
        }
        keep[3] = crate::logging::descriptor().unwrap_or(-1);
        let listeners = match lean {
            Lean::Conn(conn) => {
                keep[4] = conn;
                return sys::close_all_but(&mut keep);
            }
            Lean::Accept => {
                keep[4] = self.chan.notice_w.as_ref().map_or(-1, |f| f.as_raw_fd());
                self.acceptor.streams().map(|(_, l)| l.as_fd().as_raw_fd())
            }
        };
        let mut more = Vec::new();
        for (i, fd) in listeners.enumerate() {
            match keep.get_mut(LEAN_KEEP + i) {
                Some(k) => *k = fd,
                None => more.push(fd),
            }
        }
        if more.is_empty() {
            return sys::close_all_but(&mut keep);
        }
        // Many listeners: on the heap (a page copied, for these only).
        more.extend_from_slice(&keep);
        sys::close_all_but(&mut more)
    }

    /// In a child right after fork: drops what only the master may hold,
    /// above all every control pipe's write end (or a worker would keep its
    /// siblings from ever seeing "stop").
    /// Nothing here is freed: a child that frees writes the allocator's
    /// metadata, and each heap page so written is copied from the master.
    pub(super) fn close_in_child(&mut self) {
        crate::logging::forked();
        Listener::close_all_in_child(&mut self.acceptor.take());
        if let Some(p) = self.underway.pending.take() {
            let mut plan = p.plan;
            for planned in plan.drain(..) {
                if let Planned::Bound(l) = planned {
                    l.close_in_child();
                }
            }
            std::mem::forget((plan, p.cfg, p.identity));
        }
        if let Some(s) = self.chan.signals.take() {
            s.close_in_child();
        }
        self.chan.relay = None;
        self.fork.ctl_w = None;
        std::mem::take(&mut self.children).close_in_child();
        self.scoreboard.close_fd_in_child();
        self.underway.check = None;
        self.underway.query = None;
        self.kept.vault = None;
        // Clients' connections kept across a restart belong to the worker
        // the relay gives each to: a copy here would keep it open after
        // that worker closes it (its client would never see the end).
        let stored = &self.estate.store;
        let single = stored.connections.iter().map(|(_, _, fd)| fd.as_raw_fd());
        let vault = stored.vault.iter().map(|fd| fd.as_raw_fd());
        for fd in self.kept.carried.raw_fds().chain(single).chain(vault) {
            // Forgotten with the lists below: this is their one close.
            let _ = nix::unistd::close(fd);
        }
        std::mem::forget(std::mem::take(&mut self.kept.carried));
        std::mem::forget(std::mem::take(&mut self.estate.store.connections));
        std::mem::forget(std::mem::take(&mut self.estate.store.vault));
        self.chan.notice_r = None;
        if let Some(ready) = self.estate.ready.take() {
            ready.close_in_child();
        }
        if let Some(p) = self.estate.pidfile.take() {
            p.close_in_child();
        }
        self.estate.notify = None;
    }
}

/// In a child: drops privileges as `identity` says; Err is the exit code.
/// A failure is logged at most once per [`REPORT_EVERY`] across all
/// children, as in a crash loop every child fails for the same reason.
fn enter(identity: &Identity, board: &Scoreboard) -> Result<(), i32> {
    identity.enter().map_err(|e| {
        if let Some(more) = board.setup_failure_report(REPORT_EVERY) {
            let more = if more > 0 {
                format!(" ({more} more children failed so since the last report)")
            } else {
                String::new()
            };
            error!("cannot drop privileges: {e}{more}");
        }
        EXIT_SETUP
    })
}
