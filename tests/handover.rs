//! Nothing drops a client: long conversations and a connect loop across a
//! reload, an upgrade, a smaller pool and a worker's recycling, in every
//! model. A retiring worker hands each open connection to a worker that
//! serves on; none is cut, refused or reset, however long it has been open.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// How a long conversation went.
#[derive(Default)]
struct Long {
    /// Round trips that came back whole.
    pings: AtomicUsize,
    /// Conversations that ended with every byte back (after the test's
    /// half-close), and those the server ended early or reset, or that
    /// were refused or stalled.
    whole: AtomicUsize,
    cut: AtomicUsize,
    reset: AtomicUsize,
    refused: AtomicUsize,
    stalled: AtomicUsize,
}

/// Clients that each hold one connection and ping on it every 50 ms,
/// checking every byte, until `stop`; then half-close and read the end.
fn long_conversations(
    addr: std::net::SocketAddr,
    n: usize,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Long>,
) -> Vec<std::thread::JoinHandle<()>> {
    use std::io::ErrorKind;
    (0..n)
        .map(|k| {
            let (stop, t) = (Arc::clone(stop), Arc::clone(tally));
            std::thread::spawn(move || {
                let mut s = match TcpStream::connect_timeout(&addr, DEADLINE) {
                    Ok(s) => s,
                    Err(_) => {
                        t.refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let fail = |e: std::io::Error| match e.kind() {
                    ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => &t.reset,
                    ErrorKind::UnexpectedEof => &t.cut,
                    _ => &t.stalled,
                };
                let mut seq = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let msg = [(k as u64).to_be_bytes(), seq.to_be_bytes()].concat();
                    if let Err(e) = round_trip(&mut s, &msg).and_then(|back| {
                        if back == msg {
                            Ok(())
                        } else {
                            Err(std::io::Error::other("wrong bytes"))
                        }
                    }) {
                        fail(e).fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    t.pings.fetch_add(1, Ordering::SeqCst);
                    seq += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut rest = Vec::new();
                match s.read_to_end(&mut rest) {
                    Ok(_) if rest.is_empty() => t.whole.fetch_add(1, Ordering::SeqCst),
                    Ok(_) => t.cut.fetch_add(1, Ordering::SeqCst),
                    Err(e) => fail(e).fetch_add(1, Ordering::SeqCst),
                };
            })
        })
        .collect()
}

/// Runs 20 long conversations and a connect loop against a daemon
/// started with `args`; once every conversation is under way, `event`
/// happens (a signal sent, say) and `done` (a log line) is waited for;
/// the load goes on for 5 s in all. Then nothing may have been cut,
/// refused or reset, in either kind of client.
fn across(args: &[&str], event: impl FnOnce(&Daemon), done: &str) {
    let _heavy = heavy();
    let d = Daemon::start(args);
    let addr = d.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let long = Arc::new(Long::default());
    let talkers = long_conversations(addr, 20, &stop, &long);
    assert!(
        wait_until(DEADLINE, || long.pings.load(Ordering::SeqCst) >= 20),
        "the conversations did not get going:\n{}",
        d.stderr_text()
    );
    let short = Arc::new(Tally::default());
    let loopers = clients(addr, 2, &stop, &short);
    let started = Instant::now();
    event(&d);
    let line = d.wait_line(done, DEADLINE);
    assert!(line.is_some(), "no '{done}':\n{}", d.stderr_text());
    let pings = long.pings.load(Ordering::SeqCst);
    while started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    for t in talkers.into_iter().chain(loopers) {
        let _ = t.join();
    }
    let l = |c: &AtomicUsize| c.load(Ordering::SeqCst);
    let long_out = format!(
        "long: whole {}, cut {}, reset {}, refused {}, stalled {}; connect loop: {:?}",
        l(&long.whole),
        l(&long.cut),
        l(&long.reset),
        l(&long.refused),
        l(&long.stalled),
        short.counts()
    );
    assert_eq!(l(&long.whole), 20, "{long_out}\n{}", d.stderr_text());
    assert!(
        l(&long.pings) > pings + 20,
        "the conversations stopped moving after the event: {long_out}"
    );
    assert_eq!(
        short.get(Outcome::Echoed),
        short.total(),
        "{long_out}\n{}",
        d.stderr_text()
    );
    assert!(short.total() > 0, "the connect loop made no connection");
}

/// Two workers (or, in fork mode, the master alone) that give a retiring
/// worker 2 s to hand its conversations over.
fn two_workers(mode: &str) -> [&str; 8] {
    [
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "2",
        "--shutdown-timeout",
        "2",
    ]
}

fn hup(mode: &str) {
    across(
        &two_workers(mode),
        |d| d.signal(Signal::SIGHUP),
        "reloaded:",
    );
}

in_every_mode!(no_conversation_is_cut_by_a_reload: hup);

fn usr2(mode: &str) {
    across(
        &two_workers(mode),
        |d| d.signal(Signal::SIGUSR2),
        "upgraded: generation",
    );
}

in_every_mode!(no_conversation_is_cut_by_an_upgrade: usr2);

/// A pool at its ceiling with every worker in a conversation: TTOU
/// retires a busy one, whose conversation goes to the worker started in
/// its place.
#[test]
fn no_conversation_is_cut_by_a_smaller_prefork_pool() {
    across(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "22",
            "--max-workers",
            "24",
            "--min-spare",
            "0",
            "--shutdown-timeout",
            "2",
        ],
        |d| {
            // One at a time: signals sent together merge into one.
            for floor in [21, 20, 19] {
                d.signal(Signal::SIGTTOU);
                let line = format!("pool's floor is now {floor}");
                assert!(d.wait_line(&line, DEADLINE).is_some(), "no '{line}'");
            }
        },
        "pool's floor is now 19",
    );
}

/// The open connections of each worker, from the USR1 line that names
/// them (`PID busy (generation G, open N, served S)`).
fn open_per_worker(d: &Daemon, n: usize) -> Vec<u64> {
    d.signal(Signal::SIGUSR1);
    let Some(lines) = d.wait_lines("workers: ", n, DEADLINE) else {
        return Vec::new();
    };
    lines[n - 1]
        .split("open ")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect()
}

/// Two event workers that both hold conversations: TTOU retires one,
/// which hands its conversations to the other.
#[test]
fn no_conversation_is_cut_by_fewer_event_workers() {
    across(
        &[
            "-l",
            "127.0.0.1:0",
            "-m",
            "event",
            "-w",
            "2",
            "--shutdown-timeout",
            "2",
        ],
        |d| {
            // Whichever retires must hold some: both do, or this proves
            // nothing (a new connection wakes one waiting worker).
            let mut asked = 0;
            let both = wait_until(DEADLINE, || {
                asked += 1;
                let open = open_per_worker(d, asked);
                open.len() == 2 && open.iter().all(|&n| n > 0)
            });
            assert!(both, "the conversations all went to one worker");
            d.signal(Signal::SIGTTOU);
        },
        "pool's floor is now 1",
    );
}

/// An event worker that has accepted its `--max-requests` hands its open
/// conversations to its replacement instead of waiting for them to end.
#[test]
fn no_conversation_is_cut_when_an_event_worker_recycles() {
    across(
        &[
            "-l",
            "127.0.0.1:0",
            "-m",
            "event",
            "-w",
            "2",
            "--max-requests",
            "15",
            "--shutdown-timeout",
            "2",
        ],
        |_| {},
        "exited",
    );
}

/// A prefork worker recycles after a connection ends, with nothing to
/// hand over; the conversations held meanwhile go on.
#[test]
fn no_conversation_is_cut_when_prefork_workers_recycle() {
    across(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--max-requests",
            "5",
            "--shutdown-timeout",
            "2",
        ],
        |_| {},
        "exited",
    );
}

/// Behind a proxy, a conversation keeps its client across a reload: the
/// address the PROXY header gave (in the log at its end) and its place in
/// `--max-per-ip` (a second connection from that client is still
/// refused, and once the first ends, a new one is served).
fn proxied_client_travels(mode: &str) {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "2",
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1/32",
        "--max-per-ip",
        "1",
        "--log-level",
        "debug",
    ]);
    let addr = d.addr();
    let from = |port: u16| {
        let mut s = connect(addr);
        let header = format!("PROXY TCP4 10.1.1.1 127.0.0.1 {port} 7\r\n");
        s.write_all(header.as_bytes()).unwrap();
        s
    };
    let mut first = from(4001);
    assert_eq!(round_trip(&mut first, b"before").unwrap(), b"before");
    d.signal(Signal::SIGHUP);
    assert!(d.wait_line("reloaded:", DEADLINE).is_some());
    // The old workers are gone: the conversation is with a new one.
    assert!(
        wait_until(DEADLINE, || d.stderr_text().matches(" exited").count() >= 2
            || mode == "fork"),
        "the old workers did not retire:\n{}",
        d.stderr_text()
    );
    let after = round_trip(&mut first, b"after");
    assert_eq!(
        after.as_deref().ok(),
        Some(&b"after"[..]),
        "{mode}: {after:?}\n{}",
        d.stderr_text()
    );
    let mut second = from(4002);
    let _ = second.write_all(b"me too");
    let mut buf = [0u8; 8];
    assert!(
        matches!(second.read(&mut buf), Ok(0) | Err(_)),
        "{mode}: the place of the first was lost in the hand-over"
    );
    drop(first);
    assert!(
        d.wait_line("connection from 10.1.1.1:4001", DEADLINE)
            .is_some(),
        "{mode}: the client's address did not travel:\n{}",
        d.stderr_text()
    );
    let served = wait_until(DEADLINE, || {
        let mut s = from(4003);
        round_trip(&mut s, b"next").is_ok_and(|b| b == b"next")
    });
    assert!(served, "{mode}: the first's place was never given back");
}

in_every_mode!(a_proxied_client_keeps_its_address_and_place: proxied_client_travels);

/// A client that sent all it had and half-closed while its worker could
/// not write back (the client reads only later) is handed over with its
/// half-close: every byte comes back, in order, then the end.
fn half_closed_client_travels(mode: &str) {
    use std::os::fd::AsFd;
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "1",
        "--log-level",
        "debug",
    ]);
    let mut s = connect(d.addr());
    // A small window towards the client: the worker cannot write back
    // more than this, so it still holds the client's bytes at the reload
    // even when a stall below was only the kernel's window probe waiting
    // (after which a large buffer would take everything and let the
    // worker finish before the reload: it happened once in six runs).
    nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &16_384).unwrap();
    s.set_nonblocking(true).unwrap();
    let mut rng = Stream::new(25);
    let mut chunk = vec![0u8; 1 << 16];
    let (mut sent, mut at) = (0usize, chunk.len());
    // Send until nothing moves for a while: every buffer on the way is
    // full and the worker is stuck writing to a client that does not read.
    loop {
        if at == chunk.len() {
            rng.fill(&mut chunk);
            at = 0;
        }
        match s.write(&chunk[at..]) {
            Ok(n) => {
                at += n;
                sent += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut fds = [nix::poll::PollFd::new(
                    s.as_fd(),
                    nix::poll::PollFlags::POLLOUT,
                )];
                if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(300u16)) == Ok(0) {
                    break;
                }
            }
            Err(e) => panic!("{mode}: sending: {e}"),
        }
    }
    // What was sent of the last chunk is what counts.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(
        d.wait_line("reloaded:", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut back = Vec::with_capacity(sent);
    let read = s.read_to_end(&mut back);
    assert!(
        read.is_ok(),
        "{mode}: {read:?} after {} of {sent} bytes",
        back.len()
    );
    let mut want = vec![0u8; sent];
    let mut again = Stream::new(25);
    again.fill(&mut want);
    assert_eq!(back.len(), sent, "{mode}: bytes lost or added");
    assert!(back == want, "{mode}: the bytes came back changed");
    assert!(
        d.wait_line("ended by a hand-over", DEADLINE).is_some(),
        "{mode}: the connection was not handed over, so this proved nothing:\n{}",
        d.stderr_text()
    );
}

#[test]
fn a_half_closed_prefork_client_gets_every_byte_across_a_reload() {
    half_closed_client_travels("prefork");
}

#[test]
fn a_half_closed_event_client_gets_every_byte_across_a_reload() {
    half_closed_client_travels("event");
}

/// An event worker takes a handed-over connection only with a descriptor
/// free for it: the kernel would close one that did not fit (its sender
/// has let go of it). Here the daemon's hard descriptor limit is 64: two
/// workers hold 60 conversations between them, and TTOU retires one,
/// whose conversations go to the other, which has room for fewer (64,
/// less its own descriptors and a few spare). Those it has no descriptor
/// for wait in the relay, not cut; as conversations end and free
/// descriptors, it takes them, and every one goes on to its end.
#[test]
fn a_receiver_out_of_descriptors_leaves_connections_waiting_rather_than_lost() {
    use std::os::unix::process::CommandExt;
    let _heavy = heavy();
    let d = Daemon::spawn_with(
        &[
            "-l",
            "127.0.0.1:0",
            "-m",
            "event",
            "-w",
            "2",
            "--worker-connections",
            "100",
            "--shutdown-timeout",
            "30",
        ],
        |c| {
            // SAFETY: setrlimit is async-signal-safe.
            unsafe {
                c.pre_exec(|| {
                    let lim = libc::rlimit {
                        rlim_cur: 64,
                        rlim_max: 64,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    );
    assert!(
        d.wait_line("ready", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    let addr = d.addr();
    let mut talks: Vec<(TcpStream, u8)> = (0..60u8)
        .map(|k| {
            let mut s = connect(addr);
            assert_eq!(round_trip(&mut s, &[k; 8]).unwrap(), [k; 8]);
            (s, k)
        })
        .collect();
    d.signal(Signal::SIGTTOU);
    assert!(
        d.wait_line("exited", DEADLINE).is_some(),
        "the retiring worker did not hand its conversations over:\n{}",
        d.stderr_text()
    );
    // Each sends now; those the remaining worker has taken answer.
    for (s, k) in &mut talks {
        s.write_all(&[*k; 8]).unwrap();
    }
    // Every answer that comes, comes within this (the worker serves each
    // at once); after it, a conversation waits.
    let by = Instant::now() + Duration::from_millis(500);
    let answered = |s: &mut TcpStream| {
        let left = by.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut back = [0u8; 8];
        s.read_exact(&mut back).map(|()| back)
    };
    let (mut served, mut waiting) = (Vec::new(), Vec::new());
    for (mut s, k) in talks.drain(..) {
        match answered(&mut s) {
            Ok(back) => {
                assert_eq!(back, [k; 8], "conversation {k}");
                served.push(s);
            }
            Err(_) => waiting.push((s, k)),
        }
    }
    // Else this proved nothing: the worker had room for all.
    assert!(
        !waiting.is_empty(),
        "no conversation waited for a descriptor:\n{}",
        d.stderr_text()
    );
    // Ending those served frees descriptors.
    for mut s in served {
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    // The others come out of the relay as room is freed, every byte kept.
    for (s, k) in &mut waiting {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut back = [0u8; 8];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("conversation {k} never served: {e}\n{}", d.stderr_text()));
        assert_eq!(back, [*k; 8]);
        assert_eq!(round_trip(s, &[*k; 4]).unwrap(), [*k; 4]);
    }
    let log = d.stderr_text();
    assert!(
        !log.contains("cannot take") && !log.contains("closed"),
        "{log}"
    );
}
