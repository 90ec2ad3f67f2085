//! The datagram echo (RFC 862, "UDP Based Echo Service") and its abuse
//! filter.
//!
//! A UDP echo is a reflector: with a forged source it bounces traffic at a
//! victim, and two echo services can be set answering each other forever
//! (CERT CA-1996-01, "Loop DoS" CVE-2024-2169). So, as the BSD inetds do,
//! a datagram is answered only if its source is an ordinary unicast
//! address with a port of 1024 or above that the rules allow and that
//! stays within `--udp-rate`, and that is not bouncing the same bytes
//! back and forth with another echo service (screen.rs); anything else
//! is dropped unanswered and counted in the scoreboard (the master logs
//! the counts, rate-limited).
//! A reply is exactly the datagram's bytes, sent to its source from the
//! address it was sent to; a datagram larger than the buffer is dropped,
//! never echoed short.
//!
//! Datagrams are taken in batches on Linux (batch.rs), one at a time
//! elsewhere (single.rs); [`SINGLE_ENV`] puts a Linux worker on the
//! latter, so that the tests run it too.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use log::{debug, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::SockaddrStorage;

use crate::listen::Listener;
use crate::logging::{RateLimit, REPORT_EVERY};
use crate::scoreboard::{Scoreboard, State};

use crate::worker::{self, Ctx, EXIT_ORPHAN};
pub use screen::Screen;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod batch;
mod screen;
mod single;

/// Set to `1` on Linux, a UDP worker takes datagrams one at a time, as it
/// does on FreeBSD and macOS, instead of in batches, so that this path is
/// tested where it can run. Read once, by each UDP worker as it starts.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub const SINGLE_ENV: &str = "ECHO_FORKD_UDP_SINGLE";

/// How datagrams are taken and answered: in batches on Linux (unless
/// [`SINGLE_ENV`] says otherwise), one at a time elsewhere.
enum Engine {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    Batch(batch::Batch),
    Single(single::Single),
}

impl Engine {
    /// This system's engine, or the one [`SINGLE_ENV`] asks for; Err says
    /// what could not be had.
    fn new() -> std::io::Result<Engine> {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let one_at_a_time = std::env::var_os(SINGLE_ENV).is_some_and(|v| v == "1");
            if !one_at_a_time {
                return batch::Batch::new().map(Engine::Batch);
            }
        }
        single::Single::new().map(Engine::Single)
    }

    /// Receives what is waiting on `fd`, up to one batch, screens it, and
    /// answers what passes (see the engines' `serve`).
    fn serve(
        &mut self,
        fd: std::os::fd::RawFd,
        wildcard: bool,
        screen: &mut Screen,
        board: &Scoreboard,
    ) -> nix::Result<Served> {
        match self {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Engine::Batch(e) => e.serve(fd, wildcard, screen, board),
            Engine::Single(e) => e.serve(fd, wildcard, screen, board),
        }
    }

    /// How this engine takes datagrams, for the worker's debug line.
    fn describe(&self) -> &'static str {
        match self {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Engine::Batch(_) => "in batches (recvmmsg, sendmmsg)",
            Engine::Single(_) => "one at a time (recvmsg, sendmsg)",
        }
    }
}

/// Datagrams taken from one socket before the next gets its turn.
const BURST: usize = 256;

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

impl Local {
    /// Whether replies from `self` and `other` leave from one address.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn same(&self, other: &Local) -> bool {
        match (self, other) {
            (Local::None, Local::None) => true,
            (Local::V4(a), Local::V4(b)) => a.ipi_spec_dst.s_addr == b.ipi_spec_dst.s_addr,
            (Local::V6(a), Local::V6(b)) => {
                a.ipi6_addr.s6_addr == b.ipi6_addr.s6_addr && a.ipi6_ifindex == b.ipi6_ifindex
            }
            _ => false,
        }
    }
}

/// A datagram's source as a socket address, if it is IP.
fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    crate::access::ip_addr(a)
}

/// The local address among a datagram's control messages. An IPv4
/// datagram on a dual-stack socket brings both kinds: the IPv4 one is the
/// one a reply to an IPv4 client can use.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn local_of(cmsgs: nix::sys::socket::CmsgIterator<'_>, src: &SocketAddr) -> Local {
    use nix::sys::socket::ControlMessageOwned;
    let mapped = matches!(src, SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some());
    let mut local = Local::None;
    for c in cmsgs {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => local = Local::V4(info),
            ControlMessageOwned::Ipv6PacketInfo(info) if !mapped => local = Local::V6(info),
            _ => {}
        }
    }
    local
}

/// What a reply to a datagram received with `got` says of its source:
/// the local address it was sent to, routed as usual (ip(7)).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn reply_info_v4(got: &libc::in_pktinfo) -> libc::in_pktinfo {
    libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: got.ipi_spec_dst,
        ipi_addr: libc::in_addr { s_addr: 0 },
    }
}

/// A UDP worker: answers the datagrams of `listeners` (all `udp:`) until
/// the control pipe closes. `rate` is `--udp-rate`. Returns the exit code.
pub fn run(listeners: Vec<Listener>, ctx: Ctx<'_>, rate: u32) -> i32 {
    if let Err(code) = worker::follow_master(&ctx) {
        return code;
    }
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
    let mut engine = match Engine::new() {
        Ok(e) => e,
        Err(e) => {
            warn!("cannot set up a UDP worker: {e}");
            return 1;
        }
    };
    debug!("udp worker: taking datagrams {}", engine.describe());
    let mut errors = RateLimit::new(REPORT_EVERY);
    let mut screen = Screen::new(ctx.policy.clone(), rate, seed());
    let wildcard: Vec<bool> = listeners.iter().map(Listener::is_wildcard).collect();
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
                let echoed = serve(&mut engine, l, wildcard[i], &mut screen, board, &mut errors);
                board.udp_echoed(echoed);
            }
        }
    }
}

/// A seed for this worker's loop table.
fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 40)
}

/// What one call of an engine received and sent.
pub struct Served {
    /// Datagrams received (answered or dropped).
    pub received: usize,
    /// Datagrams answered.
    pub echoed: u64,
    /// The first send error, if one lost replies.
    pub error: Option<Errno>,
}

/// Answers the datagrams waiting on `l`, up to [`BURST`]; returns how many
/// were answered. It reads until none is left rather than stop at a short
/// batch: under a flood more have come while the last were answered, and
/// taking them now saves a wait. Errors are logged, rate-limited.
fn serve(
    engine: &mut Engine,
    l: &Listener,
    wildcard: bool,
    screen: &mut Screen,
    board: &Scoreboard,
    errors: &mut RateLimit,
) -> u64 {
    let fd = l.as_fd().as_raw_fd();
    let mut error = |what: &str, e: Errno| {
        if let Some(more) = errors.hit(Instant::now()) {
            warn!(
                "cannot {what} {}: {}; {more} more errors since the last report",
                l.name(),
                e.desc().to_lowercase()
            );
        }
    };
    let (mut echoed, mut taken) = (0, 0);
    while taken < BURST {
        match engine.serve(fd, wildcard, screen, board) {
            Ok(served) => {
                echoed += served.echoed;
                taken += served.received.max(1);
                if let Some(e) = served.error {
                    error("answer on", e);
                }
            }
            Err(Errno::EAGAIN) => break,
            Err(Errno::EINTR) => {}
            Err(e) => {
                error("receive from", e);
                break;
            }
        }
    }
    echoed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams sent to a bound `udp:` socket come back exactly from
    /// `serve` (through whichever engine `serve` drives), and a denied
    /// source's do not.
    fn engine_echoes(
        engine: &mut impl FnMut(std::os::fd::RawFd, &mut Screen, &Scoreboard) -> nix::Result<Served>,
    ) {
        use std::net::UdpSocket;
        let opts = crate::listen::BindOptions {
            backlog: 1,
            socket_mode: 0o666,
            socket_group: None,
        };
        let l = crate::listen::bind(&"udp:127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let to: SocketAddr = l.name().trim_start_matches("udp:").parse().unwrap();
        let board = Scoreboard::new(1, 3).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(to).unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let denied = UdpSocket::bind("127.0.0.3:0").unwrap();
        denied.connect(to).unwrap();
        let policy = crate::admission::Policy {
            rules: crate::access::Rules::new(&[], &["127.0.0.3/32".into()]).unwrap(),
            ..Default::default()
        };
        let mut screen = Screen::new(policy, 0, 1);
        let sizes = [1usize, 1472, 8192, 65_507];
        denied.send(b"no").unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            client.send(&vec![i as u8 + 1; n]).unwrap();
        }
        let mut echoed = 0;
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while echoed < sizes.len() as u64 && Instant::now() < deadline {
            if let Ok(served) = engine(l.as_fd().as_raw_fd(), &mut screen, &board) {
                board.udp_echoed(served.echoed);
                echoed += served.echoed;
            }
        }
        let mut buf = vec![0u8; 70_000];
        for (i, &n) in sizes.iter().enumerate() {
            let got = client.recv(&mut buf).unwrap();
            assert_eq!(got, n);
            assert!(buf[..n].iter().all(|&b| b == i as u8 + 1), "{n} bytes");
        }
        assert_eq!(board.udp_counts(), (4, [0, 0, 1, 0, 0, 0]));
        denied.set_nonblocking(true).unwrap();
        assert!(
            denied.recv(&mut buf).is_err(),
            "a denied source was answered"
        );
    }

    #[test]
    fn one_at_a_time_echoes_exactly() {
        let mut e = single::Single::new().unwrap();
        engine_echoes(&mut |fd, screen, board| e.serve(fd, false, screen, board));
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn batches_echo_exactly() {
        let mut e = batch::Batch::new().unwrap();
        engine_echoes(&mut |fd, screen, board| e.serve(fd, false, screen, board));
    }
}
