//! Accepting connections, in one place for every process that does it
//! (prefork and event workers, the fork-mode master, the metrics worker):
//! a fair rotation over the listeners, which accept errors are transient,
//! the pause after a resource error (EMFILE returns at once, forever:
//! retrying at once would spin), its rate-limited report, and a worker's
//! wait for a connection.
//!
//! The wait wakes one process per connection, whatever the pool size. On
//! Linux each worker has its own epoll instance in which every listener is
//! registered with `EPOLLEXCLUSIVE` (nginx's answer to the thundering
//! herd), so a new connection wakes one waiting worker instead of all of
//! them. Elsewhere idle prefork workers take turns (turns.rs): only the
//! one whose turn it is polls the listeners.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use log::warn;

use crate::listen::{Listener, Service};
use crate::logging::{RateLimit, REPORT_EVERY};
use crate::relay::{Carried, Inbox, Offer, Outbox};
use crate::scoreboard::Scoreboard;

/// How long accepting pauses after a resource error (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM), like OpenBSD's inetd and identd.
pub const PAUSE: Duration = Duration::from_millis(500);

/// What an accept error means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Nothing is waiting on this listener now.
    Empty,
    /// The client went away before it was accepted, or a signal came:
    /// try the next one at once.
    Transient,
    /// Out of a resource: pause accepting.
    Resource,
}

/// Classifies an accept error.
pub fn classify(e: &io::Error) -> Failure {
    match e.raw_os_error() {
        Some(libc::EAGAIN) => Failure::Empty,
        // Linux passes a pending network error of the new connection to
        // accept (accept(2): "treat them like EAGAIN by retrying"), and
        // EPERM when a firewall rule refuses it.
        Some(
            libc::ECONNABORTED
            | libc::EINTR
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => Failure::Transient,
        _ => Failure::Resource,
    }
}

/// Why [`Acceptor::wait`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// A connection may be waiting (or a pause ended): try to accept.
    Ready,
    /// The watched fd became readable: the master said stop, or died.
    Stop,
}

/// A connection to serve: a new one, from the listener at this index, or
/// one handed over by a worker that retired (see relay/).
pub enum Incoming {
    New(usize, OwnedFd),
    Relayed(OwnedFd, Carried),
}

/// The listeners one process accepts from, and its accept state.
pub struct Acceptor {
    listeners: Vec<Listener>,
    /// The relay's receiving end, for a worker that serves connections
    /// other workers hand over; set aside with the listeners' close.
    relay: Option<Inbox>,
    /// The receiving end once this process takes no more: only to empty
    /// it into the vault, should the master die.
    relay_kept: Option<Inbox>,
    /// A prefork worker: a wake-up for the relay that came with a
    /// listener's is passed on (see [`Acceptor::passing_wake_ups`]).
    passes_wake_ups: bool,
    /// A listener woke this process (its wait says which): the wake-up
    /// was for this process alone, so it accepts before anything else.
    listener_woke: bool,
    /// The relay's sending end: where this process hands its connections
    /// over, and passes on a wake-up it cannot take.
    relay_tx: Option<Outbox>,

    /// Which of them it accepts from (the fork-mode master holds all).
    service: Service,
    /// Where the next fair scan starts: after the listener served last.
    next: usize,
    paused_until: Option<Instant>,
    errors: RateLimit,
    /// Poll the listeners even where epoll could wait (a worker taking
    /// turns, of which one waits at a time).
    polling: bool,
    #[cfg(any(target_os = "linux", target_os = "android"))]
    epoll: Option<nix::sys::epoll::Epoll>,
    /// The listeners and the relay are in `epoll` (else only the watched
    /// fd is: the worker stepped back to serve, see [`Acceptor::step_back`]).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    standing: bool,
}

/// The epoll token of the watched fd, and of the relay; listeners are
/// their index.
#[cfg(any(target_os = "linux", target_os = "android"))]
const WATCHED: u64 = u64::MAX;
#[cfg(any(target_os = "linux", target_os = "android"))]
const RELAY: u64 = u64::MAX - 1;

impl Acceptor {
    /// Accepts echo connections from `listeners`.
    pub fn new(listeners: Vec<Listener>) -> Acceptor {
        Acceptor::serving(Service::Echo, listeners)
    }

    /// Accepts connections from those of `listeners` for `service`.
    pub fn serving(service: Service, listeners: Vec<Listener>) -> Acceptor {
        Acceptor {
            listeners,
            relay: None,
            relay_kept: None,
            passes_wake_ups: false,
            listener_woke: false,
            relay_tx: None,
            service,
            next: 0,
            paused_until: None,
            errors: RateLimit::new(REPORT_EVERY),
            polling: false,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            epoll: None,
            #[cfg(any(target_os = "linux", target_os = "android"))]
            standing: false,
        }
    }

    /// Takes connections from the relay's receiving end `rx` too, and
    /// hands this process's over through `tx` (relay/): accept.rs is a
    /// process's one door onto the relay, both ways.
    pub fn with_relay(mut self, rx: Option<Inbox>, tx: Option<Outbox>) -> Acceptor {
        self.relay = rx;
        self.relay_tx = tx;
        self
    }

    /// A prefork worker, which serves one connection at a time: woken by
    /// a listener and the relay at once, it takes the new connection (a
    /// listener's wake-up goes to one waiting process and does not come
    /// again) and passes the relay's wake-up on by sending one handed-over
    /// connection back, which wakes another idle worker.
    pub fn passing_wake_ups(mut self, on: bool) -> Acceptor {
        self.passes_wake_ups = on;
        self
    }

    /// Waits with `poll` wherever it runs (see [`Acceptor::polling`]).
    pub fn polling(mut self, on: bool) -> Acceptor {
        self.polling = on;
        self
    }

    /// The relay's receiving end, while this process takes from it.
    // The event worker's (epoll: Linux only), as is `relay_woke`.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub fn relay(&self) -> Option<BorrowedFd<'_>> {
        self.relay.as_ref().map(|fd| fd.as_fd())
    }

    /// Whether this process can hand its connections over (it has the
    /// relay's sending end).
    pub fn hands_over(&self) -> bool {
        self.relay_tx.is_some()
    }

    /// Offers `conn` to the workers that serve on, with what it carries;
    /// `None`: this process has no relay.
    pub fn hand_over(
        &self,
        conn: BorrowedFd<'_>,
        carried: &Carried,
        board: &Scoreboard,
    ) -> Option<Offer> {
        Some(self.relay_tx.as_ref()?.offer(conn, carried, board))
    }

    /// Everything waiting in the relay, places given back (the master is
    /// gone: it goes to the next one). Nothing counted there (the usual
    /// case): a thousand workers leaving at once need not each look.
    pub fn drain_relay(&self, board: &Scoreboard) -> Vec<(OwnedFd, Carried)> {
        let rx = self.relay.as_ref().or(self.relay_kept.as_ref());
        match rx {
            Some(rx) if board.relayed().load(std::sync::atomic::Ordering::Acquire) > 0 => {
                rx.drain(board)
            }
            _ => Vec::new(),
        }
    }

    /// The listeners.
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The listeners, to change.
    pub fn listeners_mut(&mut self) -> &mut [Listener] {
        &mut self.listeners
    }

    /// The listeners connections are accepted from, with their index.
    pub fn streams(&self) -> impl Iterator<Item = (usize, &Listener)> + '_ {
        self.listeners
            .iter()
            .enumerate()
            .filter(|(_, l)| self.takes(l))
    }

    fn takes(&self, l: &Listener) -> bool {
        l.service() == self.service
    }

    /// Takes the listeners out (the acceptor is left with none).
    pub fn take(&mut self) -> Vec<Listener> {
        self.drop_waiter();
        std::mem::take(&mut self.listeners)
    }

    /// Puts back listeners [`Acceptor::take`] took out (a fork-mode child
    /// forked to accept, where descriptors are closed one by one).
    pub fn put_back(&mut self, listeners: Vec<Listener>) {
        self.listeners = listeners;
    }

    /// Closes every listener, and stops taking from the relay (its end is
    /// kept, to be emptied should the master die): this process accepts
    /// no more.
    pub fn close(&mut self) {
        self.drop_waiter();
        self.listeners.clear();
        if let Some(rx) = self.relay.take() {
            self.relay_kept = Some(rx);
        }
    }

    /// The next connection to serve: one handed over first (its client
    /// has been waiting; only with `room` for its descriptor), else a new
    /// one (see [`Acceptor::accept`]).
    pub fn next(&mut self, now: Instant, board: &Scoreboard, room: bool) -> Option<Incoming> {
        if std::mem::take(&mut self.listener_woke) && self.passes_wake_ups {
            if let Some((i, fd)) = self.accept(now) {
                if let (Some(rx), Some(tx)) = (&mut self.relay, &self.relay_tx) {
                    if rx.take_woke() {
                        rx.pass_on(tx, board);
                    }
                }
                return Some(Incoming::New(i, fd));
            }
        }
        if let Some((fd, carried)) = self.relay.as_mut().and_then(|rx| rx.take(board, || room)) {
            return Some(Incoming::Relayed(fd, carried));
        }
        self.accept(now).map(|(i, fd)| Incoming::New(i, fd))
    }

    /// A wake-up of the relay that this process took but cannot act on
    /// (at its cap, or stopping): one connection is taken and offered
    /// again, which wakes another worker for what waits.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub fn pass_on_relay(&mut self, board: &Scoreboard) {
        let rx = self.relay.as_mut().or(self.relay_kept.as_mut());
        if let (Some(rx), Some(tx)) = (rx, &self.relay_tx) {
            rx.pass_on(tx, board);
        }
    }

    /// The relay is readable (the caller's own wait said so).
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub fn relay_woke(&mut self) {
        if let Some(rx) = &mut self.relay {
            rx.woke();
        }
    }

    /// Whether there is no listener left.
    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
    }

    /// A worker about to serve the connection it took leaves the
    /// listeners' and the relay's queues of waiters until it waits again.
    /// Registered, it stays in them while it serves, and every new
    /// connection and every hand-over walks past each busy worker before
    /// it finds one waiting (`EPOLLEXCLUSIVE` wakes the first waiter, and
    /// a worker that registered earlier comes first): at 4,000 busy
    /// workers a reload's 4,000 hand-overs walked 32 million entries with
    /// interrupts off, and stalled the machine for seconds. Two
    /// `epoll_ctl` now and two when it is idle again, per connection.
    pub fn step_back(&mut self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            let Some(ep) = self.epoll.as_ref().filter(|_| self.standing) else {
                return;
            };
            let mut left = true;
            for (_, l) in self.streams() {
                left &= ep.delete(l.as_fd()).is_ok();
            }
            if let Some(rx) = &self.relay {
                left &= ep.delete(rx.as_fd()).is_ok();
            }
            self.standing = false;
            if !left {
                // Made again, whole, at the next wait.
                self.epoll = None;
            }
        }
    }

    /// Registers the listeners and the relay in `ep` (each wakes one
    /// waiting worker).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn stand(&self, ep: &nix::sys::epoll::Epoll) -> nix::Result<()> {
        use nix::sys::epoll::{EpollEvent, EpollFlags};
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLEXCLUSIVE;
        for (i, l) in self.streams() {
            ep.add(l.as_fd(), EpollEvent::new(flags, i as u64))?;
        }
        // A handed-over connection wakes one idle worker too.
        if let Some(rx) = &self.relay {
            ep.add(rx.as_fd(), EpollEvent::new(flags, RELAY))?;
        }
        Ok(())
    }

    fn drop_waiter(&mut self) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        {
            self.epoll = None;
        }
    }

    /// Until when accepting is paused after a resource error, if it is.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.paused_until.filter(|&t| t > now)
    }

    /// Accepts one connection from the first listener, in fair rotation,
    /// that has one. `None`: none waits, or accepting is paused (after a
    /// resource error, which this logs, rate-limited, and pauses for).
    pub fn accept(&mut self, now: Instant) -> Option<(usize, OwnedFd)> {
        if self.paused_until(now).is_some() {
            return None;
        }
        self.paused_until = None;
        let n = self.listeners.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if !self.takes(&self.listeners[i]) {
                continue;
            }
            match self.listeners[i].accept() {
                Ok(conn) => {
                    self.next = i + 1;
                    return Some((i, conn));
                }
                Err(e) => match classify(&e) {
                    Failure::Empty | Failure::Transient => {}
                    Failure::Resource => {
                        self.pause(now, Some(i), &e);
                        return None;
                    }
                },
            }
        }
        None
    }

    /// Pauses accepting for [`PAUSE`] (the caller ran out of something
    /// it needs for each connection: the fork-mode master when fork fails).
    pub fn pause_for_a_while(&mut self, now: Instant) {
        self.paused_until = Some(now + PAUSE);
    }

    /// Pauses accepting after a resource error, on listener `i` or (None)
    /// while setting up the wait; logged rate-limited.
    fn pause(&mut self, now: Instant, i: Option<usize>, e: &io::Error) {
        self.paused_until = Some(now + PAUSE);
        if let Some(more) = self.errors.hit(now) {
            let what = match i {
                Some(i) => format!("accept on {}", self.listeners[i].name()),
                None => "waiting for connections".into(),
            };
            warn!(
                "{what} failed: {}; pausing {} ms ({more} more since the last report)",
                crate::logging::error_text(e),
                PAUSE.as_millis()
            );
        }
    }

    /// Sleeps until a connection may be accepted, or `watched` (the
    /// master's control pipe) becomes readable. While paused it watches
    /// only `watched`, until the pause ends.
    pub fn wait(&mut self, watched: BorrowedFd<'_>) -> io::Result<Wake> {
        if let Some(until) = self.paused_until {
            let left = until.saturating_duration_since(Instant::now());
            let mut fds = [nix::poll::PollFd::new(
                watched,
                nix::poll::PollFlags::POLLIN,
            )];
            return match nix::poll::poll(&mut fds, crate::time::poll_timeout(Some(left))) {
                Ok(n) if n > 0 => Ok(Wake::Stop),
                Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(Wake::Ready),
                Err(e) => Err(e.into()),
            };
        }
        self.wait_listeners(watched)
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn wait_listeners(&mut self, watched: BorrowedFd<'_>) -> io::Result<Wake> {
        if self.polling {
            return self.poll_listeners(watched);
        }
        use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
        if let Some(ep) = self.epoll.as_ref().filter(|_| !self.standing) {
            match self.stand(ep) {
                Ok(()) => self.standing = true,
                // Made again, whole, below.
                Err(_) => self.epoll = None,
            }
        }
        if self.epoll.is_none() {
            let made = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).and_then(|ep| {
                ep.add(watched, EpollEvent::new(EpollFlags::EPOLLIN, WATCHED))?;
                self.stand(&ep)?;
                Ok(ep)
            });
            match made {
                Ok(ep) => {
                    self.epoll = Some(ep);
                    self.standing = true;
                }
                // Out of descriptors or memory (EMFILE, ENOMEM...): pause
                // as after a failed accept, and try again, rather than exit.
                Err(e) => {
                    let e = io::Error::from(e);
                    if classify(&e) != Failure::Resource {
                        return Err(e);
                    }
                    self.pause(Instant::now(), None, &e);
                    return Ok(Wake::Ready);
                }
            }
        }
        let Some(ep) = &self.epoll else {
            return Ok(Wake::Ready);
        };
        let mut events = [EpollEvent::empty(); 8];
        let n = match ep.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => return Ok(Wake::Ready),
            Err(e) => return Err(e.into()),
        };
        // A wake-up for a connection is this process's alone: take it
        // even if a stop came with it, or nobody else may be woken for it.
        let stop = events[..n].iter().any(|e| e.data() == WATCHED);
        let conn = events[..n].iter().any(|e| e.data() != WATCHED);
        if events[..n].iter().any(|e| e.data() == RELAY) {
            self.relay_woke();
        }
        self.listener_woke = events[..n]
            .iter()
            .any(|e| e.data() != WATCHED && e.data() != RELAY);
        Ok(if stop && !conn {
            Wake::Stop
        } else {
            Wake::Ready
        })
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn wait_listeners(&mut self, watched: BorrowedFd<'_>) -> io::Result<Wake> {
        self.poll_listeners(watched)
    }

    /// Polls the listeners, the relay and `watched`: every process that
    /// does so wakes for a connection (hence the turns).
    fn poll_listeners(&mut self, watched: BorrowedFd<'_>) -> io::Result<Wake> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = Vec::with_capacity(self.listeners.len() + 2);
        fds.push(PollFd::new(watched, PollFlags::POLLIN));
        fds.extend(
            self.streams()
                .map(|(_, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(
            self.relay
                .as_ref()
                .map(|rx| PollFd::new(rx.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let stop = ready(&fds[0]);
        let conn = fds[1..].iter().any(ready);
        let relay = self.relay.is_some();
        let listeners = 1..fds.len() - usize::from(relay);
        let (relay_woke, listener_woke) = (
            relay && fds.last().is_some_and(ready),
            fds[listeners].iter().any(ready),
        );
        drop(fds);
        if relay_woke {
            self.relay_woke();
        }
        self.listener_woke = listener_woke;
        Ok(if stop && !conn {
            Wake::Stop
        } else {
            Wake::Ready
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::{bind, BindOptions};

    fn listener() -> Listener {
        let opts = BindOptions {
            backlog: 16,
            socket_mode: 0o666,
            socket_group: None,
        };
        bind(&"127.0.0.1:0".parse().unwrap(), &opts).unwrap()
    }

    #[test]
    fn errors_are_classified() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(classify(&e(libc::EAGAIN)), Failure::Empty);
        assert_eq!(classify(&e(libc::ECONNABORTED)), Failure::Transient);
        assert_eq!(classify(&e(libc::EMFILE)), Failure::Resource);
        assert_eq!(classify(&e(libc::ENFILE)), Failure::Resource);
        assert_eq!(classify(&e(libc::ENOBUFS)), Failure::Resource);
    }

    #[test]
    fn accepts_in_turn_from_every_listener_with_clients() {
        let mut a = Acceptor::new(vec![listener(), listener()]);
        let addrs: Vec<String> = a.listeners().iter().map(|l| l.name().to_string()).collect();
        let now = Instant::now();
        assert!(a.accept(now).is_none(), "nobody connected");
        let _clients: Vec<_> = (0..4)
            .map(|k| std::net::TcpStream::connect(&addrs[k % 2]).unwrap())
            .collect();
        let mut order = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while order.len() < 4 && Instant::now() < end {
            if let Some((i, _)) = a.accept(Instant::now()) {
                order.push(i);
            }
        }
        assert_eq!(order, [0, 1, 0, 1], "taken in turn");
    }

    #[test]
    fn a_connection_wakes_the_wait_and_the_watched_fd_stops_it() {
        let mut a = Acceptor::new(vec![listener()]);
        let addr = a.listeners()[0].name().to_string();
        let (r, w) = nix::unistd::pipe().unwrap();
        let _c = std::net::TcpStream::connect(&addr).unwrap();
        assert_eq!(a.wait(r.as_fd()).unwrap(), Wake::Ready);
        assert!(a.accept(Instant::now()).is_some());
        drop(w);
        assert_eq!(a.wait(r.as_fd()).unwrap(), Wake::Stop);
    }
}
