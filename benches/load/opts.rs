//! What the benchmark runs: the servers (kinds and targets), the
//! scenarios and cases, and the options that pick them.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Kind {
    Prefork,
    /// `--baseline`: another echo-forkd build, for before/after figures.
    PreforkBase,
    Fork,
    ForkBase,
    /// Event workers on io_uring where they can (`--io-engine auto`).
    Event,
    EventBase,
    /// Event workers on epoll (`--io-engine epoll`).
    EventEpoll,
    /// The floor of the fork model: fork, read/write, `_exit`.
    MinFork,
    /// The floor of an event loop: one thread, one epoll set.
    Epoll,
    /// The floor of an io_uring loop: liburing, one thread, one ring
    /// (benches/floors/uring_echo.c).
    Uring,
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
    pub(crate) fn is_ours(self) -> bool {
        matches!(
            self,
            Kind::Prefork
                | Kind::Fork
                | Kind::Event
                | Kind::EventEpoll
                | Kind::PreforkBase
                | Kind::ForkBase
                | Kind::EventBase
        )
    }

    /// Whether it holds many connections per process (or thread pool).
    pub(crate) fn holds_many(self) -> bool {
        matches!(
            self,
            Kind::Event
                | Kind::EventBase
                | Kind::EventEpoll
                | Kind::Epoll
                | Kind::Uring
                | Kind::Tokio
        )
    }

    /// The `--baseline` build: measured beside ours, not judged.
    pub(crate) fn is_base(self) -> bool {
        matches!(self, Kind::PreforkBase | Kind::ForkBase | Kind::EventBase)
    }

    pub(crate) fn is_prefork(self) -> bool {
        matches!(self, Kind::Prefork | Kind::PreforkBase)
    }

    const ALL: [Kind; 12] = [
        Kind::Prefork,
        Kind::Fork,
        Kind::Event,
        Kind::EventEpoll,
        Kind::MinFork,
        Kind::Epoll,
        Kind::Uring,
        Kind::Tokio,
        Kind::PyForking,
        Kind::PyThreading,
        Kind::MinUdp,
        Kind::PyUdp,
    ];

    /// Whether it takes part in the UDP case: echo-forkd (one mode: the
    /// UDP worker is the same in all), tokio and the UDP servers.
    pub(crate) fn serves_udp(self) -> bool {
        matches!(
            self,
            Kind::Prefork | Kind::PreforkBase | Kind::Tokio | Kind::MinUdp | Kind::PyUdp
        )
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Prefork => "prefork",
            Kind::Fork => "fork",
            Kind::Event => "event",
            Kind::EventEpoll => "event-epoll",
            Kind::MinFork => "min-fork",
            Kind::Epoll => "epoll",
            Kind::Uring => "uring",
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
pub(crate) struct Target {
    pub(crate) kind: Kind,
    pub(crate) pool: usize,
}

impl Target {
    pub(crate) fn name(self) -> String {
        if self.pool > 0 {
            format!("{} -w {}", self.kind.name(), self.pool)
        } else {
            self.kind.name().to_string()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scenario {
    Conn,
    Rtt,
    Stream,
    Hold,
    Burst,
    Udp,
    /// A HUP while connections are held.
    Reload,
    /// A USR2 (the binary re-executed in place) while connections are held.
    Upgrade,
    /// 30 HUPs in 3 s while connections are held (opt-in).
    ReloadStorm,
    /// A HUP, then the master stopped (SIGSTOP) for 3 s (opt-in).
    ReloadStopped,
}

impl Scenario {
    /// Every scenario `--scenarios` knows.
    const ALL: [Scenario; 10] = [
        Scenario::Conn,
        Scenario::Rtt,
        Scenario::Stream,
        Scenario::Hold,
        Scenario::Burst,
        Scenario::Udp,
        Scenario::Reload,
        Scenario::Upgrade,
        Scenario::ReloadStorm,
        Scenario::ReloadStopped,
    ];

    /// What runs without `--scenarios`: all but the storm and the stopped
    /// master, which are asked for by name.
    const DEFAULT: [Scenario; 8] = [
        Scenario::Conn,
        Scenario::Rtt,
        Scenario::Stream,
        Scenario::Hold,
        Scenario::Burst,
        Scenario::Udp,
        Scenario::Reload,
        Scenario::Upgrade,
    ];

    /// A signal (or several) to the master while clients hold connections.
    pub(crate) fn is_reload(self) -> bool {
        matches!(
            self,
            Scenario::Reload | Scenario::Upgrade | Scenario::ReloadStorm | Scenario::ReloadStopped
        )
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Conn => "conn",
            Scenario::Rtt => "rtt",
            Scenario::Stream => "stream",
            Scenario::Hold => "hold",
            Scenario::Burst => "burst",
            Scenario::Udp => "udp",
            Scenario::Reload => "reload",
            Scenario::Upgrade => "upgrade",
            Scenario::ReloadStorm => "reload-storm",
            Scenario::ReloadStopped => "reload-stopped",
        }
    }
}

/// One scenario at one size: `rtt` with 500 connections, say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Case {
    pub(crate) scenario: Scenario,
    pub(crate) clients: usize,
}

impl Case {
    pub(crate) fn label(self) -> String {
        match self.scenario {
            Scenario::Conn | Scenario::Rtt | Scenario::Stream | Scenario::Udp => {
                format!("{} c={}", self.scenario.name(), self.clients)
            }
            Scenario::Hold
            | Scenario::Burst
            | Scenario::Reload
            | Scenario::Upgrade
            | Scenario::ReloadStorm
            | Scenario::ReloadStopped => format!("{} {}", self.scenario.name(), self.clients),
        }
    }
}

pub(crate) struct Opts {
    pub(crate) rounds: usize,
    pub(crate) secs: f64,
    pub(crate) scenarios: Vec<Scenario>,
    pub(crate) servers: Vec<Kind>,
    pub(crate) clients: usize,
    pub(crate) rtt_clients: Vec<usize>,
    pub(crate) pools: Vec<usize>,
    pub(crate) stream_mib: usize,
    pub(crate) hold: Vec<usize>,
    pub(crate) burst: usize,
    pub(crate) udp_clients: Vec<usize>,
    pub(crate) reload: Vec<usize>,
    pub(crate) out: Option<PathBuf>,
    pub(crate) baseline: Option<PathBuf>,
}

impl Opts {
    pub(crate) fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            rounds: 3,
            secs: 3.0,
            scenarios: Scenario::DEFAULT.to_vec(),
            servers: Kind::ALL.to_vec(),
            clients: 50,
            rtt_clients: vec![1, 50, 500],
            pools: vec![8, 64, 256],
            stream_mib: 256,
            hold: vec![100, 10_000],
            burst: 2000,
            udp_clients: vec![1, 16, 64],
            reload: vec![1000, 4000, 10_000],
            out: None,
            baseline: None,
        };
        let (mut quick, mut reload_given) = (false, false);
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().ok_or(format!("{arg} needs a value"));
            match arg.as_str() {
                "--bench" => {} // cargo bench passes it
                "--quick" => {
                    quick = true;
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
                "--reload" => {
                    o.reload = numbers(arg, value()?)?;
                    reload_given = true;
                }
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
            || o.reload.contains(&0)
        {
            return Err(
                "rounds, secs, clients, pools, udp-clients and reload must be positive".into(),
            );
        }
        if quick && !reload_given {
            // A smoke test: the smallest hold across the signal only.
            o.reload = o.reload.iter().copied().min().into_iter().collect();
        }
        Ok(o)
    }

    /// Every case to run, in order.
    pub(crate) fn cases(&self) -> Vec<Case> {
        let mut cases = Vec::new();
        for &scenario in &self.scenarios {
            let sizes = match scenario {
                Scenario::Conn => vec![self.clients],
                Scenario::Rtt => self.rtt_clients.clone(),
                Scenario::Stream => vec![4],
                Scenario::Hold => self.hold.clone(),
                Scenario::Burst => vec![self.burst],
                Scenario::Udp => self.udp_clients.clone(),
                s if s.is_reload() => self.reload.clone(),
                _ => Vec::new(),
            };
            cases.extend(sizes.into_iter().map(|clients| Case { scenario, clients }));
        }
        cases
    }

    /// The servers that take part in `case`: prefork once per pool size
    /// in `conn`; the Python servers sit out the burst (2,000 Python
    /// processes or threads measure Python, not the model).
    pub(crate) fn targets(&self, case: Case) -> Vec<Target> {
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
                (k, s) if s.is_reload() && self.left_out(k, case).is_some() => {}
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

    /// Why `kind` sits out a reload-like `case` (`None`: it takes part).
    /// Reloading is echo-forkd's: the peers have no reload. Prefork needs
    /// a worker per held connection (a pool of `held + 4`), and its pool
    /// stops at 4,096 workers; fork needs a process per connection too,
    /// and its children simply go on across a reload (nothing is handed
    /// over), so thousands more of them would measure the machine's
    /// process table, as in `hold`, not the reload.
    pub(crate) fn left_out(&self, kind: Kind, case: Case) -> Option<&'static str> {
        if !case.scenario.is_reload() {
            return None;
        }
        if !kind.is_ours() {
            return Some("a peer: it has no reload");
        }
        if kind.is_prefork() && case.clients + 4 > RELOAD_MAX_WORKERS {
            return Some(
                "prefork needs a worker per held connection (a pool of held + 4) and max-workers stops at 4096",
            );
        }
        if matches!(kind, Kind::Fork | Kind::ForkBase) && case.clients + 4 > RELOAD_MAX_WORKERS {
            return Some(
                "fork runs a process per connection, which goes on across the signal (nothing is handed over); above 4096 it would measure the process table",
            );
        }
        None
    }
}

/// `--max-workers` for prefork in the reload-like scenarios: the ceiling.
pub(crate) const RELOAD_MAX_WORKERS: usize = 4096;

pub(crate) fn number(arg: &str, v: &str) -> Result<usize, String> {
    v.parse().map_err(|_| format!("{arg}: not a number: {v}"))
}

pub(crate) fn numbers(arg: &str, v: &str) -> Result<Vec<usize>, String> {
    v.split(',').map(|n| number(arg, n)).collect()
}

pub(crate) fn pick<T: Copy>(
    list: &str,
    all: &[T],
    name: fn(&T) -> &'static str,
) -> Result<Vec<T>, String> {
    list.split(',')
        .map(|w| {
            all.iter()
                .find(|t| name(t) == w)
                .copied()
                .ok_or(format!("unknown name {w}"))
        })
        .collect()
}
