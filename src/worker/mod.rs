//! What a child does after fork: the prefork accept loop, or serving the one
//! connection of a fork-mode child.
//!
//! Every child watches the read end of the master's control pipe. The master
//! holds the only write end, so the pipe reports end-of-file when the master
//! closes it (graceful stop: stop accepting, finish the connection in hand)
//! or dies (exit now). A child tells the two apart by its parent pid.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use nix::sys::socket::{getpeername, SockaddrStorage};
use nix::unistd::{getppid, Pid};

use crate::accept::{Acceptor, Incoming, Wake};
use crate::access;
use crate::admission::{self, Holder, Policy, Refusal, Ticket};
use crate::echo::{self, Limits, Progress, Watch};
use crate::listen::Listener;
use crate::proxy;
use crate::relay::{Carried, Inbox, Offer, Outbox};
use crate::scoreboard::{Cut, HandOver, Scoreboard, Slot, State};
use crate::sys::IoBuffer;
use crate::turns::{Turn, Turns};
use crate::vault::Vault;
use std::net::SocketAddr;

pub use crate::children::{EXIT_HANDED_OVER, EXIT_ORPHAN, EXIT_REFUSED, EXIT_SETUP};

/// One buffer per process, reused for every connection.
const BUF_SIZE: usize = 64 * 1024;

/// Bytes echoed above which the buffer is trimmed after the connection: one
/// page, so small echoes cost no extra system call.
const TRIM_ABOVE: u64 = 4096;

/// A client admitted (its address, when known, and its place), or why
/// it was refused.
type Admitted<'a> = Result<(Option<SocketAddr>, Option<Ticket<'a>>), Refusal>;

/// How long a retiring worker that found the relay full serves its
/// connection before it offers it again, at most: a little at random, so
/// that a thousand workers waiting do not all try at once.
const OFFER_AGAIN: Duration = Duration::from_millis(40);

/// A connection in hand: its socket, its client and place, and where it
/// is (a new one's progress starts now; a handed-over one's goes on).
struct InHand<'a> {
    conn: OwnedFd,
    tcp: bool,
    client: Option<SocketAddr>,
    ticket: Option<Ticket<'a>>,
    from: Progress,
}

/// What became of a connection served.
enum Done {
    /// It ended here, after this many bytes echoed (all told).
    Ended(u64),
    /// It went to another process, open (or, with its master gone, it was
    /// put where the next master finds it).
    HandedOver,
}

/// Where a child's open connections go when it lets go of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dest {
    /// To the workers that serve on, through the relay.
    Workers,
    /// Into the vault, for the next master: the master restarts, or died.
    NextMaster,
}

/// What became of a connection offered on.
enum Offered {
    Gone,
    /// No room for it yet: serve it a little, and offer it again.
    Later(OwnedFd),
    /// It cannot go: serve it to its end.
    Stays(OwnedFd),
}

/// What every child needs from the master.
pub struct Ctx<'a> {
    /// The control pipe's read end.
    pub ctl: BorrowedFd<'a>,
    pub master: Pid,
    pub limits: Limits,
    /// Which clients are served (prefork and event: checked here; fork:
    /// by the master, or behind a proxy by the child).
    pub policy: Policy,
    /// A prefork worker's scoreboard slot.
    pub slot: Option<Slot<'a>>,
    /// The scoreboard, where every child counts what it served.
    pub board: &'a Scoreboard,
    /// fork mode behind a proxy with `--max-per-ip`: the child's word in
    /// the scoreboard's fork table, where it publishes its client's place.
    pub fork_slot: Option<usize>,
    /// fork mode: whether the child adds its bytes to the scoreboard
    /// (only for `--metrics`: the shared page costs each child a fault).
    pub count_bytes: bool,
    /// Where a worker tells the master it is ready (one byte).
    pub notice: Option<BorrowedFd<'a>>,
    /// The relay (see relay.rs): where this child hands its connections
    /// over when it retires, and (a pool worker) takes others' from.
    pub relay_tx: Option<Outbox>,
    pub relay_rx: Option<Inbox>,
    /// Under systemd: where its connections wait for the next master when
    /// the master restarts or dies (vault.rs).
    pub vault: Option<Vault>,
    /// `--shutdown-timeout`: how long it may take to let go of them.
    pub shutdown: Duration,
    /// The control pipe ended without the master saying it stops: it
    /// died (see [`Ctx::pipe_ended`]).
    pub orphaned: std::cell::Cell<bool>,
}

impl Ctx<'_> {
    /// Whether the master is gone: it died (the control pipe ended
    /// without a word), or this child has another parent now.
    pub(crate) fn master_gone(&self) -> bool {
        self.orphaned.get() || getppid() != self.master
    }

    /// The control pipe ended: whether that is the master's death. The
    /// master marks a child it tells to stop (its slot, or for fork-mode
    /// children the whole daemon's stop) before it closes the pipe; a
    /// pipe that ends unmarked was closed by the kernel as the master
    /// died. (Its parent pid alone cannot tell: the pipe ends as the
    /// master's descriptors close, before the kernel gives its children
    /// a new parent.)
    pub(crate) fn pipe_ended(&self) -> bool {
        let told = match &self.slot {
            Some(slot) => slot.told(),
            None => self.board.stopping(),
        };
        if !told {
            self.orphaned.set(true);
        }
        self.master_gone()
    }

    /// Publishes a state; wakes the master if spares just ran short.
    pub(crate) fn set(&self, state: State) {
        if self.slot.is_some_and(|slot| slot.set(state)) {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(fd) = self.notice {
            // Non-blocking: a full pipe already holds a wake-up.
            let _ = nix::unistd::write(fd, b"r");
        }
    }

    /// Publishes "ready" and wakes the master, which may be waiting for a
    /// new generation before it retires the old one.
    pub(crate) fn ready(&self) {
        self.set(State::Idle);
        self.wake();
    }

    /// Publishes "ready" as busy and wakes the master: a carrier, which
    /// never waits for a new connection, must never look like an idle
    /// worker (prefork workers taking turns would name it the one that
    /// waits for the listeners, and nobody would). (A carrier is the
    /// event loop: Linux only.)
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub(crate) fn ready_busy(&self) {
        self.set(State::Busy);
        self.wake();
    }

    /// Identifies a new connection's client (see [`identify`]), checks it
    /// and takes its place; a refusal is counted, and the connection is
    /// to be closed unread.
    fn admit(&self, conn: &OwnedFd, tcp: bool) -> Admitted<'_> {
        let client = match identify(conn, tcp, &self.policy) {
            Ok(client) => client,
            Err(why) => {
                unserved_behind_proxy(self.board, why);
                return Err(Refusal::Proxy);
            }
        };
        let admitted = self.admit_client(client).map(|ticket| (client, ticket));
        if let Err(why) = admitted {
            self.board.refused(why);
            refused_client(client, why);
        }
        admitted
    }

    /// Checks a client (at `client`; `None`: nothing to check) and takes
    /// its place, published where this child publishes places (its slot,
    /// or its fork-table word).
    fn admit_client(&self, client: Option<SocketAddr>) -> Result<Option<Ticket<'_>>, Refusal> {
        let Some(client) = client.filter(|_| !self.policy.is_open()) else {
            return Ok(None);
        };
        let holder = match (self.slot, self.fork_slot) {
            (Some(slot), _) => Holder::Slot(slot),
            (None, Some(index)) => Holder::Fork(index),
            (None, None) => Holder::Here,
        };
        self.policy
            .admit(self.board, access::key(client.ip()), holder)
            .map(Some)
    }

    /// Where this child's open connections go when it lets go of them:
    /// with its master gone, to the next master (if there is a vault);
    /// told to stop, as the master said; `None`: they stay to their end.
    pub(crate) fn dest(&self) -> Option<Dest> {
        if self.master_gone() {
            return self.vault.as_ref().map(|_| Dest::NextMaster);
        }
        match self.board.hand_over() {
            HandOver::Finish => None,
            HandOver::ToWorkers => self.relay_tx.as_ref().map(|_| Dest::Workers),
            HandOver::ToNextMaster => self.vault.as_ref().map(|_| Dest::NextMaster),
        }
    }

    /// Offers `conn` on, as [`Ctx::dest`] says, with where it is, its
    /// client and its place (which goes with it to a worker; the next
    /// master counts its clients again).
    fn offer(
        &self,
        conn: OwnedFd,
        tcp: bool,
        client: Option<SocketAddr>,
        ticket: Option<&Ticket<'_>>,
        p: Progress,
    ) -> Offered {
        let mut carried = Carried {
            tcp,
            client,
            place: ticket.and_then(Ticket::place),
            progress: p,
        };
        match (self.dest(), &self.relay_tx) {
            (Some(Dest::Workers), Some(tx)) => match tx.offer(conn.as_fd(), &carried, self.board) {
                Offer::Sent => Offered::Gone,
                Offer::Full(_) => Offered::Later(conn),
                Offer::Failed(e) => {
                    warn!("cannot hand a connection over: {e}; serving it until the end");
                    Offered::Stays(conn)
                }
            },
            (Some(Dest::NextMaster), _) => {
                carried.place = None;
                self.keep_for_next_master(vec![(conn, carried)]);
                Offered::Gone
            }
            _ => Offered::Stays(conn),
        }
    }

    /// Puts `conns` in the vault for the next master; what cannot be put
    /// is closed, counted and logged.
    pub(crate) fn keep_for_next_master(&self, conns: Vec<(OwnedFd, Carried)>) {
        let Some(vault) = &self.vault else { return };
        if conns.is_empty() {
            return;
        }
        if let Err(lost) = vault.put(conns, Instant::now() + self.shutdown) {
            self.board.cut(Cut::Vault, lost.conns as u64);
            error!(
                "cannot keep {} for the next master: {}; closed",
                crate::logging::counted(lost.conns as u64, "connection", "connections"),
                crate::logging::error_text(&std::io::Error::from(lost.why))
            );
        }
    }

    /// With the master gone: what waits in the relay goes to the next
    /// master too (nobody else would take it).
    pub(crate) fn relay_to_next_master(&self, rx: Option<&Inbox>) {
        let Some(rx) = rx.filter(|_| self.vault.is_some()) else {
            return;
        };
        // Nothing counted there (the usual case): a thousand workers
        // leaving at once need not each look.
        if self
            .board
            .relayed()
            .load(std::sync::atomic::Ordering::Acquire)
            == 0
        {
            return;
        }
        self.keep_for_next_master(rx.drain(self.board));
    }

    fn served(&self, bytes: u64) {
        self.board.served(bytes);
        if let Some(slot) = &self.slot {
            slot.served_one();
        }
    }
}

/// Arranges for the kernel to kill this child if the master dies, even while
/// it is blocked; the control pipe covers systems without this. A child
/// with a vault outlives its master instead, long enough to put its
/// connections there for the next one (the control pipe's end tells it).
pub(crate) fn follow_master(ctx: &Ctx<'_>) -> Result<(), i32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if ctx.vault.is_none() {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    }
    // The master may have died before the line above took effect.
    if ctx.master_gone() {
        return Err(EXIT_ORPHAN);
    }
    Ok(())
}

/// A prefork worker: accepts on all `listeners` and serves one connection at
/// a time, until the control pipe closes or `max_requests` (0 = no limit)
/// connections have been served. Returns the exit code.
pub fn prefork(listeners: Vec<Listener>, ctx: Ctx<'_>, max_requests: u64) -> i32 {
    if let Err(code) = follow_master(&ctx) {
        return code;
    }
    let Some(mut buf) = buffer() else { return 1 };
    let mut ctx = ctx;
    let turns = ctx.slot.filter(|_| crate::turns::wanted()).and_then(|slot| {
        Turns::new(slot, ctx.ctl)
            .map_err(|e| warn!("cannot take turns with the other workers: {e}; this one wakes for every connection"))
            .ok()
    });
    let mut acceptor = Acceptor::new(listeners)
        .with_relay(ctx.relay_rx.take())
        .passing_wake_ups(ctx.relay_tx.as_ref().and_then(|tx| tx.try_clone().ok()))
        .polling(turns.is_some());
    let mut served: u64 = 0;
    ctx.ready();
    // After a connection, the next one is often already queued: try to
    // take it straight away and wait only when there is none, so a busy
    // worker makes no wait per connection and an idle one does not spin.
    let mut try_first = false;
    while !acceptor.is_empty() {
        let mut incoming = if try_first {
            acceptor.next(Instant::now(), ctx.board, true)
        } else {
            None
        };
        try_first = false;
        if incoming.is_none() {
            let turn = turns.as_ref().map_or(Ok(Turn::Lead), Turns::wait);
            let woke = turn.and_then(|turn| match turn {
                Turn::Lead => acceptor.wait(ctx.ctl),
                Turn::Stop => Ok(Wake::Stop),
            });
            match woke {
                Ok(Wake::Ready) => incoming = acceptor.next(Instant::now(), ctx.board, true),
                Ok(Wake::Stop) => {
                    ctx.set(State::Stopping);
                    if let Some(t) = &turns {
                        t.pass();
                    }
                    if !ctx.pipe_ended() {
                        return 0;
                    }
                    ctx.relay_to_next_master(acceptor.inbox());
                    return EXIT_ORPHAN;
                }
                Err(e) => {
                    warn!("waiting for connections failed: {e}");
                    return 1;
                }
            }
        }
        let Some(incoming) = incoming else { continue };
        // Taken: the next idle worker waits for the next one.
        if let Some(t) = &turns {
            t.pass();
        }
        try_first = true;
        let holder = ctx.slot.map_or(Holder::Here, Holder::Slot);
        let hand = match incoming {
            Incoming::New(i, conn) => {
                let tcp = acceptor.listeners()[i].is_tcp();
                let proxied = ctx.policy.proxy.is_some() && tcp;
                if proxied {
                    // The header may take a while to come: this worker is taken.
                    ctx.set(State::Busy);
                }
                match ctx.admit(&conn, tcp) {
                    Ok((client, ticket)) => InHand {
                        conn,
                        tcp,
                        client,
                        ticket,
                        from: Progress::new(Instant::now()),
                    },
                    Err(_) => {
                        // Closed at once, unread; the master reports the count.
                        if proxied {
                            ctx.set(State::Idle);
                        }
                        continue;
                    }
                }
            }
            Incoming::Relayed(conn, c) => {
                debug!(
                    "took a connection handed over by another process ({} bytes echoed so far)",
                    c.progress.bytes
                );
                InHand {
                    conn,
                    tcp: c.tcp,
                    client: c.client,
                    ticket: Some(admission::adopt(ctx.board, c.place, holder)),
                    from: c.progress,
                }
            }
        };
        ctx.set(State::Busy);
        if let Some(t) = &turns {
            // Named while it took this connection? Not while it serves it.
            t.pass();
        }
        if let Some(slot) = &ctx.slot {
            slot.set_open(1);
        }
        let done = serve_in_hand(hand, &ctx, &mut buf, &mut acceptor);
        if let Some(slot) = &ctx.slot {
            slot.set_open(0);
        }
        let Done::Ended(bytes) = done else {
            // Handed over: this worker was told to stop, or its master died.
            if !ctx.master_gone() {
                return 0;
            }
            ctx.relay_to_next_master(acceptor.inbox());
            return EXIT_ORPHAN;
        };
        served += 1;
        ctx.served(bytes);
        let retire = max_requests != 0 && served >= max_requests;
        // Say so before the close that lets the client come back: a client
        // that reconnects at once must find this worker idle again, or the
        // pool would count one busy worker too many and grow on it.
        if !acceptor.is_empty() {
            ctx.set(if retire { State::Stopping } else { State::Idle });
        }
        // A connection that wrote past the first page leaves the buffer's
        // pages private to this worker; give them back so that it idles small.
        if bytes > TRIM_ABOVE {
            buf.trim();
        }
        if acceptor.is_empty() {
            break; // told to stop while serving: already marked stopping
        }
        if retire {
            debug!("served {served} connections; exiting to be replaced");
            return 0;
        }
    }
    0
}

/// Serves a connection in hand to its end, or hands it over if this
/// process is told to stop meanwhile and connections are handed over
/// (then at a moment when nothing it read is unsent), or puts it in the
/// vault for the next master if the master restarts or died. While the
/// relay is full it goes on serving, and offers it again shortly, until
/// it is taken (the master kills a worker still at it after
/// `--shutdown-timeout`). Its place is given back, and its socket closed,
/// before this returns, unless it went.
fn serve_in_hand(
    hand: InHand<'_>,
    ctx: &Ctx<'_>,
    buf: &mut IoBuffer,
    acceptor: &mut Acceptor,
) -> Done {
    let InHand {
        mut conn,
        tcp,
        client,
        ticket,
        mut from,
    } = hand;
    let mut may_hand_over = true;
    loop {
        let summary = serve_conn(&conn, tcp, client, ctx, buf, acceptor, from, may_hand_over);
        if !matches!(summary.end, echo::End::HandOver) {
            // Its place first, then the close that lets the client back.
            drop(ticket);
            return Done::Ended(summary.bytes);
        }
        from = summary.progress;
        conn = match ctx.offer(conn, tcp, client, ticket.as_ref(), from) {
            Offered::Gone => {
                if let Some(t) = ticket {
                    t.handed_over();
                }
                return Done::HandedOver;
            }
            Offered::Later(conn) => {
                wait_to_offer_again(&conn);
                conn
            }
            Offered::Stays(conn) => {
                may_hand_over = false;
                conn
            }
        };
    }
}

/// After the relay was found full: waits until the client sends (its
/// bytes are echoed before the next offer) or a short while passes.
fn wait_to_offer_again(conn: &OwnedFd) {
    let jitter = u64::from(std::process::id()) % 20;
    let pause = OFFER_AGAIN / 2 + Duration::from_millis(jitter);
    let mut fds = [nix::poll::PollFd::new(
        conn.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let _ = nix::poll::poll(&mut fds, crate::time::poll_timeout(Some(pause)));
}

/// A fork-mode child: serves `conn` (from where it is, if another process
/// handed it over: `carried`), in `buf` if the master mapped one before
/// forking (then the child neither maps nor unmaps a buffer).
pub fn fork_child(
    conn: OwnedFd,
    tcp: bool,
    carried: Option<Carried>,
    ctx: Ctx<'_>,
    buf: Option<&mut IoBuffer>,
) -> i32 {
    if let Err(code) = follow_master(&ctx) {
        return code;
    }
    let mut own;
    let buf = match buf {
        Some(b) => b,
        None => {
            let Some(b) = buffer() else { return 1 };
            own = b;
            &mut own
        }
    };
    // A refusal is counted here, and the exit code tells the master not
    // to count a connection served. Behind a proxy the master could not
    // check the client: its real address is known only now (without one,
    // the master checked it and this policy is open). A handed-over
    // connection was admitted where it was accepted, and its place is
    // the master's to keep.
    let hand = match carried {
        Some(c) => InHand {
            conn,
            tcp: c.tcp,
            client: c.client,
            ticket: None,
            from: c.progress,
        },
        None => {
            let Ok((client, ticket)) = ctx.admit(&conn, tcp) else {
                return EXIT_REFUSED;
            };
            InHand {
                conn,
                tcp,
                client,
                ticket,
                from: Progress::new(Instant::now()),
            }
        }
    };
    match serve_in_hand(hand, &ctx, buf, &mut Acceptor::new(Vec::new())) {
        Done::Ended(bytes) => {
            // The master counts the connection as it reaps this child.
            if ctx.count_bytes {
                ctx.board.echoed_bytes(bytes);
            }
            0
        }
        Done::HandedOver => EXIT_HANDED_OVER,
    }
}

/// `--inetd`: serves the connection inherited on stdin and returns the exit
/// code. There is no master to watch.
pub fn inetd(conn: OwnedFd, limits: Limits) -> i32 {
    let Some(mut buf) = buffer() else { return 1 };
    let from = Progress::new(Instant::now());
    let summary = echo::serve(
        conn.as_fd(),
        buf.as_mut_slice(),
        &limits,
        from,
        None,
        &mut || Watch::Forget,
    );
    debug!(
        "inetd connection: {} bytes echoed, ended by {}",
        summary.bytes,
        describe(&summary.end)
    );
    0
}

/// Serves one connection from `from`. If the control pipe closes
/// meanwhile and the master is alive, the listeners are closed at once
/// (so new clients are refused, not queued), and the connection is handed
/// back to the caller ([`echo::End::HandOver`]) if it `may_hand_over`
/// and connections are handed over, or else goes on; if the master is
/// gone, it is handed back for the next master where there is a vault,
/// and ends where there is none.
#[allow(clippy::too_many_arguments)]
fn serve_conn(
    conn: &OwnedFd,
    tcp: bool,
    client: Option<SocketAddr>,
    ctx: &Ctx<'_>,
    buf: &mut IoBuffer,
    acceptor: &mut Acceptor,
    from: Progress,
    may_hand_over: bool,
) -> echo::Summary {
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
    if tcp {
        // Elsewhere TCP_NODELAY may not be inherited from the listener.
        let _ = nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::TcpNoDelay, &true);
    }
    let _ = tcp;
    // Only for the debug line; read before serving, as the peer may be gone after.
    let started = log::log_enabled!(log::Level::Debug).then(|| {
        let name = client.map_or_else(|| peer_name(conn, tcp), |a| a.to_string());
        (Instant::now(), name)
    });
    let summary = echo::serve(
        conn.as_fd(),
        buf.as_mut_slice(),
        &ctx.limits,
        from,
        Some(ctx.ctl),
        &mut || {
            if ctx.pipe_ended() {
                // Its listeners close as it exits; the relay it holds
                // goes to the next master after its own connection.
                return if may_hand_over && ctx.dest().is_some() {
                    Watch::HandOver
                } else {
                    Watch::Abort
                };
            }
            acceptor.close();
            ctx.set(State::Stopping);
            if may_hand_over && ctx.dest().is_some() {
                Watch::HandOver
            } else {
                Watch::Forget
            }
        },
    );
    if let Some((started, peer)) = started {
        debug!(
            "connection from {peer}: {} bytes echoed in {:.3} s, ended by {}",
            summary.bytes,
            started.elapsed().as_secs_f64(),
            describe(&summary.end)
        );
    }
    summary
}

/// The client of a new connection, as the per-address checks and the log
/// see it: the peer's address, or, with `--proxy-protocol` on a TCP
/// listener, the one the header from a trusted proxy carries (read here,
/// waiting up to 5 s). `None`: a unix socket client, or no check needs the
/// address. Err: refused for the PROXY protocol, and why.
pub(crate) fn identify(
    conn: &OwnedFd,
    tcp: bool,
    policy: &Policy,
) -> Result<Option<SocketAddr>, &'static str> {
    if !tcp || (policy.is_open() && !log::log_enabled!(log::Level::Debug)) {
        return Ok(None);
    }
    let peer = peer_addr(conn);
    let proxy = match policy.proxy_of(peer) {
        Ok(None) => return Ok(peer),
        Ok(Some(proxy)) => proxy,
        Err(_) => return Err(untrusted(peer)),
    };
    match proxy::Reader::new(Instant::now(), policy.proxy_timeout).read(conn.as_fd())? {
        proxy::Header::Proxied { src, .. } => Ok(Some(src)),
        proxy::Header::Local => Ok(Some(proxy)),
    }
}

/// Why a connection from `peer` is not taken as from a trusted proxy:
/// it is not from one, or it was reset before its address could be read.
pub(crate) fn untrusted(peer: Option<SocketAddr>) -> &'static str {
    match peer {
        Some(_) => "not from a trusted proxy",
        None => proxy::GONE,
    }
}

/// Counts a connection behind a proxy closed without being served, and
/// says why (at debug level, with no address to name yet): a client that
/// went away first, as a balancer's health check does once it has its
/// answer, is abandoned, not refused; anything else is a refusal an
/// operator must act on (`refused_total{reason="proxy"}`).
pub(crate) fn unserved_behind_proxy(board: &Scoreboard, why: &str) {
    if proxy::went_away(why) {
        board.abandoned();
        debug!("PROXY protocol: {why}; not a refusal (a health check, or a client that gave up)");
    } else {
        board.refused(Refusal::Proxy);
        debug!("PROXY protocol: {why}; connection closed");
    }
}

/// Says, at debug level, which client a limit or rule refused.
pub(crate) fn refused_client(client: Option<SocketAddr>, why: Refusal) {
    if let Some(c) = client {
        debug!(
            "connection from {c} refused by {}; closed unread",
            why.name()
        );
    }
}

/// As [`refused_client`], for a connection known by its socket only (its
/// peer is looked up only when the line is logged).
pub(crate) fn refused_peer(conn: &OwnedFd, why: Refusal) {
    if log::log_enabled!(log::Level::Debug) {
        refused_client(peer_addr(conn), why);
    }
}

/// The peer's IP address and port, if it has one.
pub(crate) fn peer_addr(conn: &OwnedFd) -> Option<SocketAddr> {
    access::peer(conn.as_fd())
}

/// A worker's buffer, or `None` after logging why there is none.
pub fn buffer() -> Option<IoBuffer> {
    IoBuffer::new(BUF_SIZE)
        .map_err(|e| error!("cannot map a {BUF_SIZE}-byte buffer: {e}"))
        .ok()
}

/// The client's numeric address (never resolved to a name).
pub(crate) fn peer_name(conn: &OwnedFd, tcp: bool) -> String {
    if !tcp {
        return "a unix socket client".into();
    }
    getpeername::<SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(conn))
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("an unknown peer ({e})"))
}

pub(crate) fn describe(end: &echo::End) -> String {
    match end {
        echo::End::Eof => "the client".into(),
        echo::End::Idle => "idle timeout".into(),
        echo::End::Session => "max-session".into(),
        echo::End::Bytes => "max-bytes".into(),
        echo::End::Aborted => "the master's exit".into(),
        echo::End::HandOver => "a hand-over to another worker".into(),
        echo::End::Failed(e) => format!("error: {}", crate::logging::error_text(e)),
    }
}
