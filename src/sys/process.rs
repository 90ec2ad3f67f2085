//! The process as a whole: forking it through the one fence every child
//! passes (signals blocked, the master's handlers reset, `_exit` at the
//! end), the signal handlers only a system call can install, and the
//! supplementary groups. What acts on one descriptor is in fd.rs, on
//! memory in memory.rs.

use std::io;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};

use nix::sys::signal::{
    sigaction, sigprocmask, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
};
use nix::unistd::{fork, ForkResult, Pid};

/// Exit code of a child whose code panicked.
pub const EXIT_PANIC: i32 = 70;

/// Forks; the child runs `child` and ends with `_exit`, never returning into
/// the caller's code. Returns the child's pid in the parent.
///
/// All signals are blocked across `fork`, so no handler of the master can
/// run in the child before the child has reset `reset` to their default
/// dispositions (a handler would write into the master's self-pipe) and set
/// `ignore` to be ignored. Signals the master ignores (SIGPIPE) stay ignored.
///
/// # Safety
///
/// The calling process must have no other thread: the child gets a copy of
/// the heap and of every lock as they are, and a lock a vanished thread
/// held would stay held in it. (A caller whose `child` touches neither the
/// heap nor a lock, only atomics and system calls, is sound regardless.)
pub unsafe fn spawn(
    reset: &[Signal],
    ignore: &[Signal],
    child: impl FnOnce() -> i32,
) -> io::Result<Pid> {
    let mut old = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    // SAFETY: the caller is single-threaded (this function's contract), so
    // the child's copy of the heap and of every lock is consistent; the
    // child only resets signals, runs `child` and `_exit`s.
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Parent { child }) => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
            Ok(child)
        }
        Ok(ForkResult::Child) => {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            let ignored = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
            // One sigaction per signal (a signal to be ignored is not first
            // reset to its default), and no allocation: the child's heap
            // stays shared with the master.
            for &sig in reset.iter().filter(|s| !ignore.contains(s)) {
                // SAFETY: SIG_DFL runs no code of ours.
                let _ = unsafe { sigaction(sig, &default) };
            }
            for &sig in ignore {
                // SAFETY: SIG_IGN runs no code of ours.
                let _ = unsafe { sigaction(sig, &ignored) };
            }
            // SIGCHLD unblocked: the master keeps it blocked to read it
            // from a descriptor, which a child that forks or execs has not.
            let mut mask = old;
            mask.remove(Signal::SIGCHLD);
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&mask), None);
            // The master's word to a pool worker waits until the worker
            // has its pipe (sys/told.rs).
            #[cfg(any(target_os = "linux", target_os = "android"))]
            super::told::block();
            let code = catch_unwind(AssertUnwindSafe(child)).unwrap_or(EXIT_PANIC);
            exit_now(code)
        }
        Err(e) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            Err(e.into())
        }
    }
}

/// Forks without touching a signal disposition or the mask: the child
/// runs `child` and ends with `_exit`. Returns the child's pid in the
/// parent. For a fork-mode child, whose inherited handlers must each act
/// in it as its own disposition would (see [`wake_on_signal`]'s `owner`):
/// then neither process pays a system call for signals per fork. The
/// mask is the caller's too (the master's SIGCHLD stays blocked: such a
/// child neither forks nor execs).
///
/// # Safety
///
/// As [`spawn`]: the calling process must have no other thread. And every
/// handler installed in it must be one of [`wake_on_signal`]'s (or
/// signal-hook's flags beside them), or the child runs the caller's.
pub unsafe fn spawn_keeping_handlers(child: impl FnOnce() -> i32) -> io::Result<Pid> {
    // SAFETY: the caller is single-threaded (this function's contract);
    // the child runs `child` and `_exit`s.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            let code = catch_unwind(AssertUnwindSafe(child)).unwrap_or(EXIT_PANIC);
            exit_now(code)
        }
    }
}

/// Makes `signal` write a byte to `fd`, a non-blocking socket that stays
/// open as long as the handler is installed, each time it arrives: the
/// wake-up half of the self-pipe (the flag is signal-hook's). In any
/// process but `owner` (a child forked without resetting its handlers) it
/// acts as the child's disposition instead: if `ignored_in_child`, nothing
/// but waking a blocking read the child named (it then looks at its
/// control pipe: see echo/block.rs), else the default action (reset, then
/// raised again: it is delivered as the handler returns).
pub fn wake_on_signal(
    signal: libc::c_int,
    fd: RawFd,
    owner: libc::pid_t,
    ignored_in_child: bool,
) -> io::Result<()> {
    let action = move || {
        // SAFETY: getpid(2) is async-signal-safe (and not cached: right in
        // a child from its first instruction).
        if unsafe { libc::getpid() } != owner {
            if ignored_in_child {
                super::wake_blocked_reader();
            } else {
                // SAFETY: signal(2) and raise(3) are async-signal-safe;
                // SIG_DFL runs no code of ours. The signal is blocked while
                // its handler runs, so the raised one waits until it returns.
                unsafe {
                    libc::signal(signal, libc::SIG_DFL);
                    libc::raise(signal);
                }
            }
            return;
        }
        // SAFETY: send(2) is async-signal-safe; MSG_DONTWAIT never blocks
        // (a full pipe already holds a wake-up); `fd` outlives the handler
        // (the caller's promise); signal-hook saves and restores errno.
        let _ = unsafe { libc::send(fd, b"X".as_ptr().cast(), 1, libc::MSG_DONTWAIT) };
    };
    // SAFETY: the action is async-signal-safe (above): no allocation, no
    // lock, one system call.
    unsafe { signal_hook::low_level::register(signal, action) }.map(drop)
}

/// Gives `signal` a handler that does nothing, so that it interrupts a
/// wait (`pselect` returns EINTR) instead of being ignored or killing.
/// A plain `sigaction`, not signal-hook's registry, whose allocation in a
/// forked worker would copy heap pages it otherwise shares with the master.
pub fn interrupt_on_signal(signal: Signal) -> io::Result<()> {
    extern "C" fn nothing(_: libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(nothing),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { sigaction(signal, &action) }?;
    Ok(())
}

/// Lowers this process's CPU priority by 10 (once, however often it is
/// called): a worker on its way out (it hands over its connections and
/// exits) lets the processes that serve, and the clients on the same
/// machine, run first. Thousands retiring at once after a reload were as
/// many runnable processes, and a client got a thousandth of a CPU.
pub fn step_aside() {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !DONE.swap(true, std::sync::atomic::Ordering::Relaxed) {
        // SAFETY: nice(2) changes this process's priority and touches no
        // memory; raising the value needs no privilege.
        let _ = unsafe { libc::nice(10) };
    }
}

/// A plain fork for detaching, before any signal handler is installed.
/// Returns true in the parent.
///
/// # Safety
///
/// The calling process must have no other thread (see [`spawn`]): here
/// the child goes on with the caller's code, heap and locks.
pub unsafe fn fork_plain() -> io::Result<bool> {
    // SAFETY: the caller is single-threaded (this function's contract); the
    // child goes on with the same code path and the parent only waits and
    // `_exit`s.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => Ok(true),
        ForkResult::Child => Ok(false),
    }
}

/// Ends a child at once: no atexit handlers, no flushing of a copy of the
/// master's buffers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// Replaces the supplementary groups with `gid` alone (nix has no
/// `setgroups` for Apple's systems, whose libc does).
pub fn set_groups(gid: nix::unistd::Gid) -> nix::Result<()> {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::unistd::setgroups(&[gid])
    }
    #[cfg(target_vendor = "apple")]
    {
        let list = [gid.as_raw()];
        // SAFETY: the pointer and length describe `list`, which outlives
        // the call; setgroups only reads it.
        let rc = unsafe { libc::setgroups(1, list.as_ptr()) };
        nix::errno::Errno::result(rc).map(drop)
    }
}
