//! The process models: pool size, recycling, the fork-mode limit.

use super::*;

#[test]
fn prefork_starts_exactly_the_configured_workers() {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "3", "--min-spare", "0"]);
    let kids = d.wait_children(3);
    assert!(!kids.contains(&d.pid));
    // And the count stays put under traffic.
    for _ in 0..20 {
        assert_eq!(echo_all(d.addr(), b"x"), b"x");
    }
    assert_eq!(d.children().len(), 3);
}

#[test]
fn fork_master_reaps_while_clients_keep_coming() {
    // 12 clients reconnecting back to back keep the backlog from ever
    // emptying. Exited children must still be reaped as they go, not
    // pile up as zombies until max-children (far above 12) is reached.
    let _heavy = heavy();
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", "fork", "--max-children", "40"]);
    let addr = d.addr();
    let clients: Vec<_> = (0..12u32)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..250u32 {
                    let msg = (t << 16 | i).to_le_bytes();
                    assert_eq!(echo_all(addr, &msg), msg);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status: ", DEADLINE).unwrap();
    assert!(status.contains("connections 3000,"), "{status}");
    assert!(status.contains("limit reached 0 times"), "{status}");
}

#[test]
fn max_requests_recycles_a_worker() {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-w",
        "1",
        "--min-spare",
        "0",
        "--max-requests",
        "5",
    ]);
    let first = d.wait_children(1)[0];
    for _ in 0..4 {
        assert_eq!(echo_all(d.addr(), b"ping"), b"ping");
    }
    // echo_all waited for the server's EOF, so the worker has finished
    // each connection; four are not enough to retire it.
    assert_eq!(d.children(), vec![first]);
    assert_eq!(echo_all(d.addr(), b"ping"), b"ping");
    assert!(
        wait_until(
            DEADLINE,
            || matches!(d.children().as_slice(), [p] if *p != first)
        ),
        "worker {first} was not replaced after 5 connections: {:?}",
        d.children()
    );
    assert_eq!(echo_all(d.addr(), b"again"), b"again");
}

#[test]
fn fork_mode_limit_queues_clients_instead_of_refusing_them() {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", "fork", "--max-children", "8"]);
    let addr = d.addr();
    let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(addr)).collect();
    for c in &mut clients {
        c.write_all(b"hi").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    }
    // Served clients stay connected (so their children stay busy) until
    // no further client gets served; then they are released together.
    let mut served = [false; 20];
    let mut open: Vec<usize> = Vec::new();
    let (mut most_children, mut most_open) = (0, 0);
    let mut idle_passes = 0;
    let end = Instant::now() + DEADLINE;
    while served.iter().any(|s| !s) && Instant::now() < end {
        let mut progress = false;
        for i in 0..20 {
            // Zombies count too: the master may not fork past 8 unreaped children.
            most_children = most_children.max(d.all_children().len());
            if served[i] {
                continue;
            }
            let mut buf = [0u8; 2];
            match clients[i].read_exact(&mut buf) {
                Ok(()) => {
                    assert_eq!(&buf, b"hi");
                    served[i] = true;
                    open.push(i);
                    progress = true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("client {i} was refused or reset: {e}"),
            }
        }
        most_open = most_open.max(open.len());
        idle_passes = if progress { 0 } else { idle_passes + 1 };
        if idle_passes >= 3 {
            for i in open.drain(..) {
                clients[i].shutdown(Shutdown::Both).unwrap();
            }
        }
    }
    assert_eq!(served.iter().filter(|s| **s).count(), 20, "all 20 served");
    assert!(
        most_open <= 8,
        "{most_open} clients served at once with --max-children 8"
    );
    assert!(
        most_children <= 8,
        "saw {most_children} children with --max-children 8"
    );
    assert_eq!(
        most_open, 8,
        "the limit was never reached: the test proves nothing"
    );
}

#[test]
fn fork_mode_at_its_limit_says_so_and_counts_it() {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", "fork", "--max-children", "4"]);
    let addr = d.addr();
    let mut held: Vec<TcpStream> = (0..4).map(|_| connect(addr)).collect();
    for s in &mut held {
        assert_eq!(round_trip(s, b"in").unwrap(), b"in");
    }
    // Three more wait in the backlog.
    let waiting: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    let line = d.wait_line("max-children (4) reached", DEADLINE);
    assert!(
        line.is_some(),
        "no warning at the limit:\n{}",
        d.stderr_text()
    );
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status: ", DEADLINE).unwrap();
    assert!(
        status.contains("limit reached 1 time,"),
        "{status}\n{}",
        d.stderr_text()
    );
    // And again every 10 s while clients wait, with how many.
    let again = d.wait_line("3 clients wait in the backlog", Duration::from_secs(13));
    assert!(
        again.is_some(),
        "not repeated while clients wait:\n{}",
        d.stderr_text()
    );
    drop(held);
    for mut s in waiting {
        assert_eq!(round_trip(&mut s, b"later").unwrap(), b"later");
    }
}

#[test]
fn no_listener_starves_another() {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-l",
        "127.0.0.1:0",
        "-w",
        "1",
        "--min-spare",
        "0",
    ]);
    let addrs: Vec<std::net::SocketAddr> =
        d.listening().iter().map(|a| a.parse().unwrap()).collect();
    let busy = addrs[0];
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(echo_all(busy, b"a"), b"a");
                n += 1;
            }
            n
        })
    };
    for _ in 0..20 {
        assert_eq!(echo_all(addrs[1], b"b"), b"b");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(hammer.join().unwrap() > 0);
}

#[test]
fn a_pool_under_load_on_one_listener_still_serves_the_other() {
    let _heavy = heavy();
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-l", "127.0.0.1:0", "-w", "8"]);
    let addrs: Vec<std::net::SocketAddr> =
        d.listening().iter().map(|a| a.parse().unwrap()).collect();
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let loud = std::sync::Arc::new(AtomicU32::new(0));
    let hammers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, loud, busy) = (stop.clone(), loud.clone(), addrs[0]);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert_eq!(echo_all(busy, b"a"), b"a");
                    loud.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The quiet listener's clients come while the busy one is loaded:
    // at least 200 of them, and on until the busy one served 1,000.
    let start = Instant::now();
    let mut quiet = 0;
    while quiet < 200 || loud.load(Ordering::Relaxed) < 1000 {
        assert!(
            start.elapsed() < DEADLINE,
            "the busy listener barely served"
        );
        let mut s = connect(addrs[1]);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(
            round_trip(&mut s, b"b").unwrap(),
            b"b",
            "the quiet listener starved"
        );
        quiet += 1;
    }
    stop.store(true, Ordering::Relaxed);
    hammers.into_iter().for_each(|h| h.join().unwrap());
    println!(
        "{quiet} on the quiet listener in {:?} while {} went to the busy one",
        start.elapsed(),
        loud.load(Ordering::Relaxed)
    );
}

/// Voluntary context switches per connection among `n` idle workers of
/// a daemon started with `args`, over 200 short connections: about one
/// when a connection wakes one worker, about `n` for the herd.
fn switches_per_connection(args: &[&str], n: usize) -> f64 {
    let d = Daemon::start(args);
    let addr = d.addr();
    let workers = d.wait_children(n);
    let total = || workers.iter().map(|&p| voluntary_switches(p)).sum::<u64>();
    assert_eq!(echo_all(addr, b"warm"), b"warm");
    let before = total();
    for i in 0..200u32 {
        assert_eq!(echo_all(addr, &i.to_be_bytes()), i.to_be_bytes());
    }
    let per = (total() - before) as f64 / 200.0;
    println!("{per:.2} voluntary context switches per connection among {n} idle workers");
    per
}

#[test]
fn a_connection_wakes_one_idle_worker_not_all_of_them() {
    let _heavy = heavy();
    let args = ["-l", "127.0.0.1:0", "-w", "32", "--min-spare", "0"];
    let per = switches_per_connection(&args, 32);
    assert!(
        per < 6.0,
        "{per:.2} switches per connection: the herd is back"
    );
}

/// The same for event workers, on either engine (on io_uring the
/// listeners' polls are exclusive, as their epoll registrations are).
#[test]
fn a_connection_wakes_one_idle_event_worker_not_all_of_them() {
    let _heavy = heavy();
    let args = ["-l", "127.0.0.1:0", "-m", "event", "-w", "16"];
    let per = switches_per_connection(&args, 16);
    assert!(
        per < 6.0,
        "{per:.2} switches per connection: the herd is back"
    );
}

#[test]
fn an_event_worker_at_its_cap_lets_the_next_client_wait_not_fail() {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        "event",
        "-w",
        "1",
        "--worker-connections",
        "2",
    ]);
    let addr = d.addr();
    let mut first = connect(addr);
    let mut second = connect(addr);
    assert_eq!(round_trip(&mut first, b"1").unwrap(), b"1");
    assert_eq!(round_trip(&mut second, b"2").unwrap(), b"2");
    // The third is queued by the kernel: neither served nor refused.
    let mut third = connect(addr);
    third.write_all(b"3").unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 1];
    match third.read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the third client was answered at the cap: {other:?}"),
    }
    // A place comes free: it is served, its byte intact.
    drop(first);
    third.set_read_timeout(Some(DEADLINE)).unwrap();
    third.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"3");
    assert_eq!(round_trip(&mut second, b"still").unwrap(), b"still");
}

/// Fills every event worker to its cap with silent clients, lets a
/// server-side limit (`limit`: `--idle-timeout` or `--max-session`, 1 s)
/// close them all, closes them on the client side too, then checks that
/// the next client is served: the room the deadlines freed must bring the
/// listeners back, though nothing else happens to wake the loop.
fn serves_again_once_deadlines_free_the_cap(workers: u32, cap: u32, limit: &str) {
    let (w, c) = (workers.to_string(), cap.to_string());
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        "event",
        "-w",
        &w,
        "--worker-connections",
        &c,
        limit,
        "1",
    ]);
    let addr = d.addr();
    let mut held: Vec<TcpStream> = (0..workers * cap).map(|_| connect(addr)).collect();
    // Every one of them is served (so each worker is at its cap) ...
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("{i}");
        assert_eq!(round_trip(s, msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    // ... then goes quiet until the server ends it.
    for s in &mut held {
        let mut buf = [0u8; 1];
        assert!(
            matches!(s.read(&mut buf), Ok(0)),
            "{limit} did not close a held connection"
        );
    }
    drop(held);
    let mut next = connect(addr);
    assert_eq!(
        round_trip(&mut next, b"next").ok().as_deref(),
        Some(&b"next"[..]),
        "the worker never accepted again after {limit} freed its cap of {cap}"
    );
}

#[test]
fn an_event_worker_at_its_cap_accepts_again_after_idle_timeouts() {
    for cap in [1, 2, 3] {
        serves_again_once_deadlines_free_the_cap(1, cap, "--idle-timeout");
    }
}

#[test]
fn an_event_worker_at_its_cap_accepts_again_after_max_session() {
    for cap in [2, 8] {
        serves_again_once_deadlines_free_the_cap(1, cap, "--max-session");
    }
}

#[test]
fn event_workers_at_their_caps_accept_again_after_a_quiet_slowloris() {
    serves_again_once_deadlines_free_the_cap(2, 10, "--max-session");
}

/// Private memory (Private_Clean + Private_Dirty) of a process, in KiB.
fn private_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

#[test]
fn five_thousand_idle_connections_cost_two_event_workers_little() {
    let _heavy = heavy();
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < 6000 {
        skipped(format_args!(
            "RLIMIT_NOFILE's hard limit ({hard}) is below 6000"
        ));
        return;
    }
    if soft < 6000 {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(20_000), hard).unwrap();
    }
    const N: usize = 5000;
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        "event",
        "-w",
        "2",
        "--worker-connections",
        "4096",
    ]);
    let addr = d.addr();
    let workers = d.wait_children(2);
    let fds = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let before: usize = workers.iter().map(|&w| fds(w)).sum();
    let mut conns: Vec<TcpStream> = (0..N).map(|_| connect(addr)).collect();
    // Every connection accepted and held: one descriptor each.
    let held = || workers.iter().map(|&w| fds(w)).sum::<usize>() >= before + N;
    assert!(wait_until(DEADLINE, held), "not all {N} accepted");
    let private: u64 = workers.iter().map(|&w| private_kib(w)).sum();
    println!("{N} idle connections: the 2 event workers hold {private} KiB private");
    // The bound: per worker, the read buffer it touched (64 KiB) and its
    // code and data pages (about 64 KiB); per connection half a KiB, for
    // its state (about 100 bytes: the socket, two instants, counters, no
    // buffer while nothing is unsent), its slab entry, its deadline and
    // the allocator's slack. Measured: about 220 bytes per connection.
    let bound = 2 * 128 + N as u64 / 2;
    assert!(
        private <= bound,
        "{private} KiB private for {N} idle connections (bound {bound})"
    );
    for (i, s) in conns.iter_mut().enumerate() {
        let msg = (i as u32).to_be_bytes();
        assert_eq!(round_trip(s, &msg).unwrap(), msg, "connection {i}");
    }
}

/// A fork-mode child is forked lean (no per-child signal reset, its
/// descriptors closed by range): what that could quietly drop is pinned
/// here. It holds its own connection, the control pipe and stdio, and
/// neither a listener nor another child's connection; the signals a child
/// ignores (INT, TERM, USR2, and CHLD by default) leave it serving, and
/// the others act as their defaults (HUP ends it), in the child only.
#[test]
fn fork_child_holds_only_its_connection_and_keeps_a_childs_dispositions() {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", "fork"]);
    let addr = d.addr();
    let mut a = connect(addr);
    let mut b = connect(addr);
    assert_eq!(round_trip(&mut a, b"a").unwrap(), b"a");
    assert_eq!(round_trip(&mut b, b"b").unwrap(), b"b");
    let kids = d.wait_children(2);
    let fds = |pid: i32| -> Vec<(i32, String)> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let n: i32 = e.file_name().to_str()?.parse().ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some((n, target.to_string_lossy().into_owned()))
            })
            .filter(|(n, _)| *n > 2)
            .collect()
    };
    let sockets = |pid: i32| -> Vec<String> {
        fds(pid)
            .into_iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with("socket:"))
            .collect()
    };
    let master_sockets = sockets(d.pid);
    let mut seen = Vec::new();
    for &kid in &kids {
        let held = fds(kid);
        assert_eq!(held.len(), 2, "child {kid} holds {held:?}");
        let socks = sockets(kid);
        assert_eq!(socks.len(), 1, "child {kid} holds {held:?}");
        assert!(
            !master_sockets.contains(&socks[0]),
            "child {kid} holds a listener"
        );
        assert!(
            !seen.contains(&socks[0]),
            "child {kid} holds another's connection"
        );
        seen.push(socks[0].clone());
    }
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        for &kid in &kids {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(kid), sig).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(round_trip(&mut a, b"x").unwrap(), b"x", "after {sig}");
        assert_eq!(round_trip(&mut b, b"y").unwrap(), b"y", "after {sig}");
    }
    for &kid in &kids {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(kid), Signal::SIGHUP).unwrap();
    }
    assert!(
        wait_until(DEADLINE, || d.all_children().is_empty()),
        "SIGHUP left children: {:?}",
        d.all_children()
    );
    // The master handled none of it: it serves on.
    assert_eq!(echo_all(addr, b"still"), b"still");
    assert!(d.stderr_text().lines().all(|l| !l.contains("reload")));
}
