//! Mappings: the zero-filled words every process shares (the
//! scoreboard's memory, kept across a USR2 exec as a memfd) and private
//! I/O buffers whose pages go back to the kernel when idle. One `mmap`
//! serves both; the `unsafe` is in handing its pages out as slices.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

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
