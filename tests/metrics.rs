//! `--metrics`: the exposition read by Prometheus's own Python parser, its
//! counters moving, and clients that misbehave.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use super::*;

/// A Python that has Prometheus's client library, whose parser is the
/// reference one (Debian's `python3-prometheus-client`).
fn prometheus_python() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        Command::new(py)
            .args(["-c", "import prometheus_client.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The metrics' address from the `listening on metrics:` line.
fn metrics_addr(d: &Daemon) -> SocketAddr {
    d.wait_line("listening on metrics:", DEADLINE);
    d.listening()
        .iter()
        .find_map(|a| a.strip_prefix("metrics:").and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("no metrics listener; stderr:\n{}", d.stderr_text()))
}

/// One HTTP request; the whole answer.
fn http(addr: SocketAddr, request: &str) -> String {
    let mut s = connect(addr);
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

/// Scrapes `addr` and parses the body with Prometheus's parser: every
/// sample as `name{labels}` (labels sorted, as the parser gives them) →
/// value.
fn scrape(py: &str, addr: SocketAddr) -> BTreeMap<String, f64> {
    let answer = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    let script = "import sys\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        for f in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in f.samples:\n\
        \x20       labels = ','.join(f'{k}={v}' for k, v in sorted(s.labels.items()))\n\
        \x20       print(f'{s.name}{{{labels}}} {s.value}')\n";
    let mut child = Command::new(py)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

fn value(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no {key} in {:?}", m.keys().collect::<Vec<_>>()))
}

in_modes!(metrics_parse_and_count: metrics_parse_and_count; prefork, fork, event);

fn metrics_parse_and_count(mode: &str) {
    let Some(py) = prometheus_python() else {
        skipped(format_args!(
            "no Python with prometheus_client (python3-prometheus-client)"
        ));
        return;
    };
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "2",
        "--min-spare",
        "0",
        "--deny",
        "127.0.0.2/32",
        "--metrics",
        "127.0.0.1:0",
    ]);
    let (echo, metrics) = (d.addr(), metrics_addr(&d));
    let before = scrape(py, metrics);
    for name in [
        "echo_forkd_connections_total{}",
        "echo_forkd_bytes_total{}",
        "echo_forkd_open_connections{}",
        "echo_forkd_datagrams_total{}",
        "echo_forkd_reloads_total{}",
        "echo_forkd_start_time_seconds{}",
        "echo_forkd_workers{state=busy}",
        "echo_forkd_workers{state=idle}",
        "echo_forkd_worker_exits_total{cause=signal}",
        "echo_forkd_datagrams_dropped_total{reason=rate}",
        "echo_forkd_build_info{version=0.1.0}",
    ] {
        value(&before, name);
    }
    for i in 0..5 {
        let msg = format!("hello {i}");
        assert_eq!(echo_all(echo, msg.as_bytes()), msg.as_bytes());
    }
    // A denied client is closed unread.
    let denied = connect_from_ip("127.0.0.2", echo);
    let mut sink = [0u8; 1];
    assert!(matches!((&denied).read(&mut sink), Ok(0) | Err(_)));
    let key = "echo_forkd_connections_total{}";
    let mut after = scrape(py, metrics);
    // A connection is counted as it ends, just after its client saw EOF.
    assert!(wait_until(DEADLINE, || {
        after = scrape(py, metrics);
        value(&after, key) >= value(&before, key) + 5.0
    }));
    assert_eq!(value(&after, key), value(&before, key) + 5.0, "{after:?}");
    assert_eq!(
        value(&after, "echo_forkd_bytes_total{}") - value(&before, "echo_forkd_bytes_total{}"),
        (0..5).map(|i| format!("hello {i}").len()).sum::<usize>() as f64
    );
    assert_eq!(value(&after, "echo_forkd_refused_total{reason=deny}"), 1.0);
    let start = value(&after, "echo_forkd_start_time_seconds{}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - 60.0..=now).contains(&start), "{start} vs {now}");
    // A worker killed is counted.
    if mode != "fork" {
        let kids = d.children();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(kids[0]), Signal::SIGKILL).unwrap();
        let exits = "echo_forkd_worker_exits_total{cause=signal}";
        assert!(
            wait_until(DEADLINE, || value(&scrape(py, metrics), exits) == 1.0),
            "the killed worker was not counted"
        );
    }
    d.signal(Signal::SIGHUP);
    assert!(d.wait_line("reloaded:", DEADLINE).is_some());
    assert!(
        wait_until(DEADLINE, || value(
            &scrape(py, metrics),
            "echo_forkd_reloads_total{}"
        ) == 1.0),
        "the reload was not counted"
    );
}

/// A connection from `ip` (one of 127.0.0.0/8).
fn connect_from_ip(ip: &str, to: SocketAddr) -> std::net::TcpStream {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let from: std::net::SocketAddrV4 = format!("{ip}:0").parse().unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(from),
    )
    .unwrap();
    let s = std::net::TcpStream::from(fd);
    let SocketAddr::V4(to) = to else {
        panic!("an IPv4 address")
    };
    nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&s), &SockaddrIn::from(to)).unwrap();
    s
}

#[test]
fn other_paths_and_methods_are_refused() {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    let m = metrics_addr(&d);
    let not_found = http(m, "GET / HTTP/1.1\r\n\r\n");
    assert!(not_found.starts_with("HTTP/1.1 404"), "{not_found}");
    let post = http(m, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    let head = http(m, "HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
    let garbage = http(m, "\u{1}\u{2}\u{3}\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
}

#[test]
fn stuck_metrics_clients_delay_neither_echo_nor_a_second_scrape() {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    let (echo, m) = (d.addr(), metrics_addr(&d));
    // One sends nothing; one sends a megabyte of headers and never reads.
    let silent = connect(m);
    let mut flood = connect(m);
    flood.set_nonblocking(true).unwrap();
    let mut sent = 0;
    let big = vec![b'x'; 64 * 1024];
    let _ = flood.write_all(b"GET /metrics HTTP/1.1\r\nX: ");
    while sent < 1 << 20 {
        match flood.write(&big) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let started = Instant::now();
    assert_eq!(echo_all(echo, b"still echoing"), b"still echoing");
    let answer = http(m, "GET /metrics HTTP/1.1\r\n\r\n");
    let took = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The stuck clients' deadline is 2 s: a scrape that waited for them
    // would take that long.
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    // The silent one is dropped at its deadline.
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 64];
    let got = (&silent).read(&mut buf);
    assert!(
        matches!(got, Ok(0))
            || matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{got:?}"
    );
}

#[test]
fn the_metrics_address_is_checked_like_a_listener() {
    let (code, err) = launch(&["-l", "127.0.0.1:7107", "--metrics", "127.0.0.1:7107", "-t"]);
    assert_eq!(code, 2);
    assert!(err.contains("overlap"), "{err}");
    let (code, err) = launch(&["--metrics", "udp:127.0.0.1:9"]);
    assert_ne!(code, 0);
    assert!(err.contains("metrics address"), "{err}");
    let (code, err) = launch(&["-l", "metrics:127.0.0.1:9"]);
    assert_ne!(code, 0);
    assert!(err.contains("--metrics"), "{err}");
}

/// 200 clients that connect, send nothing and reconnect as soon as they
/// are dropped: a scrape from another host, and one from their own,
/// still answers within a second (each silent client may hold its place
/// for 2 s, so a scrape that queued behind them waited tens of seconds).
#[test]
fn a_scrape_behind_two_hundred_silent_clients_answers_within_a_second() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let _heavy = heavy();
    let d = Daemon::start(&["-l", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]);
    let m = metrics_addr(&d);
    let stop = Arc::new(AtomicBool::new(false));
    let silent: Vec<_> = (0..200)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(s) = TcpStream::connect_timeout(&m, Duration::from_secs(1)) else {
                        continue;
                    };
                    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                    // Held, silent, until the server lets go (or the end).
                    let mut buf = [0u8; 16];
                    while !stop.load(Ordering::SeqCst) {
                        match (&s).read(&mut buf) {
                            Ok(0) => break,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                            _ => break,
                        }
                    }
                }
            })
        })
        .collect();
    // Let the crowd fill every place and the backlog behind it.
    assert!(wait_until(DEADLINE, || {
        let established = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let port = format!(":{:04X} ", m.port());
        established
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| a.ends_with(port.trim()))
            })
            .count()
            >= 150
    }));
    let mut took = Vec::new();
    for from in ["127.0.0.2", "127.0.0.1"] {
        let started = Instant::now();
        let mut s = connect_from_ip(from, m);
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        took.push((from, started.elapsed()));
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("echo_forkd_build_info"),
            "from {from}: {answer:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    for t in silent {
        let _ = t.join();
    }
    for (from, t) in took {
        assert!(
            t < Duration::from_secs(1),
            "a scrape from {from} took {t:?}"
        );
    }
}
