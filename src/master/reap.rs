//! Children's deaths: reaping every exited child, telling how each ended,
//! and the crash-loop protection that early deaths feed (children.rs
//! decides, this acts and logs); retiring children that outstay their
//! deadline.

use std::time::Instant;

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::lifecycle::Event;
use super::Master;
use crate::admission;
use crate::children::{
    classify, describe, Child, Exit, Kind, EXIT_CANNOT_ACCEPT, EXIT_REFUSED, QUICK_DEATH,
};
use crate::scoreboard::{Exited, State};

impl Master {
    /// Reaps every exited child (one SIGCHLD may stand for many exits);
    /// returns what to tell the lifecycle of them.
    pub(super) fn reap(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return events,
                Ok(s) => s,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    return events;
                }
            };
            let Some(pid) = status.pid() else { continue };
            if self.underway.check.as_ref().is_some_and(|c| c.pid == pid) {
                events.extend(self.check_done(status));
                continue;
            }
            if self.underway.query.as_ref().is_some_and(|q| q.pid == pid) {
                events.extend(self.query_done());
                continue;
            }
            let Some(child) = self.children.remove(pid) else {
                continue;
            };
            let (abnormal, how) = describe(&status);
            // The places it held for its clients, before its slot goes.
            let held = admission::Held {
                kept: child.place,
                slot: child.slot,
                fork: child.fork_slot,
                abnormal,
            };
            self.fork.policy.reclaim(&self.scoreboard, held);
            if let Some(index) = child.fork_slot {
                self.fork.slots.give_back(index);
            }
            let last = child.slot.and_then(|s| self.scoreboard.release(s));
            if let Some(slot) = child.slot.filter(|_| self.prefork.turns) {
                // It died leading: another idle worker waits for connections.
                crate::turns::pass(&self.scoreboard, Some(slot));
            }
            self.prefork.served_by_gone += last.map_or(0, |e| e.served);
            let never_ready = last.is_some_and(|e| e.state == State::Starting);
            if child.kind == Kind::Conn {
                let took = self.took_a_connection(pid);
                if matches!(status, WaitStatus::Exited(_, EXIT_CANNOT_ACCEPT)) {
                    self.acceptor.pause_for_a_while(now);
                }
                if took && !matches!(status, WaitStatus::Exited(_, EXIT_REFUSED)) {
                    self.scoreboard.connections_ended(1);
                }
            } else {
                self.scoreboard.exited(match status {
                    WaitStatus::Exited(_, 0) => Exited::Clean,
                    WaitStatus::Signaled(..) => Exited::Signal,
                    _ => Exited::Error,
                });
            }
            let stopping = self.life.stopping();
            let starting = self.life.starting().then_some(self.life.generation());
            match child.kind {
                kind if kind.is_worker() && (child.killed || stopping) => {
                    debug!("{} {pid} {how}", kind.name())
                }
                kind if kind.is_worker() && child.retire_by.is_some() => {
                    if abnormal {
                        warn!("retiring {} {pid} {how}", child.kind.name());
                    } else {
                        info!("{} {pid} {how}", child.kind.name());
                    }
                }
                Kind::Pool if never_ready && self.life.next() == Some(child.generation) => {
                    let why = format!("new worker {pid} {how} before it was ready");
                    events.push(Event::DiedBeforeReady { next: true, why });
                }
                Kind::Pool if never_ready && starting == Some(child.generation) => {
                    let why = format!("worker {pid} {how} before it was ready");
                    events.push(Event::DiedBeforeReady { next: false, why });
                }
                Kind::Conn if self.life.killed() => debug!("child {pid} {how}"),
                role => {
                    let lived = now.duration_since(child.started);
                    let exit = classify(&status, role, lived, !never_ready);
                    self.note_exit(pid, &child, exit, &how, now);
                }
            }
        }
    }

    /// Logs how a child of the generation in force ended, and feeds the
    /// crash-loop protection: early deaths may hold spawning back (logged
    /// once when it starts, then rate-limited), a probe that exits cleanly
    /// ends it.
    pub(super) fn note_exit(
        &mut self,
        pid: Pid,
        child: &Child,
        exit: Exit,
        how: &str,
        now: Instant,
    ) {
        let who = child.kind.name();
        let probe = self
            .backoff
            .probes_since()
            .is_some_and(|t| child.started >= t);
        match exit {
            Exit::Clean => {
                if child.kind != Kind::Conn {
                    info!("{who} {pid} {how}");
                } else {
                    debug!("child {pid} {how}");
                }
                if probe {
                    self.recovered();
                }
            }
            Exit::Abnormal => warn!("{who} {pid} {how}"),
            Exit::FailedStart | Exit::DiedYoung => {
                let was_active = self.backoff.is_active();
                let escalated = self.backoff.early_death(now, child.started, exit);
                let when = if exit == Exit::FailedStart && child.kind != Kind::Conn {
                    "before it was ready"
                } else {
                    "right after it started"
                };
                let lived = now.duration_since(child.started).as_millis();
                let wait = self.respawn_wait(now).as_millis();
                match escalated {
                    Some(_) if !was_active => warn!(
                        "{who} {pid} {how} {lived} ms after it was forked, {when}: children are failing as they start; crash-loop back-off: one at a time, respawning in {wait} ms"
                    ),
                    Some(_) => match self.reports.crash.hit(now) {
                        Some(more) => warn!(
                            "children still fail as they start ({who} {pid} {how}, {when}); respawning in {wait} ms ({more} more early deaths since the last report)"
                        ),
                        None => debug!("{who} {pid} {how}, {when}; respawning in {wait} ms"),
                    },
                    None if was_active => debug!("{who} {pid} {how}, {when}"),
                    None => warn!("{who} {pid} {how}"),
                }
            }
        }
    }

    /// The probes started during a crash-loop back-off that are alive and
    /// may yet prove healthy: (started, proved so far).
    pub(super) fn probes(&self) -> impl Iterator<Item = (Instant, bool)> + '_ {
        let since = self.backoff.probes_since();
        self.children
            .iter()
            .filter(move |(_, c)| since.is_some_and(|t| c.started >= t) && c.retire_by.is_none())
            .map(|(_, c)| {
                let ready = match c.kind {
                    Kind::Conn => true,
                    Kind::Pool | Kind::Udp | Kind::Metrics | Kind::Carrier => c
                        .slot
                        .and_then(|s| self.scoreboard.get(s))
                        .is_some_and(|e| matches!(e.state, State::Idle | State::Busy)),
                };
                (c.started, ready)
            })
    }

    /// When a probe alive now will have lived long enough to prove healthy.
    pub(super) fn probe_deadline(&self, now: Instant) -> Option<Instant> {
        self.probes()
            .map(|(started, _)| started + QUICK_DEATH)
            .filter(|&t| t > now)
            .min()
    }

    /// Ends a crash-loop back-off once a probe has been ready (a fork-mode
    /// child: alive) for [`QUICK_DEATH`].
    pub(super) fn check_probes(&mut self, now: Instant) {
        if self.backoff.is_active()
            && self
                .probes()
                .any(|(started, ready)| ready && now >= started + QUICK_DEATH)
        {
            self.recovered();
        }
    }

    pub(super) fn recovered(&mut self) {
        if let Some(deaths) = self.backoff.healthy() {
            info!("children start normally again: crash-loop back-off over after {deaths} early deaths");
        }
    }

    /// Kills workers that were told to stop but are still serving past
    /// their `shutdown-timeout`: one line for all those due at once,
    /// however many (a reload of thousands that found no room, say).
    pub(super) fn kill_overdue(&mut self, now: Instant) {
        let overdue = self.children.overdue(now);
        if overdue.is_empty() {
            return;
        }
        let open: u64 = overdue.iter().map(|&pid| self.open_in(pid)).sum();
        self.scoreboard.cut(crate::scoreboard::Cut::Timeout, open);
        for &pid in &overdue {
            let _ = kill(pid, Signal::SIGKILL);
            self.children.mark_killed(pid);
        }
        let named: Vec<String> = overdue.iter().take(8).map(|p| p.to_string()).collect();
        let more = overdue.len().saturating_sub(named.len());
        warn!(
            "{} still busy {} s after told to stop ({}{}): killing them, cutting {}",
            crate::logging::counted(overdue.len() as u64, "worker", "workers"),
            self.cfg.shutdown_timeout.as_secs(),
            named.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            crate::logging::counted(open, "open connection", "open connections")
        );
    }
}
