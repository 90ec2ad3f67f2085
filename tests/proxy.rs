//! `--proxy-protocol`: a real HAProxy in front (v1 and v2), and what is
//! refused: an untrusted source, a trusted one without a header, one that
//! sends nothing.

use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};

use super::*;

/// HAProxy listening on two ports that forward to `backend`, one with
/// `send-proxy` (v1), one with `send-proxy-v2`, each server line ending
/// with `more`; `None` if it is not installed.
fn haproxy(
    dir: &TempDir,
    backend: SocketAddr,
    more: &str,
) -> Option<(Killed, SocketAddr, SocketAddr)> {
    let bin = ["/usr/sbin/haproxy", "haproxy"].into_iter().find(|b| {
        Command::new(b)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    })?;
    let (v1, v2) = (free_port(), free_port());
    let conf = dir.path("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 100\n\
             defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend echo1\n\
             frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend echo2\n\
             backend echo1\n  server e {backend} send-proxy{more}\n\
             backend echo2\n  server e {backend} send-proxy-v2{more}\n"
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let h = Killed(child);
    let (a, b) = (
        SocketAddr::from(([127, 0, 0, 1], v1)),
        SocketAddr::from(([127, 0, 0, 1], v2)),
    );
    let up = wait_until(DEADLINE, || {
        TcpStream::connect(a).is_ok() && TcpStream::connect(b).is_ok()
    });
    assert!(up, "HAProxy did not start listening");
    Some((h, a, b))
}

/// A connection from `ip` (one of 127.0.0.0/8) to `to`.
fn connect_from(ip: [u8; 4], to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let from = std::net::SocketAddrV4::new(ip.into(), 0);
    bind(fd.as_raw_fd(), &SockaddrIn::from(from)).unwrap();
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Whether the connection was closed without a byte of echo.
fn closed_unread(mut s: TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn proxied(mode: &str, trusted: &str, more: &[&str]) -> Daemon {
    let mut args = vec![
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "2",
        "--min-spare",
        "0",
        "--proxy-protocol",
        "--trusted-proxy",
        trusted,
        "--log-level",
        "debug",
    ];
    args.extend_from_slice(more);
    Daemon::start(&args)
}

in_modes!(behind_a_real_haproxy: behind_a_real_haproxy; prefork, fork, event);

fn behind_a_real_haproxy(mode: &str) {
    let dir = TempDir::new("haproxy");
    let d = proxied(mode, "127.0.0.1/32", &["--deny", "127.0.0.5/32"]);
    let Some((_h, v1, v2)) = haproxy(&dir, d.addr(), "") else {
        skipped(format_args!("no haproxy here (Debian package haproxy)"));
        return;
    };
    for (front, version) in [(v1, "v1"), (v2, "v2")] {
        let mut s = connect_from([127, 0, 0, 6], front);
        let msg = format!("through HAProxy {version}");
        assert_eq!(
            round_trip(&mut s, msg.as_bytes()).unwrap(),
            msg.as_bytes(),
            "{version}"
        );
        drop(s);
        // The log names the client (127.0.0.6), not HAProxy (127.0.0.1).
        assert!(
            d.wait_line("connection from 127.0.0.6:", DEADLINE)
                .is_some(),
            "{version}: {}",
            d.stderr_text()
        );
        // --deny applies to the client's real address.
        let mut denied = connect_from([127, 0, 0, 5], front);
        denied.write_all(b"let me in").unwrap();
        assert!(
            closed_unread(denied),
            "{version}: a denied client was served"
        );
    }
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status:", DEADLINE).unwrap();
    assert!(status.contains("allow/deny rules 2"), "{status}");
}

in_modes!(untrusted_or_headerless_or_silent_is_refused: refused; prefork, fork, event);

fn refused(mode: &str) {
    // Only 127.0.0.7 may send a header.
    let d = proxied(
        mode,
        "127.0.0.7/32",
        &["--metrics", "127.0.0.1:0", "--deny", "10.6.6.6/32"],
    );
    let addr = d.addr();
    // A valid header from anyone else is refused.
    let mut forged = connect_from([127, 0, 0, 1], addr);
    forged
        .write_all(b"PROXY TCP4 10.9.9.9 127.0.0.1 1234 7\r\nforged")
        .unwrap();
    assert!(closed_unread(forged), "an untrusted proxy was believed");
    // A trusted source must send one.
    let mut bare = connect_from([127, 0, 0, 7], addr);
    bare.write_all(b"no header here\r\n").unwrap();
    assert!(closed_unread(bare), "served without a header");
    // A well-formed header whose client the rules deny.
    let mut denied = connect_from([127, 0, 0, 7], addr);
    denied
        .write_all(b"PROXY TCP4 10.6.6.6 127.0.0.1 4000 7\r\ndenied")
        .unwrap();
    assert!(closed_unread(denied), "a denied client was served");
    // The header and the client's first bytes in one segment: the bytes
    // are the client's, and come back.
    let mut both = connect_from([127, 0, 0, 7], addr);
    both.write_all(b"PROXY TCP4 10.1.2.3 127.0.0.1 4000 7\r\nsame segment")
        .unwrap();
    let mut got = [0u8; 12];
    both.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"same segment");
    drop(both);
    // A trusted source that sends nothing is dropped at the deadline.
    let silent = connect_from([127, 0, 0, 7], addr);
    silent
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let started = Instant::now();
    assert!(closed_unread(silent), "a silent proxy was served");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(7),
        "dropped after {waited:?}"
    );
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status:", DEADLINE).unwrap();
    assert!(status.contains("PROXY protocol 3"), "{status}");
    let text = scrape(&d);
    assert!(
        text.contains("echo_forkd_refused_total{reason=\"proxy\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("echo_forkd_refused_total{reason=\"deny\"} 1\n"),
        "{text}"
    );
    // One meaning in every mode: of the five connections only one was
    // served; the refused ones are refusals, not connections.
    assert!(
        text.contains("echo_forkd_connections_total 1\n"),
        "{mode}: {text}"
    );
}

in_modes!(max_per_ip_counts_the_real_client: max_per_ip_behind_a_proxy; prefork, fork, event);

fn max_per_ip_behind_a_proxy(mode: &str) {
    let d = proxied(mode, "127.0.0.1/32", &["--max-per-ip", "1"]);
    let addr = d.addr();
    let from = |client: &str| {
        let mut s = connect_from([127, 0, 0, 1], addr);
        s.write_all(format!("PROXY TCP4 {client} 127.0.0.1 5000 7\r\n").as_bytes())
            .unwrap();
        s
    };
    let mut first = from("10.0.0.1");
    assert_eq!(round_trip(&mut first, b"one").unwrap(), b"one");
    // The same client again while the first is open: refused, though the
    // proxy's own address is the same for all.
    let mut second = from("10.0.0.1");
    second.write_all(b"two").unwrap();
    assert!(
        closed_unread(second),
        "a second connection from 10.0.0.1 was served"
    );
    let mut other = from("10.0.0.2");
    assert_eq!(round_trip(&mut other, b"other").unwrap(), b"other");
    // Once the first is gone, its place is free again.
    drop(first);
    assert!(
        wait_until(DEADLINE, || {
            let mut again = from("10.0.0.1");
            matches!(round_trip(&mut again, b"again"), Ok(v) if v == b"again")
        }),
        "10.0.0.1 stayed counted after its connection closed"
    );
}

#[test]
fn proxy_protocol_needs_trusted_proxies() {
    let (code, err) = launch(&["-l", "127.0.0.1:0", "--proxy-protocol", "-t"]);
    assert_eq!(code, 2);
    assert!(err.contains("trusted-proxy"), "{err}");
    let (code, err) = launch(&[
        "-l",
        "127.0.0.1:0",
        "--proxy-protocol",
        "--trusted-proxy",
        "10.0.0.1/8",
        "-t",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("trusted-proxy") && err.contains("10.0.0.1/8"),
        "{err}"
    );
}

in_modes!(the_header_deadline_is_the_operators: header_deadline; prefork, fork, event);

/// `--proxy-protocol-timeout` sets how long a trusted proxy may take to
/// send its header (5 s by default).
fn header_deadline(mode: &str) {
    let d = proxied(mode, "127.0.0.1/32", &["--proxy-protocol-timeout", "1"]);
    let silent = connect_from([127, 0, 0, 1], d.addr());
    let started = Instant::now();
    assert!(closed_unread(silent), "a silent proxy was served");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "dropped after {waited:?}, not after 1 s (the default is 5 s)"
    );
    let (code, err) = launch(&[
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1",
        "--proxy-protocol-timeout",
        "0",
        "-t",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("proxy-protocol-timeout"), "{err}");
}

/// Closes `s` with a reset (`SO_LINGER` 0), as HAProxy ends a check.
fn reset(s: TcpStream) {
    let l = nix::sys::socket::sockopt::Linger;
    let zero = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&s, l, &zero).unwrap();
    drop(s);
}

/// The daemon's `/metrics`, from its `--metrics` listener.
fn scrape(d: &Daemon) -> String {
    let at: SocketAddr = d
        .listening()
        .iter()
        .find_map(|a| a.strip_prefix("metrics:").and_then(|a| a.parse().ok()))
        .expect("the metrics listener");
    let mut m = TcpStream::connect(at).unwrap();
    m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    m.read_to_string(&mut text).unwrap();
    text
}

/// The sample `name` of the exposition `text`.
fn sample(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

in_modes!(a_balancers_health_checks_are_not_refusals: health_checks; prefork, fork, event);

/// HAProxy's `check` on a `send-proxy-v2` server sends a v2 `LOCAL`
/// header and resets; other balancers connect and close, or reset at
/// once. None of it is a refusal: `refused_total{reason="proxy"}` and its
/// warning stay for what an operator must act on, which an untrusted
/// source still is.
fn health_checks(mode: &str) {
    let d = proxied(mode, "127.0.0.7/32", &["--metrics", "127.0.0.1:0"]);
    let addr = d.addr();
    // v2 LOCAL: signature, version 2 command LOCAL, family UNSPEC, length 0.
    let local_v2 = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
    for _ in 0..3 {
        let mut s = connect_from([127, 0, 0, 7], addr);
        s.write_all(local_v2).unwrap();
        reset(s);
        let mut s = connect_from([127, 0, 0, 7], addr);
        s.write_all(b"PROXY UNKNOWN\r\n").unwrap();
        drop(s);
        // Gone before the header was whole, or before anything.
        let mut s = connect_from([127, 0, 0, 7], addr);
        s.write_all(&local_v2[..7]).unwrap();
        reset(s);
        reset(connect_from([127, 0, 0, 7], addr));
        drop(connect_from([127, 0, 0, 7], addr));
    }
    // A LOCAL connection that talks is served as from the proxy.
    let mut s = connect_from([127, 0, 0, 7], addr);
    s.write_all(local_v2).unwrap();
    assert_eq!(round_trip(&mut s, b"local").unwrap(), b"local");
    drop(s);
    // And an untrusted source is still refused, and counted, alone.
    let mut forged = connect_from([127, 0, 0, 1], addr);
    forged.write_all(local_v2).unwrap();
    assert!(closed_unread(forged), "an untrusted proxy was served");
    let report = d
        .wait_line("(PROXY protocol) since the last report", DEADLINE)
        .unwrap_or_else(|| panic!("{mode}: no report of the refusal:\n{}", d.stderr_text()));
    assert!(
        report.contains("refused 1 connection (PROXY protocol) since the last report; 1 in all"),
        "{mode}: health checks counted as refusals: {report}"
    );
    // 15 checks and the talker end, as counted by whoever served them.
    let mut text = String::new();
    let counted = wait_until(DEADLINE, || {
        text = scrape(&d);
        let served = sample(&text, "echo_forkd_connections_total").unwrap_or(0);
        let gone = sample(&text, "echo_forkd_connections_abandoned_total").unwrap_or(0);
        served + gone == 16
    });
    assert!(counted, "{mode}: not all 16 counted:\n{text}");
    assert_eq!(
        sample(&text, "echo_forkd_refused_total{reason=\"proxy\"}"),
        Some(1),
        "{mode}: {text}"
    );
    // At least the nine that went before their header was whole.
    let gone = sample(&text, "echo_forkd_connections_abandoned_total").unwrap_or(0);
    assert!(gone >= 9, "{mode}: {gone} abandoned:\n{text}");
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status:", DEADLINE).unwrap();
    assert!(status.contains("PROXY protocol 1"), "{mode}: {status}");
}

in_modes!(a_real_haproxys_checks_are_no_refusals: haproxy_checks; prefork, fork, event);

/// HAProxy 2.6 with `check` (every 100 ms) on a `send-proxy` and a
/// `send-proxy-v2` server, in front for 10 s while a client talks through
/// it: no refusal is counted or warned about, every check is seen.
fn haproxy_checks(mode: &str) {
    let dir = TempDir::new("haproxy-checks");
    let d = proxied(mode, "127.0.0.1/32", &["--metrics", "127.0.0.1:0"]);
    let Some((_h, _v1, v2)) = haproxy(&dir, d.addr(), " check inter 100ms") else {
        skipped(format_args!("no haproxy here (Debian package haproxy)"));
        return;
    };
    let mut s = connect_from([127, 0, 0, 6], v2);
    let end = Instant::now() + Duration::from_secs(10);
    let mut talks = 0;
    while Instant::now() < end {
        assert_eq!(round_trip(&mut s, b"through").unwrap(), b"through");
        talks += 1;
        // Pacing a conversation, not waiting for anything.
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(s);
    let text = scrape(&d);
    assert_eq!(
        sample(&text, "echo_forkd_refused_total{reason=\"proxy\"}"),
        Some(0),
        "{mode}: HAProxy's checks counted as refusals:\n{text}"
    );
    let served = sample(&text, "echo_forkd_connections_total").unwrap_or(0);
    let gone = sample(&text, "echo_forkd_connections_abandoned_total").unwrap_or(0);
    // Two servers checked every 100 ms for 10 s: about 200, surely 50.
    assert!(
        served + gone >= 50,
        "{mode}: only {served} served and {gone} abandoned after {talks} round trips:\n{text}"
    );
    let log = d.stderr_text();
    assert!(
        !log.contains("(PROXY protocol) since the last report")
            && !log.contains("not from a trusted proxy"),
        "{mode}: a refusal was logged:\n{log}"
    );
}
