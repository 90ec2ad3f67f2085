//! A fork-mode child's wait for a chatty client: in `read` itself, as a
//! minimal fork server's is, instead of `poll` then `read` (one system
//! call and one sleep fewer per round trip).
//!
//! A `poll` also watched two things a blocking read cannot: the idle limit
//! and the control pipe (the master stopping, restarting or gone). Armed,
//! the kernel keeps both. The idle limit is the socket's receive timeout
//! (`SO_RCVTIMEO`): a read that waited that long returns EAGAIN. The
//! master's news comes as SIGTERM: the master sends it to each of its
//! fork-mode children after it closes the control pipe, and the kernel
//! sends it when the master dies (`PR_SET_PDEATHSIG`). Its handler, in a
//! child, makes the named socket non-blocking (`sys::wake_blocked_reader`):
//! a read waiting returns EINTR (a read with a receive timeout is never
//! restarted) and one about to start returns at once, so no news is lost
//! between a look at the pipe and the read. Woken, the child disarms and
//! goes back to `poll`, where the pipe says what happened.
//!
//! Disarming puts O_NONBLOCK back before anything else may happen to the
//! connection: a hand-over gives it to processes that never block.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::sys;

/// A connection waited on in blocking reads; dropped, it is non-blocking
/// again and no signal touches it.
pub(super) struct Armed<'a> {
    conn: BorrowedFd<'a>,
}

impl<'a> Armed<'a> {
    /// Arms `conn` for blocking reads that end after `idle` without
    /// bytes, if the master's control pipe `watch` has said nothing yet.
    /// `None` where that cannot be arranged (not Linux, a call failed) or
    /// the news already came: the caller polls, as before.
    pub(super) fn arm(
        conn: BorrowedFd<'a>,
        watch: BorrowedFd<'_>,
        idle: Option<Duration>,
    ) -> Option<Armed<'a>> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
            use nix::sys::time::TimeVal;
            use std::os::fd::AsRawFd;
            // Named first: from here a SIGTERM makes it non-blocking, and
            // `Armed`'s drop undoes all of it.
            sys::name_blocked_reader(Some(conn.as_raw_fd()));
            let armed = Armed { conn };
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).ok()?;
            if let Some(d) = idle {
                let us = i64::from(d.subsec_micros());
                let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
                // A zero timeout would mean none: at least a microsecond.
                let t = TimeVal::new(secs, us.max(i64::from(secs == 0)));
                setsockopt(&conn, ReceiveTimeout, &t).ok()?;
            }
            sys::set_blocking_socket(&conn).ok()?;
            // News that came before the socket was named found nothing to
            // wake; the master closes the pipe before it signals, so the
            // pipe has it.
            let mut fds = [PollFd::new(watch, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) => Some(armed),
                _ => None,
            }
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        {
            let _ = (conn, watch, idle);
            None
        }
    }

    /// After a read returned EAGAIN or EINTR: whether a signal brought
    /// news (it made the socket non-blocking). Otherwise EAGAIN is the
    /// idle limit, and EINTR a signal of no concern.
    pub(super) fn woken(&self) -> bool {
        sys::is_nonblocking(&self.conn)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        sys::name_blocked_reader(None);
        let _ = sys::set_nonblocking(&self.conn);
    }
}
