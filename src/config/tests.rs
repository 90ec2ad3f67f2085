//! The configuration's unit tests: parsing, merging, defaults, every
//! error, and a property test over the whole option space.

use super::file::parse_file;
use super::options::SocketMode;
use super::*;
use clap::Parser;

fn cli(args: &[&str]) -> Options {
    let mut all = vec!["echo-forkd", "-f"];
    all.extend_from_slice(args);
    Options::try_parse_from(all).expect("valid command line")
}

#[test]
fn defaults_match_the_contract() {
    let c = resolve(cli(&[])).unwrap();
    assert_eq!(c.mode, Mode::Prefork);
    assert_eq!(c.workers, 4);
    assert_eq!(c.max_workers, 256);
    assert_eq!((c.min_spare, c.max_spare), (2, 8));
    assert_eq!(c.max_children, 256);
    assert_eq!(c.worker_connections, 1024);
    assert_eq!((c.udp_workers, c.udp_rate), (1, 1000));
    let udp = |a: &ListenAddr| matches!(a, ListenAddr::Udp(_));
    assert!(!c.listen.iter().any(udp), "no UDP unless asked");
    let event = resolve(cli(&["-m", "event"])).unwrap();
    assert_eq!(event.workers, usable_cpus(), "event: one worker per CPU");
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
    assert_eq!(c.backlog, 1024);
    assert_eq!(c.log, LogTarget::Stderr);
    assert_eq!(c.listen, vec!["[::]:7".parse::<ListenAddr>().unwrap()]);
}

#[test]
fn file_keys_are_long_option_names() {
    let o = parse_file(
        "mode = \"fork\"\nmax-children = 64\nlisten = [\"127.0.0.1:7\"]\nworkers = \"auto\"\n",
    )
    .unwrap();
    assert_eq!(o.mode, Some(Mode::Fork));
    assert_eq!(o.max_children, Some(64));
    assert_eq!(o.listen, vec!["127.0.0.1:7".to_string()]);
    assert_eq!(o.workers, Some(Workers::Auto));
    assert_eq!(
        parse_file("workers = 3").unwrap().workers,
        Some(Workers::Count(3))
    );
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = parse_file("mode = \"fork\"\n\nmax-chidlren = 3\n").unwrap_err();
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("max-chidlren"), "{err}");
}

#[test]
fn a_bad_workers_or_socket_mode_value_says_what_is_accepted() {
    for (text, says) in [
        ("workers = true", "a number of workers or \"auto\""),
        ("workers = 1.5", "a number of workers or \"auto\""),
        ("workers = -3", "-3 is not a number of workers"),
        (
            "workers = 99999999999",
            "99999999999 is not a number of workers",
        ),
        ("workers = \"many\"", "neither a number nor 'auto'"),
        ("socket-mode = true", "string of octal digits"),
        ("socket-mode = 660", "string of octal digits"),
    ] {
        let err = parse_file(text).unwrap_err();
        assert!(err.contains(says), "{text}: {err}");
        assert!(!err.contains("untagged"), "{text}: {err}");
    }
    assert_eq!(
        parse_file("workers = 7").unwrap().workers,
        Some(Workers::Count(7))
    );
    assert_eq!(
        parse_file("socket-mode = \"0640\"").unwrap().socket_mode,
        Some(SocketMode(0o640))
    );
}

#[test]
fn command_line_only_options_are_not_keys() {
    for key in [
        "foreground = true",
        "config = \"x\"",
        "check = true",
        "inetd = true",
    ] {
        assert!(
            parse_file(key).is_err(),
            "{key} should be refused in a file"
        );
    }
}

#[test]
fn flags_win_over_the_file() {
    let file = parse_file("listen = [\"127.0.0.1:1\"]\nworkers = 9\nidle-timeout = 5").unwrap();
    let c = resolve(cli(&["-l", "127.0.0.1:2", "-w", "3"]).over(file)).unwrap();
    assert_eq!(c.listen, vec!["127.0.0.1:2".parse::<ListenAddr>().unwrap()]);
    assert_eq!(c.workers, 3);
    assert_eq!(c.idle_timeout, Some(Duration::from_secs(5)));
}

#[test]
fn contradictions_are_errors() {
    assert!(resolve(cli(&["--min-spare", "5", "--max-spare", "4"])).is_err());
    assert!(resolve(cli(&["-w", "10", "--max-workers", "5"])).is_err());
    assert!(resolve(cli(&["-w", "0"])).is_err());
    assert!(resolve(cli(&["--max-children", "0"])).is_err());
    assert!(resolve(cli(&["-l", "127.0.0.1:1", "-l", "127.0.0.1:1"])).is_err());
    assert!(resolve(cli(&["-l", "127.0.0.1:0", "-l", "127.0.0.1:0"])).is_ok());
    // Raising workers alone lifts the default ceiling with it.
    assert_eq!(resolve(cli(&["-w", "300"])).unwrap().max_workers, 300);
    assert!(resolve(cli(&["--max-workers", "4097"])).is_err());
}

#[test]
fn values_above_their_ceiling_are_errors_naming_the_key() {
    let over = (ceiling::SECONDS + 1).to_string();
    for key in ["--idle-timeout", "--max-session", "--shutdown-timeout"] {
        let err = resolve(cli(&[key, &over])).unwrap_err();
        assert!(err.contains(&key[2..]) && err.contains("30 days"), "{err}");
        assert!(resolve(cli(&[key, &ceiling::SECONDS.to_string()])).is_ok());
    }
    let err = resolve(cli(&["--max-bytes", &u64::MAX.to_string()])).unwrap_err();
    assert!(err.contains("max-bytes"), "{err}");
    assert!(resolve(cli(&["--max-children", "65537"])).is_err());
    assert!(resolve(cli(&["--max-spare", "5000"])).is_err());
    let err = resolve(cli(&["--udp-workers", "0"])).unwrap_err();
    assert!(err.contains("udp-workers"), "{err}");
    assert!(resolve(cli(&["--udp-workers", "257"])).is_err());
    assert!(resolve(cli(&["--udp-rate", "0"])).is_ok(), "0 = no limit");
    let err = resolve(cli(&["--udp-rate", "10000001"])).unwrap_err();
    assert!(err.contains("udp-rate"), "{err}");
    let err = parse_file("shutdown-timeout = 9223372036854775807")
        .and_then(|o| resolve(cli(&[]).over(o)))
        .unwrap_err();
    assert!(err.contains("shutdown-timeout"), "{err}");
}

#[test]
fn contradictions_and_empty_values_are_errors() {
    let err = resolve(cli(&["--min-spare", "300", "--max-spare", "300"])).unwrap_err();
    assert!(err.contains("max-workers"), "{err}");
    let err = resolve(cli(&["-l", "*:7007", "-l", "[::]:7007"])).unwrap_err();
    assert!(err.contains("overlap"), "{err}");
    // clap refuses an empty path on the command line; a file may not.
    for key in ["pidfile", "chroot", "syslog-socket"] {
        let o = parse_file(&format!("{key} = \"\"")).unwrap();
        let err = resolve(cli(&[]).over(o)).unwrap_err();
        assert!(err.contains(key) && err.contains("empty"), "{err}");
    }
    let err = parse_file("listen = []").unwrap_err();
    assert!(err.contains("line 1") && err.contains("listen"), "{err}");
    let long = format!("unix:/{}", "d".repeat(120));
    let err = load(cli(&["-l", &long]), Path::new("/")).unwrap_err();
    assert!(err.usage && err.message.contains("bytes"), "{err}");
    // A relative path is measured once it is absolute.
    let short = "unix:s".to_string();
    let deep = Path::new("/").join("d".repeat(110));
    assert!(load(cli(&["-l", &short]), &deep).is_err());
}

#[test]
fn socket_mode_is_octal_and_a_string_in_the_file() {
    assert_eq!(resolve(cli(&[])).unwrap().socket_mode, 0o666);
    let c = resolve(cli(&["--socket-mode", "0660"])).unwrap();
    assert_eq!(c.socket_mode, 0o660);
    assert_eq!("600".parse::<SocketMode>(), Ok(SocketMode(0o600)));
    for bad in ["", "0800", "1777", "rw", "07777"] {
        assert!(bad.parse::<SocketMode>().is_err(), "{bad}");
    }
    let o = parse_file("socket-mode = \"0640\"").unwrap();
    assert_eq!(o.socket_mode, Some(SocketMode(0o640)));
    let err = parse_file("socket-mode = 640").unwrap_err();
    assert!(err.contains("string"), "{err}");
}

#[test]
fn config_files_must_be_small_regular_files() {
    let err = read_file(Path::new("/dev/zero")).unwrap_err();
    assert!(err.contains("not a regular file"), "{err}");
    let dir = std::env::temp_dir().join(format!("echo-forkd-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Opening a FIFO for reading would wait for a writer: it must not.
    let err = read_file(&fifo).unwrap_err();
    assert!(err.contains("not a regular file"), "{err}");
    let big = dir.join("big.conf");
    std::fs::write(&big, vec![b'#'; ceiling::CONFIG_BYTES as usize + 1]).unwrap();
    let err = read_file(&big).unwrap_err();
    assert!(err.contains("bytes"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Nothing `-t` accepts may panic at run time: random settings over the
/// whole option space, the edges included; every one that resolves is
/// run through the computations the daemon makes with it.
#[test]
fn nothing_that_resolves_overflows_at_run_time() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // The edges of every ceiling and type, and values of every size.
    let edges = [
        0,
        1,
        2,
        59,
        4095,
        4096,
        4097,
        65_536,
        ceiling::SECONDS,
        ceiling::SECONDS + 1,
        i32::MAX as u64,
        u32::MAX as u64,
        u32::MAX as u64 + 1,
        i64::MAX as u64,
        u64::MAX,
    ];
    let flags = [
        "--workers",
        "--max-workers",
        "--min-spare",
        "--max-spare",
        "--max-children",
        "--max-requests",
        "--max-requests-jitter",
        "--max-per-ip",
        "--max-conn-rate",
        "--udp-workers",
        "--udp-rate",
        "--idle-timeout",
        "--max-session",
        "--max-bytes",
        "--shutdown-timeout",
        "--backlog",
    ];
    let mut accepted = 0;
    for _ in 0..20_000 {
        // As -t takes them: a command line, each flag given a third of the
        // time (so that most draws resolve).
        let mut args = vec!["echo-forkd".to_string(), "-f".to_string()];
        for flag in flags {
            let r = next();
            if r % 3 == 0 {
                let value = match (r >> 2) % 3 {
                    0 => edges[(r >> 3) as usize % edges.len()],
                    1 => r >> (r % 64),
                    _ => r % 10_000,
                };
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        let Ok(o) = Options::try_parse_from(&args) else {
            continue;
        };
        let Ok(c) = resolve(o) else { continue };
        accepted += 1;
        let now = std::time::Instant::now();
        let _ = crate::time::after(now, c.shutdown_timeout);
        let limits = c.limits();
        let later = limits.next_deadline(now, now);
        let _ = limits.expired(now, now, now);
        let _ = crate::time::poll_timeout(later.map(|t| t - now));
        let _ = limits.room(65_536, c.max_bytes.saturating_sub(1));
        let mut s = next() | 1;
        let _ = crate::pool::max_requests(c.max_requests, c.max_requests_jitter, &mut s);
        let b = crate::pool::Bounds {
            workers: c.workers,
            max_workers: c.max_workers,
            min_spare: c.min_spare,
            max_spare: c.max_spare,
        };
        let mut pool = crate::pool::Pool::default();
        for (idle, total) in [(0, 0), (0, c.max_workers), (c.max_spare, c.workers)] {
            let d = crate::pool::Demand {
                queued: Some(next() as u32),
                relayed: next() as u32,
                busy_for: Duration::MAX,
            };
            let _ = pool.decide(now, (idle, total), total, d, b);
            let d = crate::pool::Demand {
                queued: None,
                relayed: 0,
                busy_for: Duration::ZERO,
            };
            let _ = pool.decide(now, (0, idle), total, d, b);
        }
        let _ = c.bind_options(None);
    }
    assert!(accepted > 1000, "only {accepted} settings resolved");
}

#[test]
fn access_rules_are_parsed_with_the_rest() {
    let c = resolve(cli(&["--allow", "10.0.0.0/8", "--deny", "10.1.0.0/16"])).unwrap();
    assert!(!c.rules.is_empty());
    let err = resolve(cli(&["--deny", "10.0.0.1/8"])).unwrap_err();
    assert!(err.contains("10.0.0.1/8"), "{err}");
}

#[test]
fn relative_paths_are_taken_from_the_start_directory() {
    let o = cli(&[
        "-l",
        "unix:run/echo.sock",
        "-l",
        "unix:/abs.sock",
        "-p",
        "echo.pid",
        "--chroot",
        "/var/empty",
    ]);
    let c = resolve(o).unwrap().anchored(Path::new("/srv/echo"));
    assert_eq!(c.pidfile.as_deref(), Some(Path::new("/srv/echo/echo.pid")));
    assert_eq!(c.chroot.as_deref(), Some(Path::new("/var/empty")));
    assert_eq!(
        c.listen,
        [
            ListenAddr::Unix("/srv/echo/run/echo.sock".into()),
            ListenAddr::Unix("/abs.sock".into())
        ]
    );
    assert_eq!(c.syslog_socket, Path::new("/dev/log"));
}

#[test]
fn workers_auto_is_at_least_one() {
    assert!(resolve(cli(&["-w", "auto"])).unwrap().workers >= 1);
    assert!("many".parse::<Workers>().is_err());
}

#[test]
fn udp_addresses_are_apart_from_tcp() {
    let c = resolve(cli(&["-l", "udp:127.0.0.1:7007", "-l", "127.0.0.1:7007"])).unwrap();
    let udp = |a: &ListenAddr| matches!(a, ListenAddr::Udp(_));
    assert!(udp(&c.listen[0]) && !udp(&c.listen[1]));
    assert_eq!(c.listen[0].to_string(), "udp:127.0.0.1:7007");
    for ok in ["udp:[::1]:7", "udp:*:0", "udp:[::]:7"] {
        let a: ListenAddr = ok.parse().unwrap();
        assert!(udp(&a), "{ok}");
    }
    assert!("udp:*:0".parse::<ListenAddr>().unwrap().is_ephemeral());
    for bad in ["udp:unix:/x", "udp:", "udp:127.0.0.1", "udp:udp:*:7"] {
        let err = bad.parse::<ListenAddr>().unwrap_err();
        assert!(err.contains(bad), "{bad}: {err}");
    }
    let err = resolve(cli(&["-l", "udp:*:7007", "-l", "udp:127.0.0.1:7007"])).unwrap_err();
    assert!(err.contains("overlap"), "{err}");
}

#[test]
fn io_engine_is_auto_unless_asked_and_a_flag_wins_over_the_file() {
    use crate::engine::Choice;
    let c = resolve(cli(&[])).unwrap();
    assert_eq!((c.io_engine, c.engine.clone()), (Choice::Auto, None));
    let file = parse_file("io-engine = \"epoll\"").unwrap();
    assert_eq!(file.io_engine, Some(Choice::Epoll));
    let c = resolve(cli(&[]).over(file.clone())).unwrap();
    assert_eq!(c.io_engine, Choice::Epoll);
    let c = resolve(cli(&["--io-engine", "uring"]).over(file)).unwrap();
    assert_eq!(c.io_engine, Choice::Uring);
    let err = parse_file("io-engine = \"aio\"").unwrap_err();
    assert!(err.contains("io-engine") || err.contains("line 1"), "{err}");
    assert!(err.contains("uring") && err.contains("epoll"), "{err}");
    assert!(Options::try_parse_from(["echo-forkd", "--io-engine", "aio"]).is_err());
}

#[test]
#[cfg(any(target_os = "linux", target_os = "android"))]
fn the_engine_is_probed_in_event_mode_only_and_epoll_never_probes() {
    use crate::engine::{Choice, Engine};
    let root = crate::engine::Workers {
        as_master: true,
        gid: None,
    };
    let prefork = with_engine(resolve(cli(&["--io-engine", "uring"])).unwrap(), root).unwrap();
    assert_eq!(prefork.engine, None, "no probe outside event mode");
    let event = resolve(cli(&["-m", "event", "--io-engine", "epoll"])).unwrap();
    let event = with_engine(event, root).unwrap();
    let e = event.engine.expect("event mode has an engine");
    assert_eq!(
        (e.engine, e.why.as_str()),
        (Engine::Epoll, "(io-engine epoll)")
    );
    assert_eq!(event.io_engine, Choice::Epoll);
    // auto always resolves, to one engine or the other, saying why if
    // it is not io_uring.
    let auto = with_engine(resolve(cli(&["-m", "event"])).unwrap(), root).unwrap();
    let e = auto.engine.expect("event mode has an engine");
    assert!(e.engine == Engine::Uring || !e.why.is_empty(), "{e:?}");
}
