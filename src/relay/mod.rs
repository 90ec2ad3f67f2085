//! The relay: open connections passed from a process that retires to one
//! that serves on, so that a reload, an upgrade or a smaller pool cuts no
//! conversation (HAProxy and nginx pass listeners only; echo keeps no
//! state between bytes but what is unsent, so a connection can change
//! process whenever nothing it sent is waiting to go back).
//!
//! The master makes one `SOCK_SEQPACKET` socket pair at startup, which
//! every worker inherits (and a new master after USR2 adopts). A worker
//! that retires offers each of its connections, with what it carries
//! ([`Carried`]: when it was accepted, when it last moved, the bytes
//! echoed, its client and its place in `--max-per-ip`), to the
//! [`Outbox`]; any worker still serving takes it from the [`Inbox`], one
//! message a connection, as it would accept a new one. A worker that
//! retires first stops taking, so a connection never goes back to a
//! process on its way out. During a restart under systemd the master
//! drains the inbox into the vault (vault.rs) for the next instance.
//!
//! This module is the one way on and off the relay: every process offers
//! through [`Outbox::offer`] (sent, full or failed), takes through
//! [`Inbox::take`] (with a descriptor free for it, errors counted and
//! logged) and empties it through [`Inbox::drain`] (places given back).
//! A message is [`WIRE`] bytes, fixed, with the connection's descriptor
//! attached (`SCM_RIGHTS`); both ends are non-blocking.

mod wire;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use log::warn;
use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockType};

use crate::logging::{RateLimit, REPORT_EVERY};
use crate::scoreboard::{Cut, Scoreboard};

pub(crate) use wire::send_with_fds;
pub use wire::{Carried, SNDBUF, WIRE};

/// The relay's two ends.
pub struct Relay {
    /// Where retiring processes offer.
    pub tx: Outbox,
    /// Where serving processes take.
    pub rx: Inbox,
}

impl Relay {
    /// Makes the pair (close-on-exec, non-blocking), its buffer as large
    /// as the kernel allows: a message costs about 768 bytes of it, and a
    /// reload of thousands of conversations queues one each (the default
    /// buffer holds 278). Memory is taken only as messages wait.
    pub fn new() -> nix::Result<Relay> {
        let (tx, rx) = crate::sys::socketpair(AddressFamily::Unix, SockType::SeqPacket)?;
        let _ = nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::SndBuf, &SNDBUF);
        Ok(Relay::from_fds(tx, rx))
    }

    /// The pair from its two descriptors (adopted after an upgrade).
    pub fn from_fds(tx: OwnedFd, rx: OwnedFd) -> Relay {
        Relay {
            tx: Outbox(tx),
            rx: Inbox::new(rx),
        }
    }
}

/// What came of an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// It went: the offerer closes its copy.
    Sent,
    /// No room for now (the relay is full, or over the descriptors in
    /// flight this user may have: `ETOOMANYREFS`): both pass as the
    /// receivers take. The offerer keeps it, serves it, and offers again.
    Full(Errno),
    /// It cannot go: the offerer serves it to its end.
    Failed(Errno),
}

/// The sending end.
pub struct Outbox(OwnedFd);

impl Outbox {
    /// Offers `conn` with what it carries; the scoreboard counts what
    /// waits in the relay.
    pub fn offer(&self, conn: BorrowedFd<'_>, carried: &Carried, board: &Scoreboard) -> Offer {
        match wire::send(self.0.as_fd(), conn, carried, board.relayed()) {
            Ok(()) => Offer::Sent,
            Err(e @ (Errno::EAGAIN | Errno::ETOOMANYREFS)) => Offer::Full(e),
            Err(e) => Offer::Failed(e),
        }
    }
}

impl AsFd for Outbox {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// The receiving end, and what its taker knows of it.
pub struct Inbox {
    fd: OwnedFd,
    /// The relay woke this process: read it whatever the count says.
    woke: bool,
    /// Taking failed: logged at most so often.
    errors: RateLimit,
}

impl Inbox {
    fn new(fd: OwnedFd) -> Inbox {
        Inbox {
            fd,
            woke: false,
            errors: RateLimit::new(REPORT_EVERY),
        }
    }

    /// The relay is readable (the caller's own wait said so).
    pub fn woke(&mut self) {
        self.woke = true;
    }

    /// Whether the relay woke this process and nothing was taken since.
    pub fn take_woke(&mut self) -> bool {
        std::mem::take(&mut self.woke)
    }

    /// A connection handed over, if one waits and this process has
    /// `room` for it (a descriptor free: the kernel closes one that does
    /// not fit). A connection so closed is counted as cut and logged.
    /// `room` is asked only when something may wait: it may list
    /// /proc/self/fd, which a fork-mode master must not pay per accept.
    pub fn take(
        &mut self,
        board: &Scoreboard,
        room: impl FnOnce() -> bool,
    ) -> Option<(OwnedFd, Carried)> {
        let relayed = board.relayed();
        // The count is raised before a send: while it is 0 and the relay
        // did not wake us, nothing waits, and accepting costs no system
        // call more. A wake-up is believed whatever the count (a
        // predecessor's scoreboard after an upgrade counted elsewhere).
        if !self.woke && relayed.load(Ordering::Acquire) == 0 {
            return None;
        }
        if !room() {
            return None;
        }
        let got = wire::recv(self.fd.as_fd(), relayed);
        if !matches!(got, Ok(Some(_))) {
            self.woke = false;
        }
        match got {
            Ok(got) => got,
            Err(e) => {
                if let Some(more) = self.errors.hit(Instant::now()) {
                    let why = if e == Errno::EMFILE {
                        let (soft, _) = crate::sys::nofile_limit();
                        format!("no descriptor was free for it (RLIMIT_NOFILE {soft}); closed")
                    } else {
                        format!("{e}")
                    };
                    warn!("cannot take a handed-over connection: {why} ({more} more since the last report)");
                }
                if e == Errno::EMFILE {
                    board.cut(Cut::Descriptors, 1);
                }
                None
            }
        }
    }

    /// Takes one connection and offers it again: the message wakes
    /// another idle worker for it (this one took a new connection
    /// instead). What cannot go again is closed, counted and logged.
    pub fn pass_on(&mut self, out: &Outbox, board: &Scoreboard) {
        let Ok(Some((fd, c))) = wire::recv(self.fd.as_fd(), board.relayed()) else {
            return;
        };
        if let Offer::Full(e) | Offer::Failed(e) = out.offer(fd.as_fd(), &c, board) {
            board.cut(Cut::Unplaced, 1);
            warn!("cannot pass a handed-over connection on to another worker: {e}; closed");
        }
    }

    /// Takes out everything that waits (as far as this process has
    /// descriptors for), each place in `--max-per-ip` given back: for the
    /// vault (whose next master counts its clients again) or to be
    /// closed.
    pub fn drain(&self, board: &Scoreboard) -> Vec<(OwnedFd, Carried)> {
        let mut out = Vec::new();
        while room_for_one() {
            match wire::recv(self.fd.as_fd(), board.relayed()) {
                Ok(Some((fd, mut c))) => {
                    if let Some(place) = c.place.take() {
                        crate::admission::give_back(board, place);
                    }
                    out.push((fd, c));
                }
                Ok(None) | Err(_) => break,
            }
        }
        out
    }
}

impl AsFd for Inbox {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether this process has a descriptor free for one more connection:
/// the kernel closes one that does not fit in a message received.
pub fn room_for_one() -> bool {
    let (soft, _) = crate::sys::nofile_limit();
    crate::sys::open_fds().is_none_or(|open| open + 8 < soft)
}
