//! Running as a daemon: detaching, the pidfile.

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
        skipped(format_args!(
            "character device case skipped: mknod needs root"
        ));
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
        skipped(format_args!(
            "needs root (to give the file to another user)"
        ));
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
        skipped(format_args!("dropping privileges needs root"));
        return;
    }
    let Ok(Some(group)) = nix::unistd::Group::from_name("nogroup") else {
        skipped(format_args!("no group 'nogroup' here"));
        return;
    };
    let gid = group.gid.as_raw();
    for mode in ["prefork", "fork"] {
        let d = Daemon::start(&[
            "-l",
            "127.0.0.1:0",
            // Its UDP worker is one of the children checked below.
            "-l",
            "udp:127.0.0.1:0",
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
        assert!(d.wait_line("udp worker", DEADLINE).is_some());
        let kids = d.children();
        assert!(kids.len() >= 2, "{kids:?}");
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
        skipped(format_args!("chroot needs root"));
        return;
    }
    let dir = TempDir::new("chroot");
    let root = dir.path("jail");
    std::fs::create_dir(&root).unwrap();
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-l",
        "udp:127.0.0.1:0",
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
    let udp = d
        .listening()
        .iter()
        .find_map(|a| a.strip_prefix("udp:").and_then(|a| a.parse().ok()))
        .expect("the udp: listener");
    assert_eq!(echo_udp(udp, b"jailed too").unwrap(), b"jailed too");
    // The pool's worker and the UDP worker.
    for pid in d.wait_children(2) {
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
            root,
            "child {pid}"
        );
    }
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
        skipped(format_args!("dropping privileges needs root"));
        return;
    }
    let Ok(Some(group)) = nix::unistd::Group::from_name("nogroup") else {
        skipped(format_args!("no group 'nogroup' here"));
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
