//! The relay's wire: what a connection carries ([`Carried`]) as one
//! fixed-size message, and the two system calls that move it with its
//! descriptor. Only the relay's own module calls them.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::echo::Progress;
use crate::scoreboard::Place;
use crate::time;

/// The size of a message.
pub const WIRE: usize = 64;
/// The send buffer asked for (the kernel caps it at twice
/// `net.core.wmem_max`).
pub const SNDBUF: usize = 64 << 20;
const MAGIC: u32 = 0x6563_6f31; // "eco1"

/// What a connection carries to its next process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    /// A TCP connection (not a unix socket's).
    pub tcp: bool,
    /// Its client, as it was identified (the PROXY header's, if any).
    pub client: Option<SocketAddr>,
    /// Its place in `--max-per-ip`, which the receiver takes over.
    pub place: Option<Place>,
    /// Where it is (start, last move, bytes), for its limits to go on from.
    pub progress: Progress,
}

impl Carried {
    /// The message's bytes.
    pub fn encode(&self) -> [u8; WIRE] {
        let mut w = [0u8; WIRE];
        w[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        let (family, ip, port) = match self.client {
            None => (0u8, [0u8; 16], 0u16),
            Some(SocketAddr::V4(a)) => (4, a.ip().to_ipv6_mapped().octets(), a.port()),
            Some(SocketAddr::V6(a)) => (6, a.ip().octets(), a.port()),
        };
        w[4] = u8::from(self.tcp);
        w[5] = family;
        w[6..8].copy_from_slice(&port.to_le_bytes());
        w[8..24].copy_from_slice(&ip);
        let place = self.place.map_or(0, |p| p.index() as u64 + 1);
        w[24..32].copy_from_slice(&place.to_le_bytes());
        let p = &self.progress;
        w[32..40].copy_from_slice(&time::to_usec(p.start).to_le_bytes());
        w[40..48].copy_from_slice(&time::to_usec(p.last).to_le_bytes());
        w[48..56].copy_from_slice(&p.bytes.to_le_bytes());
        w
    }

    /// Reads a message back; `None` if it is not one.
    pub fn decode(w: &[u8]) -> Option<Carried> {
        if w.len() != WIRE || w[0..4] != MAGIC.to_le_bytes() {
            return None;
        }
        let word = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&w[r]);
            u64::from_le_bytes(b)
        };
        let port = u16::from_le_bytes([w[6], w[7]]);
        let mut ip = [0u8; 16];
        ip.copy_from_slice(&w[8..24]);
        let ip = std::net::Ipv6Addr::from(ip);
        let client = match w[5] {
            0 => None,
            4 => Some(SocketAddr::new(IpAddr::V4(ip.to_ipv4_mapped()?), port)),
            6 => Some(SocketAddr::new(IpAddr::V6(ip), port)),
            _ => return None,
        };
        let place = match word(24..32) {
            0 => None,
            p => Some(Place::from_index(p as usize - 1)?),
        };
        Some(Carried {
            tcp: w[4] == 1,
            client,
            place,
            progress: Progress {
                start: time::from_usec(word(32..40)),
                last: time::from_usec(word(40..48)),
                bytes: word(48..56),
            },
        })
    }
}

/// Sends `conn` with what it carries. `Err(EAGAIN)`: the relay is full
/// for now (the receivers have not taken what is queued); the caller
/// keeps the connection and tries again. `queued` counts what waits.
pub(super) fn send(
    tx: BorrowedFd<'_>,
    conn: BorrowedFd<'_>,
    carried: &Carried,
    queued: &AtomicU64,
) -> nix::Result<()> {
    if cfg!(feature = "no-hand-over") {
        return Err(Errno::EPERM);
    }
    // Counted first, so that a receiver never takes it off below zero.
    queued.fetch_add(1, Ordering::AcqRel);
    let sent = send_with_fds(tx, &carried.encode(), &[conn.as_raw_fd()]);
    if sent.is_err() {
        let _ = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
    sent
}

/// Sends `bytes` with descriptors `fds` attached, in one message, without
/// waiting (the relay's and the vault's messages alike).
pub(crate) fn send_with_fds(tx: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let cmsg = [ControlMessage::ScmRights(fds)];
    loop {
        match sendmsg::<()>(
            tx.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsg,
            MsgFlags::MSG_DONTWAIT | crate::sys::no_signal(),
            None,
        ) {
            Err(Errno::EINTR) => {}
            other => return other.map(drop),
        }
    }
}

/// Takes one connection if one waits: `Ok(None)` when none does.
/// `Err(EMFILE)`: one was taken, but this process had no descriptor free
/// for it and the kernel closed it (take one only with room for it).
pub(super) fn recv(
    rx: BorrowedFd<'_>,
    queued: &AtomicU64,
) -> nix::Result<Option<(OwnedFd, Carried)>> {
    let mut buf = [0u8; WIRE];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC;
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let flags = MsgFlags::MSG_DONTWAIT;
    let (n, fd) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(rx.as_raw_fd(), &mut iov, Some(&mut space), flags) {
            Ok(msg) => {
                let mut fd = None;
                let Ok(cmsgs) = msg.cmsgs() else {
                    // MSG_CTRUNC: the kernel had no descriptor for it in
                    // this process and closed it. Taken all the same.
                    let _ = queued
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                    return Err(Errno::EMFILE);
                };
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for raw in fds {
                            // SAFETY: SCM_RIGHTS gave this process a new
                            // descriptor that nothing else owns.
                            #[allow(unsafe_code)]
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            // One per message; any other is closed.
                            fd.get_or_insert(owned);
                        }
                    }
                }
                break (msg.bytes, fd);
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(e),
        }
    };
    if n == 0 {
        // The other end is closed and nothing is left.
        return Ok(None);
    }
    let _ = queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    let (Some(fd), Some(carried)) = (fd, Carried::decode(&buf[..n])) else {
        return Err(Errno::EBADMSG);
    };
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    let _ = nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let _ = crate::sys::set_nonblocking(&fd);
    Ok(Some((fd, carried)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    #[test]
    fn what_is_encoded_is_decoded() {
        let now = Instant::now();
        for client in [
            None,
            Some("192.0.2.7:40000".parse().unwrap()),
            Some("[2001:db8::7]:7".parse().unwrap()),
        ] {
            let c = Carried {
                tcp: client.is_some(),
                client,
                place: Place::from_index(4095),
                progress: Progress {
                    start: now - Duration::from_secs(3),
                    last: now - Duration::from_millis(5),
                    bytes: 123_456_789,
                },
            };
            let back = Carried::decode(&c.encode()).unwrap();
            assert_eq!(
                (back.tcp, back.client, back.place, back.progress.bytes),
                (c.tcp, c.client, c.place, c.progress.bytes)
            );
            // Through the monotonic clock, to the microsecond.
            let off = |a: Instant, b: Instant| a.checked_duration_since(b).unwrap_or_else(|| b - a);
            let (b, c) = (back.progress, c.progress);
            assert!(off(b.start, c.start) < Duration::from_millis(1));
            assert!(off(b.last, c.last) < Duration::from_millis(1));
        }
        assert!(Carried::decode(&[0u8; WIRE]).is_none(), "no magic");
        assert!(Carried::decode(&[0u8; 10]).is_none(), "short");
    }

    #[test]
    fn a_connection_crosses_the_relay_and_goes_on() {
        let relay = super::super::Relay::new().unwrap();
        let queued = AtomicU64::new(0);
        let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
        let server = OwnedFd::from(server);
        let c = Carried {
            tcp: false,
            client: None,
            place: None,
            progress: Progress {
                bytes: 7,
                ..Progress::new(Instant::now())
            },
        };
        assert!(recv(relay.rx.as_fd(), &queued).unwrap().is_none(), "empty");
        send(relay.tx.as_fd(), server.as_fd(), &c, &queued).unwrap();
        drop(server);
        assert_eq!(queued.load(Ordering::Acquire), 1);
        let (fd, got) = recv(relay.rx.as_fd(), &queued).unwrap().unwrap();
        assert_eq!(queued.load(Ordering::Acquire), 0);
        assert_eq!(got.progress.bytes, 7);
        // The same connection: what the client sends arrives here.
        client.write_all(b"still here").unwrap();
        let mut s = std::os::unix::net::UnixStream::from(fd);
        s.set_nonblocking(false).unwrap();
        let mut back = [0u8; 10];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"still here");
    }
}
