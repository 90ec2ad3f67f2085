//! The event-driven client of `conn`, `rtt` and `burst`: a thread per CPU,
//! each an epoll loop over its share of the connections, so that the
//! client is not what is measured. A blocking thread per connection on
//! 2 CPUs flatters the models that run a process per connection: the
//! scheduler hands the CPU from a client thread straight to its server
//! process and back, and the client's own context switches are charged
//! to nobody. Here a thread drives hundreds of connections per wake-up,
//! as a real load balancer or client pool would.

use super::*;
use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

/// What each connection does.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// Connect, send 64 B, read them back, close; again, until the end.
    Conn,
    /// One connection ping-ponging 64 B until the end, then held until
    /// the server's usage has been read.
    Rtt,
    /// Connect, one echo, then hold the connection (returned to the caller).
    Burst,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Connecting,
    Sending,
    Reading,
    /// Nothing in flight: stopped, failed or (burst) done.
    Rest,
}

/// One client's connection and the exchange in flight on it.
struct Link {
    /// The client's number: its source address.
    client: usize,
    fd: Option<OwnedFd>,
    state: State,
    sent: [u8; PAYLOAD],
    got: [u8; PAYLOAD],
    /// Bytes of `sent` written, or of `got` read.
    have: usize,
    /// When the exchange in flight began (its connect, in `conn`).
    t: Instant,
}

/// What one thread recorded: exchanges done in the measured interval,
/// their latencies in ns, errors; and, in `burst`, the connections held.
pub(crate) type Tally = (u64, Vec<u64>, Errors);

/// How often a thread looks for an exchange waiting past [`IO_TIMEOUT`].
const SWEEP: Duration = Duration::from_millis(200);

/// One thread's loop.
struct Driver<'a> {
    mode: Mode,
    addr: SocketAddrV4,
    epoll: Epoll,
    links: Vec<Link>,
    rng: Rng,
    /// Exchanges that begin in `[warm, end)` are counted.
    warm: Instant,
    end: Instant,
    /// `burst`: latencies are counted from here, not from each connect.
    origin: Option<Instant>,
    stop: Option<&'a Stop>,
    /// Links not at rest.
    busy: usize,
    /// `conn`: links whose next connection opens after this turn's
    /// events (opened in place, a connect that fails at once would open
    /// again from inside its own failure, deeper each time).
    reopen: Vec<usize>,
    done: u64,
    lat: Vec<u64>,
    err: Errors,
}

impl Driver<'_> {
    fn stopped(&self, t: Instant) -> bool {
        self.stop.is_some_and(|s| s.reached(t))
    }

    /// Opens link `k`'s connection (non-blocking) and starts its exchange.
    fn open(&mut self, k: usize) {
        let now = Instant::now();
        let client = self.links[k].client;
        let opened = (|| -> nix::Result<(OwnedFd, bool)> {
            let fd = socket(
                AddressFamily::Inet,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )?;
            setsockopt(&fd, sockopt::IpBindAddressNoPort, &true)?;
            if self.mode == Mode::Rtt {
                setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
            }
            let from = Ipv4Addr::new(127, 0, 0, 1 + (client % SOURCES as usize) as u8);
            bind(
                fd.as_raw_fd(),
                &SockaddrIn::from(SocketAddrV4::new(from, 0)),
            )?;
            let at_once = match connect(fd.as_raw_fd(), &SockaddrIn::from(self.addr)) {
                Ok(()) => true,
                Err(Errno::EINPROGRESS) => false,
                Err(e) => return Err(e),
            };
            let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET;
            self.epoll.add(&fd, EpollEvent::new(flags, k as u64))?;
            Ok((fd, at_once))
        })();
        let l = &mut self.links[k];
        l.t = now;
        l.have = 0;
        self.rng.fill(&mut l.sent);
        match opened {
            Ok((fd, at_once)) => {
                l.fd = Some(fd);
                l.state = State::Connecting;
                if at_once {
                    self.drive(k, EpollFlags::EPOLLOUT);
                }
            }
            Err(e) => {
                l.fd = None;
                l.state = State::Connecting;
                self.fail(k, e);
            }
        }
    }

    /// Moves link `k`'s exchange on as far as it goes without waiting.
    fn drive(&mut self, k: usize, ev: EpollFlags) {
        loop {
            let l = &mut self.links[k];
            let Some(fd) = &l.fd else { return };
            match l.state {
                State::Rest => return,
                State::Connecting => {
                    // The write says whether the connect failed.
                    if !ev.intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLERR) {
                        return;
                    }
                    l.state = State::Sending;
                }
                State::Sending => match nix::unistd::write(fd, &l.sent[l.have..]) {
                    Ok(n) => {
                        l.have += n;
                        if l.have == PAYLOAD {
                            l.have = 0;
                            l.state = State::Reading;
                            // The echo comes as a new edge.
                            return;
                        }
                    }
                    Err(Errno::EAGAIN) => return,
                    Err(Errno::EINTR) => {}
                    Err(e) => return self.fail(k, e),
                },
                State::Reading => match nix::unistd::read(fd, &mut l.got[l.have..]) {
                    Ok(0) => return self.fail(k, Errno::ECONNRESET),
                    Ok(n) => {
                        l.have += n;
                        if l.have == PAYLOAD && !self.finish(k) {
                            return;
                        }
                    }
                    Err(Errno::EAGAIN) => return,
                    Err(Errno::EINTR) => {}
                    Err(e) => return self.fail(k, e),
                },
            }
        }
    }

    /// Link `k` read its whole echo: checks and counts it, then starts
    /// what comes next. True if a new exchange goes on on the same
    /// connection.
    fn finish(&mut self, k: usize) -> bool {
        let now = Instant::now();
        let l = &mut self.links[k];
        if l.got != l.sent {
            self.err.mismatch += 1;
            self.close(k);
            return false;
        }
        if l.t >= self.warm && l.t < self.end {
            self.done += 1;
            self.lat.push(elapsed_ns(self.origin.unwrap_or(l.t)));
        }
        let stopped = self.stopped(now);
        match self.mode {
            Mode::Conn => {
                self.links[k].fd = None;
                if stopped {
                    self.rest(k);
                } else {
                    self.reopen.push(k);
                }
                false
            }
            Mode::Rtt if !stopped => {
                let l = &mut self.links[k];
                self.rng.fill(&mut l.sent);
                l.t = now;
                l.have = 0;
                l.state = State::Sending;
                true
            }
            Mode::Rtt | Mode::Burst => {
                self.rest(k);
                false
            }
        }
    }

    /// Counts link `k`'s error; `conn` goes on with a new connection.
    fn fail(&mut self, k: usize, e: Errno) {
        self.err.count(&io::Error::from(e));
        self.close(k);
    }

    /// Drops link `k`'s connection after an error.
    fn close(&mut self, k: usize) {
        self.links[k].fd = None;
        if self.mode == Mode::Conn && !self.stopped(Instant::now()) {
            self.reopen.push(k);
        } else {
            self.rest(k);
        }
    }

    fn rest(&mut self, k: usize) {
        if self.links[k].state != State::Rest {
            self.links[k].state = State::Rest;
            self.busy -= 1;
        }
    }

    /// Counts every exchange waiting longer than [`IO_TIMEOUT`] as a
    /// timeout and drops its connection.
    fn sweep(&mut self) {
        for k in 0..self.links.len() {
            let l = &self.links[k];
            if l.state != State::Rest && l.t.elapsed() > IO_TIMEOUT {
                self.err.timeout += 1;
                self.close(k);
            }
        }
    }

    /// Runs until every link is at rest.
    fn run(&mut self) {
        for k in 0..self.links.len() {
            self.open(k);
        }
        let mut events = vec![EpollEvent::empty(); 512];
        let mut next_sweep = Instant::now() + SWEEP;
        while self.busy > 0 {
            for k in std::mem::take(&mut self.reopen) {
                self.open(k);
            }
            let wait = if self.reopen.is_empty() { 100u16 } else { 0u16 };
            let n = match self.epoll.wait(&mut events, wait) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(e) => {
                    self.err.count(&io::Error::from(e));
                    return;
                }
            };
            for ev in &events[..n] {
                self.drive(ev.data() as usize, ev.events());
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep();
                next_sweep = now + SWEEP;
            }
        }
    }
}

/// The client threads: one per CPU (at most one per client), client `i`
/// in thread `i % threads`.
fn threads(clients: usize) -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(clients)
        .max(1)
}

/// What the client threads are to do.
#[derive(Clone)]
struct Plan {
    mode: Mode,
    addr: SocketAddrV4,
    clients: usize,
    /// Exchanges that begin in `[warm, end)` are counted.
    warm: Instant,
    end: Instant,
    /// `burst`: latencies are counted from here.
    origin: Option<Instant>,
    /// `conn`, `rtt`: when to stop.
    stop: Option<Stop>,
}

/// Runs the plan's connections on one thread per CPU, which start
/// together at `go`, each returning its tally and the connections it
/// holds at the end.
fn spawn(plan: Plan, go: Arc<Barrier>) -> Vec<std::thread::JoinHandle<(Tally, Vec<OwnedFd>)>> {
    let Plan {
        mode,
        addr,
        clients,
        warm,
        end,
        origin,
        stop,
    } = plan;
    let n = threads(clients);
    (0..n)
        .map(|t| {
            let stop = stop.clone();
            let go = Arc::clone(&go);
            std::thread::spawn(move || {
                let epoll = match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
                    Ok(e) => e,
                    Err(e) => {
                        let mut err = Errors::default();
                        err.count(&io::Error::from(e));
                        go.wait();
                        return ((0, Vec::new(), err), Vec::new());
                    }
                };
                let links: Vec<Link> = (t..clients)
                    .step_by(n)
                    .map(|client| Link {
                        client,
                        fd: None,
                        state: State::Connecting,
                        sent: [0; PAYLOAD],
                        got: [0; PAYLOAD],
                        have: 0,
                        t: warm,
                    })
                    .collect();
                let mut d = Driver {
                    mode,
                    addr,
                    epoll,
                    busy: links.len(),
                    reopen: Vec::new(),
                    links,
                    rng: Rng(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1)),
                    warm,
                    end,
                    origin,
                    stop: stop.as_ref(),
                    done: 0,
                    lat: Vec::with_capacity(1 << 16),
                    err: Errors::default(),
                };
                go.wait();
                d.run();
                if mode == Mode::Rtt {
                    if let Some(s) = &stop {
                        s.hold();
                    }
                }
                let held = d.links.iter_mut().filter_map(|l| l.fd.take()).collect();
                ((d.done, d.lat, d.err), held)
            })
        })
        .collect()
}

/// `conn` or `rtt` with `clients` connections over `secs` after a
/// warm-up; what they recorded, per thread, and what the server (`pid`
/// and its children) used in the measured interval.
pub(crate) fn timed_ev(
    mode: Mode,
    server: &Server,
    clients: usize,
    secs: f64,
) -> (Vec<Tally>, Used) {
    let go = Arc::new(Barrier::new(threads(clients) + 1));
    let t0 = Instant::now() + Duration::from_millis(50);
    let warm = t0 + Duration::from_secs_f64((secs / 6.0).min(0.5));
    let end = warm + Duration::from_secs_f64(secs);
    let stop = Stop::new(end);
    let measuring = stop.measuring();
    let plan = Plan {
        mode,
        addr: server.addr(),
        clients,
        warm,
        end,
        origin: None,
        stop: Some(stop.clone()),
    };
    let handles = spawn(plan, Arc::clone(&go));
    go.wait();
    std::thread::sleep(warm.saturating_duration_since(Instant::now()));
    let before = Usage::of(server.pid());
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let after = Usage::of(server.pid());
    let used = after.since(before);
    if std::env::var_os("LOAD_DEBUG").is_some() {
        eprintln!(
            "usage before {before:?} after {after:?} kids {}",
            children(server.pid()).len()
        );
    }
    drop(measuring);
    let results = handles
        .into_iter()
        .map(|h| h.join().expect("client thread").0)
        .collect();
    (results, used)
}

/// `burst`: `n` clients arriving at once, one echo each; what they
/// recorded (latencies from the start of the burst) and the connections,
/// still open.
pub(crate) fn burst_ev(server: &Server, n: usize) -> (Vec<Tally>, Vec<OwnedFd>) {
    let go = Arc::new(Barrier::new(threads(n) + 1));
    let t0 = Instant::now();
    let plan = Plan {
        mode: Mode::Burst,
        addr: server.addr(),
        clients: n,
        warm: t0,
        end: t0 + Duration::from_secs(3600),
        origin: Some(t0),
        stop: None,
    };
    let handles = spawn(plan, Arc::clone(&go));
    go.wait();
    let mut tallies = Vec::new();
    let mut held = Vec::new();
    for h in handles {
        let (tally, fds) = h.join().expect("burst thread");
        tallies.push(tally);
        held.extend(fds);
    }
    (tallies, held)
}
