//! Options and their one source of truth.
//!
//! [`Options`] is both the command line (clap) and the TOML file (serde): the
//! long option names are the file's keys, so the two cannot drift apart.
//! [`load`] merges them (flags win over the file), fills in the defaults and
//! validates the result into a [`Config`]. Nothing here touches the network.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::access::Rules;
use crate::listen::ListenAddr;

mod file;
mod options;
mod print;
#[cfg(test)]
mod tests;

pub use file::{in_file, read_file};
pub use options::{Config, Facility, LogLevel, LogTarget, Mode, Options, Workers};
pub use print::{effective, risks};

use file::locate;

impl Config {
    /// Makes every relative path absolute under `base`.
    fn anchored(mut self, base: &Path) -> Config {
        let anchor = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [
            self.pidfile.as_mut(),
            self.chroot.as_mut(),
            self.config_file.as_mut(),
            Some(&mut self.syslog_socket),
        ]
        .into_iter()
        .flatten()
        {
            anchor(p);
        }
        for a in &mut self.listen {
            match a {
                ListenAddr::Unix(p) => anchor(p),
                ListenAddr::Metrics(inner) => {
                    if let ListenAddr::Unix(p) = &mut **inner {
                        anchor(p);
                    }
                }
                _ => {}
            }
        }
        self
    }

    /// The per-address checks, as the accepting process takes them.
    pub fn policy(&self) -> crate::admission::Policy {
        crate::admission::Policy {
            rules: self.rules.clone(),
            max_per_ip: self.max_per_ip,
            max_conn_rate: self.max_conn_rate,
            ipv6_prefix: self.ipv6_prefix,
            proxy: self.proxy.clone(),
            proxy_timeout: self.proxy_timeout,
        }
    }

    /// How listeners are bound; `socket_group` is `-g`'s group, if given.
    pub fn bind_options(
        &self,
        socket_group: Option<nix::unistd::Gid>,
    ) -> crate::listen::BindOptions {
        crate::listen::BindOptions {
            backlog: self.backlog,
            socket_mode: self.socket_mode,
            socket_group,
        }
    }

    /// The per-connection caps, as the echo loop takes them.
    pub fn limits(&self) -> crate::echo::Limits {
        crate::echo::Limits {
            idle: self.idle_timeout,
            session: self.max_session,
            max_bytes: self.max_bytes,
        }
    }
}

/// The highest `max-workers` (and `workers`, `min-spare`, `max-spare`)
/// accepted: the scoreboard is sized for this many workers of two
/// generations at once.
pub const MAX_WORKERS_LIMIT: u32 = 4096;

/// Ceilings of the other values, as the man page states them. A value
/// above its ceiling is a config error, so nothing `-t` accepts can
/// overflow a deadline or a counter at run time.
pub mod ceiling {
    /// `idle-timeout`, `max-session`, `shutdown-timeout`: 30 days.
    pub const SECONDS: u64 = 30 * 24 * 3600;
    /// `max-children`: processes forked at once (the scoreboard's bound).
    pub const MAX_CHILDREN: u32 = crate::scoreboard::MAX_CHILDREN;
    /// `worker-connections`: connections one event worker holds.
    pub const WORKER_CONNECTIONS: u32 = 1 << 20;
    /// `udp-workers`.
    pub const UDP_WORKERS: u32 = 256;
    /// `udp-rate`: datagrams per second from one source.
    pub const UDP_RATE: u32 = 10_000_000;
    /// `max-bytes`: the largest integer a TOML file can hold.
    pub const MAX_BYTES: u64 = i64::MAX as u64;
    /// `backlog`: listen(2) takes an int.
    pub const BACKLOG: u32 = i32::MAX as u32;
    /// The largest config file read.
    pub const CONFIG_BYTES: u64 = 1 << 20;
}

/// Defaults, as the man page states them.
pub mod defaults {
    pub const LISTEN: &str = "[::]:7";
    pub const WORKERS: u32 = 4;
    pub const MAX_WORKERS: u32 = 256;
    pub const MIN_SPARE: u32 = 2;
    pub const MAX_SPARE: u32 = 8;
    pub const MAX_CHILDREN: u32 = 256;
    pub const WORKER_CONNECTIONS: u32 = 1024;
    pub const UDP_WORKERS: u32 = 1;
    pub const UDP_RATE: u32 = 1000;
    /// A site gives an IPv6 host a /64 (RFC 6177): one host, one count.
    pub const IPV6_PREFIX: u8 = 64;
    pub const PROXY_PROTOCOL_TIMEOUT: u64 = 5;
    pub const IDLE_TIMEOUT: u64 = 300;
    pub const SHUTDOWN_TIMEOUT: u64 = 10;
    pub const BACKLOG: u32 = 1024;
    pub const SOCKET_MODE: u32 = 0o666;
    pub const SYSLOG_SOCKET: &str = "/dev/log";
}

/// Why a configuration could not be loaded: one line, naming the file
/// (and line) or the option at fault.
#[derive(Debug)]
pub struct LoadError {
    pub message: String,
    /// The command line alone is at fault (a bad value given as a flag):
    /// a usage error, as clap's own are; otherwise the file is, or the
    /// two together.
    pub usage: bool,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<LoadError> for String {
    fn from(e: LoadError) -> String {
        e.message
    }
}

/// Reads `-c FILE` if given, merges it under the command line and validates.
/// Relative paths, on the command line or in the file, are taken from
/// `base` (the directory echo-forkd was started in), so they mean the same
/// after detaching to `/` and on every reload.
pub fn load(cli: Options, base: &Path) -> Result<Config, LoadError> {
    let flags_alone = |cli: Options| resolve(cli).map(|c| c.anchored(base)).and_then(checked);
    let Some(path) = cli.config.clone() else {
        return flags_alone(cli).map_err(|message| LoadError {
            message,
            usage: true,
        });
    };
    let message = match load_file(cli.clone(), base, &base.join(path)) {
        Ok(cfg) => return Ok(cfg),
        Err(message) => message,
    };
    // Which is at fault? A value that is bad on the command line alone
    // is a usage error (its message is the flag's); anything else is the
    // file's, or the two together.
    let flags = Options {
        config: None,
        ..cli
    };
    Err(match flags_alone(flags) {
        Err(message) => LoadError {
            message,
            usage: true,
        },
        Ok(_) => LoadError {
            message,
            usage: false,
        },
    })
}

/// [`load`] with the file at `path`.
fn load_file(cli: Options, base: &Path, path: &Path) -> Result<Config, String> {
    let (file, text) = read_file(path)?;
    // A setting wrong in the file is named with its line.
    resolve(cli.over(file))
        .map(|c| c.anchored(base))
        .and_then(checked)
        .map_err(|e| format!("config {}: {}", path.display(), locate(&text, e)))
}

/// The checks made once relative paths are anchored.
fn checked(cfg: Config) -> Result<Config, String> {
    for a in &cfg.listen {
        match a {
            ListenAddr::Unix(path) => check_unix_path(path)?,
            ListenAddr::Metrics(inner) => {
                if let ListenAddr::Unix(path) = &**inner {
                    check_unix_path(path)?;
                }
            }
            _ => {}
        }
    }
    Ok(cfg)
}

/// A unix socket path must fit in `sockaddr_un` (with its NUL), once it
/// is absolute.
fn check_unix_path(path: &Path) -> Result<(), String> {
    let max =
        std::mem::size_of::<libc::sockaddr_un>() - std::mem::size_of::<libc::sa_family_t>() - 1;
    let len = path.as_os_str().len();
    if len > max {
        return Err(format!(
            "listen address unix:{}: the path is {len} bytes, more than the {max} a unix socket address holds",
            path.display()
        ));
    }
    Ok(())
}

fn nonzero(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Fills in the defaults and checks that the settings make sense together.
pub fn resolve(o: Options) -> Result<Config, String> {
    let rules = Rules::new(&o.allow, &o.deny)?;
    let trusted = crate::proxy::Trusted::new(&o.trusted_proxy)?;
    let proxy = match (o.proxy_protocol, trusted.is_empty()) {
        (true, true) => return Err(
            "proxy-protocol needs trusted-proxy: the addresses of the proxies that send the header"
                .into(),
        ),
        (true, false) => Some(trusted),
        (false, _) => None,
    };

    let listen = if o.listen.is_empty() {
        vec![defaults::LISTEN.to_string()]
    } else {
        o.listen.clone()
    };
    let mut listen = listen
        .iter()
        .map(|a| a.parse::<ListenAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(a) = listen.iter().find(|a| matches!(a, ListenAddr::Metrics(_))) {
        return Err(format!(
            "listen address {a}: the metrics' address is given with --metrics"
        ));
    }
    // The metrics' listener is bound, kept on reload and passed on USR2
    // with the others; only the metrics worker accepts from it.
    if let Some(m) = &o.metrics {
        let bad = |why: &str| format!("metrics address '{m}': {why}");
        match m.parse::<ListenAddr>() {
            Ok(a @ (ListenAddr::Tcp(_) | ListenAddr::Any(_) | ListenAddr::Unix(_))) => {
                listen.push(ListenAddr::Metrics(Box::new(a)))
            }
            Ok(_) => return Err(bad("HOST:PORT, [V6]:PORT, *:PORT or unix:/PATH")),
            Err(e) => return Err(e.replace("listen address", "metrics address")),
        }
    }
    for (i, a) in listen.iter().enumerate() {
        if let Some(b) = listen[..i].iter().find(|b| a.overlaps(b)) {
            return Err(if a == b {
                format!("listen address {a} is given twice")
            } else {
                let dual = |x: &ListenAddr| {
                    matches!(x, ListenAddr::Any(_))
                        || matches!(x, ListenAddr::Tcp(sa) if sa.is_ipv6() && sa.ip().is_unspecified())
                };
                let why = if dual(a) || dual(b) {
                    "the IPv6 wildcard is dual-stack and takes the IPv4 port too"
                } else {
                    "both would take the same port on the same address"
                };
                format!("listen addresses {b} and {a} overlap: {why}")
            });
        }
    }
    for (name, path) in [
        ("pidfile", &o.pidfile),
        ("chroot", &o.chroot),
        ("syslog-socket", &o.syslog_socket),
    ] {
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(format!("{name}: the path is empty"));
        }
    }
    let seconds = |name: &str, value: Option<u64>, default: u64| {
        let v = value.unwrap_or(default);
        if v > ceiling::SECONDS {
            return Err(format!(
                "{name} ({v}) is above the ceiling of {} seconds (30 days)",
                ceiling::SECONDS
            ));
        }
        Ok(v)
    };
    let idle_timeout = seconds("idle-timeout", o.idle_timeout, defaults::IDLE_TIMEOUT)?;
    let max_session = seconds("max-session", o.max_session, 0)?;
    let shutdown_timeout = seconds(
        "shutdown-timeout",
        o.shutdown_timeout,
        defaults::SHUTDOWN_TIMEOUT,
    )?;
    let proxy_timeout = seconds(
        "proxy-protocol-timeout",
        o.proxy_protocol_timeout,
        defaults::PROXY_PROTOCOL_TIMEOUT,
    )?;
    if proxy_timeout == 0 {
        return Err("proxy-protocol-timeout must be at least 1 second".into());
    }
    let ipv6_prefix = o.ipv6_prefix.unwrap_or(defaults::IPV6_PREFIX);
    if !(1..=128).contains(&ipv6_prefix) {
        return Err(format!(
            "ipv6-prefix ({ipv6_prefix}) must be between 1 and 128 (64: a host's usual network; 128: one address)"
        ));
    }
    let max_bytes = at_most("max-bytes", o.max_bytes.unwrap_or(0), ceiling::MAX_BYTES)?;

    let mode = o.mode.unwrap_or(Mode::Prefork);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    if mode == Mode::Event {
        return Err("mode event needs epoll, which only Linux has; use prefork".into());
    }
    // An event worker serves many clients: one per CPU is the default.
    let default_workers = match mode {
        Mode::Event => Workers::Auto,
        _ => Workers::Count(defaults::WORKERS),
    };
    let workers = match o.workers.unwrap_or(default_workers) {
        Workers::Count(0) => return Err("workers must be at least 1".into()),
        Workers::Count(n) => n,
        Workers::Auto => usable_cpus(),
    };
    let max_workers = o.max_workers.unwrap_or(defaults::MAX_WORKERS.max(workers));
    let min_spare = o.min_spare.unwrap_or(defaults::MIN_SPARE);
    let max_spare = o.max_spare.unwrap_or(defaults::MAX_SPARE.max(min_spare));
    for (name, n) in [
        ("workers", workers),
        ("max-workers", max_workers),
        ("min-spare", min_spare),
        ("max-spare", max_spare),
    ] {
        at_most(name, n, MAX_WORKERS_LIMIT)?;
    }
    for (low, a, high, b, why) in [
        ("workers", workers, "max-workers", max_workers, ""),
        ("min-spare", min_spare, "max-spare", max_spare, ""),
        (
            "min-spare",
            min_spare,
            "max-workers",
            max_workers,
            ": the pool could never keep that many idle",
        ),
    ] {
        if a > b {
            return Err(format!("{low} ({a}) is greater than {high} ({b}){why}"));
        }
    }
    // Counts of at least one, each under its ceiling.
    let [worker_connections, max_children, udp_workers, backlog] = [
        (
            "worker-connections",
            o.worker_connections,
            defaults::WORKER_CONNECTIONS,
            ceiling::WORKER_CONNECTIONS,
        ),
        (
            "max-children",
            o.max_children,
            defaults::MAX_CHILDREN,
            ceiling::MAX_CHILDREN,
        ),
        (
            "udp-workers",
            o.udp_workers,
            defaults::UDP_WORKERS,
            ceiling::UDP_WORKERS,
        ),
        ("backlog", o.backlog, defaults::BACKLOG, ceiling::BACKLOG),
    ]
    .map(|(name, value, default, max)| counted(name, value.unwrap_or(default), max));
    let (worker_connections, max_children, udp_workers, backlog) =
        (worker_connections?, max_children?, udp_workers?, backlog?);
    let udp_rate = at_most(
        "udp-rate",
        o.udp_rate.unwrap_or(defaults::UDP_RATE),
        ceiling::UDP_RATE,
    )?;

    if o.log == Some(LogTarget::Stderr) && !o.foreground && !o.inetd {
        return Err(
            "log stderr needs -f: once detached, standard error is /dev/null (use syslog, or -f under a service manager)"
                .into(),
        );
    }
    // Under inetd stderr may be the client's socket: never log there unasked.
    let log = o.log.unwrap_or(if o.foreground && !o.inetd {
        LogTarget::Stderr
    } else {
        LogTarget::Syslog
    });

    Ok(Config {
        foreground: o.foreground,
        inetd: o.inetd,
        pidfile: o.pidfile.clone(),
        user: o.user.clone(),
        group: o.group.clone(),
        chroot: o.chroot.clone(),
        config_file: o.config,
        listen,
        mode,
        worker_connections,
        io_engine: o.io_engine.unwrap_or_default(),
        engine: None,
        workers,
        max_workers,
        min_spare,
        max_spare,
        max_children,
        max_requests: o.max_requests.unwrap_or(0),
        max_requests_jitter: o.max_requests_jitter.unwrap_or(0),
        max_per_ip: o.max_per_ip.unwrap_or(0),
        max_conn_rate: o.max_conn_rate.unwrap_or(0),
        ipv6_prefix,
        udp_workers,
        udp_rate,
        rules,
        proxy,
        proxy_timeout: Duration::from_secs(proxy_timeout),
        idle_timeout: nonzero(idle_timeout),
        max_session: nonzero(max_session),
        max_bytes,
        shutdown_timeout: Duration::from_secs(shutdown_timeout),
        backlog: backlog as i32,
        socket_mode: o.socket_mode.map_or(defaults::SOCKET_MODE, |m| m.0),
        log,
        syslog_socket: o
            .syslog_socket
            .unwrap_or_else(|| defaults::SYSLOG_SOCKET.into()),
        syslog_facility: o.syslog_facility.unwrap_or(Facility::Daemon),
        log_level: o.log_level.unwrap_or(LogLevel::Info),
    })
}

/// `cfg` with the I/O engine its event workers run on ([`Config::engine`]),
/// probed here (see engine.rs), in the master, with the workers'
/// `identity`: at start (for `-t` and `-T` too) and on each reload. Other
/// modes probe nothing. Err: io_uring was asked for (`io-engine uring`)
/// and cannot run here, and why.
pub fn with_engine(mut cfg: Config, workers: crate::engine::Workers) -> Result<Config, String> {
    if cfg.mode != Mode::Event || cfg.inetd {
        return Ok(cfg);
    }
    let (engine, why) = crate::engine::resolve(cfg.io_engine, workers)?;
    cfg.engine = Some(crate::engine::InForce { engine, why });
    Ok(cfg)
}

/// `value` of the count `name`, if it is from 1 to `max`.
fn counted(name: &str, value: u32, max: u32) -> Result<u32, String> {
    if value == 0 || value > max {
        return Err(format!("{name} ({value}) must be between 1 and {max}"));
    }
    Ok(value)
}

/// `value` of `name`, if it is at most its ceiling `max`.
fn at_most<T: PartialOrd + std::fmt::Display>(name: &str, value: T, max: T) -> Result<T, String> {
    if value > max {
        return Err(format!("{name} ({value}) is above the ceiling of {max}"));
    }
    Ok(value)
}

/// The CPUs this process may run on: the affinity mask and the cgroup CPU
/// quota both count (std reads both on Linux), and never fewer than one.
fn usable_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(u32::MAX as usize) as u32)
        .unwrap_or(1)
}
