//! systemd's file descriptor store: what makes `systemctl restart`, a
//! package upgrade, and a crash restarted by `Restart=on-failure` refuse
//! no client and cut no conversation, at any size.
//!
//! Under systemd the master keeps each listening socket in the store,
//! named for its address (`FDSTORE=1`, `FDNAME=`), and the vault
//! (vault.rs), both its ends in one message; the next instance takes them
//! back (`LISTEN_FDS`, lib.rs) instead of binding, so clients wait in the
//! kernel's backlog meanwhile. On TERM the master asks systemd whether
//! the unit's job is a restart (`systemctl list-jobs`, in a child it does
//! not wait for, as the USR2 check): a stop takes the listeners out of
//! the store and drains as ever; a restart has every child put its open
//! connections in the vault (the scoreboard says where they go), and the
//! master what waits in the relay. A child whose master died does the
//! same on its own. At start, the master reads the vault out and hands
//! what it holds to its workers through the relay, as it has room, and
//! says ready once they have it all. The store must have room
//! (`FileDescriptorStoreMax=` in the unit, which the query reads too):
//! without it a TERM is a stop.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use log::{info, warn};
use nix::errno::Errno;

use super::generation::Target;
use super::lifecycle::Event;
use super::Master;
use crate::children::Kind;
use crate::config::Mode;
use crate::relay::{Carried, Offer};
use crate::scoreboard::{Cut, State};
use crate::systemd;
use crate::vault::{self, Vault};

/// How long the master may take to put what it holds back in the vault
/// before it exits.
const PUT_BACK: Duration = Duration::from_secs(5);
/// How long after its workers are ready the master may still hold back
/// "ready" while carried connections wait for a worker.
pub(super) const CARRIED_WAIT: Duration = Duration::from_secs(5);
/// How soon the master looks in the vault again when it had no
/// descriptor free to take a message out.
const NO_ROOM_RETRY: Duration = Duration::from_millis(100);

/// What the master keeps for clients across its own restarts, under a
/// service manager (store.rs).
#[derive(Default)]
pub(super) struct Kept {
    /// The systemd unit this master runs as, if it does.
    pub(super) unit: Option<String>,
    /// Where open connections wait for the next master (vault.rs);
    /// children that serve connections inherit it.
    pub(super) vault: Option<Vault>,
    /// What the master takes out of the vault at start, on its way to
    /// the workers.
    pub(super) carried: crate::vault::Unpacked,
    /// No descriptor was free to take more out of the vault: when to try.
    pub(super) carried_retry: Option<Instant>,
    /// Connections taken out of the vault and handed to the workers: not
    /// yet logged, and whether any was at this start.
    pub(super) restored: u64,
    pub(super) restored_any: bool,
    /// prefork: the carrier started for what the vault held at start.
    pub(super) carrier: Option<nix::unistd::Pid>,
    /// When the generation starting was first seen ready ("ready" waits
    /// for what the vault held, a while).
    pub(super) workers_ready_at: Option<Instant>,
}

impl Master {
    /// At start under a service manager: the vault (kept by the store, or
    /// passed on across USR2, or made now) and every listener of ours in
    /// the store (one that came from there already is the same socket,
    /// which systemd keeps once), those of addresses no longer configured
    /// out of it, and the connections an earlier release stored one by
    /// one moved into the vault.
    pub(super) fn use_store(&mut self, now: Instant) {
        let Some(n) = self.estate.notify.as_ref() else {
            return;
        };
        if self.kept.vault.is_none() {
            let kept = std::mem::take(&mut self.estate.store.vault);
            self.kept.vault = match <[_; 2]>::try_from(kept) {
                Ok([a, b]) => Some(Vault::adopt(a, b)),
                Err(_) => Vault::new()
                    .map_err(|e| warn!("cannot make the vault that keeps connections across a restart: {e}; a restart or a crash will cut them"))
                    .ok(),
            };
        }
        if let Some(v) = &self.kept.vault {
            if let Err(e) = n.store(&v.ends(), vault::NAME) {
                warn!("cannot put the vault in the service manager's store: {e}; a restart or a crash will cut open connections");
            }
        }
        for l in self.acceptor.listeners() {
            if let Some(addr) = l.configured() {
                if let Err(e) = n.store(&[l.as_fd()], &systemd::listener_name(&addr.to_string())) {
                    warn!(
                        "cannot put {} in the service manager's store: {e}",
                        l.name()
                    );
                }
            }
        }
        for name in std::mem::take(&mut self.estate.store.stale) {
            n.unstore(&name);
        }
        let single = std::mem::take(&mut self.estate.store.connections);
        if !single.is_empty() {
            let mut conns = Vec::new();
            for (name, carried, fd) in single {
                if let Some(c) = Carried::decode(&carried) {
                    conns.push((fd, c));
                }
                n.unstore(&name);
            }
            if let Some(v) = &self.kept.vault {
                if let Err(lost) = v.put(conns, now + PUT_BACK) {
                    self.scoreboard.cut(Cut::Vault, lost.conns as u64);
                    warn!(
                        "cannot take over {} an earlier release kept across the restart: {}; closed",
                        crate::logging::counted(lost.conns as u64, "connection", "connections"),
                        lost.why
                    );
                }
            }
        }
        self.kept.carried.look_again();
    }

    /// prefork and fork mode, at start with connections in the vault:
    /// starts a carrier (see [`Kind::Carrier`]) to serve them at once.
    /// Without one (it cannot be forked, or there is no event loop here)
    /// they wait for a worker each, as [`Master::restore`] hands them to
    /// the pool, or for a child each, forked for it (fork mode: 2,000
    /// connections kept across a restart waited up to 1.05 s for theirs,
    /// across a crash of the master 2.09 s, its restart delay included).
    pub(super) fn start_carrier(&mut self, now: Instant) {
        let wanted = matches!(self.cfg.mode, Mode::Prefork | Mode::Fork)
            && cfg!(any(target_os = "linux", target_os = "android"))
            && self.kept.vault.as_ref().is_some_and(Vault::holds_any);
        if !wanted {
            return;
        }
        match self.spawn_worker(Target::InForce, Kind::Carrier, now) {
            Ok(pid) => self.kept.carrier = Some(pid),
            Err(e) => warn!("cannot start a carrier for the connections kept across the restart: {e}; they wait for a worker each"),
        }
    }

    /// Whether the carrier is still taking connections out of the vault
    /// (the master reads what it leaves once it says it is ready, or has
    /// died).
    pub(super) fn carrier_reading(&self) -> bool {
        self.kept
            .carrier
            .and_then(|pid| self.children.get(pid))
            .and_then(|c| c.slot)
            .and_then(|s| self.scoreboard.get(s))
            .is_some_and(|e| e.state == State::Starting)
    }

    /// Hands the connections the vault holds to the workers through the
    /// relay, as it has room (and this process descriptors), each
    /// counting again for its client's `--max-per-ip`.
    pub(super) fn restore(&mut self, now: Instant) {
        if self.carrier_reading() {
            return;
        }
        let (Some(_), Some(vault)) = (&self.chan.relay, &self.kept.vault) else {
            return;
        };
        if self.kept.carried_retry.is_some_and(|t| now < t) {
            return;
        }
        self.kept.carried_retry = None;
        self.kept.carried.count_room_again();
        loop {
            let (fd, mut c) = match self.kept.carried.next(vault) {
                Ok(Some(conn)) => conn,
                Ok(None) => break,
                Err(e) => {
                    // No room: wait for some. Anything else: whatever was
                    // in that message is lost; the rest is read on.
                    self.kept.carried_retry = Some(now + NO_ROOM_RETRY);
                    let why = match e {
                        Errno::EMFILE => {
                            let (soft, _) = crate::sys::nofile_limit();
                            format!("no descriptors free (RLIMIT_NOFILE {soft}); trying again")
                        }
                        Errno::ENOBUFS => {
                            "a message's connections did not all fit in this process's descriptors and were closed".into()
                        }
                        e => crate::logging::error_text(&std::io::Error::from(e)),
                    };
                    if let Some(more) = self.reports.errors.hit(now) {
                        warn!("cannot take connections out of the vault: {why} ({more} more since the last report)");
                    }
                    return;
                }
            };
            c.place = self.fork.policy.recount(&self.scoreboard, &fd, c.client);
            match self.offer_restored(fd.as_fd(), &c) {
                Offer::Sent => {
                    self.kept.restored += 1;
                    self.kept.restored_any = true;
                }
                Offer::Full(e) => {
                    if let Some(p) = c.place {
                        crate::admission::give_back(&self.scoreboard, p);
                    }
                    self.kept.carried.unget((fd, c));
                    // Full: the relay's room wakes the master. Over the
                    // descriptors in flight: it is writable all the same,
                    // so wait a while rather than spin.
                    if e != Errno::EAGAIN {
                        self.kept.carried_retry = Some(now + NO_ROOM_RETRY);
                    }
                    return;
                }
                Offer::Failed(e) => {
                    self.scoreboard.cut(Cut::Vault, 1);
                    warn!("cannot hand a connection kept across the restart to the workers: {e}; closed");
                    if let Some(p) = c.place {
                        crate::admission::give_back(&self.scoreboard, p);
                    }
                }
            }
        }
        if self.kept.restored > 0 {
            info!(
                "{} kept across the restart handed to the workers",
                crate::logging::counted(self.kept.restored, "connection", "connections")
            );
            self.kept.restored = 0;
        }
        if self.kept.carried.foreign > 0 {
            warn!(
                "closed {} in the vault that were not connections of ours",
                crate::logging::counted(
                    self.kept.carried.foreign as u64,
                    "descriptor",
                    "descriptors"
                )
            );
            self.kept.carried.foreign = 0;
        }
    }

    /// Whether connections taken out of the vault at this start still
    /// wait for a worker (then "ready" waits, at most [`CARRIED_WAIT`]
    /// after `since`, when the workers were ready).
    pub(super) fn carried_waiting(&self, now: Instant, since: Instant) -> bool {
        let relayed = self.scoreboard.relayed();
        let waiting = self.kept.vault.is_some()
            && (self.kept.carried.may_have_more()
                || self.kept.restored_any
                    && relayed.load(std::sync::atomic::Ordering::Acquire) > 0);
        if waiting && now >= since + CARRIED_WAIT {
            warn!(
                "connections kept across the restart still wait for a worker {} s after the workers were ready: ready all the same",
                CARRIED_WAIT.as_secs()
            );
            return false;
        }
        waiting
    }

    /// A stop that is not a restart: the listeners out of the store, so
    /// that new clients are refused, not queued for no one.
    pub(super) fn unstore_listeners(&self) {
        let Some(notify) = self.estate.notify.as_ref() else {
            return;
        };
        for l in self.acceptor.listeners() {
            if let Some(addr) = l.configured() {
                notify.unstore(&systemd::listener_name(&addr.to_string()));
            }
        }
    }

    /// Restarting, once the children are gone: what waits in the relay,
    /// and what the master took out of the vault and did not hand on,
    /// goes back into the vault.
    pub(super) fn put_back(&mut self, now: Instant) {
        let (Some(vault), Some(_)) = (&self.kept.vault, &self.chan.relay) else {
            return;
        };
        let conns = self.drain_relay();
        let lost = vault.put(conns, now + PUT_BACK).err();
        self.lost_for_next_master(lost);
        self.put_back_carried(now);
    }

    /// What the master took out of the vault and did not hand on goes
    /// back (it restarts, or re-executes itself).
    pub(super) fn put_back_carried(&mut self, now: Instant) {
        let Some(vault) = &self.kept.vault else {
            return;
        };
        let lost = vault.put_back(&mut self.kept.carried, now + PUT_BACK).err();
        self.lost_for_next_master(lost);
    }

    fn lost_for_next_master(&self, lost: Option<vault::Lost>) {
        if let Some(l) = lost {
            self.scoreboard.cut(Cut::Vault, l.conns as u64);
            warn!(
                "cannot keep {} for the next master: {}; closed",
                crate::logging::counted(l.conns as u64, "connection", "connections"),
                crate::logging::error_text(&std::io::Error::from(l.why))
            );
        }
    }

    /// TERM under systemd: asks, in a child, whether the unit's job is a
    /// restart and whether its store has room. `Some`: no answer can come.
    pub(super) fn ask_restart(&mut self) -> Option<Event> {
        let unit = self.kept.unit.clone()?;
        if self.kept.vault.is_none() {
            return Some(Event::Restart(false));
        }
        let spawned = self.spawn_helper(|w| {
            let answer = restart_answer(&unit);
            let _ = nix::unistd::write(w, answer.as_bytes());
            0
        });
        match spawned {
            Ok(query) => {
                self.underway.query = Some(query);
                None
            }
            Err(_) => Some(Event::Restart(false)),
        }
    }

    /// The query exited: what to tell the lifecycle it found.
    pub(super) fn query_done(&mut self) -> Option<Event> {
        let q = self.underway.query.take()?;
        Some(Event::Restart(q.said(16) == "restart"))
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
