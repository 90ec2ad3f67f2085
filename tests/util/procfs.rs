//! Processes as /proc shows them: every pid, a process's state, parent,
//! stat fields, context switches and command line; and the descriptors
//! they hold: which process holds the server's end of a connection (its
//! socket's inode, from /proc/net/tcp, among /proc/PID/fd), so that a test
//! can see a connection change process.

use std::net::{SocketAddr, TcpStream};

/// Every pid in /proc right now.
pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `(pid, state)` of every process whose parent is `ppid`.
pub fn proc_children(ppid: i32) -> Vec<(i32, char)> {
    all_pids()
        .into_iter()
        .filter_map(|pid| match proc_stat(pid) {
            Some((state, parent)) if parent == ppid => Some((pid, state)),
            _ => None,
        })
        .collect()
}

/// `(state, ppid)` of a process, `None` if it is gone.
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Voluntary context switches of a process so far.
pub fn voluntary_switches(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether a process is gone (or only a zombie waiting to be reaped).
pub fn is_dead(pid: i32) -> bool {
    !matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// Live processes whose command line contains `needle` (a test's unique
/// temporary path, say).
pub fn processes_with_arg(needle: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(needle))
                && !is_dead(pid)
        })
        .collect()
}

/// Fields of /proc/PID/stat after the command name, 0-based from the state
/// (so index 3 is the session id, 4 the controlling tty).
pub fn stat_fields(pid: i32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(i) = stat.rfind(')') else {
        return Vec::new();
    };
    stat[i + 2..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A TCP connection on this machine as its client's socket names it: its
/// own address and the server's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ends {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl Ends {
    /// The ends of the connection `s` is the client's side of.
    pub fn of(s: &TcpStream) -> Ends {
        Ends {
            client: s.local_addr().expect("the client's address"),
            server: s.peer_addr().expect("the server's address"),
        }
    }

    /// The inode of the server's socket for this connection, as
    /// /proc/net/tcp (or tcp6) lists it: the same in whichever process
    /// holds it, and across a hand-over (the socket itself travels).
    /// `None` while the server has not accepted it (a socket in the
    /// backlog has no inode yet), and once it is closed.
    pub fn server_socket(&self) -> Option<u64> {
        let table = match self.server {
            SocketAddr::V4(_) => "/proc/net/tcp",
            SocketAddr::V6(_) => "/proc/net/tcp6",
        };
        let (local, remote) = (net_hex(self.server), net_hex(self.client));
        std::fs::read_to_string(table)
            .ok()?
            .lines()
            .skip(1)
            .find_map(|line| {
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                let f: Vec<&str> = line.split_whitespace().collect();
                let inode: u64 = f.get(9)?.parse().ok()?;
                (f.get(1) == Some(&local.as_str())
                    && f.get(2) == Some(&remote.as_str())
                    && inode != 0)
                    .then_some(inode)
            })
    }
}

/// An address as /proc/net/tcp writes it: the address's 32-bit words in
/// the machine's byte order, then the port, in hex.
fn net_hex(a: SocketAddr) -> String {
    let octets = match a {
        SocketAddr::V4(v4) => v4.ip().octets().to_vec(),
        SocketAddr::V6(v6) => v6.ip().octets().to_vec(),
    };
    let words: String = octets
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect();
    format!("{words}:{:04X}", a.port())
}

/// The inodes of the sockets among `pid`'s descriptors (none once it is
/// gone or a zombie).
pub fn sockets_of(pid: i32) -> Vec<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether `pid` holds an io_uring instance among its descriptors.
pub fn holds_a_ring(pid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    dir.flatten().any(|e| {
        std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:[io_uring]")
    })
}
