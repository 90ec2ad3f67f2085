//! The io_uring engine of an event worker (`--io-engine uring`).
//!
//! The loop (event.rs) is the same on both engines: accepting (the cap,
//! the pause after EMFILE, the admission gate) is the epoll engine's,
//! unchanged. The listeners and the relay are each watched by a one-shot
//! poll in the ring with `EPOLLEXCLUSIVE`, armed again after each wake-up,
//! so that a new connection wakes one worker, as their epoll
//! registrations do (an epoll set watched by the ring would not: the
//! kernel counts a worker as woken only if it waits in `epoll_wait`, and
//! wakes every worker instead). The control pipe stays in the epoll set,
//! which the ring watches with one poll. What changes is the connections: each has a multishot receive
//! into a ring of buffers the kernel picks from (one buffer group for
//! the worker, shared by every connection, so an idle connection holds
//! no buffer), and what it receives goes back with one send at a time,
//! in order. A whole batch of receives and sends costs one
//! `io_uring_enter`, where epoll pays a `read` and a `write` per echo and
//! an `epoll_wait` per batch.
//!
//! Every byte received is copied out of its kernel-chosen buffer at
//! once and the buffer given back, so a client that does not read holds
//! only its own bytes (at most [`PENDING_CAP`] before its receive is
//! cancelled, as the epoll engine stops reading a connection with bytes
//! pending), never the shared buffers. A receive that finds the buffer
//! ring empty (`ENOBUFS`) ends with the bytes still in the socket, and is
//! armed again after the batch has given its buffers back.
//!
//! A connection whose receive fills a whole buffer streams: bytes come
//! faster than they go back, and a receive per 8 KiB (each copied) costs
//! more than the epoll engine's `read` of 64 KiB. Its receive is
//! cancelled and, once what it brought is sent, it is served as the epoll
//! engine serves it (`echo::Conn::step`: reads and writes of the worker's
//! 64 KiB buffer), a poll in the ring standing for its epoll registration.
//!
//! A connection with an operation in flight cannot be handed over (the
//! kernel would go on receiving for this process): a retiring worker
//! cancels its receives, sends what they brought, and hands over each
//! connection once nothing of it is in flight. One closed with a send in
//! flight keeps the bytes being sent (the kernel reads them) until that
//! send completes or is cancelled.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::*;

/// What a completion is for: the top byte of its user data.
const RECV: u64 = 1;
const SEND: u64 = 2;
const EPOLL: u64 = 3;
const CANCEL: u64 = 4;
/// A readiness poll: a PROXY header's next bytes, or a streaming
/// connection's socket.
const POLL: u64 = 5;
/// A listener's (or, [`RELAY_DOOR`], the relay's) exclusive poll.
const DOOR: u64 = 6;
const RELAY_DOOR: usize = 0xffff_ffff;

/// The shared buffers: how many, and how large. A receive takes a whole
/// buffer whatever it brings, so there are enough for one completion per
/// connection in a busy batch; each is given back as soon as it is read.
const BUFS: u16 = 1024;
const BUF_LEN: usize = 8192;
const GROUP: u16 = 0;
/// Bytes a connection may hold unsent before it receives no more.
const PENDING_CAP: usize = 64 * 1024;
/// Submission and completion queue sizes. Where a process may not lock
/// memory (no `CAP_IPC_LOCK`: under the packaged unit), the rings count
/// against `RLIMIT_MEMLOCK`, summed over the workers' user: about 80 KiB a
/// worker here. A batch that overflows the completion queue loses
/// nothing (the kernel keeps the rest, IORING_FEAT_NODROP).
const SQ: u32 = 256;
/// Submissions tried before a flush gives up (see [`Ring::flush`]).
const FLUSH_TRIES: usize = 1000;
const CQ: u32 = 4096;

fn tag(kind: u64, index: usize, serial: u64) -> u64 {
    kind << 56 | (serial & 0xff_ffff) << 32 | (index as u64 & 0xffff_ffff)
}

fn untag(data: u64) -> (u64, usize, u64) {
    (
        data >> 56,
        (data & 0xffff_ffff) as usize,
        (data >> 32) & 0xff_ffff,
    )
}

/// A connection's side of the engine (the epoll engine leaves it empty:
/// it is small, as it sits beside every connection of both).
#[derive(Default)]
pub(super) struct Flow {
    /// Its bytes, once it has sent any (an idle connection has none).
    bytes: Option<Box<Bytes>>,
    /// A multishot receive is in flight, and it was asked to end.
    recv: bool,
    cancelling: bool,
    /// A send of `out[off..]` is in flight.
    sending: bool,
    /// The client shut its side: everything it sent was received.
    eof: bool,
    /// Retiring: it receives no more, to be handed over.
    held: bool,
    /// A poll is in flight (for the PROXY header's next bytes, or a
    /// streaming connection's socket). It takes nothing from the socket,
    /// so it does not keep the connection from being handed over.
    polled: bool,
    /// Streaming: served as the epoll engine serves it (see the module's
    /// doc).
    bulk: bool,
    /// A receive or send failed: how it ends.
    failed: Option<Errno>,
    /// Bytes taken to be echoed (`--max-bytes` counts these).
    taken: u64,
}

/// Received and not yet sent back.
#[derive(Default)]
struct Bytes {
    out: Vec<u8>,
    off: usize,
    /// Received while a send was in flight: goes after `out`.
    pending: Vec<u8>,
}

impl Bytes {
    fn is_empty(&self) -> bool {
        self.out.is_empty() && self.pending.is_empty()
    }
}

impl Flow {
    /// Bytes received while a send was in flight.
    fn pending(&self) -> usize {
        self.bytes.as_ref().map_or(0, |b| b.pending.len())
    }

    /// Nothing received waits to be sent, nor is being sent.
    fn drained(&self) -> bool {
        !self.sending && self.bytes.as_ref().is_none_or(|b| b.is_empty())
    }

    /// A connection that echoed `bytes` before (elsewhere, if it was
    /// handed over): `--max-bytes` counts them.
    pub(super) fn after(bytes: u64) -> Flow {
        Flow {
            taken: bytes,
            ..Flow::default()
        }
    }

    /// Nothing of it is in flight or waits to be sent: it may go to
    /// another process.
    pub(super) fn quiet(&self) -> bool {
        !self.recv && self.drained()
    }
}

/// One worker's ring and its buffers.
pub(super) struct Ring {
    uring: IoUring,
    /// The buffer ring the kernel picks from, and the buffers.
    entries: IoBuffer,
    data: IoBuffer,
    tail: u16,
    /// Completions not served yet, but the epoll set's.
    cqes: Vec<(u64, i32, u32)>,
    /// The epoll set is polled, and it was found ready.
    polling_epoll: bool,
    epoll_ready: bool,
    /// Bytes of closed connections that a send still reads, by its tag.
    orphans: Vec<(u64, Vec<u8>)>,
    /// The listeners' and the relay's polls in flight: the door, and the
    /// generation its tag carries (a cancelled one may still complete).
    doors: Vec<(usize, u64)>,
    door_gen: u64,
}

impl Ring {
    /// A ring with its buffers registered.
    pub(super) fn new() -> std::io::Result<Box<Ring>> {
        let uring = crate::engine::ring(SQ, CQ)?;
        let size = std::mem::size_of::<types::BufRingEntry>() * usize::from(BUFS);
        let entries = IoBuffer::new(size)?;
        let data = IoBuffer::new(usize::from(BUFS) * BUF_LEN)?;
        let mut r = Box::new(Ring {
            uring,
            entries,
            data,
            tail: 0,
            cqes: Vec::with_capacity(1024),
            polling_epoll: false,
            epoll_ready: false,
            orphans: Vec::new(),
            doors: Vec::new(),
            door_gen: 0,
        });
        let base = r.entries.as_mut_slice().as_mut_ptr();
        // SAFETY: `base` is a page-aligned mapping of BUFS entries, owned
        // by the ring's `entries` for as long as the ring (which is dropped
        // first, unregistering it) lives.
        unsafe {
            r.uring
                .submitter()
                .register_buf_ring_with_flags(base as u64, BUFS, GROUP, 0)?;
        }
        for bid in 0..BUFS {
            r.put_back(bid);
        }
        Ok(r)
    }

    /// Gives buffer `bid` back to the kernel.
    fn put_back(&mut self, bid: u16) {
        let base = self
            .entries
            .as_mut_slice()
            .as_mut_ptr()
            .cast::<types::BufRingEntry>();
        let addr = self.data.as_mut_slice().as_mut_ptr() as u64 + u64::from(bid) * BUF_LEN as u64;
        // SAFETY: the slot is within the BUFS entries of the mapping (the
        // mask), which the kernel reads only up to the tail published
        // below; the tail is a u16 inside the first entry, aligned, that
        // the kernel reads atomically.
        unsafe {
            let e = &mut *base.add(usize::from(self.tail & (BUFS - 1)));
            e.set_addr(addr);
            e.set_len(BUF_LEN as u32);
            e.set_bid(bid);
            self.tail = self.tail.wrapping_add(1);
            let tail = &*types::BufRingEntry::tail(base).cast::<AtomicU16>();
            tail.store(self.tail, Ordering::Release);
        }
    }

    /// The first `n` bytes of buffer `bid`.
    fn buffer(&self, bid: u16, n: usize) -> &[u8] {
        let start = usize::from(bid) * BUF_LEN;
        &self.data.as_slice()[start..start + n.min(BUF_LEN)]
    }

    /// Queues `e`, submitting what is queued first if the queue is full.
    ///
    /// # Safety
    /// What `e` points to stays valid until its completion.
    unsafe fn push(&mut self, e: squeue::Entry) {
        for _ in 0..FLUSH_TRIES {
            // SAFETY: the caller's.
            if unsafe { self.uring.submission().push(&e) }.is_ok() {
                return;
            }
            if let Err(err) = self.uring.submit() {
                if !matches!(
                    err.raw_os_error(),
                    Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
                ) {
                    warn!("io_uring: cannot submit: {err}");
                }
                // The kernel may refuse more until completions are taken:
                // they are served after this batch.
                self.drain();
            }
        }
        // Rather than spin: the connection it was for waits for nothing,
        // and its idle or session limit ends it.
        warn!("io_uring: the kernel takes nothing more; an operation is dropped");
    }

    /// Takes what completed into `cqes` (the epoll set's readiness aside).
    fn drain(&mut self) {
        for c in self.uring.completion() {
            if c.user_data() >> 56 == EPOLL {
                self.polling_epoll = false;
                self.epoll_ready = true;
            } else {
                self.cqes.push((c.user_data(), c.result(), c.flags()));
            }
        }
    }

    /// Polls `o`'s socket for `events` (one shot: it completes at once if
    /// they hold already, so nothing is missed between two).
    fn poll(&mut self, o: &mut Open<'_>, index: usize, events: i16) {
        let fd = types::Fd(o.conn.fd().as_raw_fd());
        let e = opcode::PollAdd::new(fd, events as u32)
            .build()
            .user_data(tag(POLL, index, o.serial));
        // SAFETY: a poll points at no memory of ours.
        unsafe { self.push(e) };
        o.flow.polled = true;
    }

    fn cancel(&mut self, target: u64) {
        let e = opcode::AsyncCancel::new(target)
            .build()
            .user_data(tag(CANCEL, 0, 0));
        // SAFETY: a cancel points at nothing.
        unsafe { self.push(e) };
    }

    /// Submits what is queued and waits up to `timeout` for completions
    /// (the epoll set's readiness among them). True: the epoll set is
    /// ready.
    fn wait(&mut self, epoll: &Epoll, timeout: Option<Duration>) -> std::io::Result<bool> {
        if !self.polling_epoll {
            let fd = types::Fd(epoll.0.as_raw_fd());
            let e = opcode::PollAdd::new(fd, libc::POLLIN as u32)
                .build()
                .user_data(tag(EPOLL, 0, 0));
            // SAFETY: the epoll set outlives the ring (the loop's).
            unsafe { self.push(e) };
            self.polling_epoll = true;
        }
        // Completions taken while serving the last batch are served now.
        let timeout = if self.cqes.is_empty() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let done = match timeout {
            None => self.uring.submit_and_wait(1),
            Some(d) => {
                let ts = types::Timespec::from(d);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(1, &args)
            }
        };
        if let Err(e) = done {
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) {
                return Err(e);
            }
        }
        self.drain();
        Ok(std::mem::take(&mut self.epoll_ready))
    }

    /// A connection closes or leaves this worker: what it has in flight is
    /// cancelled (which lets the kernel close the socket), the bytes a send
    /// reads are kept until it completes, and everything queued is
    /// submitted.
    pub(super) fn forget(&mut self, f: &mut Flow, index: usize, serial: u64) {
        if f.recv {
            self.cancel(tag(RECV, index, serial));
        }
        if f.polled {
            self.cancel(tag(POLL, index, serial));
        }
        if f.sending {
            let t = tag(SEND, index, serial);
            self.cancel(t);
            let out = f.bytes.take().map(|b| b.out).unwrap_or_default();
            self.orphans.push((t, out));
        }
        self.flush();
    }

    /// Submits what is queued and takes what completed, without waiting
    /// (task work, and so completions, run only in a wait).
    fn settle(&mut self) {
        self.flush();
        let ts = types::Timespec::new();
        let args = types::SubmitArgs::new().timespec(&ts);
        if let Err(e) = self.uring.submitter().submit_with_args(1, &args) {
            if !matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) {
                warn!("io_uring_enter failed: {e}");
            }
        }
        self.drain();
    }

    /// Submits what is queued. A queued entry names its socket by number,
    /// which the kernel looks up when the entry is submitted: once a
    /// socket is closed, the number may be a new connection's (accepted in
    /// the same turn), which would get the closed one's bytes. So what is
    /// queued goes before a socket is closed, while its number is its own.
    fn flush(&mut self) {
        // The kernel may take part of the queue (out of memory for
        // requests) or none (completions to take first): again until it
        // is empty, within reason.
        for _ in 0..FLUSH_TRIES {
            if self.uring.submission().is_empty() {
                return;
            }
            if let Err(e) = self.uring.submit() {
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)
                ) {
                    warn!("io_uring: cannot submit: {e}");
                }
                self.drain();
            }
        }
        warn!("io_uring: the kernel does not take what is queued");
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // A send may still read these while the kernel tears the ring
        // down: the process is exiting, so they are left to it.
        std::mem::forget(std::mem::take(&mut self.orphans));
    }
}

impl<'a> Loop<'a> {
    /// Waits for the ring (see [`Ring::wait`]); the epoll set's events,
    /// if it is ready, in `events`. Returns how many.
    pub(super) fn ring_wait(
        &mut self,
        events: &mut [EpollEvent],
        timeout: Option<Duration>,
    ) -> std::io::Result<usize> {
        let Some(r) = self.ring.as_deref_mut() else {
            return Ok(0);
        };
        if !r.wait(&self.epoll, timeout)? {
            return Ok(0);
        }
        match self.epoll.wait(events, nix::sys::epoll::EpollTimeout::ZERO) {
            Ok(n) => Ok(n),
            Err(Errno::EINTR) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Watches the listeners and the relay (`on`), each with one exclusive
    /// poll, armed again here after it fired; or stops watching them.
    ///
    /// An exclusive poll takes a wake-up whenever it is armed, where an
    /// epoll set passes it to the next worker unless this one waits in
    /// `epoll_wait`: a poll that took one just before it was cancelled
    /// would leave a connection waiting with no worker woken for it. So
    /// the cancelled polls are settled at once, and a wake-up one took
    /// is passed on (the relay's) or remembered in `claimed` (a
    /// listener's: a stopping worker accepts once more before it closes
    /// them, and hands what it took over).
    pub(super) fn ring_listen(&mut self, on: bool) {
        let Some(r) = self.ring.as_deref_mut() else {
            return;
        };
        if !on {
            let doors = std::mem::take(&mut r.doors);
            if doors.is_empty() {
                return;
            }
            for &(door, generation) in &doors {
                r.cancel(tag(DOOR, door, generation));
            }
            // Before a stopping worker closes them, and to see what they
            // took: submitted, and their completions taken, now.
            r.settle();
            let (mut listener, mut relay) = (false, false);
            r.cqes.retain(|&(data, res, _)| {
                let (kind, door, generation) = untag(data);
                if kind != DOOR || !doors.contains(&(door, generation)) {
                    return true;
                }
                if res > 0 {
                    *(if door == RELAY_DOOR {
                        &mut relay
                    } else {
                        &mut listener
                    }) = true;
                }
                false
            });
            // A poll being cancelled as a wake-up comes takes it and
            // completes cancelled: what is readable now counts too.
            let (l, rl) = self.readable_doors();
            listener |= l;
            relay |= rl;
            self.claimed |= listener;
            if relay {
                self.acceptor.pass_on_relay(self.ctx.board);
            }
            return;
        }
        let relay = self.acceptor.relay().map(|rx| (RELAY_DOOR, rx.as_raw_fd()));
        let streams = self
            .acceptor
            .streams()
            .map(|(i, l)| (i, l.as_fd().as_raw_fd()));
        for (door, fd) in relay.into_iter().chain(streams) {
            if r.doors.iter().any(|&(d, _)| d == door) {
                continue;
            }
            r.door_gen += 1;
            let events = (libc::POLLIN as u32) | (libc::EPOLLEXCLUSIVE as u32);
            let e = opcode::PollAdd::new(types::Fd(fd), events)
                .build()
                .user_data(tag(DOOR, door, r.door_gen));
            // SAFETY: a poll points at no memory of ours.
            unsafe { r.push(e) };
            r.doors.push((door, r.door_gen & 0xff_ffff));
        }
    }

    /// Whether a listener, and whether the relay, is readable now.
    fn readable_doors(&self) -> (bool, bool) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let relay = self.acceptor.relay();
        let mut fds: Vec<PollFd<'_>> = relay
            .into_iter()
            .chain(self.acceptor.streams().map(|(_, l)| l.as_fd()))
            .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
            .collect();
        if poll(&mut fds, PollTimeout::ZERO).unwrap_or(0) <= 0 {
            return (false, false);
        }
        let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| r.contains(PollFlags::POLLIN));
        let skip = usize::from(relay.is_some());
        let relay_ready = relay.is_some() && fds.first().is_some_and(ready);
        (fds.iter().skip(skip).any(ready), relay_ready)
    }

    /// A listener's or the relay's poll completed: whether to accept.
    fn door(&mut self, door: usize, generation: u64, res: i32) -> bool {
        let Some(r) = self.ring.as_deref_mut() else {
            return false;
        };
        let Some(k) = r.doors.iter().position(|&d| d == (door, generation)) else {
            return false; // cancelled: the listeners were let go
        };
        r.doors.swap_remove(k);
        if res < 0 {
            return res != -libc::ECANCELED;
        }
        if door == RELAY_DOOR {
            self.acceptor.relay_woke();
        }
        true
    }

    /// Starts a new connection's I/O: its header's poll behind a proxy,
    /// else its receive.
    pub(super) fn ring_start(&mut self, index: usize) {
        let Some(Some(o)) = self.slots.get_mut(index) else {
            return;
        };
        if o.header.is_some() {
            self.poll_header(index);
        } else {
            self.pump(index);
        }
    }

    fn poll_header(&mut self, index: usize) {
        let (Some(r), Some(Some(o))) = (self.ring.as_deref_mut(), self.slots.get_mut(index)) else {
            return;
        };
        r.poll(o, index, libc::POLLIN);
    }

    /// Serves what the last wait completed; true: a listener or the
    /// relay is ready.
    pub(super) fn completions(&mut self, buf: &mut [u8], now: Instant) -> bool {
        let mut accept = false;
        let Some(r) = self.ring.as_deref_mut() else {
            return false;
        };
        let cqes = std::mem::take(&mut r.cqes);
        for &(data, res, flags) in &cqes {
            let (kind, index, serial) = untag(data);
            let live =
                matches!(self.slots.get(index), Some(Some(o)) if o.serial & 0xff_ffff == serial);
            match kind {
                RECV => self.received(index, live, res, flags, now),
                SEND if live => self.sent(index, res, now),
                SEND => {
                    if let Some(r) = self.ring.as_deref_mut() {
                        r.orphans.retain(|(t, _)| *t != data);
                    }
                }
                POLL if live => self.polled(index, res, buf, now),
                DOOR => accept |= self.door(index, serial, res),
                _ => {}
            }
        }
        if let Some(r) = self.ring.as_deref_mut() {
            // Anything taken while serving these (see `push`) goes next.
            let mut cqes = cqes;
            cqes.clear();
            let more = std::mem::replace(&mut r.cqes, cqes);
            r.cqes.extend(more);
        }
        accept
    }

    fn polled(&mut self, index: usize, res: i32, buf: &mut [u8], now: Instant) {
        let limits = self.ctx.limits;
        let Some(Some(o)) = self.slots.get_mut(index) else {
            return;
        };
        o.flow.polled = false;
        if res < 0 {
            // Cancelled (retiring), or the poll failed: pump says what next.
            if res != -libc::ECANCELED {
                o.flow.failed = Some(Errno::from_raw(-res));
            }
            self.pump(index);
            return;
        }
        if o.header.is_some() {
            if self.header(index) {
                self.pump(index);
            } else if matches!(self.slots.get(index), Some(Some(o)) if o.header.is_some()) {
                self.poll_header(index);
            }
            return;
        }
        // Retiring or not, as in the epoll engine: it is handed over
        // whenever a step leaves nothing unsent.
        match o.conn.step(buf, &limits, now) {
            Some(end) => self.close(index, end),
            None => self.pump(index),
        }
    }

    fn received(&mut self, index: usize, live: bool, res: i32, flags: u32, now: Instant) {
        let limits = self.ctx.limits;
        let Some(r) = self.ring.as_deref_mut() else {
            return;
        };
        let bid = cqueue::buffer_select(flags);
        let o = match self.slots.get_mut(index) {
            Some(Some(o)) if live => o,
            _ => {
                if let Some(bid) = bid {
                    r.put_back(bid);
                }
                return;
            }
        };
        let f = &mut o.flow;
        if !cqueue::more(flags) {
            f.recv = false;
            f.cancelling = false;
        }
        if let (Some(bid), true) = (bid, res <= 0) {
            // A buffer with no bytes in it (the kernel keeps those, but
            // it costs nothing to be sure).
            r.put_back(bid);
        }
        if res > 0 {
            if let Some(bid) = bid {
                let data = r.buffer(bid, res as usize);
                let room = limits.room(data.len(), f.taken);
                f.taken += room as u64;
                let b = f.bytes.get_or_insert_with(Box::default);
                let to = if f.sending {
                    &mut b.pending
                } else {
                    &mut b.out
                };
                to.extend_from_slice(&data[..room]);
                r.put_back(bid);
                o.conn.heard(now);
                // A full buffer: more is waiting; it streams.
                f.bulk |= res as usize >= BUF_LEN;
            }
        } else if res == 0 {
            f.eof = true;
        } else if !matches!(-res, libc::ENOBUFS | libc::ECANCELED) {
            // ENOBUFS: the bytes wait in the socket; armed again below.
            f.failed = Some(Errno::from_raw(-res));
        }
        self.pump(index);
    }

    fn sent(&mut self, index: usize, res: i32, now: Instant) {
        let Some(Some(o)) = self.slots.get_mut(index) else {
            return;
        };
        let f = &mut o.flow;
        f.sending = false;
        if res < 0 {
            f.failed = Some(Errno::from_raw(-res));
        } else {
            let n = res as usize;
            if let Some(b) = f.bytes.as_deref_mut() {
                b.off += n;
                if b.off >= b.out.len() {
                    b.out.clear();
                    b.off = 0;
                }
            }
            o.conn.sent(n, now);
        }
        self.pump(index);
    }

    /// Moves a connection on: sends what waits, ends it once it is done,
    /// and receives again while it may (or stops receiving).
    fn pump(&mut self, index: usize) {
        let limits = self.ctx.limits;
        let (Some(r), Some(Some(o))) = (self.ring.as_deref_mut(), self.slots.get_mut(index)) else {
            return;
        };
        let f = &mut o.flow;
        if let Some(e) = f.failed.take() {
            self.close(index, End::Failed(e.into()));
            return;
        }
        if f.bulk && !f.recv && !f.sending && o.header.is_none() {
            // Streaming, and nothing of the ring's path is in flight:
            // what it received and did not send yet goes first.
            if let Some(b) = f.bytes.take() {
                o.conn.keep(&b.out[b.off..]);
                o.conn.keep(&b.pending);
            }
            if !o.conn.wants_write() {
                if limits.bytes_done(o.conn.bytes()) {
                    self.close(index, End::Bytes);
                    return;
                }
                if f.eof {
                    // Everything it sent came, and is back.
                    self.close(index, End::Eof);
                    return;
                }
            }
            if !f.polled {
                let events = if o.conn.wants_write() {
                    libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                r.poll(o, index, events);
            }
            return;
        }
        if let (false, Some(b)) = (f.sending, f.bytes.as_deref_mut()) {
            if b.out.is_empty() {
                std::mem::swap(&mut b.out, &mut b.pending);
            }
            if b.off < b.out.len() {
                let rest = &b.out[b.off..];
                let fd = types::Fd(o.conn.fd().as_raw_fd());
                let e = opcode::Send::new(fd, rest.as_ptr(), rest.len() as u32)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                    .build()
                    .user_data(tag(SEND, index, o.serial));
                // SAFETY: `out` is neither changed nor dropped while the
                // send is in flight (`pending` takes what comes; a close
                // keeps it among the orphans until the completion).
                unsafe { r.push(e) };
                f.sending = true;
            }
        }
        let drained = f.drained();
        if drained && limits.bytes_done(o.conn.bytes()) {
            self.close(index, End::Bytes);
            return;
        }
        if drained && f.eof && !f.recv {
            self.close(index, End::Eof);
            return;
        }
        let capped = limits.max_bytes != 0 && f.taken >= limits.max_bytes;
        let stop = f.held || capped || f.eof || f.bulk || f.pending() >= PENDING_CAP;
        if !f.recv && !stop && o.header.is_none() {
            let fd = types::Fd(o.conn.fd().as_raw_fd());
            let e = opcode::RecvMulti::new(fd, GROUP)
                .build()
                .user_data(tag(RECV, index, o.serial));
            // SAFETY: it receives into the registered buffers, which live
            // as long as the ring.
            unsafe { r.push(e) };
            f.recv = true;
        } else if f.recv && stop && !f.cancelling {
            r.cancel(tag(RECV, index, o.serial));
            f.cancelling = true;
        }
    }

    /// Retiring (`on`): every connection stops receiving, so that it
    /// can go once what it received is sent; or, the hand-over given up,
    /// receives again.
    pub(super) fn ring_hold(&mut self, on: bool) {
        if self.ring.is_none() {
            return;
        }
        for index in 0..self.slots.len() {
            match self.slots.get_mut(index) {
                Some(Some(o)) if o.flow.held != on => o.flow.held = on,
                _ => continue,
            }
            self.pump(index);
        }
    }
}
