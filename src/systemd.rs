//! The systemd protocols, without libsystemd: readiness notification
//! (`NOTIFY_SOCKET`, plain datagrams) and socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`). Both variables are removed from the
//! environment once read, so nothing we start inherits them.

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

/// The sockets passed by the service manager, if `LISTEN_PID` is our pid.
///
/// Each becomes close-on-exec and non-blocking; its name is the address it
/// is bound to. An fd that is not a listening stream socket is an error.
pub fn listeners_from_env() -> Result<Option<Vec<Listener>>, String> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
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
    let mut out = Vec::new();
    for raw in FIRST..FIRST + n {
        // SAFETY: LISTEN_PID says these are ours; nothing else took them
        // (close_inherited kept them, untouched), and each is taken once.
        #[allow(unsafe_code)]
        let fd = unsafe { sys::inherited_fd(raw) }
            .ok_or_else(|| format!("socket activation: fd {raw} from LISTEN_FDS is not open"))?;
        out.push(
            Listener::from_inherited(fd)
                .map_err(|e| format!("socket activation: fd {raw}: {e}"))?,
        );
    }
    Ok(Some(out))
}
