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
    let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd(), fds[2].as_raw_fd()];
    let mut cmd = Command::new("/bin/sh");
    // LISTEN_PID must be the daemon's own pid: set it in the process
    // that then execs echo-forkd. No --listen: it is optional here.
    cmd.args([
        "-c",
        "LISTEN_PID=$$ LISTEN_FDS=3 exec \"$0\" \"$@\"",
        BIN,
        "-f",
        "-w",
        "1",
        "--min-spare",
        "0",
    ]);
    // SAFETY: fcntl and dup2 are async-signal-safe. The sockets are
    // first copied above every target (one of them may sit at fd 3 and
    // be overwritten otherwise), then placed at fds 3 to 5 without
    // close-on-exec, as a service manager does.
    unsafe {
        cmd.pre_exec(move || {
            let mut high = [0; 3];
            for (h, &fd) in high.iter_mut().zip(raw.iter()) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 64);
                if *h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &fd) in high.iter().enumerate() {
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
