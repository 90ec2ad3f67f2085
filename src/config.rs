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
    #[serde(default)]
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

    /// The per-connection caps, as the echo loop takes them.
    pub fn limits(&self) -> crate::echo::Limits {
        crate::echo::Limits {
            idle: self.idle_timeout,
            session: self.max_session,
            max_bytes: self.max_bytes,
        }
    }
}

/// The highest `max-workers` (and `workers`) accepted: the scoreboard is
/// sized for this many workers of two generations at once.
pub const MAX_WORKERS_LIMIT: u32 = 4096;

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
    resolve(merged).map(|c| c.anchored(base))
}

/// Parses a config file into [`Options`].
pub fn read_file(path: &Path) -> Result<Options, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read config {}: {}",
            path.display(),
            crate::error_text(&e)
        )
    })?;
    parse_file(&text).map_err(|e| format!("config {}: {e}", path.display()))
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

fn seconds(secs: u64) -> Option<Duration> {
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
        // Port 0 twice is two different ephemeral ports.
        if !a.is_ephemeral() && listen[..i].contains(a) {
            return Err(format!("listen address {a} is given twice"));
        }
    }

    let workers = match o.workers.unwrap_or(Workers::Count(defaults::WORKERS)) {
        Workers::Count(0) => return Err("workers must be at least 1".into()),
        Workers::Count(n) => n,
        Workers::Auto => usable_cpus(),
    };
    let max_workers = o.max_workers.unwrap_or(defaults::MAX_WORKERS.max(workers));
    let min_spare = o.min_spare.unwrap_or(defaults::MIN_SPARE);
    let max_spare = o.max_spare.unwrap_or(defaults::MAX_SPARE.max(min_spare));
    if max_workers > MAX_WORKERS_LIMIT {
        return Err(format!(
            "max-workers ({max_workers}) is above the limit of {MAX_WORKERS_LIMIT}"
        ));
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
    let max_children = o.max_children.unwrap_or(defaults::MAX_CHILDREN);
    if max_children == 0 {
        return Err("max-children must be at least 1".into());
    }
    let backlog = o.backlog.unwrap_or(defaults::BACKLOG);
    if backlog == 0 || backlog > i32::MAX as u32 {
        return Err(format!("backlog must be between 1 and {}", i32::MAX));
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
        idle_timeout: seconds(o.idle_timeout.unwrap_or(defaults::IDLE_TIMEOUT)),
        max_session: seconds(o.max_session.unwrap_or(0)),
        max_bytes: o.max_bytes.unwrap_or(0),
        shutdown_timeout: Duration::from_secs(
            o.shutdown_timeout.unwrap_or(defaults::SHUTDOWN_TIMEOUT),
        ),
        backlog: backlog as i32,
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
