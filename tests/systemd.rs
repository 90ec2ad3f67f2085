//! The systemd protocols and inetd, with the test acting as the manager.

use super::*;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::os::unix::process::CommandExt;
use std::process::Command;

fn recv_containing(sock: &UnixDatagram, what: &str) -> Option<String> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == what) {
                return Some(msg);
            }
        }
    }
    None
}

#[test]
fn notifies_ready_status_and_stopping() {
    let dir = TempDir::new("notify");
    let path = dir.path("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut d = Daemon::spawn_with(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"], |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    let ready = recv_containing(&sock, "READY=1").expect("no READY=1");
    assert!(
        ready.contains("STATUS=") && ready.contains("workers 2"),
        "{ready}"
    );
    // READY=1 comes once everything listens: a connect succeeds at once.
    assert_eq!(echo_all(d.addr(), b"up"), b"up");
    d.signal(Signal::SIGTERM);
    recv_containing(&sock, "STOPPING=1").expect("no STOPPING=1");
    assert!(d.wait_exit(DEADLINE).is_some_and(|s| s.success()));
}

/// STATUS= follows the figures (`systemctl status` shows what /metrics
/// says): after connections it is sent again within 2 s with the new
/// count, and an idle daemon sends nothing more.
#[test]
fn status_follows_the_figures_and_rests_when_idle() {
    let dir = TempDir::new("notify-status");
    let path = dir.path("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let d = Daemon::spawn_with(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"], |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    recv_containing(&sock, "READY=1").expect("no READY=1");
    for i in 0..3 {
        let msg = format!("status {i}");
        assert_eq!(echo_all(d.addr(), msg.as_bytes()), msg.as_bytes());
    }
    let began = Instant::now();
    let mut buf = [0u8; 4096];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (mut seen, mut settled) = (None, false);
    while began.elapsed() < Duration::from_secs(4) && !settled {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("connections served 3,") {
                seen = seen.or(Some(began.elapsed()));
                // The workers idle again: nothing moves after this one.
                settled = msg.contains("busy 0,");
            }
        }
    }
    let took = seen.expect("no STATUS= with the 3 connections within 4 s");
    assert!(
        took <= Duration::from_secs(2),
        "STATUS= came {took:?} after the figures moved"
    );
    assert!(settled, "no STATUS= with the workers idle again");
    // Idle now: nothing more for 2.5 s (it would be sent every second if
    // the uptime alone counted as a change).
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(2500) {
        if let Ok(n) = sock.recv(&mut buf) {
            panic!(
                "STATUS= sent while idle: {}",
                String::from_utf8_lossy(&buf[..n])
            );
        }
    }
}

#[test]
fn a_reload_is_bracketed_by_reloading_and_ready() {
    let dir = TempDir::new("notify-reload");
    let path = dir.path("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    let d = Daemon::spawn_with(&["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"], |c| {
        c.env("NOTIFY_SOCKET", &path);
    });
    recv_containing(&sock, "READY=1").expect("no READY=1");
    let before = now_usec();
    d.signal(Signal::SIGHUP);
    let reloading = recv_containing(&sock, "RELOADING=1").expect("no RELOADING=1");
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC: {reloading:?}"));
    assert!(usec >= before && usec <= now_usec(), "{usec} vs {before}");
    let ready = recv_containing(&sock, "READY=1").expect("no READY=1 after the reload");
    assert!(ready.contains("generation 2"), "{ready}");
    assert!(d.wait_line("reloaded:", DEADLINE).is_some());
}

/// CLOCK_MONOTONIC in microseconds, as systemd reads it.
fn now_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

/// The daemon started as a service manager starts it under socket
/// activation, with `fds` at 3 and on (`LISTEN_FDS`, `LISTEN_PID` its own
/// pid) and `args`, once it says it is ready.
fn activated(fds: &[OwnedFd], args: &[&str]) -> Daemon {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    assert!(raw.len() <= 8, "at most 8 sockets");
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be the daemon's own pid: set it in the process
    // that then execs echo-forkd.
    let set = format!("LISTEN_PID=$$ LISTEN_FDS={} exec \"$0\" \"$@\"", raw.len());
    cmd.arg("-c").arg(set).arg(BIN).args(args);
    // SAFETY: fcntl and dup2 are async-signal-safe, nothing is allocated
    // after the fork (the vector was made before and is only read). The
    // sockets are first copied above every target (one of them may sit at
    // a target and be overwritten otherwise), then placed at 3, 4, ...
    // without close-on-exec, as a service manager does.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0i32; 8];
            for (h, &fd) in high.iter_mut().zip(raw.iter()) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high[..raw.len()].iter().enumerate() {
                if libc::dup2(fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let d = Daemon::from_command(cmd);
    assert!(
        d.wait_line("ready", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    d
}

#[test]
fn uses_sockets_passed_by_socket_activation() {
    let dir = TempDir::new("activation");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let upath = dir.path("activated.sock");
    let unix = UnixListener::bind(&upath).unwrap();
    // A datagram socket too, as a .socket unit's ListenDatagram= passes.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let uaddr = udp.local_addr().unwrap();
    let fds: [OwnedFd; 3] = [tcp.into(), unix.into(), udp.into()];
    // No --listen: it is optional here.
    let d = activated(&fds, &["-f", "-w", "1", "--min-spare", "0"]);
    drop(fds);
    let names = d.listening();
    assert!(names.contains(&addr.to_string()), "{names:?}");
    assert!(
        names.contains(&format!("unix:{}", upath.display())),
        "{names:?}"
    );
    assert_eq!(echo_all(addr, b"activated"), b"activated");
    assert_eq!(echo_unix(&upath, b"unix too"), b"unix too");
    assert!(names.contains(&format!("udp:{uaddr}")), "{names:?}");
    let got = echo_udp(uaddr, b"datagram").expect("the passed UDP socket answers");
    assert_eq!(got, b"datagram");
}

/// Under socket activation the passed sockets replace the configured echo
/// addresses: one they do not cover (a `udp:` listener where the socket
/// unit has only `ListenStream=`) is a warning that names it and the
/// line to add, and the covered one is not.
#[test]
fn a_configured_listener_socket_activation_does_not_pass_is_warned_about() {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = tcp.local_addr().unwrap();
    let fd: OwnedFd = tcp.into();
    let udp = format!("udp:127.0.0.1:{}", addr.port());
    let d = activated(
        std::slice::from_ref(&fd),
        &[
            "-f",
            "-w",
            "1",
            "--min-spare",
            "0",
            "-l",
            &addr.to_string(),
            "-l",
            &udp,
        ],
    );
    drop(fd);
    let log = d.stderr_text();
    assert!(
        log.contains("using 1 socket passed by the service manager"),
        "{log}"
    );
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("socket activation:"))
        .collect();
    assert_eq!(
        warned.len(),
        1,
        "one warning, for the UDP listener only:\n{log}"
    );
    assert!(
        warned[0].contains(&format!("{udp} is configured but not among"))
            && warned[0].contains(&format!(
                "add ListenDatagram={}:{}",
                "127.0.0.1",
                addr.port()
            )),
        "{}",
        warned[0]
    );
    assert_eq!(echo_all(addr, b"tcp is served"), b"tcp is served");
}

#[test]
fn inetd_mode_echoes_the_connection_on_stdin() {
    let mut i = Inetd::spawn(&["--log", "syslog", "--syslog-socket", "/nonexistent/log"]);
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let writer = {
        let mut w = i.conn.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || {
            w.write_all(&data).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    i.conn.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data, "inetd echo differs");
    assert!(wait_until(
        DEADLINE,
        || matches!(i.child.try_wait(), Ok(Some(s)) if s.success())
    ));
}
