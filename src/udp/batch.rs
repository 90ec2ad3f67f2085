//! Linux: datagrams taken and answered [`BATCH`] at a time, with
//! `recvmmsg` and `sendmmsg`, one system call each way per batch instead of
//! one per datagram. With one datagram waiting, a batch is that one.
//! (Segmented sends, UDP GSO, were tried for runs of replies to one
//! client: they raised a flood's replies per second by a quarter from 16
//! clients but halved them from one, whose windows then went back and forth in lock-step, and
//! saved no CPU time per datagram; so they are not used.)

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

use super::{socket_addr, Local, Screen, Served};
use crate::scoreboard::{Dropped, Scoreboard};
use crate::sys::IoBuffer;

/// Datagrams per system call.
const BATCH: usize = 32;
/// Room for one datagram: the largest UDP payload fits (65,507 bytes over
/// IPv4, 65,527 over IPv6), so none is truncated.
const SLOT: usize = 64 * 1024;
/// Bytes received in a batch above which the slots are given back to the
/// kernel afterwards, so that the worker idles small.
const TRIM_ABOVE: usize = 4096;

/// A UDP worker's batch: the slots, the message headers, and what was
/// received.
pub struct Batch {
    /// `BATCH` slots of `SLOT` bytes; only the pages datagrams touch are
    /// ever private to the worker.
    buf: IoBuffer,
    recv: MultiHeaders<SockaddrStorage>,
    /// For replies without a local address (a socket bound to one).
    send_plain: MultiHeaders<SockaddrStorage>,
    /// For replies with one packet-info message.
    send_info: MultiHeaders<SockaddrStorage>,
    /// The datagrams to answer: slot, length, source, local address.
    answer: Vec<(usize, usize, SockaddrStorage, Local)>,
}

impl Batch {
    /// Maps the slots and the headers; Err says what could not be had.
    pub fn new() -> std::io::Result<Batch> {
        Ok(Batch {
            buf: IoBuffer::new(BATCH * SLOT)?,
            recv: MultiHeaders::preallocate(BATCH, recv_cmsg()),
            send_plain: MultiHeaders::preallocate(BATCH, None),
            // One message, of the larger kind: a smaller one leaves less
            // than a header's room after it, where the kernel stops.
            send_info: MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(libc::in6_pktinfo))),
            answer: Vec::with_capacity(BATCH),
        })
    }

    /// Receives up to [`BATCH`] datagrams from `fd` (`wildcard`: bound to
    /// every address, so each brings its local address), screens them,
    /// and answers those that pass. Err: the receive failed (EAGAIN: nothing
    /// was waiting).
    pub fn serve(
        &mut self,
        fd: RawFd,
        wildcard: bool,
        screen: &mut Screen,
        board: &Scoreboard,
    ) -> nix::Result<Served> {
        self.answer.clear();
        if wildcard {
            // The kernel shortens each header's control length to what it
            // wrote, and nix's recvmmsg does not restore it: headers used
            // once would truncate the packet-info messages of the next
            // batch. (A socket bound to one address gets none, and its
            // sources' address length never changes.)
            self.recv = MultiHeaders::preallocate(BATCH, recv_cmsg());
        }
        let mut largest = 0;
        let received = {
            let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
                .buf
                .as_mut_slice()
                .chunks_mut(SLOT)
                .map(|slot| [IoSliceMut::new(slot)])
                .collect();
            let got = recvmmsg(fd, &mut self.recv, iovs.iter_mut(), MsgFlags::empty(), None)?;
            let mut n = 0;
            for (slot, msg) in got.enumerate() {
                n += 1;
                largest = largest.max(msg.bytes);
                let Some(src) = msg.address.as_ref().and_then(socket_addr) else {
                    continue;
                };
                if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                    board.udp_dropped(Dropped::Truncated);
                    continue;
                }
                let local = match msg.cmsgs() {
                    Ok(cmsgs) => super::local_of(cmsgs, &src),
                    Err(_) => Local::None,
                };
                self.answer
                    .push((slot, msg.bytes, SockaddrStorage::from(src), local));
            }
            n
        };
        // Screened once the batch is in: the check reads each datagram.
        let now = std::time::Instant::now();
        let buf = self.buf.as_slice();
        self.answer.retain(|&(slot, len, src, _)| {
            let data = &buf[slot * SLOT..slot * SLOT + len];
            let why = socket_addr(&src).and_then(|src| screen.check(&src, data, board, now));
            if let Some(why) = why {
                board.udp_dropped(why);
            }
            why.is_none()
        });
        let (echoed, error) = self.answer_all(fd);
        if largest > TRIM_ABOVE {
            self.buf.trim();
        }
        Ok(Served {
            received,
            echoed,
            error,
        })
    }

    /// Sends the replies, in order; returns how many went out, and the
    /// error that lost others.
    fn answer_all(&mut self, fd: RawFd) -> (u64, Option<Errno>) {
        let mut out = Outcome::default();
        self.send_each(fd, 0, self.answer.len(), &mut out);
        (out.sent, out.error)
    }

    /// Sends replies `from..to` one datagram each, one `sendmmsg` per run
    /// sent from the same local address (a wildcard socket may have
    /// several).
    fn send_each(&mut self, fd: RawFd, from: usize, to: usize, out: &mut Outcome) {
        if from >= to {
            return;
        }
        let buf = self.buf.as_slice();
        let answer = &self.answer[from..to];
        let slices: Vec<[IoSlice<'_>; 1]> = answer
            .iter()
            .map(|&(slot, len, _, _)| [IoSlice::new(&buf[slot * SLOT..slot * SLOT + len])])
            .collect();
        let addrs: Vec<Option<SockaddrStorage>> =
            answer.iter().map(|&(_, _, a, _)| Some(a)).collect();
        let mut start = 0;
        while start < answer.len() {
            let local = answer[start].3;
            let end = start
                + answer[start..]
                    .iter()
                    .take_while(|a| a.3.same(&local))
                    .count();
            let mut at = start;
            while at < end {
                let (slices, addrs) = (slices[at..end].iter(), &addrs[at..end]);
                let flags = MsgFlags::empty();
                let result = match &local {
                    Local::None => sendmmsg(fd, &mut self.send_plain, slices, addrs, [], flags)
                        .map(|r| r.count()),
                    Local::V4(got) => {
                        let info = super::reply_info_v4(got);
                        let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
                        sendmmsg(fd, &mut self.send_info, slices, addrs, cmsg, flags)
                            .map(|r| r.count())
                    }
                    Local::V6(got) => {
                        let cmsg = [ControlMessage::Ipv6PacketInfo(got)];
                        sendmmsg(fd, &mut self.send_info, slices, addrs, cmsg, flags)
                            .map(|r| r.count())
                    }
                };
                match result {
                    Ok(0) => break,
                    Ok(n) => {
                        at += n;
                        out.sent += n as u64;
                    }
                    Err(Errno::EINTR) => {}
                    // The rest of this run is lost, as a datagram may be.
                    Err(e) => {
                        out.error.get_or_insert(e);
                        break;
                    }
                }
            }
            start = end;
        }
    }
}

/// Replies sent, and the first error that lost some.
#[derive(Default)]
struct Outcome {
    sent: u64,
    error: Option<Errno>,
}

/// Room for the packet-info messages of one datagram: an IPv4 datagram on
/// a dual-stack socket brings both kinds.
fn recv_cmsg() -> Option<Vec<u8>> {
    Some(nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo))
}
