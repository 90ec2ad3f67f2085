//! The event-driven worker, nginx's model: one process, one epoll loop, up
//! to `--worker-connections` connections at once.
//!
//! The listeners are registered with `EPOLLEXCLUSIVE`, as a prefork
//! worker's are, so a new connection wakes one waiting worker; a busy
//! worker is not woken at all, which spreads the load. At the cap the
//! listeners leave the epoll set until a connection closes: new clients
//! wait in the backlog, none is refused. Each connection is an
//! [`echo::Conn`] (the same rules as a prefork worker's echo, as a state
//! machine) in a slab; deadlines (idle, session) sit in a heap, each
//! connection at most once, and are checked again when they come due
//! rather than moved on every byte.
//!
//! The control pipe works as for every child: end-of-file with the master
//! alive means stop accepting and either hand the open connections over
//! to the workers that serve on (a reload, an upgrade, a smaller pool:
//! each as soon as nothing it sent is waiting to go back, through the
//! relay, relay/), or put them in the vault for the next master (a
//! restart under systemd, vault.rs), or, during a stop, finish them (the
//! master kills what is left after `--shutdown-timeout`). Once told, the
//! pipe leaves the epoll set (its end-of-file would wake every wait) and
//! the master's death is looked for twice a second instead. With the
//! master gone, the connections go to the next master where there is a
//! vault, and the worker exits; where there is none, it exits at once.
//! The relay's receiving end is in the epoll set like a listener: a
//! worker with room, connections and descriptors, takes connections
//! others hand over, as it accepts new ones.

mod admit;
mod hand_over;
// io_uring shares memory with the kernel: its buffers and sends.
#[allow(unsafe_code)]
mod ring;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use std::net::SocketAddr;

use crate::accept::Acceptor;
use crate::accept::Incoming;
use crate::admission::{self, Holder, Ticket};
use crate::echo::{Conn, End};
use crate::listen::Listener;
use crate::proxy;
use crate::relay::Carried;
use crate::scoreboard::{Cut, State};
use crate::sys::IoBuffer;
use crate::worker::{self, Ctx, EXIT_ORPHAN};

/// The control pipe's token, then the relay's; listeners count down from
/// just below them, and connections are their slab index.
const CTL: u64 = u64::MAX;
const RELAY: u64 = u64::MAX - 1;
/// How soon a retiring worker tries again when the relay is full.
const RELAY_RETRY: std::time::Duration = std::time::Duration::from_millis(10);
/// How often a worker told to stop looks whether its master died.
const LOOK_FOR_MASTER: std::time::Duration = std::time::Duration::from_millis(500);
/// Descriptors an event worker keeps free besides its connections.
const SPARE_FDS: usize = 16;
/// Connections accepted per wake-up, so that accepting does not starve
/// the connections already open.
const ACCEPT_BATCH: usize = 64;
/// Events taken per `epoll_wait`.
const EVENTS: usize = 256;

/// One open connection and what the loop keeps beside it.
struct Open<'a> {
    conn: Conn,
    /// Distinguishes this connection from a later one in the same slot,
    /// for deadlines left in the heap.
    serial: u64,
    /// Its client's place, once admitted (given back on close).
    ticket: Option<Ticket<'a>>,
    /// Registered for writability (bytes pending) rather than reads.
    writing: bool,
    /// debug: the client's address, for the line logged at the end.
    name: Option<String>,
    /// A TCP connection (not a unix socket's).
    tcp: bool,
    /// Its client, as the PROXY header named it.
    client: Option<SocketAddr>,
    /// Behind a proxy: the header still being read, and the proxy's own
    /// address (the client's for a `LOCAL` header).
    header: Option<(Box<proxy::Reader>, SocketAddr)>,
    /// On io_uring: what it has in flight and waiting to be sent.
    flow: ring::Flow,
}

impl Open<'_> {
    /// debug: the line that says how the connection ended here.
    fn log_end(&self, end: &End) {
        if let Some(peer) = &self.name {
            debug!(
                "connection from {peer}: {} bytes echoed in {:.3} s, ended by {}",
                self.conn.bytes(),
                self.conn.started().elapsed().as_secs_f64(),
                worker::describe(end)
            );
        }
    }
}

struct Loop<'a> {
    ctx: Ctx<'a>,
    epoll: Epoll,
    /// The io_uring engine's ring: the connections' I/O, and the wait
    /// (of which the epoll set is a part). None: epoll serves them.
    ring: Option<Box<ring::Ring>>,
    acceptor: Acceptor,
    /// The listeners are in the epoll set (not at the cap, not paused).
    listening: bool,
    /// io_uring: a listener's poll took a wake-up as it was cancelled
    /// (see `ring_listen`).
    claimed: bool,
    stopping: bool,
    /// Retiring: the open connections go on (see relay/, vault.rs).
    handing_over: bool,
    /// A carrier: it accepts nothing, and exits once nothing is open.
    carrier: bool,
    /// The relay was full: when to try again.
    relay_retry: Option<Instant>,
    /// The control pipe is in the epoll set (until it is told to stop).
    watching_ctl: bool,
    /// Told to stop: when to look again whether the master died.
    look_at: Option<Instant>,
    /// The master died: when to give up what cannot go to the next one.
    gone_by: Option<Instant>,
    /// The connections its descriptors leave room for.
    fd_room: usize,
    /// The relay refuses descriptors (ETOOMANYREFS): warned.
    refs_warned: crate::logging::RateLimit,
    slots: Vec<Option<Open<'a>>>,
    free: Vec<usize>,
    open: usize,
    max_open: usize,
    /// Connections accepted so far, and how many to accept before
    /// retiring (0: no limit).
    accepted: u64,
    max_requests: u64,
    serial: u64,
    deadlines: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// The scoreboard's places table generation last seen.
    places_epoch: u64,
    /// What `publish` said last: open connections, and busy.
    published: (usize, bool),
}

/// An event worker: serves up to `max_open` connections at once from the
/// `listeners`, until told to stop and drained, or (`max_requests`, 0 = no
/// limit) after accepting that many and draining them. Returns the exit
/// code.
pub fn run(
    listeners: Vec<Listener>,
    mut ctx: Ctx<'_>,
    max_open: usize,
    max_requests: u64,
    engine: crate::engine::Engine,
) -> i32 {
    let acceptor = Acceptor::new(listeners).with_relay(ctx.relay_rx.take(), ctx.relay_tx.take());
    let (mut l, mut buf) = match Loop::new(ctx, acceptor, max_open, max_requests, engine) {
        Ok(l) => l,
        Err(code) => return code,
    };
    if let Err(e) = l.listen(true) {
        warn!("cannot watch the listeners: {e}");
        return 1;
    }
    l.ctx.ready();
    l.run(buf.as_mut_slice())
}

/// A carrier (see [`crate::kind::Kind::Carrier`]): takes the connections
/// the vault holds, as many as its descriptors leave room for, puts back
/// what it had no room for and says it is ready (the master hands that to
/// the pool), then serves them as an event worker does, accepting nothing
/// new, and exits when the last one ends. Returns the exit code.
pub fn carry(mut ctx: Ctx<'_>) -> i32 {
    if ctx.vault.is_none() {
        return 1;
    }
    // It takes nothing from the relay; it hands over through it.
    let door = Acceptor::new(Vec::new()).with_relay(None, ctx.relay_tx.take());
    // Short-lived: it serves on epoll whatever the engine.
    let epoll = crate::engine::Engine::Epoll;
    let (mut l, mut buf) = match Loop::new(ctx, door, usize::MAX, 0, epoll) {
        Ok(l) => l,
        Err(code) => return code,
    };
    l.carrier = true;
    let now = Instant::now();
    let mut taken = crate::vault::Unpacked::default();
    let mut carried = 0u64;
    let Some(v) = l.ctx.vault.take() else {
        return 1;
    };
    while l.open < l.fd_room {
        match taken.next(v) {
            Ok(Some((fd, mut c))) => {
                c.place = l.ctx.policy.recount(l.ctx.board, &fd, c.client);
                l.adopt(fd, c, buf.as_mut_slice(), now);
                carried += 1;
            }
            Ok(None) | Err(Errno::EMFILE) => break,
            Err(e) => {
                // The master reads on after it, and says what is wrong.
                warn!("carrier: cannot take connections out of the vault: {e}; leaving them to the master");
                break;
            }
        }
    }
    if let Err(lost) = v.put_back(&mut taken, now + l.ctx.shutdown) {
        l.ctx.board.cut(Cut::Vault, lost.conns as u64);
        warn!(
            "cannot put back in the vault {} this carrier had no room for: {}; closed",
            crate::logging::counted(lost.conns as u64, "connection", "connections"),
            crate::logging::error_text(&std::io::Error::from(lost.why))
        );
    }
    l.ctx.vault = Some(v);
    info!(
        "carrier: serving {} kept across the restart",
        crate::logging::counted(carried, "connection", "connections")
    );
    l.ctx.ready_busy();
    // Busy from here on: publish() only counts what is open.
    l.published = (usize::MAX, true);
    l.run(buf.as_mut_slice())
}

impl<'a> Loop<'a> {
    /// A loop on `acceptor`'s listeners (and relay) for a worker with
    /// `ctx`, its buffer beside it; Err: the exit code.
    fn new(
        ctx: Ctx<'a>,
        acceptor: Acceptor,
        max_open: usize,
        max_requests: u64,
        engine: crate::engine::Engine,
    ) -> Result<(Loop<'a>, IoBuffer), i32> {
        worker::follow_master(&ctx)?;
        let buf = worker::buffer().ok_or(1)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| {
            warn!("cannot create an epoll set: {e}");
            1
        })?;
        if let Err(e) = epoll.add(ctx.ctl, EpollEvent::new(EpollFlags::EPOLLIN, CTL)) {
            warn!("cannot watch the control pipe: {e}");
            return Err(1);
        }
        let places_epoch = ctx.board.places_epoch();
        // Connections its descriptors leave room for: a handed-over one is
        // taken only with one free (the kernel would close it otherwise).
        let (soft, _) = crate::sys::nofile_limit();
        let open_now = crate::sys::open_fds().unwrap_or(64);
        let fd_room = usize::try_from(soft.saturating_sub(open_now))
            .unwrap_or(usize::MAX)
            .saturating_sub(SPARE_FDS);
        let ring = match engine {
            crate::engine::Engine::Epoll => None,
            crate::engine::Engine::Uring => match ring::Ring::new() {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!("cannot set up an io_uring ring: {e}; this worker serves on epoll");
                    None
                }
            },
        };
        let l = Loop {
            ctx,
            epoll,
            ring,
            acceptor,
            listening: false,
            claimed: false,
            stopping: false,
            handing_over: false,
            carrier: false,
            relay_retry: None,
            watching_ctl: true,
            look_at: None,
            gone_by: None,
            fd_room,
            refs_warned: crate::logging::RateLimit::new(crate::logging::REPORT_EVERY),
            slots: Vec::new(),
            free: Vec::new(),
            open: 0,
            max_open: max_open.max(1),
            accepted: 0,
            max_requests,
            serial: 0,
            deadlines: BinaryHeap::new(),
            places_epoch,
            published: (usize::MAX, false),
        };
        Ok((l, buf))
    }

    fn run(&mut self, buf: &mut [u8]) -> i32 {
        let mut events = [EpollEvent::empty(); EVENTS];
        loop {
            let now = Instant::now();
            let next = [
                self.deadlines.peek().map(|Reverse((t, _, _))| *t),
                self.acceptor.paused_until(now),
                self.relay_retry,
                self.look_at,
                self.gone_by,
            ];
            let timeout = next
                .iter()
                .flatten()
                .min()
                .map(|t| t.saturating_duration_since(now));
            let n = if self.ring.is_some() {
                match self.ring_wait(&mut events, timeout) {
                    Ok(n) => n,
                    Err(e) => {
                        warn!("io_uring_enter failed: {e}");
                        return 1;
                    }
                }
            } else {
                match self
                    .epoll
                    .wait(&mut events, crate::time::poll_timeout(timeout))
                {
                    Ok(n) => n,
                    Err(Errno::EINTR) => 0,
                    Err(e) => {
                        warn!("epoll_wait failed: {e}");
                        return 1;
                    }
                }
            };
            let now = Instant::now();
            let mut accept = false;
            let mut told = false;
            if self.look_at.is_some_and(|t| now >= t) {
                self.look_at = Some(now + LOOK_FOR_MASTER);
                told = self.ctx.master_gone();
            }
            for ev in &events[..n] {
                match ev.data() {
                    CTL => {
                        // Marks the master's death, if that is what it is.
                        self.ctx.pipe_ended();
                        told = true;
                    }
                    RELAY => {
                        self.acceptor.relay_woke();
                        accept = true;
                    }
                    t if t as usize >= self.slots.len() => accept = true,
                    t => self.ready(t as usize, buf, now),
                }
            }
            accept |= self.completions(buf, now);
            self.expire(now);
            // A wake-up for a connection is this worker's alone
            // (EPOLLEXCLUSIVE): take it even if a stop came with it, as a
            // prefork worker does, or nobody else may be woken for it.
            if accept {
                self.accept(buf, now);
            }
            if told {
                if self.ctx.master_gone() && self.ctx.vault.is_none() {
                    return EXIT_ORPHAN;
                }
                self.stop(now);
            }
            if self.handing_over {
                self.hand_over(now);
            }
            self.recount_places();
            if let Some(code) = self.done(now) {
                return code;
            }
            // Last, after everything that may have freed room (a client's
            // close, a deadline, a refusal) or ended a pause: whichever
            // path it was, accepting resumes here.
            self.arm(now);
            self.publish();
        }
    }

    /// Puts the listeners in the epoll set while there is room and
    /// accepting is not paused, and takes them out otherwise. A listener
    /// put back with clients waiting is reported by the next wait. If
    /// the set cannot take them (out of memory), accepting pauses, so
    /// that the loop wakes to try again rather than sleep without them.
    fn arm(&mut self, now: Instant) {
        let room = !self.stopping && self.open < self.max_open;
        let paused = self.acceptor.paused_until(now).is_some();
        if let Err(e) = self.listen(room && !paused) {
            warn!("cannot watch the listeners: {e}; retrying shortly");
            self.acceptor.pause_for_a_while(now);
        }
    }

    /// Puts the listeners in the epoll set, or takes them out; a listener
    /// a stopping worker closed is in no set any more. A listener already
    /// there (or already gone) after a partial failure counts as done.
    fn listen(&mut self, on: bool) -> nix::Result<()> {
        if self.ring.is_some() {
            // The ring polls each of them, once per wake-up.
            self.ring_listen(on);
            self.listening = on;
            return Ok(());
        }
        if on == self.listening {
            return Ok(());
        }
        let relay = self.acceptor.relay().map(|rx| (RELAY, rx));
        let streams = self
            .acceptor
            .streams()
            .map(|(i, l)| (CTL - 2 - i as u64, l.as_fd()));
        for (token, fd) in relay.into_iter().chain(streams) {
            let done = if on {
                let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
                self.epoll.add(fd, EpollEvent::new(flags, token))
            } else {
                self.epoll.delete(fd)
            };
            match done {
                Ok(()) | Err(Errno::EEXIST | Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        self.listening = on;
        Ok(())
    }

    /// Told to stop (or retiring), or the master died: accept no more,
    /// close the listeners so new clients go to the new generation or are
    /// refused, take nothing more from the relay, and let the open
    /// connections go on if they go anywhere ([`Ctx::dest`]), or finish
    /// them.
    fn stop(&mut self, now: Instant) {
        if !self.stopping {
            let _ = self.listen(false);
            if std::mem::take(&mut self.claimed) {
                // A connection woke this worker alone: it takes it (and
                // hands it over with the others), or nobody is woken.
                self.accept(&mut [], now);
            }
            self.acceptor.close();
            self.stopping = true;
            self.ctx.set(State::Stopping);
        }
        if self.watching_ctl {
            let _ = self.epoll.delete(self.ctx.ctl);
            self.watching_ctl = false;
            self.look_at = Some(now + LOOK_FOR_MASTER);
        }
        if self.ctx.master_gone() && self.gone_by.is_none() {
            self.gone_by = Some(crate::time::after(now, self.ctx.shutdown));
        }
        self.handing_over = self.ctx.dest(&self.acceptor).is_some();
    }

    /// Whether to exit now, and with what: stopping with nothing open;
    /// or, the master gone, once what is open went to the next one, or
    /// `--shutdown-timeout` after (what is left then is cut).
    fn done(&mut self, now: Instant) -> Option<i32> {
        if !self.stopping {
            return (self.carrier && self.open == 0).then_some(0);
        }
        let Some(gone_by) = self.gone_by else {
            return (self.open == 0).then_some(0);
        };
        if self.open > 0 && now < gone_by {
            return None;
        }
        if self.open > 0 {
            self.ctx.board.cut(Cut::Timeout, self.open as u64);
            warn!(
                "the master is gone and {} could not be put where the next one finds them within {} s; closed",
                crate::logging::counted(self.open as u64, "connection", "connections"),
                self.ctx.shutdown.as_secs()
            );
        }
        self.ctx.relay_to_next_master(&self.acceptor);
        Some(EXIT_ORPHAN)
    }

    /// Serves a connection whose socket is ready.
    fn ready(&mut self, index: usize, buf: &mut [u8], now: Instant) {
        if !self.header(index) {
            return;
        }
        let limits = self.ctx.limits;
        let Some(Some(o)) = self.slots.get_mut(index) else {
            return;
        };
        match o.conn.step(buf, &limits, now) {
            Some(end) => self.close(index, end),
            None if o.conn.wants_write() != o.writing => {
                o.writing = !o.writing;
                let flags = if o.writing {
                    EpollFlags::EPOLLOUT
                } else {
                    EpollFlags::EPOLLIN
                };
                let mut ev = EpollEvent::new(flags, index as u64);
                if let Err(e) = self.epoll.modify(o.conn.fd(), &mut ev) {
                    self.close(index, End::Failed(e.into()));
                }
            }
            None => {}
        }
    }

    fn close(&mut self, index: usize, end: End) {
        let Some(mut o) = self.slots.get_mut(index).and_then(Option::take) else {
            return;
        };
        if let Some(r) = self.ring.as_deref_mut() {
            r.forget(&mut o.flow, index, o.serial);
        }
        self.free.push(index);
        self.open -= 1;
        self.ctx.board.served(o.conn.bytes());
        if let Some(slot) = self.ctx.slot {
            slot.served_one();
        }
        o.log_end(&end);
        // Dropping the connection closes it, which also takes it out of
        // the epoll set; dropping its ticket gives its place back.
    }

    /// Closes the connections whose idle or session limit ran out; moves
    /// on the others' deadlines, which progress pushed back.
    fn expire(&mut self, now: Instant) {
        let limits = self.ctx.limits;
        while let Some(&Reverse((t, index, serial))) = self.deadlines.peek() {
            if t > now {
                break;
            }
            self.deadlines.pop();
            let Some(Some(o)) = self.slots.get(index) else {
                continue;
            };
            if o.serial != serial {
                continue; // the connection it was for is gone
            }
            if o.header.as_ref().is_some_and(|(r, _)| now >= r.deadline) {
                self.unserved(index, proxy::LATE);
                continue;
            }
            match o.conn.expired(&limits, now) {
                Some(end) => self.close(index, end),
                None => {
                    if let Some(t) = o.conn.deadline(&limits) {
                        self.deadlines.push(Reverse((t, index, serial)));
                    }
                }
            }
        }
    }

    /// After a worker died holding places, the master emptied the places
    /// table: count this worker's in again.
    fn recount_places(&mut self) {
        let board = self.ctx.board;
        let epoch = board.places_epoch();
        if epoch != self.places_epoch {
            self.places_epoch = epoch;
            let held = self.slots.iter().flatten();
            for place in held.filter_map(|o| o.ticket.as_ref()?.place()) {
                board.recount_place(place);
            }
        }
    }

    /// Publishes the open count, and busy or idle, in the scoreboard,
    /// when they changed.
    fn publish(&mut self) {
        let now = (self.open, self.open > 0);
        if now == self.published {
            return;
        }
        if let Some(slot) = self.ctx.slot {
            slot.set_open(self.open);
            if !self.stopping && now.1 != self.published.1 {
                self.ctx.set(if now.1 { State::Busy } else { State::Idle });
            }
        }
        self.published = now;
    }
}
