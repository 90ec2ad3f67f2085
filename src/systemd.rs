//! The systemd protocols, without libsystemd: readiness notification
//! (`NOTIFY_SOCKET`, plain datagrams), socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`), and the file descriptor
//! store (`FDSTORE=1` with `FDNAME=`, the descriptors attached): the
//! listening sockets wait there across a restart, so that clients queue
//! in their backlog instead of being refused, and so does the vault
//! (vault.rs), in which open connections wait for the next instance. What
//! comes back at start is told apart by its name: [`LISTENER`], the
//! vault's and [`CONNECTION`] (one connection each, as a release before
//! the vault stored them) are ours, anything else is socket activation's.
//! The variables are removed from the environment once read, so nothing
//! we start inherits them.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use crate::listen::Listener;
use crate::sys;

/// A connection to the service manager's notification socket.
///
/// What must arrive (READY=1, RELOADING=1, STOPPING=1, what is stored
/// and removed) is never dropped: a message the socket cannot take now
/// (systemd reads its queue of 512 datagrams as it can) waits in an
/// outbox, in order, and goes as soon as the socket has room (the master
/// polls it for that, [`Notify::wants_write`]). A `STATUS=` alone
/// replaces the one waiting before it, so the outbox never grows with
/// figures that are stale anyway.
pub struct Notify {
    sock: UnixDatagram,
    outbox: std::cell::RefCell<std::collections::VecDeque<Outgoing>>,
}

/// A notification waiting to go, with the descriptors it stores.
struct Outgoing {
    msg: String,
    fds: Vec<OwnedFd>,
}

impl Outgoing {
    fn status_only(&self) -> bool {
        self.fds.is_empty() && self.msg.starts_with("STATUS=") && !self.msg.contains('\n')
    }
}

impl Notify {
    /// Reads `NOTIFY_SOCKET`; `None` when it is not set or not usable.
    pub fn from_env() -> Option<Notify> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        std::env::remove_var("NOTIFY_SOCKET");
        let sock = UnixDatagram::unbound().ok()?;
        match path.as_encoded_bytes().strip_prefix(b"@") {
            // An abstract socket, as systemd uses inside containers.
            #[cfg(any(target_os = "linux", target_os = "android"))]
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).ok()?;
                sock.connect_addr(&addr).ok()?;
            }
            _ => sock.connect(PathBuf::from(&path)).ok()?,
        }
        sock.set_nonblocking(true).ok()?;
        Some(Notify::with(sock))
    }

    fn with(sock: UnixDatagram) -> Notify {
        Notify {
            sock,
            outbox: Default::default(),
        }
    }

    /// The socket's descriptor, to pass across a re-exec, or to poll.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.sock.as_raw_fd()
    }

    /// The socket, to poll for room while messages wait.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.sock.as_fd()
    }

    /// The socket a previous master passed across its re-exec (USR2).
    pub fn adopt(fd: std::os::fd::OwnedFd) -> Notify {
        let sock = UnixDatagram::from(fd);
        let _ = sock.set_nonblocking(true);
        Notify::with(sock)
    }

    /// Sends one notification (`READY=1`, `STATUS=…`, several lines joined
    /// by newlines), now or, if the socket is full, as soon as it has
    /// room. Never blocks.
    pub fn send(&self, msg: &str) {
        self.queue(Outgoing {
            msg: msg.to_string(),
            fds: Vec::new(),
        });
    }

    /// Puts `fds` in the service's file descriptor store as `name` (which
    /// the unit's `FileDescriptorStoreMax=` must leave room for; systemd
    /// ignores it otherwise), all in one message. Never blocks.
    pub fn store(&self, fds: &[BorrowedFd<'_>], name: &str) -> std::io::Result<()> {
        let fds = fds
            .iter()
            .map(|fd| fd.try_clone_to_owned())
            .collect::<std::io::Result<Vec<_>>>()?;
        self.queue(Outgoing {
            msg: format!("FDSTORE=1\nFDNAME={name}"),
            fds,
        });
        Ok(())
    }

    /// Takes every descriptor named `name` out of the store (systemd
    /// closes them).
    pub fn unstore(&self, name: &str) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }

    fn queue(&self, out: Outgoing) {
        let mut outbox = self.outbox.borrow_mut();
        if out.status_only() && outbox.back().is_some_and(Outgoing::status_only) {
            outbox.pop_back();
        }
        outbox.push_back(out);
        drop(outbox);
        self.flush();
    }

    /// Sends what waits, in order, while the socket takes it; true once
    /// nothing waits. A manager that is gone takes nothing more: what
    /// waits is dropped.
    pub fn flush(&self) -> bool {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let mut outbox = self.outbox.borrow_mut();
        while let Some(out) = outbox.front() {
            let fds: Vec<_> = out.fds.iter().map(|f| f.as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&fds)];
            let sent = sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[std::io::IoSlice::new(out.msg.as_bytes())],
                if fds.is_empty() { &[] } else { &cmsg },
                MsgFlags::MSG_DONTWAIT | crate::sys::no_signal(),
                None,
            );
            match sent {
                Ok(_) => {
                    outbox.pop_front();
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::ENOBUFS) => return false,
                Err(e) => {
                    log::warn!(
                        "the service manager's notification socket refuses messages ({e}): {} not sent",
                        crate::logging::counted(outbox.len() as u64, "message", "messages")
                    );
                    outbox.clear();
                }
            }
        }
        true
    }

    /// Whether messages wait for room in the socket.
    pub fn wants_write(&self) -> bool {
        !self.outbox.borrow().is_empty()
    }

    /// Before this process exits or re-executes itself: sends what waits,
    /// waiting for room at most `for_at_most`.
    pub fn flush_within(&self, for_at_most: std::time::Duration) {
        let until = std::time::Instant::now() + for_at_most;
        while !self.flush() {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::warn!(
                    "the service manager did not read its notification socket for {} ms: {} not sent",
                    for_at_most.as_millis(),
                    crate::logging::counted(self.outbox.borrow().len() as u64, "message", "messages")
                );
                return;
            }
            let mut fds = [nix::poll::PollFd::new(
                self.fd(),
                nix::poll::PollFlags::POLLOUT,
            )];
            let _ = nix::poll::poll(&mut fds, crate::time::poll_timeout(Some(left)));
        }
    }
}

/// The name prefix of a listening socket of ours in the store, followed by
/// its configured address in hex.
pub const LISTENER: &str = "l";
/// The name prefix of a connection stored alone, followed by what it
/// carries in hex and a serial: how the release before the vault kept
/// them (one name each), still read so that an upgrade from it cuts none.
pub const CONNECTION: &str = "c";

/// A store name for the listener bound for `configured`.
pub fn listener_name(configured: &str) -> String {
    format!("{LISTENER}{}", hex(configured.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// What the service manager passed at start.
#[derive(Default)]
pub struct Passed {
    /// Socket activation's listening sockets.
    pub activated: Vec<Listener>,
    /// Our listening sockets from the store, by configured address.
    pub listeners: Vec<(String, OwnedFd)>,
    /// The vault's two ends, from the store.
    pub vault: Vec<OwnedFd>,
    /// Connections stored one by one (by a release before the vault):
    /// their name, what they carry (encoded), and the socket.
    pub connections: Vec<(String, Vec<u8>, OwnedFd)>,
}

/// The unit this process runs as, from its control group
/// (`0::/system.slice/echo-forkd.service`); `None` outside a service.
pub fn unit_name() -> Option<String> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cg.lines().find_map(|l| l.strip_prefix("0::"))?;
    let unit = path.rsplit('/').next()?;
    unit.ends_with(".service").then(|| unit.to_string())
}

/// Whether `fd` is one the service manager passes to this process
/// (socket activation), read without consuming the variables.
pub fn is_passed(fd: std::os::fd::RawFd) -> bool {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<i32>().ok())
        .unwrap_or(0);
    ours && (FIRST..FIRST.saturating_add(n)).contains(&fd)
}

/// The first socket passed (SD_LISTEN_FDS_START).
const FIRST: i32 = 3;

/// What the service manager passed, if `LISTEN_PID` is our pid: socket
/// activation's listeners, and what the store kept (see the module's
/// doc).
///
/// Each socket becomes close-on-exec and non-blocking; a listener's name
/// is the address it is bound to. A socket activation's descriptor that
/// is not a listening socket is an error.
pub fn passed_from_env() -> Result<Option<Passed>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (our parent, say): not ours to use.
        return Ok(None);
    }
    let n: i32 = fds
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={fds}: not a number"))?;
    let mut names = names.split(':');
    let mut out = Passed::default();
    for raw in FIRST..FIRST + n {
        // SAFETY: LISTEN_PID says these are ours; nothing else took them
        // (close_inherited kept them, untouched), and each is taken once.
        #[allow(unsafe_code)]
        let fd = unsafe { sys::inherited_fd(raw) }
            .ok_or_else(|| format!("socket activation: fd {raw} from LISTEN_FDS is not open"))?;
        let name = names.next().unwrap_or("");
        if name == crate::vault::NAME {
            out.vault.push(fd);
            continue;
        }
        if let Some(addr) = name
            .strip_prefix(LISTENER)
            .and_then(unhex)
            .and_then(|a| String::from_utf8(a).ok())
        {
            out.listeners.push((addr, fd));
            continue;
        }
        if let Some(carried) = name
            .strip_prefix(CONNECTION)
            .and_then(|rest| unhex(rest.split('-').next()?))
        {
            out.connections.push((name.to_string(), carried, fd));
            continue;
        }
        out.activated.push(
            Listener::from_inherited(fd)
                .map_err(|e| format!("socket activation: fd {raw}: {e}"))?,
        );
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// A manager's socket that reads nothing yet, and ours connected to
    /// it, filled until it takes no more.
    fn full_manager() -> (UnixDatagram, Notify) {
        let (manager, ours) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        while ours.send(b"STATUS=filler").is_ok() {}
        (manager, Notify::with(ours))
    }

    /// What the manager reads as it empties its queue, ours sending what
    /// waits as room comes.
    fn read_all(manager: &UnixDatagram, n: &Notify) -> Vec<String> {
        manager.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            while let Ok(k) = manager.recv(&mut buf) {
                got.push(String::from_utf8_lossy(&buf[..k]).into_owned());
                n.flush();
            }
            if !n.wants_write() {
                break;
            }
            assert!(n.flush(), "room, and nothing sent");
        }
        got.retain(|m| m != "STATUS=filler");
        got
    }

    #[test]
    fn what_must_arrive_waits_for_room_in_order_and_stale_status_is_replaced() {
        let (manager, n) = full_manager();
        n.send("RELOADING=1");
        n.send("STATUS=one");
        n.send("STATUS=two");
        n.unstore("l00");
        n.send("STATUS=three");
        n.send("STATUS=four");
        n.send("READY=1\nSTATUS=five");
        assert!(n.wants_write(), "the socket was full: nothing could go");
        let got = read_all(&manager, &n);
        assert_eq!(
            got,
            [
                "RELOADING=1",
                "STATUS=two",
                "FDSTOREREMOVE=1\nFDNAME=l00",
                "STATUS=four",
                "READY=1\nSTATUS=five"
            ]
        );
        assert!(!n.wants_write());
    }

    #[test]
    fn stored_descriptors_wait_with_their_message() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let (manager, n) = full_manager();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        n.store(&[a.as_fd(), a.as_fd()], "vault").unwrap();
        drop(a);
        assert!(n.wants_write());
        manager.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
        loop {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let got = recvmsg::<()>(
                manager.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map(|m| {
                let fds: Vec<_> = m
                    .cmsgs()
                    .map(|c| {
                        c.flat_map(|c| match c {
                            ControlMessageOwned::ScmRights(f) => f,
                            _ => Vec::new(),
                        })
                        .collect()
                    })
                    .unwrap_or_default();
                (m.bytes, fds)
            });
            match got {
                Ok((k, fds)) if buf[..k].starts_with(b"FDSTORE=1") => {
                    assert_eq!(fds.len(), 2, "both ends in one message");
                    for fd in fds {
                        let _ = nix::unistd::close(fd);
                    }
                    return;
                }
                Ok(_) => {
                    n.flush();
                }
                Err(_) => {
                    assert!(n.wants_write(), "sent, and never received");
                    n.flush();
                }
            }
        }
    }

    #[test]
    fn store_names_round_trip() {
        let l = listener_name("[::]:7");
        assert!(l.starts_with(LISTENER) && l.len() < 256);
        let back = unhex(l.strip_prefix(LISTENER).unwrap()).unwrap();
        assert_eq!(String::from_utf8(back).unwrap(), "[::]:7");
        // systemd refuses names with ':' (its separator) or beyond 255.
        assert!(!l.contains(':'));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
