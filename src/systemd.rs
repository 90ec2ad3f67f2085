//! The systemd protocols, without libsystemd: readiness notification
//! (`NOTIFY_SOCKET`, plain datagrams), socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`/`LISTEN_FDNAMES`), and the file descriptor
//! store (`FDSTORE=1` with `FDNAME=`, the descriptor attached): the
//! listening sockets wait there across a restart, so that clients queue
//! in their backlog instead of being refused, and the connections a
//! restarting master collects wait there for the next instance. What
//! comes back at start is told apart by its name: [`LISTENER`] and
//! [`CONNECTION`] are ours, anything else is socket activation's. The
//! variables are removed from the environment once read, so nothing we
//! start inherits them.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

use crate::listen::Listener;
use crate::sys;

/// A connection to the service manager's notification socket.
pub struct Notify {
    sock: UnixDatagram,
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
        Some(Notify { sock })
    }

    /// The socket's descriptor, to pass across a re-exec.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }

    /// The socket a previous master passed across its re-exec (USR2).
    pub fn adopt(fd: std::os::fd::OwnedFd) -> Notify {
        let sock = UnixDatagram::from(fd);
        let _ = sock.set_nonblocking(true);
        Notify { sock }
    }

    /// Sends one notification (`READY=1`, `STATUS=…`, several lines joined
    /// by newlines). Never blocks; a lost notification is not an error.
    pub fn send(&self, msg: &str) {
        let _ = self.sock.send(msg.as_bytes());
    }

    /// Puts `fd` in the service's file descriptor store as `name` (which
    /// the unit's `FileDescriptorStoreMax=` must leave room for; systemd
    /// ignores it otherwise). Never blocks.
    pub fn store(&self, fd: BorrowedFd<'_>, name: &str) -> nix::Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let msg = format!("FDSTORE=1\nFDNAME={name}");
        let fds = [fd.as_raw_fd()];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[std::io::IoSlice::new(msg.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_DONTWAIT | crate::sys::no_signal(),
            None,
        )
        .map(drop)
    }

    /// Takes every descriptor named `name` out of the store (systemd
    /// closes them).
    pub fn unstore(&self, name: &str) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
    }
}

/// The name prefix of a listening socket of ours in the store, followed by
/// its configured address in hex.
pub const LISTENER: &str = "l";
/// The name prefix of a connection in the store, followed by what it
/// carries in hex and a serial.
pub const CONNECTION: &str = "c";

/// A store name for the listener bound for `configured`.
pub fn listener_name(configured: &str) -> String {
    format!("{LISTENER}{}", hex(configured.as_bytes()))
}

/// A store name for a connection carrying `carried` (the `n`th stored).
pub fn connection_name(carried: &[u8], n: u64) -> String {
    format!("{CONNECTION}{}-{n}", hex(carried))
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
    /// Connections from the store: their name, what they carry (encoded),
    /// and the socket.
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

    #[test]
    fn store_names_round_trip() {
        let l = listener_name("[::]:7");
        assert!(l.starts_with(LISTENER) && l.len() < 256);
        let back = unhex(l.strip_prefix(LISTENER).unwrap()).unwrap();
        assert_eq!(String::from_utf8(back).unwrap(), "[::]:7");
        let c = connection_name(&[0xab; 64], 7);
        assert!(c.starts_with(CONNECTION) && c.ends_with("-7") && c.len() < 256);
        // systemd refuses names with ':' (its separator) or beyond 255.
        assert!(!l.contains(':') && !c.contains(':'));
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("abc"), None);
    }
}
