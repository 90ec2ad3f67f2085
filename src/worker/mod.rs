//! What a child does after fork: the prefork accept loop, or serving the one
//! connection of a fork-mode child.
//!
//! Every child watches the read end of a control pipe that reports
//! end-of-file when the master tells it to stop (graceful stop: stop
//! accepting, finish the connection in hand) or dies (exit now). A pool
//! worker on Linux makes its own pipe, which the master's signal (or the
//! kernel's, at the master's death) closes (sys/told.rs); elsewhere, and for
//! fork-mode children, the master holds the only write end. A child tells
//! the two apart by its slot's mark and its parent pid.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use log::{debug, error, warn};
use nix::sys::socket::{getpeername, SockaddrStorage};

use crate::accept::{Acceptor, Incoming, Wake};
use crate::admission::{self, Holder, Ticket};
use crate::echo::{self, Limits, Progress, Watch};
use crate::listen::Listener;
use crate::relay::Carried;
use crate::scoreboard::State;
use crate::sys::IoBuffer;
use crate::turns::{Turn, Turns};
use std::net::SocketAddr;

pub use crate::children::{
    EXIT_CANNOT_ACCEPT, EXIT_HANDED_OVER, EXIT_ORPHAN, EXIT_REFUSED, EXIT_SETUP, EXIT_UNUSED,
};

/// One buffer per process, reused for every connection.
const BUF_SIZE: usize = 64 * 1024;

/// Bytes echoed above which the buffer is trimmed after the connection: one
/// page, so small echoes cost no extra system call.
const TRIM_ABOVE: u64 = 4096;

/// A client admitted: its address, when known, and its place.
type Admitted<'a> = (Option<SocketAddr>, Option<Ticket<'a>>);

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

mod ctx;

pub(crate) use ctx::follow_master;
pub use ctx::Ctx;
use ctx::Offered;
// The event loop's (epoll: Linux only).
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) use ctx::Dest;

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
        .with_relay(ctx.relay_rx.take(), ctx.relay_tx.take())
        .passing_wake_ups(true)
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
                    ctx.relay_to_next_master(&acceptor);
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
                    Some((client, ticket)) => InHand {
                        conn,
                        tcp,
                        client,
                        ticket,
                        from: Progress::new(Instant::now()),
                    },
                    None => {
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
        acceptor.step_back();
        let done = serve_in_hand(hand, &ctx, &mut buf, &mut acceptor);
        if let Some(slot) = &ctx.slot {
            slot.set_open(0);
        }
        let Done::Ended(bytes) = done else {
            // Handed over: this worker was told to stop, or its master died.
            if !ctx.master_gone() {
                return 0;
            }
            ctx.relay_to_next_master(&acceptor);
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
        conn = match ctx.offer(acceptor, conn, tcp, client, ticket.as_ref(), from) {
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

/// A fork-mode child: serves `conn`, `accepted` by the master (from where
/// it is, if another process handed it over: `carried`), in `buf` if the master mapped one before
/// forking (then the child neither maps nor unmaps a buffer).
pub fn fork_child(
    conn: OwnedFd,
    tcp: bool,
    carried: Option<Carried>,
    accepted: Instant,
    ctx: Ctx<'_>,
    buf: Option<&mut IoBuffer>,
) -> i32 {
    // Every wait of a child that reads no PROXY header watches the
    // control pipe (echo.rs polls the connection and the pipe, never
    // blocks elsewhere), which ends as the master dies: it follows its
    // master without prctl and getppid. Behind a proxy the header is
    // awaited on the connection alone, so there the kernel kills it.
    if ctx.policy.proxy.is_some() && carried.is_none() {
        if let Err(code) = follow_master(&ctx) {
            return code;
        }
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
            let Some((client, ticket)) = ctx.admit(&conn, tcp) else {
                return EXIT_REFUSED;
            };
            InHand {
                conn,
                tcp,
                client,
                ticket,
                // The master's clock, read as it accepted: a short
                // connection's child reads none (see echo.rs).
                from: Progress::new(accepted),
            }
        }
    };
    let mut door = Acceptor::new(Vec::new());
    let done = serve_in_hand(hand, &ctx, buf, &mut door);
    // It holds no descriptor (this child has no listener and offers on
    // the context's relay): not dropped, as the child's code otherwise
    // faults in a page of destructors for nothing on every connection.
    std::mem::forget(door);
    match done {
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

/// The listeners a fork-mode child forked to accept takes its connection
/// from, by number, and whether each is TCP: in place for a few (a child
/// that allocates writes the allocator's pages, copied from the master).
pub struct Doors {
    few: [(RawFd, bool); Doors::FEW],
    n: usize,
    many: Vec<(RawFd, bool)>,
}

impl Doors {
    const FEW: usize = 4;

    /// The listeners `all` lists.
    pub fn new(all: impl Iterator<Item = (RawFd, bool)>) -> Doors {
        let mut d = Doors {
            few: [(-1, false); Doors::FEW],
            n: 0,
            many: Vec::new(),
        };
        for door in all {
            match d.few.get_mut(d.n) {
                Some(slot) if d.many.is_empty() => {
                    *slot = door;
                    d.n += 1;
                }
                _ => {
                    if d.many.is_empty() {
                        d.many.extend_from_slice(&d.few[..d.n]);
                    }
                    d.many.push(door);
                }
            }
        }
        d
    }

    fn all(&self) -> &[(RawFd, bool)] {
        match self.many.is_empty() {
            true => &self.few[..self.n],
            false => &self.many,
        }
    }

    /// Closes them all: a child serving its connection holds no listener.
    fn close(&self) {
        for &(fd, _) in self.all() {
            // Known by number only: this is its one close here.
            let _ = nix::unistd::close(fd);
        }
    }
}

/// A fork-mode child forked to accept (the master never holds a client's
/// connection, so none is lost should it die), `forked` then: takes one
/// connection from the first of `doors` that has one, from `start` on in
/// rotation; says
/// so in its word of the fork table and wakes the master, which forks
/// the next; closes the listeners and serves it as [`fork_child`] does.
/// [`EXIT_UNUSED`] when none waits; [`EXIT_CANNOT_ACCEPT`] when out of a
/// resource (logged, rate-limited across children; the master pauses).
pub fn fork_acceptor(
    doors: &Doors,
    start: usize,
    forked: Instant,
    ctx: Ctx<'_>,
    buf: Option<&mut IoBuffer>,
) -> i32 {
    let all = doors.all();
    let mut taken = None;
    for k in 0..all.len() {
        let (fd, tcp) = all[(start + k) % all.len()];
        match crate::sys::accept_numbered(fd) {
            Ok(conn) => {
                taken = Some((conn, tcp));
                break;
            }
            Err(e) => match crate::accept::classify(&e) {
                crate::accept::Failure::Empty | crate::accept::Failure::Transient => {}
                crate::accept::Failure::Resource => {
                    if let Some(more) = ctx.board.setup_failure_report(crate::logging::REPORT_EVERY)
                    {
                        warn!(
                            "cannot accept a connection: {}; pausing ({more} more failures since the last report)",
                            crate::logging::error_text(&e)
                        );
                    }
                    return EXIT_CANNOT_ACCEPT;
                }
            },
        }
    }
    let Some((conn, tcp)) = taken else {
        return EXIT_UNUSED;
    };
    let mut ctx = ctx;
    ctx.took_one();
    // Serving, it holds its connection and its control pipe, no more.
    doors.close();
    if let Some(fd) = ctx.notice.take() {
        let _ = nix::unistd::close(fd.as_raw_fd());
    }
    // The master's clock as it forked this child for a waiting connection,
    // microseconds ago: the child reads none (a clock read is a page
    // fault in a new process).
    fork_child(conn, tcp, None, forked, ctx, buf)
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
        false,
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
                return if may_hand_over && ctx.dest(acceptor).is_some() {
                    Watch::HandOver
                } else {
                    Watch::Abort
                };
            }
            acceptor.close();
            ctx.set(State::Stopping);
            if may_hand_over && ctx.dest(acceptor).is_some() {
                Watch::HandOver
            } else if follow_master(ctx).is_err() {
                // Gone meanwhile.
                Watch::Abort
            } else {
                // The pipe is no longer watched: from now on the kernel
                // ends it with its master (a fork-mode child did not ask
                // before).
                Watch::Forget
            }
        },
        ctx.blocking_reads,
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
