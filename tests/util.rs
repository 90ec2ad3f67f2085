//! Test harness: the `Daemon` guard runs the real binary in its own process
//! group and kills the whole group on drop, even when a test fails. Every
//! wait has a deadline; nothing sleeps as synchronisation except the short
//! steps of `wait_until` while it re-checks a condition.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_echo-forkd");
/// The longest any single wait in these tests may take.
pub const DEADLINE: Duration = Duration::from_secs(10);
/// How long an exited master's stderr is read on for its last lines (its
/// children, which have it too, follow it at once).
const LAST_WORDS: Duration = Duration::from_secs(2);

/// Polls `cond` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A port free now on 127.0.0.1, for a program that takes its port from
/// its configuration rather than reporting the one it was given.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process the test started (HAProxy, inetd), killed and reaped on drop.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("echo-forkd-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: bool,
}

/// A running echo-forkd and everything it started.
pub struct Daemon {
    child: Option<Child>,
    pub pid: i32,
    stderr: Arc<(Mutex<Lines>, Condvar)>,
    status: Option<ExitStatus>,
}

impl Daemon {
    /// Starts `echo-forkd -f ARGS` and waits for its `ready` line.
    pub fn start(args: &[&str]) -> Daemon {
        let d = Daemon::spawn(args);
        if d.wait_line("ready", DEADLINE).is_none() {
            panic!(
                "echo-forkd {args:?} did not become ready; stderr:\n{}",
                d.stderr_text()
            );
        }
        d
    }

    /// Starts `echo-forkd -f ARGS` without waiting for anything.
    pub fn spawn(args: &[&str]) -> Daemon {
        Daemon::spawn_with(args, |_| {})
    }

    /// Like `spawn`, with a chance to adjust the command (environment, …).
    pub fn spawn_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Daemon {
        let mut cmd = Command::new(BIN);
        cmd.arg("-f").args(args);
        adjust(&mut cmd);
        Daemon::from_command(cmd)
    }

    /// Runs `cmd` (which must end up exec'ing echo-forkd in the same
    /// process) in its own process group, with stderr captured.
    pub fn from_command(mut cmd: Command) -> Daemon {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn echo-forkd");
        let pid = child.id() as i32;
        let stderr = child.stderr.take().expect("piped stderr");
        let shared = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let feed = Arc::clone(&shared);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*feed;
                m.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (m, cv) = &*feed;
            m.lock().unwrap().closed = true;
            cv.notify_all();
        });
        Daemon {
            child: Some(child),
            pid,
            stderr: shared,
            status: None,
        }
    }

    /// Waits until stderr is closed (every process that had it is gone),
    /// at most `timeout`.
    fn wait_closed(&self, timeout: Duration) {
        let end = Instant::now() + timeout;
        let (m, cv) = &*self.stderr;
        let mut g = m.lock().unwrap();
        while !g.closed {
            let now = Instant::now();
            if now >= end {
                return;
            }
            g = cv.wait_timeout(g, end - now).unwrap().0;
        }
    }

    /// The first stderr line containing `pat`, waiting up to `timeout`.
    pub fn wait_line(&self, pat: &str, timeout: Duration) -> Option<String> {
        self.wait_lines(pat, 1, timeout).map(|mut v| v.remove(0))
    }

    /// The first `n` stderr lines containing `pat`, waiting up to `timeout`.
    pub fn wait_lines(&self, pat: &str, n: usize, timeout: Duration) -> Option<Vec<String>> {
        let end = Instant::now() + timeout;
        let (m, cv) = &*self.stderr;
        let mut g = m.lock().unwrap();
        loop {
            let found: Vec<String> = g
                .lines
                .iter()
                .filter(|l| l.contains(pat))
                .take(n)
                .cloned()
                .collect();
            if found.len() == n {
                return Some(found);
            }
            let now = Instant::now();
            if g.closed || now >= end {
                return None;
            }
            g = cv.wait_timeout(g, end - now).unwrap().0;
        }
    }

    /// Every stderr line so far.
    pub fn stderr_text(&self) -> String {
        self.stderr.0.lock().unwrap().lines.join("\n")
    }

    /// The addresses from the `listening on` lines.
    pub fn listening(&self) -> Vec<String> {
        self.stderr
            .0
            .lock()
            .unwrap()
            .lines
            .iter()
            .filter_map(|l| l.split("listening on ").nth(1).map(str::to_string))
            .collect()
    }

    /// The first TCP address it listens on.
    pub fn addr(&self) -> SocketAddr {
        // The lines arrive through a reader thread: wait for them.
        self.wait_line("listening on ", DEADLINE);
        self.listening()
            .iter()
            .find_map(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no TCP listener; stderr:\n{}", self.stderr_text()))
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid), sig).expect("signal echo-forkd");
    }

    /// Every child of the master not yet reaped, zombies included, read in
    /// one go from the kernel's list (a scan of /proc is not atomic, so it
    /// can see a child that was just reaped beside its replacement).
    pub fn all_children(&self) -> Vec<(i32, char)> {
        let list = format!("/proc/{0}/task/{0}/children", self.pid);
        match std::fs::read_to_string(list) {
            Ok(text) => text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .map(|p| (p, proc_stat(p).map_or('X', |(s, _)| s)))
                .collect(),
            Err(_) => proc_children(self.pid),
        }
    }

    /// Live (non-zombie) children of the master.
    pub fn children(&self) -> Vec<i32> {
        self.all_children()
            .into_iter()
            .filter(|&(_, s)| s != 'Z' && s != 'X')
            .map(|(p, _)| p)
            .collect()
    }

    /// Children of the master that are zombies right now.
    pub fn zombies(&self) -> Vec<i32> {
        self.all_children()
            .into_iter()
            .filter(|&(_, s)| s == 'Z')
            .map(|(p, _)| p)
            .collect()
    }

    /// Waits until the master has exactly `n` live children and no zombie.
    pub fn wait_children(&self, n: usize) -> Vec<i32> {
        let ok = wait_until(DEADLINE, || {
            self.children().len() == n && self.zombies().is_empty()
        });
        assert!(
            ok,
            "expected {n} children, have {:?} (zombies {:?}); stderr:\n{}",
            self.children(),
            self.zombies(),
            self.stderr_text()
        );
        self.children()
    }

    /// Open descriptors of the master.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits for the master to exit; `None` if it is still running at the
    /// deadline. Once it has, what it wrote last is read too (until its
    /// stderr closes, for at most [`LAST_WORDS`]): a caller looks at
    /// [`Daemon::stderr_text`] next, and the reader thread may not have
    /// reached the end yet.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = self.child.as_mut()?;
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.status = Some(st);
                self.wait_closed(LAST_WORDS);
                return self.status;
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The whole group: the master and every child it forked.
        let _ = killpg(Pid::from_raw(self.pid), Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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

/// A connection with timeouts, so a broken server fails a test instead of
/// hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, DEADLINE).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Sends `data`, closes the write side and returns everything read back.
pub fn echo_all(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    let reader = {
        let mut r = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut back = Vec::new();
            r.read_to_end(&mut back).map(|_| back)
        })
    };
    s.write_all(data).expect("write");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    reader.join().unwrap().expect("read echo")
}

/// `echo_all` over a unix socket.
/// Sends one datagram to `addr` from 127.0.0.1 and returns its answer,
/// waiting up to [`DEADLINE`].
pub fn echo_udp(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.send(data)?;
    let mut buf = vec![0u8; 65_536];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

pub fn echo_unix(path: &Path, data: &[u8]) -> Vec<u8> {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(data).expect("write");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read echo");
    back
}

/// One round trip of `msg` on an open connection.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

/// Deterministic pseudo-random bytes (xorshift64*), cheap to regenerate on
/// the reading side instead of keeping what was sent. The sequence does not
/// depend on how it is cut into buffers.
pub struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Whether `path` exists.
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// A daemon started without -f: the launcher has exited; the daemon's pid
/// comes from its pidfile. Dropping the guard kills it (its children follow
/// the master's death).
pub struct Detached {
    pub pid: i32,
}

impl Detached {
    /// Runs `echo-forkd ARGS` (no -f) to completion: `Ok` with the guard if
    /// it exited 0 (reading the pid from `pidfile`), else `Err((code, stderr))`.
    pub fn start(args: &[&str], pidfile: &Path) -> Result<Detached, (i32, String)> {
        let out = launch(args);
        if out.0 != 0 {
            return Err(out);
        }
        let text =
            std::fs::read_to_string(pidfile).map_err(|e| (-1, format!("no pidfile: {e}")))?;
        let pid = text
            .trim()
            .parse()
            .map_err(|_| (-1, format!("bad pidfile {text:?}")))?;
        Ok(Detached { pid })
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        wait_until(DEADLINE, || is_dead(self.pid));
    }
}

/// Runs echo-forkd with `args` and waits for it, at most [`DEADLINE`]
/// (then it is killed and the test fails): (exit code, stderr).
pub fn launch(args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = run_bounded(args, None);
    (code, stderr)
}

/// `launch` with `dir` as the working directory.
pub fn launch_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = run_bounded(args, Some(dir));
    (code, stderr)
}

/// Like `launch`, for what it prints on stdout: (exit code, stdout).
pub fn launch_stdout(args: &[&str]) -> (i32, String) {
    let (code, stdout, _) = run_bounded(args, None);
    (code, stdout)
}

fn run_bounded(args: &[&str], dir: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run echo-forkd");
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let mut status = None;
    let exited = wait_until(DEADLINE, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !exited {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        panic!("echo-forkd {args:?} was still running after {DEADLINE:?}");
    }
    // The pipes reach EOF once every holder is gone; a detached daemon has
    // let go of them by the time the launcher exits.
    let code = status.and_then(|s| s.code()).unwrap_or(-1);
    (
        code,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
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

/// echo-forkd --inetd with one end of a socketpair as its stdin and stdout;
/// `conn` is the client's end. Killed and reaped on drop.
pub struct Inetd {
    pub child: Child,
    pub conn: std::os::unix::net::UnixStream,
}

impl Inetd {
    pub fn spawn(args: &[&str]) -> Inetd {
        use std::os::fd::OwnedFd;
        let (conn, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let stdout = theirs.try_clone().unwrap();
        let child = Command::new(BIN)
            .arg("--inetd")
            .args(args)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(stdout)))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn echo-forkd --inetd");
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        Inetd { child, conn }
    }
}

impl Drop for Inetd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How one client conversation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte came back, then the server closed after our half-close.
    Echoed,
    Refused,
    Reset,
    /// The server closed early; what came back was a true prefix.
    Cut,
    /// Bytes came back that were not sent.
    Wrong,
    /// Any other error (a timeout, …).
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Echoed,
        Outcome::Refused,
        Outcome::Reset,
        Outcome::Cut,
        Outcome::Wrong,
        Outcome::Failed,
    ];
}

/// One conversation: a few round trips of random sizes, then a half-close;
/// the connection spans time, so signals and kills land inside it.
pub fn conversation(addr: SocketAddr, rng: &mut Stream) -> Outcome {
    use std::io::ErrorKind;
    let mut s = match TcpStream::connect_timeout(&addr, DEADLINE) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let _ = s.set_read_timeout(Some(DEADLINE));
    let failed = |e: std::io::Error| match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Outcome::Reset,
        _ => Outcome::Failed,
    };
    let mut word = [0u8; 2];
    rng.fill(&mut word);
    for _ in 0..1 + word[0] % 8 {
        let mut data = vec![0u8; 1 + usize::from(word[1]) * 16];
        rng.fill(&mut data);
        if let Err(e) = s.write_all(&data) {
            return failed(e);
        }
        let mut back = vec![0u8; data.len()];
        let mut got = 0;
        while got < back.len() {
            match s.read(&mut back[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => {
                    if back[..got] != data[..got] {
                        return Outcome::Wrong;
                    }
                    return failed(e);
                }
            }
        }
        if back[..got] != data[..got] {
            return Outcome::Wrong;
        }
        if got < data.len() {
            return Outcome::Cut;
        }
        rng.fill(&mut word);
    }
    if let Err(e) = s.shutdown(std::net::Shutdown::Write) {
        return failed(e);
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Outcome::Echoed,
        Ok(_) => Outcome::Wrong,
        Err(e) => failed(e),
    }
}

/// Outcomes counted across client threads.
#[derive(Default)]
pub struct Tally([std::sync::atomic::AtomicUsize; 6]);

impl Tally {
    pub fn add(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(5);
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn get(&self, o: Outcome) -> usize {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(5);
        self.0[i].load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn total(&self) -> usize {
        Outcome::ALL.iter().map(|o| self.get(*o)).sum()
    }

    /// Every outcome with its count, for messages.
    pub fn counts(&self) -> Vec<(Outcome, usize)> {
        Outcome::ALL.iter().map(|o| (*o, self.get(*o))).collect()
    }
}

/// Runs `n` client threads, each holding conversations with `addr` until
/// `stop` is set; returns their handles.
pub fn clients(
    addr: SocketAddr,
    n: u64,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|k| {
            let (stop, tally) = (Arc::clone(stop), Arc::clone(tally));
            std::thread::spawn(move || {
                let mut rng = Stream::new(0x9e37_79b9 + k);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    tally.add(conversation(addr, &mut rng));
                }
            })
        })
        .collect()
}

/// Held by tests that load the machine heavily or measure time, so that
/// they do not run at once and make each other's figures meaningless.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a thread of its own in a new network namespace whose
/// loopback is up and also holds the IPv6 addresses `addrs` (with their
/// /64), so that a test can be several IPv6 hosts of one network without
/// touching the machine's. Daemons and sockets made on that thread live
/// in the namespace, which goes when they do. `None`, saying why, where
/// namespaces need root or `ip` (iproute2) is missing.
pub fn in_netns<T: Send + 'static>(
    addrs: &[&'static str],
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if !nix::unistd::geteuid().is_root() {
        skipped(format_args!("a private network namespace needs root"));
        return None;
    }
    let addrs = addrs.to_vec();
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET only moves this thread to a
        // new network namespace; it touches no memory of ours.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            skipped(format_args!(
                "cannot make a network namespace: {}",
                std::io::Error::last_os_error()
            ));
            return None;
        }
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["link", "set", "lo", "up"]) {
            skipped(format_args!(
                "cannot run ip (iproute2) in a network namespace"
            ));
            return None;
        }
        for a in &addrs {
            // nodad: usable at once, not after duplicate detection.
            let cidr = format!("{a}/64");
            assert!(
                ip(&["-6", "addr", "add", &cidr, "dev", "lo", "nodad"]),
                "ip -6 addr add {cidr}"
            );
        }
        Some(f())
    })
    .join()
    .expect("the test's namespace thread")
}

/// Cases skipped in this run, for the count at its end.
static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A test, or a case of one, that cannot run here: says so on a line of
/// its own that `cargo test` shows even when the test passes (written to
/// standard error directly, past the harness's capture), and counts it
/// for a line when the run ends.
pub fn skipped(why: impl std::fmt::Display) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    SKIPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    AT_EXIT.call_once(|| {
        // SAFETY: `report` is a plain function that only reads an atomic
        // and writes to standard error, which is safe at exit.
        unsafe {
            libc::atexit(report_skipped);
        }
    });
}

extern "C" fn report_skipped() {
    let n = SKIPPED.load(std::sync::atomic::Ordering::SeqCst);
    let _ = writeln!(
        std::io::stderr(),
        "\n{n} test case(s) SKIPPED (see above): the README's \"Tests\" says what makes the suite complete"
    );
}
