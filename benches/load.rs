//! The load benchmark: `cargo bench [-- OPTIONS]`.
//!
//! It starts each server fresh for each run, on 127.0.0.1, and drives it
//! from this process with blocking client threads: echo-forkd in prefork
//! (at several pool sizes), fork and event mode; the floors of each model, built
//! only for this benchmark (a minimal fork-per-connection server and a
//! minimal single-threaded epoll echo, this binary re-run as `serve-fork`
//! and `serve-epoll`); a minimal tokio server (`serve-tokio`); and Python's
//! `ForkingTCPServer` and `ThreadingTCPServer` (benches/peers.py). It
//! sweeps what users vary: pool sizes, 1 to 500 ping-ponging clients, a
//! burst of 2,000 clients at once, 100 and 10,000 idle connections, and a
//! UDP flood (echo-forkd's UDP worker against Python's `UDPServer`, a
//! minimal tokio UDP echo and a bare recvfrom/sendto loop, `serve-udp`).
//! Servers take turns within each round,
//! and each round starts one server later (A B C, B C A, C A B …), so that
//! a noisy neighbour hurts them all alike; the figures that count are
//! ratios within a round, of which the medians are reported. Every echoed
//! byte is checked. See PERFORMANCE.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, connect, recvmmsg, sendmmsg, setsockopt, socket, sockopt, AddressFamily, Backlog,
    MsgFlags, MultiHeaders, SockFlag, SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;

const PAYLOAD: usize = 64;
/// Client source addresses: 127.0.0.1 to 127.0.0.16, so that the client's
/// ephemeral ports never run out (one address gives out near 14k conn/s).
const SOURCES: u8 = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BIN: &str = env!("CARGO_BIN_EXE_echo-forkd");
/// The listen backlog of the servers built into this binary: room for
/// the whole burst, as echo-forkd is given in that case (its default,
/// 1024, serves every other case), so that the burst measures the
/// servers, not the kernel dropping SYNs beyond the backlog.
const BACKLOG: i32 = 4096;
/// Idle connections above which `hold` runs only the servers that hold
/// many per process.
const HOLD_PER_PROCESS: usize = 1000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve-tokio") => return serve_tokio(),
        Some("serve-fork") => return serve_fork(),
        Some("serve-epoll") => return serve_epoll(),
        Some("serve-tokio-udp") => return serve_tokio_udp(),
        Some("serve-udp") => return serve_udp(),
        _ => {}
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let mut opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    make_room_for_clients(&mut opts);
    run(&opts);
}

const USAGE: &str = "usage: cargo bench --bench load -- [OPTIONS]
  --rounds N          rounds of every server in turn (default 3)
  --secs S            seconds per timed run (default 3)
  --scenarios LIST    conn,rtt,stream,hold,burst,udp (default: all)
  --servers LIST      prefork,fork,event,min-fork,epoll,tokio,py-forking,
                      py-threading,min-udp,py-udp (default: all)
  --clients N         clients for conn (default 50)
  --rtt-clients LIST  connections for rtt, one run each (default 1,50,500)
  --pools LIST        prefork pool sizes for conn (default 8,64,256)
  --stream-mib N      MiB each stream connection sends (default 256)
  --hold LIST         idle connections held, one run each (default 100,10000)
  --burst N           clients arriving at once in burst (default 2000)
  --udp-clients LIST  UDP clients flooding, one run each (default 1,16,64)
  --out FILE          also write the markdown tables here
  --baseline BIN      also run this echo-forkd build, after each of ours
  --quick             1 round of 1 s, 32 MiB streams: a smoke test";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Prefork,
    /// `--baseline`: another echo-forkd build, for before/after figures.
    PreforkBase,
    Fork,
    ForkBase,
    Event,
    EventBase,
    /// The floor of the fork model: fork, read/write, `_exit`.
    MinFork,
    /// The floor of an event loop: one thread, one epoll set.
    Epoll,
    Tokio,
    PyForking,
    PyThreading,
    /// The floor of a UDP echo: one blocking recvfrom/sendto loop.
    MinUdp,
    /// Python's `socketserver.UDPServer`.
    PyUdp,
}

impl Kind {
    /// An echo-forkd build, as opposed to a peer.
    fn is_ours(self) -> bool {
        matches!(
            self,
            Kind::Prefork
                | Kind::Fork
                | Kind::Event
                | Kind::PreforkBase
                | Kind::ForkBase
                | Kind::EventBase
        )
    }

    /// Whether it holds many connections per process (or thread pool).
    fn holds_many(self) -> bool {
        matches!(
            self,
            Kind::Event | Kind::EventBase | Kind::Epoll | Kind::Tokio
        )
    }

    fn is_prefork(self) -> bool {
        matches!(self, Kind::Prefork | Kind::PreforkBase)
    }

    const ALL: [Kind; 10] = [
        Kind::Prefork,
        Kind::Fork,
        Kind::Event,
        Kind::MinFork,
        Kind::Epoll,
        Kind::Tokio,
        Kind::PyForking,
        Kind::PyThreading,
        Kind::MinUdp,
        Kind::PyUdp,
    ];

    /// Whether it takes part in the UDP case: echo-forkd (one mode: the
    /// UDP worker is the same in all), tokio and the UDP servers.
    fn serves_udp(self) -> bool {
        matches!(
            self,
            Kind::Prefork | Kind::PreforkBase | Kind::Tokio | Kind::MinUdp | Kind::PyUdp
        )
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Prefork => "prefork",
            Kind::Fork => "fork",
            Kind::Event => "event",
            Kind::MinFork => "min-fork",
            Kind::Epoll => "epoll",
            Kind::Tokio => "tokio",
            Kind::PyForking => "py-forking",
            Kind::PyThreading => "py-threading",
            Kind::MinUdp => "min-udp",
            Kind::PyUdp => "py-udp",
            Kind::PreforkBase => "prefork-base",
            Kind::ForkBase => "fork-base",
            Kind::EventBase => "event-base",
        }
    }
}

/// A server as run in one case: its kind and, for prefork in `conn`, the
/// pool size (0: the case's own choice).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    kind: Kind,
    pool: usize,
}

impl Target {
    fn name(self) -> String {
        if self.pool > 0 {
            format!("{} -w {}", self.kind.name(), self.pool)
        } else {
            self.kind.name().to_string()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Conn,
    Rtt,
    Stream,
    Hold,
    Burst,
    Udp,
}

impl Scenario {
    const ALL: [Scenario; 6] = [
        Scenario::Conn,
        Scenario::Rtt,
        Scenario::Stream,
        Scenario::Hold,
        Scenario::Burst,
        Scenario::Udp,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Conn => "conn",
            Scenario::Rtt => "rtt",
            Scenario::Stream => "stream",
            Scenario::Hold => "hold",
            Scenario::Burst => "burst",
            Scenario::Udp => "udp",
        }
    }
}

/// One scenario at one size: `rtt` with 500 connections, say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    scenario: Scenario,
    clients: usize,
}

impl Case {
    fn label(self) -> String {
        match self.scenario {
            Scenario::Conn | Scenario::Rtt | Scenario::Stream | Scenario::Udp => {
                format!("{} c={}", self.scenario.name(), self.clients)
            }
            Scenario::Hold | Scenario::Burst => {
                format!("{} {}", self.scenario.name(), self.clients)
            }
        }
    }
}

struct Opts {
    rounds: usize,
    secs: f64,
    scenarios: Vec<Scenario>,
    servers: Vec<Kind>,
    clients: usize,
    rtt_clients: Vec<usize>,
    pools: Vec<usize>,
    stream_mib: usize,
    hold: Vec<usize>,
    burst: usize,
    udp_clients: Vec<usize>,
    out: Option<PathBuf>,
    baseline: Option<PathBuf>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            rounds: 3,
            secs: 3.0,
            scenarios: Scenario::ALL.to_vec(),
            servers: Kind::ALL.to_vec(),
            clients: 50,
            rtt_clients: vec![1, 50, 500],
            pools: vec![8, 64, 256],
            stream_mib: 256,
            hold: vec![100, 10_000],
            burst: 2000,
            udp_clients: vec![1, 16, 64],
            out: None,
            baseline: None,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--bench" => {} // cargo bench passes it
                "--quick" => {
                    o.rounds = 1;
                    o.secs = 1.0;
                    o.stream_mib = 32;
                }
                "--rounds" => o.rounds = number(arg, value()?)?,
                "--secs" => {
                    o.secs = value()?
                        .parse()
                        .map_err(|_| format!("{arg}: not a number"))?
                }
                "--clients" => o.clients = number(arg, value()?)?,
                "--rtt-clients" => o.rtt_clients = numbers(arg, value()?)?,
                "--pools" => o.pools = numbers(arg, value()?)?,
                "--stream-mib" => o.stream_mib = number(arg, value()?)?,
                "--hold" => o.hold = numbers(arg, value()?)?,
                "--burst" => o.burst = number(arg, value()?)?,
                "--udp-clients" => o.udp_clients = numbers(arg, value()?)?,
                "--out" => o.out = Some(PathBuf::from(value()?)),
                "--scenarios" => {
                    o.scenarios = pick(value()?, &Scenario::ALL, |s| s.name())?;
                }
                "--servers" => o.servers = pick(value()?, &Kind::ALL, |k| k.name())?,
                "--baseline" => o.baseline = Some(PathBuf::from(value()?)),
                other => return Err(format!("unknown argument {other}")),
            }
        }
        if o.baseline.is_some() {
            // Each build right after the other, in every round.
            let mut with = Vec::new();
            for &k in &o.servers {
                with.push(k);
                match k {
                    Kind::Prefork => with.push(Kind::PreforkBase),
                    Kind::Fork => with.push(Kind::ForkBase),
                    Kind::Event => with.push(Kind::EventBase),
                    _ => {}
                }
            }
            o.servers = with;
        }
        if o.rounds == 0
            || o.secs <= 0.0
            || o.clients == 0
            || o.pools.contains(&0)
            || o.udp_clients.contains(&0)
        {
            return Err("rounds, secs, clients, pools and udp-clients must be positive".into());
        }
        Ok(o)
    }

    /// Every case to run, in order.
    fn cases(&self) -> Vec<Case> {
        let mut cases = Vec::new();
        for &scenario in &self.scenarios {
            let sizes = match scenario {
                Scenario::Conn => vec![self.clients],
                Scenario::Rtt => self.rtt_clients.clone(),
                Scenario::Stream => vec![4],
                Scenario::Hold => self.hold.clone(),
                Scenario::Burst => vec![self.burst],
                Scenario::Udp => self.udp_clients.clone(),
            };
            cases.extend(sizes.into_iter().map(|clients| Case { scenario, clients }));
        }
        cases
    }

    /// The servers that take part in `case`: prefork once per pool size
    /// in `conn`; the Python servers sit out the burst (2,000 Python
    /// processes or threads measure Python, not the model).
    fn targets(&self, case: Case) -> Vec<Target> {
        let mut t = Vec::new();
        for &kind in &self.servers {
            match (kind, case.scenario) {
                (k, Scenario::Udp) if !k.serves_udp() => {}
                (k, _)
                    if case.scenario != Scenario::Udp
                        && matches!(k, Kind::MinUdp | Kind::PyUdp) => {}
                (k, Scenario::Conn) if k.is_prefork() => {
                    t.extend(self.pools.iter().map(|&pool| Target { kind, pool }));
                }
                (Kind::PyForking | Kind::PyThreading, Scenario::Burst) => {}
                // Thousands of idle connections are the event model's
                // case: a process (or a Python thread) each would measure
                // the machine's process table, and prefork's pool stops
                // at 4,096 workers.
                (k, Scenario::Hold) if case.clients > HOLD_PER_PROCESS && !k.holds_many() => {}
                _ => t.push(Target { kind, pool: 0 }),
            }
        }
        t
    }
}

fn number(arg: &str, v: &str) -> Result<usize, String> {
    v.parse().map_err(|_| format!("{arg}: not a number: {v}"))
}

fn numbers(arg: &str, v: &str) -> Result<Vec<usize>, String> {
    v.split(',').map(|n| number(arg, n)).collect()
}

fn pick<T: Copy>(list: &str, all: &[T], name: fn(&T) -> &'static str) -> Result<Vec<T>, String> {
    list.split(',')
        .map(|w| {
            all.iter()
                .find(|t| name(t) == w)
                .copied()
                .ok_or(format!("unknown name {w}"))
        })
        .collect()
}

// ---------------------------------------------------------------- servers

/// A server under test, in its own process group, killed with it on drop.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(t: Target, case: Case, o: &Opts) -> Server {
        let kind = t.kind;
        let mut cmd = match kind {
            k if k.is_ours() => {
                let bin = match (kind, &o.baseline) {
                    (Kind::PreforkBase | Kind::ForkBase | Kind::EventBase, Some(b)) => b.as_path(),
                    _ => Path::new(BIN),
                };
                let mut c = Command::new(bin);
                c.args(["-f", "-l", "127.0.0.1:0", "--log-level", "info"]);
                c.args(daemon_args(t, case, o));
                c.stderr(Stdio::piped()).stdout(Stdio::null());
                c
            }
            Kind::PyForking | Kind::PyThreading | Kind::PyUdp => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.py");
                let mut c = Command::new("python3");
                c.arg(script)
                    .arg(match kind {
                        Kind::PyForking => "forking",
                        Kind::PyThreading => "threading",
                        _ => "udp",
                    })
                    .stdout(Stdio::piped());
                c
            }
            _ => {
                let mut c = Command::new(std::env::current_exe().expect("own path"));
                c.arg(match kind {
                    Kind::Tokio if case.scenario == Scenario::Udp => "serve-tokio-udp",
                    Kind::Tokio => "serve-tokio",
                    Kind::MinFork => "serve-fork",
                    Kind::MinUdp => "serve-udp",
                    _ => "serve-epoll",
                })
                .stdout(Stdio::piped());
                c
            }
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", kind.name()));
        let port = if kind.is_ours() {
            let err = child.stderr.take().expect("piped stderr");
            daemon_port(err, case.scenario == Scenario::Udp)
        } else {
            let out = child.stdout.take().expect("piped stdout");
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            line.trim().parse().ok()
        };
        let mut server = Server { child, port: 0 };
        server.port =
            port.unwrap_or_else(|| panic!("{} did not say which port it listens on", t.name()));
        server
    }

    fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-self.pid());
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// echo-forkd's settings for a case: what an operator would give it to
/// carry that load.
fn daemon_args(t: Target, case: Case, o: &Opts) -> Vec<String> {
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if matches!(t.kind, Kind::Fork | Kind::ForkBase) {
        let max = (case.clients.max(1024) + 64).to_string();
        let backlog = BACKLOG.to_string();
        return args(&["-m", "fork", "--max-children", &max, "--backlog", &backlog]);
    }
    if matches!(t.kind, Kind::Event | Kind::EventBase) {
        // One worker per CPU (the default), each with room for every
        // client, however the kernel spreads them.
        let conns = case.clients.max(1024).to_string();
        let backlog = BACKLOG.to_string();
        return args(&[
            "-m",
            "event",
            "--worker-connections",
            &conns,
            "--backlog",
            &backlog,
        ]);
    }
    if case.scenario == Scenario::Udp {
        // The UDP worker (one, the default) with no per-source limit: a
        // benchmark is the flood an operator asks for. The pool is kept
        // to one idle TCP worker.
        return args(&[
            "-l",
            "udp:127.0.0.1:0",
            "--udp-rate",
            "0",
            "-w",
            "1",
            "--min-spare",
            "0",
        ]);
    }
    if case.scenario == Scenario::Burst {
        // A small pool with room to grow: the figure is how fast it does.
        let max = (o.burst + 48).max(256).to_string();
        let backlog = BACKLOG.to_string();
        return args(&[
            "-m",
            "prefork",
            "-w",
            "2",
            "--max-workers",
            &max,
            "--backlog",
            &backlog,
        ]);
    }
    // A fixed pool: the figures are then the pool's, not its growth's.
    let workers = match case.scenario {
        Scenario::Conn => t.pool,
        Scenario::Rtt => case.clients + 2,
        Scenario::Stream => 6,
        _ => case.clients + 4,
    };
    let w = workers.to_string();
    let max = workers.max(256).to_string();
    args(&[
        "-m",
        "prefork",
        "-w",
        &w,
        "--max-workers",
        &max,
        "--min-spare",
        "0",
    ])
}

/// Reads echo-forkd's log until `ready`; returns the port of its `listening
/// on` line and leaves a thread draining the rest.
fn daemon_port(err: std::process::ChildStderr, udp: bool) -> Option<u16> {
    let mut lines = BufReader::new(err).lines();
    let mut port = None;
    let listening = if udp {
        "listening on udp:127.0.0.1:"
    } else {
        "listening on 127.0.0.1:"
    };
    for line in lines.by_ref() {
        let line = line.ok()?;
        if let Some(rest) = line.split(listening).nth(1) {
            port = rest.trim().parse().ok();
        }
        if line.ends_with(": ready") {
            break;
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("warning:") || line.contains("error:") {
                eprintln!("    server: {line}");
            }
        }
    });
    port
}

/// The listener of the servers built into this binary: 127.0.0.1:0, the
/// same backlog as echo-forkd's, TCP_NODELAY inherited by connections;
/// prints the port for the benchmark.
fn bench_listener() -> TcpListener {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    setsockopt(&fd, sockopt::TcpNoDelay, &true).expect("TCP_NODELAY");
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    bind(fd.as_raw_fd(), &any).expect("bind");
    nix::sys::socket::listen(&fd, Backlog::new(BACKLOG).expect("backlog")).expect("listen");
    let l = TcpListener::from(fd);
    println!("{}", l.local_addr().expect("local addr").port());
    l
}

fn serve_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let std_listener = bench_listener();
        std_listener.set_nonblocking(true).expect("non-blocking");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// The floor of the fork model, as small as it can be: accept, fork, echo
/// with read/write on a stack buffer, `_exit`; finished children reaped
/// (`waitpid(WNOHANG)`) before each accept, so that their CPU time is
/// counted as the others' is. No limits, no supervision, no logging.
fn serve_fork() {
    let listener = bench_listener();
    // SAFETY: SIG_IGN runs no code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    loop {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        while matches!(
            waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)),
            Ok(s) if s != WaitStatus::StillAlive
        ) {}
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        // SAFETY: this process has one thread (the benchmark's main thread
        // re-run as a server before starting any other); the child only
        // echoes and `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                // Left uninitialised, as a C server's stack buffer would be:
                // zeroing 64 KiB per connection is no part of the floor.
                let mut buf = std::mem::MaybeUninit::<[u8; 64 * 1024]>::uninit();
                let fd = conn.as_raw_fd();
                loop {
                    // SAFETY: read(2) writes at most the buffer's length
                    // into memory we own.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 64 * 1024) };
                    if n <= 0 {
                        break;
                    }
                    // SAFETY: the first `n` bytes were just written by read.
                    let data = unsafe {
                        std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize)
                    };
                    if write_all(fd, data).is_err() {
                        break;
                    }
                }
                // SAFETY: `_exit` does not return and runs no destructor.
                unsafe { libc::_exit(0) }
            }
            _ => drop(conn),
        }
    }
}

fn write_all(fd: std::os::fd::RawFd, mut data: &[u8]) -> nix::Result<()> {
    // SAFETY: `fd` is open for the whole call (the caller owns it).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The floor of an event loop: one thread, one level-triggered epoll set,
/// non-blocking sockets, one shared 64 KiB read buffer, and what a client
/// does not read kept per connection until it can be written.
fn serve_epoll() {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    const LISTENER: u64 = u64::MAX;
    let listener = bench_listener();
    listener.set_nonblocking(true).expect("non-blocking");
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    ep.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
        .expect("epoll add");
    // By fd number: the connection and its unsent bytes.
    let mut conns: Vec<Option<(TcpStream, Vec<u8>)>> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let n = match ep.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(_) => continue,
        };
        for ev in &events[..n] {
            if ev.data() == LISTENER {
                while let Ok((c, _)) = listener.accept() {
                    let _ = c.set_nonblocking(true);
                    let fd = c.as_raw_fd() as usize;
                    if ep
                        .add(&c, EpollEvent::new(EpollFlags::EPOLLIN, fd as u64))
                        .is_ok()
                    {
                        if conns.len() <= fd {
                            conns.resize_with(fd + 1, || None);
                        }
                        conns[fd] = Some((c, Vec::new()));
                    }
                }
                continue;
            }
            let fd = ev.data() as usize;
            let Some(Some((c, pending))) = conns.get_mut(fd) else {
                continue;
            };
            let mut close = false;
            if !pending.is_empty() {
                match c.write(pending) {
                    Ok(k) => {
                        pending.drain(..k);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => close = true,
                }
                if pending.is_empty() && !close {
                    let mut back = EpollEvent::new(EpollFlags::EPOLLIN, fd as u64);
                    let _ = ep.modify(&*c, &mut back);
                }
            } else {
                match c.read(&mut buf) {
                    Ok(0) => close = true,
                    Ok(k) => {
                        let sent = match c.write(&buf[..k]) {
                            Ok(w) => w,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                            Err(_) => {
                                close = true;
                                k
                            }
                        };
                        if sent < k && !close {
                            pending.extend_from_slice(&buf[sent..k]);
                            let mut out = EpollEvent::new(EpollFlags::EPOLLOUT, fd as u64);
                            let _ = ep.modify(&*c, &mut out);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => close = true,
                }
            }
            if close {
                if let Some((c, _)) = conns[fd].take() {
                    let _ = ep.delete(&c);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- clients

#[derive(Default, Clone, Copy, Debug)]
struct Errors {
    refused: u64,
    reset: u64,
    timeout: u64,
    mismatch: u64,
    other: u64,
}

impl Errors {
    fn count(&mut self, e: &io::Error) {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => self.refused += 1,
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => self.reset += 1,
            TimedOut | WouldBlock => self.timeout += 1,
            _ if e.raw_os_error() == Some(libc::EINPROGRESS) => self.timeout += 1,
            _ => self.other += 1,
        }
    }

    fn add(&mut self, o: &Errors) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.mismatch += o.mismatch;
        self.other += o.other;
    }

    fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.mismatch + self.other
    }

    fn describe(&self) -> String {
        if self.total() == 0 {
            return "0".into();
        }
        let mut s = Vec::new();
        for (n, what) in [
            (self.refused, "refused"),
            (self.reset, "reset"),
            (self.timeout, "timeout"),
            (self.mismatch, "mismatch"),
            (self.other, "other"),
        ] {
            if n > 0 {
                s.push(format!("{n} {what}"));
            }
        }
        s.join(", ")
    }
}

/// A connection from 127.0.0.(1 + i % 16), with both timeouts set.
fn connect_from(i: usize, to: SocketAddrV4) -> io::Result<TcpStream> {
    let fd: OwnedFd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let tv = TimeVal::new(IO_TIMEOUT.as_secs() as i64, 0);
    setsockopt(&fd, sockopt::SendTimeout, &tv)?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv)?;
    // The port is chosen at connect time, per destination, not at bind.
    setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
    let from = Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES as usize) as u8);
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(from, 0)),
    )?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(to))?;
    let s = TcpStream::from(fd);
    s.set_nodelay(true)?;
    Ok(s)
}

/// xorshift64*: cheap, reproducible client data.
struct Rng(u64);

impl Rng {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// What one run of one scenario measured.
#[derive(Default, Clone, Debug)]
struct Measure {
    /// The scenario's main figure (conn/s, round trips/s, MB/s, held).
    value: f64,
    p50_us: f64,
    p99_us: f64,
    errors: Errors,
    master_rss_kib: f64,
    workers_private_kib: f64,
    /// The largest single process's private KiB.
    workers_private_max_kib: f64,
    workers: f64,
    /// burst: when the last client got its echo back, in ms.
    last_ms: f64,
    /// Server CPU time per connection or round trip, all its processes.
    cpu_us: f64,
}

fn percentiles(mut ns: Vec<u64>) -> (f64, f64) {
    if ns.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn elapsed_ns(t: Instant) -> u64 {
    t.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

/// `clients` threads that each run `body(i, deadline)` after a common start
/// and a warm-up; returns what each recorded.
/// Also returns the CPU seconds the server (`pid` and its children) used
/// between the end of the warm-up and the deadline.
fn timed<F>(pid: i32, clients: usize, secs: f64, body: F) -> (Vec<(u64, Vec<u64>, Errors)>, f64)
where
    F: Fn(usize, Instant, Instant, Instant) -> (u64, Vec<u64>, Errors) + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let start = Arc::new(Barrier::new(clients + 1));
    let t0 = Instant::now() + Duration::from_millis(50);
    let warm = t0 + Duration::from_secs_f64((secs / 6.0).min(0.5));
    let end = warm + Duration::from_secs_f64(secs);
    // Clients go on a little past `end`, so that the server's processes are
    // all still there when their CPU time is read at `end`.
    let stop = end + Duration::from_millis(100);
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let body = Arc::clone(&body);
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                body(i, warm, end, stop)
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(warm.saturating_duration_since(Instant::now()));
    let before = cpu_ticks(pid);
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let used = cpu_ticks(pid).saturating_sub(before) as f64 / ticks_per_sec();
    let results = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    (results, used)
}

/// utime + stime of `pid`, of the children it reaped, and of its live
/// children, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let fields = |p: i32| -> Vec<i64> {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .ok()
            .and_then(|s| {
                let rest = s[s.rfind(')')? + 2..].to_string();
                Some(rest.split(' ').filter_map(|f| f.parse().ok()).collect())
            })
            .unwrap_or_default()
    };
    // After the ')': state is field 0 (not a number, so skipped); utime,
    // stime, cutime, cstime are fields 11..15 of the rest, 10..14 here.
    let own = fields(pid);
    let mut total: i64 = own.get(10..14).map_or(0, |f| f.iter().sum());
    for child in children(pid) {
        total += fields(child)
            .get(10..12)
            .map_or(0, |f| f.iter().sum::<i64>());
    }
    total.max(0) as u64
}

fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

fn summarize(results: Vec<(u64, Vec<u64>, Errors)>, secs: f64, cpu: f64) -> Measure {
    let mut m = Measure::default();
    let mut all = Vec::new();
    let mut done = 0;
    for (n, lat, err) in results {
        done += n;
        all.extend(lat);
        m.errors.add(&err);
    }
    m.value = done as f64 / secs;
    m.cpu_us = cpu * 1e6 / done.max(1) as f64;
    (m.p50_us, m.p99_us) = percentiles(all);
    m
}

/// `conn`: connect, send 64 B, read them back, close; again.
fn conn(server: &Server, clients: usize, o: &Opts) -> Measure {
    let addr = server.addr();
    let (results, cpu) = timed(server.pid(), clients, o.secs, move |i, warm, end, stop| {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
        let (mut sent, mut got) = ([0u8; PAYLOAD], [0u8; PAYLOAD]);
        let mut lat = Vec::with_capacity(1 << 16);
        let mut done = 0;
        let mut err = Errors::default();
        loop {
            let t = Instant::now();
            if t >= stop {
                break;
            }
            rng.fill(&mut sent);
            let r = connect_from(i, addr).and_then(|mut s| {
                s.write_all(&sent)?;
                s.read_exact(&mut got)
            });
            match r {
                Ok(()) if got == sent => {
                    if t >= warm && t < end {
                        done += 1;
                        lat.push(elapsed_ns(t));
                    }
                }
                Ok(()) => err.mismatch += 1,
                Err(e) => err.count(&e),
            }
        }
        (done, lat, err)
    });
    summarize(results, o.secs, cpu)
}

/// `rtt`: `clients` persistent connections ping-ponging 64 B.
fn rtt(server: &Server, clients: usize, o: &Opts) -> Measure {
    let addr = server.addr();
    let (results, cpu) = timed(server.pid(), clients, o.secs, move |i, warm, end, stop| {
        let mut err = Errors::default();
        let mut lat = Vec::with_capacity(1 << 18);
        let mut done = 0;
        let mut s = match connect_from(i, addr) {
            Ok(s) => s,
            Err(e) => {
                err.count(&e);
                return (0, lat, err);
            }
        };
        let mut rng = Rng(0x2545_f491 ^ (i as u64 + 7));
        let (mut sent, mut got) = ([0u8; PAYLOAD], [0u8; PAYLOAD]);
        loop {
            let t = Instant::now();
            if t >= stop {
                break;
            }
            rng.fill(&mut sent);
            match s.write_all(&sent).and_then(|_| s.read_exact(&mut got)) {
                Ok(()) if got == sent => {
                    if t >= warm && t < end {
                        done += 1;
                        lat.push(elapsed_ns(t));
                    }
                }
                Ok(()) => {
                    err.mismatch += 1;
                    break;
                }
                Err(e) => {
                    err.count(&e);
                    break;
                }
            }
        }
        (done, lat, err)
    });
    summarize(results, o.secs, cpu)
}

/// The stream's bytes: a random block of a length prime to every buffer
/// size, repeated, so checking costs a memcmp.
fn pattern() -> Arc<Vec<u8>> {
    let mut block = vec![0u8; (1 << 20) + 13];
    Rng(0x5851_f42d_4c95_7f2d).fill(&mut block);
    Arc::new(block)
}

/// `stream`: 4 connections each sending `stream_mib` MiB while reading the
/// echo back; MB/s of echo, both connections' directions counted once.
fn stream(server: &Server, o: &Opts) -> Measure {
    const CONNS: usize = 4;
    let total = (o.stream_mib as u64) << 20;
    let block = pattern();
    let cpu_before = cpu_ticks(server.pid());
    let kids_before = children(server.pid()).len();
    let start = Instant::now();
    let mut threads = Vec::new();
    let mut errors = Errors::default();
    for i in 0..CONNS {
        let s = match connect_from(i, server.addr()) {
            Ok(s) => s,
            Err(e) => {
                errors.count(&e);
                continue;
            }
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let mut w = s.try_clone().expect("clone stream");
        let wblock = Arc::clone(&block);
        let writer = std::thread::spawn(move || -> io::Result<()> {
            let mut off = 0u64;
            while off < total {
                let at = (off % wblock.len() as u64) as usize;
                let n = (wblock.len() - at)
                    .min(256 << 10)
                    .min((total - off) as usize);
                w.write_all(&wblock[at..at + n])?;
                off += n as u64;
            }
            Ok(())
        });
        let rblock = Arc::clone(&block);
        let mut r = s;
        let reader = std::thread::spawn(move || -> (u64, Errors) {
            let mut err = Errors::default();
            let mut buf = vec![0u8; 256 << 10];
            let mut off = 0u64;
            while off < total {
                let want = buf.len().min((total - off) as usize);
                let n = match r.read(&mut buf[..want]) {
                    Ok(0) => {
                        err.reset += 1;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        err.count(&e);
                        break;
                    }
                };
                let mut k = 0;
                while k < n {
                    let at = ((off + k as u64) % rblock.len() as u64) as usize;
                    let m = (rblock.len() - at).min(n - k);
                    if buf[k..k + m] != rblock[at..at + m] {
                        err.mismatch += 1;
                        return (off, err);
                    }
                    k += m;
                }
                off += n as u64;
            }
            (off, err)
        });
        threads.push((writer, reader));
    }
    let mut bytes = 0;
    for (writer, reader) in threads {
        if let Ok(Err(e)) = writer.join() {
            errors.count(&e);
        }
        let (n, e) = reader.join().expect("reader thread");
        bytes += n;
        errors.add(&e);
    }
    let secs = start.elapsed().as_secs_f64();
    // Per-connection processes count once reaped (in their parent's
    // cutime): wait for that before reading the CPU time.
    let deadline = Instant::now() + Duration::from_secs(2);
    while children(server.pid()).len() > kids_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = cpu_ticks(server.pid()).saturating_sub(cpu_before) as f64 / ticks_per_sec();
    Measure {
        value: bytes as f64 / secs / 1e6,
        errors,
        // Per MB echoed.
        cpu_us: cpu * 1e6 / (bytes as f64 / 1e6).max(1.0),
        ..Measure::default()
    }
}

/// `hold`: open `hold` connections and leave them idle, measure memory, then
/// one echo on each.
fn hold(server: &Server, kind: Kind, n: usize) -> Measure {
    let mut m = Measure::default();
    let mut conns = Vec::new();
    for i in 0..n {
        match connect_from(i, server.addr()) {
            Ok(s) => conns.push(s),
            Err(e) => m.errors.count(&e),
        }
    }
    // Per-connection processes: wait until the server has forked them all.
    let want = match kind {
        Kind::Fork | Kind::ForkBase | Kind::PyForking | Kind::MinFork => conns.len(),
        _ => 0,
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while children(server.pid()).len() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the servers settle before the memory is read.
    std::thread::sleep(Duration::from_millis(300));
    let kids = children(server.pid());
    m.master_rss_kib = status_kib(server.pid(), "VmRSS:");
    m.workers = kids.len() as f64;
    let private: Vec<f64> = kids.iter().map(|&p| private_kib(p)).collect();
    m.workers_private_kib = private.iter().sum();
    m.workers_private_max_kib = private.iter().copied().fold(0.0, f64::max);

    let mut ok = 0;
    let mut rng = Rng(77);
    let mut sent = vec![[0u8; PAYLOAD]; conns.len()];
    for (s, data) in conns.iter_mut().zip(sent.iter_mut()) {
        rng.fill(data);
        if let Err(e) = s.write_all(data) {
            m.errors.count(&e);
        }
    }
    for (s, data) in conns.iter_mut().zip(&sent) {
        let mut got = [0u8; PAYLOAD];
        match s.read_exact(&mut got) {
            Ok(()) if &got == data => ok += 1,
            Ok(()) => m.errors.mismatch += 1,
            Err(e) => m.errors.count(&e),
        }
    }
    m.value = ok as f64;
    m
}

/// `burst`: `n` clients arrive at once and hold their connections: 16
/// threads connect their share, send 64 B on each, then read each echo
/// back. How many were echoed, and when (from the start of the burst).
fn burst(server: &Server, n: usize) -> Measure {
    const THREADS: usize = 16;
    let addr = server.addr();
    let go = Arc::new(Barrier::new(THREADS + 1));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                go.wait();
                let t0 = Instant::now();
                let mut err = Errors::default();
                let mut rng = Rng(0x0bad_5eed ^ (t as u64 + 1));
                let mut conns = Vec::new();
                for k in (t..n).step_by(THREADS) {
                    match connect_from(k, addr) {
                        Ok(s) => conns.push((s, [0u8; PAYLOAD])),
                        Err(e) => err.count(&e),
                    }
                }
                for (s, sent) in &mut conns {
                    rng.fill(sent);
                    if let Err(e) = s.write_all(sent) {
                        err.count(&e);
                    }
                }
                let mut lat = Vec::with_capacity(conns.len());
                for (s, sent) in &mut conns {
                    let mut got = [0u8; PAYLOAD];
                    match s.read_exact(&mut got) {
                        Ok(()) if got == *sent => lat.push(elapsed_ns(t0)),
                        Ok(()) => err.mismatch += 1,
                        Err(e) => err.count(&e),
                    }
                }
                (conns, lat, err)
            })
        })
        .collect();
    go.wait();
    let mut m = Measure::default();
    let mut lat = Vec::new();
    let mut held = Vec::new();
    for t in threads {
        let (conns, l, e) = t.join().expect("burst thread");
        lat.extend(l);
        m.errors.add(&e);
        held.push(conns);
    }
    m.value = lat.len() as f64;
    m.last_ms = lat.iter().copied().max().unwrap_or(0) as f64 / 1e6;
    (m.p50_us, m.p99_us) = percentiles(lat);
    // While every client still holds its connection.
    m.workers = children(server.pid()).len() as f64;
    drop(held);
    m
}

/// The direct children of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn status_kib(pid: i32, key: &str) -> f64 {
    field_kib(&format!("/proc/{pid}/status"), &[key])
}

/// Memory only this process maps: Private_Clean + Private_Dirty.
fn private_kib(pid: i32) -> f64 {
    field_kib(
        &format!("/proc/{pid}/smaps_rollup"),
        &["Private_Clean:", "Private_Dirty:"],
    )
}

fn field_kib(path: &str, keys: &[&str]) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| keys.iter().any(|k| l.starts_with(k)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------- report

type Results = BTreeMap<(Case, Target), Vec<Measure>>;

/// Raises this process's descriptor limit for the clients of the largest
/// hold (and the burst); a hold the hard limit cannot carry is left out,
/// with a word.
fn make_room_for_clients(o: &mut Opts) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let most = o.hold.iter().copied().chain([o.burst]).max().unwrap_or(0) as u64;
    let _ = setrlimit(
        Resource::RLIMIT_NOFILE,
        (most + 1024).max(soft).min(hard),
        hard,
    );
    o.hold.retain(|&n| {
        let fits = n as u64 + 1024 <= hard;
        if !fits {
            println!("hold {n} left out: RLIMIT_NOFILE's hard limit is {hard}");
        }
        fits
    });
}

fn run(o: &Opts) {
    println!("{}", machine());
    println!(
        "rounds {}, {} s per timed run, conn with {} clients, rtt with {:?}, prefork pools {:?}, streams of {} MiB, hold {:?}, burst {}, udp with {:?} clients\n",
        o.rounds, o.secs, o.clients, o.rtt_clients, o.pools, o.stream_mib, o.hold, o.burst, o.udp_clients
    );
    let mut results = Results::new();
    for round in 1..=o.rounds {
        for case in o.cases() {
            // Each round starts one server later, so that none always runs
            // first (just after another scenario's teardown) or last.
            let targets = o.targets(case);
            let n = targets.len();
            for j in 0..n {
                let t = targets[(j + round - 1) % n];
                let server = Server::start(t, case, o);
                let m = match case.scenario {
                    Scenario::Conn => conn(&server, case.clients, o),
                    Scenario::Rtt => rtt(&server, case.clients, o),
                    Scenario::Stream => stream(&server, o),
                    Scenario::Hold => hold(&server, t.kind, case.clients),
                    Scenario::Burst => burst(&server, case.clients),
                    Scenario::Udp => udp(&server, case.clients, o),
                };
                drop(server);
                println!(
                    "round {round} {:<11} {:<16} {:>12.1}  p50 {:>8} us  p99 {:>8} us  cpu {:>6} us/op  errors {}",
                    case.label(),
                    t.name(),
                    m.value,
                    micros(m.p50_us),
                    micros(m.p99_us),
                    micros(m.cpu_us),
                    m.errors.describe()
                );
                results.entry((case, t)).or_default().push(m);
            }
        }
    }
    let table = report(&results);
    println!("\n{table}");
    if let Some(path) = &o.out {
        if let Err(e) = std::fs::write(path, &table) {
            eprintln!("load: cannot write {}: {e}", path.display());
        }
    }
    // The peers are measured, not judged; echo-forkd must carry every
    // scenario without a single error.
    let failed: Vec<String> = results
        .iter()
        .filter(|((_, t), ms)| t.kind.is_ours() && ms.iter().any(|m| m.errors.total() > 0))
        .map(|((c, t), _)| format!("{} {}", c.label(), t.name()))
        .collect();
    if !failed.is_empty() {
        eprintln!("load: echo-forkd had errors in: {}", failed.join(", "));
        std::process::exit(1);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A latency, or a dash where the scenario has none.
fn micros(us: f64) -> String {
    if us.is_nan() || us == 0.0 {
        "–".into()
    } else {
        format!("{us:.1}")
    }
}

fn unit(s: Scenario) -> &'static str {
    match s {
        Scenario::Conn => "conn/s",
        Scenario::Rtt => "round trips/s",
        Scenario::Stream => "MB/s",
        Scenario::Hold => "echoed after holding",
        Scenario::Burst => "echoed",
        Scenario::Udp => "replies/s",
    }
}

fn med(ms: &[Measure], f: impl Fn(&Measure) -> f64) -> f64 {
    median(ms.iter().map(f).collect())
}

fn report(results: &Results) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| case | server | median | p50 µs | p99 µs | server CPU µs per op | errors |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---|");
    for ((case, target), ms) in results {
        if case.scenario == Scenario::Burst {
            continue;
        }
        let mut errors = Errors::default();
        ms.iter().for_each(|m| errors.add(&m.errors));
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} {} | {} | {} | {} | {} |",
            case.label(),
            target.name(),
            med(ms, |m| m.value),
            unit(case.scenario),
            micros(med(ms, |m| m.p50_us)),
            micros(med(ms, |m| m.p99_us)),
            micros(med(ms, |m| m.cpu_us)),
            errors.describe()
        );
    }
    let bursts: Vec<_> = results
        .iter()
        .filter(|((c, _), _)| c.scenario == Scenario::Burst)
        .collect();
    if !bursts.is_empty() {
        let _ = writeln!(
            t,
            "\n| burst: clients arriving at once, holding | server | echoed | p50 ms | p99 ms | last ms | processes | errors |"
        );
        let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---|");
        for ((case, target), ms) in bursts {
            let mut errors = Errors::default();
            ms.iter().for_each(|m| errors.add(&m.errors));
            let _ = writeln!(
                t,
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
                case.label(),
                target.name(),
                med(ms, |m| m.value),
                med(ms, |m| m.p50_us) / 1e3,
                med(ms, |m| m.p99_us) / 1e3,
                med(ms, |m| m.last_ms),
                med(ms, |m| m.workers),
                errors.describe()
            );
        }
    }
    let holds: Vec<_> = results
        .iter()
        .filter(|((c, _), _)| c.scenario == Scenario::Hold)
        .collect();
    let mut shown = None;
    for ((case, target), ms) in holds {
        if shown != Some(case.clients) {
            shown = Some(case.clients);
            let _ = writeln!(
                t,
                "\n| memory, {} idle connections held | master RSS KiB | processes | their private KiB | per process KiB | largest KiB |",
                case.clients
            );
            let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|");
        }
        {
            let rss = med(ms, |m| m.master_rss_kib);
            let n = med(ms, |m| m.workers);
            let private = med(ms, |m| m.workers_private_kib);
            let largest = med(ms, |m| m.workers_private_max_kib);
            // A single-process server (threads or tasks) has everything in
            // the master's RSS; there are no per-connection processes.
            let _ = if n > 0.0 {
                writeln!(
                    t,
                    "| {} | {rss:.0} | {n:.0} | {private:.0} | {:.1} | {largest:.0} |",
                    target.name(),
                    private / n
                )
            } else {
                writeln!(t, "| {} | {rss:.0} | – | – | – | – |", target.name())
            };
        }
    }
    let _ = writeln!(t, "\n| ratio (median of the per-round ratios) | value |");
    let _ = writeln!(t, "|---|---:|");
    for (label, r) in ratios(results) {
        let _ = writeln!(t, "| {label} | {r:.2}× |");
    }
    t
}

/// Each of echo-forkd's targets against the references of its case: the
/// async runtime, the floor of its model (min-fork for fork, the bare
/// epoll loop for all), Python's forking server, and the baseline build.
fn ratios(results: &Results) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for ((case, a), xs) in results {
        if !a.kind.is_ours() || matches!(case.scenario, Scenario::Hold | Scenario::Burst) {
            continue;
        }
        let mut refs = vec![Kind::Tokio, Kind::Epoll, Kind::MinUdp, Kind::PyUdp];
        match a.kind {
            Kind::Fork => refs.extend([Kind::MinFork, Kind::PyForking, Kind::ForkBase]),
            Kind::Prefork => refs.extend([Kind::PyForking, Kind::PreforkBase]),
            Kind::Event => refs.push(Kind::EventBase),
            _ => {}
        }
        for b in refs {
            // The baseline runs the same pool sizes.
            let pool = if b.is_prefork() { a.pool } else { 0 };
            let Some(ys) = results.get(&(*case, Target { kind: b, pool })) else {
                continue;
            };
            let by_round = |f: fn(&Measure) -> f64| {
                median(xs.iter().zip(ys).map(|(x, y)| f(x) / f(y)).collect())
            };
            let name = format!("{} {} / {}", case.label(), a.name(), b.name());
            out.push((name.clone(), by_round(|m| m.value)));
            if case.scenario == Scenario::Rtt && case.clients == 1 {
                out.push((format!("{name}, p50 latency"), by_round(|m| m.p50_us)));
            }
        }
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("machine: {cpus} CPUs ({cpu}), Linux {}", kernel.trim())
}

// -------------------------------------------------------------------- udp

/// Datagrams in flight at once, over all UDP clients: well within a
/// socket's default receive buffer (some 270 small datagrams on Linux),
/// so that a server that keeps up loses none.
const UDP_IN_FLIGHT: usize = 128;
/// Datagrams a UDP client sends or reads per system call at most.
const UDP_BATCH: usize = 32;
/// How long a UDP client waits for a reply before it counts the window
/// as lost and sends a new one.
const UDP_LOST_AFTER: Duration = Duration::from_millis(200);

/// A UDP server socket on 127.0.0.1:0; prints the port.
fn bench_udp_socket() -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP");
    println!("{}", s.local_addr().expect("local addr").port());
    s
}

/// The minimal tokio UDP echo: one task, `recv_from` then `send_to`.
fn serve_tokio_udp() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let std_socket = bench_udp_socket();
        std_socket.set_nonblocking(true).expect("non-blocking");
        let socket = tokio::net::UdpSocket::from_std(std_socket).expect("tokio socket");
        let mut buf = vec![0u8; 65_536];
        loop {
            if let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
}

/// The floor of a UDP echo: a blocking `recv_from`/`send_to` loop.
fn serve_udp() {
    let s = bench_udp_socket();
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}

/// A datagram's bytes: its number, then bytes drawn from it, so that a
/// reply is checked against what was sent without keeping it.
fn udp_payload(client: usize, seq: u64) -> [u8; PAYLOAD] {
    let mut p = [0u8; PAYLOAD];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    Rng(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (client as u64 + 1) | 1).fill(&mut p[8..]);
    p
}

/// `udp`: `clients` sockets (from 127.0.0.1 to .16), each keeping a
/// window of 64-byte datagrams in flight; a reply is checked, then
/// answered with the next datagram. A window with no reply within
/// [`UDP_LOST_AFTER`] counts its datagrams as lost (timeouts) and starts
/// again.
fn udp(server: &Server, clients: usize, o: &Opts) -> Measure {
    let addr = server.addr();
    let window = (UDP_IN_FLIGHT / clients).clamp(1, 32);
    let (results, cpu) = timed(server.pid(), clients, o.secs, move |i, warm, end, stop| {
        let mut err = Errors::default();
        let mut lat = Vec::with_capacity(1 << 18);
        let mut done = 0;
        let from = Ipv4Addr::new(127, 0, 0, 1 + (i % SOURCES as usize) as u8);
        let s = match std::net::UdpSocket::bind((from, 0)).and_then(|s| {
            s.connect(addr)?;
            s.set_read_timeout(Some(UDP_LOST_AFTER))?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                err.count(&e);
                return (0, lat, err);
            }
        };
        // Sent and not yet answered: sequence number → when.
        let mut flying: std::collections::HashMap<u64, Instant> =
            std::collections::HashMap::with_capacity(window * 2);
        let mut next = 0u64;
        // A flood is sent and read a batch per system call (sendmmsg,
        // recvmmsg), so that the clients are not what is measured.
        let fd = s.as_raw_fd();
        let mut send_h = MultiHeaders::<SockaddrIn>::preallocate(UDP_BATCH, None);
        let mut recv_h = MultiHeaders::<SockaddrIn>::preallocate(UDP_BATCH, None);
        let mut out = [[0u8; PAYLOAD]; UDP_BATCH];
        let mut back = [[0u8; 2 * PAYLOAD]; UDP_BATCH];
        let to = [None::<SockaddrIn>; UDP_BATCH];
        while Instant::now() < stop {
            let k = window.saturating_sub(flying.len()).min(UDP_BATCH);
            if k > 0 {
                for (j, o) in out[..k].iter_mut().enumerate() {
                    *o = udp_payload(i, next + j as u64);
                }
                let slices: Vec<[IoSlice<'_>; 1]> =
                    out[..k].iter().map(|o| [IoSlice::new(o)]).collect();
                let t = Instant::now();
                match sendmmsg(
                    fd,
                    &mut send_h,
                    slices.iter(),
                    &to[..k],
                    [],
                    MsgFlags::empty(),
                ) {
                    Ok(r) => {
                        for _ in r {
                            flying.insert(next, t);
                            next += 1;
                        }
                    }
                    Err(e) => err.count(&e.into()),
                }
            }
            let mut lens = [0usize; UDP_BATCH];
            let got = {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                    back.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                recvmmsg(
                    fd,
                    &mut recv_h,
                    iovs.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                )
                .map(|r| {
                    let mut n = 0;
                    for (j, m) in r.enumerate() {
                        lens[j] = m.bytes;
                        n += 1;
                    }
                    n
                })
            };
            match got {
                Ok(n) => {
                    for (b, &len) in back[..n].iter().zip(&lens) {
                        let seq = u64::from_le_bytes(b[..8].try_into().unwrap_or_default());
                        match flying.remove(&seq) {
                            Some(t) if len == PAYLOAD && b[..len] == udp_payload(i, seq) => {
                                if t >= warm && t < end {
                                    done += 1;
                                    lat.push(elapsed_ns(t));
                                }
                            }
                            _ => err.mismatch += 1,
                        }
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => {
                    // Lost in the warm-up or the timed part: an error.
                    if Instant::now() < end {
                        err.timeout += flying.len() as u64;
                    }
                    flying.clear();
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    err.count(&e.into());
                    flying.clear();
                }
            }
        }
        (done, lat, err)
    });
    summarize(results, o.secs, cpu)
}
