//! Client addresses: one number for an address (IPv4 and IPv6 alike), its
//! source for the per-source limits, and the `--allow`/`--deny` CIDR
//! rules. Pure, so it is unit-tested; `admission` applies them.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::{getpeername, SockaddrStorage};
use std::str::FromStr;

/// A client address as 128 bits: IPv6 as is, IPv4 (and IPv4-mapped IPv6,
/// which a dual-stack listener reports) as `::ffff:a.b.c.d`, so a rule or
/// a limit treats both spellings of one client alike. Never 0.
pub fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// What the per-source limits count a client at `key` by: an IPv4 client
/// by its address, an IPv6 one by its first `ipv6_prefix` bits (a site
/// gives a host a whole /64, so counting by address would let one host
/// take 2^64 shares).
pub fn source(key: u128, ipv6_prefix: u8) -> u128 {
    if Ipv6Addr::from(key).to_ipv4_mapped().is_some() {
        key
    } else {
        key & mask(ipv6_prefix.min(128))
    }
}

/// A socket address as the standard library's, if it is IP: the one
/// conversion every module uses.
pub fn ip_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    a.as_sockaddr_in()
        .map(|v4| SocketAddr::from(*v4))
        .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
}

/// A connected socket's peer, if it is IP.
pub fn peer(conn: BorrowedFd<'_>) -> Option<SocketAddr> {
    ip_addr(&getpeername::<SockaddrStorage>(conn.as_raw_fd()).ok()?)
}

/// The client's address as an [`key`], if it is an IP client.
pub fn peer_key(conn: &OwnedFd) -> Option<u128> {
    peer(conn.as_fd()).map(|a| key(a.ip()))
}

/// `ADDR/LEN` (or a bare address: one host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network, in [`key`] form.
    net: u128,
    /// Prefix length in the 128-bit form (an IPv4 /8 is 104).
    len: u8,
    /// The prefix length as written, for messages.
    shown: u8,
    v4: bool,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = |why: &str| format!("CIDR '{s}': {why}");
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| bad("not a numeric IPv4 or IPv6 address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let shown = match len {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max)
                .ok_or_else(|| bad(&format!("the prefix length must be 0 to {max}")))?,
        };
        let len = if ip.is_ipv4() { 96 + shown } else { shown };
        let net = key(ip) & mask(len);
        if net != key(ip) {
            return Err(bad("host bits are set beyond the prefix length"));
        }
        Ok(Cidr {
            net,
            len,
            shown,
            v4: ip.is_ipv4(),
        })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = Ipv6Addr::from(self.net);
        match v6.to_ipv4_mapped().filter(|_| self.v4) {
            Some(v4) => write!(f, "{v4}/{}", self.shown),
            None => write!(f, "{v6}/{}", self.shown),
        }
    }
}

fn mask(len: u8) -> u128 {
    match len {
        0 => 0,
        l => u128::MAX << (128 - u32::from(l)),
    }
}

impl Cidr {
    /// Whether `key` is within the network.
    pub fn contains(&self, key: u128) -> bool {
        key & mask(self.len) == self.net
    }
}

/// The allow and deny rules: the most specific matching rule decides (a
/// deny wins a tie); with any allow rule, an address no rule matches is
/// denied, otherwise it is allowed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<(Cidr, bool)>,
    any_allow: bool,
}

impl Rules {
    /// Parses the `--allow` and `--deny` values.
    pub fn new(allow: &[String], deny: &[String]) -> Result<Rules, String> {
        let mut rules = Vec::with_capacity(allow.len() + deny.len());
        for (list, allowed) in [(allow, true), (deny, false)] {
            for s in list {
                rules.push((s.parse::<Cidr>()?, allowed));
            }
        }
        Ok(Rules {
            any_allow: !allow.is_empty(),
            rules,
        })
    }

    /// The networks of the `--allow` (`true`) or `--deny` rules, as given.
    pub fn networks(&self, allowed: bool) -> Vec<String> {
        self.rules
            .iter()
            .filter(|(_, a)| *a == allowed)
            .map(|(c, _)| c.to_string())
            .collect()
    }

    /// Whether there is any rule at all (no rule: nothing to check).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether a client at `key` may connect.
    pub fn allows(&self, key: u128) -> bool {
        self.rules
            .iter()
            .filter(|(c, _)| c.contains(key))
            // Longest prefix first; at equal length deny (false) first.
            .max_by_key(|(c, allowed)| (c.len, !allowed))
            .map_or(!self.any_allow, |(_, allowed)| *allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> u128 {
        key(s.parse().unwrap())
    }

    fn rules(allow: &[&str], deny: &[&str]) -> Rules {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Rules::new(&v(allow), &v(deny)).unwrap()
    }

    #[test]
    fn parses_and_shows_both_families() {
        for s in [
            "10.0.0.0/8",
            "127.0.0.1/32",
            "::1/128",
            "2001:db8::/32",
            "0.0.0.0/0",
        ] {
            assert_eq!(s.parse::<Cidr>().unwrap().to_string(), s);
        }
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        for bad in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "example.com/8",
            "::/129",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn most_specific_rule_wins_and_allow_means_default_deny() {
        assert!(rules(&[], &[]).allows(k("192.0.2.1")));
        let r = rules(&[], &["127.0.0.1/32"]);
        assert!(!r.allows(k("127.0.0.1")));
        assert!(r.allows(k("127.0.0.2")));
        let r = rules(&["127.0.0.0/8"], &["127.0.0.1/32"]);
        assert!(!r.allows(k("127.0.0.1")));
        assert!(r.allows(k("127.0.0.2")));
        assert!(!r.allows(k("192.0.2.1")), "unmatched with an allow rule");
        let r = rules(&["10.1.0.0/16"], &["10.0.0.0/8"]);
        assert!(r.allows(k("10.1.2.3")));
        assert!(!r.allows(k("10.2.0.1")));
        // A tie goes to deny.
        assert!(!rules(&["10.0.0.0/8"], &["10.0.0.0/8"]).allows(k("10.0.0.1")));
    }

    #[test]
    fn ipv6_sources_are_counted_by_their_network_ipv4_by_address() {
        for (a, b, len, same) in [
            ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", 64, true),
            ("2001:db8:1:2::1", "2001:db8:1:3::1", 64, false),
            ("2001:db8:1:2::1", "2001:db8:1:2::2", 128, false),
            ("2001:db8:1:2::1", "2001:db8:1:3::1", 48, true),
            ("192.0.2.1", "192.0.2.2", 64, false),
            ("::ffff:192.0.2.1", "192.0.2.1", 64, true),
        ] {
            assert_eq!(
                source(k(a), len) == source(k(b), len),
                same,
                "{a} and {b} by /{len}"
            );
        }
        assert_eq!(source(k("192.0.2.7"), 64), k("192.0.2.7"));
        assert_eq!(source(k("2001:db8::7"), 64), k("2001:db8::"));
    }

    #[test]
    fn ipv4_mapped_clients_meet_ipv4_rules() {
        let r = rules(&[], &["127.0.0.1/32"]);
        assert!(!r.allows(k("::ffff:127.0.0.1")));
        assert_eq!(k("::ffff:127.0.0.1"), k("127.0.0.1"));
        let r = rules(&["::1/128"], &[]);
        assert!(r.allows(k("::1")));
        assert!(!r.allows(k("127.0.0.1")));
    }
}
