//! Datagrams taken and answered one at a time, with `recvmsg` and
//! `sendmsg`: where `recvmmsg` is missing, and on Linux when
//! `ECHO_FORKD_UDP_SINGLE=1` asks for it (the tests).

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::RawFd;

use nix::sys::socket::{recvmsg, sendmsg, MsgFlags, SockaddrStorage};

use super::{socket_addr, Local, Screen, Served};
use crate::scoreboard::{Dropped, Scoreboard};
use crate::sys::IoBuffer;

/// Room for one datagram: the largest UDP payload fits.
const SIZE: usize = 64 * 1024;

/// One datagram's buffer and room for its packet-info message.
pub struct Single {
    buf: IoBuffer,
    cmsg: Vec<u8>,
}

impl Single {
    /// Maps the buffer.
    pub fn new() -> std::io::Result<Single> {
        Ok(Single {
            buf: IoBuffer::new(SIZE)?,
            // Linux's packet info; elsewhere nothing asks for it (listen/).
            #[cfg(any(target_os = "linux", target_os = "android"))]
            cmsg: nix::cmsg_space!(libc::in6_pktinfo, libc::in_pktinfo),
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            cmsg: Vec::new(),
        })
    }

    /// Receives one datagram from `fd`, screens it, and answers it if it
    /// passes. Err: the receive failed (EAGAIN: nothing was waiting).
    pub fn serve(
        &mut self,
        fd: RawFd,
        _wildcard: bool,
        screen: &mut Screen,
        board: &Scoreboard,
    ) -> nix::Result<Served> {
        let buf = self.buf.as_mut_slice();
        let (n, src, local) = {
            let mut iov = [IoSliceMut::new(buf)];
            let msg =
                recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut self.cmsg), MsgFlags::empty())?;
            let src = msg.address.as_ref().and_then(socket_addr);
            let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let local = match (msg.cmsgs(), &src) {
                (Ok(cmsgs), Some(src)) => super::local_of(cmsgs, src),
                _ => Local::None,
            };
            #[cfg(not(any(target_os = "linux", target_os = "android")))]
            let local = Local::None;
            let none = |_| Served {
                received: 1,
                echoed: 0,
                error: None,
            };
            let Some(src) = src else {
                return Ok(none(()));
            };
            if truncated {
                board.udp_dropped(Dropped::Truncated);
                return Ok(none(()));
            }
            (msg.bytes, src, local)
        };
        if let Some(why) = screen.check(&src, &buf[..n], board, std::time::Instant::now()) {
            board.udp_dropped(why);
            return Ok(Served {
                received: 1,
                echoed: 0,
                error: None,
            });
        }
        let sent = reply(fd, &buf[..n], &src, local);
        Ok(Served {
            received: 1,
            echoed: u64::from(sent.is_ok()),
            error: sent.err(),
        })
    }
}

/// Sends `data` back to `src`, from `local` if known.
fn reply(fd: RawFd, data: &[u8], src: &SocketAddr, local: Local) -> nix::Result<usize> {
    let to = SockaddrStorage::from(*src);
    let iov = [IoSlice::new(data)];
    match local {
        Local::None => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&to)),
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Local::V4(got) => {
            let info = super::reply_info_v4(&got);
            let cmsg = [nix::sys::socket::ControlMessage::Ipv4PacketInfo(&info)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&to))
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Local::V6(got) => {
            let cmsg = [nix::sys::socket::ControlMessage::Ipv6PacketInfo(&got)];
            sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&to))
        }
    }
}
