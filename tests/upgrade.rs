//! USR2: the binary upgraded in place, under load, with the same pid.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Puts `content` at `path` by rename, as a package manager replaces a
/// binary: the running processes keep the old file.
fn replace(dir: &TempDir, path: &Path, content: &[u8], mode: u32) {
    let tmp = dir.path("incoming");
    std::fs::write(&tmp, content).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A copy of the binary in `dir`, to start from and to replace.
fn installed(dir: &TempDir) -> PathBuf {
    let bin = dir.path("echo-forkd");
    replace(dir, &bin, &std::fs::read(BIN).unwrap(), 0o755);
    bin
}

/// The file a process runs, as the kernel names it.
fn exe_of(pid: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn start_from(bin: &Path, args: &[&str], env: Option<(&str, &Path)>) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.arg("-f").args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let d = Daemon::from_command(cmd);
    assert!(
        d.wait_line("ready", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    d
}

in_modes!(usr2_upgrades_in_place_under_load: under_load; prefork, fork, event);

fn under_load(mode: &str) {
    let _heavy = heavy();
    let dir = TempDir::new("upgrade");
    let bin = installed(&dir);
    let pidfile = dir.path("pid");
    let p = pidfile.to_str().unwrap();
    let args = [
        "-l",
        "127.0.0.1:0",
        "-l",
        "udp:127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "3",
        "-p",
        p,
    ];
    let d = start_from(&bin, &args, None);
    let addr = d.addr();
    let master = d.pid;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let threads = clients(addr, 6, &stop, &tally);
    for round in 1..=2 {
        let done = tally.total();
        assert!(
            wait_until(DEADLINE, || tally.total() >= done + 100),
            "clients stalled"
        );
        replace(&dir, &bin, &std::fs::read(BIN).unwrap(), 0o755);
        d.signal(Signal::SIGUSR2);
        let upgraded = d.wait_lines("upgraded: generation", round, DEADLINE);
        assert!(upgraded.is_some(), "upgrade {round}:\n{}", d.stderr_text());
    }
    let done = tally.total();
    assert!(
        wait_until(DEADLINE, || tally.total() >= done + 100),
        "stalled after"
    );
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    let counts = tally.counts();
    println!("2 upgrades under load ({mode}): {counts:?}");
    assert_eq!(tally.get(Outcome::Echoed), tally.total(), "{counts:?}");
    // The UDP socket was passed on: the same port answers, from the new
    // generation's UDP worker.
    let udp = d
        .listening()
        .iter()
        .find_map(|a| {
            a.strip_prefix("udp:")
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        })
        .expect("the udp: listener");
    let got = echo_udp(udp, b"after USR2").expect("the UDP port answers after USR2");
    assert_eq!(got, b"after USR2");
    // So was the metrics' listener, and the counts went on.
    let metrics: std::net::SocketAddr = d
        .listening()
        .iter()
        .find_map(|a| a.strip_prefix("metrics:").and_then(|a| a.parse().ok()))
        .expect("the metrics listener");
    let served = || {
        let mut m = connect(metrics);
        m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        m.read_to_string(&mut text).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("echo_forkd_connections_total "))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("{text}"))
    };
    // Each connection is counted as it ends, just after its client.
    assert!(
        wait_until(DEADLINE, || served() >= tally.total()),
        "{} served, {} echoed",
        served(),
        tally.total()
    );
    // The same master, running the new file; its children too (the UDP
    // worker among them), once the old ones are gone.
    assert!(!is_dead(master));
    let new = bin.to_string_lossy().into_owned();
    assert_eq!(exe_of(master), new);
    assert!(
        wait_until(DEADLINE, || d.children().iter().all(|&c| exe_of(c) == new)),
        "children still run the old file: {:?}",
        d.children().iter().map(|&c| exe_of(c)).collect::<Vec<_>>()
    );
    // The pidfile still names it, and still keeps a second instance out.
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        master.to_string()
    );
    let (code, err) = launch(&["-l", "127.0.0.1:0", "-p", p]);
    assert_eq!(code, 1);
    assert!(err.contains("already running"), "{err}");
}

#[test]
fn a_broken_new_binary_is_refused_and_the_old_code_goes_on() {
    let dir = TempDir::new("upgrade-broken");
    let bin = installed(&dir);
    let d = start_from(
        &bin,
        &["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"],
        None,
    );
    let addr = d.addr();
    let workers = {
        let mut w = d.wait_children(2);
        w.sort();
        w
    };
    // A script that fails its -t, then a file that cannot be run at all.
    let broken: [(&[u8], u32); 2] = [
        (b"#!/bin/sh\necho broken >&2\nexit 1\n", 0o755),
        (b"not a program", 0o644),
    ];
    for (n, (content, mode)) in broken.iter().enumerate() {
        replace(&dir, &bin, content, *mode);
        d.signal(Signal::SIGUSR2);
        let refused = d.wait_lines("upgrade refused", n + 1, DEADLINE);
        assert!(refused.is_some(), "{}", d.stderr_text());
        assert_eq!(echo_all(addr, b"still the old code"), b"still the old code");
        let mut now = d.children();
        now.sort();
        assert_eq!(now, workers, "the workers changed");
    }
    assert!(
        d.stderr_text().contains("broken"),
        "the check's words are not logged"
    );
    // A good one afterwards works.
    replace(&dir, &bin, &std::fs::read(BIN).unwrap(), 0o755);
    d.signal(Signal::SIGUSR2);
    assert!(
        d.wait_line("upgraded: generation", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    assert_eq!(echo_all(addr, b"new code"), b"new code");
}

#[test]
fn systemd_sees_reloading_then_ready_from_the_same_pid() {
    let dir = TempDir::new("upgrade-notify");
    let bin = installed(&dir);
    let path = dir.path("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let recv = |what: &str| {
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
    };
    let args = ["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0"];
    let d = start_from(&bin, &args, Some(("NOTIFY_SOCKET", &path)));
    let mainpid = format!("MAINPID={}", d.pid);
    let first = recv("READY=1").expect("no READY=1");
    assert!(first.lines().any(|l| l == mainpid), "{first}");
    replace(&dir, &bin, &std::fs::read(BIN).unwrap(), 0o755);
    d.signal(Signal::SIGUSR2);
    recv("RELOADING=1").expect("no RELOADING=1");
    let ready = recv("READY=1").expect("no READY=1 after the upgrade");
    assert!(ready.lines().any(|l| l == mainpid), "{ready}");
    assert!(ready.contains("version "), "{ready}");
}

/// The master's own resident memory (anonymous: heap, stacks, its
/// mappings), in KiB. Not VmRSS: that counts the pages of the binary's
/// code it happened to run, which each exec maps afresh and which vary by
/// tens of KiB from one upgrade to the next without anything leaking.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ten_upgrades_leak_neither_descriptors_nor_memory() {
    let dir = TempDir::new("upgrade-leak");
    let bin = installed(&dir);
    let d = start_from(
        &bin,
        &["-l", "127.0.0.1:0", "-w", "2", "--min-spare", "0"],
        None,
    );
    let addr = d.addr();
    d.wait_children(2);
    // The master holds one control pipe per worker: count the rest.
    let own_fds = || d.fd_count() - d.children().len();
    let settle = |n: usize| {
        assert!(
            d.wait_lines("upgraded: generation", n, DEADLINE).is_some(),
            "{}",
            d.stderr_text()
        );
        assert!(wait_until(DEADLINE, || d.children().len() == 2
            && d.zombies().is_empty()));
        assert_eq!(echo_all(addr, b"up"), b"up");
    };
    replace(&dir, &bin, &std::fs::read(BIN).unwrap(), 0o755);
    d.signal(Signal::SIGUSR2);
    settle(1);
    let (fds, rss) = (own_fds(), rss_kib(d.pid));
    for n in 2..=11 {
        replace(&dir, &bin, &std::fs::read(BIN).unwrap(), 0o755);
        d.signal(Signal::SIGUSR2);
        settle(n);
    }
    let grew = rss_kib(d.pid).saturating_sub(rss);
    println!(
        "10 upgrades: master fds {fds} -> {}, anonymous RSS {rss} KiB, grew {grew} KiB",
        own_fds()
    );
    // A leak only grows; the first count may have caught one in passing
    // (a pipe between its creation and the fork that takes it).
    let leaked = !wait_until(DEADLINE, || own_fds() <= fds);
    assert!(
        !leaked,
        "descriptors leaked across upgrades: {fds} -> {}",
        own_fds()
    );
    assert!(
        grew <= 256,
        "master anonymous RSS grew {grew} KiB over 10 upgrades"
    );
}

/// What the old code logged is not logged again by the new: after an
/// upgrade, the next report of dropped datagrams counts only new ones.
#[test]
fn an_upgrade_does_not_report_old_drops_again() {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-l",
        "udp:127.0.0.1:0",
        "--deny",
        "127.0.0.2/32",
        "-w",
        "1",
        "--min-spare",
        "0",
    ]);
    let udp: std::net::SocketAddr = {
        d.wait_line("listening on udp:", DEADLINE);
        d.listening()
            .iter()
            .find_map(|a| a.strip_prefix("udp:").and_then(|a| a.parse().ok()))
            .expect("a UDP listener")
    };
    let denied = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    denied.send_to(b"refused", udp).unwrap();
    assert!(
        d.wait_line("dropped 1 datagram", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    d.signal(Signal::SIGUSR2);
    assert!(
        d.wait_line("upgraded: generation", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    denied.send_to(b"refused again", udp).unwrap();
    let lines = d
        .wait_lines("dropped 1 datagram", 2, DEADLINE)
        .unwrap_or_else(|| panic!("no second report:\n{}", d.stderr_text()));
    assert!(
        lines[1].contains("2 in all"),
        "the old drop was reported again: {lines:?}"
    );
}

/// A new executable whose `-t` hangs is given up after 10 s, and so is
/// everything it started: the check runs in a process group of its own.
#[test]
fn a_hanging_check_is_ended_with_everything_it_started() {
    let dir = TempDir::new("upgrade-hang");
    let bin = installed(&dir);
    let d = start_from(&bin, &["-l", "127.0.0.1:0", "-w", "1"], None);
    let addr = d.addr();
    let left = dir.path("left.pid");
    let script = format!(
        "#!/bin/sh\nsleep 300 &\necho $! > {}\nwait\n",
        left.display()
    );
    replace(&dir, &bin, script.as_bytes(), 0o755);
    d.signal(Signal::SIGUSR2);
    let line = d.wait_line("took more than", Duration::from_secs(15));
    assert!(line.is_some(), "{}", d.stderr_text());
    let child: i32 = std::fs::read_to_string(&left)
        .expect("the script said its child's pid")
        .trim()
        .parse()
        .unwrap();
    let gone = wait_until(DEADLINE, || is_dead(child));
    if !gone {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL);
    }
    assert!(gone, "the check's child {child} was left running");
    assert_eq!(echo_all(addr, b"old code"), b"old code");
}

/// The same pid cannot fall back to the code it replaced: a new program
/// that fails after the exec ends the daemon, and with a non-zero status
/// (so that Restart=on-failure restarts it). Here the new code cannot
/// take the inheritance, as a build that reads another format could not.
#[test]
fn new_code_that_cannot_take_over_exits_non_zero() {
    let dir = TempDir::new("upgrade-garbled");
    let bin = installed(&dir);
    let real = dir.path("real-echo-forkd");
    replace(&dir, &real, &std::fs::read(BIN).unwrap(), 0o755);
    let mut d = start_from(&bin, &["-l", "127.0.0.1:0", "-w", "1"], None);
    // Passes -t, then garbles what the old code passed on.
    let script = format!(
        "#!/bin/sh\ncase \" $* \" in *\" -t \"*) exec {real} \"$@\";; esac\nECHO_FORKD_UPGRADE=\"v=1;pid=$$;l=bad\" exec {real} \"$@\"\n",
        real = real.display()
    );
    replace(&dir, &bin, script.as_bytes(), 0o755);
    d.signal(Signal::SIGUSR2);
    let status = d
        .wait_exit(DEADLINE)
        .unwrap_or_else(|| panic!("still running:\n{}", d.stderr_text()));
    assert_eq!(status.code(), Some(1), "{}", d.stderr_text());
    assert!(
        d.stderr_text()
            .contains("cannot take over after the upgrade"),
        "{}",
        d.stderr_text()
    );
}
