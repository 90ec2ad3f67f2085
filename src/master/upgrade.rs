//! USR2: upgrading the binary in place, HAProxy's way rather than nginx's.
//! The master checks the executable now at the path it was started from
//! (`-t`, in a child it does not wait for), then re-executes it with the
//! same pid and arguments, keeping open across `execve` what the new code
//! needs: the listeners (never closed, so no connection attempt is
//! refused), the locked pidfile, systemd's socket, the scoreboard's memfd,
//! the notice pipe, and every child's control pipe, described in the
//! inheritance (upgrade.rs). The new master adopts the children as the
//! previous generation, starts its own, and retires the old ones once its
//! own are ready, as a reload does. If the check or the exec fails, the
//! running code goes on.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, Instant};

use log::{error, info};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use super::lifecycle::Event;
use super::Master;
use crate::children::describe;
use crate::scoreboard::Place;
use crate::sys;
use crate::upgrade::{Inheritance, PassedChild, PassedListener, PassedRole, ENV};

impl Master {
    /// SIGUSR2, as the lifecycle allows it: starts the new executable's
    /// `-t` in a child it does not wait for. `Some`: it could not be.
    pub(super) fn start_check(&mut self, _now: Instant) -> Option<Event> {
        let exe = self.source.exe.clone();
        info!("SIGUSR2: checking {} before upgrading to it", exe.display());
        let argv = match self.argv(true) {
            Ok(a) => a,
            Err(e) => return Some(Event::CheckNotStarted(format!("cannot be run: {e}"))),
        };
        let spawned = self.spawn_helper(|w| {
            // A group of its own, so that giving it up ends whatever it
            // started too (a script's children).
            let _ = nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
            // And it does not outlive a master killed meanwhile.
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            let _ = nix::unistd::dup2_stdout(w);
            let _ = nix::unistd::dup2_stderr(w);
            let e = nix::unistd::execv(&argv[0], &argv).err();
            crate::logging::say(format_args!(
                "cannot run {}: {}",
                argv[0].to_string_lossy(),
                e.map_or("".into(), |e| e.desc().to_lowercase())
            ));
            127
        });
        match spawned {
            Ok(check) => {
                // Set on both sides, so that the group exists whichever
                // runs first (the child may fail before it sets it).
                let _ = nix::unistd::setpgid(check.pid, check.pid);
                self.underway.check = Some(check);
                None
            }
            Err(e) => Some(Event::CheckNotStarted(format!("cannot be checked: {e}"))),
        }
    }

    /// The check exited (reaped as `status`): what to tell the lifecycle
    /// of whether it passed, with what it said if not.
    pub(super) fn check_done(&mut self, status: WaitStatus) -> Option<Event> {
        let check = self.underway.check.take()?;
        // Whatever it left running in its group goes with it.
        end_group(check.pid);
        let said = check.said(4096);
        let said = said.trim().replace('\n', "; ");
        let result = if matches!(status, WaitStatus::Exited(_, 0)) {
            Ok(())
        } else {
            let (_, how) = describe(&status);
            Err(format!(
                "-t {how}{}{said}",
                if said.is_empty() { "" } else { ": " }
            ))
        };
        Some(Event::Checked(result))
    }

    /// Gives the check up (it took too long, or the master stops): its
    /// group is killed, and its exit is reaped as any child's, unheeded.
    pub(super) fn end_check(&mut self) {
        if let Some(c) = self.underway.check.take() {
            end_group(c.pid);
        }
    }

    /// The argument vector: the executable, then (for the check) `-t`,
    /// then the arguments the daemon was started with.
    fn argv(&self, check: bool) -> Result<Vec<CString>, String> {
        let exe = self.source.exe.as_os_str().as_bytes();
        let mut all: Vec<&[u8]> = vec![exe];
        if check {
            all.push(b"-t");
        }
        all.extend(self.source.args.iter().map(|a| a.as_bytes()));
        all.into_iter()
            .map(|a| CString::new(a).map_err(|_| "an argument holds a NUL byte".to_string()))
            .collect()
    }

    /// What the new master needs, by descriptor.
    fn inheritance(&self, now: Instant) -> Inheritance {
        let raw = |f: &OwnedFd| f.as_raw_fd();
        Inheritance {
            pid: std::process::id(),
            generation: self.life.generation(),
            started_secs_ago: now.duration_since(self.reports.started).as_secs(),
            listeners: self
                .acceptor
                .listeners()
                .iter()
                .map(|l| PassedListener {
                    fd: l.as_fd().as_raw_fd(),
                    configured: l.configured().map(|a| a.to_string()),
                    owns_file: l.owns_file(),
                })
                .collect(),
            pidfile: self
                .estate
                .pidfile
                .as_ref()
                .map(|p| (p.raw_fd(), p.path().to_path_buf())),
            notify: self.estate.notify.as_ref().map(|n| n.raw_fd()),
            scoreboard: self
                .scoreboard
                .fd()
                .map(|f| (f.as_raw_fd(), self.scoreboard.slots())),
            notice: match (&self.chan.notice_r, &self.chan.notice_w) {
                (Some(r), Some(w)) => Some((raw(r), raw(w))),
                _ => None,
            },
            fork_ctl: self
                .fork
                .ctl_w
                .as_ref()
                .map(|w| (raw(&self.fork.ctl_r), raw(w))),
            relay: self
                .chan
                .relay
                .as_ref()
                .map(|r| (r.tx.as_fd().as_raw_fd(), r.rx.as_fd().as_raw_fd())),
            vault: self.kept.vault.as_ref().map(|v| {
                let [a, b] = v.ends();
                (a.as_raw_fd(), b.as_raw_fd())
            }),
            children: self
                .children
                .iter()
                .map(|(pid, c)| PassedChild {
                    pid: pid.as_raw(),
                    generation: c.generation,
                    role: if c.kind.is_worker() {
                        PassedRole::Worker {
                            kind: c.kind,
                            slot: c.slot,
                            ctl: c.ctl.as_ref().map(raw),
                            retiring: c.retire_by.is_some(),
                        }
                    } else {
                        PassedRole::Conn {
                            place: c.place.map(|p| p.index() as u128),
                            slot: c.fork_slot,
                        }
                    },
                })
                .collect(),
            served_by_gone: self.prefork.served_by_gone,
            accepted: self.fork.accepted,
            places: true,
            reported: Some((
                self.reports.refused.logged().to_vec(),
                self.reports.dropped.logged().to_vec(),
            )),
        }
    }

    /// Re-executes the new code with the inheritance; returns only if that
    /// failed, having put everything back, with why.
    pub(super) fn exec(&mut self, now: Instant) -> Option<Event> {
        let argv = match self.argv(false) {
            Ok(a) => a,
            Err(e) => return Some(Event::ExecFailed(e)),
        };
        // What the vault held and is not with the workers yet waits there
        // for the new code.
        if !self.kept.carried.is_done() {
            self.put_back_carried(now);
        }
        let inheritance = self.inheritance(now);
        let fds = inheritance.fds();
        info!(
            "upgrading: re-executing {} with the same pid; {} handed over",
            self.source.exe.display(),
            crate::logging::counted(inheritance.children.len() as u64, "child", "children")
        );
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::time::monotonic_usec()
        ));
        // What waits for the service manager would be lost with this code.
        if let Some(n) = &self.estate.notify {
            n.flush_within(Duration::from_secs(2));
        }
        set_cloexec(&fds, false);
        std::env::set_var(ENV, inheritance.encode());
        // Blocked across the exec, so that no signal finds the new code
        // before its handlers; it unblocks them once they are installed.
        let mut old = SigSet::empty();
        let _ = sigprocmask(
            SigmaskHow::SIG_SETMASK,
            Some(&SigSet::all()),
            Some(&mut old),
        );
        let e = nix::unistd::execv(&argv[0], &argv).err();
        let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        std::env::remove_var(ENV);
        set_cloexec(&fds, true);
        Some(Event::ExecFailed(format!(
            "cannot execute {}: {}",
            self.source.exe.display(),
            e.map_or("".into(), |e| e.desc().to_lowercase())
        )))
    }
}

/// Kills the check's process group (its group id is its pid), the check
/// and whatever it started. A group with no one left is ESRCH, ignored;
/// its id is not reused while any member lives.
fn end_group(check: Pid) {
    let _ = nix::sys::signal::killpg(check, nix::sys::signal::Signal::SIGKILL);
}

/// Sets or clears close-on-exec on `fds`.
fn set_cloexec(fds: &[RawFd], on: bool) {
    let flag = if on {
        FdFlag::FD_CLOEXEC
    } else {
        FdFlag::empty()
    };
    for &fd in fds {
        // SAFETY: the descriptors are the master's own and open (they were
        // just read from its live objects); F_SETFD only changes a flag.
        #[allow(unsafe_code)]
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let _ = fcntl(borrowed, FcntlArg::F_SETFD(flag));
    }
}

/// A inheritance in the environment that cannot be taken.
pub struct Untaken {
    /// It names this process: the old code of this very process exec'd
    /// us and is gone, so there is nothing to go back to.
    pub ours: bool,
    pub why: String,
}

/// The new master, at startup: the inheritance its predecessor left in the
/// environment, if any (removed from the environment, so that nothing
/// this process starts inherits it).
pub fn take_inheritance() -> Option<Result<Inheritance, Untaken>> {
    let text: OsString = std::env::var_os(ENV)?;
    std::env::remove_var(ENV);
    let text = text.to_string_lossy().into_owned();
    let me = std::process::id();
    let ours = text.split(';').any(|part| part == format!("pid={me}"));
    Some(match Inheritance::decode(&text) {
        Ok(h) if h.pid == me => Ok(h),
        Ok(h) => Err(Untaken {
            ours: false,
            why: format!("it was left for pid {}, not for this one", h.pid),
        }),
        Err(why) => Err(Untaken { ours, why }),
    })
}

/// The new master's side: the inheritance's descriptors, now owned.
pub(super) struct Adopted {
    inheritance: Inheritance,
    pub(super) fork_ctl: Option<(OwnedFd, OwnedFd)>,
    pub(super) notice: Option<(OwnedFd, OwnedFd)>,
    pub(super) relay: Option<crate::relay::Relay>,
    pub(super) vault: Option<crate::vault::Vault>,
    /// The scoreboard's memfd, its slots and those the children hold.
    pub(super) scoreboard: Option<(OwnedFd, usize, Vec<usize>)>,
    children: Vec<(PassedChild, Option<OwnedFd>)>,
}

/// Takes a descriptor the inheritance names.
fn own(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: the inheritance names each descriptor once, as the previous
    // code of this very process left it open across execve for us; lib.rs
    // took the listeners, pidfile and notify socket, this takes the rest,
    // and nothing else in this process owns any of them.
    #[allow(unsafe_code)]
    let fd = unsafe { sys::inherited_fd(fd) }?;
    // Close-on-exec again, as every descriptor of ours is.
    let _ = fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    Some(fd)
}

fn own_pair(p: Option<(RawFd, RawFd)>) -> Option<(OwnedFd, OwnedFd)> {
    let (a, b) = p?;
    Some((own(a)?, own(b)?))
}

impl Adopted {
    /// The generation the old code had in force.
    pub(super) fn generation(&self) -> u32 {
        self.inheritance.generation
    }

    /// The slots and places the children name are not this scoreboard's.
    pub(super) fn forget_slots(&mut self) {
        for (c, _) in &mut self.children {
            match &mut c.role {
                PassedRole::Worker { slot, .. } => *slot = None,
                PassedRole::Conn { place, slot } => {
                    *place = None;
                    *slot = None;
                }
            }
        }
    }

    /// Owns what `inheritance` names (besides the listeners, the pidfile and
    /// systemd's socket, which startup takes).
    pub(super) fn new(inheritance: Inheritance) -> Adopted {
        let children: Vec<(PassedChild, Option<OwnedFd>)> = inheritance
            .children
            .iter()
            .map(|c| (c.clone(), c.ctl().and_then(own)))
            .collect();
        let in_use: Vec<usize> = children
            .iter()
            .filter_map(|(c, _)| match c.role {
                PassedRole::Worker { slot, .. } => slot,
                PassedRole::Conn { .. } => None,
            })
            .collect();
        Adopted {
            fork_ctl: own_pair(inheritance.fork_ctl),
            notice: own_pair(inheritance.notice),
            relay: own_pair(inheritance.relay)
                .map(|(tx, rx)| crate::relay::Relay::from_fds(tx, rx)),
            vault: own_pair(inheritance.vault).map(|(a, b)| crate::vault::Vault::adopt(a, b)),
            scoreboard: inheritance
                .scoreboard
                .and_then(|(fd, n)| Some((own(fd)?, n, in_use))),
            children,
            inheritance,
        }
    }
}

impl Master {
    /// Takes over its predecessor's children as the previous generation;
    /// the pool fills with a new one, and once that is ready the old one
    /// retires (`progress`).
    pub(super) fn adopt(&mut self, a: Adopted, now: Instant) {
        use crate::children::{Child, Kind};
        let h = a.inheritance;
        let old = h.generation;
        self.reports.started = now
            .checked_sub(Duration::from_secs(h.started_secs_ago))
            .unwrap_or(now);
        self.prefork.served_by_gone = h.served_by_gone;
        self.fork.accepted = h.accepted;
        // The log goes on from what the old code reported; from an older
        // master, which does not say, from the counts as they are (what
        // it had not reported yet is in the status line and the metrics).
        let (refused, dropped) = h.reported.unwrap_or_else(|| {
            let (_, dropped) = self.scoreboard.udp_counts();
            (self.scoreboard.refusals().to_vec(), dropped.to_vec())
        });
        self.reports.refused = super::status::Counted::from_logged(&refused);
        self.reports.dropped = super::status::Counted::from_logged(&dropped);
        // Cut connections the old code counted were its to report.
        self.reports.cut = super::status::Counted::from_logged(&self.scoreboard.cuts());
        let retire_by = crate::time::after(now, self.cfg.shutdown_timeout);
        let n = a.children.len();
        for (c, ctl) in a.children {
            let mut child = match c.role {
                PassedRole::Worker {
                    kind,
                    slot,
                    retiring,
                    ..
                } => {
                    let mut w = Child::new(kind, now);
                    w.slot = slot;
                    // No pipe and not told yet: the pipe is its own, and
                    // it is told by signal (an older master's workers
                    // always came with the pipe's write end).
                    w.told_by_signal = cfg!(any(target_os = "linux", target_os = "android"))
                        && ctl.is_none()
                        && !retiring;
                    w.ctl = ctl;
                    w.retire_by = retiring.then_some(retire_by);
                    w
                }
                PassedRole::Conn { place, slot } => {
                    let mut conn = Child::new(Kind::Conn, now);
                    conn.place = match (place, h.places) {
                        (Some(p), true) => Place::from_index(p as usize),
                        // An older master counted its client in its own
                        // memory: count it in the shared table now.
                        (Some(key), false) => {
                            let p = self.scoreboard.place_of(self.fork.policy.source(key));
                            self.scoreboard.recount_place(p);
                            Some(p)
                        }
                        (None, _) => None,
                    };
                    conn.fork_slot = slot;
                    if let Some(index) = slot {
                        self.fork.slots.reserve(index);
                    }
                    conn
                }
            };
            child.generation = c.generation;
            self.children.insert(Pid::from_raw(c.pid), child);
        }
        info!(
            "upgraded to version {}: {} of generation {old} adopted; generation {} starting",
            env!("CARGO_PKG_VERSION"),
            crate::logging::counted(n as u64, "child", "children"),
            self.life.generation()
        );
    }

    /// The new generation is ready after an upgrade: the old code's
    /// generation `old` (and any before it) retires.
    pub(super) fn upgrade_done(&mut self, now: Instant, old: u32) {
        let retiring = self
            .children
            .iter()
            .filter(|(_, c)| c.generation <= old && c.kind.is_worker() && c.retire_by.is_none())
            .count();
        // The lifecycle has put the new generation (above `old`) in force.
        debug_assert!(self.life.generation() > old);
        self.retire_older(now);
        info!(
            "upgraded: generation {} serves; {} retiring",
            self.life.generation(),
            crate::logging::counted(retiring as u64, "old worker", "old workers")
        );
    }

    /// The new code's workers did not start: they retire, and the old
    /// code's, of generation `old`, go on serving (the lifecycle has put
    /// it back in force).
    pub(super) fn upgrade_failed(&mut self, now: Instant, old: u32, why: &str) {
        error!("after the upgrade, {why}; the old workers go on serving");
        self.children.retire_where(
            crate::time::after(now, self.cfg.shutdown_timeout),
            &self.scoreboard,
            |g| g > old,
        );
        self.announce_ready(now);
    }
}

/// The listeners, the pidfile and systemd's socket a master passed on.
pub type Passed = (
    Vec<crate::listen::Listener>,
    Option<crate::daemon::PidFile>,
    Option<crate::systemd::Notify>,
);

/// The new master, at startup: the listeners, the pidfile and systemd's
/// socket its predecessor passed on, owned again.
pub fn take_passed(h: &Inheritance) -> Result<Passed, String> {
    let mut listeners = Vec::with_capacity(h.listeners.len());
    for l in &h.listeners {
        let fd = own(l.fd).ok_or(format!("listener fd {} is not open", l.fd))?;
        listeners.push(crate::listen::Listener::adopt_passed(
            fd,
            l.configured.as_deref(),
            l.owns_file,
        )?);
    }
    let pidfile = match &h.pidfile {
        Some((fd, path)) => {
            let fd = own(*fd).ok_or(format!("pidfile fd {fd} is not open"))?;
            Some(crate::daemon::PidFile::adopt(fd, path.clone()))
        }
        None => None,
    };
    let notify = h.notify.and_then(own).map(crate::systemd::Notify::adopt);
    Ok((listeners, pidfile, notify))
}
