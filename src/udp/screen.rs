//! What a datagram must pass before it is answered: its source address,
//! the allow/deny rules, `--udp-rate` per source, and the echo-loop
//! breaker.
//!
//! Two echo services on high ports can answer each other forever: one
//! forged datagram from the other's address starts a loop (CERT
//! CA-1996-01, "Loop DoS" CVE-2024-2169) that the per-source rate does not
//! stop when the round trip is slower than the rate. A loop has a
//! signature no ordinary client needs: one source (address and port)
//! sending the very bytes it sent last, again and again, each within a
//! second of the one before. The [`LOOP_RUN`]th such repeat in a row is
//! dropped, which ends a loop for good (nothing bounces back any more),
//! and costs a client that sends the same bytes from one socket over and
//! over one datagram in [`LOOP_RUN`] + 1, as a UDP client must expect to
//! lose some. The table is per worker and small: sources that share a
//! slot reset each other's run, which errs towards answering.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::access;
use crate::admission::{Policy, Refusal};
use crate::scoreboard::{Dropped, Scoreboard};

/// Identical datagrams in a row from one source answered before one is
/// dropped as an echo loop.
pub const LOOP_RUN: u32 = 100;
/// A repeat further apart than this from the one before starts a new run.
const LOOP_GAP: Duration = Duration::from_secs(1);
/// Sources followed at once per worker.
const LOOP_SLOTS: usize = 4096;

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

/// One source's run of identical datagrams.
#[derive(Clone, Copy, Default)]
struct Run {
    /// The source (address and port), hashed; 0: the slot is free.
    who: u64,
    /// The bytes it sent last, hashed.
    digest: u64,
    last: Option<Instant>,
    len: u32,
}

/// A UDP worker's screen: the policy, the rate, and its loop table.
pub struct Screen {
    policy: Policy,
    /// `--udp-rate`; 0 = no limit.
    rate: u32,
    seed: u64,
    runs: Vec<Run>,
}

impl Screen {
    /// A screen for `policy` and `--udp-rate` `rate`; `seed` keys the
    /// loop table's hash, so that clients cannot choose their slots.
    pub fn new(policy: Policy, rate: u32, seed: u64) -> Screen {
        Screen {
            policy,
            rate,
            seed: seed | 1,
            runs: vec![Run::default(); LOOP_SLOTS],
        }
    }

    /// Why the datagram `data` from `src` is dropped, if it is: address,
    /// rules, the rate of its source (which counts it; an IPv6 source by
    /// its network, see [`Policy::source`]), then the loop breaker.
    pub fn check(
        &mut self,
        src: &SocketAddr,
        data: &[u8],
        board: &Scoreboard,
        now: Instant,
    ) -> Option<Dropped> {
        if let Some(why) = by_address(src) {
            return Some(why);
        }
        let key = access::key(src.ip());
        match self.policy.admit_datagram(board, key, self.rate) {
            Err(Refusal::Rate) => Some(Dropped::Rate),
            Err(_) => Some(Dropped::Denied),
            Ok(()) if self.repeats(key, src.port(), data, now) => Some(Dropped::Loop),
            Ok(()) => None,
        }
    }

    /// Records the datagram in its source's run; true when the run is
    /// long enough to be an echo loop (the run then starts over).
    fn repeats(&mut self, key: u128, port: u16, data: &[u8], now: Instant) -> bool {
        let who = mix(self.seed ^ (key as u64) ^ ((key >> 64) as u64).rotate_left(17))
            ^ mix(u64::from(port) + 1)
            | 1;
        let digest = digest(self.seed, data);
        let run = &mut self.runs[who as usize % LOOP_SLOTS];
        let same = run.who == who
            && run.digest == digest
            && run
                .last
                .is_some_and(|t| now.saturating_duration_since(t) < LOOP_GAP);
        if !same {
            *run = Run {
                who,
                digest,
                last: Some(now),
                len: 1,
            };
            return false;
        }
        run.last = Some(now);
        run.len += 1;
        if run.len > LOOP_RUN {
            run.len = 0;
            return true;
        }
        false
    }
}

/// splitmix64's finaliser.
fn mix(mut h: u64) -> u64 {
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A hash of every byte of `data` (a loop repeats them all), word by word.
fn digest(seed: u64, data: &[u8]) -> u64 {
    let mut h = seed ^ data.len() as u64;
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    mix(h ^ u64::from_le_bytes(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source: `ip` (v4 or v6) and `port`.
    fn source(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
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
            assert_eq!(by_address(&src.parse().unwrap()), want, "{src}");
        }
    }

    #[test]
    fn the_rate_is_counted_per_source_in_its_own_table() {
        let board = Scoreboard::new(1, 7).unwrap();
        let mut s = Screen::new(Policy::default(), 3, 1);
        let now = Instant::now();
        let (a, b) = (source("192.0.2.1", 40000), source("192.0.2.2", 40000));
        let passed = (0..10u8)
            .filter(|i| s.check(&a, &[*i], &board, now).is_none())
            .count();
        // Within one second-long window (the test takes microseconds) three
        // pass; a window that turns mid-way lets at most three more.
        assert!((3..=6).contains(&passed), "{passed}");
        assert_eq!(s.check(&b, b"x", &board, now), None, "another source");
        assert!(
            board.conn_rate_ok(access::key(a.ip()), 1),
            "TCP's table untouched"
        );
        let mut open = Screen::new(Policy::default(), 0, 1);
        assert!(
            (0..10u8).all(|i| open.check(&a, &[i], &board, now).is_none()),
            "0 = no limit"
        );
    }

    #[test]
    fn an_ipv6_network_shares_one_rate() {
        let board = Scoreboard::new(1, 7).unwrap();
        let policy = Policy {
            ipv6_prefix: 64,
            ..Policy::default()
        };
        let mut s = Screen::new(policy, 5, 1);
        let now = Instant::now();
        let passed = (0..20u16)
            .filter(|i| {
                let src = source(&format!("2001:db8:1:2::{i:x}"), 40000);
                s.check(&src, &i.to_le_bytes(), &board, now).is_none()
            })
            .count();
        assert!((5..=10).contains(&passed), "{passed} of 20 from one /64");
    }

    #[test]
    fn a_loop_is_broken_and_a_varied_flood_is_not() {
        let board = Scoreboard::new(1, 7).unwrap();
        let mut s = Screen::new(Policy::default(), 0, 9);
        let peer = source("192.0.2.1", 7102);
        let mut t = Instant::now();
        let step = Duration::from_millis(2);
        // The same bytes bounced back every 2 ms.
        let answered = (0..1000)
            .take_while(|_| {
                t += step;
                s.check(&peer, b"bounce", &board, t).is_none()
            })
            .count();
        assert_eq!(answered, LOOP_RUN as usize, "the loop ran on");
        // Different bytes each time, from the same socket: all answered.
        assert!((0..1000u32).all(|i| {
            t += step;
            s.check(&peer, &i.to_le_bytes(), &board, t).is_none()
        }));
        // The same bytes a second apart: a monitor, not a loop.
        assert!((0..300).all(|_| {
            t += LOOP_GAP;
            s.check(&peer, b"ping", &board, t).is_none()
        }));
        // Another port of the same host is another source.
        let mut u = Screen::new(Policy::default(), 0, 9);
        for i in 0..500u32 {
            let src = source("192.0.2.1", 2000 + (i % 2) as u16);
            let dropped = u.check(&src, b"same", &board, t).is_some();
            assert_eq!(
                dropped,
                (i / 2) % (LOOP_RUN + 1) == LOOP_RUN,
                "datagram {i}"
            );
        }
    }
}
