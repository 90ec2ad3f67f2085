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
/// pipe tells each child what to do. SIGUSR2: the master's upgrade, whose
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

/// The installed handlers and the self-pipe.
pub struct Signals {
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
        for (&sig, flag) in HANDLED.iter().zip(FLAGS.iter()) {
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
        // handlers. (At a first start the mask is empty already.)
        nix::sys::signal::sigprocmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&nix::sys::signal::SigSet::empty()),
            None,
        )?;
        Ok(Signals {
            reader,
            writer: ManuallyDrop::new(writer),
        })
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.reader.as_fd()
    }

    /// Empties the self-pipe, then takes (and clears) every flag.
    pub fn drain(&mut self) -> Pending {
        // A short read means the pipe is empty: no second read for EAGAIN.
        let mut sink = [0u8; 64];
        while matches!(self.reader.read(&mut sink), Ok(n) if n == sink.len()) {}
        let take = |s: Signal| {
            let i = HANDLED.iter().position(|h| *h == s).unwrap_or(0);
            FLAGS[i].swap(false, Ordering::SeqCst)
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
            chld: take(Signal::SIGCHLD),
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
