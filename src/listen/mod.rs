//! Listening sockets: address syntax, bind and listen, accept.
//!
//! Every socket is close-on-exec and non-blocking, has SO_REUSEADDR set before
//! `bind` (never SO_REUSEPORT: a second instance must not share the port
//! silently), and is named by the address it really got (port 0 resolved).
//! A unix socket's file belongs to the process that bound it: only that
//! process removes it, when the listener is dropped.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, AT_FDCWD};
use nix::sys::socket::{
    self, setsockopt, sockopt, AddressFamily, Backlog, SockType, SockaddrIn, SockaddrIn6,
    SockaddrStorage, UnixAddr,
};
use nix::sys::stat::{umask, Mode};
use nix::unistd::fchownat;

use crate::{access, sys};

mod addr;
pub use addr::ListenAddr;

/// What a listener is for: which kind of child takes what comes to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// Echo connections, accepted by the pool (or the fork-mode master).
    Echo,
    /// Echo datagrams, read by the UDP workers, never accepted from.
    Datagrams,
    /// `--metrics`: accepted from by the metrics worker only.
    Metrics,
}

impl Service {
    /// What a socket bound for echo is for: datagrams or connections.
    fn of_socket(udp: bool) -> Service {
        if udp {
            Service::Datagrams
        } else {
            Service::Echo
        }
    }
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    name: String,
    /// A TCP socket (not a unix one, nor UDP).
    tcp: bool,
    service: Service,
    /// The address it was bound for; `None` if a service manager passed it.
    addr: Option<ListenAddr>,
    /// The socket file of a unix listener we bound, removed when it drops.
    file: Option<SocketFile>,
}

impl Listener {
    /// The bound address with its real port (`127.0.0.1:40123`, `[::]:7`,
    /// `unix:/run/echo.sock`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether its socket file is ours to remove (a unix socket we bound).
    pub fn owns_file(&self) -> bool {
        self.file.is_some()
    }

    /// Leaves its socket file in place when it is closed (a restart: the
    /// socket lives on in the service manager's store, and the next
    /// instance listens there).
    pub fn keep_file(&mut self) {
        if let Some(f) = self.file.take() {
            std::mem::forget(f);
        }
    }

    /// A listener a previous master passed across its re-exec (USR2): as
    /// [`Listener::from_inherited`], plus what it knew of it.
    pub fn adopt_passed(
        fd: OwnedFd,
        configured: Option<&str>,
        owns_file: bool,
    ) -> Result<Listener, String> {
        let mut l = Listener::from_inherited(fd)?;
        l.addr = configured.map(str::parse).transpose()?;
        if matches!(l.addr, Some(ListenAddr::Metrics(_))) {
            l.service = Service::Metrics;
            l.name = format!("metrics:{}", l.name);
        }
        if owns_file {
            if let Some(path) = l.name.strip_prefix("unix:") {
                l.file = Some(SocketFile {
                    path: PathBuf::from(path),
                    owner: std::process::id(),
                });
            }
        }
        Ok(l)
    }

    /// The configured address it was bound for (`None`: passed to us).
    pub fn configured(&self) -> Option<&ListenAddr> {
        self.addr.as_ref()
    }

    /// Gives a unix socket file we bound the mode and group asked for now
    /// (a reload may change them); does nothing for other listeners.
    pub fn set_permissions(&self, opts: &BindOptions) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let Some(f) = &self.file else { return Ok(()) };
        let fail = |e: String| format!("cannot set the permissions of {}: {e}", self.name);
        // Only our socket: never follow a link someone put in its place.
        match std::fs::symlink_metadata(&f.path) {
            Ok(m) if m.file_type().is_socket() => {}
            _ => return Err(fail("it is no longer a socket".into())),
        }
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(opts.socket_mode))
            .map_err(|e| fail(crate::logging::error_text(&e)))?;
        if let Some(gid) = opts.socket_group {
            fchownat(
                AT_FDCWD,
                &f.path,
                None,
                Some(gid),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| fail(e.desc().to_lowercase()))?;
        }
        Ok(())
    }

    /// In a forked child: closes the socket and forgets the rest, which
    /// would otherwise be freed, and every heap page the allocator writes
    /// on the way copied from the master (the child never uses them).
    pub fn close_in_child(self) {
        let Listener {
            fd,
            name,
            tcp: _,
            service: _,
            addr,
            file,
        } = self;
        drop(fd);
        std::mem::forget((name, addr, file));
    }

    /// Closes every listener of `list` in a forked child (see
    /// [`Listener::close_in_child`]); the list is left empty, its buffer
    /// not freed.
    pub fn close_all_in_child(list: &mut Vec<Listener>) {
        let mut taken = std::mem::ManuallyDrop::new(std::mem::take(list));
        taken.drain(..).for_each(Listener::close_in_child);
    }

    /// In a forked child: keeps the listeners of `list` that `keep`
    /// selects and closes the others (see [`Listener::close_in_child`]),
    /// freeing nothing.
    pub fn keep_in_child(list: &mut Vec<Listener>, keep: impl Fn(&Listener) -> bool) {
        let mut i = 0;
        while i < list.len() {
            if keep(&list[i]) {
                i += 1;
            } else {
                list.swap_remove(i).close_in_child();
            }
        }
    }

    /// Changes the listen backlog of the bound socket (a reload may).
    pub fn set_backlog(&self, backlog: i32) -> Result<(), String> {
        if self.service == Service::Datagrams {
            return Ok(());
        }
        listen(&self.fd, backlog)
            .map_err(|e| format!("cannot change the backlog of {}: {e}", self.name))
    }

    /// Accepts one connection: close-on-exec and non-blocking.
    pub fn accept(&self) -> io::Result<OwnedFd> {
        sys::accept(self.fd.as_fd())
    }

    /// Makes this process the owner of the socket file (after detaching,
    /// the daemon and not the launcher removes it on exit).
    pub fn adopt(&mut self) {
        if let Some(f) = &mut self.file {
            f.owner = std::process::id();
        }
    }

    /// Connections waiting in the accept queue, as the kernel counts them
    /// (TCP on Linux: what `ss -lnt` shows as Recv-Q); `None` where it
    /// does not say.
    pub fn queued(&self) -> Option<u32> {
        if self.tcp {
            sys::accept_queue(self.fd.as_fd())
        } else {
            None
        }
    }

    /// Connections waiting in the accept queue: [`Listener::queued`]
    /// where the kernel counts them, else 1 if any waits and 0 if none.
    pub fn waiting(&self) -> u32 {
        if let Some(n) = self.queued() {
            return n;
        }
        let mut fds = [nix::poll::PollFd::new(
            self.fd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
            Ok(n) if n > 0 => 1,
            _ => 0,
        }
    }

    /// What it is for.
    pub fn service(&self) -> Service {
        self.service
    }

    /// Whether it is bound to every address (`*`, `[::]`, `0.0.0.0`), so
    /// that each datagram must say which local address it came to.
    pub fn is_wildcard(&self) -> bool {
        socket::getsockname::<SockaddrStorage>(self.fd.as_raw_fd())
            .ok()
            .and_then(|a| access::ip_addr(&a))
            .is_some_and(|a| a.ip().is_unspecified())
    }

    /// Whether this is a TCP listener (its connections get TCP_NODELAY).
    pub fn is_tcp(&self) -> bool {
        self.tcp
    }

    /// Adopts a listening socket handed over by a service manager (socket
    /// activation): makes it close-on-exec and non-blocking and names it by
    /// its bound address. Its socket file, if any, is not ours to remove.
    pub fn from_inherited(fd: OwnedFd) -> Result<Listener, String> {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let kind =
            socket::getsockopt(&fd, sockopt::SockType).map_err(|e| format!("not a socket: {e}"))?;
        let udp = kind == SockType::Datagram;
        let listening = socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
        let stream = listening && kind == SockType::Stream;
        if !(udp || stream) {
            return Err("neither a listening stream socket nor a datagram socket".into());
        }
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| e.to_string())?;
        crate::sys::set_nonblocking(&fd).map_err(|e| e.to_string())?;
        let local: SockaddrStorage =
            socket::getsockname(fd.as_raw_fd()).map_err(|e| e.to_string())?;
        let ip = access::ip_addr(&local);
        let (name, tcp) = if let Some(a) = ip.filter(|_| udp) {
            pktinfo(&fd, &a);
            (format!("udp:{a}"), false)
        } else if let Some(a) = ip {
            (a.to_string(), true)
        } else if udp {
            return Err("a datagram socket that is not IP".into());
        } else if let Some(u) = local.as_unix_addr() {
            let path = u
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(unnamed)".into());
            (format!("unix:{path}"), false)
        } else {
            return Err("not an IP or unix socket".into());
        };
        if tcp {
            let _ = setsockopt(&fd, sockopt::TcpNoDelay, &true);
        }
        Ok(Listener {
            fd,
            name,
            tcp,
            service: Service::of_socket(udp),
            addr: None,
            file: None,
        })
    }
}

/// On a wildcard UDP socket, asks for the address each datagram was sent
/// to, so that the reply leaves from it (IP_PKTINFO, IPV6_RECVPKTINFO).
/// Only Linux's UDP worker reads them (udp/batch.rs): elsewhere a reply
/// leaves from the address the kernel picks for its destination.
fn pktinfo(fd: &OwnedFd, local: &SocketAddr) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        if !local.ip().is_unspecified() {
            return;
        }
        // A dual-stack socket gets IPv4 datagrams too: ask for both.
        let _ = setsockopt(fd, sockopt::Ipv4PacketInfo, &true);
        if local.is_ipv6() {
            let _ = setsockopt(fd, sockopt::Ipv6RecvPacketInfo, &true);
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (fd, local);
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Removes a unix socket's file when dropped, but only in the process that
/// created it: a forked child dropping its copy must leave the file alone.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    owner: u32,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::process::id() == self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How listeners are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindOptions {
    pub backlog: i32,
    /// Permission bits of a unix socket's file.
    pub socket_mode: u32,
    /// The group given to a unix socket's file (`--group`), if any.
    pub socket_group: Option<nix::unistd::Gid>,
}

/// Binds and listens on `addr`. The error names the address and the cause.
pub fn bind(addr: &ListenAddr, opts: &BindOptions) -> Result<Listener, String> {
    let backlog = opts.backlog;
    let ip = |a: &ListenAddr, udp: bool| match a {
        ListenAddr::Any(port) => {
            let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), *port);
            match bind_ip(v6, backlog, true, udp) {
                Err(BindError {
                    errno: Errno::EAFNOSUPPORT | Errno::EADDRNOTAVAIL,
                    ..
                }) => {
                    let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), *port);
                    bind_ip(v4, backlog, false, udp)
                }
                other => other,
            }
        }
        // `[::]` given explicitly is dual-stack too, whatever the
        // system's default (net.ipv6.bindv6only).
        ListenAddr::Tcp(sa) => bind_ip(*sa, backlog, sa.is_ipv6() && sa.ip().is_unspecified(), udp),
        _ => unreachable!("only IP addresses come here"),
    };
    if let ListenAddr::Metrics(inner) = addr {
        let l = bind(inner, opts)?;
        return Ok(Listener {
            name: format!("metrics:{}", l.name),
            service: Service::Metrics,
            addr: Some(addr.clone()),
            ..l
        });
    }
    match addr {
        ListenAddr::Udp(inner) => ip(inner, true),
        ListenAddr::Unix(path) => bind_unix(path, opts),
        other => ip(other, false),
    }
    .map(|l| Listener {
        addr: Some(addr.clone()),
        ..l
    })
    .map_err(|e| e.to_string())
}

struct BindError {
    what: String,
    errno: Errno,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cause = crate::logging::error_text(&io::Error::from(self.errno));
        let hint = match self.errno {
            Errno::EACCES => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            Errno::EADDRINUSE => " (another process listens there; is echo-forkd already running?)",
            Errno::EADDRNOTAVAIL => " (no local interface has that address)",
            _ => "",
        };
        write!(f, "{}: {cause}{hint}", self.what)
    }
}

/// Binds a TCP listener, or a UDP socket (`udp`).
fn bind_ip(
    sa: SocketAddr,
    backlog: i32,
    dual_stack: bool,
    udp: bool,
) -> Result<Listener, BindError> {
    let shown = if udp {
        format!("udp:{sa}")
    } else {
        sa.to_string()
    };
    let fail = |step: &str| {
        let what = format!("cannot {step} {shown}");
        move |errno| BindError { what, errno }
    };
    let family = if sa.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let kind = if udp {
        SockType::Datagram
    } else {
        SockType::Stream
    };
    let fd = crate::sys::socket(family, kind).map_err(fail("create a socket for"))?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(fail("set SO_REUSEADDR on"))?;
    if dual_stack {
        setsockopt(&fd, sockopt::Ipv6V6Only, &false).map_err(fail("make dual-stack"))?;
    }
    if !udp {
        // Accepted sockets inherit TCP_NODELAY from the listener (Linux,
        // BSD); workers set it again only where that is not so.
        setsockopt(&fd, sockopt::TcpNoDelay, &true).map_err(fail("set TCP_NODELAY on"))?;
    }
    let bound = match sa {
        SocketAddr::V4(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => socket::bind(fd.as_raw_fd(), &SockaddrIn6::from(a)),
    };
    bound.map_err(fail("bind"))?;
    if udp {
        pktinfo(&fd, &sa);
    } else {
        listen(&fd, backlog).map_err(fail("listen on"))?;
    }
    let local: SockaddrStorage =
        socket::getsockname(fd.as_raw_fd()).map_err(fail("read the address of"))?;
    let real = access::ip_addr(&local).unwrap_or(sa);
    Ok(Listener {
        fd,
        name: if udp {
            format!("udp:{real}")
        } else {
            real.to_string()
        },
        tcp: !udp,
        service: Service::of_socket(udp),
        addr: None,
        file: None,
    })
}

fn listen(fd: &OwnedFd, backlog: i32) -> nix::Result<()> {
    let backlog = Backlog::new(backlog).unwrap_or(Backlog::MAXCONN);
    socket::listen(fd, backlog)
}

fn bind_unix(path: &Path, opts: &BindOptions) -> Result<Listener, BindError> {
    let name = format!("unix:{}", path.display());
    let fail = |step: &str| {
        let what = format!("cannot {step} {name}");
        move |errno| BindError { what, errno }
    };
    remove_stale(path).map_err(|(why, errno)| BindError {
        what: match why {
            Some(why) => format!("cannot bind {name}: {why}"),
            None => format!("cannot bind {name}"),
        },
        errno,
    })?;
    let fd = crate::sys::socket(AddressFamily::Unix, SockType::Stream)
        .map_err(fail("create a socket for"))?;
    let ua = UnixAddr::new(path).map_err(fail("use the path"))?;
    // The file is created with the mode asked for, not the caller's umask,
    // and is never more open than that, not even for a moment. The master
    // is single-threaded, so the umask is nobody else's meanwhile.
    let old = umask(Mode::from_bits_truncate(
        (!opts.socket_mode & 0o777) as libc::mode_t,
    ));
    let bound = socket::bind(fd.as_raw_fd(), &ua);
    umask(old);
    bound.map_err(fail("bind"))?;
    // From here the file is ours: remove it if anything below fails.
    let file = SocketFile {
        path: path.to_path_buf(),
        owner: std::process::id(),
    };
    if let Some(gid) = opts.socket_group {
        fchownat(
            AT_FDCWD,
            path,
            None,
            Some(gid),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(fail("give the group to"))?;
    }
    listen(&fd, opts.backlog).map_err(fail("listen on"))?;
    Ok(Listener {
        fd,
        name,
        tcp: false,
        service: Service::Echo,
        addr: None,
        file: Some(file),
    })
}

/// A socket file left by a dead server is removed; one that a live server
/// answers on, or anything that is not a socket, is left alone. Err: why
/// not, where the error's own words do not say it (a server answering
/// is EADDRINUSE, whose hint says the rest), and the error.
fn remove_stale(path: &Path) -> Result<(), (Option<&'static str>, Errno)> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    if !meta.file_type().is_socket() {
        return Err((Some("the path exists and is not a socket"), Errno::EEXIST));
    }
    // A probe that never blocks: a live server with a full backlog answers
    // EAGAIN at once, where a blocking connect would wait for it to accept
    // (and hang startup, or the master during a reload).
    let in_use = Err((None, Errno::EADDRINUSE));
    let probe = crate::sys::socket(AddressFamily::Unix, SockType::Stream)
        .map_err(|e| (Some("cannot create a socket to probe it"), e))?;
    let ua = UnixAddr::new(path).map_err(|e| (Some("cannot use the path"), e))?;
    match socket::connect(probe.as_raw_fd(), &ua) {
        Ok(()) | Err(Errno::EAGAIN | Errno::EINPROGRESS) => in_use,
        Err(Errno::ECONNREFUSED) => std::fs::remove_file(path).map_err(|e| {
            (
                Some("cannot remove the stale socket file"),
                Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        }),
        // Not ours to judge (no permission, say): leave it, and let bind
        // say what is wrong.
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
