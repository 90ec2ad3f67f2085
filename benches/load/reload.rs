//! `reload`, `upgrade`, `reload-storm` and `reload-stopped`: signals to the
//! master while clients hold connections, which the retiring workers hand
//! to the new generation (fork-mode children go on). One client thread
//! drives every connection through one epoll set, so that neither the
//! client nor its pace is what is measured, and watches the master's
//! workers in the same set (a pidfd each), so that it learns the moment
//! the last old one exits without walking /proc among thousands.

use super::*;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::fd::FromRawFd;

/// Pings in flight at once, over all connections (like `rtt`'s 50
/// clients): each round still pings every connection, without making
/// thousands of them wait in the server's queue at once, which would
/// measure the queue rather than the hand-over.
const WINDOW: usize = 16;
/// During the hand-over, a round (a ping on every connection) starts at
/// most this often: each connection is pinged every 100 ms (more seldom
/// when a round takes longer), a conversation's pace, not a flood that
/// would keep the two CPUs from forking the new generation and so
/// measure the client's load rather than the hand-over.
const ROUND_EVERY: Duration = Duration::from_millis(100);
/// A ping unanswered for this long counts as a timeout, and its
/// connection as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the storm's or the stop's signals are due, and the hand-over
/// checked. (The old workers' exits come as events, timed exactly.)
const TICK: Duration = Duration::from_millis(5);
/// The master's list of children is read at most every this many times
/// what the last read cost (it costs milliseconds with thousands of
/// children), and every [`TICK`] at most: the client looks, it does not
/// take the server's CPU.
const POLL_COST_RATIO: u32 = 20;
/// A hand-over not done after this long is an error.
const HANDOVER_LIMIT: Duration = Duration::from_secs(60);
/// `reload-storm`: this many HUPs, evenly over [`STORM_SECS`].
const STORM_HUPS: u32 = 30;
const STORM_SECS: Duration = Duration::from_secs(3);
/// `reload-storm`: the children unchanged this long after the last HUP
/// (and none of those from before the first left): the storm is over.
const STORM_QUIET: Duration = Duration::from_secs(1);
/// `reload-stopped`: how long the master is stopped, right after the HUP.
const STOPPED_FOR: Duration = Duration::from_secs(3);
/// fork: rounds after the signals, to show that its children serve on.
const FORK_ROUNDS: u32 = 3;

/// `n` clients hold a connection each, echoed once; then the master gets
/// the case's signal(s), and every connection is pinged (64 checked
/// bytes) in rounds until the hand-over is done (the last worker from
/// before the signal has exited; a storm: and the children have been
/// still for a second after the last HUP), then once more. Reports how
/// many still echo after it, how long the hand-over took, the latency of
/// the pings made meanwhile (p50, p99, longest), and the server's CPU
/// time and minor page faults over it (serving those pings included) per
/// connection held.
/// Fork-mode children go on: a few rounds show it.
pub(crate) fn reload(server: &Server, kind: Kind, case: Case) -> Measure {
    let mut m = Measure::default();
    let streams = connect_all(server, case.clients, &mut m.errors);
    let mut p = match Pinger::new(streams) {
        Ok(p) => p,
        Err(e) => {
            m.errors.count(&e);
            return m;
        }
    };
    // Every connection echoed once: these are the connections held.
    p.round(&mut Vec::new(), &mut |_, _| {}, Duration::ZERO);
    m.held = p.live() as f64;
    let goes_on = matches!(kind, Kind::Fork | Kind::ForkBase);
    let master = server.pid();
    let before = Usage::of(master);
    let client_before = own_cpu();
    let mut watch = Watch::new(master, case.scenario, goes_on);
    // Fork's children are not retired: none to watch.
    watch.exits_seen = !goes_on && p.watch_exits(&watch.old);
    if let Err(e) = watch.start() {
        m.errors.count(&e.into());
        return m;
    }
    let mut lat = Vec::new();
    while watch.done.is_none() && p.live() > 0 {
        if watch.hup.elapsed() > HANDOVER_LIMIT {
            println!(
                "    {} {}: the hand-over was not done after {} s",
                case.label(),
                kind.name(),
                HANDOVER_LIMIT.as_secs()
            );
            m.errors.other += 1;
            break;
        }
        p.round(
            &mut lat,
            &mut |now, exits| watch.tick(now, exits),
            ROUND_EVERY,
        );
        watch.rounds += 1;
    }
    // Read between rounds, with no ping waiting: a walk of /proc over
    // thousands of processes takes a while.
    let client = own_cpu() - client_before;
    let took = watch.hup.elapsed().as_secs_f64();
    let used = Usage::of(master).since(before);
    watch.finish();
    // Once more, after the hand-over: every connection still echoes.
    p.round(&mut Vec::new(), &mut |_, _| {}, Duration::ZERO);
    m.errors.add(&p.errors);
    m.value = p.live() as f64;
    // Fork: nothing to hand over (NaN); not done: infinite.
    m.last_ms = match watch.done {
        Some(_) if goes_on => f64::NAN,
        Some(done) => done.as_secs_f64() * 1e3,
        None => f64::INFINITY,
    };
    // Fork: its children go on, and no hand-over ends the interval.
    (m.cpu_us, m.faults) = if goes_on {
        (f64::NAN, f64::NAN)
    } else {
        (
            used.cpu_secs * 1e6 / m.held.max(1.0),
            used.faults / m.held.max(1.0),
        )
    };
    m.client_cpu = client / took;
    m.max_us = lat.iter().copied().max().unwrap_or(0) as f64 / 1e3;
    (m.p50_us, m.p99_us) = percentiles(lat);
    m.workers = kids(master).len() as f64;
    m
}

/// The master's signals and children over one run.
struct Watch {
    master: i32,
    scenario: Scenario,
    goes_on: bool,
    /// The children before the (first) signal, sorted.
    old: Vec<i32>,
    /// Their exits come as events ([`Exits`]); else the master's list of
    /// children is read.
    exits_seen: bool,
    /// When the (first) signal was sent.
    hup: Instant,
    /// Storm: HUPs sent so far.
    sent: u32,
    /// Stopped: whether the master was let go on.
    continued: bool,
    /// The children when last read, since when they were so, and when to
    /// read them next.
    last: Vec<i32>,
    changed: Instant,
    next_read: Instant,
    /// When the signals were all sent (and the master let go on).
    signalled: Option<Instant>,
    /// Rounds finished since the first signal.
    rounds: u32,
    rounds_at_signalled: u32,
    /// The hand-over time, once it is done.
    done: Option<Duration>,
}

impl Watch {
    fn new(master: i32, scenario: Scenario, goes_on: bool) -> Watch {
        let old = kids(master);
        let now = Instant::now();
        Watch {
            master,
            scenario,
            goes_on,
            last: old.clone(),
            old,
            exits_seen: false,
            hup: now,
            sent: 0,
            continued: false,
            changed: now,
            next_read: now,
            signalled: None,
            rounds: 0,
            rounds_at_signalled: 0,
            done: None,
        }
    }

    fn signal(&self, s: Signal) -> nix::Result<()> {
        kill(Pid::from_raw(self.master), s)
    }

    /// The first signal: HUP, or USR2 for `upgrade`; the master stopped
    /// right after it for `reload-stopped`.
    fn start(&mut self) -> nix::Result<()> {
        self.hup = Instant::now();
        self.changed = self.hup;
        match self.scenario {
            Scenario::Upgrade => self.signal(Signal::SIGUSR2)?,
            Scenario::ReloadStopped => {
                self.signal(Signal::SIGHUP)?;
                self.signal(Signal::SIGSTOP)?;
            }
            _ => self.signal(Signal::SIGHUP)?,
        }
        self.sent = 1;
        if !matches!(
            self.scenario,
            Scenario::ReloadStorm | Scenario::ReloadStopped
        ) {
            self.signalled = Some(self.hup);
        }
        Ok(())
    }

    /// Every [`TICK`]: the storm's next HUP or the stopped master's CONT
    /// when due; whether the hand-over is done.
    fn tick(&mut self, now: Instant, exits: &Exits) {
        let since = now - self.hup;
        let pending = self.signalled.is_none();
        match self.scenario {
            Scenario::ReloadStorm if pending && since >= STORM_SECS * self.sent / STORM_HUPS => {
                let _ = self.signal(Signal::SIGHUP);
                self.sent += 1;
                if self.sent == STORM_HUPS {
                    self.signalled = Some(now);
                    self.rounds_at_signalled = self.rounds;
                }
            }
            Scenario::ReloadStopped if pending && since >= STOPPED_FOR => {
                let _ = self.signal(Signal::SIGCONT);
                self.continued = true;
                self.signalled = Some(now);
                self.rounds_at_signalled = self.rounds;
            }
            _ => {}
        }
        if self.done.is_some() {
            return;
        }
        if self.goes_on {
            // Nothing is handed over: a few rounds after the signals.
            if self.signalled.is_some() && self.rounds >= self.rounds_at_signalled + FORK_ROUNDS {
                self.done = Some(since);
            }
            return;
        }
        let storm = self.scenario == Scenario::ReloadStorm;
        if (storm || !self.exits_seen) && now >= self.next_read {
            let kids = kids(self.master);
            let cost = now.elapsed();
            self.next_read = now + (cost * POLL_COST_RATIO).max(TICK);
            if kids != self.last {
                self.last = kids;
                self.changed = now;
            }
        }
        let (old_left, last_exit) = if self.exits_seen {
            (exits.left > 0, exits.last)
        } else {
            let left = self.last.iter().any(|p| self.old.binary_search(p).is_ok());
            (left, None)
        };
        let Some(signalled) = self.signalled else {
            return;
        };
        if old_left {
            return;
        }
        let last_exit = last_exit.unwrap_or(now).max(self.hup);
        if storm {
            // Later generations come and go too: done when the children
            // have been still for a while after the last HUP, at the last
            // change seen.
            if now >= signalled + STORM_QUIET && now >= self.changed + STORM_QUIET {
                self.done = Some(self.changed.max(last_exit) - self.hup);
            }
        } else {
            self.done = Some(last_exit - self.hup);
        }
    }

    /// Whatever happens, the master is not left stopped.
    fn finish(&mut self) {
        if self.scenario == Scenario::ReloadStopped && !self.continued {
            let _ = self.signal(Signal::SIGCONT);
            self.continued = true;
        }
    }
}

/// This process's CPU time so far (user + system), in seconds.
fn own_cpu() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let s = |t: TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        s(u.user_time()) + s(u.system_time())
    })
}

/// The direct children of `pid`, sorted: from the kernel's list of each
/// of its threads' children, which costs less than a walk of /proc
/// ([`children`]) among thousands of processes; that walk where the list
/// is not there (a kernel without `CONFIG_PROC_CHILDREN`).
fn kids(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if !Path::new(&format!("/proc/{pid}/task/{pid}/children")).exists() {
        out = children(pid);
    } else if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    list.split_ascii_whitespace()
                        .filter_map(|w| w.parse::<i32>().ok()),
                );
            }
        }
    }
    out.sort_unstable();
    out
}

/// The watched processes' exits, as the client saw them.
#[derive(Default)]
struct Exits {
    /// A pidfd each (`None` once it exited), in the client's epoll set.
    fds: Vec<Option<OwnedFd>>,
    /// How many have not exited yet, and when the last one did.
    left: usize,
    last: Option<Instant>,
}

/// The epoll data of a pidfd: this bit, and its index in [`Exits::fds`].
const EXIT: u64 = 1 << 63;

/// A held connection and its ping.
struct Conn {
    s: TcpStream,
    sent: [u8; PAYLOAD],
    /// Bytes of `sent` written, and read back.
    wrote: usize,
    got: usize,
    /// When the ping in flight was sent (`None`: none is).
    since: Option<Instant>,
    /// Registered for EPOLLOUT too (a write that did not finish).
    out: bool,
}

/// What an event did to a connection.
enum Outcome {
    Waiting,
    Answered,
    Lost,
}

/// The client: every held connection, non-blocking, in one epoll set.
struct Pinger {
    epoll: Epoll,
    /// By index (the epoll data); `None` once lost.
    conns: Vec<Option<Conn>>,
    rng: Rng,
    errors: Errors,
    events: Vec<EpollEvent>,
    exits: Exits,
}

impl Pinger {
    fn new(streams: Vec<TcpStream>) -> io::Result<Pinger> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let mut conns = Vec::with_capacity(streams.len());
        for (i, s) in streams.into_iter().enumerate() {
            s.set_nonblocking(true)?;
            // Level-triggered, always: an early EOF or a stray byte on an
            // idle connection is seen when it comes.
            epoll.add(&s, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))?;
            conns.push(Some(Conn {
                s,
                sent: [0; PAYLOAD],
                wrote: 0,
                got: 0,
                since: None,
                out: false,
            }));
        }
        Ok(Pinger {
            epoll,
            conns,
            rng: Rng(0x4e10ad),
            errors: Errors::default(),
            events: vec![EpollEvent::empty(); 1024],
            exits: Exits::default(),
        })
    }

    /// Watches `pids` exit, a pidfd each in the epoll set; false (and none
    /// watched) if that cannot be done (a kernel before 5.3, no
    /// descriptors left).
    fn watch_exits(&mut self, pids: &[i32]) -> bool {
        let mut fds = Vec::with_capacity(pids.len());
        for (k, &pid) in pids.iter().enumerate() {
            // SAFETY: pidfd_open takes a pid and flags and returns a new
            // descriptor (or -1), which is owned here and nowhere else.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                return false;
            }
            // SAFETY: `fd` was just opened, and nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            if self
                .epoll
                .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, EXIT | k as u64))
                .is_err()
            {
                return false;
            }
            fds.push(Some(fd));
        }
        self.exits = Exits {
            left: fds.len(),
            fds,
            last: None,
        };
        true
    }

    fn live(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// One round: a ping of 64 fresh bytes on every live connection, at
    /// most [`WINDOW`] in flight; each answer's latency goes to `lat`.
    /// `tick` runs every [`TICK`] meanwhile, with the exits seen so far.
    /// The round lasts `at_least` (idle once every ping is answered). A connection that fails
    /// (an error, an EOF, a byte that differs or was not asked for, no
    /// answer within [`PING_TIMEOUT`]) is counted and dropped.
    fn round(
        &mut self,
        lat: &mut Vec<u64>,
        tick: &mut dyn FnMut(Instant, &Exits),
        at_least: Duration,
    ) {
        let order: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_some())
            .collect();
        let mut next = 0;
        let mut flying: Vec<usize> = Vec::with_capacity(WINDOW);
        let mut next_tick = Instant::now();
        let end = next_tick + at_least;
        loop {
            while flying.len() < WINDOW && next < order.len() {
                let i = order[next];
                next += 1;
                if self.ping(i) {
                    flying.push(i);
                }
            }
            if flying.is_empty() && next >= order.len() && Instant::now() >= end {
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                tick(now, &self.exits);
                next_tick = now + TICK;
                flying.retain(|&i| {
                    let late = self.conns[i]
                        .as_ref()
                        .and_then(|c| c.since)
                        .is_some_and(|t| now.duration_since(t) > PING_TIMEOUT);
                    if late {
                        self.errors.timeout += 1;
                        self.conns[i] = None;
                    }
                    !late && self.conns[i].is_some()
                });
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            let ms = wait.as_micros().div_ceil(1000).min(u16::MAX as u128) as u16;
            let n = match self.epoll.wait(&mut self.events, ms) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    // The client's own failure: every ping waiting is lost.
                    self.errors.other += flying.len() as u64;
                    for &i in &flying {
                        self.conns[i] = None;
                    }
                    flying.clear();
                    continue;
                }
            };
            for k in 0..n {
                let ev = self.events[k];
                if ev.data() & EXIT != 0 {
                    // A watched process exited; its pidfd goes (and with
                    // it, its place in the set).
                    let x = &mut self.exits;
                    if let Some(Some(_)) = x
                        .fds
                        .get_mut((ev.data() & !EXIT) as usize)
                        .map(Option::take)
                    {
                        x.left -= 1;
                        x.last = Some(Instant::now());
                    }
                    continue;
                }
                let i = ev.data() as usize;
                match self.on_event(i, ev.events(), lat) {
                    Outcome::Waiting => {}
                    Outcome::Answered | Outcome::Lost => flying.retain(|&j| j != i),
                }
            }
        }
    }

    /// Sends a ping on connection `i`; false if there is none to wait for
    /// (the connection is gone or failed now).
    fn ping(&mut self, i: usize) -> bool {
        let Some(c) = self.conns[i].as_mut() else {
            return false;
        };
        self.rng.fill(&mut c.sent);
        c.wrote = 0;
        c.got = 0;
        c.since = Some(Instant::now());
        self.write(i)
    }

    /// Writes what is left of connection `i`'s ping; waits for EPOLLOUT
    /// if the socket is full. False: the connection failed.
    fn write(&mut self, i: usize) -> bool {
        let Pinger {
            epoll,
            conns,
            errors,
            ..
        } = self;
        let Some(c) = conns[i].as_mut() else {
            return false;
        };
        let failed = loop {
            if c.wrote == PAYLOAD {
                break None;
            }
            match c.s.write(&c.sent[c.wrote..]) {
                Ok(0) => break Some(io::ErrorKind::WriteZero.into()),
                Ok(n) => c.wrote += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !c.out {
                        c.out = true;
                        let mut ev =
                            EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT, i as u64);
                        if let Err(e) = epoll.modify(&c.s, &mut ev) {
                            break Some(e.into());
                        }
                    }
                    return true;
                }
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failed {
            errors.count(&e);
            conns[i] = None;
            return false;
        }
        if c.out {
            c.out = false;
            let mut ev = EpollEvent::new(EpollFlags::EPOLLIN, i as u64);
            if let Err(e) = epoll.modify(&c.s, &mut ev) {
                errors.count(&e.into());
                conns[i] = None;
                return false;
            }
        }
        true
    }

    /// Connection `i` is ready: writes the rest of its ping, reads what
    /// came back and checks every byte of it.
    fn on_event(&mut self, i: usize, ev: EpollFlags, lat: &mut Vec<u64>) -> Outcome {
        if ev.contains(EpollFlags::EPOLLOUT) && !self.write(i) {
            return Outcome::Lost;
        }
        let Pinger { conns, errors, .. } = self;
        let Some(c) = conns[i].as_mut() else {
            return Outcome::Lost;
        };
        let mut buf = [0u8; PAYLOAD];
        loop {
            // Idle, any byte is one too many: read one to see it.
            let want = if c.since.is_some() {
                PAYLOAD - c.got
            } else {
                1
            };
            match c.s.read(&mut buf[..want]) {
                Ok(0) => {
                    errors.reset += 1;
                    break;
                }
                Ok(n) => {
                    let expected = c.since.is_some() && c.got + n <= c.wrote;
                    if !expected || buf[..n] != c.sent[c.got..c.got + n] {
                        errors.mismatch += 1;
                        break;
                    }
                    c.got += n;
                    if c.got == PAYLOAD {
                        if let Some(t) = c.since.take() {
                            lat.push(elapsed_ns(t));
                        }
                        return Outcome::Answered;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Waiting,
                Err(e) => {
                    errors.count(&e);
                    break;
                }
            }
        }
        conns[i] = None;
        Outcome::Lost
    }
}
