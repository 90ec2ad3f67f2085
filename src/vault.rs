//! The vault: where open connections wait for the next master when this
//! one ends under systemd (`systemctl restart`, a package upgrade, or a
//! crash that `Restart=on-failure` restarts), in a few descriptors that
//! the service manager keeps, however many connections there are.
//!
//! It is a `SOCK_SEQPACKET` socket pair made at start and put, both ends
//! in one message, in systemd's file descriptor store (name [`NAME`]):
//! systemd holding both ends, neither ever sees the other close, and
//! what is queued in it outlives every process of ours. Every child that
//! serves connections inherits it. A child that must let go of its
//! connections with no worker of its own master left to take them (the
//! master restarts, or died) sends each into it with what it carries
//! ([`Carried`], as the relay does); the next master, given both ends
//! back by `LISTEN_FDS`, reads them out and hands them to its workers.
//!
//! What bounds a queue of unix sockets is the sender's buffer, not the
//! number of descriptors: a message costs the sender about 768 bytes of
//! it however small (about 278 messages at Linux's default
//! `net.core.wmem_default`). So connections travel in bulk: up to
//! [`PER_MESSAGE`] in one message, and a process with more than one puts
//! them in a *bag*, a socket pair of its own filled to its buffer (about
//! 6,500 connections at the default `wmem_max`, more with more), whose
//! receiving end goes into the vault as one record. A sender that finds
//! the vault full (a thousand prefork workers whose master died, each
//! with one connection) packs what waits there into a bag of its own and
//! puts that back with its own: each such step turns many messages into
//! one, so the vault never refuses a connection for want of room. Bags
//! hold connections only, never bags, so a reader goes at most one level
//! down.
//!
//! A message is `n` records of [`RECORD`] bytes and `n` descriptors, the
//! i-th record describing the i-th descriptor: a connection's record is
//! the relay's ([`Carried::encode`]); a bag's is [`BAG`], zeros, and at
//! bytes 8 to 16 how many connections it holds.

use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, AddressFamily, ControlMessageOwned, MsgFlags, SockType};

use crate::relay::{Carried, WIRE};

/// The vault's name in the service manager's store.
pub const NAME: &str = "vault";
/// The size of a record.
pub const RECORD: usize = WIRE;
/// Descriptors sent in one message, under Linux's `SCM_MAX_FD` (253).
pub const PER_MESSAGE: usize = 250;
/// A bag's record: "bag1", then zeros.
const BAG: u32 = 0x6261_6731;
/// The send buffer asked for each end of the vault and of each bag (the
/// relay's): memory is taken only as messages wait.
use crate::relay::SNDBUF;
/// Messages taken out of the vault at most in one packing step.
const PACK_AT_MOST: usize = 64;
/// A bag this full is put back as it is when the vault is packed; a
/// smaller one is emptied into the packer's.
const LARGE_BAG: usize = 4 * PER_MESSAGE;

/// One descriptor in transit and its record.
struct Item {
    fd: OwnedFd,
    record: [u8; RECORD],
    /// The connections it stands for (a bag's count), for the log.
    conns: usize,
}

impl Item {
    fn is_bag(&self) -> bool {
        self.record[0..4] == BAG.to_le_bytes()
    }

    fn bag(fd: OwnedFd, conns: usize) -> Item {
        let mut record = [0u8; RECORD];
        record[0..4].copy_from_slice(&BAG.to_le_bytes());
        record[8..16].copy_from_slice(&(conns as u64).to_le_bytes());
        Item { fd, record, conns }
    }

    /// An item as it arrived: a bag says how many it holds.
    fn arrived(fd: OwnedFd, r: &[u8]) -> Item {
        let mut record = [0u8; RECORD];
        record.copy_from_slice(r);
        let mut item = Item {
            fd,
            record,
            conns: 1,
        };
        if item.is_bag() {
            let mut n = [0u8; 8];
            n.copy_from_slice(&r[8..16]);
            item.conns = usize::try_from(u64::from_le_bytes(n)).unwrap_or(usize::MAX);
        }
        item
    }
}

/// Connections that could not be put in the vault: they are closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lost {
    pub conns: usize,
    pub why: Errno,
}

/// The vault's two ends (see the module's doc).
pub struct Vault {
    /// Where connections are sent.
    tx: OwnedFd,
    /// Where a sender that finds it full takes what waits, to pack it.
    rx: OwnedFd,
}

impl Vault {
    /// Its two descriptors, for a child that closes all else.
    pub fn raw_fds(&self) -> [RawFd; 2] {
        [self.tx.as_raw_fd(), self.rx.as_raw_fd()]
    }

    /// Makes a new, empty vault (close-on-exec, non-blocking).
    pub fn new() -> nix::Result<Vault> {
        let (tx, rx) = pair()?;
        Ok(Vault { tx, rx })
    }

    /// The vault the service manager gave back (or a master passed on
    /// across USR2). Its ends are alike: each reads what the other sent.
    pub fn adopt(a: OwnedFd, b: OwnedFd) -> Vault {
        for fd in [&a, &b] {
            let _ = crate::sys::set_nonblocking(fd);
        }
        Vault { tx: a, rx: b }
    }

    /// Whether a message waits at either end (it looks, reads nothing).
    pub fn holds_any(&self) -> bool {
        use nix::poll::{PollFd, PollFlags, PollTimeout};
        let mut fds = [
            PollFd::new(self.tx.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.rx.as_fd(), PollFlags::POLLIN),
        ];
        nix::poll::poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| {
            n > 0
                && fds
                    .iter()
                    .any(|f| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        })
    }

    /// Both ends, to store or pass on.
    pub fn ends(&self) -> [BorrowedFd<'_>; 2] {
        [self.tx.as_fd(), self.rx.as_fd()]
    }

    /// Puts `conns` in the vault, each with what it carries, trying until
    /// `until` while it is full (another process is packing it). Every
    /// one is in once this returns `Ok`; `Err` counts those closed.
    pub fn put(&self, conns: Vec<(OwnedFd, Carried)>, until: Instant) -> Result<(), Lost> {
        self.send_all(conn_items(conns)?, until)
    }

    /// Puts back what a master took out and did not hand on (it restarts,
    /// or re-executes itself): connections, and bags it began to read.
    pub fn put_back(&self, u: &mut Unpacked, until: Instant) -> Result<(), Lost> {
        let bags: Vec<(OwnedFd, usize)> = u.bags.drain(..).collect();
        let mut items = conn_items(u.ready.drain(..).collect())?;
        u.empty = false;
        items.extend(bags.into_iter().map(|(fd, left)| Item::bag(fd, left)));
        self.send_all(items, until)
    }

    /// Sends `items` into the vault, packing what waits there when it is
    /// full, until `until`.
    fn send_all(&self, mut items: Vec<Item>, until: Instant) -> Result<(), Lost> {
        let mut per = PER_MESSAGE;
        while !items.is_empty() {
            let n = items.len().min(per);
            match send(self.tx.as_fd(), &items[..n]) {
                Ok(()) => {
                    items.drain(..n);
                }
                // A buffer smaller than the message: fewer at a time.
                Err(Errno::EMSGSIZE) if n > 1 => per = n / 2,
                Err(Errno::EAGAIN) => {
                    let now = Instant::now();
                    if now >= until {
                        return Err(lost(&items, Errno::EAGAIN));
                    }
                    // Full: what waits there, packed, goes back with ours.
                    match self.pack_waiting() {
                        Ok(packed) if !packed.is_empty() => {
                            items.splice(0..0, packed);
                        }
                        Ok(_) => {
                            // Someone else emptied it for packing: room soon.
                            let left = until.saturating_duration_since(now);
                            wait_writable(self.tx.as_fd(), left.min(Duration::from_millis(50)));
                        }
                        Err(l) => return Err(merge(l, lost(&items, l.why))),
                    }
                }
                Err(e) => return Err(lost(&items, e)),
            }
        }
        Ok(())
    }

    /// Takes up to [`PACK_AT_MOST`] messages out of the vault and packs
    /// their connections, and those of the small bags among them, into
    /// bags of its own: what goes back is a few large bags, in far fewer
    /// messages. Only as many as this process has descriptors for.
    fn pack_waiting(&self) -> Result<Vec<Item>, Lost> {
        let mut packer = Packer::default();
        let mut kept = Vec::new();
        for _ in 0..PACK_AT_MOST {
            if !room_for(2 * PER_MESSAGE + 16) {
                break;
            }
            let items = match recv(self.rx.as_fd()) {
                Ok(Some(items)) => items,
                Ok(None) => break,
                Err(e) => return Err(packer.abandon(e)),
            };
            for item in items {
                if !item.is_bag() {
                    packer.add(item)?;
                } else if item.conns >= LARGE_BAG {
                    kept.push(item);
                } else {
                    // Its sending end is closed: read it to its end.
                    while let Ok(Some(inner)) = recv(item.fd.as_fd()) {
                        for i in inner {
                            packer.add(i)?;
                        }
                    }
                }
            }
        }
        kept.extend(packer.finish()?);
        Ok(kept)
    }
}

/// Fills bags with connections as they come, a message at a time, and a
/// new bag when one is full.
#[derive(Default)]
struct Packer {
    /// The bag being filled: its sending end, and how many it holds.
    bag: Option<(OwnedFd, OwnedFd, usize)>,
    /// Waiting for a message's worth.
    pending: Vec<Item>,
    /// Bags filled, ready to go.
    done: Vec<Item>,
}

impl Packer {
    fn add(&mut self, item: Item) -> Result<(), Lost> {
        self.pending.push(item);
        if self.pending.len() >= PER_MESSAGE {
            self.flush()?;
        }
        Ok(())
    }

    /// Sends what is pending into the bag being filled, or a new one.
    fn flush(&mut self) -> Result<(), Lost> {
        let mut per = PER_MESSAGE;
        while !self.pending.is_empty() {
            if self.bag.is_none() {
                let (tx, rx) = pair().map_err(|e| self.abandon(e))?;
                self.bag = Some((tx, rx, 0));
            }
            let Some((tx, _, held)) = &mut self.bag else {
                continue;
            };
            let n = self.pending.len().min(per);
            match send(tx.as_fd(), &self.pending[..n]) {
                Ok(()) => {
                    *held += n;
                    self.pending.drain(..n);
                }
                Err(Errno::EMSGSIZE) if n > 1 => per = n / 2,
                // Full: the next bag takes the rest.
                Err(Errno::EAGAIN) if *held > 0 => self.close_bag(),
                Err(e) => return Err(self.abandon(e)),
            }
        }
        Ok(())
    }

    /// Closes the bag being filled (its sending end: a reader finds the
    /// end of it) and sets it aside.
    fn close_bag(&mut self) {
        if let Some((tx, rx, held)) = self.bag.take() {
            drop(tx);
            self.done.push(Item::bag(rx, held));
        }
    }

    /// The bags, every connection added in one.
    fn finish(mut self) -> Result<Vec<Item>, Lost> {
        self.flush()?;
        self.close_bag();
        Ok(self.done)
    }

    /// Gives up: everything it holds is closed.
    fn abandon(&mut self, why: Errno) -> Lost {
        let held = self.bag.take().map_or(0, |(_, _, n)| n);
        let l = merge(lost(&self.done, why), lost(&self.pending, why));
        self.done.clear();
        self.pending.clear();
        Lost {
            conns: l.conns + held,
            why,
        }
    }
}

/// What a master reads out of the vault, a connection at a time.
#[derive(Default)]
pub struct Unpacked {
    /// Taken out, not yet handed on.
    ready: VecDeque<(OwnedFd, Carried)>,
    /// Bags taken out, still to read (the last first), with how many
    /// connections each still holds.
    bags: Vec<(OwnedFd, usize)>,
    /// Records that were not ours, closed.
    pub foreign: usize,
    /// Nothing is left in the vault since the last look.
    empty: bool,
    /// Descriptors this process had free when last counted, less those
    /// taken since: counting means listing /proc/self/fd, and a process
    /// that holds what it takes out (a carrier) would list a thousand
    /// entries for each of a thousand messages.
    free: Option<u64>,
}

impl Unpacked {
    /// The next connection the vault holds. `Err(EMFILE)`: this process
    /// has no room for the descriptors of another message (it reads on
    /// once it has).
    pub fn next(&mut self, vault: &Vault) -> nix::Result<Option<(OwnedFd, Carried)>> {
        loop {
            if let Some(c) = self.ready.pop_front() {
                return Ok(Some(c));
            }
            if !self.room_for(PER_MESSAGE + 16) {
                return Err(Errno::EMFILE);
            }
            let got = match self.bags.last_mut() {
                Some((bag, left)) => match recv(bag.as_fd()) {
                    Ok(None) | Err(_) => {
                        self.bags.pop();
                        continue;
                    }
                    Ok(Some(items)) => {
                        *left = left.saturating_sub(items.len());
                        items
                    }
                },
                None => match recv_either(vault)? {
                    Some(items) => items,
                    None => {
                        self.empty = true;
                        return Ok(None);
                    }
                },
            };
            if let Some(free) = &mut self.free {
                *free = free.saturating_sub(got.len() as u64);
            }
            for item in got {
                if item.is_bag() {
                    self.bags.push((item.fd, item.conns));
                } else if let Some(c) = Carried::decode(&item.record) {
                    let _ = crate::sys::set_nonblocking(&item.fd);
                    self.ready.push_back((item.fd, c));
                } else {
                    self.foreign += 1;
                }
            }
        }
    }

    /// Whether `n` more descriptors fit: counted again only when what is
    /// known says they might not (descriptors closed since only add room).
    fn room_for(&mut self, n: usize) -> bool {
        let n = n as u64;
        if self.free.is_some_and(|free| free > n) {
            return true;
        }
        let (soft, _) = crate::sys::nofile_limit();
        let free = crate::sys::open_fds().map_or(u64::MAX, |open| soft.saturating_sub(open));
        self.free = Some(free);
        free > n
    }

    /// Counts the free descriptors again at the next look: this process
    /// may have opened some since (a master forks between looks).
    pub fn count_room_again(&mut self) {
        self.free = None;
    }

    /// Hands back a connection [`Unpacked::next`] gave (no room for it
    /// yet): it comes first next time.
    pub fn unget(&mut self, conn: (OwnedFd, Carried)) {
        self.ready.push_front(conn);
        self.empty = false;
    }

    /// Whether the vault was found empty and nothing taken out waits.
    pub fn is_done(&self) -> bool {
        self.empty && self.ready.is_empty() && self.bags.is_empty()
    }

    /// Whether a look in the vault may find more.
    pub fn may_have_more(&self) -> bool {
        !self.is_done()
    }

    /// The vault changed (a restart filled it): look again.
    pub fn look_again(&mut self) {
        self.empty = false;
    }

    /// The descriptors it holds, for a child to close right after fork
    /// (they belong to whichever process the master hands each to).
    pub fn raw_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        let ready = self.ready.iter().map(|(fd, _)| fd.as_raw_fd());
        ready.chain(self.bags.iter().map(|(fd, _)| fd.as_raw_fd()))
    }

    /// How many connections it knows of that wait to be handed on: taken
    /// out, and in the bags taken out (more may wait in the vault).
    pub fn waiting(&self) -> usize {
        self.ready.len() + self.bags.iter().map(|(_, left)| left).sum::<usize>()
    }
}

/// A new socket pair for a vault or a bag, its buffers as large as the
/// kernel allows.
fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = crate::sys::socketpair(AddressFamily::Unix, SockType::SeqPacket)?;
    for fd in [&a, &b] {
        let _ = nix::sys::socket::setsockopt(fd, nix::sys::socket::sockopt::SndBuf, &SNDBUF);
    }
    Ok((a, b))
}

/// The items that carry `conns`: one as it is, more packed in bags.
fn conn_items(conns: Vec<(OwnedFd, Carried)>) -> Result<Vec<Item>, Lost> {
    let items: Vec<Item> = conns
        .into_iter()
        .map(|(fd, c)| Item {
            fd,
            record: c.encode(),
            conns: 1,
        })
        .collect();
    if items.len() > 1 {
        pack(items)
    } else {
        Ok(items)
    }
}

/// Puts connection items into as many bags as they need; returns the
/// bags' items.
fn pack(conns: Vec<Item>) -> Result<Vec<Item>, Lost> {
    let mut packer = Packer::default();
    for c in conns {
        packer.add(c)?;
    }
    packer.finish()
}

fn lost(items: &[Item], why: Errno) -> Lost {
    Lost {
        conns: items.iter().map(|i| i.conns).sum(),
        why,
    }
}

fn merge(a: Lost, b: Lost) -> Lost {
    Lost {
        conns: a.conns + b.conns,
        why: a.why,
    }
}

/// Sends `items` in one message.
fn send(fd: BorrowedFd<'_>, items: &[Item]) -> nix::Result<()> {
    let mut bytes = Vec::with_capacity(items.len() * RECORD);
    let mut fds = Vec::with_capacity(items.len());
    for i in items {
        bytes.extend_from_slice(&i.record);
        fds.push(i.fd.as_raw_fd());
    }
    crate::relay::send_with_fds(fd, &bytes, &fds)
}

/// Takes one message: `None` when nothing waits (or the sending end is
/// closed and nothing is left). A message whose descriptors did not all
/// arrive (the kernel closed those beyond this process's limit: callers
/// look for room first) is `Err(ENOBUFS)`, its connections lost.
fn recv(fd: BorrowedFd<'_>) -> nix::Result<Option<Vec<Item>>> {
    let mut bytes = vec![0u8; PER_MESSAGE * RECORD];
    let mut space = nix::cmsg_space!([RawFd; PER_MESSAGE]);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = MsgFlags::MSG_DONTWAIT;
    let (n, fds, truncated) = loop {
        let mut iov = [IoSliceMut::new(&mut bytes)];
        match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Ok(msg) => {
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            for r in raw {
                                // SAFETY: SCM_RIGHTS gave this process a
                                // new descriptor that nothing else owns.
                                #[allow(unsafe_code)]
                                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
                            }
                        }
                    }
                }
                break (msg.bytes, fds, truncated);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if truncated || n != fds.len() * RECORD {
        // What did arrive is closed here; the rest the kernel closed.
        return Err(Errno::ENOBUFS);
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    for fd in &fds {
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    Ok(Some(
        fds.into_iter()
            .zip(bytes[..n].chunks_exact(RECORD))
            .map(|(fd, r)| Item::arrived(fd, r))
            .collect(),
    ))
}

/// One message from whichever end has one (each reads what the other
/// sent, and a vault passed on may have been filled from either).
fn recv_either(vault: &Vault) -> nix::Result<Option<Vec<Item>>> {
    for end in [vault.rx.as_fd(), vault.tx.as_fd()] {
        if let Some(items) = recv(end)? {
            return Ok(Some(items));
        }
    }
    Ok(None)
}

/// Whether this process can open `n` more descriptors (counted, not
/// guessed: the kernel drops what does not fit in a message).
fn room_for(n: usize) -> bool {
    let (soft, _) = crate::sys::nofile_limit();
    crate::sys::open_fds().is_none_or(|open| open.saturating_add(n as u64) < soft)
}

fn wait_writable(fd: BorrowedFd<'_>, for_at_most: Duration) {
    let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
    let _ = nix::poll::poll(&mut fds, crate::time::poll_timeout(Some(for_at_most)));
}

#[cfg(test)]
mod tests;
