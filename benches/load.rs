//! The load benchmark: `cargo bench [-- OPTIONS]`.
//!
//! It starts each server fresh for each run, on 127.0.0.1, and drives it
//! from this process with blocking client threads: echo-forkd in prefork
//! and fork mode, Python's `ForkingTCPServer` and `ThreadingTCPServer`
//! (benches/peers.py), and a minimal tokio server (this binary, re-run as
//! `serve-tokio`). Servers take turns within each round, and each round
//! starts one server later (A B C, B C A, C A B …), so that a noisy
//! neighbour hurts them all alike; the figures that count are ratios within
//! a round, of which the medians are reported.
//! Every echoed byte is checked. See PERFORMANCE.md.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;

const PAYLOAD: usize = 64;
/// Client source addresses: 127.0.0.1 to 127.0.0.16, so that the client's
/// ephemeral ports never run out (one address gives out near 14k conn/s).
const SOURCES: u8 = 16;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BIN: &str = env!("CARGO_BIN_EXE_echo-forkd");

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve-tokio") {
        return serve_tokio();
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    run(&opts);
}

const USAGE: &str = "usage: cargo bench --bench load -- [OPTIONS]
  --rounds N          rounds of every server in turn (default 3)
  --secs S            seconds per timed run (default 3)
  --scenarios LIST    conn,rtt,rtt1,stream,hold (default: all)
  --servers LIST      prefork,fork,py-forking,py-threading,tokio (default: all)
  --clients N         clients for conn and rtt (default 50)
  --stream-mib N      MiB each stream connection sends (default 256)
  --hold N            idle connections held (default 100)
  --prefork-workers N workers for prefork in conn (default 8)
  --out FILE          also write the markdown table here
  --baseline BIN      also run this echo-forkd build, after each of ours
  --quick             1 round of 1 s, 32 MiB streams: a smoke test";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Prefork,
    Fork,
    PyForking,
    PyThreading,
    Tokio,
    /// `--baseline`: another echo-forkd build, for before/after figures.
    PreforkBase,
    ForkBase,
}

impl Kind {
    /// An echo-forkd build, as opposed to a peer.
    fn is_ours(self) -> bool {
        matches!(
            self,
            Kind::Prefork | Kind::Fork | Kind::PreforkBase | Kind::ForkBase
        )
    }

    const ALL: [Kind; 5] = [
        Kind::Prefork,
        Kind::Fork,
        Kind::PyForking,
        Kind::PyThreading,
        Kind::Tokio,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Prefork => "prefork",
            Kind::Fork => "fork",
            Kind::PyForking => "py-forking",
            Kind::PyThreading => "py-threading",
            Kind::Tokio => "tokio",
            Kind::PreforkBase => "prefork-base",
            Kind::ForkBase => "fork-base",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Conn,
    Rtt,
    Rtt1,
    Stream,
    Hold,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Conn,
        Scenario::Rtt,
        Scenario::Rtt1,
        Scenario::Stream,
        Scenario::Hold,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::Conn => "conn",
            Scenario::Rtt => "rtt",
            Scenario::Rtt1 => "rtt1",
            Scenario::Stream => "stream",
            Scenario::Hold => "hold",
        }
    }
}

struct Opts {
    rounds: usize,
    secs: f64,
    scenarios: Vec<Scenario>,
    servers: Vec<Kind>,
    clients: usize,
    stream_mib: usize,
    hold: usize,
    prefork_workers: usize,
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
            stream_mib: 256,
            hold: 100,
            prefork_workers: 8,
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
                "--stream-mib" => o.stream_mib = number(arg, value()?)?,
                "--hold" => o.hold = number(arg, value()?)?,
                "--prefork-workers" => o.prefork_workers = number(arg, value()?)?,
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
                    _ => {}
                }
            }
            o.servers = with;
        }
        if o.rounds == 0 || o.secs <= 0.0 || o.clients == 0 {
            return Err("rounds, secs and clients must be positive".into());
        }
        Ok(o)
    }
}

fn number(arg: &str, v: &str) -> Result<usize, String> {
    v.parse().map_err(|_| format!("{arg}: not a number: {v}"))
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
    fn start(kind: Kind, scenario: Scenario, o: &Opts) -> Server {
        let mut cmd = match kind {
            Kind::Prefork | Kind::Fork | Kind::PreforkBase | Kind::ForkBase => {
                let bin = match (kind, &o.baseline) {
                    (Kind::PreforkBase | Kind::ForkBase, Some(b)) => b.as_path(),
                    _ => Path::new(BIN),
                };
                let mut c = Command::new(bin);
                c.args(["-f", "-l", "127.0.0.1:0", "--log-level", "info"]);
                c.args(daemon_args(kind, scenario, o));
                c.stderr(Stdio::piped()).stdout(Stdio::null());
                c
            }
            Kind::PyForking | Kind::PyThreading => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.py");
                let mut c = Command::new("python3");
                c.arg(script)
                    .arg(if kind == Kind::PyForking {
                        "forking"
                    } else {
                        "threading"
                    })
                    .stdout(Stdio::piped());
                c
            }
            Kind::Tokio => {
                let mut c = Command::new(std::env::current_exe().expect("own path"));
                c.arg("serve-tokio").stdout(Stdio::piped());
                c
            }
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", kind.name()));
        let port = match kind {
            Kind::Prefork | Kind::Fork | Kind::PreforkBase | Kind::ForkBase => {
                let err = child.stderr.take().expect("piped stderr");
                daemon_port(err)
            }
            _ => {
                let out = child.stdout.take().expect("piped stdout");
                let mut line = String::new();
                let _ = BufReader::new(out).read_line(&mut line);
                line.trim().parse().ok()
            }
        };
        let mut server = Server { child, port: 0 };
        server.port =
            port.unwrap_or_else(|| panic!("{} did not say which port it listens on", kind.name()));
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

/// echo-forkd's settings for a scenario: what an operator would give it to
/// carry that load.
fn daemon_args(kind: Kind, scenario: Scenario, o: &Opts) -> Vec<String> {
    if matches!(kind, Kind::Fork | Kind::ForkBase) {
        return ["-m", "fork", "--max-children", "1024"]
            .map(String::from)
            .to_vec();
    }
    // A fixed pool: the figures are then the pool's, not its growth's.
    let workers = match scenario {
        Scenario::Conn => o.prefork_workers,
        Scenario::Rtt => o.clients + 2,
        Scenario::Rtt1 => 2,
        Scenario::Stream => 6,
        Scenario::Hold => o.hold + 4,
    };
    let w = workers.to_string();
    let max = workers.max(256).to_string();
    [
        "-m",
        "prefork",
        "-w",
        &w,
        "--max-workers",
        &max,
        "--min-spare",
        "0",
    ]
    .map(String::from)
    .to_vec()
}

/// Reads echo-forkd's log until `ready`; returns the port of its `listening
/// on` line and leaves a thread draining the rest.
fn daemon_port(err: std::process::ChildStderr) -> Option<u16> {
    let mut lines = BufReader::new(err).lines();
    let mut port = None;
    for line in lines.by_ref() {
        let line = line.ok()?;
        if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
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

fn serve_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("local addr").port());
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
    /// Server CPU time per connection or round trip, all its processes.
    cpu_us: f64,
}

fn percentiles(mut ns: Vec<u32>) -> (f64, f64) {
    if ns.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn elapsed_ns(t: Instant) -> u32 {
    t.elapsed().as_nanos().min(u32::MAX as u128) as u32
}

/// `clients` threads that each run `body(i, deadline)` after a common start
/// and a warm-up; returns what each recorded.
/// Also returns the CPU seconds the server (`pid` and its children) used
/// between the end of the warm-up and the deadline.
fn timed<F>(pid: i32, clients: usize, secs: f64, body: F) -> (Vec<(u64, Vec<u32>, Errors)>, f64)
where
    F: Fn(usize, Instant, Instant, Instant) -> (u64, Vec<u32>, Errors) + Send + Sync + 'static,
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

fn summarize(results: Vec<(u64, Vec<u32>, Errors)>, secs: f64, cpu: f64) -> Measure {
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
fn conn(server: &Server, o: &Opts) -> Measure {
    let addr = server.addr();
    let (results, cpu) = timed(
        server.pid(),
        o.clients,
        o.secs,
        move |i, warm, end, stop| {
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
        },
    );
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
fn hold(server: &Server, kind: Kind, o: &Opts) -> Measure {
    let mut m = Measure::default();
    let mut conns = Vec::new();
    for i in 0..o.hold {
        match connect_from(i, server.addr()) {
            Ok(s) => conns.push(s),
            Err(e) => m.errors.count(&e),
        }
    }
    // Per-connection processes: wait until the server has forked them all.
    let want = match kind {
        Kind::Fork | Kind::ForkBase | Kind::PyForking => conns.len(),
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

fn run(o: &Opts) {
    println!("{}", machine());
    println!(
        "rounds {}, {} s per timed run, {} clients, streams of {} MiB, hold {}\n",
        o.rounds, o.secs, o.clients, o.stream_mib, o.hold
    );
    let mut results: BTreeMap<(Scenario, Kind), Vec<Measure>> = BTreeMap::new();
    for round in 1..=o.rounds {
        for &scenario in &o.scenarios {
            // Each round starts one server later, so that none always runs
            // first (just after another scenario's teardown) or last.
            let n = o.servers.len();
            for j in 0..n {
                let kind = o.servers[(j + round - 1) % n];
                let server = Server::start(kind, scenario, o);
                let m = match scenario {
                    Scenario::Conn => conn(&server, o),
                    Scenario::Rtt => rtt(&server, o.clients, o),
                    Scenario::Rtt1 => rtt(&server, 1, o),
                    Scenario::Stream => stream(&server, o),
                    Scenario::Hold => hold(&server, kind, o),
                };
                drop(server);
                println!(
                    "round {round} {:<6} {:<12} {:>12.1}  p50 {:>8} us  p99 {:>8} us  cpu {:>6} us/op  errors {}",
                    scenario.name(),
                    kind.name(),
                    m.value,
                    micros(m.p50_us),
                    micros(m.p99_us),
                    micros(m.cpu_us),
                    m.errors.describe()
                );
                results.entry((scenario, kind)).or_default().push(m);
            }
        }
    }
    let table = report(o, &results);
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
        .filter(|((_, k), ms)| k.is_ours() && ms.iter().any(|m| m.errors.total() > 0))
        .map(|((s, k), _)| format!("{} {}", s.name(), k.name()))
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
        Scenario::Rtt | Scenario::Rtt1 => "round trips/s",
        Scenario::Stream => "MB/s",
        Scenario::Hold => "echoed after holding",
    }
}

fn report(o: &Opts, results: &BTreeMap<(Scenario, Kind), Vec<Measure>>) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| scenario | server | median | p50 µs | p99 µs | server CPU µs per op | errors |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---|");
    for &s in &o.scenarios {
        for &k in &o.servers {
            let Some(ms) = results.get(&(s, k)) else {
                continue;
            };
            let mut errors = Errors::default();
            ms.iter().for_each(|m| errors.add(&m.errors));
            let value = median(ms.iter().map(|m| m.value).collect());
            let label = match s {
                Scenario::Conn | Scenario::Rtt => format!("{} c={}", s.name(), o.clients),
                Scenario::Rtt1 => "rtt c=1".into(),
                Scenario::Stream => "stream c=4".into(),
                Scenario::Hold => format!("hold {}", o.hold),
            };
            let _ = writeln!(
                t,
                "| {label} | {} | {value:.0} {} | {} | {} | {} | {} |",
                k.name(),
                unit(s),
                micros(median(ms.iter().map(|m| m.p50_us).collect())),
                micros(median(ms.iter().map(|m| m.p99_us).collect())),
                micros(median(ms.iter().map(|m| m.cpu_us).collect())),
                errors.describe()
            );
        }
    }
    if o.scenarios.contains(&Scenario::Hold) {
        let _ = writeln!(
            t,
            "\n| memory, {} idle connections held | master RSS KiB | processes | their private KiB | per process KiB | largest KiB |",
            o.hold
        );
        let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|");
        for &k in &o.servers {
            let Some(ms) = results.get(&(Scenario::Hold, k)) else {
                continue;
            };
            let rss = median(ms.iter().map(|m| m.master_rss_kib).collect());
            let n = median(ms.iter().map(|m| m.workers).collect());
            let private = median(ms.iter().map(|m| m.workers_private_kib).collect());
            let largest = median(ms.iter().map(|m| m.workers_private_max_kib).collect());
            // A single-process server (threads or tasks) has everything in
            // the master's RSS; there are no per-connection processes.
            let _ = if n > 0.0 {
                writeln!(
                    t,
                    "| {} | {rss:.0} | {n:.0} | {private:.0} | {:.1} | {largest:.0} |",
                    k.name(),
                    private / n
                )
            } else {
                writeln!(t, "| {} | {rss:.0} | – | – | – | – |", k.name())
            };
        }
    }
    let _ = writeln!(t, "\n| ratio (median of the per-round ratios) | value |");
    let _ = writeln!(t, "|---|---:|");
    let pairs = [
        (Scenario::Conn, Kind::Prefork, Kind::PreforkBase),
        (Scenario::Conn, Kind::Fork, Kind::ForkBase),
        (Scenario::Rtt, Kind::Prefork, Kind::PreforkBase),
        (Scenario::Rtt1, Kind::Prefork, Kind::PreforkBase),
        (Scenario::Stream, Kind::Prefork, Kind::PreforkBase),
        (Scenario::Conn, Kind::Prefork, Kind::PyForking),
        (Scenario::Conn, Kind::Prefork, Kind::Tokio),
        (Scenario::Conn, Kind::Fork, Kind::PyForking),
        (Scenario::Rtt, Kind::Prefork, Kind::Tokio),
        (Scenario::Rtt, Kind::Fork, Kind::Tokio),
        (Scenario::Rtt1, Kind::Prefork, Kind::Tokio),
        (Scenario::Stream, Kind::Prefork, Kind::Tokio),
        (Scenario::Stream, Kind::Fork, Kind::Tokio),
    ];
    for (s, a, b) in pairs {
        let (Some(x), Some(y)) = (results.get(&(s, a)), results.get(&(s, b))) else {
            continue;
        };
        let ratios: Vec<f64> = x.iter().zip(y).map(|(x, y)| x.value / y.value).collect();
        let _ = writeln!(
            t,
            "| {} {} / {} | {:.2}× |",
            s.name(),
            a.name(),
            b.name(),
            median(ratios)
        );
        if s == Scenario::Rtt1 {
            let p: Vec<f64> = x.iter().zip(y).map(|(x, y)| x.p50_us / y.p50_us).collect();
            let _ = writeln!(
                t,
                "| rtt1 p50 latency {} / {} | {:.2}× |",
                a.name(),
                b.name(),
                median(p)
            );
        }
    }
    t
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
