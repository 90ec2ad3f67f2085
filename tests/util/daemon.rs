//! The `Daemon` guard: `echo-forkd -f` started in its own process group,
//! its stderr read line by line as it comes (to wait for a line, or show
//! everything when a test fails), its children as the kernel lists them,
//! its exit; dropping the guard kills the whole group, even when a test
//! fails.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{proc_children, proc_stat, sockets_of, wait_until, BIN, DEADLINE};

/// How long an exited master's stderr is read on for its last lines (its
/// children, which have it too, follow it at once).
const LAST_WORDS: Duration = Duration::from_secs(2);

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

    /// The master and its live children: every process of this daemon
    /// that may hold a connection.
    pub fn processes(&self) -> Vec<i32> {
        let mut all = vec![self.pid];
        all.extend(self.children());
        all
    }

    /// For each socket in `inodes` (see [`super::Ends::server_socket`]),
    /// the processes of this daemon that hold a descriptor on it: one
    /// while a process serves it, none while it waits in the relay between
    /// two (or after it closed).
    pub fn holders(&self, inodes: &[u64]) -> Vec<Vec<i32>> {
        let held: Vec<(i32, Vec<u64>)> = self
            .processes()
            .into_iter()
            .map(|pid| (pid, sockets_of(pid)))
            .collect();
        inodes
            .iter()
            .map(|inode| {
                held.iter()
                    .filter(|(_, socks)| socks.contains(inode))
                    .map(|&(pid, _)| pid)
                    .collect()
            })
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

/// The pid a log line names as its writer (`echo-forkd[PID]: ...`).
pub fn writer(line: &str) -> Option<i32> {
    line.strip_prefix("echo-forkd[")?
        .split(']')
        .next()?
        .parse()
        .ok()
}
