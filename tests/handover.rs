//! Nothing drops a client, because connections are handed over: long
//! conversations and a connect loop across a reload, an upgrade, a
//! smaller pool and a worker's recycling, with prefork and event workers
//! (and into fork mode). A retiring worker hands each open connection to
//! a process that serves on; none is cut, refused or reset, however long
//! it has been open.
//!
//! Each test also proves that a connection moved: the server's socket of
//! a conversation (its inode, from /proc/net/tcp) is held by the retiring
//! process before and by another live one after (a newer one where the
//! model says so), which goes on echoing every byte. So each fails on a
//! build whose relay refuses every connection (`--features
//! no-hand-over`, run by .ci/handover-mutant), where retiring workers
//! keep their conversations to the end. Where nothing is handed over
//! (fork-mode children, prefork workers that recycle only when idle) the
//! same load is in stay.rs.

use super::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// How many long conversations a test holds.
const LONG: usize = 20;

/// How the long conversations went.
struct Long {
    /// Round trips that came back whole, by conversation.
    pings: Vec<AtomicUsize>,
    /// Conversations that ended with every byte back (after the test's
    /// half-close), and those the server ended early or reset, or that
    /// stalled.
    whole: AtomicUsize,
    cut: AtomicUsize,
    reset: AtomicUsize,
    stalled: AtomicUsize,
}

impl Long {
    fn new(n: usize) -> Long {
        Long {
            pings: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            whole: AtomicUsize::new(0),
            cut: AtomicUsize::new(0),
            reset: AtomicUsize::new(0),
            stalled: AtomicUsize::new(0),
        }
    }

    /// Round trips of conversation `k` so far.
    fn pings_of(&self, k: usize) -> usize {
        self.pings[k].load(Ordering::SeqCst)
    }

    /// Round trips of all of them so far.
    fn pings(&self) -> usize {
        (0..self.pings.len()).map(|k| self.pings_of(k)).sum()
    }

    /// Conversations that ended badly so far.
    fn failed(&self) -> usize {
        [&self.cut, &self.reset, &self.stalled]
            .iter()
            .map(|c| c.load(Ordering::SeqCst))
            .sum()
    }

    fn summary(&self) -> String {
        let l = |c: &AtomicUsize| c.load(Ordering::SeqCst);
        format!(
            "whole {}, cut {}, reset {}, stalled {}",
            l(&self.whole),
            l(&self.cut),
            l(&self.reset),
            l(&self.stalled)
        )
    }
}

/// Opens `tally.pings.len()` connections to `addr` at once, each from a
/// client thread of its own (so that they spread over the workers) that
/// pings on it every 50 ms, checking every byte, until `stop`; then
/// half-closes and reads the end. Returns the threads and each
/// connection's ends, in order (`None`: it was refused).
fn long_conversations(
    addr: std::net::SocketAddr,
    stop: &Arc<AtomicBool>,
    tally: &Arc<Long>,
) -> (Vec<std::thread::JoinHandle<()>>, Vec<Option<Ends>>) {
    use std::io::ErrorKind;
    let (tell, told) = std::sync::mpsc::channel();
    let talkers = (0..tally.pings.len())
        .map(|k| {
            let (stop, t, tell) = (Arc::clone(stop), Arc::clone(tally), tell.clone());
            std::thread::spawn(move || {
                let mut s = match TcpStream::connect_timeout(&addr, DEADLINE) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tell.send((k, None));
                        return;
                    }
                };
                let _ = tell.send((k, Some(Ends::of(&s))));
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
                    t.pings[k].fetch_add(1, Ordering::SeqCst);
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
        .collect();
    let mut ends = vec![None; tally.pings.len()];
    for _ in 0..ends.len() {
        let (k, e) = told
            .recv_timeout(DEADLINE + DEADLINE)
            .expect("a client thread that neither connected nor failed to");
        ends[k] = e;
    }
    (talkers, ends)
}

/// Where the event must take the long conversations (each one's server
/// socket, and the process that holds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Moves {
    /// Every one leaves its process, which retires, for a process started
    /// after the event (a new generation's).
    All,
    /// Those of the processes that retire go on in other live ones;
    /// `some`: at least one conversation was with such a process;
    /// `replacement`: at least one is then in a process started after
    /// the event.
    OfTheRetired { some: bool, replacement: bool },
    /// None: each stays with the process that accepted it, to its end
    /// (nothing is handed over; see stay.rs).
    None,
}

/// Whether the conversations are where `moves` says, `now`, from where
/// they were `first`; `before`: the daemon's processes before the event.
/// `Err` says what is not, for the message.
fn arrived(moves: Moves, first: &[i32], now: &[Vec<i32>], before: &[i32]) -> Result<(), String> {
    let new = |p: &i32| !before.contains(p);
    let retired: Vec<usize> = (0..first.len()).filter(|&k| is_dead(first[k])).collect();
    let elsewhere = |k: usize| matches!(now[k][..], [p] if p != first[k]);
    match moves {
        Moves::All => match (0..first.len())
            .find(|&k| !is_dead(first[k]) || !matches!(now[k][..], [p] if new(&p)))
        {
            Some(k) => Err(format!("conversation {k} is not yet in a new process")),
            None => Ok(()),
        },
        Moves::OfTheRetired { some, replacement } => {
            if some && retired.is_empty() {
                return Err("no process that held a conversation retired".into());
            }
            if let Some(&k) = retired.iter().find(|&&k| !elsewhere(k)) {
                return Err(format!("conversation {k} is in no other process"));
            }
            if replacement && !retired.iter().any(|&k| new(&now[k][0])) {
                return Err("no conversation went to a replacement".into());
            }
            Ok(())
        }
        Moves::None => match (0..first.len()).find(|&k| now[k] != [first[k]]) {
            Some(k) => Err(format!("conversation {k} left its process")),
            None => Ok(()),
        },
    }
}

/// Runs `LONG` long conversations and a connect loop against a daemon
/// started with `args`; once every conversation is under way, `event`
/// happens (a signal sent, say; it is given the process that holds each
/// conversation) and `done` (a log line) is waited for;
/// the load goes on for 5 s in all. The conversations must go where
/// `moves` says (and each that moved must go on being echoed after it
/// moved); nothing may have been cut, refused or reset, in either kind
/// of client.
pub(crate) fn across(args: &[&str], event: impl FnOnce(&Daemon, &[i32]), done: &str, moves: Moves) {
    let _heavy = heavy();
    let d = Daemon::start(args);
    let addr = d.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let long = Arc::new(Long::new(LONG));
    let (talkers, ends) = long_conversations(addr, &stop, &long);
    assert!(
        wait_until(DEADLINE, || (0..LONG).all(|k| long.pings_of(k) > 0)),
        "the conversations did not get going: {}\n{}",
        long.summary(),
        d.stderr_text()
    );
    // Where each is served: its socket on the server's side, and the one
    // process that holds it.
    let sockets: Vec<u64> = ends
        .iter()
        .enumerate()
        .map(|(k, e)| {
            e.and_then(|e| e.server_socket())
                .unwrap_or_else(|| panic!("conversation {k} ({e:?}): refused, or no server socket"))
        })
        .collect();
    let mut held = Vec::new();
    assert!(
        wait_until(DEADLINE, || {
            held = d.holders(&sockets);
            held.iter().all(|h| h.len() == 1)
        }),
        "each conversation should be held by one process: {held:?}"
    );
    let first: Vec<i32> = held.iter().map(|h| h[0]).collect();
    let before = d.processes();
    let short = Arc::new(Tally::default());
    let loopers = clients(addr, 2, &stop, &short);
    let started = Instant::now();
    event(&d, &first);
    let line = d.wait_line(done, DEADLINE);
    assert!(line.is_some(), "no '{done}':\n{}", d.stderr_text());
    let pings = long.pings();
    // Where they went: once they are there, what each that moved has
    // been echoed so far, and a second at least for the new process to
    // echo more.
    let mut moved_at = None;
    if moves != Moves::None {
        let mut now = Vec::new();
        let mut why = Ok(());
        wait_until(DEADLINE, || {
            now = d.holders(&sockets);
            why = arrived(moves, &first, &now, &before);
            why.is_ok() || long.failed() > 0
        });
        assert!(
            why.is_ok() && long.failed() == 0,
            "the conversations were not handed over ({moves:?}): {why:?}; {}\nfirst held by {first:?}, now by {now:?}; processes before: {before:?}\n{}",
            long.summary(),
            d.stderr_text()
        );
        let moved: Vec<(usize, usize)> = (0..LONG)
            .filter(|&k| now[k] != [first[k]])
            .map(|k| (k, long.pings_of(k)))
            .collect();
        moved_at = Some((Instant::now(), moved));
    }
    while started.elapsed() < Duration::from_secs(5)
        || moved_at
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < Duration::from_secs(1))
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    if moves == Moves::None {
        let now = d.holders(&sockets);
        let stayed = arrived(moves, &first, &now, &before);
        assert!(
            stayed.is_ok(),
            "{stayed:?}: first held by {first:?}, now by {now:?}\n{}",
            d.stderr_text()
        );
    }
    stop.store(true, Ordering::SeqCst);
    for t in talkers.into_iter().chain(loopers) {
        let _ = t.join();
    }
    let long_out = format!(
        "long: {}; connect loop: {:?}",
        long.summary(),
        short.counts()
    );
    assert_eq!(
        long.whole.load(Ordering::SeqCst),
        LONG,
        "{long_out}\n{}",
        d.stderr_text()
    );
    assert!(
        long.pings() > pings + LONG,
        "the conversations stopped moving after the event: {long_out}"
    );
    if let Some((_, moved)) = moved_at {
        for (k, then) in moved {
            assert!(
                long.pings_of(k) > then,
                "conversation {k} was not echoed after it moved: {long_out}"
            );
        }
    }
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
pub(crate) fn two_workers(mode: &str) -> [&str; 8] {
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
        |d, _| d.signal(Signal::SIGHUP),
        "reloaded:",
        Moves::All,
    );
}

in_modes!(no_conversation_is_cut_by_a_reload: hup; prefork, event);

fn usr2(mode: &str) {
    across(
        &two_workers(mode),
        |d, _| d.signal(Signal::SIGUSR2),
        "upgraded: generation",
        Moves::All,
    );
}

in_modes!(no_conversation_is_cut_by_an_upgrade: usr2; prefork, event);

/// [`two_workers`] with the config file `conf`, written here with
/// `text`, which a reload reads again.
fn two_workers_from_file<'a>(conf: &'a std::path::Path, text: &str) -> [&'a str; 8] {
    std::fs::write(conf, text).unwrap();
    [
        "-l",
        "127.0.0.1:0",
        "-c",
        conf.to_str().unwrap(),
        "-w",
        "2",
        "--shutdown-timeout",
        "2",
    ]
}

/// A reload that changes the model to fork mode: the prefork workers
/// hand their conversations to the master, which forks a child for each.
#[test]
fn no_conversation_is_cut_by_a_reload_into_fork_mode() {
    let dir = TempDir::new("into-fork");
    let conf = dir.path("echo.toml");
    across(
        &two_workers_from_file(&conf, "mode = \"prefork\"\n"),
        |d, _| {
            std::fs::write(&conf, "mode = \"fork\"\n").unwrap();
            d.signal(Signal::SIGHUP);
        },
        "reloaded:",
        Moves::All,
    );
}

/// A reload that moves the event workers from the I/O engine `from` to
/// `to`: every conversation leaves a worker on one engine for a worker
/// on the other (the log says which engine each generation runs on).
fn across_engines(from: &str, to: &str) {
    if let Some(why) = no_uring() {
        eprintln!("skipped: io_uring cannot run here: {why}");
        return;
    }
    let dir = TempDir::new("engines");
    let conf = dir.path("echo.toml");
    let said = |e: &str| {
        if e == "uring" {
            "event workers use io_uring (io-engine uring)".to_string()
        } else {
            "event workers use epoll (io-engine epoll)".to_string()
        }
    };
    across(
        &two_workers_from_file(
            &conf,
            &format!("mode = \"event\"\nio-engine = \"{from}\"\n"),
        ),
        |d, _| {
            assert!(d.stderr_text().contains(&said(from)), "{}", d.stderr_text());
            let before = d.children();
            for &p in &before {
                assert_eq!(
                    holds_a_ring(p),
                    from == "uring",
                    "worker {p} before the reload"
                );
            }
            std::fs::write(&conf, format!("mode = \"event\"\nio-engine = \"{to}\"\n")).unwrap();
            d.signal(Signal::SIGHUP);
            assert!(
                wait_until(DEADLINE, || d.stderr_text().contains(&said(to))),
                "the reload did not say the new engine:\n{}",
                d.stderr_text()
            );
            // The new generation's workers run on it.
            let mut new = Vec::new();
            assert!(
                wait_until(DEADLINE, || {
                    new = d
                        .children()
                        .into_iter()
                        .filter(|p| !before.contains(p))
                        .collect();
                    new.len() >= 2
                }),
                "no new workers: {new:?}"
            );
            for p in new {
                assert_eq!(
                    holds_a_ring(p),
                    to == "uring",
                    "worker {p} after the reload"
                );
            }
        },
        "reloaded:",
        Moves::All,
    );
}

#[test]
fn no_conversation_is_cut_moving_from_io_uring_to_epoll_workers() {
    across_engines("uring", "epoll");
}

#[test]
fn no_conversation_is_cut_moving_from_epoll_to_io_uring_workers() {
    across_engines("epoll", "uring");
}

/// A pool where nearly every worker holds a conversation: TTOU, which
/// retires idle workers first, lowers the floor until it retires one that
/// holds a conversation, which goes on in another worker.
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
        |d, first| {
            // TTOU retires an idle worker first, and the connect loop
            // may make the pool grow meanwhile: the floor goes down until
            // a worker that holds a conversation retires. One at a time:
            // signals sent together merge into one.
            for (k, floor) in (12..22).rev().enumerate() {
                d.signal(Signal::SIGTTOU);
                let line = format!("pool's floor is now {floor}");
                assert!(d.wait_line(&line, DEADLINE).is_some(), "no '{line}'");
                let retiring = d
                    .wait_lines("retiring (SIGTTOU)", k + 1, DEADLINE)
                    .unwrap_or_else(|| panic!("no worker retired on TTOU {}", k + 1));
                let holds = |l: &String| first.iter().any(|p| l.contains(&format!("worker {p} ")));
                if retiring.iter().any(holds) {
                    return;
                }
            }
            panic!("ten TTOUs retired no worker that held a conversation");
        },
        "retiring (SIGTTOU)",
        Moves::OfTheRetired {
            some: true,
            replacement: false,
        },
    );
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
        |d, first| {
            // Whichever retires (an idle worker first, then the busy one
            // with the lowest pid) must hold a connection of this test's,
            // or this proves nothing: the long conversations mostly all go
            // to one worker (the one a new connection wakes while it
            // waits), and the connect loop's would end by themselves. So
            // the other gets one more, an anchor: opened while the loop
            // keeps the first busy, until one lands there.
            let workers = d.children();
            assert_eq!(workers.len(), 2, "{}", d.stderr_text());
            let mut anchors: Vec<(TcpStream, u64, i32)> = Vec::new();
            let held = |anchors: &[(TcpStream, u64, i32)]| {
                workers
                    .iter()
                    .all(|p| first.contains(p) || anchors.iter().any(|a| a.2 == *p))
            };
            let addr = d.addr();
            let by = Instant::now() + DEADLINE;
            while !held(&anchors) {
                assert!(
                    Instant::now() < by,
                    "no anchor went to the other worker: {workers:?}, long conversations with {first:?}"
                );
                let mut s = connect(addr);
                assert_eq!(round_trip(&mut s, b"anchor").unwrap(), b"anchor");
                let socket = Ends::of(&s).server_socket().expect("an anchor's socket");
                let p = holder(d, socket);
                if !first.contains(&p) {
                    anchors.push((s, socket, p));
                }
            }
            d.signal(Signal::SIGTTOU);
            // The retired worker's anchors go on with the other one.
            let mut gone = Vec::new();
            wait_until(DEADLINE, || {
                gone = workers.iter().copied().filter(|&p| is_dead(p)).collect();
                !gone.is_empty()
            });
            assert_eq!(
                gone.len(),
                1,
                "workers {workers:?}: gone {gone:?}\n{}",
                d.stderr_text()
            );
            let other = *workers.iter().find(|&&p| p != gone[0]).unwrap();
            for (s, socket, p) in &mut anchors {
                if *p != gone[0] {
                    continue;
                }
                let mut now = Vec::new();
                wait_until(DEADLINE, || {
                    now = d.holders(&[*socket]).remove(0);
                    now == [other] || Ends::of(s).server_socket().is_none()
                });
                assert_eq!(
                    now,
                    [other],
                    "an anchor of the retired worker {p}\n{}",
                    d.stderr_text()
                );
                assert_eq!(round_trip(s, b"moved").unwrap(), b"moved");
            }
        },
        "pool's floor is now 1",
        // The long conversations of the retired worker, if it had any,
        // went on too.
        Moves::OfTheRetired {
            some: false,
            replacement: false,
        },
    );
}

/// An event worker that has accepted its `--max-requests` hands its open
/// conversations to the other workers, its replacement among them,
/// instead of waiting for them to end: with the connect loop, every
/// worker recycles within the test, and its conversations go on in
/// workers started since.
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
        |_, _| {},
        "exited",
        Moves::OfTheRetired {
            some: true,
            replacement: true,
        },
    );
}

/// Waits until socket `inode` is held by exactly one of `d`'s processes,
/// and returns it.
fn holder(d: &Daemon, inode: u64) -> i32 {
    let mut held = Vec::new();
    let one = wait_until(DEADLINE, || {
        held = d.holders(&[inode]).remove(0);
        held.len() == 1
    });
    assert!(
        one,
        "socket {inode} is held by {held:?}\n{}",
        d.stderr_text()
    );
    held[0]
}

/// Behind a proxy, a conversation keeps its client across a reload: the
/// address the PROXY header gave (in the log of the process that serves
/// it to its end) and its place in `--max-per-ip` (a second connection
/// from that client is still refused, and once the first ends, a new one
/// is served). `args`: the daemon's (the proxy's options are added);
/// `reload`: what changes before the HUP; `moves`: whether the
/// conversation must go to a process the reload started (handed over)
/// or stay with its own (a fork-mode child).
pub(crate) fn proxied_client_across_a_reload(args: &[&str], reload: impl FnOnce(), moves: bool) {
    let mut all = args.to_vec();
    all.extend([
        "--proxy-protocol",
        "--trusted-proxy",
        "127.0.0.1/32",
        "--max-per-ip",
        "1",
        "--log-level",
        "debug",
    ]);
    let d = Daemon::start(&all);
    let addr = d.addr();
    let from = |port: u16| {
        let mut s = connect(addr);
        let header = format!("PROXY TCP4 10.1.1.1 127.0.0.1 {port} 7\r\n");
        s.write_all(header.as_bytes()).unwrap();
        s
    };
    let mut first = from(4001);
    assert_eq!(round_trip(&mut first, b"before").unwrap(), b"before");
    let socket = Ends::of(&first)
        .server_socket()
        .expect("the first connection's socket");
    let old = holder(&d, socket);
    let before = d.processes();
    reload();
    d.signal(Signal::SIGHUP);
    assert!(d.wait_line("reloaded:", DEADLINE).is_some());
    let serving = if moves {
        // Its process hands it over and leaves; one the reload started
        // takes it.
        let ends = Ends::of(&first);
        let mut now = Vec::new();
        let moved = |now: &[i32]| is_dead(old) && matches!(now, [p] if !before.contains(p));
        wait_until(DEADLINE, || {
            now = d.holders(&[socket]).remove(0);
            // Closed (cut): it will not move any more.
            moved(&now) || (now.is_empty() && ends.server_socket().is_none())
        });
        assert!(
            moved(&now),
            "{args:?}: the conversation was not handed over: held by {now:?} (closed: {}), first by {old} (gone: {}), processes before: {before:?}\n{}",
            ends.server_socket().is_none(),
            is_dead(old),
            d.stderr_text()
        );
        now[0]
    } else {
        old
    };
    let after = round_trip(&mut first, b"after");
    assert_eq!(
        after.as_deref().ok(),
        Some(&b"after"[..]),
        "{args:?}: {after:?}\n{}",
        d.stderr_text()
    );
    // Echoed by that process, which still holds it.
    assert_eq!(d.holders(&[socket]), [[serving]], "{args:?}");
    let mut second = from(4002);
    let _ = second.write_all(b"me too");
    let mut buf = [0u8; 8];
    assert!(
        matches!(second.read(&mut buf), Ok(0) | Err(_)),
        "{args:?}: the place of the first was lost in the hand-over"
    );
    drop(first);
    let ended = format!("[{serving}]: debug: connection from 10.1.1.1:4001");
    assert!(
        d.wait_line(&ended, DEADLINE).is_some(),
        "{args:?}: the client's address did not travel (no '{ended}'):\n{}",
        d.stderr_text()
    );
    let served = wait_until(DEADLINE, || {
        let mut s = from(4003);
        round_trip(&mut s, b"next").is_ok_and(|b| b == b"next")
    });
    assert!(served, "{args:?}: the first's place was never given back");
}

fn proxied_client_travels(mode: &str) {
    proxied_client_across_a_reload(&two_workers(mode), || {}, true);
}

in_modes!(a_proxied_client_keeps_its_address_and_place: proxied_client_travels; prefork, event);

/// The same, into fork mode: a prefork worker hands the conversation to
/// the master, which forks a child for it with its client and its place.
#[test]
fn a_proxied_client_keeps_its_address_and_place_into_fork_mode() {
    let dir = TempDir::new("proxied-into-fork");
    let conf = dir.path("echo.toml");
    proxied_client_across_a_reload(
        &two_workers_from_file(&conf, "mode = \"prefork\"\n"),
        || std::fs::write(&conf, "mode = \"fork\"\n").unwrap(),
        true,
    );
}

/// A client that sent all it had and half-closed while its worker could
/// not write back (the client reads only later) is handed over with its
/// half-close: every byte comes back, in order, then the end, which a
/// worker the reload started sees: it took the connection from the old
/// one and served the rest.
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
    let ends = Ends::of(&s);
    let socket = ends.server_socket().expect("the server's socket");
    let old = holder(&d, socket);
    let before = d.processes();
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
    // It ended in a process the reload started: the old worker had handed
    // it over, and the new one served the rest and saw the client's end.
    // (The old worker says 'ended by a hand-over' as it offers it, taken
    // or not: who wrote the last line is the proof.)
    let ended = format!("debug: connection from {}: ", ends.client);
    let mut last = None;
    wait_until(DEADLINE, || {
        last = d
            .stderr_text()
            .lines()
            .find(|l| l.contains(&ended) && l.ends_with("ended by the client"))
            .map(str::to_string);
        last.is_some()
    });
    let by = last.as_deref().and_then(writer);
    assert!(
        by.is_some_and(|p| p != old && !before.contains(&p)),
        "{mode}: the connection ended in {by:?}, not in a process the reload started (first served by {old}; processes before: {before:?}): it was not handed over:\n{}",
        d.stderr_text()
    );
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
/// for wait in the relay (held by no process), not cut; as conversations
/// end and free descriptors, it takes them, and every one goes on to its
/// end.
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
    // Which worker serves each.
    let sockets: Vec<u64> = talks
        .iter()
        .map(|(s, k)| {
            Ends::of(s)
                .server_socket()
                .unwrap_or_else(|| panic!("conversation {k}: no server socket"))
        })
        .collect();
    let first: Vec<i32> = sockets.iter().map(|&i| holder(&d, i)).collect();
    let workers = d.children();
    d.signal(Signal::SIGTTOU);
    assert!(
        d.wait_line("exited", DEADLINE).is_some(),
        "the retiring worker did not hand its conversations over:\n{}",
        d.stderr_text()
    );
    let (retired, serving): (Vec<i32>, Vec<i32>) = workers.iter().partition(|&&p| is_dead(p));
    assert!(
        retired.len() == 1 && serving.len() == 1,
        "workers {workers:?}: retired {retired:?}, still serving {serving:?}"
    );
    let (retired, serving) = (retired[0], serving[0]);
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
    // Where they are: those that answered are the remaining worker's
    // (with those the retired worker handed it, if it had room for any);
    // those waiting were the retired worker's and are in the relay, held
    // by no process: it let go of them.
    let now = d.holders(&sockets);
    for k in 0..sockets.len() {
        let waits = waiting.iter().any(|&(_, w)| usize::from(w) == k);
        let want = if waits {
            assert_eq!(first[k], retired, "conversation {k} waits");
            vec![]
        } else {
            vec![serving]
        };
        assert_eq!(
            now[k], want,
            "conversation {k}, first with {}, waiting: {waits} (retired {retired}, serving {serving})",
            first[k]
        );
    }
    // Ending those served frees descriptors.
    for mut s in served {
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
    // The others come out of the relay as room is freed, every byte kept,
    // served by the remaining worker.
    for (s, k) in &mut waiting {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut back = [0u8; 8];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("conversation {k} never served: {e}\n{}", d.stderr_text()));
        assert_eq!(back, [*k; 8]);
        assert_eq!(round_trip(s, &[*k; 4]).unwrap(), [*k; 4]);
        let socket = sockets[usize::from(*k)];
        assert_eq!(d.holders(&[socket]), [[serving]], "conversation {k}");
    }
    let log = d.stderr_text();
    assert!(
        !log.contains("cannot take") && !log.contains("closed"),
        "{log}"
    );
}
