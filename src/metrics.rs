//! `--metrics`: the Prometheus text exposition (format 0.0.4) of the
//! scoreboard, served at `GET /metrics` by a worker of its own.
//!
//! Why a worker and not the master: the master runs as root and must never
//! wait on a client, and a scrape reads nothing the master alone knows —
//! every counter is in the shared scoreboard, where workers and the master
//! write them. The metrics worker drops privileges and is chrooted like
//! the others, is respawned if it dies, and retires on reload and stop.
//! It serves at most [`MAX_CLIENTS`] clients at once, and [`PER_SOURCE`]
//! from one source address, from one `poll` loop: each request must
//! arrive within [`DEADLINE`] of the connection and fit in
//! [`REQUEST_MAX`] bytes, and each answer must be taken within
//! [`DEADLINE`] of being ready, so a client that sends nothing, too much,
//! or never reads is dropped while the others are served. A new client
//! never waits behind silent ones: when its source already has its share,
//! or every place is taken, the oldest client still sending its request
//! (of that source, or of all) is dropped to make room, and a request
//! already in the socket is answered as the client is accepted. So a
//! flood of silent connections, from one host or many, delays a scrape
//! by the time it takes to accept past them, not by their deadlines.
//! HTTP requests are parsed by `httparse`.

use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{debug, warn};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags};

use crate::accept::Acceptor;
use crate::admission::Refusal;
use crate::engine::Engine;
use crate::listen::{Listener, Service};
use crate::scoreboard::{Cut, Dropped, Exited, Scoreboard, State};
use crate::worker::{self, Ctx, EXIT_ORPHAN};

/// Clients served at once.
pub const MAX_CLIENTS: usize = 16;
/// Clients from one source address (an IPv6 source: its network, as the
/// per-source limits count it) served at once.
pub const PER_SOURCE: usize = 4;
/// How long a client has to send its request, and then to take the answer.
pub const DEADLINE: Duration = Duration::from_secs(2);
/// The largest request read (headers included).
pub const REQUEST_MAX: usize = 8192;
/// Connections accepted per wake-up, so that the clients already in hand
/// are served between batches.
const ACCEPT_BATCH: usize = 64;

/// The metrics worker: serves `listeners` (the metrics' listener) until
/// the control pipe closes. `engine`: in event mode, the I/O engine of
/// the generation it is started for (a reload starts another metrics
/// worker). Returns the exit code.
pub fn run(listeners: Vec<Listener>, ctx: Ctx<'_>, engine: Option<Engine>) -> i32 {
    if let Err(code) = worker::follow_master(&ctx) {
        return code;
    }
    let mut acceptor = Acceptor::serving(Service::Metrics, listeners);
    let mut clients: Vec<Client> = Vec::with_capacity(MAX_CLIENTS);
    ctx.set(State::Busy);
    loop {
        let now = Instant::now();
        clients.retain(|c| c.deadline > now);
        // A new client is taken while there is a place, or one that a
        // client still sending its request can be made to give up.
        let accepting = acceptor.paused_until(now).is_none()
            && (clients.len() < MAX_CLIENTS || clients.iter().any(Client::reading));
        let mut fds = Vec::with_capacity(1 + acceptor.listeners().len() + clients.len());
        fds.push(PollFd::new(ctx.ctl, PollFlags::POLLIN));
        if accepting {
            fds.extend(
                acceptor
                    .streams()
                    .map(|(_, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
        }
        let listening = fds.len() - 1;
        fds.extend(clients.iter().map(|c| {
            let want = if c.reading() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLOUT
            };
            PollFd::new(c.conn.as_fd(), want)
        }));
        let next = clients
            .iter()
            .map(|c| c.deadline)
            .chain(acceptor.paused_until(now))
            .min();
        let timeout = crate::time::poll_timeout(next.map(|t| t.saturating_duration_since(now)));
        match poll(&mut fds, timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                warn!("metrics: waiting for clients failed: {e}");
                return 1;
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready[0] {
            ctx.set(State::Stopping);
            return if ctx.master_gone() { EXIT_ORPHAN } else { 0 };
        }
        let (accept, served) = ready[1..].split_at(listening);
        let now = Instant::now();
        // Clients first: the indices in `served` are theirs as polled.
        let mut done = Vec::new();
        for (i, c) in clients.iter_mut().enumerate() {
            if served[i] && !c.step(ctx.board, engine, now) {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            clients.swap_remove(i);
        }
        if accept.iter().any(|&r| r) {
            for _ in 0..ACCEPT_BATCH {
                let Some((_, conn)) = acceptor.accept(now) else {
                    break;
                };
                admit(&mut clients, conn, ctx.policy, (ctx.board, engine), now);
            }
        }
    }
}

/// Takes a new client: makes room for it if its source has its share or
/// every place is taken (see the module's doc), then serves what it
/// already sent. Without room (every client in question is taking its
/// answer) the new one is closed.
fn admit(
    clients: &mut Vec<Client>,
    conn: OwnedFd,
    policy: &crate::admission::Policy,
    (board, engine): (&Scoreboard, Option<Engine>),
    now: Instant,
) {
    let source = crate::access::peer_key(&conn).map(|k| policy.source(k));
    let of_source = |c: &&Client| source.is_some() && c.source == source;
    let oldest_reading = |pick: &dyn Fn(&&Client) -> bool| {
        clients
            .iter()
            .enumerate()
            .filter(|(_, c)| c.reading() && pick(c))
            .min_by_key(|(_, c)| c.since)
            .map(|(i, _)| i)
    };
    let full = if clients.iter().filter(of_source).count() >= PER_SOURCE {
        Some(oldest_reading(&of_source))
    } else if clients.len() >= MAX_CLIENTS {
        Some(oldest_reading(&|_| true))
    } else {
        None
    };
    match full {
        Some(Some(i)) => {
            debug!("metrics: dropping a client that sent no request yet, to take a new one");
            clients.swap_remove(i);
        }
        Some(None) => return,
        None => {}
    }
    let mut c = Client::new(conn, source, now);
    // Most scrapers send their request with the connection.
    if c.step(board, engine, now) {
        clients.push(c);
    }
}

/// One metrics client: its request so far, then its answer.
struct Client {
    conn: OwnedFd,
    /// Its source, as the per-source share counts it (`None`: a unix
    /// socket client).
    source: Option<u128>,
    /// When it was accepted.
    since: Instant,
    request: Vec<u8>,
    /// The answer and how much of it is written.
    answer: Option<(Vec<u8>, usize)>,
    /// For its request, then (once answered) for taking the answer.
    deadline: Instant,
}

impl Client {
    fn new(conn: OwnedFd, source: Option<u128>, now: Instant) -> Client {
        Client {
            conn,
            source,
            since: now,
            request: Vec::new(),
            answer: None,
            deadline: now + DEADLINE,
        }
    }

    /// Whether it is still sending its request.
    fn reading(&self) -> bool {
        self.answer.is_none()
    }

    /// Reads or writes what it can; false when the client is done with.
    fn step(&mut self, board: &Scoreboard, engine: Option<Engine>, now: Instant) -> bool {
        if let Some((answer, written)) = &mut self.answer {
            return match nix::unistd::write(&self.conn, &answer[*written..]) {
                Ok(n) => {
                    *written += n;
                    *written < answer.len()
                }
                Err(Errno::EAGAIN | Errno::EINTR) => true,
                Err(_) => false,
            };
        }
        let mut chunk = [0u8; 2048];
        let n = match nix::unistd::read(&self.conn, &mut chunk) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(Errno::EAGAIN | Errno::EINTR) => return true,
            Err(_) => return false,
        };
        let room = REQUEST_MAX - self.request.len();
        self.request.extend_from_slice(&chunk[..n.min(room)]);
        let answer = match parse(&self.request) {
            Parsed::Partial if self.request.len() >= REQUEST_MAX => {
                status(431, "Request Header Fields Too Large")
            }
            Parsed::Partial => return true,
            Parsed::Bad => status(400, "Bad Request"),
            Parsed::Get { path, head } => respond(path_only(&path), head, board, engine),
            Parsed::Other => {
                let mut a = status(405, "Method Not Allowed");
                a.splice(a.len() - 2..a.len() - 2, *b"Allow: GET, HEAD\r\n");
                a
            }
        };
        self.answer = Some((answer, 0));
        self.deadline = now + DEADLINE;
        // Most answers fit the socket buffer: write at once.
        self.step(board, engine, now)
    }
}

/// A request, as far as it has come.
#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    /// The headers are not all here yet.
    Partial,
    /// Not HTTP.
    Bad,
    /// `GET` or `HEAD` (`head`) of `path`.
    Get { path: String, head: bool },
    /// Another method.
    Other,
}

fn parse(request: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(request) {
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Bad,
        Ok(httparse::Status::Complete(_)) => match (req.method, req.path) {
            (Some(m @ ("GET" | "HEAD")), Some(path)) => Parsed::Get {
                path: path.to_string(),
                head: m == "HEAD",
            },
            (Some(_), Some(_)) => Parsed::Other,
            _ => Parsed::Bad,
        },
    }
}

/// The path without its query string.
fn path_only(target: &str) -> &str {
    target.split('?').next().unwrap_or(target)
}

/// The answer to `GET path` (without the body for `HEAD`).
fn respond(path: &str, head: bool, board: &Scoreboard, engine: Option<Engine>) -> Vec<u8> {
    if path != "/metrics" {
        return status(404, "Not Found");
    }
    let body = render(board, engine);
    let mut answer = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head {
        answer.extend_from_slice(body.as_bytes());
    }
    answer
}

/// A bodiless answer with `code`.
fn status(code: u16, reason: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

/// The exposition of everything the scoreboard counts, and in event mode
/// the I/O engine of the event workers.
pub fn render(board: &Scoreboard, engine: Option<Engine>) -> String {
    let mut out = String::with_capacity(4096);
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP echo_forkd_{name} {help}");
        let _ = writeln!(out, "# TYPE echo_forkd_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "echo_forkd_{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    let label = |key: &str, value: &str| format!("{{{key}=\"{value}\"}}");
    let (connections, bytes) = board.served_totals();
    family(
        "connections_total",
        "counter",
        "Connections served, in every mode.",
        &one(connections),
    );
    family(
        "bytes_total",
        "counter",
        "Bytes echoed back, counted as each connection ends.",
        &one(bytes),
    );
    // One sample per kind of a counter kept by kind.
    let by = |key: &str, names: &[&str], counts: &[u64]| -> Vec<(String, u64)> {
        let labels = names.iter().map(|n| label(key, n));
        labels.zip(counts.iter().copied()).collect()
    };
    family(
        "refused_total",
        "counter",
        "Connections closed at once, unread, by reason.",
        &by(
            "reason",
            &Refusal::ALL.map(Refusal::label),
            &board.refusals(),
        ),
    );
    family(
        "connections_abandoned_total",
        "counter",
        "Connections whose client went away before they could be served (before its PROXY header was complete: a balancer's health check), not refusals.",
        &one(board.abandoned_total()),
    );
    let mut states = [0u64; 4];
    let mut open = board.fork_children();
    for e in board.entries() {
        states[e.state as usize] += 1;
        open += e.open;
    }
    states[State::Busy as usize] += board.fork_children();
    let each = [State::Starting, State::Idle, State::Busy, State::Stopping];
    family(
        "workers",
        "gauge",
        "Processes serving clients, by state (fork-mode children, UDP and metrics workers are busy).",
        &by("state", &each.map(State::name), &each.map(|s| states[s as usize])),
    );
    family(
        "open_connections",
        "gauge",
        "Connections open now.",
        &one(open),
    );
    let (echoed, dropped) = board.udp_counts();
    family(
        "datagrams_total",
        "counter",
        "UDP datagrams answered.",
        &one(echoed),
    );
    family(
        "datagrams_dropped_total",
        "counter",
        "UDP datagrams dropped unanswered, by reason.",
        &by("reason", &Dropped::ALL.map(Dropped::name), &dropped),
    );
    family(
        "reloads_total",
        "counter",
        "Configurations put in force by SIGHUP.",
        &one(board.reloads()),
    );
    family(
        "worker_exits_total",
        "counter",
        "Workers (of the pool, UDP, metrics) that ended, by how.",
        &by("cause", &Exited::ALL.map(Exited::name), &board.exits()),
    );
    family(
        "connections_cut_total",
        "counter",
        "Open connections closed because they could not be placed where they were to go on, by why.",
        &by("reason", &Cut::ALL.map(Cut::name), &board.cuts()),
    );
    family(
        "start_time_seconds",
        "gauge",
        "When the daemon started, in seconds since the Unix epoch.",
        &one(board.start_secs()),
    );
    if let Some(engine) = engine {
        let each = [Engine::Uring, Engine::Epoll];
        family(
            "io_engine",
            "gauge",
            "Event mode: the I/O engine the event workers run on (1), and the other (0).",
            &by(
                "engine",
                &each.map(Engine::name),
                &each.map(|e| u64::from(e == engine)),
            ),
        );
    }
    family(
        "build_info",
        "gauge",
        "The version running: always 1.",
        &[(label("version", env!("CARGO_PKG_VERSION")), 1)],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_by_what_they_ask() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x"), Parsed::Partial);
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Parsed::Get {
                path: "/metrics?x=1".into(),
                head: false
            }
        );
        assert_eq!(
            parse(b"HEAD / HTTP/1.1\r\n\r\n"),
            Parsed::Get {
                path: "/".into(),
                head: true
            }
        );
        assert_eq!(parse(b"DELETE /metrics HTTP/1.1\r\n\r\n"), Parsed::Other);
        assert_eq!(parse(b"\x00\x01 nonsense\r\n\r\n"), Parsed::Bad);
        assert_eq!(path_only("/metrics?name[]=x"), "/metrics");
    }

    #[test]
    fn answers_say_what_was_found() {
        let board = Scoreboard::new(2, 1).unwrap();
        let ok = String::from_utf8(respond("/metrics", false, &board, None)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let head_only = respond("/metrics", true, &board, None);
        assert!(head_only.ends_with(b"\r\n\r\n"));
        assert!(respond("/", false, &board, None).starts_with(b"HTTP/1.1 404"));
    }

    #[test]
    fn every_metric_of_the_contract_is_exposed_with_its_type() {
        let board = Scoreboard::new(2, 1).unwrap();
        board.served(10);
        board.served(5);
        let text = render(&board, Some(Engine::Uring));
        for (name, kind) in [
            ("connections_total", "counter"),
            ("refused_total", "counter"),
            ("connections_abandoned_total", "counter"),
            ("bytes_total", "counter"),
            ("workers", "gauge"),
            ("open_connections", "gauge"),
            ("datagrams_total", "counter"),
            ("datagrams_dropped_total", "counter"),
            ("reloads_total", "counter"),
            ("worker_exits_total", "counter"),
            ("connections_cut_total", "counter"),
            ("start_time_seconds", "gauge"),
            ("build_info", "gauge"),
            ("io_engine", "gauge"),
        ] {
            let line = format!("# TYPE echo_forkd_{name} {kind}\n");
            assert!(text.contains(&line), "{line}{text}");
        }
        assert!(text.contains("echo_forkd_connections_total 2\n"), "{text}");
        assert!(text.contains("echo_forkd_bytes_total 15\n"), "{text}");
        assert!(text.contains("echo_forkd_io_engine{engine=\"uring\"} 1\n"));
        assert!(text.contains("echo_forkd_io_engine{engine=\"epoll\"} 0\n"));
        assert!(
            !render(&board, None).contains("io_engine"),
            "only in event mode"
        );
        // Every sample line is `name[{labels}] value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = l.rsplit_once(' ').unwrap();
            assert!(name.starts_with("echo_forkd_"), "{l}");
            assert!(value.parse::<u64>().is_ok(), "{l}");
        }
    }
}
