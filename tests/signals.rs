//! Signals to a running daemon: stopping (TERM, INT, QUIT), reloading
//! (HUP), resizing (TTIN, TTOU) and status (USR1).

use super::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

in_modes!(term_refuses_new_clients_at_once_and_lets_open_ones_finish: term; prefork, fork, event);

fn term(mode: &str) {
    let mut d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
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

in_modes!(int_with_no_clients_exits_promptly: int_when_idle; prefork, fork, event);

fn int_when_idle(mode: &str) {
    let mut d = Daemon::start(&["-l", "127.0.0.1:0", "-m", mode]);
    assert_eq!(echo_all(d.addr(), b"x"), b"x");
    d.signal(Signal::SIGINT);
    let st = d.wait_exit(DEADLINE).expect("no exit after INT");
    assert!(st.success());
}

in_modes!(ctrl_c_to_the_process_group_is_a_graceful_stop: ctrl_c; prefork, fork, event);

fn ctrl_c(mode: &str) {
    let mut d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
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

in_modes!(quit_stops_at_once_even_with_open_clients: quit; prefork, fork, event);

fn quit(mode: &str) {
    let mut d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
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
fn an_open_connection_is_handed_over_on_reload_and_its_worker_leaves_at_once() {
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
    // The old worker hands the connection to the new generation and
    // leaves while the client is still there.
    assert!(
        wait_until(DEADLINE, || !d.children().contains(&old)),
        "the old worker stayed with its client:\n{}",
        d.stderr_text()
    );
    assert_eq!(round_trip(&mut s, b"after").unwrap(), b"after");
    // One worker (min-spare 0 pins the pool): it serves the next client
    // once this one leaves.
    drop(s);
    assert_eq!(echo_all(d.addr(), b"new"), b"new");
    d.wait_children(1);
}

/// A reload that lowers max-workers below the conversations open: what
/// no worker is free to take is closed after the shutdown timeout, and
/// the log says what and why.
#[test]
fn handed_over_connections_no_worker_can_take_are_closed_and_logged() {
    let dir = TempDir::new("reload-overdue");
    let conf = dir.path("echo.toml");
    let text = |n: u32| {
        format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = {n}\nmax-workers = {n}\nmin-spare = 0\nshutdown-timeout = 1\n"
        )
    };
    write(&conf, &text(2));
    let d = Daemon::start(&["-c", conf.to_str().unwrap()]);
    d.wait_children(2);
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(d.addr())).collect();
    for s in &mut held {
        assert_eq!(round_trip(s, b"hold").unwrap(), b"hold");
    }
    write(&conf, &text(1));
    reload(&d, 1);
    let line = d.wait_line("no worker took one within", DEADLINE);
    assert!(line.is_some(), "{}", d.stderr_text());
    assert!(line.unwrap().contains("closed 1 connection"));
    // One goes on with the one worker there is; the other was closed.
    let mut answered = 0;
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        answered += usize::from(round_trip(s, b"still?").is_ok_and(|b| b == b"still?"));
    }
    assert_eq!(answered, 1);
}

#[test]
fn reloads_under_load_refuse_reset_and_cut_nothing() {
    let _heavy = heavy();
    const RELOADS: usize = 12;
    const CONNECTIONS: usize = 1200;
    let dir = TempDir::new("reload-load");
    let conf = dir.path("echo.toml");
    // Each reload changes something: pool size, timeouts, even the model.
    let settings = |i: usize| match i % 6 {
        0 => "workers = 2\n",
        1 => "workers = 3\nidle-timeout = 60\n",
        2 => "mode = \"fork\"\n",
        3 => "mode = \"event\"\nworkers = 2\n",
        4 => "mode = \"event\"\nworkers = 1\nmax-requests = 50\n",
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

/// A graceful stop says how to make it immediate, and a second signal
/// does (Ctrl-C twice in a terminal).
fn a_second_signal_makes_the_stop_immediate(sig: Signal, hint: &str) {
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
    let mut held = connect(d.addr());
    assert_eq!(round_trip(&mut held, b"hold").unwrap(), b"hold");
    d.signal(sig);
    let line = d.wait_line("stopping; open connections may continue for 60 s", DEADLINE);
    assert!(
        line.as_deref().is_some_and(|l| l.contains(hint)),
        "the stop does not say how to make it immediate: {line:?}"
    );
    d.signal(sig);
    let now = format!(
        "{} again: the stop is now immediate; killing 1 child",
        sig.as_str()
    );
    assert!(d.wait_line(&now, DEADLINE).is_some(), "{}", d.stderr_text());
    let status = d.wait_exit(DEADLINE).expect("it exits now, not in 60 s");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_second_term_makes_the_stop_immediate_and_says_so() {
    a_second_signal_makes_the_stop_immediate(
        Signal::SIGTERM,
        "(a second SIGTERM or SIGINT stops at once)",
    );
}

#[test]
fn a_second_ctrl_c_makes_the_stop_immediate_and_says_so() {
    a_second_signal_makes_the_stop_immediate(
        Signal::SIGINT,
        "(another Ctrl-C (SIGINT) stops at once)",
    );
}

#[test]
fn refusals_are_reported_in_words_that_agree_with_the_count() {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-w",
        "1",
        "--min-spare",
        "0",
        "--deny",
        "127.0.0.1/32",
    ]);
    let mut s = connect(d.addr());
    let mut b = [0u8; 1];
    assert!(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "denied, yet served"
    );
    assert!(
        d.wait_line(
            "refused 1 connection (allow/deny rules) since the last report; 1 in all",
            DEADLINE
        )
        .is_some(),
        "{}",
        d.stderr_text()
    );
}
