//! Nearly every `unsafe` in echo-forkd: the fork fence, accept4, `_exit`,
//! the scoreboard's shared mapping and the local time for syslog, in this
//! module and its files. Everything else calls these safe wrappers; the
//! few `unsafe` blocks elsewhere (each `fork`'s caller, taking an
//! inherited or received descriptor) say why they hold.
//!
//! By concern: process.rs forks (the fence every child passes), ends a
//! child, installs signal handlers and sets the groups; fd.rs accepts,
//! makes sockets and pipes, closes and adopts descriptors and reads
//! RLIMIT_NOFILE; memory.rs maps the shared words and the I/O buffers.
//! Here: the local time. Callers name everything as `crate::sys::…`.

use std::time::SystemTime;

mod fd;
mod memory;
mod process;
#[cfg(any(target_os = "linux", target_os = "android"))]
pub mod told;

pub use fd::{
    accept, accept_numbered, accept_queue, close_all_but, close_inherited, close_range,
    inherited_fd, is_nonblocking, name_blocked_reader, no_signal, nofile_limit, open_fds, pipe,
    set_nofile, set_nonblocking, socket, socketpair, try_lock, wake_blocked_reader,
};
// Only Linux arms a blocking read (echo/block.rs).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub use fd::set_blocking_socket;
pub use memory::{IoBuffer, SharedWords};
pub use process::{
    exit_now, fork_plain, interrupt_on_signal, set_groups, spawn, spawn_keeping_handlers,
    step_aside, wake_on_signal,
};

/// Local wall-clock time as (month 0–11, day, hour, minute, second), for
/// syslog's RFC 3164 timestamp.
pub fn local_time(t: SystemTime) -> (usize, u32, u32, u32, u32) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: `tm` is plain data; localtime_r writes only into it and is
    // thread-safe; on failure we keep the zeroed value.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        tm
    };
    (
        tm.tm_mon.clamp(0, 11) as usize,
        tm.tm_mday.max(1) as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    )
}
