//! The datagram echo (RFC 862, "UDP Based Echo Service") and its abuse
//! filter.
//!
//! A UDP echo is a reflector: with a forged source it bounces traffic at a
//! victim, and two echo services can be set answering each other forever
//! (CERT CA-1996-01, "Loop DoS" CVE-2024-2169). So, as the BSD inetds do,
//! a datagram is answered only if its source is an ordinary unicast
//! address with a port of 1024 or above that the rules allow and that
//! stays within `--udp-rate`; anything else is dropped unanswered and
//! counted in the scoreboard (the master logs the counts, rate-limited).
//! A reply is exactly the datagram's bytes, sent to its source from the
//! address it was sent to; a datagram larger than the buffer is dropped,
//! never echoed short.

use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Instant;

use log::warn;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, MsgFlags, SockaddrStorage};

use crate::access::{self, Policy};
use crate::listen::Listener;
use crate::logging::{RateLimit, REPORT_EVERY};
use crate::scoreboard::{Dropped, Scoreboard, State};
use crate::worker::{self, Ctx, EXIT_ORPHAN};

/// Datagrams taken from one socket before the next gets its turn.
const BURST: usize = 256;

/// Why a datagram from `src` is dropped for its address alone, if it is:
/// a broadcast, multicast or unspecified source cannot be a real client
/// (it is forged, and a reply would reach many or none), and a source
/// port below 1024 is another service's (echo, chargen, DNS...), which
/// would answer the answer.
pub fn by_address(src: &SocketAddr) -> Option<Dropped> {
    let forged = match canonical(src.ip()) {
        IpAddr::V4(a) => a.is_unspecified() || a.is_broadcast() || a.is_multicast(),
        IpAddr::V6(a) => a.is_unspecified() || a.is_multicast(),
    };
    if forged {
        Some(Dropped::Source)
    } else if src.port() < 1024 {
        Some(Dropped::Port)
    } else {
        None
    }
}

/// An IPv4 client of a dual-stack socket as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The checks a datagram from `src` passes before it is answered:
/// address, rules, then the rate (which counts this datagram).
fn screen(src: &SocketAddr, policy: &Policy, rate: u32, board: &Scoreboard) -> Option<Dropped> {
    if let Some(why) = by_address(src) {
        return Some(why);
    }
    let key = access::key(src.ip());
    if !policy.rules.allows(key) {
        Some(Dropped::Denied)
    } else if rate > 0 && !board.datagram_rate_ok(key, rate) {
        Some(Dropped::Rate)
    } else {
        None
    }
}

/// The local address a datagram was sent to, as the kernel reported it
/// on a wildcard socket: the reply leaves from it.
#[derive(Clone, Copy)]
enum Local {
    None,
    #[cfg(any(target_os = "linux", target_os = "android"))]
    V4(libc::in_pktinfo),
    #[cfg(any(target_os = "linux", target_os = "android"))]
    V6(libc::in6_pktinfo),
}

/// A UDP worker: answers the datagrams of `listeners` (all `udp:`) until
/// the control pipe closes. `rate` is `--udp-rate`. Returns the exit code.
pub fn run(listeners: Vec<Listener>, ctx: Ctx<'_>, rate: u32) -> i32 {
    if let Err(code) = worker::follow_master(&ctx) {
        return code;
    }
    let Some(mut buf) = worker::buffer() else {
        return 1;
    };
    let Some(board) = ctx.slot.map(|s| s.board()) else {
        return 1;
    };
    let mut fds = Vec::with_capacity(1 + listeners.len());
    fds.push(PollFd::new(ctx.ctl, PollFlags::POLLIN));
    fds.extend(
        listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
    );
    let mut socket = Socket {
        cmsg: nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo),
        errors: RateLimit::new(REPORT_EVERY),
    };
    // Serving from the start: there is no idle state for a datagram
    // worker, and no pool counts it.
    ctx.set(State::Busy);
    loop {
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!("waiting for datagrams failed: {e}");
                return 1;
            }
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        if ready(&fds[0]) {
            ctx.set(State::Stopping);
            return if ctx.master_gone() { EXIT_ORPHAN } else { 0 };
        }
        for (i, l) in listeners.iter().enumerate() {
            if ready(&fds[i + 1]) {
                let echoed = socket.serve(l, buf.as_mut_slice(), &ctx.policy, rate, board);
                board.udp_echoed(echoed);
            }
        }
    }
}

/// What one receive brought.
enum Got {
    /// A datagram of this many bytes, its source and local address.
    Datagram(usize, SocketAddr, Local),
    /// One larger than the buffer: its tail is lost.
    Truncated,
    /// One from outside IP (never on an IP socket).
    NotIp,
}

/// Sends `data` back to `src`, from `local` if known.
fn reply(fd: RawFd, data: &[u8], src: &SocketAddr, local: Local) -> nix::Result<usize> {
    let to = SockaddrStorage::from(*src);
    let iov = [IoSlice::new(data)];
    match local {
        Local::None => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&to)),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Local::V4(got) => {
            // The address it was sent to, routed as usual (ip(7)).
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: got.ipi_spec_dst,
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&to))
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Local::V6(got) => {
            // Address and interface both: a link-local address needs its
            // interface (ipv6(7)).
            let cmsg = [ControlMessage::Ipv6PacketInfo(&got)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&to))
        }
    }
}

/// One worker's receiving state.
struct Socket {
    /// Room for the packet-info control message.
    cmsg: Vec<u8>,
    /// Receive and send errors, logged rate-limited.
    errors: RateLimit,
}

impl Socket {
    /// Answers up to [`BURST`] datagrams waiting on `l`; returns how many
    /// were answered.
    fn serve(
        &mut self,
        l: &Listener,
        buf: &mut [u8],
        policy: &Policy,
        rate: u32,
        board: &Scoreboard,
    ) -> u64 {
        let fd = l.as_fd().as_raw_fd();
        let mut echoed = 0;
        for _ in 0..BURST {
            let (n, src, local) = match self.receive(fd, buf) {
                Ok(Got::Datagram(n, src, local)) => (n, src, local),
                Ok(Got::Truncated) => {
                    board.udp_dropped(Dropped::Truncated);
                    continue;
                }
                Ok(Got::NotIp) => continue,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    self.error(l, "receive from", e);
                    break;
                }
            };
            if let Some(why) = screen(&src, policy, rate, board) {
                board.udp_dropped(why);
                continue;
            }
            match reply(fd, &buf[..n], &src, local) {
                Ok(_) => echoed += 1,
                Err(Errno::EINTR) => {
                    if reply(fd, &buf[..n], &src, local).is_ok() {
                        echoed += 1;
                    }
                }
                Err(e) => self.error(l, "answer on", e),
            }
        }
        echoed
    }

    /// Receives one datagram.
    fn receive(&mut self, fd: RawFd, buf: &mut [u8]) -> nix::Result<Got> {
        let mut iov = [IoSliceMut::new(buf)];
        let msg =
            recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut self.cmsg), MsgFlags::empty())?;
        let src = msg.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::from(*v4))
                .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
        });
        let Some(src) = src else {
            return Ok(Got::NotIp);
        };
        if msg.flags.contains(MsgFlags::MSG_TRUNC) {
            return Ok(Got::Truncated);
        }
        let mut local = Local::None;
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Ok(cmsgs) = msg.cmsgs() {
            use nix::sys::socket::ControlMessageOwned;
            let mapped = matches!(src, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some());
            for c in cmsgs {
                match c {
                    ControlMessageOwned::Ipv4PacketInfo(info) => local = Local::V4(info),
                    ControlMessageOwned::Ipv6PacketInfo(info) if !mapped => local = Local::V6(info),
                    _ => {}
                }
            }
        }
        Ok(Got::Datagram(msg.bytes, src, local))
    }

    fn error(&mut self, l: &Listener, what: &str, e: Errno) {
        if let Some(more) = self.errors.hit(Instant::now()) {
            warn!(
                "cannot {what} {}: {}; {more} more errors since the last report",
                l.name(),
                e.desc().to_lowercase()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forged_and_service_sources_are_dropped() {
        for (src, want) in [
            ("192.0.2.1:40000", None),
            ("[2001:db8::1]:1024", None),
            ("[::ffff:192.0.2.1]:5000", None),
            ("192.0.2.1:1023", Some(Dropped::Port)),
            ("192.0.2.1:7", Some(Dropped::Port)),
            ("192.0.2.1:0", Some(Dropped::Port)),
            ("[::ffff:192.0.2.1]:19", Some(Dropped::Port)),
            ("255.255.255.255:40000", Some(Dropped::Source)),
            ("0.0.0.0:40000", Some(Dropped::Source)),
            ("224.0.0.1:40000", Some(Dropped::Source)),
            ("[::ffff:255.255.255.255]:40000", Some(Dropped::Source)),
            ("[::]:40000", Some(Dropped::Source)),
            ("[ff02::1]:40000", Some(Dropped::Source)),
        ] {
            assert_eq!(by_address(&addr(src)), want, "{src}");
        }
    }

    #[test]
    fn the_rate_is_counted_per_source_in_its_own_table() {
        let board = Scoreboard::new(1, 7).unwrap();
        let policy = Policy::default();
        let (a, b) = (addr("192.0.2.1:40000"), addr("192.0.2.2:40000"));
        let passed = (0..10)
            .filter(|_| screen(&a, &policy, 3, &board).is_none())
            .count();
        // Within one second-long window (the test takes microseconds) three
        // pass; a window that turns mid-way lets at most three more.
        assert!((3..=6).contains(&passed), "{passed}");
        assert_eq!(screen(&b, &policy, 3, &board), None, "another source");
        assert!(
            board.conn_rate_ok(access::key(a.ip()), 1),
            "TCP's table untouched"
        );
        assert!(
            (0..10).all(|_| screen(&a, &policy, 0, &board).is_none()),
            "0 = no limit"
        );
    }
}
