//! The only `unsafe` in echo-forkd: the fork fence, accept4, `_exit`, the
//! scoreboard's shared mapping and the local time for syslog. Everything
//! else calls these safe wrappers.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::time::SystemTime;

/// Exit code of a child whose code panicked.
pub const EXIT_PANIC: i32 = 70;

use nix::sys::signal::{
    sigaction, sigprocmask, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal,
};
use nix::unistd::{fork, ForkResult, Pid};

/// Forks; the child runs `child` and ends with `_exit`, never returning into
/// the caller's code. Returns the child's pid in the parent.
///
/// All signals are blocked across `fork`, so no handler of the master can
/// run in the child before the child has reset `reset` to their default
/// dispositions (a handler would write into the master's self-pipe) and set
/// `ignore` to be ignored. Signals the master ignores (SIGPIPE) stay ignored.
///
/// # Safety
///
/// The calling process must have no other thread: the child gets a copy of
/// the heap and of every lock as they are, and a lock a vanished thread
/// held would stay held in it. (A caller whose `child` touches neither the
/// heap nor a lock, only atomics and system calls, is sound regardless.)
pub unsafe fn spawn(
    reset: &[Signal],
    ignore: &[Signal],
    child: impl FnOnce() -> i32,
) -> io::Result<Pid> {
    let mut old = SigSet::empty();
    sigprocmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    // SAFETY: the caller is single-threaded (this function's contract), so
    // the child's copy of the heap and of every lock is consistent; the
    // child only resets signals, runs `child` and `_exit`s.
    let forked = unsafe { fork() };
    match forked {
        Ok(ForkResult::Parent { child }) => {
            sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None)?;
            Ok(child)
        }
        Ok(ForkResult::Child) => {
            let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
            let ignored = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
            // One sigaction per signal (a signal to be ignored is not first
            // reset to its default), and no allocation: the child's heap
            // stays shared with the master.
            for &sig in reset.iter().filter(|s| !ignore.contains(s)) {
                // SAFETY: SIG_DFL runs no code of ours.
                let _ = unsafe { sigaction(sig, &default) };
            }
            for &sig in ignore {
                // SAFETY: SIG_IGN runs no code of ours.
                let _ = unsafe { sigaction(sig, &ignored) };
            }
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            let code = catch_unwind(AssertUnwindSafe(child)).unwrap_or(EXIT_PANIC);
            exit_now(code)
        }
        Err(e) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
            Err(e.into())
        }
    }
}

/// Makes `signal` write a byte to `fd`, a non-blocking socket that stays
/// open as long as the handler is installed, each time it arrives: the
/// wake-up half of the self-pipe (the flag is signal-hook's).
pub fn wake_on_signal(signal: libc::c_int, fd: RawFd) -> io::Result<()> {
    let action = move || {
        // SAFETY: send(2) is async-signal-safe; MSG_DONTWAIT never blocks
        // (a full pipe already holds a wake-up); `fd` outlives the handler
        // (the caller's promise); signal-hook saves and restores errno.
        let _ = unsafe { libc::send(fd, b"X".as_ptr().cast(), 1, libc::MSG_DONTWAIT) };
    };
    // SAFETY: the action is async-signal-safe (above): no allocation, no
    // lock, one system call.
    unsafe { signal_hook::low_level::register(signal, action) }.map(drop)
}

/// Gives `signal` a handler that does nothing, so that it interrupts a
/// wait (`pselect` returns EINTR) instead of being ignored or killing.
/// A plain `sigaction`, not signal-hook's registry, whose allocation in a
/// forked worker would copy heap pages it otherwise shares with the master.
pub fn interrupt_on_signal(signal: Signal) -> io::Result<()> {
    extern "C" fn nothing(_: libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(nothing),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe.
    unsafe { sigaction(signal, &action) }?;
    Ok(())
}

/// A plain fork for detaching, before any signal handler is installed.
/// Returns true in the parent.
///
/// # Safety
///
/// The calling process must have no other thread (see [`spawn`]): here
/// the child goes on with the caller's code, heap and locks.
pub unsafe fn fork_plain() -> io::Result<bool> {
    // SAFETY: the caller is single-threaded (this function's contract); the
    // child goes on with the same code path and the parent only waits and
    // `_exit`s.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => Ok(true),
        ForkResult::Child => Ok(false),
    }
}

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

/// Ends a child at once: no atexit handlers, no flushing of a copy of the
/// master's buffers.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: `_exit` is always safe to call; it does not return.
    unsafe { libc::_exit(code) }
}

/// `accept4` with SOCK_CLOEXEC | SOCK_NONBLOCK (one syscall, no fcntl);
/// Apple's systems, which lack it, set the flags after `accept`.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    #[cfg(not(target_vendor = "apple"))]
    {
        let flags = libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        // SAFETY: null address pointers are allowed; on success the return
        // value is a new descriptor that nothing else owns.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                flags,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by accept4 and is owned by no one.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    #[cfg(target_vendor = "apple")]
    {
        use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
        let raw = nix::sys::socket::accept(listener.as_raw_fd())?;
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

/// Replaces the supplementary groups with `gid` alone (nix has no
/// `setgroups` for Apple's systems, whose libc does).
pub fn set_groups(gid: nix::unistd::Gid) -> nix::Result<()> {
    #[cfg(not(target_vendor = "apple"))]
    {
        nix::unistd::setgroups(&[gid])
    }
    #[cfg(target_vendor = "apple")]
    {
        let list = [gid.as_raw()];
        // SAFETY: the pointer and length describe `list`, which outlives
        // the call; setgroups only reads it.
        let rc = unsafe { libc::setgroups(1, list.as_ptr()) };
        nix::errno::Errno::result(rc).map(drop)
    }
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
        // SAFETY: close_range only closes descriptors, which the caller
        // owns and nothing else will close (this function's contract);
        // the arguments are plain integers.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                lo as libc::c_uint,
                hi as libc::c_uint,
                0,
            )
        };
        if rc == 0 {
            return;
        }
    }
    for fd in lo..=hi {
        let _ = nix::unistd::close(fd);
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

/// Local wall-clock time as (month 0–11, day, hour, minute, second), for
/// syslog's RFC 3164 timestamp.
pub fn local_time(t: SystemTime) -> (usize, u32, u32, u32, u32) {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: `tm` is plain data; localtime_r writes only into it and is
    // thread-safe; on failure we keep the zeroed value.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        tm
    };
    (
        tm.tm_mon.clamp(0, 11) as usize,
        tm.tm_mday.max(1) as u32,
        tm.tm_hour as u32,
        tm.tm_min as u32,
        tm.tm_sec as u32,
    )
}

/// Maps `bytes` of fresh, zero-filled, readable and writable pages:
/// `MAP_SHARED` or `MAP_PRIVATE`, of `fd` from offset 0 (which the caller
/// has sized), or anonymous without one.
fn map_pages(
    bytes: NonZeroUsize,
    sharing: libc::c_int,
    fd: Option<&OwnedFd>,
) -> io::Result<NonNull<u8>> {
    let (raw, anonymous) = match fd {
        Some(fd) => (fd.as_raw_fd(), 0),
        None => (-1, libc::MAP_ANON),
    };
    // SAFETY: no address hint, so the kernel picks fresh pages that alias
    // nothing in this process; a file is at least `bytes` long (made or
    // checked so by the callers); the result is checked before use.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes.get(),
            libc::PROT_READ | libc::PROT_WRITE,
            sharing | anonymous,
            raw,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast()).ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))
}

/// Zero-filled words shared with every child forked after they were mapped
/// (`MAP_SHARED`): the scoreboard's memory. They are reached only through
/// atomics, so processes may read and write them at once. Where there is
/// `memfd_create`, the memory is a memfd, so that a master that re-executes
/// itself (USR2) can map it again and keep seeing its old workers.
pub struct SharedWords {
    ptr: NonNull<AtomicU64>,
    len: usize,
    fd: Option<OwnedFd>,
}

impl SharedWords {
    /// Maps `len` words. Pages are only backed once touched.
    pub fn new(len: usize) -> io::Result<SharedWords> {
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        {
            use nix::sys::memfd::{memfd_create, MFdFlags};
            let bytes = Self::bytes(len)?;
            let fd = memfd_create("echo-forkd-scoreboard", MFdFlags::MFD_CLOEXEC)?;
            nix::unistd::ftruncate(&fd, bytes.get() as libc::off_t)?;
            Self::map(Some(fd), len)
        }
        #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
        Self::map(None, len)
    }

    /// Maps the `len` words behind `fd` again: the memory a previous master
    /// made (its [`SharedWords::fd`]), passed across an exec. The file must
    /// be exactly that size.
    pub fn adopt(fd: OwnedFd, len: usize) -> io::Result<SharedWords> {
        let bytes = Self::bytes(len)?;
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if size as u64 != bytes.get() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the shared memory passed on is {size} bytes, not {bytes}"),
            ));
        }
        Self::map(Some(fd), len)
    }

    fn bytes(len: usize) -> io::Result<NonZeroUsize> {
        len.checked_mul(std::mem::size_of::<AtomicU64>())
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
    }

    fn map(fd: Option<OwnedFd>, len: usize) -> io::Result<SharedWords> {
        let ptr = map_pages(Self::bytes(len)?, libc::MAP_SHARED, fd.as_ref())?;
        Ok(SharedWords {
            ptr: ptr.cast(),
            len,
            fd,
        })
    }

    /// The memfd behind the words, if there is one.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_ref().map(|f| f.as_fd())
    }

    /// In a forked child: closes the memfd (the mapping stays).
    pub fn close_fd_in_child(&mut self) {
        self.fd = None;
    }

    /// The words.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `len` page-aligned words for as long as
        // `self` lives; the kernel zero-fills it and every bit pattern is a
        // valid AtomicU64; all access, in any process, is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for SharedWords {
    fn drop(&mut self) {
        // SAFETY: this is the mapping made in `new`, of this length; the
        // slices `words` handed out borrow `self`, so none outlives it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len * 8) };
    }
}

/// A private, anonymous I/O buffer. Its pages cost nothing until written
/// (a `vec![0; n]` from a reused heap would be zeroed, and so copied, in
/// every forked worker), and [`IoBuffer::trim`] hands them back, so an idle
/// worker stays small whatever it served before.
pub struct IoBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

impl IoBuffer {
    /// Maps `len` bytes (rounded up to pages by the kernel).
    pub fn new(len: usize) -> io::Result<IoBuffer> {
        let bytes =
            NonZeroUsize::new(len).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ptr = map_pages(bytes, libc::MAP_PRIVATE, None)?;
        Ok(IoBuffer {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The buffer, to read (Linux's batched UDP worker).
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping holds `len` readable bytes for as long as
        // `self` lives, and `&self` rules out a mutable borrow meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The buffer, zero-filled where it was never written or was trimmed.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping holds `len` readable, writable bytes for as
        // long as `self` lives, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Gives the pages back to the kernel; the next use finds zeros.
    pub fn trim(&mut self) {
        use nix::sys::mman::{madvise, MmapAdvise};
        // SAFETY: the range is exactly our private mapping, and `&mut self`
        // means no slice of it is alive, so discarding its contents cannot
        // change memory anyone is reading.
        let _ = unsafe { madvise(self.ptr.cast(), self.len, MmapAdvise::MADV_DONTNEED) };
    }
}

impl Drop for IoBuffer {
    fn drop(&mut self) {
        // SAFETY: this is the mapping made in `new`, of this length; slices
        // from `as_mut_slice` borrow `self`, so none outlives it.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len) };
    }
}
