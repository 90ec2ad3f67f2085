//! The load: client threads for each scenario, every echoed byte checked,
//! their errors, latencies and the server's CPU time and minor page faults.

use super::*;
use std::sync::RwLock;

#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Errors {
    pub(crate) refused: u64,
    pub(crate) reset: u64,
    pub(crate) timeout: u64,
    pub(crate) mismatch: u64,
    pub(crate) other: u64,
}

impl Errors {
    pub(crate) fn count(&mut self, e: &io::Error) {
        use io::ErrorKind::*;
        match e.kind() {
            ConnectionRefused => self.refused += 1,
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => self.reset += 1,
            TimedOut | WouldBlock => self.timeout += 1,
            _ if e.raw_os_error() == Some(libc::EINPROGRESS) => self.timeout += 1,
            _ => self.other += 1,
        }
    }

    pub(crate) fn add(&mut self, o: &Errors) {
        self.refused += o.refused;
        self.reset += o.reset;
        self.timeout += o.timeout;
        self.mismatch += o.mismatch;
        self.other += o.other;
    }

    pub(crate) fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.mismatch + self.other
    }

    pub(crate) fn describe(&self) -> String {
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
pub(crate) fn connect_from(i: usize, to: SocketAddrV4) -> io::Result<TcpStream> {
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
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn fill(&mut self, buf: &mut [u8]) {
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
pub(crate) struct Measure {
    /// The scenario's main figure (conn/s, round trips/s, MB/s, held).
    pub(crate) value: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) errors: Errors,
    pub(crate) master_rss_kib: f64,
    pub(crate) workers_private_kib: f64,
    /// The largest single process's private KiB.
    pub(crate) workers_private_max_kib: f64,
    pub(crate) workers: f64,
    /// burst: when the last client got its echo back, in ms.
    pub(crate) last_ms: f64,
    /// Server CPU time per connection or round trip, all its processes
    /// (reload: per connection held, from the signal until the hand-over
    /// was done).
    pub(crate) cpu_us: f64,
    /// Server minor page faults per connection or round trip (per MB in
    /// `stream`), all its processes, taken as `cpu_us` is (see [`Usage`]);
    /// NaN where no interval is measured (`hold`).
    pub(crate) faults: f64,
    /// reload: connections held (echoed once) when the signal was sent.
    pub(crate) held: f64,
    /// reload: the longest single ping's wait, in µs.
    pub(crate) max_us: f64,
    /// reload: the client's own CPU time over the hand-over, as a share
    /// of one CPU (near 1: the client, not the server, sets the pace).
    pub(crate) client_cpu: f64,
}

pub(crate) fn percentiles(mut ns: Vec<u64>) -> (f64, f64) {
    if ns.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

pub(crate) fn elapsed_ns(t: Instant) -> u64 {
    t.elapsed().as_nanos().min(u64::MAX as u128) as u64
}

/// When the clients of [`timed`] stop, and how long they keep what they
/// hold: they send nothing new from `end` on, and keep their connections
/// open until the server's usage has been read. A per-connection process
/// that ends while `/proc` is walked is counted in neither its own entry
/// nor its parent's yet; one that waits idle for its client is counted, and
/// does not slow the walk.
#[derive(Clone)]
pub(crate) struct Stop {
    end: Instant,
    /// Held for writing by [`timed`] until it has read the usage.
    gate: Arc<RwLock<()>>,
}

impl Stop {
    /// Clients stop at `end`.
    pub(crate) fn new(end: Instant) -> Stop {
        Stop {
            end,
            gate: Arc::new(RwLock::new(())),
        }
    }

    /// Held while the server's usage is read: clients that [`Stop::hold`]
    /// keep their connections until it is dropped.
    pub(crate) fn measuring(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a client that looked at the clock at `t` stops.
    pub(crate) fn reached(&self, t: Instant) -> bool {
        t >= self.end
    }

    /// Waits until the server's usage has been read (a client holding a
    /// connection calls it before it closes it).
    pub(crate) fn hold(&self) {
        drop(self.gate.read());
    }
}

/// `clients` threads that each run `body(i, deadline)` after a common start
/// and a warm-up; returns what each recorded.
/// Also returns what the server (`pid` and its children) used between the
/// end of the warm-up and the deadline: CPU and minor page faults.
pub(crate) fn timed<F>(
    pid: i32,
    clients: usize,
    secs: f64,
    body: F,
) -> (Vec<(u64, Vec<u64>, Errors)>, Used)
where
    F: Fn(usize, Instant, Instant, &Stop) -> (u64, Vec<u64>, Errors) + Send + Sync + 'static,
{
    let body = Arc::new(body);
    let start = Arc::new(Barrier::new(clients + 1));
    let t0 = Instant::now() + Duration::from_millis(50);
    let warm = t0 + Duration::from_secs_f64((secs / 6.0).min(0.5));
    let end = warm + Duration::from_secs_f64(secs);
    let stop = Stop::new(end);
    let measuring = stop.measuring();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let body = Arc::clone(&body);
            let start = Arc::clone(&start);
            let stop = stop.clone();
            std::thread::spawn(move || {
                start.wait();
                body(i, warm, end, &stop)
            })
        })
        .collect();
    start.wait();
    std::thread::sleep(warm.saturating_duration_since(Instant::now()));
    let before = Usage::of(pid);
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let used = Usage::of(pid).since(before);
    drop(measuring);
    let results = threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .collect();
    (results, used)
}

/// What the server has used so far: of `pid` itself and of the children
/// it reaped (waited for: `cutime`, `cstime`, `cminflt` of
/// `/proc/PID/stat` count them, whole, once reaped), and of its live
/// children (their own; a zombie still counts here until reaped). Read
/// twice, it gives what was used in between, a child reaped in between
/// included: what it had used at the first reading was counted then as a
/// live child's, and all of it is in the parent's `c…` fields at the
/// second. A live child's CPU time is read in nanoseconds
/// (`/proc/PID/schedstat`): its `stat` fields are whole clock ticks, and
/// 500 children each using 3 ms in the interval read 0 ticks each.
/// CPU and faults are read in the one walk of `/proc`, so that both count
/// the same processes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    /// CPU time, in ns.
    pub(crate) cpu_ns: u64,
    /// Minor page faults: minflt (+ cminflt of `pid`).
    pub(crate) minflt: u64,
}

/// What the server used between two readings of [`Usage`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Used {
    pub(crate) cpu_secs: f64,
    pub(crate) faults: f64,
}

impl Usage {
    pub(crate) fn of(pid: i32) -> Usage {
        let fields = |p: i32| -> Vec<i64> {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s[s.rfind(')')? + 2..].to_string();
                    Some(rest.split(' ').filter_map(|f| f.parse().ok()).collect())
                })
                .unwrap_or_default()
        };
        // After the ')': state is field 0 (not a number, so skipped); of
        // the rest, minflt and cminflt are fields 7 and 8, 6 and 7 here;
        // utime, stime, cutime, cstime fields 11..15, 10..14 here.
        let sum = |f: &[i64], at: std::ops::Range<usize>| -> i64 {
            f.get(at).map_or(0, |f| f.iter().sum())
        };
        let tick_ns = 1e9 / ticks_per_sec();
        let own = fields(pid);
        let mut cpu_ns = (sum(&own, 10..14).max(0) as f64 * tick_ns) as u64;
        let mut minflt = sum(&own, 6..8);
        for child in children(pid) {
            let f = fields(child);
            // The children of every server measured are single-threaded:
            // the leader's run time is the process's.
            cpu_ns += std::fs::read_to_string(format!("/proc/{child}/schedstat"))
                .ok()
                .and_then(|s| s.split(' ').next()?.parse::<u64>().ok())
                .unwrap_or_else(|| (sum(&f, 10..12).max(0) as f64 * tick_ns) as u64);
            minflt += sum(&f, 6..7);
        }
        Usage {
            cpu_ns,
            minflt: minflt.max(0) as u64,
        }
    }

    /// What was used since `before`.
    pub(crate) fn since(self, before: Usage) -> Used {
        Used {
            cpu_secs: self.cpu_ns.saturating_sub(before.cpu_ns) as f64 / 1e9,
            faults: self.minflt.saturating_sub(before.minflt) as f64,
        }
    }
}

pub(crate) fn ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64
}

pub(crate) fn summarize(results: Vec<(u64, Vec<u64>, Errors)>, secs: f64, used: Used) -> Measure {
    let mut m = Measure::default();
    let mut all = Vec::new();
    let mut done = 0;
    for (n, lat, err) in results {
        done += n;
        all.extend(lat);
        m.errors.add(&err);
    }
    m.value = done as f64 / secs;
    m.cpu_us = used.cpu_secs * 1e6 / done.max(1) as f64;
    m.faults = used.faults / done.max(1) as f64;
    (m.p50_us, m.p99_us) = percentiles(all);
    m
}

/// `conn`: connect, send 64 B, read them back, close; again (the
/// event-driven client, [`ev`]).
pub(crate) fn conn(server: &Server, clients: usize, o: &Opts) -> Measure {
    let (results, used) = timed_ev(Mode::Conn, server, clients, o.secs);
    summarize(results, o.secs, used)
}

/// `rtt`: `clients` persistent connections ping-ponging 64 B.
pub(crate) fn rtt(server: &Server, clients: usize, o: &Opts) -> Measure {
    let (results, used) = timed_ev(Mode::Rtt, server, clients, o.secs);
    summarize(results, o.secs, used)
}

/// The stream's bytes: a random block of a length prime to every buffer
/// size, repeated, so checking costs a memcmp.
pub(crate) fn pattern() -> Arc<Vec<u8>> {
    let mut block = vec![0u8; (1 << 20) + 13];
    Rng(0x5851_f42d_4c95_7f2d).fill(&mut block);
    Arc::new(block)
}

/// `stream`: 4 connections each sending `stream_mib` MiB while reading the
/// echo back; MB/s of echo, both connections' directions counted once.
pub(crate) fn stream(server: &Server, o: &Opts) -> Measure {
    const CONNS: usize = 4;
    let total = (o.stream_mib as u64) << 20;
    let block = pattern();
    let before = Usage::of(server.pid());
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
    // cutime, cminflt): wait for that before reading the CPU time.
    let deadline = Instant::now() + Duration::from_secs(2);
    while children(server.pid()).len() > kids_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let used = Usage::of(server.pid()).since(before);
    let mb = (bytes as f64 / 1e6).max(1.0);
    Measure {
        value: bytes as f64 / secs / 1e6,
        errors,
        // Per MB echoed.
        cpu_us: used.cpu_secs * 1e6 / mb,
        faults: used.faults / mb,
        ..Measure::default()
    }
}

/// `hold`: open `hold` connections and leave them idle, measure memory, then
/// one echo on each.
pub(crate) fn hold(server: &Server, kind: Kind, n: usize) -> Measure {
    // Memory is measured, not an interval of work: no faults per op (and
    // no CPU, left at 0, which prints as a dash too).
    let mut m = Measure {
        faults: f64::NAN,
        ..Measure::default()
    };
    let mut conns = connect_all(server, n, &mut m.errors);
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

/// `n` connections to `server`, one after another; each that fails is
/// counted in `errors`.
pub(crate) fn connect_all(server: &Server, n: usize, errors: &mut Errors) -> Vec<TcpStream> {
    (0..n)
        .filter_map(|i| {
            connect_from(i, server.addr())
                .map_err(|e| errors.count(&e))
                .ok()
        })
        .collect()
}

/// `burst`: `n` clients arrive at once and hold their connections: each
/// connects, sends 64 B and reads them back. How many were echoed, and
/// when (from the start of the burst).
pub(crate) fn burst(server: &Server, n: usize) -> Measure {
    let (tallies, held) = burst_ev(server, n);
    let mut m = Measure::default();
    let mut lat = Vec::new();
    for (_, l, e) in tallies {
        lat.extend(l);
        m.errors.add(&e);
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
pub(crate) fn children(pid: i32) -> Vec<i32> {
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

pub(crate) fn status_kib(pid: i32, key: &str) -> f64 {
    field_kib(&format!("/proc/{pid}/status"), &[key])
}

/// Memory only this process maps: Private_Clean + Private_Dirty.
pub(crate) fn private_kib(pid: i32) -> f64 {
    field_kib(
        &format!("/proc/{pid}/smaps_rollup"),
        &["Private_Clean:", "Private_Dirty:"],
    )
}

pub(crate) fn field_kib(path: &str, keys: &[&str]) -> f64 {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| keys.iter().any(|k| l.starts_with(k)))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}

/// Datagrams in flight at once, over all UDP clients: well within a
/// socket's default receive buffer (some 270 small datagrams on Linux),
/// so that a server that keeps up loses none.
pub(crate) const UDP_IN_FLIGHT: usize = 128;
/// Datagrams a UDP client sends or reads per system call at most.
pub(crate) const UDP_BATCH: usize = 32;
/// How long a UDP client waits for a reply before it counts the window
/// as lost and sends a new one.
pub(crate) const UDP_LOST_AFTER: Duration = Duration::from_millis(200);

/// A datagram's bytes: its number, then bytes drawn from it, so that a
/// reply is checked against what was sent without keeping it.
pub(crate) fn udp_payload(client: usize, seq: u64) -> [u8; PAYLOAD] {
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
pub(crate) fn udp(server: &Server, clients: usize, o: &Opts) -> Measure {
    let addr = server.addr();
    let window = (UDP_IN_FLIGHT / clients).clamp(1, 32);
    let (results, used) = timed(server.pid(), clients, o.secs, move |i, warm, end, stop| {
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
        while !stop.reached(Instant::now()) {
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
    summarize(results, o.secs, used)
}
