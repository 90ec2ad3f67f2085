//! May this client be served? One answer for every process model, in one
//! place: the `--allow`/`--deny` rules for its address, `--max-conn-rate`
//! and `--max-per-ip` for its source (an IPv6 client's network, see
//! [`Policy::source`]), `--udp-rate` for a datagram's, and, behind a
//! load balancer, whether the connection comes from a trusted proxy.
//!
//! Admitting a client gives a [`Ticket`]: its place in `--max-per-ip`,
//! counted in the scoreboard's shared table whichever process serves it,
//! and given back when the ticket is dropped. A process that can die
//! holding places publishes each where the master finds it when it reaps
//! the process ([`Holder`]): a prefork worker in its slot, a fork-mode
//! child in its word of the fork table (the master keeps the place of a
//! connection handed over to a child it forks), and an event worker, which
//! holds many, has the live ones count theirs again ([`reclaim`]). One
//! atomic swap of the published word decides who gives a place back, so
//! it is given back exactly once.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::access::{self, Rules};
use crate::proxy::Trusted;
pub use crate::scoreboard::Refusal;
use crate::scoreboard::{hold, take_held, Place, Scoreboard, Slot};

/// The checks a client must pass before it is served.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub rules: Rules,
    /// 0 = no limit.
    pub max_per_ip: u32,
    /// 0 = no limit.
    pub max_conn_rate: u32,
    /// IPv6 sources share the per-source limits by this prefix (0 is
    /// taken as 128: every address on its own).
    pub ipv6_prefix: u8,
    /// `--proxy-protocol`: the proxies trusted to send the header.
    pub proxy: Option<Trusted>,
    /// How long a trusted proxy has to send the header.
    pub proxy_timeout: Duration,
}

/// Where a ticket's place is published for the master (see the module's
/// doc).
#[derive(Clone, Copy)]
pub enum Holder<'a> {
    /// Nowhere: an event worker.
    Here,
    /// A prefork worker's slot.
    Slot(Slot<'a>),
    /// A fork-mode child's word in the fork table, at this index.
    Fork(usize),
}

/// A client's place in `--max-per-ip` (none when there is no limit),
/// given back when dropped.
pub struct Ticket<'a> {
    board: &'a Scoreboard,
    place: Option<Place>,
    /// The word it is published in.
    word: Option<&'a AtomicU64>,
}

impl<'a> Ticket<'a> {
    /// The place, to count again after a rebuild of the table.
    pub fn place(&self) -> Option<Place> {
        self.place
    }

    /// The connection went to another process with its place (see
    /// relay/): this holder lets go of it without giving it back.
    pub fn handed_over(self) {
        if let Some(w) = self.word {
            take_held(w);
        }
        std::mem::forget(self);
    }
}

/// Takes over the place a connection handed over by another process
/// holds (counted already), published as `holder` says.
pub fn adopt<'a>(board: &'a Scoreboard, place: Option<Place>, holder: Holder<'a>) -> Ticket<'a> {
    let word = match holder {
        Holder::Here => None,
        Holder::Slot(slot) => Some(slot.held()),
        Holder::Fork(index) => Some(board.fork_held(index)),
    };
    if let (Some(w), Some(p)) = (word, place) {
        hold(w, p);
    }
    Ticket {
        board,
        place,
        word: word.filter(|_| place.is_some()),
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let place = match self.word {
            Some(w) => take_held(w),
            None => self.place,
        };
        if let Some(p) = place {
            self.board.give_place(p);
        }
    }
}

impl Policy {
    /// Whether an admitted client holds a place (`--max-per-ip`).
    fn holds_places(&self) -> bool {
        self.max_per_ip > 0
    }

    /// Whether every client passes without a look at its address.
    pub fn is_open(&self) -> bool {
        self.rules.is_empty()
            && self.max_per_ip == 0
            && self.max_conn_rate == 0
            && self.proxy.is_none()
    }

    /// The source a client at `key` is counted as by the per-source
    /// limits (see [`access::source`]).
    pub fn source(&self, key: u128) -> u128 {
        match self.ipv6_prefix {
            0 => key,
            len => access::source(key, len),
        }
    }

    /// Checks a client at `key` (see [`access::key`]): the rules, then
    /// the rate of its source (which counts this attempt), then its place
    /// in `--max-per-ip`, taken for it and published as `holder` says.
    pub fn admit<'a>(
        &self,
        board: &'a Scoreboard,
        key: u128,
        holder: Holder<'a>,
    ) -> Result<Ticket<'a>, Refusal> {
        if !self.rules.allows(key) {
            return Err(Refusal::Denied);
        }
        let source = self.source(key);
        if self.max_conn_rate > 0 && !board.conn_rate_ok(source, self.max_conn_rate) {
            return Err(Refusal::Rate);
        }
        let mut ticket = Ticket {
            board,
            place: None,
            word: None,
        };
        if self.max_per_ip == 0 {
            return Ok(ticket);
        }
        let place = board.place_of(source);
        let word = match holder {
            Holder::Here => None,
            Holder::Slot(slot) => Some(slot.held()),
            Holder::Fork(index) => Some(board.fork_held(index)),
        };
        // Published before it is taken: a holder that dies in between
        // has the master give back a place it never took, which errs
        // towards admitting one client, once; the other order could keep
        // a place taken for good.
        if let Some(w) = word {
            hold(w, place);
        }
        if !board.take_place(place, self.max_per_ip) {
            if let Some(w) = word {
                take_held(w);
            }
            return Err(Refusal::PerIp);
        }
        ticket.place = Some(place);
        ticket.word = word;
        Ok(ticket)
    }

    /// Checks a datagram from `key`: the rules, then `rate` (`--udp-rate`,
    /// 0: none) for its source, which counts it.
    pub fn admit_datagram(&self, board: &Scoreboard, key: u128, rate: u32) -> Result<(), Refusal> {
        if !self.rules.allows(key) {
            Err(Refusal::Denied)
        } else if rate > 0 && !board.datagram_rate_ok(self.source(key), rate) {
            Err(Refusal::Rate)
        } else {
            Ok(())
        }
    }

    /// Behind a load balancer, the proxy a TCP connection from `peer`
    /// comes from, if it is trusted: `Ok(None)` without
    /// `--proxy-protocol`, `Err` from anyone else (or an unknown peer).
    pub fn proxy_of(&self, peer: Option<SocketAddr>) -> Result<Option<SocketAddr>, Refusal> {
        let Some(trusted) = &self.proxy else {
            return Ok(None);
        };
        match peer {
            Some(p) if trusted.contains(access::key(p.ip())) => Ok(Some(p)),
            _ => Err(Refusal::Proxy),
        }
    }
}

impl Policy {
    /// Counts again, whatever the limit, the place of a connection that
    /// crossed a restart (the scoreboard that counted it is gone): its
    /// client as the PROXY header named it, else its peer.
    pub fn recount(
        &self,
        board: &Scoreboard,
        conn: &std::os::fd::OwnedFd,
        client: Option<SocketAddr>,
    ) -> Option<Place> {
        if !self.holds_places() {
            return None;
        }
        let key = client.map_or_else(|| access::peer_key(conn), |c| Some(access::key(c.ip())))?;
        let place = board.place_of(self.source(key));
        board.recount_place(place);
        Some(place)
    }
}

/// What the admission gate says of a new connection.
pub enum Gate<'a> {
    /// Served: its client (when known: a TCP peer that a rule or the
    /// debug log looks at) and its place.
    Admit(Option<SocketAddr>, Option<Ticket<'a>>),
    /// Behind a load balancer, from this trusted proxy: the PROXY header
    /// names the client, checked once it is read ([`Policy::check`]).
    Header(SocketAddr),
    /// Refused, counted and said at debug level: it is closed unread.
    Refuse,
}

impl Policy {
    /// The one gate every new connection passes, in every process model:
    /// a `tcp` connection's peer is checked (the rules, the rates, its
    /// place in `--max-per-ip`, held as `holder` says), or behind a load
    /// balancer only its proxy (the client comes with the header). A
    /// unix socket's client, and anyone when nothing is checked, passes
    /// unlooked-at.
    pub fn gate<'a>(
        &self,
        board: &'a Scoreboard,
        conn: BorrowedFd<'_>,
        tcp: bool,
        holder: Holder<'a>,
    ) -> Gate<'a> {
        if !tcp || (self.is_open() && !log::log_enabled!(log::Level::Debug)) {
            return Gate::Admit(None, None);
        }
        let peer = access::peer(conn);
        if self.proxy.is_some() {
            return match self.proxy_of(peer) {
                Ok(Some(proxy)) => Gate::Header(proxy),
                _ => {
                    unserved_behind_proxy(board, untrusted(peer));
                    Gate::Refuse
                }
            };
        }
        match peer {
            Some(client) if !self.is_open() => match self.check(board, client, holder) {
                Some(ticket) => Gate::Admit(Some(client), Some(ticket)),
                None => Gate::Refuse,
            },
            peer => Gate::Admit(peer, None),
        }
    }

    /// Checks `client` (the peer, or the one a PROXY header named) and
    /// takes its place, held as `holder` says; `None`: refused, which is
    /// counted and said at debug level.
    pub fn check<'a>(
        &self,
        board: &'a Scoreboard,
        client: SocketAddr,
        holder: Holder<'a>,
    ) -> Option<Ticket<'a>> {
        self.admit(board, access::key(client.ip()), holder)
            .map_err(|why| {
                board.refused(why);
                refused_client(Some(client), why);
            })
            .ok()
    }
}

/// Why a connection from `peer` is not taken as from a trusted proxy:
/// it is not from one, or it was reset before its address could be read.
pub fn untrusted(peer: Option<SocketAddr>) -> &'static str {
    match peer {
        Some(_) => "not from a trusted proxy",
        None => crate::proxy::GONE,
    }
}

/// Counts a connection behind a proxy closed without being served, and
/// says why (at debug level, with no address to name yet): a client that
/// went away first, as a balancer's health check does once it has its
/// answer, is abandoned, not refused; anything else is a refusal an
/// operator must act on (`refused_total{reason="proxy"}`).
pub fn unserved_behind_proxy(board: &Scoreboard, why: &str) {
    if crate::proxy::went_away(why) {
        board.abandoned();
        log::debug!(
            "PROXY protocol: {why}; not a refusal (a health check, or a client that gave up)"
        );
    } else {
        board.refused(Refusal::Proxy);
        log::debug!("PROXY protocol: {why}; connection closed");
    }
}

/// Says, at debug level, which client a limit or rule refused.
pub fn refused_client(client: Option<SocketAddr>, why: Refusal) {
    if let Some(c) = client {
        log::debug!(
            "connection from {c} refused by {}; closed unread",
            why.name()
        );
    }
}

/// Gives back a place the fork-mode master kept for a child it reaped.
pub fn give_back(board: &Scoreboard, place: Place) {
    board.give_place(place);
}

/// What a reaped child may have held places in.
#[derive(Clone, Copy, Debug, Default)]
pub struct Held {
    /// The place the master kept for it (a fork-mode child's client,
    /// admitted before the fork, [`Ticket::into_place`]).
    pub kept: Option<Place>,
    /// Its scoreboard slot (a prefork worker's one client).
    pub slot: Option<usize>,
    /// Its word in the fork table (a fork-mode child behind a proxy).
    pub fork: Option<usize>,
    /// It died by a signal or an error (a clean exit gave its places back).
    pub abnormal: bool,
}

impl Policy {
    /// Master, reaping a child (before its slot is released): gives back
    /// every place it still held, the one the master kept for it first.
    /// A worker that died with connections open
    /// and none published is an event worker, whose places are unknown one
    /// by one: the table is emptied and the live ones count theirs again.
    pub fn reclaim(&self, board: &Scoreboard, held: Held) {
        if let Some(place) = held.kept {
            board.give_place(place);
        }
        let words = [
            held.slot.map(|s| board.slot_held(s)),
            held.fork.map(|i| board.fork_held(i)),
        ];
        let mut published = false;
        for w in words.into_iter().flatten() {
            if let Some(p) = take_held(w) {
                board.give_place(p);
                published = true;
            }
        }
        let open = held.slot.and_then(|s| board.get(s)).map_or(0, |e| e.open);
        if held.abnormal && open > 0 && !published && self.holds_places() {
            board.rebuild_places();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> u128 {
        access::key(s.parse().unwrap())
    }

    fn per_ip(n: u32) -> Policy {
        Policy {
            max_per_ip: n,
            ipv6_prefix: 64,
            ..Policy::default()
        }
    }

    #[test]
    fn a_ticket_holds_a_place_until_it_is_dropped() {
        let board = Scoreboard::new(1, 3).unwrap();
        let p = per_ip(2);
        let a = p.admit(&board, k("192.0.2.1"), Holder::Here).unwrap();
        let b = p.admit(&board, k("192.0.2.1"), Holder::Here).unwrap();
        assert_eq!(
            p.admit(&board, k("192.0.2.1"), Holder::Here).err(),
            Some(Refusal::PerIp)
        );
        assert!(p.admit(&board, k("192.0.2.2"), Holder::Here).is_ok());
        drop(a);
        assert!(p.admit(&board, k("192.0.2.1"), Holder::Here).is_ok());
        drop(b);
    }

    #[test]
    fn an_ipv6_network_is_one_source() {
        let board = Scoreboard::new(1, 3).unwrap();
        let p = per_ip(1);
        let _a = p.admit(&board, k("2001:db8:1:2::a"), Holder::Here).unwrap();
        assert_eq!(
            p.admit(&board, k("2001:db8:1:2:ffff::b"), Holder::Here)
                .err(),
            Some(Refusal::PerIp)
        );
        assert!(p.admit(&board, k("2001:db8:1:3::a"), Holder::Here).is_ok());
    }

    #[test]
    fn a_published_place_is_given_back_once_by_whoever_takes_it() {
        let mut board = Scoreboard::new(2, 3).unwrap();
        let s = board.claim(1).unwrap();
        let p = per_ip(1);
        let slot = board.slot(s);
        // The worker ends normally: its ticket gives the place back.
        let t = p.admit(&board, k("192.0.2.1"), Holder::Slot(slot)).unwrap();
        drop(t);
        p.reclaim(
            &board,
            Held {
                slot: Some(s),
                ..Held::default()
            },
        );
        let again = p.admit(&board, k("192.0.2.1"), Holder::Here).unwrap();
        assert!(
            p.admit(&board, k("192.0.2.1"), Holder::Here).is_err(),
            "given back twice would let a second one in"
        );
        drop(again);
        // The worker dies holding it: the master takes it back.
        let t = p.admit(&board, k("192.0.2.1"), Holder::Slot(slot)).unwrap();
        std::mem::forget(t);
        assert!(p.admit(&board, k("192.0.2.1"), Holder::Here).is_err());
        p.reclaim(
            &board,
            Held {
                slot: Some(s),
                ..Held::default()
            },
        );
        assert!(p.admit(&board, k("192.0.2.1"), Holder::Here).is_ok());
    }

    #[test]
    fn a_fork_childs_place_comes_back_however_it_ends() {
        let board = Scoreboard::new(1, 3).unwrap();
        let p = per_ip(1);
        let t = p.admit(&board, k("192.0.2.9"), Holder::Fork(7)).unwrap();
        // It said it took its connection (it accepted it: fork.rs).
        crate::scoreboard::mark_taken(board.fork_held(7));
        std::mem::forget(t); // killed while serving
        assert!(p.admit(&board, k("192.0.2.9"), Holder::Here).is_err());
        p.reclaim(
            &board,
            Held {
                fork: Some(7),
                abnormal: true,
                ..Held::default()
            },
        );
        assert!(
            crate::scoreboard::taken(board.fork_held(7)),
            "the master still sees that it took a connection"
        );
        let back = p.admit(&board, k("192.0.2.9"), Holder::Here);
        assert!(back.is_ok(), "its place came back");
        drop(back);
        // A connection handed over to a child the master forks: the
        // master keeps its place, and gives it back at reap.
        let kept = p.admit(&board, k("192.0.2.9"), Holder::Here).unwrap();
        let place = kept.place().unwrap();
        std::mem::forget(kept);
        assert!(p.admit(&board, k("192.0.2.9"), Holder::Here).is_err());
        give_back(&board, place);
        assert!(p.admit(&board, k("192.0.2.9"), Holder::Here).is_ok());
    }

    #[test]
    fn rules_and_rates_refuse_before_a_place_is_taken() {
        let board = Scoreboard::new(1, 3).unwrap();
        let p = Policy {
            rules: Rules::new(&[], &["192.0.2.66/32".into()]).unwrap(),
            max_conn_rate: 2,
            ..per_ip(5)
        };
        assert_eq!(
            p.admit(&board, k("192.0.2.66"), Holder::Here).err(),
            Some(Refusal::Denied)
        );
        let a = p.admit(&board, k("192.0.2.7"), Holder::Here);
        let b = p.admit(&board, k("192.0.2.7"), Holder::Here);
        let c = p.admit(&board, k("192.0.2.7"), Holder::Here);
        // Within one second, or two if the window turned mid-way.
        assert!(a.is_ok() && b.is_ok());
        if let Err(why) = c {
            assert_eq!(why, Refusal::Rate);
        }
        assert_eq!(
            p.admit_datagram(&board, k("192.0.2.66"), 0),
            Err(Refusal::Denied)
        );
    }

    #[test]
    fn only_trusted_proxies_may_send_a_header() {
        let p = Policy {
            proxy: Some(Trusted::new(&["127.0.0.7/32".into()]).unwrap()),
            ..Policy::default()
        };
        let at = |s: &str| Some(s.parse::<SocketAddr>().unwrap());
        assert_eq!(p.proxy_of(at("127.0.0.7:4000")), Ok(at("127.0.0.7:4000")));
        assert_eq!(p.proxy_of(at("127.0.0.1:4000")), Err(Refusal::Proxy));
        assert_eq!(p.proxy_of(None), Err(Refusal::Proxy));
        assert_eq!(Policy::default().proxy_of(at("127.0.0.1:1")), Ok(None));
    }
}
