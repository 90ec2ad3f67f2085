//! What each kind of child runs after the fork, and how many of a helper
//! the configuration wants: the master's half of the table of kinds
//! (kind.rs holds what every process may know of a kind). Kept here, with
//! its only user, so that the modules a child runs never import it back.

use crate::config::{Config, Mode};
use crate::kind::Kind;
use crate::listen::Listener;
use crate::worker::Ctx;

/// What a worker needs from the configuration it is started for, besides
/// its context.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    pub mode: Mode,
    /// event: `--worker-connections`.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub max_open: usize,
    /// Its `--max-requests`, jitter included (0: none).
    pub max_requests: u64,
    /// `--udp-rate`.
    pub udp_rate: u32,
    /// event: the I/O engine in force (for the metrics worker too).
    pub engine: crate::engine::Engine,
}

/// What a worker runs after the fork: its listeners, its context and
/// its parameters in, its exit code out.
pub type Entry = fn(Vec<Listener>, Ctx<'_>, Params) -> i32;

/// What a kind runs once started (`None`: a fork-mode child, forked for a
/// connection, not started).
pub fn entry(kind: Kind) -> Option<Entry> {
    match kind {
        Kind::Pool => Some(pool),
        Kind::Conn => None,
        Kind::Udp => Some(|l, ctx, p| crate::udp::run(l, ctx, p.udp_rate)),
        Kind::Metrics => Some(|l, ctx, p| {
            let engine = (p.mode == Mode::Event).then_some(p.engine);
            crate::metrics::run(l, ctx, engine)
        }),
        Kind::Carrier => Some(carry),
    }
}

/// How many of a helper the configuration wants while a listener of its
/// service is open (the pool's size is the pool's own affair).
pub fn wanted(kind: Kind, cfg: &Config) -> usize {
    match kind {
        Kind::Udp => cfg.udp_workers as usize,
        Kind::Metrics => 1,
        Kind::Pool | Kind::Conn | Kind::Carrier => 0,
    }
}

/// A pool worker of the mode in force.
fn pool(listeners: Vec<Listener>, ctx: Ctx<'_>, p: Params) -> i32 {
    match p.mode {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Mode::Event => crate::event::run(listeners, ctx, p.max_open, p.max_requests, p.engine),
        _ => crate::worker::prefork(listeners, ctx, p.max_requests),
    }
}

/// A carrier: the event loop where there is one (elsewhere none is
/// started: the master hands what the vault holds to the pool).
fn carry(_: Vec<Listener>, ctx: Ctx<'_>, _: Params) -> i32 {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    return crate::event::carry(ctx);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        drop(ctx);
        1
    }
}
