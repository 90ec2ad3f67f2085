//! Logging to syslog over a unix datagram socket the test owns.

use super::*;
use std::os::unix::net::UnixDatagram;

fn recv_until(sock: &UnixDatagram, pred: impl Fn(&str) -> bool) -> Option<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + DEADLINE;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            if pred(&line) {
                return Some(line);
            }
        }
    }
    None
}

/// `(pri, pid, message)` of an RFC 3164 line from echo-forkd.
fn parse(line: &str) -> (u32, i32, String) {
    let pri = line[1..line.find('>').unwrap()].parse().unwrap();
    let after = &line[line.find("echo-forkd[").expect("ident echo-forkd") + 11..];
    let close = after.find("]: ").unwrap();
    (
        pri,
        after[..close].parse().unwrap(),
        after[close + 3..].to_string(),
    )
}

#[test]
fn syslog_lines_carry_ident_facility_and_the_writers_pid() {
    syslog_pids("prefork");
}

#[test]
fn syslog_lines_of_event_workers_carry_their_pid() {
    syslog_pids("event");
}

fn syslog_pids(mode: &str) {
    let dir = TempDir::new("syslog");
    let path = dir.path("log");
    let sock = UnixDatagram::bind(&path).unwrap();
    let sp = path.to_str().unwrap();
    let d = Daemon::spawn(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "2",
        "--min-spare",
        "0",
        "--log",
        "syslog",
        "--syslog-socket",
        sp,
        "--syslog-facility",
        "local3",
        "--log-level",
        "debug",
    ]);
    let line =
        recv_until(&sock, |l| l.contains("listening on ")).expect("no listening line on syslog");
    let (pri, pid, msg) = parse(&line);
    assert_eq!(pri, 19 * 8 + 6, "local3.info");
    assert_eq!(pid, d.pid);
    let addr: std::net::SocketAddr = msg.trim_start_matches("listening on ").parse().unwrap();
    recv_until(&sock, |l| l.ends_with(": ready")).expect("no ready line");
    assert_eq!(echo_all(addr, b"log me"), b"log me");
    let line = recv_until(&sock, |l| l.contains("connection from 127.0.0.1"))
        .expect("no per-connection line");
    let (pri, pid, _) = parse(&line);
    assert_eq!(pri, 19 * 8 + 7, "local3.debug");
    assert_ne!(pid, d.pid, "the worker logged with the master's pid");
    assert_eq!(
        proc_stat(pid).map(|(_, ppid)| ppid),
        Some(d.pid),
        "pid {pid} is not a worker"
    );
    assert_eq!(d.stderr_text(), "", "syslog only, nothing on stderr");
}

#[test]
fn serves_with_the_syslog_socket_missing() {
    let dir = TempDir::new("nolog");
    let sock = dir.path("echo.sock");
    let listen = format!("unix:{}", sock.display());
    let missing = dir.path("no-such-log");
    let _d = Daemon::spawn(&[
        "-l",
        &listen,
        "-w",
        "1",
        "--min-spare",
        "0",
        "--log",
        "syslog",
        "--syslog-socket",
        missing.to_str().unwrap(),
        "--log-level",
        "debug",
    ]);
    // No log line tells us it is up: wait until it answers.
    assert!(wait_until(DEADLINE, || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    }));
    assert_eq!(echo_unix(&sock, b"no syslog"), b"no syslog");
}

#[test]
fn serves_while_syslog_is_stalled() {
    let dir = TempDir::new("stall");
    let path = dir.path("log");
    // Bound but never read: its queue fills after a few lines.
    let sock = UnixDatagram::bind(&path).unwrap();
    let d = Daemon::spawn(&[
        "-l",
        "127.0.0.1:0",
        "-w",
        "2",
        "--min-spare",
        "0",
        "--log",
        "syslog",
        "--syslog-socket",
        path.to_str().unwrap(),
        "--log-level",
        "debug",
    ]);
    let line = recv_until(&sock, |l| l.contains("listening on ")).unwrap();
    let addr: std::net::SocketAddr = parse(&line)
        .2
        .trim_start_matches("listening on ")
        .parse()
        .unwrap();
    // Every connection logs a debug line nobody reads.
    for i in 0..300u32 {
        assert_eq!(echo_all(addr, &i.to_be_bytes()), i.to_be_bytes());
    }
    assert_eq!(d.children().len(), 2);
}

#[test]
fn serves_while_its_stderr_reader_is_stalled() {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    // A pipe of one page, as a stuck log collector or container
    // runtime leaves it: nobody reads it after the start.
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let child = std::process::Command::new(BIN)
        // One worker, so the one that dropped lines serves the last.
        .args(["-f", "-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"])
        .args(["--log-level", "debug"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(w))
        .process_group(0)
        .spawn()
        .unwrap();
    struct Group(std::process::Child);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                Signal::SIGKILL,
            );
            let _ = self.0.wait();
        }
    }
    let _group = Group(child);
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (go_on, wait_go) = std::sync::mpsc::channel::<()>();
    let reader = std::fs::File::from(r);
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(reader).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            let ready = line.ends_with(": ready");
            let _ = tx.send(line);
            if ready {
                break;
            }
        }
        // Stalled until the test says so.
        let _ = wait_go.recv();
        for line in lines.map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let end = Instant::now() + DEADLINE;
    while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        if let Some(a) = line.split("listening on ").nth(1) {
            addr = a.parse::<std::net::SocketAddr>().ok();
        }
        if line.ends_with(": ready") {
            break;
        }
    }
    let addr = addr.expect("no listening line");
    // Each connection logs a debug line: far more than the pipe holds.
    let start = Instant::now();
    for i in 0..2000u32 {
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            round_trip(&mut s, &i.to_be_bytes())
                .unwrap_or_else(|e| panic!("connection {i} not served with stderr stalled: {e}")),
            i.to_be_bytes()
        );
    }
    println!(
        "2000 connections with stderr stalled in {:?}",
        start.elapsed()
    );
    // The reader wakes up: the loss is reported once lines get through.
    // Until the reader has made room, a line may be dropped again: each
    // connection below is one more line that tries.
    go_on.send(()).unwrap();
    let end = Instant::now() + DEADLINE;
    let mut reported = false;
    while !reported && Instant::now() < end {
        let mut s = connect(addr);
        assert_eq!(round_trip(&mut s, b"again").unwrap(), b"again");
        drop(s);
        let wait = Duration::from_millis(200).min(end.saturating_duration_since(Instant::now()));
        while let Ok(line) = rx.recv_timeout(wait) {
            if line.contains("log lines were dropped") {
                reported = true;
                break;
            }
        }
    }
    assert!(reported, "the dropped lines were never reported");
}

#[test]
fn a_detached_daemon_logs_its_listeners_with_the_masters_pid() {
    let dir = TempDir::new("detached-log");
    let path = dir.path("log");
    let sock = UnixDatagram::bind(&path).unwrap();
    let pidfile = dir.path("pid");
    let d = Detached::start(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "1",
            "--min-spare",
            "0",
            "--syslog-socket",
            path.to_str().unwrap(),
            "-p",
            pidfile.to_str().unwrap(),
        ],
        &pidfile,
    )
    .unwrap_or_else(|e| panic!("did not start: {e:?}"));
    let line = recv_until(&sock, |l| l.contains("listening on ")).expect("no listening line");
    let (_, pid, _) = parse(&line);
    assert_eq!(pid, d.pid, "logged by the launcher, not the master: {line}");
}
