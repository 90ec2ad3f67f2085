//! How the master tells a pool worker to stop on Linux without holding a
//! descriptor for it: the worker makes its own control pipe after fork,
//! and the master's word is a signal ([`signal`]) whose handler closes
//! that pipe's one write end. Everything that watched the pipe sees its
//! end-of-file as before; the master sends the signal where it used to
//! close its end, and the kernel sends it when the master dies
//! (`PR_SET_PDEATHSIG`) to a worker that outlives it (one with a vault).
//!
//! Why: a descriptor per worker in the master made every fork copy, and
//! every new worker close, one descriptor per sibling. At 4,000 prefork
//! workers a reload forked its 4,000 new ones in 40 s, with the master
//! deaf to signals meanwhile (`close_range` of 8,000 pipes per child);
//! each fork now costs the same whatever the pool's size.
//!
//! The signal is blocked in every child from fork (sys::spawn) until the
//! handler is in place: one sent before stays pending and closes the pipe
//! the moment it is let in, so none is lost.

use std::io;
use std::os::fd::{IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::unistd::Pid;

/// The write end of this process's own control pipe, until the signal
/// closes it; -1 after (or before).
static WRITE_END: AtomicI32 = AtomicI32::new(-1);
/// This process made its own control pipe (the signal has its handler).
static OWN: AtomicBool = AtomicBool::new(false);

/// The signal: the first real-time one applications may use. It cannot
/// be sent by a terminal or systemd's stop by mistake, and nothing else
/// in this daemon uses it.
pub fn signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// The signal alone, as a set.
fn alone() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset only write the set they are given,
    // which is plain data.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, signal());
        set
    }
}

/// In a child right after fork (all signals blocked): keeps the signal
/// blocked once the rest is let in again.
pub fn block() {
    let set = alone();
    // SAFETY: sigprocmask reads the set; the process has one thread.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// In a pool worker: makes its own control pipe, gives the signal the
/// handler that closes the write end, and lets the signal in (one that
/// came meanwhile is delivered now). Returns the read end to watch.
pub fn own_pipe() -> io::Result<OwnedFd> {
    extern "C" fn close_write_end(_: libc::c_int) {
        let fd = WRITE_END.swap(-1, Ordering::SeqCst);
        if fd >= 0 {
            // SAFETY: close(2) is async-signal-safe; the swap makes this
            // the descriptor's one close, and nothing else holds it.
            unsafe { libc::close(fd) };
        }
    }
    let (r, w) = super::pipe(false)?;
    WRITE_END.store(w.into_raw_fd(), Ordering::SeqCst);
    // SAFETY: the action is plain data; the handler only swaps an atomic
    // and closes a descriptor, both async-signal-safe. SA_RESTART: a
    // system call it interrupts goes on (waits see the pipe end anyway).
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = close_write_end as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal(), &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    OWN.store(true, Ordering::SeqCst);
    let set = alone();
    // SAFETY: sigprocmask reads the set; the process has one thread.
    unsafe { libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    Ok(r)
}

/// In a worker that outlives its master (it has a vault): the master's
/// death closes the pipe too. After any change of credentials, which
/// clears the setting. False where this process has no pipe of its own.
pub fn on_master_death() -> bool {
    if !OWN.load(Ordering::SeqCst) {
        return false;
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal() as libc::c_ulong, 0, 0, 0) == 0 }
}

/// In the master: tells the worker `pid` (a child not yet reaped, so the
/// pid is still its) to stop.
pub fn tell(pid: Pid) {
    // SAFETY: kill(2) touches no memory of ours.
    unsafe { libc::kill(pid.as_raw(), signal()) };
}
