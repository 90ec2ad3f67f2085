//! The master's start: the pipes, the relay and the scoreboard it makes
//! (or adopts from its predecessor after USR2), and its first state.

use std::time::{Instant, SystemTime};

use log::{error, warn};
use nix::unistd::getpid;

use super::*;

/// Runs the master until it is stopped; returns the exit status. With a
/// `inheritance`, this process is a master that just re-executed itself
/// (USR2): it adopts its predecessor's children, pipes and scoreboard.
pub fn run(
    cfg: Config,
    listeners: Vec<Listener>,
    identity: Identity,
    estate: Estate,
    source: Source,
    inheritance: Option<crate::upgrade::Inheritance>,
) -> i32 {
    let fail = |what: &str, e: std::io::Error| {
        error!("cannot create {what}: {}", crate::logging::error_text(&e));
        1
    };
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => return fail("the signal handlers", e),
    };
    let mut adopted = inheritance.map(upgrade::Adopted::new);
    // What the predecessor passed on (after USR2), else made new.
    fn passed_or<T>(passed: Option<T>, make: impl FnOnce() -> nix::Result<T>) -> nix::Result<T> {
        passed.map_or_else(make, Ok)
    }
    let pipes = adopted
        .as_mut()
        .map(|a| (a.fork_ctl.take(), a.relay.take(), a.notice.take()));
    let (ctl, relay, notice) = pipes.unwrap_or((None, None, None));
    let (ctl_r, ctl_w) = match passed_or(ctl, || crate::sys::pipe(false)) {
        Ok(p) => p,
        Err(e) => return fail("the control pipe", e.into()),
    };
    let relay = match passed_or(relay, Relay::new) {
        Ok(r) => r,
        Err(e) => return fail("the relay", e.into()),
    };
    let (notice_r, notice_w) = match passed_or(notice, || crate::sys::pipe(true)) {
        Ok(p) => p,
        Err(e) => return fail("the notice pipe", e.into()),
    };
    // Two generations of a full pool may overlap during a reload.
    let board = match adopted.as_mut().and_then(|a| a.scoreboard.take()) {
        Some((fd, slots, in_use)) => Scoreboard::adopt(fd, slots, &in_use).or_else(|e| {
            // Another layout (an older build): the old workers' states
            // cannot be read; they are retired as soon as the new ones
            // serve, which does not need them.
            warn!("cannot read the old workers' scoreboard ({e}); starting a new one");
            if let Some(a) = adopted.as_mut() {
                a.forget_slots();
            }
            Scoreboard::new(2 * MAX_WORKERS_LIMIT as usize, seed())
        }),
        None => Scoreboard::new(2 * MAX_WORKERS_LIMIT as usize, seed()),
    };
    let scoreboard = match board {
        Ok(s) => s,
        Err(e) => return fail("the scoreboard", e),
    };
    crate::daemon::make_room_for_descriptors(&cfg, listeners.len());
    let now = Instant::now();
    let upgraded_from = adopted.as_ref().map(upgrade::Adopted::generation);
    // Under systemd, the unit whose restarts carry what the store keeps.
    let unit = estate
        .notify
        .as_ref()
        .and_then(|_| crate::systemd::unit_name());
    let mut master = Master {
        pid: getpid(),
        identity,
        estate,
        source,
        acceptor: Acceptor::new(listeners),
        chan: Channels {
            signals: Some(signals),
            relay: Some(relay),
            relay_wait: None,
            notice_r: Some(notice_r),
            notice_w: Some(notice_w),
        },
        scoreboard,
        children: Children::default(),
        backoff: Backoff::default(),
        life: {
            let life = Life::new(now, upgraded_from, cfg.shutdown_timeout);
            if unit.is_some() {
                life.asking_about_restarts()
            } else {
                life
            }
        },
        underway: Underway::default(),
        kept: Kept {
            unit,
            vault: adopted.as_mut().and_then(|a| a.vault.take()),
            ..Kept::default()
        },
        fork: ForkState {
            ctl_r,
            ctl_w: Some(ctl_w),
            conn_buf: None,
            accepted: 0,
            policy: cfg.policy(),
            saturation: Saturation::new(REPORT_EVERY),
            slots: IndexPool::default(),
            in_flight: super::fork::InFlight::new(),
            next_door: 0,
        },
        prefork: PreforkState {
            pool: Pool::default(),
            served_by_gone: 0,
            seed: seed(),
            at_max: RateLimit::new(REPORT_EVERY),
            recheck: None,
            turns: crate::turns::wanted(),
            fill_stuck: false,
            retiring_older: false,
            fill_more: false,
        },
        reports: Reports {
            started: now,
            next_tick: now + TICK,
            refused: status::Counted::default(),
            dropped: status::Counted::default(),
            cut: status::Counted::default(),
            errors: RateLimit::new(REPORT_EVERY),
            crash: RateLimit::new(REPORT_EVERY),
            status_sent: String::new(),
        },
        cfg,
    };
    if let Some(a) = adopted {
        master.adopt(a, now);
    }
    // Until a stop, a child told to stop hands its connections over.
    master
        .scoreboard
        .set_hand_over(crate::scoreboard::HandOver::ToWorkers);
    if master.scoreboard.start_secs() == 0 {
        // A new scoreboard: the start is now, or the predecessor's.
        let up = now.duration_since(master.reports.started);
        let secs = SystemTime::now()
            .checked_sub(up)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        master.scoreboard.set_start_secs(secs);
    }
    master.run()
}

/// A seed for what must differ between runs (the rate table's hash, each
/// worker's share of `max-requests-jitter`).
fn seed() -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}
