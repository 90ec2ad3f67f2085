//! The `log` backend: stderr or syslog.
//!
//! Invariants: every line carries the pid of the process that writes it
//! (read at each line, so it is right after fork); a log write never blocks
//! the daemon. Syslog lines are RFC 3164 datagrams sent without blocking to a
//! unix datagram socket; when the socket is missing, full or stalled the line
//! is dropped and counted, the socket is retried at most once a second, and
//! the count is reported once lines get through again. Standard error gets
//! the same treatment: [`unblock_stderr`] gives this process tree its own
//! non-blocking handle on the pipe, terminal or socket behind it, so a
//! stalled reader (a stuck log collector) costs lines, never service.

use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use clap::ValueEnum;
use log::{Level, LevelFilter, Log, Metadata, Record};
use serde::Deserialize;

use crate::sys;

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Stderr,
    Syslog,
}

/// The syslog facilities an operator may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Facility {
    Daemon,
    User,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    /// The facility's code as syslog(3) numbers it (LOG_DAEMON >> 3 = 3, …).
    pub fn code(self) -> u8 {
        match self {
            Facility::User => 1,
            Facility::Daemon => 3,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

const IDENT: &str = "echo-forkd";
const RETRY: Duration = Duration::from_secs(1);
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

struct Logger {
    sink: Mutex<Sink>,
}

enum Sink {
    Stderr,
    Syslog(Syslog),
}

/// Lines this process dropped because the log would have blocked (or
/// syslog was missing), not yet reported. Outside the sink's lock so that
/// a forked child can check it without writing to the page it is on.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The syslog socket's number while there is one, else -1: read by a
/// forked child without the sink's lock (a lock is a write, and a page
/// copied), to keep it when it closes everything else.
static SYSLOG_FD: AtomicI32 = AtomicI32::new(-1);

/// The longest line written to standard error: a pipe takes a write of at
/// most PIPE_BUF (4096 on Linux) whole or not at all, so lines of several
/// processes never interleave.
const MAX_LINE: usize = 4096;

struct Syslog {
    path: PathBuf,
    facility: u8,
    sock: Option<UnixDatagram>,
    last_try: Instant,
}

static LOGGER: Logger = Logger {
    sink: Mutex::new(Sink::Stderr),
};

/// Installs the logger (once) or switches its target (later calls).
///
/// With syslog, a socket that cannot be reached yet is not an error: lines
/// are counted as dropped until it appears.
pub fn init(target: LogTarget, level: LevelFilter, socket: &Path, facility: Facility) {
    let sink = match target {
        LogTarget::Stderr => Sink::Stderr,
        LogTarget::Syslog => {
            let mut s = Syslog {
                path: socket.to_path_buf(),
                facility: facility.code(),
                sock: None,
                last_try: Instant::now(),
            };
            s.connect();
            Sink::Syslog(s)
        }
    };
    if matches!(sink, Sink::Stderr) {
        SYSLOG_FD.store(-1, Ordering::Relaxed);
    }
    *lock() = sink;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// In a child right after fork: the dropped-line counts are the parent's
/// to report, not this process's.
pub fn forked() {
    if DROPPED.load(Ordering::Relaxed) != 0 {
        DROPPED.store(0, Ordering::Relaxed);
    }
}

/// Makes writes to standard error fail instead of block when its reader
/// stalls, for every writer in this process tree (the logger, a panic
/// message, a startup error). A pipe, FIFO or terminal is reopened through
/// `/proc/self/fd/2`, which gives a new open file description of the same
/// object, so O_NONBLOCK does not leak to whoever else holds it (the shell
/// on a terminal); a socket (journald's stream) or a pipe that cannot be
/// reopened gets O_NONBLOCK on the shared description, which only this
/// service writes to. A terminal that cannot be reopened, a regular file
/// and /dev/null are left as they are: none of them stalls.
pub fn unblock_stderr() {
    use nix::sys::stat::{fstat, SFlag};
    use std::os::unix::fs::OpenOptionsExt;
    let stderr = io::stderr();
    let Ok(st) = fstat(&stderr) else { return };
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    let reopen = || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open("/proc/self/fd/2")
    };
    match kind {
        SFlag::S_IFIFO | SFlag::S_IFCHR => match reopen() {
            // Still the same object, now with a description of our own.
            Ok(own)
                if fstat(&own).is_ok_and(|o| o.st_ino == st.st_ino && o.st_dev == st.st_dev) =>
            {
                let _ = nix::unistd::dup2_stderr(&own);
            }
            _ if kind == SFlag::S_IFIFO => {
                let _ = crate::sys::set_nonblocking(&stderr);
            }
            _ => {}
        },
        SFlag::S_IFSOCK => {
            let _ = crate::sys::set_nonblocking(&stderr);
        }
        _ => {}
    }
}

/// Writes a message for the operator to standard error, whole or not at
/// all: never blocks (see [`unblock_stderr`]) and never panics, unlike
/// `eprintln!`.
pub fn say(msg: impl std::fmt::Display) {
    let line = format!("{IDENT}: {msg}\n");
    let _ = nix::unistd::write(io::stderr(), line.as_bytes());
}

/// The descriptor log lines go to besides standard error (the syslog
/// socket), for a child that closes everything else.
pub fn descriptor() -> Option<RawFd> {
    Some(SYSLOG_FD.load(Ordering::Relaxed)).filter(|&fd| fd >= 0)
}

/// Whether log lines currently reach syslog (false also for stderr).
pub fn syslog_connected() -> bool {
    matches!(&*lock(), Sink::Syslog(s) if s.sock.is_some())
}

fn lock() -> std::sync::MutexGuard<'static, Sink> {
    // The master never holds this lock across fork (it is single-threaded),
    // and a panic while formatting a line must not silence logging for good.
    LOGGER.sink.lock().unwrap_or_else(|p| p.into_inner())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let pid = std::process::id();
        match &mut *lock() {
            Sink::Stderr => {
                let dropped = DROPPED.load(Ordering::Relaxed);
                if dropped > 0 {
                    let note = format!(
                        "{dropped} log lines were dropped while standard error was not writable"
                    );
                    if write_stderr(&stderr_line(pid, Level::Warn, &note)) {
                        DROPPED.fetch_sub(dropped, Ordering::Relaxed);
                    }
                }
                if !write_stderr(&stderr_line(pid, record.level(), record.args())) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                }
            }
            Sink::Syslog(s) => s.send(record.level(), &record.args().to_string(), pid),
        }
    }

    fn flush(&self) {}
}

/// One line as written to standard error: ident, pid, level, message,
/// cut at [`MAX_LINE`] bytes.
fn stderr_line(pid: u32, level: Level, msg: impl std::fmt::Display) -> String {
    let mut line = String::with_capacity(128);
    let _ = write!(line, "{IDENT}[{pid}]: ");
    match level {
        Level::Error => line.push_str("error: "),
        Level::Warn => line.push_str("warning: "),
        Level::Debug | Level::Trace => line.push_str("debug: "),
        Level::Info => {}
    }
    let _ = write!(line, "{msg}");
    if line.len() >= MAX_LINE {
        let mut cut = MAX_LINE - 4;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    line.push('\n');
    line
}

/// One write(2) of a whole line; false if none of it went out. A line
/// that went out only in part (a socket under pressure) is finished if
/// that can be done at once, else left cut.
fn write_stderr(line: &str) -> bool {
    let mut rest = line.as_bytes();
    let mut first = true;
    loop {
        match nix::unistd::write(io::stderr(), rest) {
            Ok(n) if n == rest.len() => return true,
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return !first,
        }
        first = false;
    }
}

fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

impl Syslog {
    fn connect(&mut self) {
        self.last_try = Instant::now();
        self.sock = UnixDatagram::unbound()
            .and_then(|s| {
                s.connect(&self.path)?;
                s.set_nonblocking(true)?;
                Ok(s)
            })
            .ok();
        let fd = self.sock.as_ref().map_or(-1, |s| s.as_raw_fd());
        SYSLOG_FD.store(fd, Ordering::Relaxed);
    }

    fn format(&self, level: Level, msg: &str, pid: u32) -> String {
        let (mon, day, h, m, s) = sys::local_time(SystemTime::now());
        let pri = self.facility as u32 * 8 + severity(level) as u32;
        format!(
            "<{pri}>{} {day:>2} {h:02}:{m:02}:{s:02} {IDENT}[{pid}]: {msg}",
            MONTHS[mon]
        )
    }

    fn send(&mut self, level: Level, msg: &str, pid: u32) {
        if self.sock.is_none() && self.last_try.elapsed() >= RETRY {
            self.connect();
        }
        let dropped = DROPPED.load(Ordering::Relaxed);
        if dropped > 0 && self.sock.is_some() {
            let note = format!("{dropped} log lines were dropped while syslog was unavailable");
            if self.write(&self.format(Level::Warn, &note, pid)) {
                DROPPED.fetch_sub(dropped, Ordering::Relaxed);
            }
        }
        let line = self.format(level, msg, pid);
        if !self.write(&line) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends one datagram without blocking; false if it was not sent.
    fn write(&mut self, line: &str) -> bool {
        let Some(sock) = &self.sock else {
            return false;
        };
        match sock.send(line.as_bytes()) {
            Ok(_) => true,
            // Full: the reader is slow; keep the socket and drop the line.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            // Gone (syslog restarted, socket removed): reconnect later.
            Err(_) => {
                self.sock = None;
                SYSLOG_FD.store(-1, Ordering::Relaxed);
                false
            }
        }
    }
}

/// An OS error as a message fragment: "permission denied", not
/// "Permission denied (os error 13)".
pub fn error_text(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `n` and `one` or `many`, as `n` says: "1 connection", "2 connections".
pub fn counted(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How often a repeated warning (a limit hit, an accept or fork error) is
/// logged at most.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Lets a repeated event be logged at most once per interval, with a count
/// of how often it happened in between. Never silences it for good.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
    total: u64,
}

impl RateLimit {
    /// A limiter for one kind of event.
    pub const fn new(interval: Duration) -> Self {
        RateLimit {
            interval,
            last: None,
            suppressed: 0,
            total: 0,
        }
    }

    /// How often the event happened in all, logged or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Records an occurrence; `Some(n)` means "log it now, n were not logged
    /// since the last line".
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        self.total += 1;
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_a_lowercase_fragment() {
        let e = std::io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(error_text(&e), "permission denied");
    }

    #[test]
    fn rate_limit_logs_once_per_interval_and_counts_the_rest() {
        let mut r = RateLimit::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(r.hit(t), Some(0));
        assert_eq!(r.hit(t + Duration::from_millis(10)), None);
        assert_eq!(r.hit(t + Duration::from_millis(20)), None);
        assert_eq!(r.hit(t + Duration::from_millis(1100)), Some(2));
        assert_eq!(r.total(), 4);
    }

    #[test]
    fn syslog_line_is_rfc3164() {
        let s = Syslog {
            path: PathBuf::from("/nonexistent"),
            facility: Facility::Local3.code(),
            sock: None,
            last_try: Instant::now(),
        };
        let line = s.format(Level::Info, "ready", 42);
        assert!(line.starts_with("<158>"), "{line}");
        assert!(line.ends_with(" echo-forkd[42]: ready"), "{line}");
        // "<158>Nov 22 13:46:55 " : month, space-padded day, time.
        assert_eq!(&line[8..9], " ");
        assert_eq!(line.as_bytes()[14], b':');
    }

    #[test]
    fn syslog_send_never_blocks_on_a_stalled_reader() {
        let dir = std::env::temp_dir().join(format!("echo-forkd-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let _reader = UnixDatagram::bind(&path).unwrap();
        let mut s = Syslog {
            path: path.clone(),
            facility: 3,
            sock: None,
            last_try: Instant::now(),
        };
        s.connect();
        assert!(s.sock.is_some());
        // Far more than the receive queue holds; none of these may block.
        for _ in 0..10_000 {
            s.send(Level::Info, "x", 1);
        }
        assert!(DROPPED.load(Ordering::Relaxed) > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
