//! Integration tests: the real binary on loopback, driven through the
//! `Daemon` guard in util.rs.

mod docs;
mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use util::*;

/// Exact echo, whatever the data and its segmentation.
mod echo {
    use super::*;

    #[test]
    fn sixty_four_mib_concurrent_write_and_read() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"]);
        let total: usize = 64 << 20;
        let s = connect(d.addr());
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut gen = Stream::new(7);
            let mut buf = vec![0u8; 100_000];
            let mut left = total;
            while left > 0 {
                let n = left.min(buf.len());
                gen.fill(&mut buf[..n]);
                w.write_all(&buf[..n]).unwrap();
                left -= n;
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut r = s;
        let mut expect = Stream::new(7);
        let (mut got, mut want) = (vec![0u8; 65_536], vec![0u8; 65_536]);
        let mut seen = 0usize;
        loop {
            let n = r.read(&mut got).expect("read echo");
            if n == 0 {
                break;
            }
            expect.fill(&mut want[..n]);
            assert!(
                got[..n] == want[..n],
                "echo differs within bytes {seen}..{}",
                seen + n
            );
            seen += n;
        }
        writer.join().unwrap();
        assert_eq!(seen, total);
    }

    #[test]
    fn random_size_writes_come_back_as_the_same_stream() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"]);
        let mut gen = Stream::new(99);
        let mut sizes = [0u8; 2000];
        gen.fill(&mut sizes);
        let mut sent = Vec::new();
        let mut s = connect(d.addr());
        s.set_nodelay(true).unwrap();
        let mut r = s.try_clone().unwrap();
        let reader = std::thread::spawn(move || {
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            back
        });
        for pair in sizes.chunks(2) {
            // 1 to 65,536 bytes per write, skewed towards small ones.
            let size = 1 + ((pair[0] as usize) << (pair[1] % 9));
            let start = sent.len();
            sent.resize(start + size, 0);
            gen.fill(&mut sent[start..]);
            s.write_all(&sent[start..]).unwrap();
        }
        s.shutdown(Shutdown::Write).unwrap();
        let back = reader.join().unwrap();
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "the echoed stream differs from the sent one");
    }

    #[test]
    fn every_byte_value_and_half_close() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"]);
        let all: Vec<u8> = (0..=255u8).collect();
        // echo_all half-closes and reads to EOF: every byte, then EOF.
        assert_eq!(echo_all(d.addr(), &all), all);
        // After the half-close the server still writes what was in flight.
        let mut s = connect(d.addr());
        s.write_all(b"before").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(back, b"before");
    }

    fn many_clients(mode: &str) {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            mode,
            "-w",
            "8",
            "--min-spare",
            "0",
        ]);
        let addr = d.addr();
        let clients: Vec<_> = (0..200u64)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut data = vec![0u8; 1 << 20];
                    Stream::new(i + 1).fill(&mut data);
                    echo_all(addr, &data) == data
                })
            })
            .collect();
        let exact = clients
            .into_iter()
            .map(|c| c.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(exact, 200, "clients with an exact echo");
    }

    #[test]
    fn two_hundred_clients_prefork() {
        many_clients("prefork");
    }

    #[test]
    fn two_hundred_clients_fork() {
        many_clients("fork");
    }

    #[test]
    fn unix_socket_listener_echoes_and_its_file_is_removed_on_exit() {
        let dir = TempDir::new("unix");
        let path = dir.path("echo.sock");
        let arg = format!("unix:{}", path.display());
        let mut d = Daemon::start(&["-l", &arg, "-w", "1", "--min-spare", "0"]);
        assert_eq!(d.listening(), vec![arg.clone()]);
        assert_eq!(echo_unix(&path, b"over unix"), b"over unix");
        d.signal(Signal::SIGTERM);
        assert!(d.wait_exit(DEADLINE).is_some_and(|s| s.success()));
        assert!(!exists(&path), "socket file left behind");
    }

    #[test]
    fn ipv6_loopback() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            println!("skipped: IPv6 loopback is not available here");
            return;
        }
        let d = Daemon::start(&["-l", "[::1]:0", "-w", "1", "--min-spare", "0"]);
        let addr = d.addr();
        assert!(addr.is_ipv6());
        assert_eq!(echo_all(addr, b"six"), b"six");
    }
}

/// The process models: pool size, recycling, the fork-mode limit.
mod models {
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
            status.contains("limit reached 1 times"),
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
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hammers: Vec<_> = (0..4)
            .map(|_| {
                let (stop, busy) = (stop.clone(), addrs[0]);
                std::thread::spawn(move || {
                    let mut n = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        assert_eq!(echo_all(busy, b"a"), b"a");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let start = Instant::now();
        for _ in 0..200 {
            let mut s = connect(addrs[1]);
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            assert_eq!(
                round_trip(&mut s, b"b").unwrap(),
                b"b",
                "the quiet listener starved"
            );
        }
        let quiet = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let loud: u32 = hammers.into_iter().map(|h| h.join().unwrap()).sum();
        println!("200 on the quiet listener in {quiet:?} while {loud} went to the busy one");
        assert!(loud > 200, "the busy listener was not busy: {loud}");
    }

    /// Voluntary context switches of a process so far.
    fn voluntary_switches(pid: i32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn a_connection_wakes_one_idle_worker_not_all_of_them() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "32", "--min-spare", "0"]);
        let addr = d.addr();
        let workers = d.wait_children(32);
        let total = || workers.iter().map(|&p| voluntary_switches(p)).sum::<u64>();
        assert_eq!(echo_all(addr, b"warm"), b"warm");
        let before = total();
        for i in 0..200u32 {
            assert_eq!(echo_all(addr, &i.to_be_bytes()), i.to_be_bytes());
        }
        let per = (total() - before) as f64 / 200.0;
        println!("{per:.2} voluntary context switches per connection among 32 idle workers");
        // The herd: every idle worker woke for every connection (about 32).
        assert!(
            per < 6.0,
            "{per:.2} switches per connection: the herd is back"
        );
    }
}

/// Supervision: respawn, reaping, the master's death, descriptor hygiene.
mod supervision {
    use super::*;

    #[test]
    fn killed_worker_is_replaced_and_reaped() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"]);
        let before = d.wait_children(2);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(before[0]), Signal::SIGKILL).unwrap();
        assert!(
            wait_until(DEADLINE, || {
                let now = d.children();
                now.len() == 2 && !now.contains(&before[0]) && d.zombies().is_empty()
            }),
            "no replacement for {}: {:?}, zombies {:?}",
            before[0],
            d.children(),
            d.zombies()
        );
        assert!(d.wait_line("killed by signal SIGKILL", DEADLINE).is_some());
        assert_eq!(echo_all(d.addr(), b"still here"), b"still here");
    }

    fn master_kill_takes_children_along(mode: &str) {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            mode,
            "-w",
            "2",
            "--min-spare",
            "0",
        ]);
        // A busy child too, not only idle ones.
        let mut held = connect(d.addr());
        assert_eq!(round_trip(&mut held, b"busy").unwrap(), b"busy");
        let kids = d.children();
        assert!(!kids.is_empty());
        d.signal(Signal::SIGKILL);
        let gone = wait_until(Duration::from_secs(2), || kids.iter().all(|&p| is_dead(p)));
        assert!(
            gone,
            "children outlived the master: {:?}",
            kids.iter().filter(|&&p| !is_dead(p)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn master_sigkill_prefork() {
        master_kill_takes_children_along("prefork");
    }

    #[test]
    fn master_sigkill_fork() {
        master_kill_takes_children_along("fork");
    }

    fn fd_and_zombie_hygiene(mode: &str) {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            mode,
            "-w",
            "2",
            "--min-spare",
            "0",
        ]);
        let addr = d.addr();
        assert_eq!(echo_all(addr, b"warm"), b"warm");
        let before = d.fd_count();
        for i in 0..2000u32 {
            let msg = i.to_le_bytes();
            assert_eq!(echo_all(addr, &msg), msg);
        }
        let workers = if mode == "fork" { 0 } else { 2 };
        d.wait_children(workers);
        assert_eq!(d.fd_count(), before, "master fds changed");
    }

    #[test]
    fn descriptors_leaked_by_the_parent_reach_no_process() {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let raw = w.as_raw_fd();
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["-f", "-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"]);
        // SAFETY: dup2 is async-signal-safe; fd 7 becomes an inherited,
        // non-close-on-exec copy of the pipe's write end, as a careless
        // parent would leave it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(raw, 7) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let d = Daemon::from_command(cmd);
        drop(w);
        assert!(
            d.wait_line("ready", DEADLINE).is_some(),
            "{}",
            d.stderr_text()
        );
        d.wait_children(2);
        // If any process of the daemon held the write end, no EOF.
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&r),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).unwrap();
        let mut buf = [0u8; 1];
        assert!(
            n == 1 && matches!(nix::unistd::read(&r, &mut buf), Ok(0)),
            "a process of the daemon still holds the leaked descriptor"
        );
    }

    #[test]
    fn workers_hold_no_sibling_pipes() {
        // The first worker is forked before any sibling exists; a later one
        // holding a sibling's control pipe would have more descriptors (and
        // would keep that sibling from seeing EOF when it is retired).
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "6", "--min-spare", "0"]);
        let workers = d.wait_children(6);
        let fds = |pid: i32| {
            let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .filter_map(|e| {
                    let link = std::fs::read_link(e.ok()?.path()).ok()?;
                    Some(link.to_string_lossy().split(':').next()?.to_string())
                })
                .collect();
            v.sort();
            v
        };
        let counts: Vec<(i32, Vec<String>)> = workers.iter().map(|&w| (w, fds(w))).collect();
        let pipes = |v: &Vec<String>| v.iter().filter(|k| *k == "pipe").count();
        let least = counts.iter().map(|(_, v)| pipes(v)).min().unwrap();
        for (w, v) in &counts {
            assert_eq!(pipes(v), least, "worker {w} holds extra pipes: {v:?}");
        }
    }

    #[test]
    fn two_thousand_connections_prefork() {
        fd_and_zombie_hygiene("prefork");
    }

    #[test]
    fn two_thousand_connections_fork() {
        fd_and_zombie_hygiene("fork");
    }

    #[test]
    fn client_that_never_reads_is_dropped_after_idle_timeout() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::io::ErrorKind::{TimedOut, WouldBlock};
        use std::os::fd::AsFd;
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "1",
            "--min-spare",
            "0",
            "--idle-timeout",
            "1",
        ]);
        let mut s = connect(d.addr());
        s.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let chunk = vec![7u8; 65_536];
        let mut sent = 0;
        let mut dropped = false;
        let end = Instant::now() + DEADLINE;
        // Send 8 MiB and never read. Once both sides' buffers are full our
        // writes time out, until the server gives up and resets us.
        while sent < 8 << 20 && Instant::now() < end {
            match s.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => {}
                Err(_) => {
                    dropped = true;
                    break;
                }
            }
        }
        if !dropped {
            // Everything fit in buffers: the server's close shows as HUP/ERR.
            let mut fds = [PollFd::new(s.as_fd(), PollFlags::empty())];
            poll(&mut fds, PollTimeout::from(5000u16)).unwrap();
            dropped = fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
        }
        assert!(
            dropped,
            "the client that never reads was not disconnected ({sent} bytes sent)"
        );
        // The single worker is free again.
        assert_eq!(echo_all(d.addr(), b"next"), b"next");
    }

    #[test]
    fn resets_and_broken_pipes_end_only_their_connection() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"]);
        let workers = d.wait_children(2);
        for _ in 0..50 {
            let s = connect(d.addr());
            (&s).write_all(&[1u8; 100_000]).unwrap();
            // SO_LINGER 0: close sends RST while the server is echoing.
            nix::sys::socket::setsockopt(
                &s,
                nix::sys::socket::sockopt::Linger,
                &libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )
            .unwrap();
            drop(s);
        }
        assert_eq!(echo_all(d.addr(), b"alive"), b"alive");
        let mut now = d.children();
        now.sort();
        let mut was = workers.clone();
        was.sort();
        assert_eq!(now, was, "a worker died from a client's reset");
        assert!(!d.stderr_text().contains("killed by signal"));
    }
}

/// Stopping: graceful TERM/INT, immediate QUIT.
mod stopping {
    use super::*;

    #[test]
    fn term_refuses_new_clients_at_once_and_lets_open_ones_finish() {
        let mut d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--min-spare",
            "0",
            "--shutdown-timeout",
            "2",
        ]);
        let addr = d.addr();
        let mut open = connect(addr);
        assert_eq!(round_trip(&mut open, b"one").unwrap(), b"one");
        let kids = d.children();
        let t0 = Instant::now();
        d.signal(Signal::SIGTERM);
        let refused = wait_until(
            Duration::from_secs(1),
            || matches!(TcpStream::connect(addr), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        );
        assert!(refused, "new connections still accepted after TERM");
        // The open connection is still served during the grace period.
        assert_eq!(round_trip(&mut open, b"two").unwrap(), b"two");
        let st = d
            .wait_exit(Duration::from_secs(4))
            .expect("master still running 4 s after TERM");
        assert!(st.success(), "exit status {st:?}");
        assert!(t0.elapsed() < Duration::from_secs(3) + Duration::from_millis(900));
        assert!(kids.iter().all(|&p| is_dead(p)), "children left behind");
        assert!(d.wait_line("shutdown timeout", DEADLINE).is_some());
    }

    #[test]
    fn term_with_no_clients_exits_promptly() {
        let mut d = Daemon::start(&["-l", "127.0.0.1:0", "-m", "fork"]);
        assert_eq!(echo_all(d.addr(), b"x"), b"x");
        d.signal(Signal::SIGINT);
        let st = d.wait_exit(DEADLINE).expect("no exit after INT");
        assert!(st.success());
    }

    #[test]
    fn ctrl_c_to_the_process_group_is_a_graceful_stop() {
        let mut d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--min-spare",
            "0",
            "--shutdown-timeout",
            "5",
        ]);
        let mut open = connect(d.addr());
        assert_eq!(round_trip(&mut open, b"before").unwrap(), b"before");
        // What a terminal does on Ctrl-C: SIGINT to every process in the group.
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(d.pid), Signal::SIGINT).unwrap();
        assert!(d.wait_line("SIGINT: stopping", DEADLINE).is_some());
        // The busy worker survived the SIGINT and still serves its client.
        assert_eq!(round_trip(&mut open, b"after").unwrap(), b"after");
        drop(open);
        let st = d
            .wait_exit(DEADLINE)
            .expect("no exit after the client left");
        assert!(st.success());
        assert!(
            !d.stderr_text().contains("killed by signal"),
            "{}",
            d.stderr_text()
        );
    }

    #[test]
    fn quit_stops_at_once_even_with_open_clients() {
        let mut d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "1",
            "--min-spare",
            "0",
            "--shutdown-timeout",
            "60",
        ]);
        let mut open = connect(d.addr());
        assert_eq!(round_trip(&mut open, b"q").unwrap(), b"q");
        let kids = d.children();
        d.signal(Signal::SIGQUIT);
        let st = d
            .wait_exit(Duration::from_secs(3))
            .expect("QUIT did not stop it");
        assert!(st.success());
        assert!(kids.iter().all(|&p| is_dead(p)));
        let mut buf = [0u8; 1];
        assert!(matches!(open.read(&mut buf), Ok(0) | Err(_)));
    }
}

/// Logging to syslog over a unix datagram socket the test owns.
mod logging {
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
        let dir = TempDir::new("syslog");
        let path = dir.path("log");
        let sock = UnixDatagram::bind(&path).unwrap();
        let sp = path.to_str().unwrap();
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
            sp,
            "--syslog-facility",
            "local3",
            "--log-level",
            "debug",
        ]);
        let line = recv_until(&sock, |l| l.contains("listening on "))
            .expect("no listening line on syslog");
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
                round_trip(&mut s, &i.to_be_bytes()).unwrap_or_else(|e| panic!(
                    "connection {i} not served with stderr stalled: {e}"
                )),
                i.to_be_bytes()
            );
        }
        println!(
            "2000 connections with stderr stalled in {:?}",
            start.elapsed()
        );
        // The reader wakes up: the loss is reported once lines get through.
        go_on.send(()).unwrap();
        let mut s = connect(addr);
        assert_eq!(round_trip(&mut s, b"again").unwrap(), b"again");
        drop(s);
        let end = Instant::now() + DEADLINE;
        let mut reported = false;
        while let Ok(line) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            if line.contains("log lines were dropped") {
                reported = true;
                break;
            }
        }
        assert!(reported, "the dropped lines were never reported");
    }
}

/// The command line and the config file.
mod config {
    use super::*;

    #[test]
    fn check_accepts_a_good_file_and_rejects_a_bad_one() {
        let dir = TempDir::new("conf");
        let good = dir.path("good.toml");
        std::fs::write(
            &good,
            "listen = [\"127.0.0.1:7007\"]\nmode = \"fork\"\nmax-children = 64\n",
        )
        .unwrap();
        assert_eq!(launch(&["-t", "-c", good.to_str().unwrap()]).0, 0);
        let bad = dir.path("bad.toml");
        std::fs::write(&bad, "min-spare = 9\nmax-spare = 3\n").unwrap();
        let (code, err) = launch(&["-t", "-c", bad.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(
            err.contains("min-spare") && err.contains("max-spare"),
            "{err}"
        );
        assert_eq!(
            launch(&["-t", "-c", dir.path("absent.toml").to_str().unwrap()]).0,
            1
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let dir = TempDir::new("conf");
        let f = dir.path("typo.toml");
        std::fs::write(&f, "mode = \"prefork\"\nmax-wrokers = 5\n").unwrap();
        let (code, err) = launch(&["-t", "-c", f.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(
            err.contains("max-wrokers") && err.contains("line 2"),
            "{err}"
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        assert_eq!(launch(&["--no-such-flag"]).0, 2);
        assert_eq!(launch(&["-f", "-m", "threads"]).0, 2);
        assert_eq!(launch(&["-f", "--workers", "lots"]).0, 2);
        let help = launch_stdout(&["--help"]);
        assert_eq!(help.0, 0);
        assert!(help.1.contains("--max-children"), "{}", help.1);
    }

    #[test]
    fn a_bad_cidr_is_a_config_error_naming_it() {
        let good = launch_stdout(&["-t", "-l", "127.0.0.1:0", "--deny", "10.0.0.0/8"]);
        assert_eq!(good.0, 0, "{}", good.1);
        let (code, err) = launch(&["-t", "-l", "127.0.0.1:0", "--allow", "10.0.0.1/8"]);
        assert_eq!(code, 1);
        assert!(err.contains("10.0.0.1/8"), "{err}");
    }

    #[test]
    fn listen_from_the_file_is_overridden_by_the_flag() {
        let dir = TempDir::new("conf");
        let sock = dir.path("from-file.sock");
        let f = dir.path("c.toml");
        std::fs::write(
            &f,
            format!(
                "listen = [\"unix:{}\"]\nworkers = 1\nmin-spare = 0\n",
                sock.display()
            ),
        )
        .unwrap();
        let d = Daemon::start(&["-c", f.to_str().unwrap(), "-l", "127.0.0.1:0"]);
        let l = d.listening();
        assert_eq!(l.len(), 1, "{l:?}");
        assert!(l[0].starts_with("127.0.0.1:"), "{l:?}");
        assert!(!exists(&sock));
        // The file's other settings still apply.
        d.wait_children(1);
    }

    #[test]
    fn values_check_accepts_never_crash_the_daemon() {
        let dir = TempDir::new("ceiling");
        let f = dir.path("c.toml");
        // Accepted by -t before, then a panic of the master on HUP or TERM.
        std::fs::write(&f, "shutdown-timeout = 9223372036854775807\n").unwrap();
        let (code, err) = launch(&["-t", "-c", f.to_str().unwrap()]);
        assert_eq!(code, 1, "-t accepted shutdown-timeout = i64::MAX");
        assert!(
            err.contains("shutdown-timeout") && err.contains("30 days"),
            "{err}"
        );
        let (code, err) = launch(&["-t", "--max-session", "18446744073709551615"]);
        assert_eq!(code, 1);
        assert!(err.contains("max-session"), "{err}");
        // Every ceiling at once: served, reloaded and stopped cleanly.
        let top = "2592000";
        let mut d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--idle-timeout",
            top,
            "--max-session",
            top,
            "--shutdown-timeout",
            top,
            "--max-bytes",
            "9223372036854775807",
            "--max-children",
            "65536",
        ]);
        let addr = d.addr();
        assert_eq!(echo_all(addr, b"ceiling"), b"ceiling");
        d.signal(Signal::SIGHUP);
        assert!(
            d.wait_line("reloaded:", DEADLINE).is_some(),
            "{}",
            d.stderr_text()
        );
        assert_eq!(echo_all(addr, b"again"), b"again");
        d.signal(Signal::SIGTERM);
        let st = d.wait_exit(DEADLINE).expect("still running after TERM");
        assert_eq!(st.code(), Some(0), "{}", d.stderr_text());
        assert!(!d.stderr_text().contains("panicked"), "{}", d.stderr_text());
    }

    #[test]
    fn check_refuses_what_could_only_fail_later() {
        let dir = TempDir::new("conf-later");
        let long = format!("unix:{}/{}", dir.0.display(), "s".repeat(110));
        let fifo = dir.path("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let empty_list = dir.path("empty.toml");
        std::fs::write(&empty_list, "listen = []\n").unwrap();
        let empty_chroot = dir.path("chroot.toml");
        std::fs::write(&empty_chroot, "chroot = \"\"\n").unwrap();
        for (args, want) in [
            (vec!["-l", "*:7007", "-l", "[::]:7007"], "overlap"),
            (vec!["-l", &long], "bytes"),
            (
                vec!["--min-spare", "300", "--max-spare", "300"],
                "max-workers",
            ),
            (vec!["-c", fifo.to_str().unwrap()], "not a regular file"),
            (vec!["-c", "/dev/zero"], "not a regular file"),
            (vec!["-c", empty_list.to_str().unwrap()], "listen"),
            (vec!["-c", empty_chroot.to_str().unwrap()], "chroot"),
        ] {
            let mut all = vec!["-t"];
            all.extend(&args);
            // launch() fails the test if -t hangs (a FIFO with no writer).
            let (code, err) = launch(&all);
            assert_eq!(code, 1, "-t accepted {args:?}");
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn unix_sockets_get_the_socket_mode_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("sockmode");
        let open = dir.path("open.sock");
        let tight = dir.path("tight.sock");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // The packaged unit runs with UMask=0022; a socket must still let
        // other users connect unless the operator says otherwise.
        let spawn = |sock: &std::path::Path, extra: &[&str]| {
            let mut args = vec!["-l".to_string(), format!("unix:{}", sock.display())];
            args.extend(["-w", "1", "--min-spare", "0"].map(String::from));
            args.extend(extra.iter().map(|s| s.to_string()));
            let mut cmd = std::process::Command::new(BIN);
            cmd.arg("-f").args(&args);
            // SAFETY: umask is async-signal-safe and touches only the child.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    libc::umask(0o077);
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
        };
        let a = spawn(&open, &[]);
        assert_eq!(mode(&open), 0o666);
        assert_eq!(echo_unix(&open, b"open"), b"open");
        let b = spawn(&tight, &["--socket-mode", "0600"]);
        assert_eq!(mode(&tight), 0o600);
        drop((a, b));
    }

    #[test]
    fn a_live_unix_server_with_a_full_backlog_never_blocks_the_master() {
        use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
        use std::os::fd::AsRawFd;
        let dir = TempDir::new("fullbacklog");
        let path = dir.path("busy.sock");
        // Another server that listens but never accepts, its queue full.
        let server = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let ua = UnixAddr::new(&path).unwrap();
        socket::bind(server.as_raw_fd(), &ua).unwrap();
        socket::listen(&server, Backlog::new(0).unwrap()).unwrap();
        let mut queued = Vec::new();
        loop {
            let c = socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            if socket::connect(c.as_raw_fd(), &ua).is_err() {
                break;
            }
            queued.push(c);
            assert!(queued.len() < 1000, "the backlog never filled");
        }
        let unix = format!("unix:{}", path.display());
        // At startup: refused at once (launch fails the test if it hangs).
        let (code, err) = launch(&["-f", "-l", &unix]);
        assert_eq!(code, 1);
        assert!(err.contains("listening on it"), "{err}");
        // On reload: the reload fails, and the master goes on working.
        let conf = dir.path("c.toml");
        std::fs::write(
            &conf,
            "listen = [\"127.0.0.1:0\"]\nworkers = 1\nmin-spare = 0\n",
        )
        .unwrap();
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let addr = d.addr();
        std::fs::write(
            &conf,
            format!("listen = [\"127.0.0.1:0\", \"{unix}\"]\nworkers = 1\nmin-spare = 0\n"),
        )
        .unwrap();
        d.signal(Signal::SIGHUP);
        let failed = d.wait_line("reload failed", DEADLINE);
        assert!(failed.is_some(), "{}", d.stderr_text());
        d.signal(Signal::SIGUSR1);
        assert!(
            d.wait_line("status: ", DEADLINE).is_some(),
            "the master is stuck"
        );
        assert_eq!(echo_all(addr, b"alive"), b"alive");
    }

    #[test]
    fn address_in_use_fails_startup_with_the_address_named() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = taken.local_addr().unwrap().to_string();
        let (code, err) = launch(&["-f", "-l", &a]);
        assert_eq!(code, 1);
        assert!(err.contains(&a) && err.contains("in use"), "{err}");
    }
}

/// The systemd protocols and inetd, with the test acting as the manager.
mod systemd {
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
        let mut d =
            Daemon::spawn_with(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"], |c| {
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
        let fds: [OwnedFd; 2] = [tcp.into(), unix.into()];
        let raw = [fds[0].as_raw_fd(), fds[1].as_raw_fd()];
        let mut cmd = Command::new("/bin/sh");
        // LISTEN_PID must be the daemon's own pid: set it in the process
        // that then execs echo-forkd. No --listen: it is optional here.
        cmd.args([
            "-c",
            "LISTEN_PID=$$ LISTEN_FDS=2 exec \"$0\" \"$@\"",
            BIN,
            "-f",
            "-w",
            "1",
            "--min-spare",
            "0",
        ]);
        // SAFETY: fcntl and dup2 are async-signal-safe. The sockets are
        // first copied above every target (one of them may sit at fd 3 and
        // be overwritten otherwise), then placed at fds 3 and 4 without
        // close-on-exec, as a service manager does.
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0; 2];
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
}

/// Running as a daemon: detaching, the pidfile.
mod daemon {
    use super::*;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    use std::os::unix::net::UnixDatagram;
    use std::path::Path;

    /// A one-worker daemon on a free port with pidfile `p`, logging nowhere.
    fn quiet_daemon(p: &str) -> [&str; 10] {
        [
            "-l",
            "127.0.0.1:0",
            "-w",
            "1",
            "--min-spare",
            "0",
            "-p",
            p,
            "--syslog-socket",
            "/nonexistent",
        ]
    }

    /// The first `listening on` address in the syslog datagrams on `sock`.
    fn listening_from_syslog(sock: &UnixDatagram) -> std::net::SocketAddr {
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 2048];
        loop {
            let n = sock.recv(&mut buf).expect("no listening line on syslog");
            let line = String::from_utf8_lossy(&buf[..n]).into_owned();
            if let Some(a) = line.split("listening on ").nth(1) {
                return a.parse().unwrap();
            }
        }
    }

    #[test]
    fn detaches_after_it_listens_and_leaves_the_terminal() {
        let dir = TempDir::new("detach");
        let pidfile = dir.path("pid");
        let log = dir.path("log");
        let sock = UnixDatagram::bind(&log).unwrap();
        let args = [
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--min-spare",
            "0",
            "-p",
            pidfile.to_str().unwrap(),
            "--syslog-socket",
            log.to_str().unwrap(),
        ];
        let d = Detached::start(&args, &pidfile).unwrap_or_else(|e| panic!("launch failed: {e:?}"));
        // The launcher has returned: the daemon must already serve.
        let addr = listening_from_syslog(&sock);
        assert_eq!(echo_all(addr, b"detached"), b"detached");
        let stat = stat_fields(d.pid);
        assert_eq!(stat[4], "0", "the daemon has a controlling tty");
        assert_eq!(
            stat[3],
            d.pid.to_string(),
            "the daemon leads its own session"
        );
        assert_ne!(
            stat[3].parse::<i32>().unwrap(),
            nix::unistd::getsid(None).unwrap().as_raw()
        );
        assert_eq!(
            std::fs::read_link(format!("/proc/{}/cwd", d.pid)).unwrap(),
            Path::new("/")
        );
        for fd in 0..3 {
            assert_eq!(
                std::fs::read_link(format!("/proc/{}/fd/{fd}", d.pid)).unwrap(),
                Path::new("/dev/null")
            );
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(d.pid), Signal::SIGTERM).unwrap();
        assert!(
            wait_until(DEADLINE, || is_dead(d.pid) && !exists(&pidfile)),
            "pidfile left after TERM"
        );
    }

    #[test]
    fn relative_paths_keep_their_meaning_after_detaching_and_on_reload() {
        let dir = TempDir::new("relative");
        let conf = dir.path("echo.toml");
        let text = |w: u32| {
            format!(
                "listen = [\"unix:echo.sock\"]\nworkers = {w}\nmin-spare = 0\nsyslog-socket = \"/nonexistent\"\n"
            )
        };
        std::fs::write(&conf, text(1)).unwrap();
        let (code, err) = launch_in(&dir.0, &["-c", "echo.toml", "-p", "echo.pid"]);
        assert_eq!(code, 0, "{err}");
        let pid: i32 = std::fs::read_to_string(dir.path("echo.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _guard = Detached { pid };
        assert_eq!(echo_unix(&dir.path("echo.sock"), b"rel"), b"rel");
        // The daemon's cwd is / now; the file is still found on reload.
        std::fs::write(&conf, text(2)).unwrap();
        kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
        let live = || proc_children(pid).iter().filter(|(_, s)| *s != 'Z').count();
        assert!(
            wait_until(DEADLINE, || live() == 2),
            "no reload to 2 workers"
        );
        kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
        assert!(wait_until(DEADLINE, || is_dead(pid)));
        assert!(!exists(&dir.path("echo.pid")), "pidfile left behind");
        assert!(!exists(&dir.path("echo.sock")), "socket file left behind");
    }

    #[test]
    fn a_second_instance_with_the_same_pidfile_is_refused() {
        let dir = TempDir::new("pidheld");
        let pidfile = dir.path("pid");
        let p = pidfile.to_str().unwrap();
        let first = Detached::start(&quiet_daemon(p), &pidfile).unwrap();
        let (code, err) = launch(&quiet_daemon(p));
        assert_eq!(code, 1);
        assert!(
            err.contains(&format!("already running (pid {}", first.pid)),
            "{err}"
        );
        assert!(!is_dead(first.pid));
        assert_eq!(
            std::fs::read_to_string(&pidfile).unwrap().trim(),
            first.pid.to_string()
        );
        // Only the first daemon and its workers: the refused one left nothing.
        let mut expected: Vec<i32> = std::iter::once(first.pid)
            .chain(proc_children(first.pid).into_iter().map(|(pid, _)| pid))
            .filter(|&pid| !is_dead(pid))
            .collect();
        expected.sort();
        let mut seen = processes_with_arg(p);
        seen.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_stale_pidfile_is_taken_over_and_a_symlink_is_not_followed() {
        let dir = TempDir::new("pidstale");
        let pidfile = dir.path("pid");
        std::fs::write(&pidfile, "999999\n").unwrap();
        let p = pidfile.to_str().unwrap();
        let d = Detached::start(&quiet_daemon(p), &pidfile).unwrap();
        assert_eq!(
            std::fs::read_to_string(&pidfile).unwrap(),
            format!("{}\n", d.pid)
        );
        drop(d);

        let target = dir.path("target");
        std::fs::write(&target, "precious\n").unwrap();
        let link = dir.path("link.pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (code, err) = launch(&quiet_daemon(link.to_str().unwrap()));
        assert_eq!(code, 1);
        assert!(err.contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    }

    #[test]
    fn a_pidfile_that_is_not_a_regular_file_is_refused_and_left_alone() {
        let dir = TempDir::new("pidnode");
        let fifo = dir.path("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let mut nodes = vec![(fifo, "FIFO")];
        if nix::unistd::geteuid().is_root() {
            // What -p /dev/null meets: a character device (1, 3 is null).
            let dev = dir.path("null");
            nix::sys::stat::mknod(
                &dev,
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .unwrap();
            nodes.push((dev, "character device"));
        } else {
            println!("character device case skipped: mknod needs root");
        }
        for (node, what) in &nodes {
            let p = node.to_str().unwrap();
            let (code, err) = launch(&["-t", "-p", p]);
            assert_eq!(code, 1, "-t accepted a {what} as pidfile");
            assert!(err.contains("not a regular file"), "{err}");
            let (code, err) = launch(&quiet_daemon(p));
            assert_eq!(code, 1, "started with a {what} as pidfile");
            assert!(err.contains("not a regular file"), "{err}");
            let kind = std::fs::symlink_metadata(node)
                .unwrap_or_else(|_| panic!("the {what} was removed"))
                .file_type();
            assert!(!kind.is_file(), "the {what} was replaced by a file");
        }
        let (code, err) = launch(&["-t", "-p", dir.0.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err.contains("a directory"), "{err}");
    }

    #[test]
    fn a_reader_holding_the_pidfile_lock_cannot_keep_the_daemon_down() {
        let dir = TempDir::new("pidsquat");
        let pidfile = dir.path("pid");
        std::fs::write(&pidfile, "999999\n").unwrap();
        // Anyone who may read a 0644 file may lock it.
        let squatter = std::fs::File::open(&pidfile).unwrap();
        let locked = lock_for_good(&squatter);
        assert!(locked, "the test could not take the lock");
        let p = pidfile.to_str().unwrap();
        let d = Detached::start(&quiet_daemon(p), &pidfile)
            .unwrap_or_else(|e| panic!("refused to start: {e:?}"));
        assert_eq!(
            std::fs::read_to_string(&pidfile).unwrap(),
            format!("{}\n", d.pid)
        );
        // The real daemon's lock still keeps a second instance out.
        let (code, err) = launch(&quiet_daemon(p));
        assert_eq!(code, 1);
        assert!(
            err.contains(&format!("already running (pid {}", d.pid)),
            "{err}"
        );
    }

    /// flock(LOCK_EX|LOCK_NB) through nix, which unlocks on drop: the
    /// guard is leaked so the lock lives as long as the file.
    fn lock_for_good(f: &std::fs::File) -> bool {
        match nix::fcntl::Flock::lock(
            f.try_clone().unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(guard) => {
                std::mem::forget(guard);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn a_pidfile_another_user_owns_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root (to give the file to another user)");
            return;
        }
        let dir = TempDir::new("pidforeign");
        let pidfile = dir.path("pid");
        std::fs::write(&pidfile, "999999\n").unwrap();
        std::os::unix::fs::chown(&pidfile, Some(65534), Some(65534)).unwrap();
        let p = pidfile.to_str().unwrap();
        let (code, err) = launch(&quiet_daemon(p));
        assert_eq!(code, 1, "started with a pidfile uid 65534 can rewrite");
        assert!(err.contains("owned by uid 65534"), "{err}");
        assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), "999999\n");
    }

    #[test]
    fn startup_failures_are_reported_by_the_launcher_and_leave_nothing() {
        let dir = TempDir::new("startfail");
        let tag = dir.0.to_str().unwrap().to_string();
        let pidfile = dir.path("pid");
        let p = pidfile.to_str().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap().to_string();
        let (code, err) = launch(&["-l", &busy, "-p", p, "--syslog-socket", "/nonexistent"]);
        assert_eq!(code, 1);
        assert!(err.contains(&busy) && err.contains("in use"), "{err}");
        let bad = dir.path("bad.toml");
        std::fs::write(&bad, "workers = 0\n").unwrap();
        let (code, err) = launch(&["-c", bad.to_str().unwrap(), "-p", p]);
        assert_eq!(code, 1);
        assert!(err.contains("workers"), "{err}");
        assert!(
            processes_with_arg(&tag).is_empty(),
            "a failed start left a process"
        );
        assert!(!exists(&pidfile), "a failed start left its pidfile");
    }

    /// The Uid, Gid, Groups and CapEff lines of /proc/PID/status.
    #[derive(Debug)]
    struct Ids(Vec<u32>, Vec<u32>, Vec<u32>, String);

    fn ids(pid: i32) -> Option<Ids> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let nums = |v: String| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<u32>>()
        };
        Some(Ids(
            nums(field("Uid:")),
            nums(field("Gid:")),
            nums(field("Groups:")),
            field("CapEff:"),
        ))
    }

    fn unprivileged(pid: i32, gid: u32) -> bool {
        matches!(ids(pid), Some(Ids(u, g, groups, cap))
            if u.len() == 4 && u.iter().all(|&x| x != 0)
            && g.len() == 4 && g.iter().all(|&x| x != 0)
            && groups.iter().all(|&x| x == gid)
            && cap.trim_start_matches('0').is_empty())
    }

    #[test]
    fn workers_and_fork_children_run_as_the_given_user() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: dropping privileges needs root");
            return;
        }
        let Ok(Some(group)) = nix::unistd::Group::from_name("nogroup") else {
            println!("skipped: no group 'nogroup' here");
            return;
        };
        let gid = group.gid.as_raw();
        for mode in ["prefork", "fork"] {
            let d = Daemon::start(&[
                "-l",
                "127.0.0.1:0",
                "-m",
                mode,
                "-w",
                "2",
                "--min-spare",
                "0",
                "-u",
                "nobody",
                "-g",
                "nogroup",
            ]);
            // In fork mode the child exists while its client is connected.
            let mut held = connect(d.addr());
            assert_eq!(round_trip(&mut held, b"who").unwrap(), b"who");
            let kids = d.children();
            assert!(!kids.is_empty());
            for pid in kids {
                assert!(
                    wait_until(DEADLINE, || unprivileged(pid, gid)),
                    "{mode} child {pid} kept privileges: {:?}",
                    ids(pid)
                );
            }
            // The master keeps root, to bind new listeners on reload.
            assert_eq!(ids(d.pid).unwrap().0[1], 0);
        }
    }

    #[test]
    fn chroot_confines_the_workers() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: chroot needs root");
            return;
        }
        let dir = TempDir::new("chroot");
        let root = dir.path("jail");
        std::fs::create_dir(&root).unwrap();
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "1",
            "--min-spare",
            "0",
            "-u",
            "nobody",
            "--chroot",
            root.to_str().unwrap(),
        ]);
        assert_eq!(echo_all(d.addr(), b"jailed"), b"jailed");
        let worker = d.wait_children(1)[0];
        assert_eq!(
            std::fs::read_link(format!("/proc/{worker}/root")).unwrap(),
            root
        );
    }

    #[test]
    fn unknown_user_or_group_fails_before_starting() {
        let dir = TempDir::new("nouser");
        let tag = dir.0.to_str().unwrap().to_string();
        let pidfile = dir.path("pid");
        let p = pidfile.to_str().unwrap();
        for args in [
            vec!["-u", "no-such-user-echo-forkd"],
            vec!["-g", "no-such-group-echo-forkd"],
        ] {
            for foreground in [true, false] {
                let mut all = vec![
                    "-l",
                    "127.0.0.1:0",
                    "-p",
                    p,
                    "--syslog-socket",
                    "/nonexistent",
                ];
                if foreground {
                    all.push("-f");
                }
                all.extend(&args);
                let (code, err) = launch(&all);
                assert_eq!(code, 1, "{all:?}");
                assert!(
                    err.contains("unknown user") || err.contains("unknown group"),
                    "{err}"
                );
            }
            let mut check = vec!["-t"];
            check.extend(&args);
            assert_eq!(launch(&check).0, 1);
        }
        assert!(processes_with_arg(&tag).is_empty());
        assert!(!exists(&pidfile));
    }

    #[test]
    fn inetd_mode_drops_privileges_too() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: dropping privileges needs root");
            return;
        }
        let Ok(Some(group)) = nix::unistd::Group::from_name("nogroup") else {
            println!("skipped: no group 'nogroup' here");
            return;
        };
        let mut i = Inetd::spawn(&[
            "-u",
            "nobody",
            "-g",
            "nogroup",
            "--syslog-socket",
            "/nonexistent",
        ]);
        i.conn.write_all(b"who am i").unwrap();
        let mut back = [0u8; 8];
        i.conn.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"who am i");
        // It has served a byte, so it is past the privilege drop.
        let pid = i.child.id() as i32;
        let (seen, unpriv) = (ids(pid), unprivileged(pid, group.gid.as_raw()));
        drop(i);
        assert!(unpriv, "--inetd kept privileges with -u: {seen:?}");
    }
}

/// SIGHUP, SIGTTIN/SIGTTOU and SIGUSR1 on a running daemon.
mod reload {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    /// Sends SIGHUP and waits for the `n`-th "reloaded" line.
    fn reload(d: &Daemon, n: usize) {
        d.signal(Signal::SIGHUP);
        assert!(
            d.wait_lines("reloaded:", n, DEADLINE).is_some(),
            "reload {n} did not complete; stderr:\n{}",
            d.stderr_text()
        );
    }

    fn sorted(mut v: Vec<i32>) -> Vec<i32> {
        v.sort();
        v
    }

    #[test]
    fn hup_replaces_the_workers_with_a_generation_of_the_new_size() {
        let dir = TempDir::new("reload-size");
        let conf = dir.path("echo.toml");
        write(
            &conf,
            "listen = [\"127.0.0.1:0\"]\nworkers = 2\nmin-spare = 0\n",
        );
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let addr = d.addr();
        let old = sorted(d.wait_children(2));
        write(
            &conf,
            "listen = [\"127.0.0.1:0\"]\nworkers = 3\nmin-spare = 0\n",
        );
        reload(&d, 1);
        let new = sorted(d.wait_children(3));
        assert!(
            new.iter().all(|p| !old.contains(p)),
            "old workers {old:?} still there: {new:?}"
        );
        // Same master, same socket and port.
        assert!(!is_dead(d.pid));
        assert_eq!(echo_all(addr, b"after"), b"after");
        assert_eq!(d.listening().len(), 1, "{}", d.stderr_text());
        let line = d.wait_line("reloaded:", DEADLINE).unwrap();
        assert!(line.contains(&format!("[{}]", d.pid)), "{line}");
    }

    #[test]
    fn broken_config_on_hup_is_logged_and_changes_nothing() {
        let dir = TempDir::new("reload-broken");
        let conf = dir.path("echo.toml");
        write(
            &conf,
            "listen = [\"127.0.0.1:0\"]\nworkers = 2\nmin-spare = 0\n",
        );
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let addr = d.addr();
        let before = sorted(d.wait_children(2));
        for (n, bad) in [
            "workers = [",
            "workers = 3\nmin-spare = 9\nmax-spare = 1\n",
            "listen = [\"127.0.0.1:0\"]\nuser = \"no-such-user-echo-forkd\"\n",
        ]
        .iter()
        .enumerate()
        {
            write(&conf, bad);
            d.signal(Signal::SIGHUP);
            let failed = d.wait_lines("reload failed", n + 1, DEADLINE);
            assert!(failed.is_some(), "{bad:?}: no error; {}", d.stderr_text());
            let line = failed.unwrap().pop().unwrap();
            assert!(line.contains("error:"), "{line}");
        }
        assert_eq!(sorted(d.children()), before, "the workers were replaced");
        assert_eq!(echo_all(addr, b"still here"), b"still here");
        assert!(!d.stderr_text().contains("reloaded:"));
    }

    #[test]
    fn listeners_are_added_removed_or_kept_with_their_port() {
        let dir = TempDir::new("reload-listen");
        let conf = dir.path("echo.toml");
        let (one, two) = (dir.path("one.sock"), dir.path("two.sock"));
        let text = |unix: &Path| {
            format!(
                "listen = [\"127.0.0.1:0\", \"unix:{}\"]\nworkers = 1\nmin-spare = 0\n",
                unix.display()
            )
        };
        write(&conf, &text(&one));
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let addr = d.addr();
        assert_eq!(echo_unix(&one, b"one"), b"one");
        write(&conf, &text(&two));
        reload(&d, 1);
        assert_eq!(echo_all(addr, b"kept"), b"kept", "the TCP port changed");
        assert_eq!(echo_unix(&two, b"two"), b"two");
        assert!(
            wait_until(DEADLINE, || !exists(&one)),
            "the removed listener's socket file is still there"
        );
        assert!(std::os::unix::net::UnixStream::connect(&one).is_err());
    }

    #[test]
    fn an_open_connection_survives_the_reload_and_its_worker_then_leaves() {
        let dir = TempDir::new("reload-open");
        let conf = dir.path("echo.toml");
        write(
            &conf,
            "listen = [\"127.0.0.1:0\"]\nworkers = 1\nmin-spare = 0\n",
        );
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let old = d.wait_children(1)[0];
        let mut s = connect(d.addr());
        assert_eq!(round_trip(&mut s, b"before").unwrap(), b"before");
        reload(&d, 1);
        // The old worker is still serving us, beside the new one.
        assert_eq!(round_trip(&mut s, b"during").unwrap(), b"during");
        assert!(d.children().contains(&old));
        assert_eq!(echo_all(d.addr(), b"new"), b"new");
        drop(s);
        assert!(
            wait_until(DEADLINE, || !d.children().contains(&old)),
            "the old worker did not exit after its client left"
        );
        d.wait_children(1);
    }

    #[test]
    fn a_retired_worker_still_busy_after_the_shutdown_timeout_is_killed() {
        let dir = TempDir::new("reload-overdue");
        let conf = dir.path("echo.toml");
        let text = "listen = [\"127.0.0.1:0\"]\nworkers = 1\nmin-spare = 0\nshutdown-timeout = 1\n";
        write(&conf, text);
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let old = d.wait_children(1)[0];
        let mut s = connect(d.addr());
        assert_eq!(round_trip(&mut s, b"hold").unwrap(), b"hold");
        reload(&d, 1);
        assert!(
            wait_until(DEADLINE, || !d.children().contains(&old)),
            "the busy old worker outlived the shutdown timeout"
        );
        assert!(d
            .stderr_text()
            .contains(&format!("worker {old} still busy")));
        let mut rest = Vec::new();
        // Killed, not left hanging: the connection ends.
        let _ = s.read_to_end(&mut rest);
        assert_eq!(echo_all(d.addr(), b"ok"), b"ok");
    }

    #[test]
    fn reloads_under_load_refuse_reset_and_cut_nothing() {
        let _heavy = heavy();
        const RELOADS: usize = 12;
        const CONNECTIONS: usize = 1200;
        let dir = TempDir::new("reload-load");
        let conf = dir.path("echo.toml");
        // Each reload changes something: pool size, timeouts, even the model.
        let settings = |i: usize| match i % 4 {
            0 => "workers = 2\n",
            1 => "workers = 3\nidle-timeout = 60\n",
            2 => "mode = \"fork\"\n",
            _ => "workers = 1\nmax-requests = 7\n",
        };
        let text = |i| format!("listen = [\"127.0.0.1:0\"]\n{}", settings(i));
        write(&conf, &text(0));
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let addr = d.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let threads = clients(addr, 8, &stop, &tally);
        let done = || tally.total();
        for i in 1..=RELOADS {
            // Spread the connections over the reloads.
            let target = CONNECTIONS * i / RELOADS;
            assert!(wait_until(DEADLINE, || done() >= target), "clients stalled");
            write(&conf, &text(i));
            reload(&d, i);
        }
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        let counts = tally.counts();
        println!("{RELOADS} reloads under load: {counts:?}");
        assert!(tally.get(Outcome::Echoed) >= CONNECTIONS, "{counts:?}");
        assert_eq!(tally.get(Outcome::Echoed), tally.total(), "{counts:?}");
        assert!(!is_dead(d.pid));
    }

    #[test]
    fn ttin_and_ttou_move_the_pool_by_one_within_bounds() {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--min-spare",
            "0",
            "--max-workers",
            "3",
        ]);
        d.wait_children(2);
        d.signal(Signal::SIGTTIN);
        d.wait_children(3);
        d.signal(Signal::SIGTTIN);
        assert!(d
            .wait_line("SIGTTIN: the pool stays at 3", DEADLINE)
            .is_some());
        d.wait_children(3);
        for n in [2, 1] {
            d.signal(Signal::SIGTTOU);
            d.wait_children(n);
        }
        d.signal(Signal::SIGTTOU);
        assert!(d
            .wait_line("SIGTTOU: the pool stays at 1", DEADLINE)
            .is_some());
        assert_eq!(d.children().len(), 1);
        assert_eq!(echo_all(d.addr(), b"one left"), b"one left");
    }

    #[test]
    fn ttou_retires_an_idle_worker_not_a_busy_one() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"]);
        d.wait_children(2);
        let mut s = connect(d.addr());
        assert_eq!(round_trip(&mut s, b"busy").unwrap(), b"busy");
        d.signal(Signal::SIGTTOU);
        d.wait_children(1);
        // The survivor is the one serving us.
        assert_eq!(round_trip(&mut s, b"still").unwrap(), b"still");
    }

    #[test]
    fn usr1_logs_a_status_line_naming_each_worker() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "3", "--min-spare", "0"]);
        let kids = d.wait_children(3);
        let mut s = connect(d.addr());
        assert_eq!(round_trip(&mut s, b"x").unwrap(), b"x");
        d.signal(Signal::SIGUSR1);
        let status = d.wait_line("status: ", DEADLINE).expect("no status line");
        assert!(
            status.contains("mode prefork")
                && status.contains("workers 3 (busy 1, idle 2")
                && status.contains("uptime"),
            "{status}"
        );
        let named = d.wait_line("workers: ", DEADLINE).expect("no worker list");
        for pid in &kids {
            assert!(named.contains(&format!("{pid} ")), "{pid} missing: {named}");
        }
        assert_eq!(named.matches(" busy ").count(), 1, "{named}");
        assert_eq!(named.matches(" idle ").count(), 2, "{named}");
    }
}

/// The dynamic pool, per-address limits and faults: floods, kills, EMFILE.
mod resilience {
    use super::*;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A connection from a chosen loopback source address.
    fn connect_from(src: [u8; 4], addr: std::net::SocketAddr) -> TcpStream {
        use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType};
        use nix::sys::socket::{SockaddrIn, SockaddrStorage};
        use std::os::fd::AsRawFd;
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let [a, b, c, d] = src;
        bind(fd.as_raw_fd(), &SockaddrIn::new(a, b, c, d, 0)).unwrap();
        connect(fd.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
        let s = TcpStream::from(fd);
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    /// Whether the server closed `s` without echoing: refused at once.
    fn closed_unserved(s: &mut TcpStream) -> bool {
        let _ = s.write_all(b"anyone?");
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(0) | Err(_))
    }

    #[test]
    fn the_pool_grows_with_load_and_shrinks_back_to_its_spares() {
        let _heavy = heavy();
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--max-workers",
            "10",
            "--min-spare",
            "1",
            "--max-spare",
            "3",
        ]);
        let addr = d.addr();
        d.wait_children(2);
        let started = Instant::now();
        let mut held: Vec<TcpStream> = (0..6).map(|_| connect(addr)).collect();
        for s in &mut held {
            s.write_all(b"hold").unwrap();
        }
        assert!(
            wait_until(Duration::from_secs(3), || d.children().len() >= 7),
            "only {} workers after 3 s with 6 clients held",
            d.children().len()
        );
        println!("grew to 7 workers in {:?}", started.elapsed());
        for s in &mut held {
            let mut back = [0u8; 4];
            s.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"hold");
        }
        drop(held);
        let mut fewest = usize::MAX;
        let shrunk = wait_until(DEADLINE, || {
            let n = d.children().len();
            fewest = fewest.min(n);
            n <= 3
        });
        assert!(shrunk, "still {} workers", d.children().len());
        // Settled at the spares, never below the floor of 2.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            fewest = fewest.min(d.children().len());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(fewest >= 2, "the pool fell to {fewest} workers");
        assert_eq!(echo_all(addr, b"after"), b"after");
    }

    #[test]
    fn a_burst_of_clients_is_served_at_once_and_the_pool_shrinks_after() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "2", "--max-workers", "400"]);
        let addr = d.addr();
        d.wait_children(2);
        let start = Instant::now();
        // 300 clients at once, each holding its connection.
        let mut held: Vec<TcpStream> = (0..300).map(|_| connect(addr)).collect();
        for (i, s) in held.iter_mut().enumerate() {
            s.write_all(&(i as u32).to_be_bytes()).unwrap();
        }
        for (i, s) in held.iter_mut().enumerate() {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut back = [0u8; 4];
            s.read_exact(&mut back).unwrap_or_else(|e| {
                panic!("client {i} not echoed: {e} after {:?}", start.elapsed())
            });
            assert_eq!(back, (i as u32).to_be_bytes());
        }
        let took = start.elapsed();
        let peak = d.children().len();
        println!("300 held clients echoed in {took:?}; {peak} workers");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(peak >= 300, "{peak} workers for 300 held clients");
        drop(held);
        // Surplus idle workers retire, slowly, never below the floor.
        assert!(
            wait_until(DEADLINE, || d.children().len() < peak - 2),
            "the pool did not shrink from {peak}"
        );
    }

    #[test]
    fn one_client_after_another_does_not_grow_the_pool() {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "1"]);
        let addr = d.addr();
        let workers = {
            let mut w = d.wait_children(2);
            w.sort();
            w
        };
        let fds = d.fd_count();
        for i in 0..2000u32 {
            assert_eq!(echo_all(addr, &i.to_be_bytes()), i.to_be_bytes());
        }
        let mut now = d.children();
        now.sort();
        assert_eq!(now, workers, "the pool changed:\n{}", d.stderr_text());
        assert_eq!(d.fd_count(), fds, "the master's descriptors changed");
    }

    fn max_per_ip(mode: &str) {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            mode,
            "-w",
            "6",
            "--max-per-ip",
            "3",
        ]);
        let addr = d.addr();
        let mut three: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
        for s in &mut three {
            assert_eq!(round_trip(s, b"in").unwrap(), b"in");
        }
        let mut fourth = connect(addr);
        assert!(closed_unserved(&mut fourth), "a 4th connection was served");
        for s in &mut three {
            assert_eq!(round_trip(s, b"still").unwrap(), b"still");
        }
        drop(three.pop());
        // Once the server has seen that client leave, a new one is served.
        let served = wait_until(DEADLINE, || {
            let mut s = connect(addr);
            round_trip(&mut s, b"next").is_ok_and(|b| b == b"next")
        });
        assert!(served, "no new connection after one closed");
        d.signal(Signal::SIGUSR1);
        let status = d.wait_line("status: ", DEADLINE).unwrap();
        assert!(status.contains("max-per-ip "), "{status}");
    }

    #[test]
    fn max_per_ip_prefork() {
        max_per_ip("prefork");
    }

    #[test]
    fn max_per_ip_fork() {
        max_per_ip("fork");
    }

    fn allow_and_deny(mode: &str) {
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", mode, "--deny", "127.0.0.1/32"]);
        let mut s = connect(d.addr());
        assert!(closed_unserved(&mut s), "a denied client was served");
        assert!(
            d.wait_line("allow/deny", DEADLINE).is_some(),
            "refusal not logged"
        );

        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            mode,
            "--allow",
            "127.0.0.0/8",
            "--deny",
            "127.0.0.1/32",
        ]);
        let addr = d.addr();
        let mut s = connect_from([127, 0, 0, 1], addr);
        assert!(closed_unserved(&mut s), "127.0.0.1 was served");
        let mut s = connect_from([127, 0, 0, 2], addr);
        assert_eq!(round_trip(&mut s, b"from .2").unwrap(), b"from .2");
    }

    #[test]
    fn allow_and_deny_prefork() {
        allow_and_deny("prefork");
    }

    #[test]
    fn allow_and_deny_fork() {
        allow_and_deny("fork");
    }

    fn conn_rate(mode: &str) {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            mode,
            "-w",
            "4",
            "--max-conn-rate",
            "5",
        ]);
        let addr = d.addr();
        let burst = Instant::now();
        let served = (0..20)
            .filter(|_| {
                let mut s = connect(addr);
                round_trip(&mut s, b"r").is_ok_and(|b| b == b"r")
            })
            .count();
        // A burst well within a second spans at most two windows.
        if burst.elapsed() < Duration::from_millis(900) {
            assert!((5..=10).contains(&served), "{served} of 20 served");
        }
        // A pause, not a ban: a later connection is served again.
        assert!(wait_until(DEADLINE, || {
            let mut s = connect(addr);
            round_trip(&mut s, b"again").is_ok_and(|b| b == b"again")
        }));
    }

    #[test]
    fn conn_rate_prefork() {
        conn_rate("prefork");
    }

    #[test]
    fn conn_rate_fork() {
        conn_rate("fork");
    }

    #[test]
    fn a_crash_loop_is_slowed_down_and_recovers() {
        let _heavy = heavy();
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root (a chroot that vanishes makes workers fail to start)");
            return;
        }
        let dir = TempDir::new("crash");
        let jail = dir.path("jail");
        std::fs::create_dir(&jail).unwrap();
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "1",
            "--min-spare",
            "0",
            "--chroot",
            jail.to_str().unwrap(),
        ]);
        let worker = d.wait_children(1)[0];
        std::fs::remove_dir(&jail).unwrap();
        kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
        let window = Instant::now();
        while window.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = d.stderr_text();
        let forks = log.matches(" started").count() - 1;
        println!("{forks} forks in 3 s of crash loop");
        assert!((2..=6).contains(&forks), "{forks} forks in 3 s:\n{log}");
        assert!(log.contains("respawning in"), "{log}");
        assert!(!is_dead(d.pid));
        // Healthy again: a worker starts and serves.
        std::fs::create_dir(&jail).unwrap();
        let addr = d.addr();
        assert!(
            wait_until(DEADLINE, || {
                let mut s = connect(addr);
                round_trip(&mut s, b"back").is_ok_and(|b| b == b"back")
            }),
            "{}",
            d.stderr_text()
        );
    }

    #[test]
    fn workers_killed_as_soon_as_they_appear_are_respawned_slowly() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "4"]);
        let addr = d.addr();
        d.wait_children(4);
        let started = || d.stderr_text().matches(" started").count();
        let before = started();
        // An OOM killer or watchdog that takes every worker at once.
        let mut seen = std::collections::HashSet::new();
        let window = Instant::now();
        while window.elapsed() < Duration::from_secs(3) {
            for pid in d.children() {
                if seen.insert(pid) || !is_dead(pid) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let forks = started() - before;
        println!(
            "{forks} forks in 3 s of killing ({} workers seen)",
            seen.len()
        );
        assert!(forks <= 20, "{forks} forks in 3 s:\n{}", d.stderr_text());
        assert!(!is_dead(d.pid), "the master died");
        let log = d.stderr_text();
        assert!(log.contains("crash-loop back-off"), "{log}");
        assert!(
            log.matches("children are failing as they start").count() == 1,
            "the back-off should be announced once:\n{log}"
        );
        // The killing stops: the pool is back within seconds, and serves.
        let back = Instant::now();
        assert!(
            wait_until(DEADLINE, || d.children().len() >= 4),
            "pool not back: {:?}\n{}",
            d.children(),
            d.stderr_text()
        );
        println!("pool back in {:?}", back.elapsed());
        assert_eq!(echo_all(addr, b"back"), b"back");
        assert!(
            d.wait_line("back-off over", DEADLINE).is_some(),
            "{}",
            d.stderr_text()
        );
    }

    #[test]
    fn one_failed_round_of_every_worker_costs_a_moment_not_half_a_minute() {
        let _heavy = heavy();
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root (a chroot that vanishes makes workers fail to start)");
            return;
        }
        let dir = TempDir::new("badround");
        let jail = dir.path("jail");
        std::fs::create_dir(&jail).unwrap();
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-w",
            "16",
            "--min-spare",
            "0",
            "--chroot",
            jail.to_str().unwrap(),
        ]);
        let addr = d.addr();
        let workers = d.wait_children(16);
        // The directory is gone while every worker is replaced.
        std::fs::remove_dir(&jail).unwrap();
        for pid in &workers {
            kill(Pid::from_raw(*pid), Signal::SIGKILL).unwrap();
        }
        assert!(d.wait_line("crash-loop back-off", DEADLINE).is_some());
        let window = Instant::now();
        while window.elapsed() < Duration::from_millis(1500) {
            std::thread::sleep(Duration::from_millis(50));
        }
        // Fixed: clients are served again within a couple of seconds.
        std::fs::create_dir(&jail).unwrap();
        let fixed = Instant::now();
        let mut s = connect(addr);
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        let back = round_trip(&mut s, b"fixed");
        println!("served {:?} after the fix", fixed.elapsed());
        assert_eq!(
            back.ok().as_deref(),
            Some(&b"fixed"[..]),
            "{}",
            d.stderr_text()
        );
        assert!(
            wait_until(DEADLINE, || d.children().len() == 16),
            "pool not refilled: {} workers",
            d.children().len()
        );
        // The cause is logged once per interval, not once per worker.
        let causes = d.stderr_text().matches("cannot drop privileges").count();
        assert!(causes <= 2, "{causes} lines:\n{}", d.stderr_text());
    }

    #[test]
    fn fork_mode_holds_clients_back_while_its_children_fail_to_start() {
        let _heavy = heavy();
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: needs root (a chroot that vanishes makes children fail to start)");
            return;
        }
        let dir = TempDir::new("forkfail");
        let jail = dir.path("jail");
        std::fs::create_dir(&jail).unwrap();
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            "-m",
            "fork",
            "--chroot",
            jail.to_str().unwrap(),
            "--log-level",
            "debug",
        ]);
        let addr = d.addr();
        assert_eq!(echo_all(addr, b"ok"), b"ok");
        std::fs::remove_dir(&jail).unwrap();
        let failed = || d.stderr_text().matches("exited with status 4").count();
        // Twenty clients arrive while no child can start.
        let clients: Vec<_> = (0..20)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut s = connect(addr);
                    let msg = format!("client {i}");
                    round_trip(&mut s, msg.as_bytes()).is_ok_and(|b| b == msg.as_bytes())
                })
            })
            .collect();
        // The first accept batch forks before any failure is known; from
        // then on, one probe per delay (250, 500, 1000 ms, then 1 s).
        let window = Instant::now();
        let mut first_second = 0;
        while window.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(50));
            if first_second == 0 && window.elapsed() >= Duration::from_secs(1) {
                first_second = failed();
            }
        }
        let forks = failed();
        println!("{forks} children failed in 3 s with 20 clients waiting ({first_second} in the first second)");
        assert!(
            forks - first_second <= 4,
            "{} failed children in the last 2 s:\n{}",
            forks - first_second,
            d.stderr_text()
        );
        std::fs::create_dir(&jail).unwrap();
        let served = clients
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|&ok| ok)
            .count();
        // Only the probes' clients were lost; the rest waited and were served.
        assert!(
            served >= 20 - forks,
            "{served} of 20 served after {forks} failures"
        );
        let causes = d.stderr_text().matches("cannot drop privileges").count();
        assert!(causes <= 2, "{causes} lines:\n{}", d.stderr_text());
        assert!(
            d.stderr_text().contains("crash-loop back-off"),
            "{}",
            d.stderr_text()
        );
    }

    /// CPU time (user + system) of a process, in clock ticks.
    fn cpu_ticks(pid: i32) -> u64 {
        let f = stat_fields(pid);
        f[13].parse::<u64>().unwrap() + f[14].parse::<u64>().unwrap()
    }

    fn set_nofile(pid: i32, soft: u64) {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit reads and writes only the two structs given.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
        assert_eq!(rc, 0);
        let new = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_reload_short_of_descriptors_says_why_and_changes_nothing() {
        let dir = TempDir::new("nofile");
        let conf = dir.path("c.toml");
        let text = |n: u32| format!("listen = [\"127.0.0.1:0\"]\nworkers = {n}\nmin-spare = 0\n");
        std::fs::write(&conf, text(4)).unwrap();
        let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
        let addr = d.addr();
        let before = {
            let mut v = d.wait_children(4);
            v.sort();
            v
        };
        // Room for only two more descriptors, and no way to raise it.
        let open = d.fd_count() as u64;
        set_nofile_both(d.pid, open + 2);
        std::fs::write(&conf, text(8)).unwrap();
        d.signal(Signal::SIGHUP);
        let line = d.wait_line("reload failed", DEADLINE);
        let line = line.unwrap_or_else(|| panic!("no failure logged:\n{}", d.stderr_text()));
        assert!(
            line.contains("RLIMIT_NOFILE") && line.contains(&(open + 2).to_string()),
            "{line}"
        );
        let mut after = d.children();
        after.sort();
        assert_eq!(after, before, "the workers were replaced");
        assert_eq!(echo_all(addr, b"still"), b"still");
    }

    /// Sets both the soft and the hard RLIMIT_NOFILE of `pid`.
    fn set_nofile_both(pid: i32, n: u64) {
        let lim = libc::rlimit {
            rlim_cur: n,
            rlim_max: n,
        };
        // SAFETY: prlimit reads only the struct given.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    #[test]
    fn emfile_pauses_the_worker_instead_of_spinning() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"]);
        let addr = d.addr();
        let worker = d.wait_children(1)[0];
        // The lowest free descriptor number becomes the limit: no room
        // for one more, so accept fails with EMFILE.
        let used: Vec<u64> = std::fs::read_dir(format!("/proc/{worker}/fd"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        let free = (0..).find(|n| !used.contains(n)).unwrap();
        set_nofile(worker, free);
        let mut s = connect(addr);
        s.write_all(b"wait").unwrap();
        let before = cpu_ticks(worker);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let used = cpu_ticks(worker) - before;
        println!("worker used {used} ticks in 2 s of EMFILE");
        assert!(used < 20, "{used} clock ticks (0.2 s is 20)");
        assert!(d.wait_line("pausing", DEADLINE).is_some(), "not logged");
        set_nofile(worker, 1024);
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"wait");
        assert_eq!(
            d.children(),
            vec![worker],
            "the worker should not have exited"
        );
    }

    #[test]
    fn chaos_kills_cut_only_their_own_connections() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "8", "--max-workers", "64"]);
        let addr = d.addr();
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let threads = clients(addr, 50, &stop, &tally);
        let mut kills = 0;
        let mut rng = Stream::new(7);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            let kids = d.children();
            if !kids.is_empty() {
                let mut r = [0u8; 2];
                rng.fill(&mut r);
                let victim = kids[usize::from(u16::from_le_bytes(r)) % kids.len()];
                if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
                    kills += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        let counts = tally.counts();
        println!("chaos: {kills} workers killed; {counts:?}");
        assert!(!is_dead(d.pid), "the master died");
        assert_eq!(tally.get(Outcome::Wrong), 0, "{counts:?}");
        assert_eq!(tally.get(Outcome::Refused), 0, "{counts:?}");
        assert_eq!(tally.get(Outcome::Failed), 0, "{counts:?}");
        // A worker serves one client at a time: a kill cuts at most one.
        let cut = tally.get(Outcome::Cut) + tally.get(Outcome::Reset);
        assert!(cut <= kills, "{cut} cut connections for {kills} kills");
        assert!(tally.get(Outcome::Echoed) > 1000, "{counts:?}");
        assert!(
            wait_until(DEADLINE, || d.children().len() >= 8
                && d.zombies().is_empty()),
            "pool not back: {:?}, zombies {:?}",
            d.children(),
            d.zombies()
        );
        assert_eq!(echo_all(addr, b"calm"), b"calm");
    }

    #[test]
    fn a_flood_in_fork_mode_never_exceeds_max_children_nor_refuses() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", "fork", "--max-children", "50"]);
        let addr = d.addr();
        let done = Arc::new(AtomicBool::new(false));
        let most = Arc::new(AtomicUsize::new(0));
        let sampler = {
            let (done, most, pid) = (Arc::clone(&done), Arc::clone(&most), d.pid);
            std::thread::spawn(move || {
                let list = format!("/proc/{pid}/task/{pid}/children");
                while !done.load(Ordering::SeqCst) {
                    if let Ok(text) = std::fs::read_to_string(&list) {
                        most.fetch_max(text.split_whitespace().count(), Ordering::SeqCst);
                    }
                }
            })
        };
        let mut flood: Vec<TcpStream> = (0..500).map(|_| connect(addr)).collect();
        for s in &mut flood {
            s.write_all(b"f").unwrap();
        }
        for (i, s) in flood.iter_mut().enumerate() {
            let mut b = [0u8; 1];
            s.read_exact(&mut b)
                .unwrap_or_else(|e| panic!("client {i} not served: {e}"));
            assert_eq!(&b, b"f");
            s.shutdown(Shutdown::Both).unwrap();
        }
        done.store(true, Ordering::SeqCst);
        sampler.join().unwrap();
        let most = most.load(Ordering::SeqCst);
        println!("flood: at most {most} children for 500 clients");
        assert!(most <= 50, "{most} children at once");
        assert!(!is_dead(d.pid));
    }

    /// The master's resident memory, in KiB.
    fn rss_kib(pid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn hammer(addr: std::net::SocketAddr, n: usize) {
        let per = n / 4;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    for _ in 0..per {
                        let mut s = TcpStream::connect(addr).unwrap();
                        s.write_all(b"z").unwrap();
                        s.shutdown(Shutdown::Write).unwrap();
                        let mut back = Vec::new();
                        s.read_to_end(&mut back).unwrap();
                        assert_eq!(back, b"z");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_hundred_thousand_connections_leave_the_master_as_it_was() {
        let _heavy = heavy();
        let d = Daemon::start(&["-l", "127.0.0.1:0", "-w", "4", "--max-requests", "5000"]);
        let addr = d.addr();
        hammer(addr, 2_000);
        // The master holds one control pipe per worker; the pool's size
        // may differ, so count the rest.
        let own_fds = || d.fd_count() - d.children().len();
        let (fds, rss) = (own_fds(), rss_kib(d.pid));
        let start = Instant::now();
        hammer(addr, 100_000);
        println!("100,000 connections in {:?}", start.elapsed());
        // Workers that recycled meanwhile are replaced: wait for the pool.
        assert!(wait_until(DEADLINE, || d.zombies().is_empty()));
        assert!(
            wait_until(DEADLINE, || own_fds() == fds),
            "fds {fds} -> {}",
            own_fds()
        );
        let grew = rss_kib(d.pid).saturating_sub(rss);
        println!("master RSS {rss} KiB, grew {grew} KiB");
        assert!(grew <= 256, "master RSS grew {grew} KiB");
    }
}
