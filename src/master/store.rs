//! systemd's file descriptor store: what makes `systemctl restart` (and a
//! crash restarted by `Restart=on-failure`, and a new binary that dies
//! after USR2) refuse no client and cut no conversation.
//!
//! Under systemd the master keeps each listening socket in the store,
//! named for its address (`FDSTORE=1`, `FDNAME=`); the next instance takes
//! them back (`LISTEN_FDS`, lib.rs) instead of binding, so clients wait
//! in the kernel's backlog meanwhile. On TERM the master asks systemd
//! whether the unit's job is a restart (`systemctl list-jobs`, in a child
//! it does not wait for, as the USR2 check): a stop takes the listeners
//! out of the store and drains as ever; a restart has every child hand
//! its connections over, as a reload does, to the master itself, which
//! puts each in the store with what it carries, for the next instance to
//! hand to its workers. The store must have room (`FileDescriptorStoreMax=`
//! in the unit, which the query reads too): without it a TERM is a stop.

use std::os::fd::AsFd;
use std::time::Instant;

use log::{info, warn};
use nix::sys::wait::WaitStatus;

use super::lifecycle::Event;
use super::Master;
use crate::relay::Carried;
use crate::systemd;

impl Master {
    /// At start under systemd: every listener of ours in the store (one
    /// that came from there already is the same socket, which systemd
    /// keeps once), those of addresses no longer configured out of it,
    /// and the connections the last instance left there on their way to
    /// the workers.
    pub(super) fn use_store(&mut self, now: Instant) {
        let notify = self.handoff.notify.as_ref();
        if let (Some(n), Some(_)) = (notify, &self.unit) {
            for l in self.acceptor.listeners() {
                if let Some(addr) = l.configured() {
                    let _ = n.store(l.as_fd(), &systemd::listener_name(&addr.to_string()));
                }
            }
        }
        for name in std::mem::take(&mut self.handoff.store.stale) {
            notify.inspect(|n| n.unstore(&name));
        }
        let connections = std::mem::take(&mut self.handoff.store.connections);
        let n = connections.len();
        for (name, carried, fd) in connections {
            match Carried::decode(&carried) {
                Some(c) => self.restored.push((name, c, fd)),
                None => {
                    notify.inspect(|n| n.unstore(&name));
                }
            }
        }
        if n > 0 {
            info!(
                "{} carried across the restart: handing them to the workers",
                crate::logging::counted(n as u64, "connection", "connections")
            );
        }
        self.restore(now);
    }

    /// Sends the connections kept across a restart to the workers through
    /// the relay, as it has room, and takes each out of the store once
    /// sent. Each counts again for its client's `--max-per-ip`.
    pub(super) fn restore(&mut self, _now: Instant) {
        let Some(relay) = &self.relay else {
            return;
        };
        let notify = self.handoff.notify.as_ref();
        while let Some((name, mut c, fd)) = self.restored.pop() {
            c.place = self.fork.policy.recount(&self.scoreboard, &fd, c.client);
            match crate::relay::send(relay.tx.as_fd(), fd.as_fd(), &c, self.scoreboard.relayed()) {
                Ok(()) => {
                    log::debug!("a connection kept across the restart went to the workers ({} bytes echoed so far)", c.progress.bytes);
                    notify.inspect(|n| n.unstore(&name));
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    if let Some(p) = c.place {
                        crate::admission::give_back(&self.scoreboard, p);
                    }
                    self.restored.push((name, c, fd));
                    return;
                }
                Err(e) => {
                    warn!("cannot hand a connection kept across the restart to the workers: {e}; closed");
                    if let Some(p) = c.place {
                        crate::admission::give_back(&self.scoreboard, p);
                    }
                    notify.inspect(|n| n.unstore(&name));
                }
            }
        }
    }

    /// A stop that is not a restart: the listeners out of the store, so
    /// that new clients are refused, not queued for no one.
    pub(super) fn unstore_listeners(&self) {
        let Some(notify) = self.handoff.notify.as_ref().filter(|_| self.unit.is_some()) else {
            return;
        };
        for l in self.acceptor.listeners() {
            if let Some(addr) = l.configured() {
                notify.unstore(&systemd::listener_name(&addr.to_string()));
            }
        }
    }

    /// Restarting: the connections the children hand over go to the
    /// store, with what they carry, for the next instance.
    pub(super) fn store_relayed(&mut self) {
        let (Some(relay), Some(notify)) = (&self.relay, &self.handoff.notify) else {
            return;
        };
        while let Ok(Some((fd, mut c))) =
            crate::relay::recv(relay.rx.as_fd(), self.scoreboard.relayed())
        {
            // This scoreboard's places mean nothing to the next instance,
            // which counts the client again.
            c.place = None;
            self.stored += 1;
            let name = systemd::connection_name(&c.encode(), self.stored);
            if let Err(e) = notify.store(fd.as_fd(), &name) {
                warn!("cannot keep a connection in the service manager's store: {e}; closed");
            }
        }
    }

    /// TERM under systemd: asks, in a child, whether the unit's job is a
    /// restart and whether its store has room. `Some`: no answer can come.
    pub(super) fn ask_restart(&mut self) -> Option<Event> {
        let unit = self.unit.clone()?;
        let spawned = self.spawn_helper(|w| {
            let answer = restart_answer(&unit);
            let _ = nix::unistd::write(w, answer.as_bytes());
            0
        });
        match spawned {
            Ok(query) => {
                self.query = Some(query);
                None
            }
            Err(_) => Some(Event::Restart(false)),
        }
    }

    /// The query exited: tells the lifecycle what it found.
    pub(super) fn query_done(&mut self, _status: WaitStatus, now: Instant) {
        let Some(q) = self.query.take() else {
            return;
        };
        let restart = q.said(16) == "restart";
        self.apply(Event::Restart(restart), now);
    }
}

/// In the query child: `restart` if the unit's job is a restart and its
/// store has room, else `stop`.
fn restart_answer(unit: &str) -> &'static str {
    let run = |args: &[&str]| {
        std::process::Command::new("systemctl")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    // `JOB UNIT TYPE STATE` per line.
    let restarting = run(&["list-jobs", "--no-legend", "--plain", unit]).is_some_and(|jobs| {
        jobs.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&unit) && f.get(2) == Some(&"restart")
        })
    });
    let room = run(&["show", "-p", "FileDescriptorStoreMax", "--value", unit])
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    if restarting && room {
        "restart"
    } else {
        "stop"
    }
}
