//! Options and their one source of truth.
//!
//! [`Options`] is both the command line (clap) and the TOML file (serde): the
//! long option names are the file's keys, so the two cannot drift apart.
//! [`load`] merges them (flags win over the file), fills in the defaults and
//! validates the result into a [`Config`]. Nothing here touches the network.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::access::Rules;
use crate::listen::ListenAddr;

/// The process model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A pool of workers that all accept on the listeners.
    Prefork,
    /// The master accepts and forks one child per connection.
    Fork,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Prefork => "prefork",
            Mode::Fork => "fork",
        })
    }
}

/// Where log lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Stderr,
    Syslog,
}

/// The most verbose level that is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
        }
    }
}

/// The syslog facilities an operator may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Facility {
    Daemon,
    User,
    Local0,
    Local1,
    Local2,
    Local3,
    Local4,
    Local5,
    Local6,
    Local7,
}

impl Facility {
    /// The facility's code as syslog(3) numbers it (LOG_DAEMON >> 3 = 3, …).
    pub fn code(self) -> u8 {
        match self {
            Facility::User => 1,
            Facility::Daemon => 3,
            Facility::Local0 => 16,
            Facility::Local1 => 17,
            Facility::Local2 => 18,
            Facility::Local3 => 19,
            Facility::Local4 => 20,
            Facility::Local5 => 21,
            Facility::Local6 => 22,
            Facility::Local7 => 23,
        }
    }
}

/// `--workers`: a number, or `auto` for the CPUs this process may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "WorkersInFile")]
pub enum Workers {
    Auto,
    Count(u32),
}

impl FromStr for Workers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Workers::Auto);
        }
        s.parse::<u32>()
            .map(Workers::Count)
            .map_err(|_| format!("'{s}' is neither a number nor 'auto'"))
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum WorkersInFile {
    Count(u32),
    Word(String),
}

impl TryFrom<WorkersInFile> for Workers {
    type Error = String;
    fn try_from(w: WorkersInFile) -> Result<Self, String> {
        match w {
            WorkersInFile::Count(n) => Ok(Workers::Count(n)),
            WorkersInFile::Word(s) => s.parse(),
        }
    }
}

/// `--socket-mode`: permission bits for the unix socket files we create,
/// written in octal (`0660`, `660`); in the file, a string (`"0660"`), so
/// that a decimal integer is never taken for a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ModeInFile")]
pub struct SocketMode(pub u32);

impl FromStr for SocketMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let digits = s.strip_prefix("0o").unwrap_or(s);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if !digits.is_empty() && digits.len() <= 4 && m <= 0o777 => Ok(SocketMode(m)),
            _ => Err(format!(
                "'{s}' is not a permission mode: octal digits from 0 to 0777, such as 0660"
            )),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ModeInFile {
    Text(String),
    Number(i64),
}

impl TryFrom<ModeInFile> for SocketMode {
    type Error = String;
    fn try_from(m: ModeInFile) -> Result<Self, String> {
        match m {
            ModeInFile::Text(s) => s.parse(),
            ModeInFile::Number(n) => Err(format!(
                "{n}: write the mode as a string of octal digits, such as \"0660\""
            )),
        }
    }
}

/// The file's `listen`: a list, and never an empty one (leaving the key
/// out means the default; an empty list would listen nowhere).
fn listen_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let list = Vec::<String>::deserialize(d)?;
    if list.is_empty() {
        return Err(serde::de::Error::custom(format!(
            "listen is empty: leave the key out for the default {}",
            defaults::LISTEN
        )));
    }
    Ok(list)
}

/// Every option, as given on the command line or in the file.
///
/// `None` (or an empty list) means "not given here"; [`load`] supplies the
/// defaults. Fields marked `serde(skip)` exist only on the command line.
#[derive(Parser, Deserialize, Debug, Default, Clone)]
#[command(
    name = "echo-forkd",
    version,
    long_about = None,
    about = "Echo (RFC 862) daemon with the classic process models: pre-forked workers or a child per connection",
    after_help = "Signals to the master: TERM/INT graceful stop, QUIT immediate stop, HUP reload,\nUSR1 status line, TTIN/TTOU one worker more/less.\nSee echo-forkd(8)."
)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
    /// Do not detach; log to stderr
    #[arg(short = 'f', long)]
    #[serde(skip)]
    pub foreground: bool,

    /// Read settings from this TOML file (keys are the long option names)
    #[arg(short = 'c', long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Validate the configuration and exit: 0 if good, 1 if not; binds nothing
    #[arg(short = 't', long)]
    #[serde(skip)]
    pub check: bool,

    /// Address to listen on: HOST:PORT, [V6]:PORT, *:PORT or unix:/PATH (repeatable) [default: [::]:7]
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    #[serde(default, deserialize_with = "listen_list")]
    pub listen: Vec<String>,

    /// Process model: prefork or fork [default: prefork]
    #[arg(short = 'm', long, value_name = "MODE")]
    pub mode: Option<Mode>,

    /// prefork: workers started at launch, the pool's floor; N or auto [default: 4]
    #[arg(short = 'w', long, value_name = "N|auto")]
    pub workers: Option<Workers>,

    /// prefork: ceiling of the pool [default: 256]
    #[arg(long, value_name = "N")]
    pub max_workers: Option<u32>,

    /// prefork: fewest idle workers kept ready [default: 2]
    #[arg(long, value_name = "N")]
    pub min_spare: Option<u32>,

    /// prefork: most idle workers kept ready [default: 8]
    #[arg(long, value_name = "N")]
    pub max_spare: Option<u32>,

    /// fork: connections served at once; past it new clients wait in the backlog [default: 256]
    #[arg(long, value_name = "N")]
    pub max_children: Option<u32>,

    /// prefork: a worker exits after N connections and is replaced; 0 = never [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u32>,

    /// prefork: add a random 0..=N to each worker's max-requests [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u32>,

    /// Simultaneous connections from one client address; 0 = no limit [default: 0]
    #[arg(long, value_name = "N")]
    pub max_per_ip: Option<u32>,

    /// New connections per second from one client address; 0 = no limit [default: 0]
    #[arg(long, value_name = "N")]
    pub max_conn_rate: Option<u32>,

    /// Allow clients in this CIDR (repeatable; most specific rule wins)
    #[arg(long, value_name = "CIDR")]
    #[serde(default)]
    pub allow: Vec<String>,

    /// Deny clients in this CIDR (repeatable; most specific rule wins)
    #[arg(long, value_name = "CIDR")]
    #[serde(default)]
    pub deny: Vec<String>,

    /// Close a connection with no progress for SECS; 0 = never [default: 300]
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Cap one connection's lifetime; 0 = no cap [default: 0]
    #[arg(long, value_name = "SECS")]
    pub max_session: Option<u64>,

    /// Cap the bytes echoed on one connection; 0 = no cap [default: 0]
    #[arg(long, value_name = "N")]
    pub max_bytes: Option<u64>,

    /// On stop, how long open connections may continue before they are killed [default: 10]
    #[arg(long, value_name = "SECS")]
    pub shutdown_timeout: Option<u64>,

    /// Listen backlog [default: 1024]
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,

    /// Permissions of the unix: socket files it creates, in octal [default: 0666]
    #[arg(long, value_name = "MODE")]
    pub socket_mode: Option<SocketMode>,

    /// Run workers and fork-mode children as this user
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,

    /// Run workers and fork-mode children with this group
    #[arg(short = 'g', long, value_name = "GROUP")]
    pub group: Option<String>,

    /// Confine workers and fork-mode children to this directory
    #[arg(long, value_name = "DIR")]
    pub chroot: Option<PathBuf>,

    /// Write the master's pid here and hold a lock on it while running
    #[arg(short = 'p', long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Where logs go: stderr or syslog [default: stderr with -f, else syslog]
    #[arg(long, value_name = "TARGET")]
    pub log: Option<LogTarget>,

    /// The syslog socket [default: /dev/log]
    #[arg(long, value_name = "PATH")]
    pub syslog_socket: Option<PathBuf>,

    /// Syslog facility: daemon, user, local0..local7 [default: daemon]
    #[arg(long, value_name = "NAME")]
    pub syslog_facility: Option<Facility>,

    /// Most verbose level logged: error, warn, info, debug [default: info]
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<LogLevel>,

    /// Serve the one connection on stdin/stdout and exit
    #[arg(long)]
    #[serde(skip)]
    pub inetd: bool,
}

/// The settings in force: every value resolved and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub foreground: bool,
    /// Serve the connection on stdin and exit.
    pub inetd: bool,
    pub pidfile: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub chroot: Option<PathBuf>,
    /// The file the settings came from, re-read on reload.
    pub config_file: Option<PathBuf>,
    pub listen: Vec<ListenAddr>,
    pub mode: Mode,
    pub workers: u32,
    pub max_workers: u32,
    pub min_spare: u32,
    pub max_spare: u32,
    pub max_children: u32,
    pub max_requests: u32,
    pub max_requests_jitter: u32,
    /// 0 = no limit.
    pub max_per_ip: u32,
    /// New connections per second per client address; 0 = no limit.
    pub max_conn_rate: u32,
    pub rules: Rules,
    pub idle_timeout: Option<Duration>,
    pub max_session: Option<Duration>,
    /// 0 = no cap.
    pub max_bytes: u64,
    pub shutdown_timeout: Duration,
    pub backlog: i32,
    /// Permission bits of the unix socket files we bind.
    pub socket_mode: u32,
    pub log: LogTarget,
    pub syslog_socket: PathBuf,
    pub syslog_facility: Facility,
    pub log_level: LogLevel,
}

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
            if let ListenAddr::Unix(p) = a {
                anchor(p);
            }
        }
        self
    }

    /// The per-address checks, as the accepting process takes them.
    pub fn policy(&self) -> crate::access::Policy {
        crate::access::Policy {
            rules: self.rules.clone(),
            max_per_ip: self.max_per_ip,
            max_conn_rate: self.max_conn_rate,
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
    /// `max-children`: processes forked at once.
    pub const MAX_CHILDREN: u32 = 65_536;
    /// `max-bytes`: the largest integer a TOML file can hold.
    pub const MAX_BYTES: u64 = i64::MAX as u64;
    /// `backlog`: listen(2) takes an int.
    pub const BACKLOG: u32 = i32::MAX as u32;
    /// The largest config file read.
    pub const CONFIG_BYTES: u64 = 1 << 20;
}

/// Defaults, as DESIGN.md and the man page state them.
pub mod defaults {
    pub const LISTEN: &str = "[::]:7";
    pub const WORKERS: u32 = 4;
    pub const MAX_WORKERS: u32 = 256;
    pub const MIN_SPARE: u32 = 2;
    pub const MAX_SPARE: u32 = 8;
    pub const MAX_CHILDREN: u32 = 256;
    pub const IDLE_TIMEOUT: u64 = 300;
    pub const SHUTDOWN_TIMEOUT: u64 = 10;
    pub const BACKLOG: u32 = 1024;
    pub const SOCKET_MODE: u32 = 0o666;
    pub const SYSLOG_SOCKET: &str = "/dev/log";
}

/// Reads `-c FILE` if given, merges it under the command line and validates.
/// Relative paths, on the command line or in the file, are taken from
/// `base` (the directory echo-forkd was started in), so they mean the same
/// after detaching to `/` and on every reload.
///
/// Errors are one line, naming the file (and line) or the option at fault.
pub fn load(cli: Options, base: &Path) -> Result<Config, String> {
    let merged = match &cli.config {
        Some(path) => cli.clone().over(read_file(&base.join(path))?),
        None => cli,
    };
    let cfg = resolve(merged)?.anchored(base);
    for a in &cfg.listen {
        if let ListenAddr::Unix(path) = a {
            check_unix_path(path)?;
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

/// Parses a config file into [`Options`].
///
/// The file is opened without blocking (a FIFO would otherwise wait for a
/// writer, and the master with it) and must be a regular file of at most
/// [`ceiling::CONFIG_BYTES`].
pub fn read_file(path: &Path) -> Result<Options, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let fail = |e: std::io::Error| format!("cannot read config {shown}: {}", crate::error_text(&e));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(format!("config {shown}: not a regular file"));
    }
    if meta.len() > ceiling::CONFIG_BYTES {
        return Err(format!(
            "config {shown}: {} bytes, more than the {} a config file may have",
            meta.len(),
            ceiling::CONFIG_BYTES
        ));
    }
    let mut text = String::new();
    // The size was checked, but the file may grow while we read it.
    file.take(ceiling::CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    if text.len() as u64 > ceiling::CONFIG_BYTES {
        return Err(format!(
            "config {shown}: it grew past {} bytes while being read",
            ceiling::CONFIG_BYTES
        ));
    }
    parse_file(&text).map_err(|e| format!("config {shown}: {e}"))
}

/// Parses the text of a config file; errors say the line and the key.
pub fn parse_file(text: &str) -> Result<Options, String> {
    toml::from_str::<Options>(text).map_err(|e| {
        let what = e.message().trim_end().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {what}")
            }
            None => what,
        }
    })
}

impl Options {
    /// `self` (the command line) over `file`: a value given here wins.
    fn over(mut self, file: Options) -> Options {
        macro_rules! fill {
            ($($field:ident),* $(,)?) => {
                $( if self.$field.is_none() { self.$field = file.$field; } )*
            };
        }
        fill!(
            mode,
            workers,
            max_workers,
            min_spare,
            max_spare,
            max_children,
            max_requests,
            max_requests_jitter,
            max_per_ip,
            max_conn_rate,
            idle_timeout,
            max_session,
            max_bytes,
            shutdown_timeout,
            backlog,
            socket_mode,
            user,
            group,
            chroot,
            pidfile,
            log,
            syslog_socket,
            syslog_facility,
            log_level,
        );
        for (mine, theirs) in [
            (&mut self.listen, file.listen),
            (&mut self.allow, file.allow),
            (&mut self.deny, file.deny),
        ] {
            if mine.is_empty() {
                *mine = theirs;
            }
        }
        self
    }
}

fn nonzero(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// Fills in the defaults and checks that the settings make sense together.
pub fn resolve(o: Options) -> Result<Config, String> {
    let rules = Rules::new(&o.allow, &o.deny)?;

    let listen = if o.listen.is_empty() {
        vec![defaults::LISTEN.to_string()]
    } else {
        o.listen.clone()
    };
    let listen = listen
        .iter()
        .map(|a| a.parse::<ListenAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in listen.iter().enumerate() {
        if let Some(b) = listen[..i].iter().find(|b| a.overlaps(b)) {
            return Err(if a == b {
                format!("listen address {a} is given twice")
            } else {
                format!("listen addresses {b} and {a} overlap: both would take the same port on the same address")
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
    let max_bytes = o.max_bytes.unwrap_or(0);
    if max_bytes > ceiling::MAX_BYTES {
        return Err(format!(
            "max-bytes ({max_bytes}) is above the ceiling of {}",
            ceiling::MAX_BYTES
        ));
    }

    let workers = match o.workers.unwrap_or(Workers::Count(defaults::WORKERS)) {
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
        if n > MAX_WORKERS_LIMIT {
            return Err(format!(
                "{name} ({n}) is above the ceiling of {MAX_WORKERS_LIMIT}"
            ));
        }
    }
    if workers > max_workers {
        return Err(format!(
            "workers ({workers}) is greater than max-workers ({max_workers})"
        ));
    }
    if min_spare > max_spare {
        return Err(format!(
            "min-spare ({min_spare}) is greater than max-spare ({max_spare})"
        ));
    }
    if min_spare > max_workers {
        return Err(format!(
            "min-spare ({min_spare}) is greater than max-workers ({max_workers}): the pool could never keep that many idle"
        ));
    }
    let max_children = o.max_children.unwrap_or(defaults::MAX_CHILDREN);
    if max_children == 0 || max_children > ceiling::MAX_CHILDREN {
        return Err(format!(
            "max-children ({max_children}) must be between 1 and {}",
            ceiling::MAX_CHILDREN
        ));
    }
    let backlog = o.backlog.unwrap_or(defaults::BACKLOG);
    if backlog == 0 || backlog > ceiling::BACKLOG {
        return Err(format!(
            "backlog ({backlog}) must be between 1 and {}",
            ceiling::BACKLOG
        ));
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
        mode: o.mode.unwrap_or(Mode::Prefork),
        workers,
        max_workers,
        min_spare,
        max_spare,
        max_children,
        max_requests: o.max_requests.unwrap_or(0),
        max_requests_jitter: o.max_requests_jitter.unwrap_or(0),
        max_per_ip: o.max_per_ip.unwrap_or(0),
        max_conn_rate: o.max_conn_rate.unwrap_or(0),
        rules,
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

/// The CPUs this process may run on: the affinity mask and the cgroup CPU
/// quota both count (std reads both on Linux), and never fewer than one.
fn usable_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get().min(u32::MAX as usize) as u32)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Options {
        let mut all = vec!["echo-forkd", "-f"];
        all.extend_from_slice(args);
        Options::try_parse_from(all).expect("valid command line")
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = resolve(cli(&[])).unwrap();
        assert_eq!(c.mode, Mode::Prefork);
        assert_eq!(c.workers, 4);
        assert_eq!(c.max_workers, 256);
        assert_eq!((c.min_spare, c.max_spare), (2, 8));
        assert_eq!(c.max_children, 256);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.backlog, 1024);
        assert_eq!(c.log, LogTarget::Stderr);
        assert_eq!(c.listen, vec!["[::]:7".parse::<ListenAddr>().unwrap()]);
    }

    #[test]
    fn file_keys_are_long_option_names() {
        let o = parse_file(
            "mode = \"fork\"\nmax-children = 64\nlisten = [\"127.0.0.1:7\"]\nworkers = \"auto\"\n",
        )
        .unwrap();
        assert_eq!(o.mode, Some(Mode::Fork));
        assert_eq!(o.max_children, Some(64));
        assert_eq!(o.listen, vec!["127.0.0.1:7".to_string()]);
        assert_eq!(o.workers, Some(Workers::Auto));
        assert_eq!(
            parse_file("workers = 3").unwrap().workers,
            Some(Workers::Count(3))
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse_file("mode = \"fork\"\n\nmax-chidlren = 3\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("max-chidlren"), "{err}");
    }

    #[test]
    fn command_line_only_options_are_not_keys() {
        for key in [
            "foreground = true",
            "config = \"x\"",
            "check = true",
            "inetd = true",
        ] {
            assert!(
                parse_file(key).is_err(),
                "{key} should be refused in a file"
            );
        }
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse_file("listen = [\"127.0.0.1:1\"]\nworkers = 9\nidle-timeout = 5").unwrap();
        let c = resolve(cli(&["-l", "127.0.0.1:2", "-w", "3"]).over(file)).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:2".parse::<ListenAddr>().unwrap()]);
        assert_eq!(c.workers, 3);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(5)));
    }

    #[test]
    fn contradictions_are_errors() {
        assert!(resolve(cli(&["--min-spare", "5", "--max-spare", "4"])).is_err());
        assert!(resolve(cli(&["-w", "10", "--max-workers", "5"])).is_err());
        assert!(resolve(cli(&["-w", "0"])).is_err());
        assert!(resolve(cli(&["--max-children", "0"])).is_err());
        assert!(resolve(cli(&["-l", "127.0.0.1:1", "-l", "127.0.0.1:1"])).is_err());
        assert!(resolve(cli(&["-l", "127.0.0.1:0", "-l", "127.0.0.1:0"])).is_ok());
        // Raising workers alone lifts the default ceiling with it.
        assert_eq!(resolve(cli(&["-w", "300"])).unwrap().max_workers, 300);
        assert!(resolve(cli(&["--max-workers", "4097"])).is_err());
    }

    #[test]
    fn values_above_their_ceiling_are_errors_naming_the_key() {
        let over = (ceiling::SECONDS + 1).to_string();
        for key in ["--idle-timeout", "--max-session", "--shutdown-timeout"] {
            let err = resolve(cli(&[key, &over])).unwrap_err();
            assert!(err.contains(&key[2..]) && err.contains("30 days"), "{err}");
            assert!(resolve(cli(&[key, &ceiling::SECONDS.to_string()])).is_ok());
        }
        let err = resolve(cli(&["--max-bytes", &u64::MAX.to_string()])).unwrap_err();
        assert!(err.contains("max-bytes"), "{err}");
        assert!(resolve(cli(&["--max-children", "65537"])).is_err());
        assert!(resolve(cli(&["--max-spare", "5000"])).is_err());
        let err = parse_file("shutdown-timeout = 9223372036854775807")
            .and_then(|o| resolve(cli(&[]).over(o)))
            .unwrap_err();
        assert!(err.contains("shutdown-timeout"), "{err}");
    }

    #[test]
    fn contradictions_and_empty_values_are_errors() {
        let err = resolve(cli(&["--min-spare", "300", "--max-spare", "300"])).unwrap_err();
        assert!(err.contains("max-workers"), "{err}");
        let err = resolve(cli(&["-l", "*:7007", "-l", "[::]:7007"])).unwrap_err();
        assert!(err.contains("overlap"), "{err}");
        // clap refuses an empty path on the command line; a file may not.
        for key in ["pidfile", "chroot", "syslog-socket"] {
            let o = parse_file(&format!("{key} = \"\"")).unwrap();
            let err = resolve(cli(&[]).over(o)).unwrap_err();
            assert!(err.contains(key) && err.contains("empty"), "{err}");
        }
        let err = parse_file("listen = []").unwrap_err();
        assert!(err.contains("line 1") && err.contains("listen"), "{err}");
        let long = format!("unix:/{}", "d".repeat(120));
        let err = load(cli(&["-l", &long]), Path::new("/")).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
        // A relative path is measured once it is absolute.
        let short = "unix:s".to_string();
        let deep = Path::new("/").join("d".repeat(110));
        assert!(load(cli(&["-l", &short]), &deep).is_err());
    }

    #[test]
    fn socket_mode_is_octal_and_a_string_in_the_file() {
        assert_eq!(resolve(cli(&[])).unwrap().socket_mode, 0o666);
        let c = resolve(cli(&["--socket-mode", "0660"])).unwrap();
        assert_eq!(c.socket_mode, 0o660);
        assert_eq!("600".parse::<SocketMode>(), Ok(SocketMode(0o600)));
        for bad in ["", "0800", "1777", "rw", "07777"] {
            assert!(bad.parse::<SocketMode>().is_err(), "{bad}");
        }
        let o = parse_file("socket-mode = \"0640\"").unwrap();
        assert_eq!(o.socket_mode, Some(SocketMode(0o640)));
        let err = parse_file("socket-mode = 640").unwrap_err();
        assert!(err.contains("string"), "{err}");
    }

    #[test]
    fn config_files_must_be_small_regular_files() {
        let err = read_file(Path::new("/dev/zero")).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = std::env::temp_dir().join(format!("echo-forkd-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening a FIFO for reading would wait for a writer: it must not.
        let err = read_file(&fifo).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let big = dir.join("big.conf");
        std::fs::write(&big, vec![b'#'; ceiling::CONFIG_BYTES as usize + 1]).unwrap();
        let err = read_file(&big).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Nothing `-t` accepts may panic at run time: random settings over the
    /// whole option space, the edges included; every one that resolves is
    /// run through the computations the daemon makes with it.
    #[test]
    fn nothing_that_resolves_overflows_at_run_time() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let edges64 = [
            0,
            1,
            2,
            59,
            ceiling::SECONDS - 1,
            ceiling::SECONDS,
            ceiling::SECONDS + 1,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX,
        ];
        let edges32 = [
            0,
            1,
            2,
            7,
            255,
            4095,
            4096,
            4097,
            65_536,
            i32::MAX as u32,
            u32::MAX,
        ];
        let pick64 = |r: u64| match r % 3 {
            0 => edges64[(r / 3) as usize % edges64.len()],
            1 => r >> (r % 64),
            _ => r % 100_000,
        };
        let pick32 = |r: u64| match r % 3 {
            0 => edges32[(r / 3) as usize % edges32.len()],
            1 => (r >> 7) as u32 >> (r % 32),
            _ => (r % 10_000) as u32,
        };
        // Half the time a value is left out, so that most draws resolve.
        let maybe32 = |r: u64| (r & 1 == 0).then(|| pick32(r >> 1));
        let maybe64 = |r: u64| (r & 1 == 0).then(|| pick64(r >> 1));
        let mut accepted = 0;
        for _ in 0..20_000 {
            let o = Options {
                workers: maybe32(next()).map(Workers::Count),
                max_workers: maybe32(next()),
                min_spare: maybe32(next()),
                max_spare: maybe32(next()),
                max_children: maybe32(next()),
                max_requests: maybe32(next()),
                max_requests_jitter: maybe32(next()),
                max_per_ip: maybe32(next()),
                max_conn_rate: maybe32(next()),
                idle_timeout: maybe64(next()),
                max_session: maybe64(next()),
                max_bytes: maybe64(next()),
                shutdown_timeout: maybe64(next()),
                backlog: maybe32(next()),
                ..cli(&[])
            };
            let Ok(c) = resolve(o) else { continue };
            accepted += 1;
            let now = std::time::Instant::now();
            let _ = crate::time::after(now, c.shutdown_timeout);
            let limits = c.limits();
            let later = limits.next_deadline(now, now);
            let _ = limits.expired(now, now, now);
            let _ = crate::time::poll_timeout(later.map(|t| t - now));
            let _ = limits.room(65_536, c.max_bytes.saturating_sub(1));
            let mut s = next() | 1;
            let _ = crate::pool::max_requests(c.max_requests, c.max_requests_jitter, &mut s);
            let b = crate::pool::Bounds {
                workers: c.workers,
                max_workers: c.max_workers,
                min_spare: c.min_spare,
                max_spare: c.max_spare,
            };
            let mut pool = crate::pool::Pool::default();
            for (idle, total) in [(0, 0), (0, c.max_workers), (c.max_spare, c.workers)] {
                let _ = pool.decide(now, (idle, total), total, Some(next() as u32), b);
                let _ = pool.decide(now, (0, idle), total, None, b);
            }
            let _ = c.bind_options(None);
        }
        assert!(accepted > 1000, "only {accepted} settings resolved");
    }

    #[test]
    fn access_rules_are_parsed_with_the_rest() {
        let c = resolve(cli(&["--allow", "10.0.0.0/8", "--deny", "10.1.0.0/16"])).unwrap();
        assert!(!c.rules.is_empty());
        let err = resolve(cli(&["--deny", "10.0.0.1/8"])).unwrap_err();
        assert!(err.contains("10.0.0.1/8"), "{err}");
    }

    #[test]
    fn relative_paths_are_taken_from_the_start_directory() {
        let o = cli(&[
            "-l",
            "unix:run/echo.sock",
            "-l",
            "unix:/abs.sock",
            "-p",
            "echo.pid",
            "--chroot",
            "/var/empty",
        ]);
        let c = resolve(o).unwrap().anchored(Path::new("/srv/echo"));
        assert_eq!(c.pidfile.as_deref(), Some(Path::new("/srv/echo/echo.pid")));
        assert_eq!(c.chroot.as_deref(), Some(Path::new("/var/empty")));
        assert_eq!(
            c.listen,
            [
                ListenAddr::Unix("/srv/echo/run/echo.sock".into()),
                ListenAddr::Unix("/abs.sock".into())
            ]
        );
        assert_eq!(c.syslog_socket, Path::new("/dev/log"));
    }

    #[test]
    fn workers_auto_is_at_least_one() {
        assert!(resolve(cli(&["-w", "auto"])).unwrap().workers >= 1);
        assert!("many".parse::<Workers>().is_err());
    }
}
