//! Integration tests: the real binary on loopback, driven through the
//! `Daemon` guard in util/daemon.rs (the helpers: util.rs).

mod util;

/// One test per process model named, each running `$body(mode)`, as
/// `$name::prefork` and so on: `in_modes!(name: body; prefork, fork,
/// event)` for every model, `prefork, event` for the models whose workers
/// retire and hand their connections over (fork mode's children finish
/// their own).
macro_rules! in_modes {
    ($name:ident: $body:ident; $($mode:ident),+) => {
        mod $name {
            $(
                #[test]
                fn $mode() {
                    super::$body(stringify!($mode));
                }
            )+
        }
    };
}

mod config;
mod crash;
mod daemon;
mod docs;
mod engine;
mod fork_promises;
mod handover;
mod limits;
mod logging;
mod metrics;
mod models;
mod protocol;
mod proxy;
mod signals;
mod stay;
mod structure;
mod supervision;
mod systemd;
mod turns;
mod udp;
mod upgrade;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;
