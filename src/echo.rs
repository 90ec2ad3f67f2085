//! RFC 862 over one connected, non-blocking socket.
//!
//! Every byte read is written back, in order, before the next read, so the
//! echo is exact whatever the segmentation. When the client shuts down its
//! write side, everything it sent has already been echoed, and [`serve`]
//! returns [`End::Eof`]; the caller then closes the socket, which sends our
//! FIN (never a reset: nothing is left unread after EOF), so the hot path
//! needs no separate `shutdown`. Idle time counts from the last progress in
//! either direction, so a silent client and a client that never reads both
//! release the connection. This module knows nothing of processes or
//! signals: the caller may hand it one extra fd to watch and decides what
//! its readiness means.
//!
//! [`Conn`] is the same echo as a state machine, for an event loop that
//! serves many connections at once: the same [`Limits`] rules, one read
//! buffer shared by all connections, and bytes a slow reader has not taken
//! yet kept per connection (at most one buffer's worth: until they are
//! written, that connection is not read again, so a client that does not
//! read stops only itself).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::MsgFlags;
use nix::unistd::{read, write};

use crate::time::after;

mod block;

/// Caps on one connection; `None`/0 means no cap.
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    pub idle: Option<Duration>,
    pub session: Option<Duration>,
    pub max_bytes: u64,
}

impl Limits {
    /// The limit that has run out at `now` for a connection accepted at
    /// `start` that last made progress at `last`, if any.
    pub fn expired(&self, start: Instant, last: Instant, now: Instant) -> Option<End> {
        if matches!(self.session, Some(d) if now >= after(start, d)) {
            return Some(End::Session);
        }
        if matches!(self.idle, Some(d) if now >= after(last, d)) {
            return Some(End::Idle);
        }
        None
    }

    /// When the next limit runs out, if one can.
    pub fn next_deadline(&self, start: Instant, last: Instant) -> Option<Instant> {
        let idle = self.idle.map(|d| after(last, d));
        let session = self.session.map(|d| after(start, d));
        match (idle, session) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How many of `n` bytes just read may still be echoed, `echoed` having
    /// been echoed before.
    pub fn room(&self, n: usize, echoed: u64) -> usize {
        match self.max_bytes {
            0 => n,
            cap => n.min(usize::try_from(cap.saturating_sub(echoed)).unwrap_or(usize::MAX)),
        }
    }

    /// Whether the byte cap has been reached.
    pub fn bytes_done(&self, echoed: u64) -> bool {
        self.max_bytes != 0 && echoed >= self.max_bytes
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub enum End {
    /// The client closed its side and got every byte back.
    Eof,
    /// No progress for the idle timeout.
    Idle,
    /// The session lasted its maximum.
    Session,
    /// The byte cap was echoed.
    Bytes,
    /// The caller's watch said to stop.
    Aborted,
    /// The caller's watch said to pass it on, and nothing read is unsent:
    /// it is still open, for another process to serve.
    HandOver,
    /// The connection failed (reset, broken pipe, …).
    Failed(io::Error),
}

/// What the caller wants done when its watched fd becomes readable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Stop watching it and carry on.
    Forget,
    /// End the connection now.
    Abort,
    /// Return it, open, at the next moment nothing read is unsent.
    HandOver,
}

/// Where a connection is in its life: what its limits count from, and
/// what it carries to another process if it is handed over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// When it was accepted (`--max-session`).
    pub start: Instant,
    /// When it last moved either way (`--idle-timeout`).
    pub last: Instant,
    /// Bytes echoed so far (`--max-bytes`).
    pub bytes: u64,
}

impl Progress {
    /// A connection accepted at `now`.
    pub fn new(now: Instant) -> Progress {
        Progress {
            start: now,
            last: now,
            bytes: 0,
        }
    }
}

/// One connection of an event loop (see the module's doc): step it when
/// its socket is ready, close it when a step says it ended. The event
/// worker needs epoll, so only Linux's build uses it.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
pub struct Conn {
    fd: OwnedFd,
    start: Instant,
    last: Instant,
    bytes: u64,
    /// Read but not yet written back: empty (and unallocated) unless the
    /// client reads slower than it writes.
    pending: Vec<u8>,
}

/// At most this many reads per step, so that one streaming client does
/// not hold the loop while others wait.
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const READS_PER_STEP: u32 = 16;

#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
impl Conn {
    /// A connection accepted at `now`; `fd` is non-blocking.
    pub fn new(fd: OwnedFd, now: Instant) -> Conn {
        Conn::resume(fd, Progress::new(now))
    }

    /// A connection handed over by another process, where it was.
    pub fn resume(fd: OwnedFd, p: Progress) -> Conn {
        Conn {
            fd,
            start: p.start,
            last: p.last,
            bytes: p.bytes,
            pending: Vec::new(),
        }
    }

    /// Where it is, to hand it over (when nothing is pending).
    pub fn progress(&self) -> Progress {
        Progress {
            start: self.start,
            last: self.last,
            bytes: self.bytes,
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The socket, to pass on (when nothing is pending).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Bytes echoed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// When it was accepted.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// Whether it waits to write (bytes pending) rather than to read.
    pub fn wants_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Does what can be done now without blocking: writes what is pending,
    /// then reads and echoes until nothing more comes. `Some` says how the
    /// connection ended; it is to be closed.
    pub fn step(&mut self, buf: &mut [u8], limits: &Limits, now: Instant) -> Option<End> {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            let written = match self.write_some(&pending, now) {
                Ok(k) => k,
                Err(end) => return Some(end),
            };
            if written < pending.len() {
                self.pending = pending;
                self.pending.drain(..written);
                return None;
            }
            if limits.bytes_done(self.bytes) {
                return Some(End::Bytes);
            }
        }
        for _ in 0..READS_PER_STEP {
            let n = match read(self.fd.as_fd(), buf) {
                // Nothing is pending here: every byte the client sent is back.
                Ok(0) => return Some(End::Eof),
                Ok(n) => n,
                Err(Errno::EAGAIN) => return None,
                Err(Errno::EINTR) => continue,
                Err(e) => return Some(End::Failed(e.into())),
            };
            self.last = now;
            let data = &buf[..limits.room(n, self.bytes)];
            let written = match self.write_some(data, now) {
                Ok(k) => k,
                Err(end) => return Some(end),
            };
            if written < data.len() {
                // The client does not read as fast as it writes: keep the
                // rest, and read no more until it is written.
                self.pending.extend_from_slice(&data[written..]);
                return None;
            }
            if limits.bytes_done(self.bytes) {
                return Some(End::Bytes);
            }
            if n < buf.len() {
                // Drained; the loop is told when more comes.
                return None;
            }
        }
        None
    }

    /// Writes as much of `data` as the socket takes now; Err ends it.
    fn write_some(&mut self, data: &[u8], now: Instant) -> Result<usize, End> {
        let mut done = 0;
        while done < data.len() {
            match write(self.fd.as_fd(), &data[done..]) {
                Ok(k) => {
                    done += k;
                    self.bytes += k as u64;
                    self.last = now;
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(End::Failed(e.into())),
            }
        }
        Ok(done)
    }

    /// The limit that has run out at `now`, if any.
    pub fn expired(&self, limits: &Limits, now: Instant) -> Option<End> {
        limits.expired(self.start, self.last, now)
    }

    /// io_uring, switching to [`Conn::step`]: bytes received and not
    /// yet sent, to be written before anything else.
    pub fn keep(&mut self, data: &[u8]) {
        self.pending.extend_from_slice(data);
    }

    /// io_uring: bytes came at `now` (they are echoed by the caller).
    pub fn heard(&mut self, now: Instant) {
        self.last = now;
    }

    /// io_uring: `n` bytes went back at `now`.
    pub fn sent(&mut self, n: usize, now: Instant) {
        self.bytes += n as u64;
        self.last = now;
    }

    /// When the next limit runs out, if one can.
    pub fn deadline(&self, limits: &Limits) -> Option<Instant> {
        limits.next_deadline(self.start, self.last)
    }
}

/// How a connection went.
#[derive(Debug)]
pub struct Summary {
    pub bytes: u64,
    pub end: End,
    /// Where it was when it ended (what a hand-over carries).
    pub progress: Progress,
}

/// After this many back-to-back full reads, poll anyway so the watched fd
/// and the deadlines are looked at even under a continuous stream.
const MAX_DIRECT_READS: u32 = 64;

/// Bytes a connection reads on the stack before it needs its buffer.
const SMALL_READ: usize = 256;

/// Echoes `conn` from where it is (`from`: a new connection's progress,
/// or a handed-over one's) until the client closes, a limit ends it, or
/// `on_watch` aborts it or asks for it back (then it returns
/// [`End::HandOver`] once nothing read is unsent). `buf` is the caller's
/// (one per worker, reused). `blocking_reads`: a fork-mode child, whose
/// master tells it its news by a signal too, may wait for a chatty
/// client in `read` instead of `poll` (see block.rs).
pub fn serve(
    conn: BorrowedFd<'_>,
    buf: &mut [u8],
    limits: &Limits,
    from: Progress,
    watch: Option<BorrowedFd<'_>>,
    on_watch: &mut dyn FnMut() -> Watch,
    blocking_reads: bool,
) -> Summary {
    let mut s = Session {
        conn,
        watch,
        on_watch,
        limits,
        start: from.start,
        last: from.last,
        moved: false,
        bytes: from.bytes,
        hand_over: false,
        // Only the idle limit is the kernel's to keep; a session limit
        // needs the clock at every wait.
        may_arm: blocking_reads && limits.session.is_none() && watch.is_some(),
        waited: false,
        armed: None,
    };
    // Nothing echoed yet: nothing can have run out but the session
    // (idle is counted from the same instant, and a client whose bytes
    // are waiting is not idle), so the first read needs no clock.
    let fresh = from.bytes == 0 && from.last == from.start;
    let end = s.run(buf, fresh);
    if matches!(end, End::HandOver) {
        s.settle();
    }
    Summary {
        bytes: s.bytes,
        end,
        progress: Progress {
            start: s.start,
            last: s.last,
            bytes: s.bytes,
        },
    }
}

struct Session<'a, 'b> {
    conn: BorrowedFd<'a>,
    watch: Option<BorrowedFd<'a>>,
    on_watch: &'b mut dyn FnMut() -> Watch,
    limits: &'b Limits,
    start: Instant,
    /// When it last moved, unless `moved`.
    last: Instant,
    /// It moved since `last`, just now: the clock is read when a deadline
    /// needs it, not at every read and write. A connection that makes
    /// progress and then waits, with only an idle limit, waits a whole
    /// idle period without a clock (a short fork-mode connection reads
    /// none, and its process faults in no clock code). A signal that
    /// interrupts such a wait starts the idle period again.
    moved: bool,
    bytes: u64,
    /// Asked for while bytes were pending: returned at the next moment
    /// nothing is.
    hand_over: bool,
    /// It may wait in blocking reads once it has waited for a client's
    /// bytes once (a chatty client: a short connection is not worth the
    /// arming's system calls).
    may_arm: bool,
    /// It has waited for the client's bytes once: the next wait may be
    /// a blocking read.
    waited: bool,
    /// Waiting in blocking reads (block.rs).
    armed: Option<block::Armed<'a>>,
}

impl Session<'_, '_> {
    fn run(&mut self, buf: &mut [u8], fresh: bool) -> End {
        // For ping-pong traffic the next read would almost always find
        // nothing, so poll first; after a full buffer more is likely
        // waiting, so read straight away. So is a new connection's first
        // read: clients speak first, and their bytes usually came with,
        // or right after, the handshake that woke us.
        let mut direct = 1;
        let mut fresh = fresh;
        // Short messages are read into the stack, in a page this process
        // has written already; `buf` is used once one fills it. A
        // fork-mode child that echoes a few lines then never touches
        // `buf`, a mapping of its own: otherwise its first read alone
        // costs a fresh page (a fault, a page zeroed and freed again) per
        // connection.
        let mut small = [0u8; SMALL_READ];
        let mut bulk = buf.len() <= SMALL_READ;
        loop {
            if direct == 0 {
                // Everything read has been written back.
                if self.hand_over {
                    return End::HandOver;
                }
                if self.may_arm && self.waited {
                    self.may_arm = false;
                    self.armed = self
                        .watch
                        .and_then(|w| block::Armed::arm(self.conn, w, self.limits.idle));
                }
                if self.armed.is_none() {
                    if let Err(end) = self.wait(PollFlags::POLLIN) {
                        return end;
                    }
                    self.waited = true;
                }
            } else if self.limits.session.is_some() || !(fresh || self.moved) {
                // (Having just moved, it cannot be idle.)
                let now = Instant::now();
                self.settle_at(now);
                if let Some(end) = self.expired(now) {
                    return end;
                }
            }
            fresh = false;
            let into: &mut [u8] = if bulk { &mut *buf } else { &mut small };
            let n = match read(self.conn, &mut *into) {
                Ok(0) => return End::Eof,
                Ok(n) => n,
                Err(Errno::EAGAIN) => {
                    if let Some(armed) = &self.armed {
                        if !armed.woken() {
                            // The receive timeout: nothing for the idle
                            // limit since the read began, right after the
                            // last move.
                            return End::Idle;
                        }
                        // The master's news: the pipe says what it is.
                        self.armed = None;
                    }
                    direct = 0;
                    continue;
                }
                Err(Errno::EINTR) => {
                    if self.armed.as_ref().is_some_and(|a| a.woken()) {
                        self.armed = None;
                        direct = 0;
                    }
                    continue;
                }
                Err(e) => return End::Failed(e.into()),
            };
            self.moved = true;
            let room = self.limits.room(n, self.bytes);
            if let Err(end) = self.write_all(&into[..room]) {
                return end;
            }
            if self.limits.bytes_done(self.bytes) {
                return End::Bytes;
            }
            let full = n == into.len();
            bulk |= full;
            direct = if full && direct < MAX_DIRECT_READS {
                direct + 1
            } else {
                0
            };
        }
    }

    fn write_all(&mut self, mut data: &[u8]) -> Result<(), End> {
        while !data.is_empty() {
            let sent = match self.armed {
                // The socket blocks now: this write must not.
                Some(_) => nix::sys::socket::send(
                    self.conn.as_raw_fd(),
                    data,
                    MsgFlags::MSG_DONTWAIT | crate::sys::no_signal(),
                ),
                None => write(self.conn, data),
            };
            match sent {
                Ok(k) => {
                    data = &data[k..];
                    self.bytes += k as u64;
                    self.moved = true;
                }
                Err(Errno::EAGAIN) => self.wait(PollFlags::POLLOUT)?,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(End::Failed(e.into())),
            }
        }
        Ok(())
    }

    fn expired(&self, now: Instant) -> Option<End> {
        self.limits.expired(self.start, self.last, now)
    }

    /// Stamps a move made since `last` as made at `now`.
    fn settle_at(&mut self, now: Instant) {
        if std::mem::take(&mut self.moved) {
            self.last = now;
        }
    }

    /// Stamps a move made since `last` as made now.
    fn settle(&mut self) {
        if self.moved {
            self.settle_at(Instant::now());
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.limits.next_deadline(self.start, self.last)
    }

    /// Waits until the connection is ready for `events` (or has failed, which
    /// the next read or write reports).
    fn wait(&mut self, events: PollFlags) -> Result<(), End> {
        // Polled: the socket is non-blocking again, whatever comes of it.
        self.armed = None;
        loop {
            // Just moved, with only an idle limit: a whole idle period
            // away, and if it passes with nothing ready, it ran out.
            let idle_only = self.moved && self.limits.session.is_none();
            let timeout = if idle_only {
                self.limits.idle
            } else {
                let now = Instant::now();
                self.settle_at(now);
                if let Some(end) = self.expired(now) {
                    return Err(end);
                }
                self.next_deadline()
                    .map(|d| d.saturating_duration_since(now))
            };
            let timeout = crate::time::poll_timeout(timeout);
            let mut fds = [
                PollFd::new(self.conn, events),
                PollFd::new(self.watch.unwrap_or(self.conn), PollFlags::POLLIN),
            ];
            let nfds = if self.watch.is_some() { 2 } else { 1 };
            match poll(&mut fds[..nfds], timeout) {
                Ok(0) if idle_only => return Err(End::Idle),
                Ok(_) => {}
                Err(Errno::EINTR) => {
                    self.settle();
                    continue;
                }
                Err(e) => return Err(End::Failed(e.into())),
            }
            // The watch first: a client that keeps the connection ready
            // at every poll must not keep a stop or a hand-over waiting
            // until it pauses.
            if nfds == 2 && fds[1].revents().is_some_and(|r| !r.is_empty()) {
                match (self.on_watch)() {
                    Watch::Forget => self.watch = None,
                    Watch::Abort => return Err(End::Aborted),
                    // Waiting to read: nothing read is unsent.
                    Watch::HandOver if events == PollFlags::POLLIN => return Err(End::HandOver),
                    Watch::HandOver => {
                        self.hand_over = true;
                        self.watch = None;
                    }
                }
            }
            if fds[0].revents().is_some_and(|r| !r.is_empty()) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests;
