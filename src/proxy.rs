//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, versions 1 and 2):
//! the header a balancer puts before a connection's bytes to say whose
//! connection it is.
//!
//! [`step`] is pure: given the bytes read so far, it says whether the
//! header is complete, malformed, or how much more may be read, and never
//! more than the header holds, so that not one byte of the client's is
//! consumed with it (a v1 line is found by peeking, then read to its end;
//! a v2 header has its length in its first 16 bytes). [`Reader`] does the
//! reading without blocking, for every process model.
//!
//! The receiver never guesses: a connection from a trusted proxy must
//! begin with a header, one from anyone else is refused, so a client can
//! neither forge its address nor smuggle a header past the check.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};

use crate::access::Cidr;

/// The longest header accepted, version 2 with its TLVs.
pub const MAX_HEADER: usize = 4096;
/// The longest version 1 line, CRLF included (the spec's 107).
const V1_MAX: usize = 107;
/// Version 2's signature.
const SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// What a complete header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection from `src` (to `dst`).
    Proxied { src: SocketAddr, dst: SocketAddr },
    /// The proxy's own connection (v2 `LOCAL`, v1 `UNKNOWN`, or an
    /// address family without IP addresses): served as from the proxy.
    Local,
}

/// What the bytes read so far make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A complete header, exactly the bytes read.
    Done(Header),
    /// Not a valid header: why.
    Invalid(&'static str),
    /// Read at most `max` more bytes; with `line`, only up to and
    /// including the first line feed among them.
    More { max: usize, line: bool },
}

/// Judges `got`, the bytes read so far from a connection that must begin
/// with a header.
pub fn step(got: &[u8]) -> Step {
    match got.first() {
        None => Step::More {
            max: V1_MAX,
            line: true,
        },
        Some(b'P') => v1(got),
        Some(b'\r') => v2(got),
        Some(_) => Step::Invalid("not a PROXY protocol header"),
    }
}

fn v1(got: &[u8]) -> Step {
    const PREFIX: &[u8] = b"PROXY ";
    let n = got.len().min(PREFIX.len());
    if got[..n] != PREFIX[..n] {
        return Step::Invalid("not a PROXY protocol header");
    }
    match got.iter().position(|&b| b == b'\n') {
        Some(end) if end + 1 == got.len() => v1_line(&got[..end]),
        Some(_) => Step::Invalid("bytes after the line"),
        None if got.len() >= V1_MAX => Step::Invalid("a version 1 line longer than 107 bytes"),
        None => Step::More {
            max: V1_MAX - got.len(),
            line: true,
        },
    }
}

/// A version 1 line, without its line feed.
fn v1_line(line: &[u8]) -> Step {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Step::Invalid("a version 1 line not ended by CRLF");
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return Step::Invalid("a version 1 line that is not text");
    };
    let fields: Vec<&str> = line.split(' ').collect();
    match fields[..] {
        ["PROXY", "UNKNOWN", ..] => Step::Done(Header::Local),
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let ip = |s: &str| -> Option<IpAddr> {
                if proto == "TCP4" {
                    s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
                }
            };
            match (ip(src), ip(dst), port(sport), port(dport)) {
                (Some(s), Some(d), Some(sp), Some(dp)) => Step::Done(Header::Proxied {
                    src: SocketAddr::new(s, sp),
                    dst: SocketAddr::new(d, dp),
                }),
                _ => Step::Invalid("a malformed address or port in a version 1 line"),
            }
        }
        _ => Step::Invalid("a malformed version 1 line"),
    }
}

/// A decimal port, without sign or leading zero.
fn port(s: &str) -> Option<u16> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn v2(got: &[u8]) -> Step {
    let n = got.len().min(SIG.len());
    if got[..n] != SIG[..n] {
        return Step::Invalid("not a PROXY protocol header");
    }
    if got.len() < 16 {
        return Step::More {
            max: 16 - got.len(),
            line: false,
        };
    }
    let (version, command) = (got[12] >> 4, got[12] & 0x0f);
    if version != 2 {
        return Step::Invalid("a version 2 signature with another version");
    }
    let family = got[13];
    let len = usize::from(u16::from_be_bytes([got[14], got[15]]));
    let total = 16 + len;
    if total > MAX_HEADER {
        return Step::Invalid("a version 2 header longer than 4 KiB");
    }
    if got.len() < total {
        return Step::More {
            max: total - got.len(),
            line: false,
        };
    }
    let body = &got[16..total];
    match command {
        0 => Step::Done(Header::Local),
        1 => match family {
            // TCP over IPv4, over IPv6.
            0x11 if body.len() >= 12 => {
                let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                Step::Done(Header::Proxied {
                    src: SocketAddr::new(ip(&body[0..4]), port(&body[8..10])),
                    dst: SocketAddr::new(ip(&body[4..8]), port(&body[10..12])),
                })
            }
            0x21 if body.len() >= 36 => {
                let ip = |b: &[u8]| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(b);
                    IpAddr::V6(Ipv6Addr::from(a))
                };
                let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
                Step::Done(Header::Proxied {
                    src: SocketAddr::new(ip(&body[0..16]), port(&body[32..34])),
                    dst: SocketAddr::new(ip(&body[16..32]), port(&body[34..36])),
                })
            }
            0x11 | 0x21 => Step::Invalid("a version 2 address block too short"),
            // Unspecified, or unix sockets: no IP address to take; the
            // spec has the receiver use the connection's own.
            0x00 | 0x31 | 0x32 => Step::Done(Header::Local),
            _ => Step::Invalid("a version 2 address family other than TCP"),
        },
        _ => Step::Invalid("a version 2 command other than LOCAL or PROXY"),
    }
}

/// The addresses allowed, and required, to send a header
/// (`--trusted-proxy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted(Vec<Cidr>);

impl Trusted {
    /// Parses the `--trusted-proxy` values.
    pub fn new(list: &[String]) -> Result<Trusted, String> {
        list.iter()
            .map(|s| s.parse::<Cidr>().map_err(|e| format!("trusted-proxy: {e}")))
            .collect::<Result<_, _>>()
            .map(Trusted)
    }

    /// The trusted networks, as given.
    pub fn networks(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// Whether the proxy at `key` (see [`crate::access::key`]) is trusted.
    pub fn contains(&self, key: u128) -> bool {
        self.0.iter().any(|c| c.contains(key))
    }

    /// Whether no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A header being read from a connection, without blocking.
pub struct Reader {
    buf: [u8; MAX_HEADER],
    len: usize,
    /// When the proxy's time is up.
    pub deadline: Instant,
}

/// Why no header came.
pub const LATE: &str = "no complete header within proxy-protocol-timeout";
/// The connection closed before its header was complete.
pub const CLOSED: &str = "the connection closed before the header was complete";
/// The connection was reset before its peer's address could be read.
pub const GONE: &str = "the client went away before its address could be read";

/// Whether `why` (a reason a header did not come) is the client's going
/// away, not a misconfiguration: a balancer's health check resets its
/// connection as soon as it is accepted.
pub fn went_away(why: &str) -> bool {
    why == CLOSED || why == GONE
}

impl Reader {
    /// A reader for a connection accepted at `now`, whose proxy has
    /// `timeout` to send the header.
    pub fn new(now: Instant, timeout: Duration) -> Reader {
        Reader {
            buf: [0; MAX_HEADER],
            len: 0,
            deadline: crate::time::after(now, timeout),
        }
    }

    /// Reads what the header may take now. `None`: nothing more is
    /// waiting (wait until the socket is readable, or the deadline);
    /// `Some`: the header, or why there is none.
    pub fn pull(&mut self, fd: BorrowedFd<'_>) -> Option<Result<Header, &'static str>> {
        let fd = fd.as_raw_fd();
        loop {
            let (max, line) = match step(&self.buf[..self.len]) {
                Step::Done(h) => return Some(Ok(h)),
                Step::Invalid(why) => return Some(Err(why)),
                Step::More { max, line } => (max, line),
            };
            let room = &mut self.buf[self.len..self.len + max];
            let take = if line {
                match recv(fd, room, MsgFlags::MSG_PEEK) {
                    Ok(0) => return Some(Err(CLOSED)),
                    Ok(n) => room[..n]
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(n, |i| i + 1),
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => return None,
                    Err(_) => return Some(Err(CLOSED)),
                }
            } else {
                max
            };
            match recv(fd, &mut room[..take], MsgFlags::empty()) {
                Ok(0) => return Some(Err(CLOSED)),
                Ok(n) => self.len += n,
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => return None,
                Err(_) => return Some(Err(CLOSED)),
            }
        }
    }

    /// Reads the whole header, waiting for it until the deadline.
    pub fn read(&mut self, fd: BorrowedFd<'_>) -> Result<Header, &'static str> {
        use nix::poll::{poll, PollFd, PollFlags};
        loop {
            if let Some(done) = self.pull(fd) {
                return done;
            }
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LATE);
            }
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, crate::time::poll_timeout(Some(left))) {
                Ok(0) => return Err(LATE),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(_) => return Err(CLOSED),
            }
        }
    }
}

#[cfg(test)]
mod tests;
