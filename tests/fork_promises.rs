//! What fork mode promises, pinned so that a faster path (issue 35: a
//! lean child, descriptors closed by ranges, reaping batched) cannot
//! quietly drop it. Each daemon here runs without a service manager (no
//! `NOTIFY_SOCKET`, so no vault), on loopback.
//!
//! Already proven elsewhere, and not repeated here:
//!
//! - `--max-children` holds while clients hold their connections:
//!   `limits::a_flood_in_fork_mode_never_exceeds_max_children_nor_refuses`
//!   (500 held clients, at most 50 children) and
//!   `models::fork_mode_limit_queues_clients_instead_of_refusing_them`
//!   (the limit reached exactly, zombies counted);
//! - a busy child (one round trip done, waiting for more) dies with a
//!   SIGKILLed master: `supervision::master_sigkill::fork`; under systemd
//!   its connection goes on with the next master:
//!   `crash::the_master_dies_and_the_next_one_serves_every_conversation::fork`;
//! - SIGTERM to the master with one open connection:
//!   `signals::term_refuses_new_clients_at_once_and_lets_open_ones_finish::fork`;
//!   SIGINT to the whole group with one busy child:
//!   `signals::ctrl_c_to_the_process_group_is_a_graceful_stop::fork`;
//!   reloads into and out of fork mode under load:
//!   `signals::reloads_under_load_refuse_reset_and_cut_nothing`;
//! - the master's own descriptors after 2,000 connections, and no zombie
//!   then: `supervision::two_thousand_connections::fork`; children reaped
//!   while clients keep coming (3,000 connections, the limit never reached):
//!   `models::fork_master_reaps_while_clients_keep_coming`.
//!
//! Added here: the limit under a burst of short connections, where it is
//! reaping that frees places, and no child nor zombie after 10,000 of them;
//! each child's descriptors counted; the master's, which never include a
//! client's connection, through a burst; a child killed with its master before
//! its first read, while it echoes, and at every stage of a burst; SIGHUP
//! and SIGTERM (to the master, and to the whole group as systemd sends it)
//! during a burst: the master acts, and no child ends or cuts anything; a
//! chatty client's child, which waits in `read` rather than `poll`, still
//! hears a stop, dies with its master and keeps the idle limit.

use super::*;
use nix::sys::signal::{kill, killpg};
use nix::unistd::Pid;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// `echo-forkd -f -m fork ARGS`, ready, without a service manager whatever
/// the environment the tests run in: no `NOTIFY_SOCKET` (so no vault, and
/// a child whose master dies must end its connection), no socket
/// activation.
fn fork_mode(args: &[&str]) -> Daemon {
    let mut all = vec!["-m", "fork"];
    all.extend_from_slice(args);
    let d = Daemon::spawn_with(&all, |c| {
        for v in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ] {
            c.env_remove(v);
        }
    });
    assert!(
        d.wait_line("ready", DEADLINE).is_some(),
        "echo-forkd {all:?} did not become ready:\n{}",
        d.stderr_text()
    );
    d
}

/// Whether a read error is the connection ending (reset, broken), not a
/// wait that ran out.
fn is_an_end(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    !matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

/// Asserts that every one of `silent` (clients that never sent a byte)
/// was disconnected: a read sees the end, neither a byte nor a wait that
/// runs out.
fn assert_disconnected(silent: &mut [TcpStream]) {
    for (k, s) in silent.iter_mut().enumerate() {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut b = [0u8; 1];
        let end = match s.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(_) => Err("a byte it never sent".to_string()),
            Err(e) if is_an_end(&e) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        assert!(
            end.is_ok(),
            "silent client {k} was not disconnected: {end:?}"
        );
    }
}

/// How one conversation of a burst went.
#[derive(Debug)]
enum Went {
    /// Every byte came back, then the server's end after our half-close.
    Echoed,
    /// Nothing came back: refused, or reset while it waited in the
    /// backlog (a listener that closes resets what it did not accept).
    Unserved,
    /// Served, then ended early or stuck: how.
    Cut(String),
    /// Bytes came back that were not sent.
    Wrong(String),
}

/// A conversation: 1 to 4 round trips of 1 to 4,096 bytes, a half-close,
/// the server's end.
fn converse(addr: SocketAddr, rng: &mut Stream) -> Went {
    use std::io::ErrorKind::{BrokenPipe, ConnectionRefused, ConnectionReset};
    let mut s = match TcpStream::connect_timeout(&addr, DEADLINE) {
        Ok(s) => s,
        // A non-blocking connect learns its fate later: a connection
        // completed into the backlog and reset there when the listener
        // closed reports the reset as the connect's own error.
        Err(e) if matches!(e.kind(), ConnectionRefused | ConnectionReset) => return Went::Unserved,
        Err(e) => return Went::Cut(format!("connect: {e}")),
    };
    let _ = s.set_read_timeout(Some(DEADLINE));
    let _ = s.set_write_timeout(Some(DEADLINE));
    let mut served = false;
    let failed = |served: bool, what: String, e: Option<std::io::Error>| {
        let reset = e
            .as_ref()
            .is_none_or(|e| matches!(e.kind(), ConnectionReset | BrokenPipe));
        if !served && reset {
            Went::Unserved
        } else {
            Went::Cut(format!("{what}: {e:?}"))
        }
    };
    let mut word = [0u8; 4];
    rng.fill(&mut word);
    for round in 0..1 + word[0] % 4 {
        let len = 1 + usize::from(u16::from_le_bytes([word[1], word[2]]) % 4096);
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        if let Err(e) = s.write_all(&data) {
            return failed(served, format!("round {round}: write"), Some(e));
        }
        let mut back = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match s.read(&mut back[got..]) {
                Ok(0) => return failed(served, format!("round {round}: early end"), None),
                Ok(n) => {
                    if back[got..got + n] != data[got..got + n] {
                        return Went::Wrong(format!("round {round}: wrong bytes at {got}"));
                    }
                    got += n;
                    served = true;
                }
                Err(e) => return failed(served, format!("round {round}: read"), Some(e)),
            }
        }
        rng.fill(&mut word);
    }
    if let Err(e) = s.shutdown(Shutdown::Write) {
        return Went::Cut(format!("half-close: {e}"));
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Went::Echoed,
        Ok(_) => Went::Wrong(format!("{} bytes after the end", rest.len())),
        Err(e) => Went::Cut(format!("the end: {e}")),
    }
}

/// What the client threads of a burst saw.
#[derive(Debug, Default)]
struct Seen {
    echoed: usize,
    /// When each unserved conversation ended (its thread stopped there:
    /// the listener is gone, or something is wrong).
    unserved: Vec<Instant>,
    cut: Vec<String>,
    wrong: Vec<String>,
}

/// Client threads holding conversations back to back until told to stop,
/// or until one of theirs is not served.
struct Burst {
    stop: Arc<AtomicBool>,
    echoed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Seen>>,
    threads: Vec<JoinHandle<()>>,
}

impl Burst {
    fn start(addr: SocketAddr, n: u64) -> Burst {
        let stop = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let threads = (0..n)
            .map(|k| {
                let (stop, echoed, seen) = (stop.clone(), echoed.clone(), seen.clone());
                std::thread::spawn(move || {
                    let mut rng = Stream::new(0x5eed_0000 + k);
                    while !stop.load(Ordering::SeqCst) {
                        let went = converse(addr, &mut rng);
                        let mut seen = seen.lock().unwrap();
                        match went {
                            Went::Echoed => {
                                seen.echoed += 1;
                                echoed.fetch_add(1, Ordering::SeqCst);
                            }
                            Went::Unserved => {
                                seen.unserved.push(Instant::now());
                                return;
                            }
                            Went::Cut(how) => seen.cut.push(how),
                            Went::Wrong(how) => seen.wrong.push(how),
                        }
                    }
                })
            })
            .collect();
        Burst {
            stop,
            echoed,
            seen,
            threads,
        }
    }

    fn echoed(&self) -> usize {
        self.echoed.load(Ordering::SeqCst)
    }

    /// Waits until `n` conversations in all were echoed.
    fn wait_echoed(&self, n: usize) -> bool {
        wait_until(DEADLINE, || self.echoed() >= n)
    }

    /// Stops the threads (or waits for those that stopped on their own)
    /// and says what they saw.
    fn stop(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("a client thread of the burst");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// Conversations opened before a signal and held across it: numbered
/// round trips on each, then a half-close.
struct Held {
    talks: Vec<TcpStream>,
    round: u64,
}

impl Held {
    /// `n` conversations, each with one round trip done (so each has its
    /// child).
    fn open(addr: SocketAddr, n: usize) -> Held {
        let mut held = Held {
            talks: (0..n).map(|_| connect(addr)).collect(),
            round: 0,
        };
        held.go_on()
            .expect("the held conversations' first round trip");
        held
    }

    /// One more round trip on each; what went wrong, if anything.
    fn go_on(&mut self) -> Result<(), String> {
        self.round += 1;
        for (k, s) in self.talks.iter_mut().enumerate() {
            let msg = format!("held {k}, round {}", self.round).repeat(50);
            match round_trip(s, msg.as_bytes()) {
                Ok(back) if back == msg.as_bytes() => {}
                Ok(_) => return Err(format!("held {k}: wrong bytes")),
                Err(e) => return Err(format!("held {k}, round {}: {e}", self.round)),
            }
        }
        Ok(())
    }

    /// The server's socket of each.
    fn inodes(&self) -> Vec<u64> {
        self.talks
            .iter()
            .map(|s| Ends::of(s).server_socket().expect("a held connection"))
            .collect()
    }

    /// A half-close on each, then the server's end, and nothing after.
    fn finish(self) -> Result<(), String> {
        for (k, mut s) in self.talks.into_iter().enumerate() {
            s.shutdown(Shutdown::Write)
                .map_err(|e| format!("held {k}: {e}"))?;
            let mut rest = Vec::new();
            match s.read_to_end(&mut rest) {
                Ok(_) if rest.is_empty() => {}
                Ok(_) => return Err(format!("held {k}: bytes after the end")),
                Err(e) => return Err(format!("held {k}: the end: {e}")),
            }
        }
        Ok(())
    }
}

/// The lines of `d`'s log that contain `pat` and were not written by the
/// master.
fn not_by_the_master(d: &Daemon, pat: &str) -> Vec<String> {
    d.stderr_text()
        .lines()
        .filter(|l| l.contains(pat) && writer(l) != Some(d.pid))
        .map(str::to_string)
        .collect()
}

/// The debug lines of connections that ended other than by their client
/// closing (each child says how its connection ended).
fn not_ended_by_the_client(d: &Daemon) -> Vec<String> {
    d.stderr_text()
        .lines()
        .filter(|l| {
            l.contains("connection from")
                && l.contains("ended by")
                && !l.contains("ended by the client")
        })
        .map(str::to_string)
        .collect()
}

/// The inode of the socket listening on `addr`, from /proc/net/tcp.
fn listening_socket(addr: SocketAddr) -> Option<u64> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .skip(1)
        .find_map(|line| {
            // sl local_address rem_address st ... inode
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A"))
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
}

/// A process's descriptors: (number, what it points to).
fn descriptors(pid: i32) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_str()?.parse().ok()?;
                    let link = std::fs::read_link(e.path()).ok()?;
                    Some((n, link.to_string_lossy().into_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `clients` threads each make `each` connections to `addr` one after
/// another: a numbered message, half-close, all of it back. What failed.
fn short_connections(addr: SocketAddr, clients: u32, each: u32) -> Vec<String> {
    let threads: Vec<JoinHandle<Result<(), String>>> = (0..clients)
        .map(|t| {
            std::thread::spawn(move || {
                for i in 0..each {
                    let msg = [t.to_be_bytes(), i.to_be_bytes()].concat();
                    let mut s = TcpStream::connect_timeout(&addr, DEADLINE)
                        .map_err(|e| format!("client {t}, connection {i}: connect: {e}"))?;
                    s.set_read_timeout(Some(DEADLINE)).unwrap();
                    s.write_all(&msg)
                        .and_then(|()| s.shutdown(Shutdown::Write))
                        .map_err(|e| format!("client {t}, connection {i}: write: {e}"))?;
                    let mut back = Vec::new();
                    s.read_to_end(&mut back)
                        .map_err(|e| format!("client {t}, connection {i}: read: {e}"))?;
                    if back != msg {
                        return Err(format!("client {t}, connection {i}: {back:?}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    threads
        .into_iter()
        .filter_map(|c| c.join().expect("a client thread").err())
        .collect()
}

/// The number in "limit reached N time(s)" of a fork-mode status line.
fn limit_reached(status: &str) -> Option<u64> {
    status
        .split("limit reached ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn ten_thousand_short_connections_stay_within_max_children_and_leave_no_zombie() {
    const CLIENTS: u32 = 16;
    const EACH: u32 = 625;
    const MAX: usize = 4;
    let _heavy = heavy();
    let d = fork_mode(&["-l", "127.0.0.1:0", "--max-children", "4"]);
    let addr = d.addr();
    // Every child the kernel lists, zombies included: each holds a place
    // until the master reaps it.
    let done = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (done, most, pid) = (done.clone(), most.clone(), d.pid);
        std::thread::spawn(move || {
            let list = format!("/proc/{pid}/task/{pid}/children");
            while !done.load(Ordering::SeqCst) {
                if let Ok(text) = std::fs::read_to_string(&list) {
                    most.fetch_max(text.split_whitespace().count(), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let start = Instant::now();
    // More clients than places: the limit is reached, over and over, and
    // only the reaping of a child lets the next client in.
    let failed = short_connections(addr, CLIENTS, EACH);
    let took = start.elapsed();
    // Nothing comes any more to wake the master: it must reap the last
    // children on their SIGCHLD alone.
    let last = Instant::now();
    let reaped = wait_until(DEADLINE, || d.all_children().is_empty());
    let reaping = last.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let most = most.load(Ordering::SeqCst);
    println!(
        "10,000 connections in {took:?}; at most {most} children; the last reaped {reaping:?} after the last client"
    );
    assert!(failed.is_empty(), "{failed:?}\n{}", d.stderr_text());
    assert!(
        reaped,
        "children left {DEADLINE:?} after 10,000 connections ended: {:?}, zombies {:?}",
        d.all_children(),
        d.zombies()
    );
    assert!(
        most <= MAX,
        "{most} children at once (zombies included) with --max-children {MAX}"
    );
    // The master counts them as the kernel does: none left, every one seen.
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status: ", DEADLINE).expect("no status line");
    assert!(
        status.contains(&format!("children 0 of at most {MAX}, connections 10000,")),
        "{status}"
    );
    // The burst pressed on the limit, or the bound above proves nothing.
    assert!(
        limit_reached(&status).is_some_and(|n| n > 0),
        "the limit was never reached: {status}"
    );
}

/// With three children each serving a connection, each child holds that
/// connection's socket and no other: not a listener (TCP or unix), not
/// another child's connection, not the master's own sockets (its signal
/// pipe, the relay). In all it holds at most 5 descriptors: 0, 1 and 2
/// (it logs to stderr), its connection, and the read end of the control
/// pipe (how it learns that the master stops, or died: the pipe ends).
/// Anything more is something of the master's it kept.
#[test]
fn each_child_holds_its_own_connection_and_nothing_else_of_the_masters() {
    const MOST: usize = 5;
    let dir = TempDir::new("fork-fds");
    let unix = format!("unix:{}", dir.path("echo.sock").display());
    let d = fork_mode(&["-l", "127.0.0.1:0", "-l", &unix, "-l", "127.0.0.1:0"]);
    assert!(d.wait_lines("listening on ", 3, DEADLINE).is_some());
    let addrs: Vec<SocketAddr> = d
        .listening()
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    assert_eq!(addrs.len(), 2, "{}", d.stderr_text());
    // Three clients at once, on both TCP listeners, before any is served.
    let mut clients: Vec<TcpStream> = [0, 1, 0].iter().map(|&i| connect(addrs[i])).collect();
    for (k, s) in clients.iter_mut().enumerate() {
        let msg = format!("client {k}");
        assert_eq!(round_trip(s, msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    let kids = d.wait_children(3);
    let conns: Vec<u64> = clients
        .iter()
        .map(|s| Ends::of(s).server_socket().expect("a served connection"))
        .collect();
    let listeners: Vec<u64> = addrs
        .iter()
        .map(|&a| listening_socket(a).unwrap_or_else(|| panic!("no listener on {a}")))
        .collect();
    let master = sockets_of(d.pid);
    // The listeners as /proc/net/tcp names them are the master's: a check
    // that children do not hold them is not a check of nothing.
    for l in &listeners {
        assert!(
            master.contains(l),
            "the master does not hold listener {l}: {master:?}"
        );
    }
    // Each connection is held by one process, a child, each by another.
    let holders = d.holders(&conns);
    for (k, h) in holders.iter().enumerate() {
        assert!(
            h.len() == 1 && kids.contains(&h[0]),
            "connection {k} is held by {h:?} (children {kids:?}, master {})",
            d.pid
        );
    }
    let mut by: Vec<i32> = holders.iter().map(|h| h[0]).collect();
    by.sort();
    by.dedup();
    assert_eq!(by.len(), 3, "one child holds two connections: {holders:?}");
    for &kid in &kids {
        let fds = descriptors(kid);
        let socks = sockets_of(kid);
        println!("child {kid}: {fds:?}");
        for l in &listeners {
            assert!(
                !socks.contains(l),
                "child {kid} holds listener {l}: {fds:?}"
            );
        }
        assert!(
            socks.len() == 1 && conns.contains(&socks[0]),
            "child {kid} holds sockets {socks:?}, not just its connection (one of {conns:?}): {fds:?}"
        );
        assert!(
            socks.iter().all(|s| !master.contains(s)),
            "child {kid} holds a socket of the master's ({master:?}): {fds:?}"
        );
        assert!(
            fds.len() <= MOST,
            "child {kid} holds {} descriptors, more than {MOST}: {fds:?}",
            fds.len()
        );
    }
}

/// The master never holds a client's connection, not even between an
/// accept and the fork that follows (a master killed there would take the
/// connection with it, where under systemd its children and their
/// connections outlive it): a child forked for each waiting connection
/// accepts it. Sampled through a burst of short connections, the master's
/// sockets are the ones it had before.
#[test]
fn the_master_never_holds_a_clients_connection() {
    const CLIENTS: u32 = 8;
    const EACH: u32 = 250;
    let _heavy = heavy();
    let d = fork_mode(&["-l", "127.0.0.1:0", "--max-children", "64"]);
    let addr = d.addr();
    let before = {
        let mut s = sockets_of(d.pid);
        s.sort();
        s
    };
    assert!(!before.is_empty(), "the master holds no socket at all");
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, pid, before) = (done.clone(), d.pid, before.clone());
        std::thread::spawn(move || {
            let (mut samples, mut extra) = (0u32, Vec::new());
            while !done.load(Ordering::SeqCst) {
                let mut now = sockets_of(pid);
                now.sort();
                samples += 1;
                if now != before && extra.len() < 10 {
                    extra.push(now);
                }
            }
            (samples, extra)
        })
    };
    let failed = short_connections(addr, CLIENTS, EACH);
    done.store(true, Ordering::SeqCst);
    let (samples, extra) = sampler.join().expect("the sampler");
    println!("{samples} samples of the master's sockets through 2,000 connections");
    assert!(failed.is_empty(), "{failed:?}\n{}", d.stderr_text());
    assert!(
        samples >= 50,
        "only {samples} samples: the burst proves nothing"
    );
    assert!(
        extra.is_empty(),
        "the master held more sockets than its own {before:?}: {extra:?}"
    );
}

/// Waits, at most 3 s, until every one of `pids` is gone (or a zombie).
fn all_dead(pids: &[i32]) -> bool {
    wait_until(Duration::from_secs(3), || pids.iter().all(|&p| is_dead(p)))
}

/// Whether a connection to `addr` is refused: no process holds its
/// listener any more.
fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect_timeout(&addr, DEADLINE),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[test]
fn children_exit_when_the_master_is_sigkilled_before_their_first_read() {
    // The idle timeout (300 s by default) is far off: only the master's
    // death can end these.
    let d = fork_mode(&["-l", "127.0.0.1:0"]);
    let addr = d.addr();
    // Clients that never send: their children wait for a first byte.
    let mut silent: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    assert!(
        wait_until(DEADLINE, || d.children().len() == 3),
        "{:?}",
        d.children()
    );
    // Killed as soon as they exist.
    let kids = d.children();
    d.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let gone = all_dead(&kids);
    println!("children gone {:?} after the master", killed.elapsed());
    assert!(
        gone,
        "children outlived their master: {:?}",
        kids.iter().filter(|&&p| !is_dead(p)).collect::<Vec<_>>()
    );
    assert_disconnected(&mut silent);
    assert!(refused(addr), "something still holds the listener");
}

/// A client streaming bytes and checking what comes back, on two threads.
struct Streaming {
    back: Arc<AtomicUsize>,
    reader: JoinHandle<Result<(), String>>,
    writer: JoinHandle<()>,
}

impl Streaming {
    fn start(addr: SocketAddr, seed: u64, stop: &Arc<AtomicBool>) -> Streaming {
        let s = connect(addr);
        let mut r = s.try_clone().unwrap();
        let back = Arc::new(AtomicUsize::new(0));
        let writer = {
            let (mut s, stop) = (s, stop.clone());
            std::thread::spawn(move || {
                let mut out = Stream::new(seed);
                let mut chunk = vec![0u8; 16 * 1024];
                while !stop.load(Ordering::SeqCst) {
                    out.fill(&mut chunk);
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
            })
        };
        let reader = {
            let back = back.clone();
            std::thread::spawn(move || {
                let mut want = Stream::new(seed);
                let (mut buf, mut expected) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            want.fill(&mut expected[..n]);
                            if buf[..n] != expected[..n] {
                                return Err(format!(
                                    "wrong bytes after {}",
                                    back.load(Ordering::SeqCst)
                                ));
                            }
                            back.fetch_add(n, Ordering::SeqCst);
                        }
                        Err(e) if is_an_end(&e) => return Ok(()),
                        Err(e) => return Err(format!("still open: {e}")),
                    }
                }
            })
        };
        Streaming {
            back,
            reader,
            writer,
        }
    }

    fn echoed(&self) -> usize {
        self.back.load(Ordering::SeqCst)
    }
}

#[test]
fn children_exit_when_the_master_is_sigkilled_while_they_echo() {
    let d = fork_mode(&["-l", "127.0.0.1:0"]);
    let addr = d.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let streams: Vec<Streaming> = (0..3)
        .map(|k| Streaming::start(addr, 77 + k, &stop))
        .collect();
    // Each child is echoing: bytes flow both ways without a pause.
    assert!(
        wait_until(DEADLINE, || streams
            .iter()
            .all(|s| s.echoed() >= 256 * 1024)),
        "not echoing: {:?}",
        streams.iter().map(Streaming::echoed).collect::<Vec<_>>()
    );
    let kids = d.children();
    assert_eq!(kids.len(), 3, "{kids:?}");
    d.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let gone = all_dead(&kids);
    println!("children gone {:?} after the master", killed.elapsed());
    assert!(
        gone,
        "children outlived their master: {:?}",
        kids.iter().filter(|&&p| !is_dead(p)).collect::<Vec<_>>()
    );
    stop.store(true, Ordering::SeqCst);
    for (k, s) in streams.into_iter().enumerate() {
        s.writer.join().unwrap();
        let end = s.reader.join().unwrap();
        assert!(end.is_ok(), "stream {k}: {end:?}");
    }
    assert!(refused(addr), "something still holds the listener");
}

#[test]
fn every_child_of_a_burst_exits_when_the_master_is_sigkilled() {
    let _heavy = heavy();
    let d = fork_mode(&["-l", "127.0.0.1:0"]);
    let addr = d.addr();
    let burst = Burst::start(addr, 8);
    // Beside it, clients that never send, one every 5 conversations: their
    // children wait for a first byte, and only the master's death can end
    // them (a child of the burst ends with its conversation anyway).
    let quiet = Arc::new(AtomicBool::new(false));
    let opener = {
        let (quiet, echoed) = (quiet.clone(), burst.echoed.clone());
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            while silent.len() < 100 {
                let next = echoed.load(Ordering::SeqCst) + 5;
                wait_until(DEADLINE, || {
                    quiet.load(Ordering::SeqCst) || echoed.load(Ordering::SeqCst) >= next
                });
                if quiet.load(Ordering::SeqCst) {
                    break;
                }
                match TcpStream::connect_timeout(&addr, DEADLINE) {
                    Ok(s) => silent.push(s),
                    Err(_) => break,
                }
            }
            silent
        })
    };
    assert!(burst.wait_echoed(200), "the burst stalled");
    // Stopped first, so that it forks no child between the list and the
    // kill; children just forked are still setting themselves up.
    let end = Instant::now() + DEADLINE;
    let kids = loop {
        d.signal(Signal::SIGSTOP);
        assert!(wait_until(DEADLINE, || proc_stat(d.pid).is_some_and(|(s, _)| s == 'T')));
        let kids = d.children();
        if !kids.is_empty() || Instant::now() > end {
            break kids;
        }
        d.signal(Signal::SIGCONT);
    };
    assert!(!kids.is_empty(), "no child alive during the burst");
    d.signal(Signal::SIGKILL);
    let gone = all_dead(&kids);
    assert!(
        gone,
        "children of the burst outlived their master: {:?} of {}",
        kids.iter().filter(|&&p| !is_dead(p)).collect::<Vec<_>>(),
        kids.len()
    );
    assert!(refused(addr), "something still holds the listener");
    quiet.store(true, Ordering::SeqCst);
    let mut silent = opener.join().unwrap();
    assert_disconnected(&mut silent);
    // The conversations the death cut ended; none was answered wrong.
    let seen = burst.stop();
    println!(
        "{} children killed with their master ({} silent clients); {} conversations echoed, {} cut",
        kids.len(),
        silent.len(),
        seen.echoed,
        seen.cut.len()
    );
    assert!(seen.wrong.is_empty(), "{:?}", seen.wrong);
}

#[test]
fn hups_during_a_burst_reload_the_master_and_cut_no_conversation() {
    let _heavy = heavy();
    let dir = TempDir::new("fork-hup");
    let conf = dir.path("echo.toml");
    let text =
        |n: usize| format!("listen = [\"127.0.0.1:0\"]\nmode = \"fork\"\nmax-children = {n}\n");
    std::fs::write(&conf, text(32)).unwrap();
    let d = fork_mode(&["-c", conf.to_str().unwrap(), "--log-level", "debug"]);
    let addr = d.addr();
    let mut held = Held::open(addr, 4);
    let children = d.holders(&held.inodes());
    let burst = Burst::start(addr, 8);
    assert!(burst.wait_echoed(200), "the burst stalled");
    for i in 1..=3 {
        std::fs::write(&conf, text(32 + i)).unwrap();
        let before = burst.echoed();
        d.signal(Signal::SIGHUP);
        assert!(
            d.wait_lines("reloaded:", i, DEADLINE).is_some(),
            "reload {i} did not complete:\n{}",
            d.stderr_text()
        );
        let went_on = held.go_on();
        assert!(went_on.is_ok(), "after reload {i}: {went_on:?}");
        // The burst goes on, served with the new settings.
        assert!(
            burst.wait_echoed(before + 100),
            "the burst stalled after reload {i}"
        );
    }
    let seen = burst.stop();
    // The held conversations stayed with the children that had them.
    assert_eq!(d.holders(&held.inodes()), children);
    let finished = held.finish();
    println!("3 reloads during a burst of {} conversations", seen.echoed);
    assert!(finished.is_ok(), "{finished:?}");
    assert!(
        seen.unserved.is_empty() && seen.cut.is_empty() && seen.wrong.is_empty(),
        "{} unserved, cut {:?}, wrong {:?}",
        seen.unserved.len(),
        seen.cut,
        seen.wrong
    );
    d.signal(Signal::SIGUSR1);
    let status = d.wait_line("status: ", DEADLINE).expect("no status line");
    assert!(status.contains("of at most 35,"), "{status}");
    let log = d.stderr_text();
    for pat in ["SIGHUP", "reload"] {
        let others = not_by_the_master(&d, pat);
        assert!(others.is_empty(), "{pat} in a child: {others:?}");
    }
    assert!(!log.contains("killed by signal"), "{log}");
    let cut = not_ended_by_the_client(&d);
    assert!(cut.is_empty(), "{cut:?}");
}

/// SIGTERM during a burst, to the master alone or to every process of the
/// daemon at once (systemd's stop with `KillMode=control-group`): the
/// master stops, conversations in flight finish, then it exits 0; no child
/// stops, is killed or cuts one.
fn term_during_a_burst(to_group: bool) {
    let _heavy = heavy();
    let mut d = fork_mode(&["-l", "127.0.0.1:0", "--log-level", "debug"]);
    let addr = d.addr();
    let mut held = Held::open(addr, 4);
    let burst = Burst::start(addr, 8);
    assert!(burst.wait_echoed(200), "the burst stalled");
    let kids = d.children();
    let sent = Instant::now();
    if to_group {
        killpg(Pid::from_raw(d.pid), Signal::SIGTERM).unwrap();
    } else {
        kill(Pid::from_raw(d.pid), Signal::SIGTERM).unwrap();
    }
    assert!(
        d.wait_line("SIGTERM: stopping", DEADLINE).is_some(),
        "{}",
        d.stderr_text()
    );
    let went_on = held.go_on();
    assert!(went_on.is_ok(), "after SIGTERM: {went_on:?}");
    let finished = held.finish();
    assert!(finished.is_ok(), "{finished:?}");
    // Each client thread ends at its first conversation not served: the
    // listener closed.
    let seen = burst.stop();
    let status = d.wait_exit(DEADLINE);
    println!(
        "SIGTERM to the {} during a burst: {} conversations echoed, {} not served after it",
        if to_group { "group" } else { "master" },
        seen.echoed,
        seen.unserved.len()
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        d.stderr_text()
    );
    assert!(
        seen.cut.is_empty() && seen.wrong.is_empty(),
        "cut {:?}, wrong {:?}",
        seen.cut,
        seen.wrong
    );
    assert!(
        seen.unserved.iter().all(|&t| t >= sent),
        "conversations unserved before the signal"
    );
    assert!(kids.iter().all(|&p| is_dead(p)), "children left behind");
    let log = d.stderr_text();
    let others = not_by_the_master(&d, "SIGTERM");
    assert!(others.is_empty(), "SIGTERM in a child: {others:?}");
    assert!(!log.contains("killed by signal"), "{log}");
    assert!(!log.contains("stop is now immediate"), "{log}");
    let cut = not_ended_by_the_client(&d);
    assert!(cut.is_empty(), "{cut:?}");
}

#[test]
fn term_to_the_master_during_a_burst_stops_it_and_cuts_no_conversation() {
    term_during_a_burst(false);
}

#[test]
fn term_to_every_process_during_a_burst_stops_the_master_alone() {
    term_during_a_burst(true);
}

/// The system call `pid` sleeps in (`/proc/PID/syscall`'s first field);
/// `None` while it runs, or if that cannot be read (no ptrace access).
fn sleeping_in(pid: i32) -> Option<i64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// A fork-mode child whose client has talked a while: it waits in `read`
/// (issue 35: no `poll` per round trip). Returns the connection, the
/// child, or `None` where the wait cannot be seen (printed).
fn chatty_child_in_read(d: &Daemon) -> Option<(TcpStream, i32)> {
    let mut c = connect(d.addr());
    for i in 0..4 {
        let msg = format!("message {i}\n");
        assert_eq!(round_trip(&mut c, msg.as_bytes()).unwrap(), msg.as_bytes());
    }
    let kid = *d.wait_children(1).first()?;
    let readable = std::fs::read_to_string(format!("/proc/{kid}/syscall")).is_ok();
    if cfg!(not(any(target_os = "linux", target_os = "android"))) || !readable {
        println!("skipped: /proc/{kid}/syscall cannot be read here");
        return None;
    }
    let read = libc::SYS_read;
    assert!(
        wait_until(DEADLINE, || sleeping_in(kid) == Some(read)),
        "a chatty child waits in system call {:?}, not read ({read})",
        sleeping_in(kid)
    );
    Some((c, kid))
}

#[test]
fn a_chatty_child_waiting_in_read_finishes_its_conversation_through_a_stop() {
    let mut d = fork_mode(&["-l", "127.0.0.1:0"]);
    let Some((mut c, kid)) = chatty_child_in_read(&d) else {
        return;
    };
    d.signal(Signal::SIGTERM);
    assert!(d.wait_line("stopping", DEADLINE).is_some());
    // Woken by its master's SIGTERM, it looked at the control pipe: it
    // waits in poll again (and so would see the master die).
    assert!(
        wait_until(DEADLINE, || sleeping_in(kid)
            .is_some_and(|n| n != libc::SYS_read)),
        "the child still waits in read after the stop"
    );
    // A stop lets open conversations finish.
    assert_eq!(
        round_trip(&mut c, b"after the stop\n").unwrap(),
        b"after the stop\n"
    );
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(wait_until(DEADLINE, || is_dead(kid)));
    let status = d.wait_exit(DEADLINE);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

#[test]
fn a_chatty_child_waiting_in_read_dies_with_its_master() {
    let d = fork_mode(&["-l", "127.0.0.1:0"]);
    let Some((c, kid)) = chatty_child_in_read(&d) else {
        return;
    };
    d.signal(Signal::SIGKILL);
    assert!(
        wait_until(DEADLINE, || is_dead(kid)),
        "a child blocked in read outlived its master"
    );
    assert_disconnected(&mut [c]);
}

#[test]
fn a_chatty_child_waiting_in_read_keeps_the_idle_limit() {
    let d = fork_mode(&["-l", "127.0.0.1:0", "--idle-timeout", "1"]);
    let Some((mut c, kid)) = chatty_child_in_read(&d) else {
        return;
    };
    // Its last move was the echo above; the kernel's receive timeout ends
    // the read a second later.
    let quiet = Instant::now();
    let mut b = [0u8; 1];
    let n = c.read(&mut b).expect("the end of the connection");
    assert_eq!(n, 0, "a byte it never sent");
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "ended after {waited:?}"
    );
    assert!(waited < DEADLINE, "ended after {waited:?}");
    assert!(wait_until(DEADLINE, || is_dead(kid)));
}
