//! Which I/O engine an event worker runs on: io_uring where the kernel
//! lets this process use it, epoll otherwise (see event/ring.rs).
//!
//! The master decides, once per configuration (at start and on each
//! reload), with [`resolve`]: `--io-engine auto` takes io_uring where a
//! functional probe passes — a ring set up as the workers set theirs up,
//! the operations they use, a provided-buffer ring and a multishot
//! receive — and epoll otherwise, saying why; `uring` where the probe
//! fails is an error naming the cause; `epoll` probes nothing. The probe
//! runs in the master, which has no threads, and its ring is gone before
//! it returns: workers forked later never see it.

use std::fmt;

/// What the operator asked for (`--io-engine`, config key `io-engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// io_uring where it can run, epoll otherwise.
    #[default]
    Auto,
    /// io_uring, or an error where it cannot run.
    Uring,
    /// epoll, never probing io_uring.
    Epoll,
}

impl Choice {
    /// As the option names it.
    pub fn name(self) -> &'static str {
        match self {
            Choice::Auto => "auto",
            Choice::Uring => "uring",
            Choice::Epoll => "epoll",
        }
    }
}

/// The engine in force for event workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    Uring,
    #[default]
    Epoll,
}

impl Engine {
    /// As the option and the metric name it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "uring",
            Engine::Epoll => "epoll",
        }
    }

    /// As the log line names it.
    pub fn long_name(self) -> &'static str {
        match self {
            Engine::Uring => "io_uring",
            Engine::Epoll => "epoll",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The engine a configuration's event workers run on, and why (empty
/// when io_uring was simply available).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InForce {
    pub engine: Engine,
    pub why: String,
}

impl InForce {
    /// The log line: `event workers use io_uring`, `event workers use
    /// epoll: io_uring is not available (…)`, `event workers use epoll
    /// (io-engine epoll)`.
    pub fn line(&self) -> String {
        format!("event workers use {}", self.said())
    }

    /// The engine and why, as the log line and `-T` say it.
    pub fn said(&self) -> String {
        let name = self.engine.long_name();
        match self.why.as_str() {
            "" => name.to_string(),
            why if why.starts_with('(') => format!("{name} {why}"),
            why => format!("{name}: {why}"),
        }
    }
}

/// Who the event workers run as: what `kernel.io_uring_disabled = 1`
/// asks of a process (`CAP_SYS_ADMIN`, which only root's workers keep,
/// or the group `kernel.io_uring_group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workers {
    /// They may do what the master may: they keep its credentials (no
    /// `-u`, `-g`), or stay root with its capabilities.
    pub as_master: bool,
    /// Their group, when they change it (`-u`, `-g`).
    pub gid: Option<u32>,
}

/// A testing knob: `uring` or `epoll` stands for `auto` (an explicit
/// `--io-engine` or `io-engine` wins), so that the event-mode tests run
/// on either engine. Read once, by the master at start.
pub const ENV: &str = "ECHO_FORKD_IO_ENGINE";

/// What [`ENV`] asks for, read once (`None`: nothing, or not a choice).
fn from_env() -> Option<Choice> {
    static WANTED: std::sync::OnceLock<Option<Choice>> = std::sync::OnceLock::new();
    *WANTED.get_or_init(|| match std::env::var_os(ENV)?.to_str()? {
        "uring" => Some(Choice::Uring),
        "epoll" => Some(Choice::Epoll),
        _ => None,
    })
}

/// The engine for `choice`, and why (for the log line, `-T`), or the
/// error for an io_uring that was asked for and cannot run (naming the
/// cause, and `--io-engine epoll`). `auto` takes what [`ENV`] asks for,
/// if anything.
pub fn resolve(choice: Choice, workers: Workers) -> Result<(Engine, String), String> {
    let (choice, asked) = match (choice, from_env()) {
        (Choice::Auto, Some(c)) => (c, format!("({ENV}={})", c.name())),
        (c, _) => (c, format!("(io-engine {})", c.name())),
    };
    match choice {
        Choice::Epoll => Ok((Engine::Epoll, asked)),
        Choice::Auto => Ok(match probe(workers) {
            Ok(()) => (Engine::Uring, String::new()),
            Err(cause) => (
                Engine::Epoll,
                format!("io_uring is not available ({cause})"),
            ),
        }),
        Choice::Uring => match probe(workers) {
            Ok(()) => Ok((Engine::Uring, asked)),
            Err(cause) => Err(format!(
                "io-engine uring: io_uring cannot run here: {cause}; use --io-engine epoll (or auto, which falls back to epoll)"
            )),
        },
    }
}

/// Whether event workers can run on io_uring here; Err names the cause,
/// as an operator can act on it.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn probe(_: Workers) -> Result<(), String> {
    Err("io_uring is Linux's".into())
}

/// Whether event workers can run on io_uring here; Err names the cause,
/// as an operator can act on it.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn probe(workers: Workers) -> Result<(), String> {
    let disabled = sysctl("io_uring_disabled");
    if disabled == Some(2) {
        return Err("kernel.io_uring_disabled = 2: io_uring is off for every process".into());
    }
    let mut ring = ring(8, 16).map_err(|e| setup_failed(&e, disabled))?;
    if disabled == Some(1) && !workers.as_master {
        // The master may, but its workers drop root: only the group the
        // sysctl names lets them.
        let group = sysctl("io_uring_group").unwrap_or(-1);
        if group < 0 || workers.gid.map(i64::from) != Some(group) {
            return Err(format!(
                "kernel.io_uring_disabled = 1 lets only CAP_SYS_ADMIN or the group kernel.io_uring_group ({}) use io_uring, and the workers run as another user",
                if group < 0 { "none".to_string() } else { group.to_string() }
            ));
        }
    }
    operations(&ring)?;
    buffers_and_multishot(&mut ring)
}

/// `/proc/sys/kernel/NAME` as a number, if it can be read.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn sysctl(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why `io_uring_setup` failed, as an operator can act on it.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn setup_failed(e: &std::io::Error, disabled: Option<i64>) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) if disabled == Some(1) => {
            "kernel.io_uring_disabled = 1: only CAP_SYS_ADMIN or the group kernel.io_uring_group may use io_uring".into()
        }
        Some(code @ (libc::EPERM | libc::ENOSYS)) => format!(
            "io_uring_setup is forbidden (it fails with {:?}: a seccomp filter, such as Docker's default profile or a unit's SystemCallFilter=, or a kernel built without io_uring?)",
            nix::errno::Errno::from_raw(code)
        ),
        Some(libc::ENOMEM) => memlock(),
        Some(libc::EINVAL) => format!(
            "the kernel ({}) cannot set up a ring as echo-forkd does ({}): Linux 6.0 or later is needed",
            kernel(),
            crate::logging::error_text(e)
        ),
        _ => format!("io_uring_setup failed: {}", crate::logging::error_text(e)),
    }
}

/// The cause of an ENOMEM: io_uring's memory is charged to
/// RLIMIT_MEMLOCK, unless the process has `CAP_IPC_LOCK`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn memlock() -> String {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    let limit = match getrlimit(Resource::RLIMIT_MEMLOCK) {
        Ok((soft, _)) if soft == RLIM_INFINITY => "unlimited".to_string(),
        Ok((soft, _)) => format!("{} KiB", soft / 1024),
        Err(_) => "unknown".to_string(),
    };
    format!(
        "the locked-memory limit (RLIMIT_MEMLOCK, {limit}) is too small for a ring: raise it (ulimit -l, LimitMEMLOCK= in a unit), or memory is short"
    )
}

/// Why a later step of the probe failed: the memory limit, a filter,
/// or (EINVAL and the like) a kernel without what it tried.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn step_failed(what: &str, since: &str, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOMEM) => memlock(),
        Some(code @ (libc::EPERM | libc::EACCES)) => format!(
            "io_uring's {what} is forbidden (it fails with {:?}: a seccomp filter or a security module?)",
            nix::errno::Errno::from_raw(code)
        ),
        _ => format!(
            "the kernel ({}) has no io_uring {what} (Linux {since}; it fails with: {})",
            kernel(),
            crate::logging::error_text(e)
        ),
    }
}

/// The kernel's release, for the errors.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn kernel() -> String {
    nix::sys::utsname::uname()
        .map(|u| format!("Linux {}", u.release().to_string_lossy()))
        .unwrap_or_else(|_| "this kernel".into())
}

/// The operations the workers use are all there.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn operations(ring: &io_uring::IoUring) -> Result<(), String> {
    use io_uring::opcode;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| step_failed("probe of its operations", "5.6", &e))?;
    for (code, name, since) in [
        (opcode::Recv::CODE, "RECV", "5.6"),
        (opcode::Send::CODE, "SEND", "5.6"),
        (opcode::PollAdd::CODE, "POLL_ADD", "5.1"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL", "5.5"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!(
                "the kernel ({}) lacks the io_uring operation {name} (Linux {since})",
                kernel()
            ));
        }
    }
    Ok(())
}

/// A provided-buffer ring (Linux 5.19) registers, and a multishot
/// receive (Linux 6.0) takes a byte from it and goes on.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn buffers_and_multishot(ring: &mut io_uring::IoUring) -> Result<(), String> {
    use io_uring::{cqueue, opcode, types};
    use nix::sys::socket::{AddressFamily, SockType};
    const ENTRY: usize = std::mem::size_of::<types::BufRingEntry>();
    const ENTRIES: u16 = 8;
    const GROUP: u16 = 0;
    const PAGE: usize = 4096;
    const RECV: u64 = 1;
    const CANCEL: u64 = 2;
    let said = step_failed;
    // Page 0: the ring of buffer entries; page 1: the one buffer in it.
    // Declared before the ring's registration, dropped after the ring's
    // user has gone (the kernel pins what it uses meanwhile).
    let mut pages = crate::sys::IoBuffer::new(2 * PAGE)
        .map_err(|e| format!("cannot map the probe's buffers: {e}"))?;
    let memory = pages.as_mut_slice();
    let buffer = memory[PAGE..].as_ptr() as u64;
    // Entry 0 (addr u64, len u32, bid u16), and the ring's tail (entry
    // 0's last u16): one buffer provided.
    memory[..8].copy_from_slice(&buffer.to_ne_bytes());
    memory[8..12].copy_from_slice(&(PAGE as u32).to_ne_bytes());
    memory[12..14].copy_from_slice(&0u16.to_ne_bytes());
    memory[ENTRY - 2..ENTRY].copy_from_slice(&1u16.to_ne_bytes());
    let base = memory.as_ptr() as u64;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: `base` is a page-aligned private mapping of two pages that
    // lives until the end of this function, after the ring's user; its
    // first page holds ENTRIES (8) entries of 16 bytes, and the one entry
    // the tail makes visible points at the second page, PAGE bytes long.
    #[allow(unsafe_code)]
    let registered = unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(base, ENTRIES, GROUP, 0)
    };
    registered.map_err(|e| said("provided-buffer ring", "5.19", &e))?;
    let (a, b) = crate::sys::socketpair(AddressFamily::Unix, SockType::Stream)
        .map_err(|e| format!("cannot make the probe's socket pair: {}", e.desc()))?;
    nix::unistd::write(&a, b"x")
        .map_err(|e| format!("cannot write to the probe's socket pair: {}", e.desc()))?;
    let recv = opcode::RecvMulti::new(types::Fd(std::os::fd::AsRawFd::as_raw_fd(&b)), GROUP)
        .build()
        .user_data(RECV);
    // SAFETY: the entry refers to the socket `b` and the registered
    // buffer group, both alive until the ring is dropped below.
    #[allow(unsafe_code)]
    let pushed = unsafe { ring.submission().push(&recv) };
    pushed.map_err(|_| "the probe's submission queue is full".to_string())?;
    // The byte is there already: the receive completes at once.
    ring.submit_and_wait(1)
        .map_err(|e| format!("io_uring_enter failed: {}", crate::logging::error_text(&e)))?;
    let first = ring.completion().next();
    let outcome = match first {
        Some(c) if c.result() == 1 && cqueue::more(c.flags()) => Ok(()),
        Some(c) if c.result() == 1 => Err(format!(
            "the kernel ({}) ends a multishot receive after one completion (Linux 6.0)",
            kernel()
        )),
        Some(c) if c.result() < 0 => Err(said(
            "multishot receive",
            "6.0",
            &std::io::Error::from_raw_os_error(-c.result()),
        )),
        Some(c) => Err(format!(
            "the probe's multishot receive took {} bytes, not 1",
            c.result()
        )),
        None => Err("the probe's multishot receive did not complete".into()),
    };
    if outcome.is_ok() {
        // Cancel the receive still armed, as a worker cancels its own.
        let cancel = opcode::AsyncCancel::new(RECV).build().user_data(CANCEL);
        // SAFETY: a cancel refers to no memory of ours.
        #[allow(unsafe_code)]
        let pushed = unsafe { ring.submission().push(&cancel) };
        if pushed.is_ok() {
            let _ = ring.submit_and_wait(1);
        }
    }
    let _ = ring.submitter().unregister_buf_ring(GROUP);
    outcome
}

/// A ring for one event worker (or the probe): one issuer, its task work
/// run only when it waits (6.1), else cooperative task work (5.19), else
/// a plain ring. `cq` is the completion queue's size.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn ring(entries: u32, cq: u32) -> std::io::Result<io_uring::IoUring> {
    let mut b = io_uring::IoUring::builder();
    b.setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun();
    if let Ok(r) = b.build(entries) {
        return Ok(r);
    }
    let mut b = io_uring::IoUring::builder();
    b.setup_cqsize(cq).setup_coop_taskrun();
    if let Ok(r) = b.build(entries) {
        return Ok(r);
    }
    let mut b = io_uring::IoUring::builder();
    b.setup_cqsize(cq);
    b.build(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_the_engine_and_why() {
        let said = |engine, why: &str| {
            InForce {
                engine,
                why: why.into(),
            }
            .line()
        };
        assert_eq!(said(Engine::Uring, ""), "event workers use io_uring");
        assert_eq!(
            said(Engine::Epoll, "(io-engine epoll)"),
            "event workers use epoll (io-engine epoll)"
        );
        assert_eq!(
            said(Engine::Epoll, "io_uring is not available (x)"),
            "event workers use epoll: io_uring is not available (x)"
        );
    }

    #[test]
    fn epoll_probes_nothing() {
        let root = Workers {
            as_master: true,
            gid: None,
        };
        assert_eq!(
            resolve(Choice::Epoll, root),
            Ok((Engine::Epoll, "(io-engine epoll)".into()))
        );
    }
}
