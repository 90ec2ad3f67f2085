//! A crash of the master under a service manager cuts nothing: the test
//! acts as systemd (a `NOTIFY_SOCKET`, the file descriptor store that
//! keeps what `FDSTORE=1` sends, `LISTEN_FDS`/`LISTEN_FDNAMES` for the
//! next instance), SIGKILLs the master while conversations are open, and
//! starts the next master with what the store kept, as
//! `Restart=on-failure` does. The workers of the dead master put their
//! connections in the vault; the next master's workers (in prefork and
//! fork mode, a carrier until a reload) serve them on, every byte, to
//! their end.

use super::*;
use std::collections::BTreeMap;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The service manager's side: its notification socket and its store.
struct Manager {
    dir: TempDir,
    sock: UnixDatagram,
    store: BTreeMap<String, Vec<OwnedFd>>,
}

impl Manager {
    fn new(tag: &str) -> Manager {
        let dir = TempDir::new(tag);
        let sock = UnixDatagram::bind(dir.path("notify")).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        Manager {
            dir,
            sock,
            store: BTreeMap::new(),
        }
    }

    /// Reads notifications, keeping what is stored, until one has the
    /// line `what`, at most `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self
                .take_one()
                .is_some_and(|m| m.lines().any(|l| l == what))
            {
                return true;
            }
        }
        false
    }

    /// Everything waiting, kept or dropped as systemd would.
    fn drain(&mut self) {
        while self.take_one().is_some() {}
    }

    fn take_one(&mut self) -> Option<String> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let mut fds = Vec::new();
        for c in msg.cmsgs().expect("room for the descriptors") {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS made these descriptors ours alone.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k));
        let name = field("FDNAME=").unwrap_or("stored").to_string();
        if field("FDSTORE=") == Some("1") {
            self.store.entry(name).or_default().extend(fds);
        } else if field("FDSTOREREMOVE=") == Some("1") {
            self.store.remove(&name);
        }
        Some(text)
    }

    /// Starts echo-forkd with `args`, its notifications to this manager
    /// and what the store keeps passed to it (`LISTEN_FDS`).
    fn start(&self, args: &[&str]) -> Daemon {
        let mut names = Vec::new();
        let mut raw = Vec::new();
        for (name, fds) in &self.store {
            for fd in fds {
                names.push(name.clone());
                raw.push(fd.as_raw_fd());
            }
        }
        let mut cmd = Command::new("/bin/sh");
        // LISTEN_PID must be the daemon's own pid: set it in the shell
        // that then execs echo-forkd.
        cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", BIN, "-f"])
            .args(args)
            .env("NOTIFY_SOCKET", self.dir.path("notify"));
        if !raw.is_empty() {
            cmd.env("LISTEN_FDS", raw.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        // SAFETY: fcntl and dup2 are async-signal-safe. The descriptors
        // are first copied above every target (one may sit where another
        // goes), then placed from fd 3 on without close-on-exec, as a
        // service manager does.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = Vec::with_capacity(raw.len());
                for &fd in &raw {
                    let h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 256);
                    if h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(h);
                }
                for (i, &fd) in high.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Daemon::from_command(cmd)
    }
}

/// A conversation: one connection, pinged with numbered messages.
struct Talk {
    s: TcpStream,
    k: u64,
    seq: u64,
}

impl Talk {
    fn ping(&mut self) -> std::io::Result<()> {
        let msg = [self.k.to_be_bytes(), self.seq.to_be_bytes()].concat();
        let back = round_trip(&mut self.s, &msg)?;
        self.seq += 1;
        if back == msg {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "conversation {}: wrong bytes",
                self.k
            )))
        }
    }
}

fn the_master_dies(mode: &str) {
    let _heavy = heavy();
    let mut m = Manager::new(&format!("crash-{mode}"));
    let args = [
        "-m",
        mode,
        "-l",
        "127.0.0.1:0",
        "-w",
        "2",
        "--max-workers",
        "64",
    ];
    let first = m.start(&args);
    assert!(
        m.wait_for("READY=1", DEADLINE),
        "no READY=1:\n{}",
        first.stderr_text()
    );
    let addr = first.addr();
    m.drain();
    assert!(
        m.store.get("vault").is_some_and(|v| v.len() == 2),
        "the vault is not in the store: {:?}",
        m.store.keys().collect::<Vec<_>>()
    );
    let mut talks: Vec<Talk> = (0..30)
        .map(|k| Talk {
            s: connect(addr),
            k,
            seq: 0,
        })
        .collect();
    // Three round trips each: a fork-mode child whose client talks waits
    // for it in a blocking read (echo/block.rs), and must still hear its
    // master die.
    for _ in 0..3 {
        for t in &mut talks {
            t.ping().expect("a conversation before the crash");
        }
    }
    // Stopped first, so that it forks no worker between the list and the
    // kill: every child of the dead master is in the list.
    first.signal(Signal::SIGSTOP);
    assert!(wait_until(DEADLINE, || proc_stat(first.pid)
        .is_some_and(|(s, _)| s == 'T')));
    let workers = first.children();
    first.signal(Signal::SIGKILL);
    // Its children put their connections in the vault and exit.
    assert!(
        wait_until(DEADLINE, || workers.iter().all(|&p| is_dead(p))),
        "children of the dead master still run: {:?}\n{}",
        workers.iter().filter(|&&p| !is_dead(p)).collect::<Vec<_>>(),
        first.stderr_text()
    );
    m.drain();
    let next = m.start(&args);
    assert!(
        m.wait_for("READY=1", DEADLINE),
        "the next master did not become ready:\n{}",
        next.stderr_text()
    );
    // Said before READY=1, but read from its stderr by another thread.
    assert!(
        next.wait_line("30 connections kept across the restart", DEADLINE)
            .is_some(),
        "{}",
        next.stderr_text()
    );
    for t in &mut talks {
        if let Err(e) = t.ping() {
            panic!(
                "conversation {} after the crash: {e}\nfirst master:\n{}\nnext:\n{}",
                t.k,
                first.stderr_text(),
                next.stderr_text()
            );
        }
    }
    // A new client too, on the listener the store kept.
    assert_eq!(echo_all(addr, b"new"), b"new");
    if mode == "prefork" || mode == "fork" {
        // They were served by a carrier from the start, not by a worker
        // (fork mode: a child) forked for each; a reload hands them to
        // workers (children), and the carrier, with nothing left, exits.
        let carrier = next
            .wait_line("carrier: serving 30 connections", DEADLINE)
            .and_then(|l| l.split(['[', ']']).nth(1)?.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("no carrier:\n{}", next.stderr_text()));
        assert!(next.children().contains(&carrier));
        next.signal(Signal::SIGHUP);
        assert!(
            wait_until(DEADLINE, || is_dead(carrier)),
            "the carrier {carrier} did not hand its connections over:\n{}",
            next.stderr_text()
        );
        for t in &mut talks {
            if let Err(e) = t.ping() {
                panic!(
                    "conversation {} after the reload: {e}\n{}",
                    t.k,
                    next.stderr_text()
                );
            }
        }
    }
    for t in &mut talks {
        t.s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        t.s.read_to_end(&mut rest)
            .expect("the end of a conversation");
        assert!(rest.is_empty(), "conversation {}: bytes after the end", t.k);
    }
}

in_modes!(the_master_dies_and_the_next_one_serves_every_conversation: the_master_dies; prefork, fork, event);
