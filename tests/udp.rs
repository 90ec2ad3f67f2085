//! UDP echo: exact replies from the right address, the abuse filter,
//! supervision of the UDP worker, and `udp:` listeners on reload.
//! (.ci/run runs them again with `ECHO_FORKD_UDP_SINGLE=1`: the worker
//! then takes datagrams one at a time, as on FreeBSD and macOS.)

use std::net::{SocketAddr, UdpSocket};

use super::*;

/// How long a datagram's answer is waited for.
const REPLY: Duration = Duration::from_secs(5);

/// The first `udp:` address the daemon listens on.
fn udp_addr(d: &Daemon) -> SocketAddr {
    d.wait_line("listening on udp:", DEADLINE);
    d.listening()
        .iter()
        .find_map(|a| a.strip_prefix("udp:").and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("no UDP listener; stderr:\n{}", d.stderr_text()))
}

/// A client socket on `ip`, talking only to `to` (a connected UDP socket
/// drops datagrams from any other address, so a reply from the wrong
/// local address is never seen).
fn client(ip: &str, to: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).expect("bind a client socket");
    s.connect(to).expect("connect the client socket");
    s.set_read_timeout(Some(REPLY)).unwrap();
    s
}

/// Sends `data` and returns the reply, or `None` if none came in time.
fn echo(s: &UdpSocket, data: &[u8]) -> Option<Vec<u8>> {
    s.send(data).expect("send a datagram");
    let mut buf = vec![0u8; 70_000];
    let n = s.recv(&mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// Whether a reply is waiting on `s` now (it never blocks).
fn has_reply(s: &UdpSocket) -> bool {
    s.set_nonblocking(true).unwrap();
    let got = s.recv(&mut [0u8; 16]).is_ok();
    s.set_nonblocking(false).unwrap();
    got
}

/// Proves that every datagram sent to the (one) UDP worker before now was
/// dealt with: one from a fresh source, answered, comes after them.
/// It is sent again every 200 ms: should its source share a rate bucket
/// with a flooding one (1 in 8192), it passes once the second turns.
fn barrier(to: SocketAddr) {
    barrier_from("127.0.0.9", to);
}

/// [`barrier`] from a source on `ip`.
fn barrier_from(ip: &str, to: SocketAddr) {
    let s = client(ip, to);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + REPLY;
    let mut buf = [0u8; 16];
    while Instant::now() < end {
        s.send(b"barrier").unwrap();
        if matches!(s.recv(&mut buf), Ok(n) if &buf[..n] == b"barrier") {
            return;
        }
    }
    panic!("the barrier datagram was never answered");
}

/// The USR1 status line.
fn status(d: &Daemon, n: usize) -> String {
    d.signal(Signal::SIGUSR1);
    d.wait_lines("status:", n, DEADLINE)
        .and_then(|mut v| v.pop())
        .expect("a status line")
}

fn udp_daemon(mode: &str, more: &[&str]) -> Daemon {
    let mut args = vec![
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "1",
        "--min-spare",
        "0",
    ];
    args.extend_from_slice(more);
    Daemon::start(&args)
}

in_modes!(datagrams_are_echoed_exactly: datagrams_are_echoed_exactly; prefork, fork, event);

fn datagrams_are_echoed_exactly(mode: &str) {
    let d = udp_daemon(mode, &["-l", "udp:127.0.0.1:0", "-l", "udp:*:0"]);
    let addr = udp_addr(&d);
    let s = client("127.0.0.1", addr);
    let mut rng = Stream::new(15);
    for size in [1, 1472, 8192, 65_507] {
        let mut data = vec![0u8; size];
        rng.fill(&mut data);
        let got = echo(&s, &data).unwrap_or_else(|| panic!("no answer to {size} bytes"));
        assert_eq!(
            got.len(),
            size,
            "{size}-byte datagram echoed as {}",
            got.len()
        );
        assert!(got == data, "{size}-byte datagram echoed with other bytes");
    }
    // The wildcard listener answers from the address it was sent to:
    // 127.0.0.2 here, though the route back would pick 127.0.0.1.
    let port = d
        .listening()
        .iter()
        .find_map(|a| {
            a.strip_prefix("udp:[::]:")
                .or(a.strip_prefix("udp:0.0.0.0:"))
        })
        .and_then(|p| p.parse::<u16>().ok())
        .expect("the wildcard UDP listener's port");
    let other = client("127.0.0.1", SocketAddr::from(([127, 0, 0, 2], port)));
    assert_eq!(echo(&other, b"from .2").as_deref(), Some(&b"from .2"[..]));
    if UdpSocket::bind("[::1]:0").is_ok() {
        let v6 = client(
            "::1",
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
        );
        assert_eq!(echo(&v6, b"six").as_deref(), Some(&b"six"[..]));
    } else {
        skipped(format_args!("IPv6 case skipped: no ::1 here"));
    }
}

in_modes!(filtered_sources_get_no_answer: filtered_sources_get_no_answer; prefork, fork, event);

fn filtered_sources_get_no_answer(mode: &str) {
    let d = udp_daemon(mode, &["-l", "udp:127.0.0.1:0", "--deny", "127.0.0.2/32"]);
    let addr = udp_addr(&d);
    let denied = client("127.0.0.2", addr);
    denied.send(b"denied").unwrap();
    let privileged = if nix::unistd::geteuid().is_root() {
        // One address per mode: the tests run side by side.
        let ip = match mode {
            "prefork" => "127.0.0.10",
            "fork" => "127.0.0.11",
            _ => "127.0.0.12",
        };
        let s = UdpSocket::bind((ip, 999)).expect("bind port 999 as root");
        s.connect(addr).unwrap();
        s.send(b"from a service port").unwrap();
        Some(s)
    } else {
        skipped(format_args!(
            "source port case skipped: binding port 999 needs root"
        ));
        None
    };
    barrier(addr);
    assert!(!has_reply(&denied), "a denied source was answered");
    assert!(
        !privileged.as_ref().is_some_and(has_reply),
        "a source port below 1024 was answered"
    );
    let line = status(&d, 1);
    assert!(line.contains("deny 1"), "{line}");
    if privileged.is_some() {
        assert!(line.contains("port 1"), "{line}");
    }
    assert!(
        d.wait_line("dropped 1 datagram unanswered (allow/deny rules)", DEADLINE)
            .is_some(),
        "the drop was not logged"
    );
}

in_modes!(a_burst_from_one_source_is_cut_to_the_rate: a_burst_is_cut; prefork, fork, event);

fn a_burst_is_cut(mode: &str) {
    const BURST: usize = 5000;
    const RATE: usize = 1000; // the default
    let d = udp_daemon(mode, &["-l", "udp:127.0.0.1:0"]);
    let addr = udp_addr(&d);
    let s = client("127.0.0.1", addr);
    let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &(8 << 20));
    let started = Instant::now();
    // In slices, each followed by a barrier, so the kernel never drops one
    // for a full socket buffer: every datagram reaches the filter.
    let mut answered = 0;
    let mut buf = [0u8; 64];
    s.set_nonblocking(true).unwrap();
    for k in 0..BURST / 50 {
        for j in 0..50 {
            // Each one different, as a real client's are (the same bytes
            // again and again look like an echo loop).
            let mut d = [7u8; 64];
            d[..4].copy_from_slice(&((k * 50 + j) as u32).to_le_bytes());
            s.send(&d).unwrap();
        }
        barrier(addr);
        while s.recv(&mut buf).is_ok() {
            answered += 1;
        }
    }
    let secs = started.elapsed().as_secs() as usize;
    // Each second's window answers at most RATE; the burst spans at most
    // secs + 2 windows. Without the limit all 5,000 would come back.
    assert!(
        (RATE..=RATE * (secs + 2)).contains(&answered) && answered < BURST,
        "{answered} of {BURST} answered in {secs} s at {RATE}/s"
    );
    let line = status(&d, 1);
    let dropped = format!("rate {}", BURST - answered);
    assert!(line.contains(&dropped), "expected {dropped}: {line}");
}

in_modes!(a_killed_udp_worker_is_replaced: a_killed_udp_worker_is_replaced; prefork, fork, event);

fn a_killed_udp_worker_is_replaced(mode: &str) {
    let d = udp_daemon(mode, &["-l", "udp:127.0.0.1:0"]);
    let addr = udp_addr(&d);
    let first = d
        .wait_line("udp worker ", DEADLINE)
        .and_then(|l| pid_in(&l))
        .expect("a udp worker started");
    let s = client("127.0.0.1", addr);
    assert_eq!(echo(&s, b"one").as_deref(), Some(&b"one"[..]));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    let second = d
        .wait_lines("udp worker ", 3, DEADLINE)
        .and_then(|v| v.iter().filter(|l| l.contains("started")).nth(1).cloned())
        .and_then(|l| pid_in(&l))
        .unwrap_or_else(|| panic!("no replacement; stderr:\n{}", d.stderr_text()));
    assert_ne!(first, second);
    assert!(wait_until(DEADLINE, || d.zombies().is_empty()));
    assert_eq!(echo(&s, b"two").as_deref(), Some(&b"two"[..]));
}

/// The pid in a `udp worker PID started` line.
fn pid_in(line: &str) -> Option<i32> {
    line.split("udp worker ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

in_modes!(udp_listeners_come_and_go_on_reload: udp_listeners_on_reload; prefork, fork, event);

fn udp_listeners_on_reload(mode: &str) {
    let dir = TempDir::new("udp-reload");
    let conf = dir.path("echo.toml");
    let text = |udp: bool| {
        let extra = if udp { ", \"udp:127.0.0.1:0\"" } else { "" };
        format!(
            "listen = [\"127.0.0.1:0\"{extra}]\nmode = \"{mode}\"\nworkers = 1\nmin-spare = 0\n"
        )
    };
    std::fs::write(&conf, text(false)).unwrap();
    let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
    assert!(!d.stderr_text().contains("udp worker"));
    std::fs::write(&conf, text(true)).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(d.wait_lines("reloaded:", 1, DEADLINE).is_some());
    let addr = udp_addr(&d);
    let s = client("127.0.0.1", addr);
    assert_eq!(echo(&s, b"added").as_deref(), Some(&b"added"[..]));
    // Unchanged on a second reload: the same port still answers.
    d.signal(Signal::SIGHUP);
    assert!(d.wait_lines("reloaded:", 2, DEADLINE).is_some());
    assert_eq!(echo(&s, b"kept").as_deref(), Some(&b"kept"[..]));
    std::fs::write(&conf, text(false)).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(d.wait_lines("reloaded:", 3, DEADLINE).is_some());
    assert!(d
        .wait_line("no longer listening on udp:", DEADLINE)
        .is_some());
    // Nothing is bound there now: the kernel refuses the datagram.
    assert!(
        wait_until(DEADLINE, || {
            s.send(b"gone").is_ok()
                && matches!(s.recv(&mut [0u8; 8]), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        }),
        "the removed udp: listener still answers"
    );
    let pool = if mode == "fork" { 0 } else { 1 };
    assert!(
        wait_until(DEADLINE, || d.children().len() == pool),
        "the udp worker did not leave: {:?}",
        d.children()
    );
}

/// `ECHO_FORKD_UDP_SINGLE=1` puts the UDP worker on the loop of systems
/// without `recvmmsg` (src/udp/single.rs), and without it the worker takes
/// batches: the worker's own debug line as it starts says which.
#[test]
fn the_environment_puts_the_udp_worker_on_one_datagram_at_a_time() {
    for (single, says) in [(true, "one at a time"), (false, "in batches")] {
        let args = [
            "-l",
            "127.0.0.1:0",
            "-l",
            "udp:127.0.0.1:0",
            "--log-level",
            "debug",
        ];
        let d = Daemon::spawn_with(&args, |c| {
            if single {
                c.env("ECHO_FORKD_UDP_SINGLE", "1");
            } else {
                c.env_remove("ECHO_FORKD_UDP_SINGLE");
            }
        });
        let worker = d
            .wait_line("udp worker ", DEADLINE)
            .and_then(|l| pid_in(&l))
            .unwrap_or_else(|| panic!("no udp worker; stderr:\n{}", d.stderr_text()));
        let line = d
            .wait_line("udp worker: taking datagrams", DEADLINE)
            .unwrap_or_else(|| panic!("no engine line; stderr:\n{}", d.stderr_text()));
        assert!(
            line.contains(&format!("[{worker}]:")) && line.contains(says),
            "single {single}: worker {worker} said {line:?}"
        );
        let s = client("127.0.0.1", udp_addr(&d));
        assert_eq!(echo(&s, b"which way").as_deref(), Some(&b"which way"[..]));
    }
}

in_modes!(no_udp_unless_asked: no_udp_unless_asked; prefork, fork, event);

fn no_udp_unless_asked(mode: &str) {
    let d = udp_daemon(mode, &[]);
    let tcp = d.addr();
    // Not even on the TCP port: nothing is bound for UDP there.
    let s = client("127.0.0.1", tcp);
    s.send(b"anyone?").unwrap();
    let got = s.recv(&mut [0u8; 16]);
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{got:?}"
    );
    assert!(!d.stderr_text().contains("udp"), "{}", d.stderr_text());
}

#[test]
fn a_udp_port_in_use_is_a_startup_error() {
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = format!("udp:{}", taken.local_addr().unwrap());
    let (code, err) = launch(&["-l", "127.0.0.1:0", "-l", &addr]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(&format!("cannot bind {addr}")), "{err}");
    assert!(err.contains("in use"), "{err}");
}

/// An IPv6 host gets a /64: twenty addresses of one share one
/// `--udp-rate`, unless `--ipv6-prefix 128` counts each on its own.
#[test]
fn ipv6_sources_share_the_rate_of_their_network() {
    const CLIENTS: [&str; 20] = [
        "2001:db8:1:2::a0",
        "2001:db8:1:2::a1",
        "2001:db8:1:2::a2",
        "2001:db8:1:2::a3",
        "2001:db8:1:2::a4",
        "2001:db8:1:2::a5",
        "2001:db8:1:2::a6",
        "2001:db8:1:2::a7",
        "2001:db8:1:2::a8",
        "2001:db8:1:2::a9",
        "2001:db8:1:2:1::a0",
        "2001:db8:1:2:1::a1",
        "2001:db8:1:2:1::a2",
        "2001:db8:1:2:1::a3",
        "2001:db8:1:2:1::a4",
        "2001:db8:1:2:ffff::a5",
        "2001:db8:1:2:ffff::a6",
        "2001:db8:1:2:ffff::a7",
        "2001:db8:1:2:ffff::a8",
        "2001:db8:1:2:ffff::a9",
    ];
    const SERVER: &str = "2001:db8:1:2::1";
    // Another network: never rate-limited along with the clients.
    const BARRIER: &str = "2001:db8:9:9::1";
    let mut addrs = vec![SERVER, BARRIER];
    addrs.extend(CLIENTS);
    let answered = |prefix: &'static str| {
        let d = Daemon::start(&[
            "-l",
            "udp:[2001:db8:1:2::1]:0",
            "-l",
            "[2001:db8:1:2::1]:0",
            "--udp-rate",
            "5",
            "--ipv6-prefix",
            prefix,
        ]);
        let to = udp_addr(&d);
        let socks: Vec<UdpSocket> = CLIENTS.iter().map(|ip| client(ip, to)).collect();
        for s in &socks {
            for _ in 0..10 {
                s.send(b"one of many").unwrap();
            }
        }
        barrier_from(BARRIER, to);
        socks
            .iter()
            .map(|s| {
                s.set_nonblocking(true).unwrap();
                std::iter::from_fn(|| s.recv(&mut [0u8; 64]).ok()).count()
            })
            .sum::<usize>()
    };
    let Some((by_64, by_128)) = in_netns(&addrs, move || (answered("64"), answered("128"))) else {
        return;
    };
    // 200 sent, 5 a second per source: one source gets at most two
    // windows' worth in a burst this short; twenty get at least one each.
    // Two of the twenty share one of the 8,192 rate buckets (seeded
    // afresh each start) about one start in 43, and then get five between
    // them: a few such shares are allowed for, still far above the ten of
    // one network.
    assert!(
        (1..=10).contains(&by_64),
        "{by_64} answered to one /64 at 5/s"
    );
    assert!(by_128 >= 80, "{by_128} answered to 20 sources at 5/s each");
}

/// Another echo service on a high port, 2 ms away, and one datagram that
/// starts the two answering each other (as a forged one would): the
/// loop is broken after at most a hundred bounces, though every bounce
/// is within the per-source rate, and counted as such.
#[test]
fn an_echo_loop_with_another_service_is_broken() {
    let d = udp_daemon("prefork", &["-l", "udp:127.0.0.1:0"]);
    let to = udp_addr(&d);
    // The other service: echoes whatever comes, 2 ms later.
    let reflector = client("127.0.0.1", to);
    reflector
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    reflector.send(b"a loop, started by one datagram").unwrap();
    let mut bounces = 0;
    let mut buf = [0u8; 64];
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let Ok(n) = reflector.recv(&mut buf) else {
            break; // the loop is over
        };
        bounces += 1;
        std::thread::sleep(Duration::from_millis(2));
        reflector.send(&buf[..n]).unwrap();
    }
    assert!(
        bounces <= 101,
        "{bounces} bounces in 3 s: the loop was not broken"
    );
    let line = status(&d, 1);
    assert!(line.contains("loop 1"), "{line}");
}
