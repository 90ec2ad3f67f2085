//! The command line and the config file.

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
    assert_eq!(code, 2, "a bad value given as a flag is a usage error");
    assert!(err.contains("10.0.0.1/8"), "{err}");
}

#[test]
fn bad_values_given_as_flags_exit_2_naming_them() {
    for (args, says) in [
        (&["-l", "example.com:7"][..], "names are not resolved"),
        (&["-l", "::1:7107"], "IPv6 in brackets"),
        (&["-l", "127.0.0.1:70000"], "from 0 to 65535"),
        (&["-w", "0"], "workers must be at least 1"),
        (&["--max-workers", "5000"], "max-workers (5000)"),
        (&["-l", "[::]:7107", "-l", "0.0.0.0:7107"], "dual-stack"),
        (&["-l", "*:7107", "-l", "127.0.0.1:7107"], "dual-stack"),
        (&["-l", "127.0.0.1:0", "--log", "stderr"], "needs -f"),
    ] {
        let mut all = vec!["-t"];
        all.extend_from_slice(args);
        let (code, err) = launch(&all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    // The same clash in a file is the file's: exit 1, named with its line.
    let dir = TempDir::new("dual");
    let f = dir.path("dual.toml");
    std::fs::write(
        &f,
        "mode = \"fork\"\nlisten = [\"[::]:7107\", \"0.0.0.0:7107\"]\n",
    )
    .unwrap();
    let (code, err) = launch(&["-t", "-c", f.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("line 2") && err.contains("dual-stack"),
        "{err}"
    );
}

#[test]
fn bad_values_in_the_file_name_the_file_and_line_also_on_reload() {
    let dir = TempDir::new("fileline");
    let f = dir.path("echo.toml");
    let path = f.to_str().unwrap();
    let bad = "listen = [\"127.0.0.1:0\"]\n# a comment\nworkers = 0\n";
    std::fs::write(&f, bad).unwrap();
    let (code, err) = launch(&["-t", "-c", path]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.trim(),
        format!("echo-forkd: config {path}: line 3: workers must be at least 1")
    );
    // A slip of the keyboard gets a suggestion, as on the command line.
    std::fs::write(&f, "max-chidlren = 3\n").unwrap();
    let (code, err) = launch(&["-t", "-c", path]);
    assert_eq!(code, 1);
    assert!(
        err.contains("line 1") && err.contains("did you mean `max-children`"),
        "{err}"
    );
    // The same words when a reload finds it.
    std::fs::write(
        &f,
        "listen = [\"127.0.0.1:0\"]\nworkers = 1\nmin-spare = 0\n",
    )
    .unwrap();
    let d = Daemon::start(&["-c", path]);
    std::fs::write(&f, bad).unwrap();
    d.signal(Signal::SIGHUP);
    let line = d
        .wait_line("reload failed", DEADLINE)
        .expect("a failed reload");
    assert!(
        line.contains(&format!(
            "config {path}: line 3: workers must be at least 1"
        )),
        "{line}"
    );
}

#[test]
fn localhost_is_the_loopback_address() {
    let d = Daemon::start(&["-l", "localhost:0", "-w", "1", "--min-spare", "0"]);
    let addr = d.addr();
    assert_eq!(addr.ip(), std::net::Ipv4Addr::LOCALHOST);
    assert_eq!(echo_all(addr, b"local"), b"local");
}

#[test]
fn inetd_mode_says_its_error_once() {
    let (code, err) = launch(&["--inetd", "--log", "stderr"]);
    assert_eq!(code, 1);
    assert_eq!(
        err.matches("standard input is not a socket").count(),
        1,
        "{err}"
    );
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
    assert_eq!(code, 2, "a flag's value: a usage error");
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
        // A flag's value is a usage error (2), a file's is not (1).
        let flags_only = !args.contains(&"-c");
        assert_eq!(code, if flags_only { 2 } else { 1 }, "-t accepted {args:?}");
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
    assert!(err.contains("another process listens there"), "{err}");
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

#[test]
fn a_unix_socket_in_use_is_named_once() {
    let dir = TempDir::new("unix-busy");
    let path = dir.path("busy.sock");
    let _other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (code, err) = launch(&["-f", "-l", &format!("unix:{}", path.display())]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        err.matches("already running").count(),
        1,
        "the hint is given once: {err}"
    );
    assert!(err.contains("address already in use"), "{err}");
}

/// Event mode's descriptor warning names the setting that needs them.
#[test]
fn event_mode_short_of_descriptors_names_worker_connections() {
    let mut cmd = std::process::Command::new("prlimit");
    cmd.args(["--nofile=256:256", "--", BIN, "-f", "-l", "127.0.0.1:0"])
        .args(["-m", "event", "-w", "1", "--worker-connections", "5000"]);
    let d = Daemon::from_command(cmd);
    let line = d
        .wait_line("RLIMIT_NOFILE", DEADLINE)
        .unwrap_or_else(|| panic!("no warning:\n{}", d.stderr_text()));
    assert!(line.contains("or lower worker-connections"), "{line}");
    assert!(!line.contains("max-workers"), "{line}");
}

/// `-T` prints the configuration in force, the file's settings and the
/// flags' merged over the defaults, as a file that `-c` reads back to the
/// same `-T` output.
#[test]
fn print_config_shows_what_is_in_force_and_reads_back_the_same() {
    let dir = TempDir::new("print");
    let file = dir.path("in.toml");
    std::fs::write(
        &file,
        "mode = \"event\"\nworker-connections = 99\nallow = [\"10.0.0.0/8\"]\nidle-timeout = 7\n",
    )
    .unwrap();
    let (code, first) = launch_stdout(&[
        "-T",
        "-c",
        file.to_str().unwrap(),
        "-l",
        "127.0.0.1:7007",
        "--idle-timeout",
        "9",
    ]);
    assert_eq!(code, 0, "{first}");
    for line in [
        "mode = \"event\"",              // from the file
        "worker-connections = 99",       // from the file
        "allow = [\"10.0.0.0/8\"]",      // from the file
        "listen = [\"127.0.0.1:7007\"]", // a flag
        "idle-timeout = 9",              // a flag over the file
        "shutdown-timeout = 10",         // a default
        "max-children = 256",            // a default
    ] {
        assert!(first.lines().any(|l| l == line), "no '{line}' in:\n{first}");
    }
    let printed = dir.path("printed.toml");
    std::fs::write(&printed, &first).unwrap();
    let (code, again) = launch_stdout(&["-T", "-c", printed.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert_eq!(again, first, "-T of -T's output differs");
    // And it is checked as -t checks: a bad file prints nothing.
    let (code, out) = launch_stdout(&["-T", "-w", "0"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
}

/// `-t` passes what works but is risky, with a warning for each.
#[test]
fn check_warns_about_what_is_risky() {
    let (code, err) = launch(&[
        "-t",
        "-l",
        "udp:*:7007",
        "--udp-rate",
        "0",
        "--metrics",
        "0.0.0.0:9100",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: udp:*:7007 answers every source at any rate"),
        "{err}"
    );
    assert!(err.contains("warning: metrics on 0.0.0.0:9100"), "{err}");
    let root = nix::unistd::geteuid().is_root();
    assert_eq!(err.contains("warning: workers run as root"), root, "{err}");
    // Bound to loopback with a rate, and a user: nothing to say.
    let user = if root { "nobody" } else { "" };
    let mut args = vec![
        "-t",
        "-l",
        "udp:127.0.0.1:7007",
        "--metrics",
        "127.0.0.1:9100",
    ];
    if root {
        args.extend(["-u", user]);
    }
    let (code, err) = launch(&args);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}

/// Each of these mistakes gets a message that names the fix.
#[test]
fn messages_name_the_fix() {
    let dir = TempDir::new("fixes");
    let file = |name: &str, text: &str| {
        let p = dir.path(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (code, err) = launch(&["-t", "-l", ":7007"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("*:7007") && err.contains("127.0.0.1:7007"),
        "{err}"
    );

    // One address as a string is taken as a list of one.
    let one = file("one.toml", "listen = \"127.0.0.1:7007\"\n");
    let (code, out) = launch_stdout(&["-T", "-c", &one]);
    assert_eq!(code, 0);
    assert!(out.contains("listen = [\"127.0.0.1:7007\"]"), "{out}");
    let (code, err) = launch(&["-t", "-c", &file("num.toml", "listen = 7\n")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("line 1: listen is an address or a list"),
        "{err}"
    );

    let twice = file("twice.toml", "workers = 2\nmax-spare = 9\nworkers = 3\n");
    let (code, err) = launch(&["-t", "-c", &twice]);
    assert_eq!(code, 1);
    assert!(err.contains("line 3: `workers` is set twice"), "{err}");

    let nobody = file(
        "user.toml",
        "listen = [\"127.0.0.1:7007\"]\nuser = \"no-such-user-7007\"\n",
    );
    let (code, err) = launch(&["-t", "-c", &nobody]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "config {nobody}: line 2: unknown user 'no-such-user-7007'"
        )) && err.contains("useradd"),
        "{err}"
    );

    if nix::unistd::geteuid().is_root() {
        let missing = dir.path("no-such-dir");
        let (code, err) = launch(&["-t", "--chroot", missing.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert!(err.contains("no such file or directory"), "{err}");
    } else {
        skipped(format_args!("skipped the --chroot message: it needs root"));
    }
}

/// With syslog unreachable and a port that cannot be bound, the error
/// comes alone: the warning about syslog is for a daemon that starts.
#[test]
fn a_real_error_is_not_preceded_by_the_syslog_warning() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = launch(&[
        "-f",
        "-l",
        &addr,
        "--log",
        "syslog",
        "--syslog-socket",
        "/nonexistent/echo-forkd-log",
    ]);
    assert_eq!(code, 1);
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains(&format!("cannot bind {addr}")), "{err}");
    assert!(!err.contains("syslog"), "{err}");
}
