//! Test harness: the `Daemon` guard runs the real binary in its own process
//! group and kills the whole group on drop, even when a test fails. Every
//! wait has a deadline; nothing sleeps as synchronisation except the short
//! steps of `wait_until` while it re-checks a condition.
//!
//! The helpers live in one module per thing they help with, all
//! re-exported here, so that a test file's `use super::*` finds them:
//!
//! - [`daemon`]: the `Daemon` guard, for `echo-forkd -f`: its stderr, its
//!   children, its exit;
//! - [`launch`]: the binary run to completion, detached, or under inetd;
//! - [`client`]: clients: connections, echo round trips, the byte streams
//!   they check, conversations and their tallies;
//! - [`procfs`]: processes and their descriptors as /proc shows them:
//!   states, parents, command lines, the process that holds a connection;
//! - [`host`]: the machine the tests share: free ports, scratch
//!   directories, other programs, the heavy lock, network namespaces, and
//!   the cases skipped.

#![allow(dead_code)]

use std::time::{Duration, Instant};

pub mod client;
pub mod daemon;
pub mod host;
pub mod launch;
pub mod procfs;

pub use client::*;
pub use daemon::*;
pub use host::*;
pub use launch::*;
pub use procfs::*;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_echo-forkd");
/// The longest any single wait in these tests may take.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
