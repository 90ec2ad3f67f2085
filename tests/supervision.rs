//! Supervision: respawn, reaping, the master's death, descriptor hygiene.

use super::*;

#[test]
fn killed_worker_is_replaced_and_reaped() {
    killed_worker_is_replaced("prefork");
}

#[test]
fn killed_event_worker_is_replaced_and_reaped() {
    killed_worker_is_replaced("event");
}

fn killed_worker_is_replaced(mode: &str) {
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

in_modes!(master_sigkill: master_kill_takes_children_along; prefork, fork, event);

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

in_modes!(two_thousand_connections: fd_and_zombie_hygiene; prefork, fork, event);

in_modes!(client_that_never_reads_is_dropped_after_idle_timeout: never_reads; prefork, fork, event);

fn never_reads(mode: &str) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::ErrorKind::{TimedOut, WouldBlock};
    use std::os::fd::AsFd;
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        // An event worker holds both clients; a prefork pool needs one
        // worker each.
        "-w",
        if mode == "event" { "1" } else { "2" },
        "--min-spare",
        "0",
        "--idle-timeout",
        "1",
    ]);
    let mut s = connect(d.addr());
    // Another client, served while `s` is stuck: a reader that stalls
    // holds up only itself.
    let other = || {
        let mut o = connect(d.addr());
        assert_eq!(round_trip(&mut o, b"other").unwrap(), b"other");
        true
    };
    s.set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let chunk = vec![7u8; 65_536];
    let mut sent = 0;
    let mut dropped = false;
    let mut others_served = false;
    let end = Instant::now() + DEADLINE;
    // Send 8 MiB and never read. Once both sides' buffers are full our
    // writes time out, until the server gives up and resets us.
    while sent < 8 << 20 && Instant::now() < end {
        match s.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if matches!(e.kind(), WouldBlock | TimedOut) => {
                // Stuck: another client must still be served meanwhile.
                if !others_served {
                    others_served = other();
                }
            }
            Err(_) => {
                dropped = true;
                break;
            }
        }
    }
    if !others_served && !dropped {
        // 8 MiB fit in the kernel's buffers, more than the client's
        // receive buffer holds: the server is stuck writing to it now.
        others_served = other();
    }
    assert!(others_served || dropped);
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
    assert_eq!(echo_all(d.addr(), b"next"), b"next");
}

in_modes!(resets_and_broken_pipes_end_only_their_connection: resets; prefork, fork, event);

fn resets(mode: &str) {
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
    let workers = d.wait_children(if mode == "fork" { 0 } else { 2 });
    for _ in 0..50 {
        let s = connect(d.addr());
        (&s).write_all(&[1u8; 100_000]).unwrap();
        reset(s);
    }
    assert_eq!(echo_all(d.addr(), b"alive"), b"alive");
    if mode == "fork" {
        // Each child ends with its connection; none may die of it.
        d.wait_children(0);
    } else {
        let mut now = d.children();
        now.sort();
        let mut was = workers.clone();
        was.sort();
        assert_eq!(now, was, "a worker died from a client's reset");
    }
    assert!(!d.stderr_text().contains("killed by signal"));
}

in_modes!(no_connection_gets_bytes_of_one_that_was_reset: crossed; prefork, event);

/// Connections reset while the server is echoing to them, and new ones
/// opened at once, which the kernel gives the descriptor numbers the
/// reset ones had: each new one gets back its own bytes and nothing else
/// (an engine that names a socket by number after closing it would send
/// the old connection's bytes to the new one).
fn crossed(mode: &str) {
    let d = Daemon::start(&["-l", "127.0.0.1:0", "-m", mode, "-w", "1"]);
    let addr = d.addr();
    for round in 0..200u32 {
        let s = connect(addr);
        (&s).write_all(&[0xAA; 64 * 1024]).unwrap();
        reset(s);
        let token = format!("round {round}");
        assert_eq!(
            echo_all(addr, token.as_bytes()),
            token.as_bytes(),
            "round {round}: a new connection got bytes that were not its own"
        );
    }
}

/// Closes `s` with a reset (SO_LINGER 0), whatever the server is doing.
fn reset(s: TcpStream) {
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
}
