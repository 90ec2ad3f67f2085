//! The master's signals: the only user of signal-hook.
//!
//! Each handled signal sets its flag and then writes a byte into a self-pipe
//! (flag first, so a wake-up always finds its flag). The master polls the
//! pipe's read end beside everything else, and on wake-up drains the pipe
//! before it reads the flags. Handlers do nothing else.

use std::io::{self, Read};
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::Signal;

/// Every signal the master catches; a child resets them to the default.
pub const HANDLED: [Signal; 9] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGCHLD,
];

/// Signals a child ignores. SIGINT: a terminal's Ctrl-C goes to the whole
/// process group, and stopping is the master's decision (a graceful stop
/// lets busy children finish). SIGTERM likewise: under systemd
/// (`KillMode=control-group`, which lets children outlive a crashed
/// master long enough to keep their connections for the next one) a stop
/// sends it to every process of the unit at once; the master's control
/// pipe tells each child what to do (the master's own SIGTERM to a
/// fork-mode child waiting in a blocking read wakes it to look there:
/// echo/block.rs). SIGUSR2: the master's upgrade, whose
/// default action would kill a child that received it by mistake (a
/// `kill` sent to the whole group).
pub const CHILD_IGNORED: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR2];

static FLAGS: [AtomicBool; HANDLED.len()] = [const { AtomicBool::new(false) }; HANDLED.len()];

/// What arrived since the last [`Signals::drain`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    pub term: bool,
    pub int: bool,
    pub quit: bool,
    pub hup: bool,
    pub usr1: bool,
    pub usr2: bool,
    pub ttin: bool,
    pub ttou: bool,
    pub chld: bool,
}

/// Where SIGCHLD is read on Linux, instead of a handler: it stays
/// blocked in the master, so a child's exit costs no delivery (no
/// handler, no frame written on the master's stack, no byte in the
/// self-pipe, no `rt_sigreturn`), and exits while the master is busy
/// come as one.
#[cfg(any(target_os = "linux", target_os = "android"))]
type ChildExits = nix::sys::signalfd::SignalFd;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
type ChildExits = std::convert::Infallible;

/// The installed handlers and the self-pipe.
pub struct Signals {
    /// SIGCHLD's descriptor (Linux); `None`: it has a handler like the rest.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    exits: Option<ChildExits>,
    reader: UnixStream,
    /// The write end every handler writes to. The handlers outlive this
    /// struct, so it is never closed in the master (its number must not
    /// be reused while a handler may write to it); a child closes it.
    writer: ManuallyDrop<UnixStream>,
}

impl Signals {
    /// Installs the handlers. Call once, before the first fork.
    pub fn install() -> io::Result<Signals> {
        let (reader, writer) = UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        let master = std::process::id() as libc::pid_t;
        let exits = child_exits()?;
        for (&sig, flag) in HANDLED.iter().zip(FLAGS.iter()) {
            if sig == Signal::SIGCHLD && exits.is_some() {
                continue;
            }
            let ignored = CHILD_IGNORED.contains(&sig);
            let sig = sig as libc::c_int;
            signal_hook::flag::register(sig, flag)?;
            // One write end for all, not a clone per signal: fewer fds in
            // every process, and fewer for each child to close. In a child
            // forked without a reset (a fork-mode child) the handler acts
            // as the child's disposition: ignored or the default.
            crate::sys::wake_on_signal(sig, writer.as_raw_fd(), master, ignored)?;
        }
        // A master that re-executed itself (USR2) blocked every signal
        // across the exec: what came meanwhile is delivered now, to the
        // handlers (SIGCHLD, read from its descriptor, stays blocked).
        // (At a first start the mask is empty already.)
        let mut mask = nix::sys::signal::SigSet::empty();
        if exits.is_some() {
            mask.add(Signal::SIGCHLD);
        }
        nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&mask),
            None,
        )?;
        Ok(Signals {
            exits,
            reader,
            writer: ManuallyDrop::new(writer),
        })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }

    /// Where children's exits are read, to poll beside [`Signals::fd`]
    /// (Linux); `None`: SIGCHLD wakes the self-pipe like the rest.
    pub fn exits_fd(&self) -> Option<BorrowedFd<'_>> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        return self.exits.as_ref().map(|e| e.as_fd());
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        None
    }

    /// Empties the self-pipe (if the wait said it is readable: `piped`),
    /// then takes (and clears) every flag; SIGCHLD's descriptor is read
    /// if the wait said it is readable (`exited`).
    pub fn drain(&mut self, piped: bool, exited: bool) -> Pending {
        // A short read means the pipe is empty: no second read for EAGAIN.
        // Unread, a byte that came after the wait wakes the next one (its
        // flag is read below already).
        let mut sink = [0u8; 64];
        while piped && matches!(self.reader.read(&mut sink), Ok(n) if n == sink.len()) {}
        // One read clears it: SIGCHLD is not queued, however many exited.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let exited = exited
            && matches!(
                self.exits.as_ref().map(|e| e.read_signal()),
                Some(Ok(Some(_)))
            );
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let exited = {
            let _ = exited;
            false
        };
        let take = |s: Signal| {
            let i = HANDLED.iter().position(|h| *h == s).unwrap_or(0);
            // Looked at before it is cleared: a store, even of the same
            // value, makes the page private again after every fork (a
            // fork-mode master would pay a copy per connection).
            FLAGS[i].load(Ordering::SeqCst) && FLAGS[i].swap(false, Ordering::SeqCst)
        };
        Pending {
            term: take(Signal::SIGTERM),
            int: take(Signal::SIGINT),
            quit: take(Signal::SIGQUIT),
            hup: take(Signal::SIGHUP),
            usr1: take(Signal::SIGUSR1),
            usr2: take(Signal::SIGUSR2),
            ttin: take(Signal::SIGTTIN),
            ttou: take(Signal::SIGTTOU),
            chld: take(Signal::SIGCHLD) || exited,
        }
    }

    /// In a forked child: closes both ends of the self-pipe. The fork fence
    /// already reset the handlers to their defaults, so signal-hook's
    /// registry is dead here; it is left as it is rather than unregistered,
    /// because unregistering rebuilds the registry and those heap writes
    /// would copy pages the worker otherwise shares with the master (20 KiB
    /// of private memory per worker, measured).
    pub fn close_in_child(self) {
        drop(ManuallyDrop::into_inner(self.writer));
    }
}

/// SIGCHLD blocked and a descriptor to read it from (Linux).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn child_exits() -> io::Result<Option<ChildExits>> {
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(Signal::SIGCHLD);
    // Blocked before the descriptor exists would lose nothing either: a
    // blocked SIGCHLD stays pending (never discarded as ignored).
    nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
    Ok(Some(fd))
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn child_exits() -> io::Result<Option<ChildExits>> {
    Ok(None)
}
