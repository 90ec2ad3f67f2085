//! Integration tests: the real binary on loopback, driven through the
//! `Daemon` guard in util.rs.

mod util;

mod config;
mod daemon;
mod docs;
mod limits;
mod logging;
mod models;
mod protocol;
mod signals;
mod supervision;
mod systemd;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;
