//! [`Options`]: every option, as the command line (clap) and the TOML file
//! (serde) give it, from one struct, so that the two cannot drift apart;
//! the small types of their values; and [`Config`], what they resolve to.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::access::Rules;
use crate::listen::ListenAddr;
pub use crate::logging::{Facility, LogTarget};
use std::str::FromStr;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use super::defaults;

/// The process model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A pool of workers that all accept on the listeners.
    Prefork,
    /// One child per connection, forked for it (it accepts it: the
    /// master never holds a client's connection).
    Fork,
    /// A few workers that each serve many connections from an event loop.
    Event,
}

impl Mode {
    /// Whether the master keeps a pool of workers that accept (prefork,
    /// event), rather than accepting itself (fork).
    pub fn pooled(self) -> bool {
        self != Mode::Fork
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Prefork => "prefork",
            Mode::Fork => "fork",
            Mode::Event => "event",
        })
    }
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

/// `--workers`: a number, or `auto` for the CPUs this process may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// The error for a number of workers out of range.
fn not_workers<E: serde::de::Error>(n: impl fmt::Display) -> E {
    E::custom(format!(
        "{n} is not a number of workers: 0 to {} or \"auto\"",
        u32::MAX
    ))
}

/// In the file: a number or the string `"auto"`; anything else is
/// named in the error (serde's untagged enums say only that nothing
/// matched).
impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Workers;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of workers or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Workers, E> {
                u32::try_from(n)
                    .map(Workers::Count)
                    .map_err(|_| not_workers(n))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Workers, E> {
                u32::try_from(n)
                    .map(Workers::Count)
                    .map_err(|_| not_workers(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Workers, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `--socket-mode`: permission bits for the unix socket files we create,
/// written in octal (`0660`, `660`); in the file, a string (`"0660"`), so
/// that a decimal integer is never taken for a mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// The error for a mode written as a number (`660` in TOML is decimal).
fn mode_as_number<E: serde::de::Error>(n: impl fmt::Display) -> E {
    E::custom(format!(
        "{n}: write the mode as a string of octal digits, such as \"0660\""
    ))
}

/// In the file: a string of octal digits; a number, or anything else, is
/// named in the error.
impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SocketMode;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a permission mode as a string of octal digits, such as \"0660\"")
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<SocketMode, E> {
                Err(mode_as_number(n))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<SocketMode, E> {
                Err(mode_as_number(n))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SocketMode, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// The file's `listen`: a list, or one address as a string, and never an
/// empty list (leaving the key out means the default; an empty list would
/// listen nowhere).
fn listen_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMore {
        One(String),
        More(Vec<String>),
    }
    let list = match OneOrMore::deserialize(d) {
        Ok(OneOrMore::One(a)) => vec![a],
        Ok(OneOrMore::More(list)) => list,
        Err(_) => {
            return Err(serde::de::Error::custom(
                "listen is an address or a list of addresses, as strings: listen = [\"127.0.0.1:7\", \"unix:/run/echo.sock\"]",
            ))
        }
    };
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
    about = "Echo (RFC 862) daemon with the classic process models: pre-forked workers, a child per connection, or event-driven workers",
    after_help = "Signals to the master: TERM/INT graceful stop (twice: at once), QUIT immediate stop,\nHUP reload, USR2 upgrade to the binary now at its path, USR1 status line,\nTTIN/TTOU one worker more/less (prefork and event).\nSee echo-forkd(8)."
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

    /// Validate the configuration and exit: 0 if good, 1 if not; binds nothing; warns about what is risky
    #[arg(short = 't', long)]
    #[serde(skip)]
    pub check: bool,

    /// Validate as -t does, then print the configuration in force (defaults, file and flags) as a file for -c
    #[arg(short = 'T', long)]
    #[serde(skip)]
    pub print_config: bool,

    /// Address to listen on: HOST:PORT, [V6]:PORT, *:PORT or unix:/PATH; udp:HOST:PORT, udp:[V6]:PORT or udp:*:PORT for UDP (repeatable) [default: [::]:7]
    #[arg(short = 'l', long = "listen", value_name = "ADDR")]
    #[serde(default, deserialize_with = "listen_list")]
    pub listen: Vec<String>,

    /// Process model: prefork, fork or event [default: prefork]
    #[arg(short = 'm', long, value_name = "MODE")]
    pub mode: Option<Mode>,

    /// prefork: workers started at launch, the pool's floor; event: the workers; N or auto [default: prefork 4, event auto]
    #[arg(short = 'w', long, value_name = "N|auto")]
    pub workers: Option<Workers>,

    /// event: connections one worker serves at once; at the cap it stops accepting [default: 1024]
    #[arg(long, value_name = "N")]
    pub worker_connections: Option<u32>,

    /// event: the I/O engine: auto (io_uring where it can run, else epoll), uring or epoll [default: auto]
    #[arg(long, value_name = "ENGINE")]
    pub io_engine: Option<crate::engine::Choice>,

    /// prefork: ceiling of the pool; event: most workers TTIN reaches [default: 256]
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

    /// prefork and event: a worker retires after N connections and is replaced; 0 = never [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests: Option<u32>,

    /// prefork and event: add a random 0..=N to each worker's max-requests [default: 0]
    #[arg(long, value_name = "N")]
    pub max_requests_jitter: Option<u32>,

    /// Simultaneous connections from one client address; 0 = no limit [default: 0]
    #[arg(long, value_name = "N")]
    pub max_per_ip: Option<u32>,

    /// New connections per second from one client address; 0 = no limit [default: 0]
    #[arg(long, value_name = "N")]
    pub max_conn_rate: Option<u32>,

    /// IPv6 sources share the per-source limits by this prefix; IPv4 ones count by address [default: 64]
    #[arg(long, value_name = "LEN")]
    pub ipv6_prefix: Option<u8>,

    /// Processes serving the udp: listeners (every mode) [default: 1]
    #[arg(long, value_name = "N")]
    pub udp_workers: Option<u32>,

    /// Datagrams per second answered from one source address; more are dropped; 0 = no limit [default: 1000]
    #[arg(long, value_name = "N")]
    pub udp_rate: Option<u32>,

    /// Serve Prometheus metrics at GET /metrics on HOST:PORT or unix:/PATH [default: off]
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// TCP clients must begin with a PROXY protocol header (v1 or v2) and come from a --trusted-proxy
    #[arg(long)]
    #[serde(default)]
    pub proxy_protocol: bool,

    /// How long a trusted proxy has to send the whole PROXY header [default: 5]
    #[arg(long, value_name = "SECS")]
    pub proxy_protocol_timeout: Option<u64>,

    /// A proxy allowed, and required, to send the PROXY header: CIDR (repeatable)
    #[arg(long, value_name = "CIDR")]
    #[serde(default)]
    pub trusted_proxy: Vec<String>,

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

    /// On stop, how long open connections may continue before they are killed; on reload, how long they have to be handed over [default: 10]
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

impl Options {
    /// `self` (the command line) over `file`: a value given here wins.
    pub(super) fn over(mut self, file: Options) -> Options {
        macro_rules! fill {
            ($($field:ident),* $(,)?) => {
                $( if self.$field.is_none() { self.$field = file.$field; } )*
            };
        }
        fill!(
            mode,
            workers,
            worker_connections,
            io_engine,
            max_workers,
            min_spare,
            max_spare,
            max_children,
            max_requests,
            max_requests_jitter,
            max_per_ip,
            max_conn_rate,
            ipv6_prefix,
            udp_workers,
            udp_rate,
            metrics,
            proxy_protocol_timeout,
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
        self.proxy_protocol |= file.proxy_protocol;
        for (mine, theirs) in [
            (&mut self.listen, file.listen),
            (&mut self.allow, file.allow),
            (&mut self.deny, file.deny),
            (&mut self.trusted_proxy, file.trusted_proxy),
        ] {
            if mine.is_empty() {
                *mine = theirs;
            }
        }
        self
    }
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
    /// event: connections one worker serves at once.
    pub worker_connections: u32,
    /// event: the I/O engine asked for.
    pub io_engine: crate::engine::Choice,
    /// event: the engine in force and why, once the master has probed
    /// ([`super::with_engine`]; `None` before, and in other modes).
    pub engine: Option<crate::engine::InForce>,
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
    /// The prefix length by which IPv6 sources share the per-source limits.
    pub ipv6_prefix: u8,
    /// Processes serving the `udp:` listeners.
    pub udp_workers: u32,
    /// Datagrams per second answered from one source; 0 = no limit.
    pub udp_rate: u32,
    pub rules: Rules,
    /// `--proxy-protocol`: the proxies trusted to send the header.
    pub proxy: Option<crate::proxy::Trusted>,
    /// How long a trusted proxy has to send the header.
    pub proxy_timeout: Duration,
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
