//! The addresses an operator writes: `HOST:PORT`, `[V6]:PORT`, `*:PORT`,
//! `unix:/PATH`, `udp:` before one of the first two, and the metrics'
//! address; parsed, shown, and compared for overlaps. Pure.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// An address to listen on, as the operator wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A numeric address and port.
    Tcp(SocketAddr),
    /// `*:PORT` and the default: `[::]` dual-stack, or `0.0.0.0` where IPv6
    /// is not available.
    Any(u16),
    /// `unix:/PATH`.
    Unix(PathBuf),
    /// `udp:` and an address of the first two forms: UDP echo.
    Udp(Box<ListenAddr>),
    /// `--metrics`: an address of the first three forms where the metrics
    /// are served, not echo (`metrics:` when written out).
    Metrics(Box<ListenAddr>),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("listen address '{s}': {why}");
        if let Some(rest) = s.strip_prefix("udp:") {
            return match rest.parse::<ListenAddr>() {
                Ok(a @ (ListenAddr::Tcp(_) | ListenAddr::Any(_))) => {
                    Ok(ListenAddr::Udp(Box::new(a)))
                }
                Ok(_) => Err(bad("UDP takes HOST:PORT, [V6]:PORT or *:PORT")),
                Err(e) => Err(e.replace(&format!("'{rest}'"), &format!("'{s}'"))),
            };
        }
        if let Some(rest) = s.strip_prefix("metrics:") {
            return match rest.parse::<ListenAddr>() {
                Ok(a @ (ListenAddr::Tcp(_) | ListenAddr::Any(_) | ListenAddr::Unix(_))) => {
                    Ok(ListenAddr::Metrics(Box::new(a)))
                }
                Ok(_) => Err(bad(
                    "metrics take HOST:PORT, [V6]:PORT, *:PORT or unix:/PATH",
                )),
                Err(e) => Err(e.replace(&format!("'{rest}'"), &format!("'{s}'"))),
            };
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("the unix socket path is empty"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT, [V6]:PORT, *:PORT or unix:/PATH"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| bad("the port must be a number from 0 to 65535"))?;
        if host == "*" {
            return Ok(ListenAddr::Any(port));
        }
        if host.is_empty() {
            return Err(bad(&format!(
                "no host: *:{port} listens on every address, 127.0.0.1:{port} on this host only"
            )));
        }
        let ip = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            IpAddr::V6(
                v6.parse::<Ipv6Addr>()
                    .map_err(|_| bad("not an IPv6 address"))?,
            )
        } else if host == "localhost" {
            // The one name we know without asking a resolver.
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(host.parse::<Ipv4Addr>().map_err(|_| {
                bad("the host must be a numeric address (IPv6 in brackets); names are not resolved")
            })?)
        };
        Ok(ListenAddr::Tcp(SocketAddr::new(ip, port)))
    }
}

impl ListenAddr {
    /// Whether it listens on every address of the host (`*:PORT`,
    /// `0.0.0.0`, `[::]`), whatever it serves.
    pub fn is_wildcard(&self) -> bool {
        match self {
            ListenAddr::Any(_) => true,
            ListenAddr::Tcp(a) => a.ip().is_unspecified(),
            ListenAddr::Unix(_) => false,
            ListenAddr::Udp(a) | ListenAddr::Metrics(a) => a.is_wildcard(),
        }
    }

    /// Whether the port is 0, to be picked by the kernel at bind time.
    pub fn is_ephemeral(&self) -> bool {
        match self {
            ListenAddr::Tcp(a) => a.port() == 0,
            ListenAddr::Any(port) => *port == 0,
            ListenAddr::Unix(_) => false,
            ListenAddr::Udp(a) | ListenAddr::Metrics(a) => a.is_ephemeral(),
        }
    }

    /// Whether binding both would collide: the same address twice, or a
    /// wildcard and an address it covers on the same port (without
    /// SO_REUSEPORT the second bind fails). Port 0 twice is two ports.
    pub fn overlaps(&self, other: &ListenAddr) -> bool {
        use ListenAddr::{Any, Metrics, Tcp, Udp, Unix};
        // UDP and TCP ports are apart; the metrics' address is a stream
        // socket like the others.
        match (self, other) {
            (Udp(a), Udp(b)) => return a.overlaps(b),
            (Udp(_), _) | (_, Udp(_)) => return false,
            (Metrics(a), b) => return a.overlaps(b),
            (a, Metrics(b)) => return a.overlaps(b),
            _ => {}
        }
        // (port, IPv4 covered, IPv6 covered, the one address if not a wildcard)
        let scope = |a: &ListenAddr| match *a {
            Any(port) => Some((port, true, true, None)),
            // `[::]` is dual-stack (IPV6_V6ONLY off, Linux's default, and
            // what the daemon asks for): it takes the IPv4 port too.
            Tcp(sa) if sa.ip().is_unspecified() => Some((sa.port(), true, sa.is_ipv6(), None)),
            Tcp(sa) => Some((sa.port(), false, false, Some(sa.ip()))),
            Unix(_) | Udp(_) | Metrics(_) => None,
        };
        match (self, other) {
            (Unix(a), Unix(b)) => a == b,
            _ if self.is_ephemeral() || other.is_ephemeral() => false,
            _ => match (scope(self), scope(other)) {
                (Some((p, v4, v6, ip)), Some((q, w4, w6, jp))) if p == q => match (ip, jp) {
                    (Some(a), Some(b)) => a == b,
                    (Some(a), None) => {
                        if a.is_ipv4() {
                            w4
                        } else {
                            w6
                        }
                    }
                    (None, Some(b)) => {
                        if b.is_ipv4() {
                            v4
                        } else {
                            v6
                        }
                    }
                    (None, None) => (v4 && w4) || (v6 && w6),
                },
                _ => false,
            },
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Any(port) => write!(f, "*:{port}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Udp(a) => write!(f, "udp:{a}"),
            ListenAddr::Metrics(a) => write!(f, "metrics:{a}"),
        }
    }
}
