//! Descriptors: accepting (accept4), new sockets and pipes made
//! close-on-exec and non-blocking in one call where the system allows,
//! flock, closing what a parent left open, taking an inherited one, and
//! RLIMIT_NOFILE. Each wraps a call or two on descriptors; none forks or
//! maps memory (process.rs, memory.rs).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Tries to take an exclusive flock(2) on `file` without waiting; false if
/// another process holds it. The lock belongs to the open file description,
/// so closing a forked copy of the fd does not release it (unlike nix's
/// `Flock`, which unlocks on drop in whichever process drops it).
pub fn try_lock(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: flock only acts on the descriptor, which `file` keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        e => Err(e),
    }
}

/// `accept4` with SOCK_CLOEXEC | SOCK_NONBLOCK (one syscall, no fcntl);
/// Apple's systems, which lack it, set the flags after `accept`.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    accept_numbered(listener.as_raw_fd())
}

/// [`accept`] on a listener known by its number (a lean fork-mode child
/// keeps its listeners' numbers, not the master's objects): accepting
/// changes nothing of the descriptor, whoever owns it.
pub fn accept_numbered(listener: RawFd) -> io::Result<OwnedFd> {
    #[cfg(not(target_vendor = "apple"))]
    {
        let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        // SAFETY: null address pointers are allowed; on success the return
        // value is a new descriptor that nothing else owns.
        let fd =
            unsafe { libc::accept4(listener, std::ptr::null_mut(), std::ptr::null_mut(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by accept4 and is owned by no one.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    #[cfg(target_vendor = "apple")]
    {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
        let raw = nix::sys::socket::accept(listener)?;
        // SAFETY: `raw` was just returned by accept and is owned by no one.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
        fcntl(&fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        Ok(fd)
    }
}

/// The length of a listening TCP socket's accept queue, as the kernel
/// counts it (Linux's `tcp_info.tcpi_unacked` on a listener); `None`
/// where it is not available.
pub fn accept_queue(listener: BorrowedFd<'_>) -> Option<u32> {
    #[cfg(all(target_os = "linux", any(target_env = "gnu", target_env = "musl")))]
    {
        // SAFETY: tcp_info is plain integers, valid zeroed; getsockopt
        // writes at most `len` bytes into it and says how many it wrote.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        let needed = std::mem::offset_of!(libc::tcp_info, tcpi_unacked) + 4;
        (rc == 0 && len as usize >= needed).then_some(info.tcpi_unacked)
    }
    #[cfg(not(all(target_os = "linux", any(target_env = "gnu", target_env = "musl"))))]
    {
        let _ = listener;
        None
    }
}

/// Where the system has them, the flags that make a new socket
/// close-on-exec and non-blocking in the call that makes it; Apple's
/// systems have neither, and [`socket`] and [`socketpair`] set both after.
#[cfg(not(target_vendor = "apple"))]
const NEW_SOCKET: nix::sys::socket::SockFlag =
    nix::sys::socket::SockFlag::SOCK_CLOEXEC.union(nix::sys::socket::SockFlag::SOCK_NONBLOCK);

/// Close-on-exec and non-blocking, after the fact (Apple's systems). No
/// thread of ours can fork in between: a process that forks has no other.
#[cfg(target_vendor = "apple")]
fn cloexec_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    set_nonblocking(fd)
}

/// A new socket, close-on-exec and non-blocking.
pub fn socket(
    family: nix::sys::socket::AddressFamily,
    kind: nix::sys::socket::SockType,
) -> nix::Result<OwnedFd> {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::sys::socket::socket(family, kind, NEW_SOCKET, None)
    }
    #[cfg(target_vendor = "apple")]
    {
        let fd = nix::sys::socket::socket(family, kind, nix::sys::socket::SockFlag::empty(), None)?;
        cloexec_nonblocking(&fd)?;
        Ok(fd)
    }
}

/// A connected pair of sockets, both close-on-exec and non-blocking.
pub fn socketpair(
    family: nix::sys::socket::AddressFamily,
    kind: nix::sys::socket::SockType,
) -> nix::Result<(OwnedFd, OwnedFd)> {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::sys::socket::socketpair(family, kind, None, NEW_SOCKET)
    }
    #[cfg(target_vendor = "apple")]
    {
        let (a, b) =
            nix::sys::socket::socketpair(family, kind, None, nix::sys::socket::SockFlag::empty())?;
        cloexec_nonblocking(&a)?;
        cloexec_nonblocking(&b)?;
        Ok((a, b))
    }
}

/// A pipe, close-on-exec, and non-blocking if `nonblocking`: `pipe2`
/// where the system has it, `pipe` and `fcntl` on Apple's systems.
pub fn pipe(nonblocking: bool) -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::fcntl::OFlag;
    #[cfg(not(target_vendor = "apple"))]
    {
        let flags = if nonblocking {
            OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
        } else {
            OFlag::O_CLOEXEC
        };
        nix::unistd::pipe2(flags)
    }
    #[cfg(target_vendor = "apple")]
    {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag};
        let (r, w) = nix::unistd::pipe()?;
        for fd in [&r, &w] {
            fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
            if nonblocking {
                fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
            }
        }
        Ok((r, w))
    }
}

/// `MSG_NOSIGNAL` where sends have it. SIGPIPE is ignored in every process
/// of ours (Rust's runtime does it before `main`), so where the flag is
/// missing (Apple's systems) a send to a closed peer fails with EPIPE all
/// the same.
pub fn no_signal() -> nix::sys::socket::MsgFlags {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL
    }
    #[cfg(target_vendor = "apple")]
    {
        nix::sys::socket::MsgFlags::empty()
    }
}

/// The socket this process waits on in a blocking read, or -1: what a
/// signal makes non-blocking (see echo/block.rs). Written only by the one
/// thread of a fork-mode child; read by its signal handler.
static BLOCKED_READER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Names (or, `None`, forgets) the socket this process is about to wait on
/// in a blocking read. It must stay open until it is forgotten.
pub fn name_blocked_reader(fd: Option<RawFd>) {
    BLOCKED_READER.store(fd.unwrap_or(-1), std::sync::atomic::Ordering::SeqCst);
}

/// In a signal handler: makes the socket named by [`name_blocked_reader`]
/// non-blocking, so that its read, or one about to start, returns at once.
/// Async-signal-safe: a load and one `fcntl`.
pub fn wake_blocked_reader() {
    let fd = BLOCKED_READER.load(std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: fcntl(2) is async-signal-safe; `fd` is open while it is
        // named (the contract above); F_SETFL changes only its status
        // flags, and a socket has no other one that matters here.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
    }
}

/// Whether `fd` is non-blocking (false if that cannot be read).
pub fn is_nonblocking(fd: &impl std::os::fd::AsFd) -> bool {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    fcntl(fd, FcntlArg::F_GETFL)
        .is_ok_and(|f| OFlag::from_bits_truncate(f).contains(OFlag::O_NONBLOCK))
}

/// Clears O_NONBLOCK on a socket that has no other status flag set (one
/// accepted or received here).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
pub fn set_blocking_socket(fd: &impl std::os::fd::AsFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    fcntl(fd, FcntlArg::F_SETFL(OFlag::empty())).map(drop)
}

/// Sets O_NONBLOCK on an fd we were handed, keeping its other status flags.
pub fn set_nonblocking(fd: &impl std::os::fd::AsFd) -> nix::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

/// Closes every descriptor above 2 that `keep` does not claim: whatever a
/// careless parent left open must not reach every child we fork. Call it
/// first thing, while nothing of ours is open yet.
pub fn close_inherited(keep: impl Fn(RawFd) -> bool) {
    let listed = ["/proc/self/fd", "/dev/fd"].iter().find_map(|d| {
        let dir = std::fs::read_dir(d).ok()?;
        Some(
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
                .collect::<Vec<_>>(),
        )
    });
    // The directory's own descriptor is in the list, closed by now: its
    // close below fails harmlessly, as nothing was opened in between.
    let fds = listed.unwrap_or_else(|| {
        let (soft, _) = nofile_limit();
        (3..soft.min(65_536) as RawFd).collect()
    });
    for fd in fds.into_iter().filter(|&fd| fd > 2 && !keep(fd)) {
        // Nothing in this process owns these numbers: no OwnedFd is
        // closed behind its back.
        let _ = nix::unistd::close(fd);
    }
}

/// Closes every descriptor from `lo` to `hi` (inclusive), which must all be
/// this process's to close and owned by nothing that closes them again:
/// one `close_range` where the kernel has it (Linux 5.9, FreeBSD 13), one
/// `close` each elsewhere.
pub fn close_range(lo: RawFd, hi: RawFd) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        if close_range_raw(lo as libc::c_uint, hi as libc::c_uint) {
            return;
        }
    }
    for fd in lo..=hi {
        let _ = nix::unistd::close(fd);
    }
}

/// close_range(2) of `lo..=hi`; false where the system has none. The
/// caller owns every descriptor in the range, and nothing closes one of
/// them again. glibc's wrapper where there is one: it sits beside read
/// and write, where `syscall` would be one more page of libc for a
/// fork-mode child to fault in.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn close_range_raw(lo: libc::c_uint, hi: libc::c_uint) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: close_range only closes descriptors, which the caller owns
    // and nothing closes again (this function's contract); the arguments
    // are plain integers.
    let rc = unsafe { libc::close_range(lo, hi, 0) };
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    // SAFETY: the raw system call, with the same contract: it only closes
    // descriptors the caller owns; the arguments are plain integers.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0) };
    rc == 0
}

/// Closes every descriptor above 2 but those in `keep` (sorted here), in
/// one `close_range` per run between them: in a child right after fork,
/// where the descriptors closed are owned by objects never dropped.
/// False, with nothing closed, where the kernel has no `close_range`
/// (before Linux 5.9) or elsewhere: then the caller closes them one by one.
pub fn close_all_but(keep: &mut [RawFd]) -> bool {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        keep.sort_unstable();
        let range = close_range_raw;
        let mut lo: libc::c_uint = 3;
        for &fd in keep.iter().filter(|&&fd| fd >= 3) {
            let fd = fd as libc::c_uint;
            // Without close_range the first call fails, nothing closed.
            if fd > lo && !range(lo, fd - 1) {
                return false;
            }
            lo = lo.max(fd + 1);
        }
        range(lo, libc::c_uint::MAX)
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        let _ = keep;
        false
    }
}

/// The soft and hard RLIMIT_NOFILE (unlimited reads as u64::MAX).
// rlim_t is u64 here but i64 on some BSDs: the casts are not always no-ops.
#[allow(clippy::unnecessary_cast)]
pub fn nofile_limit() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE)
        .map(|(s, h)| (s as u64, h as u64))
        .unwrap_or((1024, 1024))
}

/// Raises the soft RLIMIT_NOFILE to `soft` (never above the hard limit).
pub fn set_nofile(soft: u64) -> io::Result<()> {
    use nix::sys::resource::{setrlimit, Resource};
    let (_, hard) = nofile_limit();
    setrlimit(Resource::RLIMIT_NOFILE, soft.min(hard) as _, hard as _).map_err(io::Error::from)
}

/// How many descriptors this process has open now, if it can tell.
pub fn open_fds() -> Option<u64> {
    let dir = std::fs::read_dir("/proc/self/fd")
        .or_else(|_| std::fs::read_dir("/dev/fd"))
        .ok()?;
    // Minus the directory's own descriptor.
    Some(dir.count().saturating_sub(1) as u64)
}

/// Takes ownership of an fd this process inherited (socket activation,
/// inetd); `None` if `raw` is not open.
///
/// # Safety
///
/// Nothing else in the process may own `raw` (no `OwnedFd`, `File` or
/// socket of ours), and it must be taken once: the result closes it when
/// dropped.
pub unsafe fn inherited_fd(raw: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the descriptor is open, and owned by nobody else (this
    // function's contract).
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}
