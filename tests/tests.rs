//! Integration tests: the real binary on loopback, driven through the
//! `Daemon` guard in util/daemon.rs (the helpers: util.rs).

mod util;

/// One test per process model, each running `$body(mode)`, as
/// `$name::prefork`, `$name::fork` and `$name::event`.
macro_rules! in_every_mode {
    ($name:ident: $body:ident) => {
        mod $name {
            #[test]
            fn prefork() {
                super::$body("prefork");
            }

            #[test]
            fn fork() {
                super::$body("fork");
            }

            #[test]
            fn event() {
                super::$body("event");
            }
        }
    };
}

/// One test per model whose workers retire and hand their connections
/// over, each running `$body(mode)`, as `$name::prefork` and
/// `$name::event` (fork mode's children finish their own).
macro_rules! in_worker_modes {
    ($name:ident: $body:ident) => {
        mod $name {
            #[test]
            fn prefork() {
                super::$body("prefork");
            }

            #[test]
            fn event() {
                super::$body("event");
            }
        }
    };
}

mod config;
mod crash;
mod daemon;
mod docs;
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
