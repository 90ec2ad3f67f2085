//! Short-lived children the master asks something of without waiting for
//! them (the new executable's `-t` on USR2, `systemctl` on TERM): each
//! writes to a pipe the master reads once the child has been reaped.

use std::os::fd::OwnedFd;

use nix::unistd::Pid;

use super::Master;
use crate::{signals, sys};

/// A helper child, running.
pub(super) struct Helper {
    pub(super) pid: Pid,
    /// The read end of what it writes; it holds the only write end.
    output: OwnedFd,
}

impl Helper {
    /// What it wrote (at most `max` bytes), once it has exited.
    pub(super) fn said(&self, max: usize) -> String {
        let mut buf = vec![0u8; max];
        let n = nix::unistd::read(&self.output, &mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Master {
    /// Forks a helper that drops what the master holds, then runs `body`
    /// with the write end of its pipe and exits with what `body` returns.
    pub(super) fn spawn_helper(
        &mut self,
        body: impl FnOnce(&OwnedFd) -> i32,
    ) -> Result<Helper, String> {
        let (out_r, out_w) = sys::pipe(true).map_err(|e| format!("cannot create a pipe: {e}"))?;
        let mut out_w = Some(out_w);
        // SAFETY: the master is single-threaded: it never starts a thread.
        #[allow(unsafe_code)]
        let forked = unsafe {
            sys::spawn(&signals::HANDLED, &signals::CHILD_IGNORED, || {
                let w = out_w.take();
                self.close_in_child();
                w.map_or(1, |w| body(&w))
            })
        };
        drop(out_w);
        let pid = forked.map_err(|e| format!("cannot fork: {e}"))?;
        Ok(Helper { pid, output: out_r })
    }
}
