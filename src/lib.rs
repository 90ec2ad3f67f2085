//! echo-forkd: an echo (RFC 862) daemon built on the classic Unix process
//! models: pre-forked workers, a child per connection, or event-driven
//! workers, under one master.
//!
//! The binary is a thin shell around [`run`]; every module is private to
//! the crate, so the compiler finds what nothing uses. Module map, from
//! the operator's words down to the system:
//!
//! - `config` (options, file, defaults, checks), `reload` (what a SIGHUP
//!   changes), `upgrade` (what a USR2 hands the new code);
//! - `master` (the supervisor: its lifecycle decided in
//!   `master/lifecycle`, a file per concern), `kind` (the table of child
//!   kinds), `children` (the child table, exit classes), `backoff`
//!   (crash-loop protection), `pool` (the spare rule);
//! - `worker` (a prefork worker, a fork-mode child, `--inetd`), `event`
//!   (the event-driven worker), `udp` (the datagram echo), `metrics` (the
//!   Prometheus worker), `echo` (one connection, blocking or as a state
//!   machine), `proxy` (the PROXY protocol);
//! - `admission` (may this client be served: rules, rates, places),
//!   `access` (addresses and CIDR rules), `accept` (accepting, the
//!   wake-one wait), `turns` (prefork workers' turns where the kernel
//!   wakes every waiter), `listen` (addresses and sockets), `relay` (a
//!   connection handed from a retiring worker to one that serves on);
//! - `scoreboard` (the memory every process shares), `signals` (the
//!   self-pipe), `logging` (stderr or syslog), `daemon` (detach, pidfile,
//!   privileges, descriptor limits), `systemd` (notify, the fd store,
//!   socket activation), `time`;
//! - `sys`: the system calls nix does not wrap safely (fork, `_exit`,
//!   mmap, accept4, ...), where nearly all `unsafe` lives; the few other
//!   blocks (each `fork`'s caller, taking an inherited descriptor, and
//!   `event::ring`, whose buffers and sends the kernel reads and writes)
//!   say why they hold, and the crate denies `unsafe` everywhere else.

#![deny(unsafe_code)]

mod accept;
mod access;
mod activation;
mod admission;
mod backoff;
mod children;
mod config;
mod daemon;
mod echo;
mod engine;
#[cfg(any(target_os = "linux", target_os = "android"))]
mod event;
mod kind;
mod listen;
mod logging;
mod master;
mod metrics;
mod pool;
mod proxy;
mod relay;
mod reload;
mod scoreboard;
mod signals;
#[allow(unsafe_code)]
mod sys;
mod systemd;
mod time;
mod turns;
mod udp;
mod upgrade;
mod vault;
mod worker;

use clap::Parser;
use log::{error, info};

use config::{LogTarget, Options};
use listen::ListenAddr;

/// Runs echo-forkd with the process's command line; returns the exit status
/// (0 success, 1 startup or runtime failure, 2 usage error).
pub fn run() -> i32 {
    // A master that re-executed itself (USR2) left what it hands over.
    let inheritance = master::take_inheritance();
    let keep = match &inheritance {
        Some(Ok(h)) => h.fds(),
        _ => Vec::new(),
    };
    // Before anything of ours is open: what the parent leaked stays here.
    sys::close_inherited(|fd| systemd::is_passed(fd) || keep.contains(&fd));
    // Where an upgrade will find the new code, and how to start it again.
    let exe = started_from();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    // Usage errors exit 2, --help and --version 0 (clap's convention).
    let opts = Options::parse();
    let check = opts.check;
    // Relative paths keep meaning the start directory after detaching.
    let base = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            logging::say(format_args!(
                "cannot read the current directory: {}",
                logging::error_text(&e)
            ));
            return 1;
        }
    };
    let cfg = match config::load(opts.clone(), &base) {
        Ok(c) => c,
        Err(e) => {
            // A bad value given on the command line is a usage error, as
            // clap's own are; one in the file (or the two together) is not.
            logging::say(&e);
            return if e.usage { 2 } else { 1 };
        }
    };
    // User and group are part of what -t validates.
    let identity = match daemon::Identity::resolve(
        cfg.user.as_deref(),
        cfg.group.as_deref(),
        cfg.chroot.as_deref(),
    ) {
        Ok(id) => id,
        Err(e) => {
            // A user or group the file names: say where.
            let from_file = opts.user.is_none() && opts.group.is_none();
            let e = match &cfg.config_file {
                Some(path) if from_file => config::in_file(path, e),
                _ => e,
            };
            logging::say(&e);
            return 1;
        }
    };
    // Event mode: which I/O engine its workers run on (io-engine uring
    // where io_uring cannot run is an error, as any other).
    let cfg = match config::with_engine(cfg, identity.engine_workers()) {
        Ok(c) => c,
        Err(e) => {
            logging::say(&e);
            return 1;
        }
    };
    if let Some(Err(e)) = cfg.pidfile.as_deref().map(daemon::PidFile::check) {
        logging::say(&e);
        return 1;
    }
    if check || opts.print_config {
        for risk in config::risks(&cfg, identity.stays_root()) {
            logging::say(format_args!("warning: {risk}"));
        }
        if let Some(passes) = activation::socket_unit_passes() {
            for gap in activation::uncovered(&cfg.listen, &passes) {
                logging::say(format_args!("warning: {gap}"));
            }
        }
        if opts.print_config {
            print!("{}", config::effective(&cfg));
        } else {
            println!("echo-forkd: configuration is valid");
        }
        return 0;
    }

    if !cfg.inetd {
        // Under inetd, standard error may be the client's socket: leave it.
        logging::unblock_stderr();
    }
    logging::init(
        cfg.log,
        cfg.log_level.filter(),
        &cfg.syslog_socket,
        cfg.syslog_facility,
    );
    if cfg.inetd {
        return inetd(&cfg, &identity);
    }
    match inheritance {
        Some(Ok(h)) => return upgraded(cfg, identity, h, opts, base, exe, args),
        // The old code of this process exec'd us and is gone: starting
        // afresh would detach again, under another pid. Fail, non-zero,
        // so that a service manager restarts it.
        Some(Err(e)) if e.ours => {
            error!("cannot take over after the upgrade: {}", e.why);
            return 1;
        }
        Some(Err(e)) => log::warn!(
            "ignoring the upgrade inheritance in the environment: {}",
            e.why
        ),
        None => {}
    }
    match start(&cfg, &identity, systemd::Notify::from_env()) {
        Ok((listeners, estate, activated)) => {
            for risk in config::risks(&cfg, identity.stays_root()) {
                log::warn!("{risk}");
            }
            let source = master::Source {
                cli: opts,
                base,
                activated,
                exe,
                args,
            };
            master::run(cfg, listeners, identity, estate, source, None)
        }
        Err(e) => {
            if cfg.log == LogTarget::Syslog {
                error!("{e}");
            }
            logging::say(&e);
            1
        }
    }
}

/// The path this program was started from, absolute but with its links
/// kept (an upgrade that moves a link must find the new target): argv[0]
/// under the start directory, or found along PATH as the shell found it;
/// else the file the kernel says we run.
fn started_from() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let exe = || std::env::current_exe().unwrap_or_default();
    let Some(arg0) = std::env::args_os().next().map(std::path::PathBuf::from) else {
        return exe();
    };
    if arg0.as_os_str().as_encoded_bytes().contains(&b'/') {
        return match std::env::current_dir() {
            Ok(cwd) if arg0.is_relative() => cwd.join(arg0),
            _ => arg0,
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(&arg0))
        .find(|p| {
            p.is_absolute()
                && std::fs::metadata(p)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(exe)
}

/// The new code of a master that re-executed itself (USR2): no binding, no
/// detaching, no pidfile to lock; all of that was passed on.
fn upgraded(
    cfg: config::Config,
    identity: daemon::Identity,
    h: upgrade::Inheritance,
    cli: Options,
    base: std::path::PathBuf,
    exe: std::path::PathBuf,
    args: Vec<std::ffi::OsString>,
) -> i32 {
    let (listeners, pidfile, notify) = match master::take_passed(&h) {
        Ok(p) => p,
        Err(e) => {
            error!("cannot take over after the upgrade: {e}");
            return 1;
        }
    };
    // The metrics' listener is ours even under socket activation.
    let mut echo = listeners
        .iter()
        .filter(|l| l.service() != listen::Service::Metrics)
        .peekable();
    let activated = echo.peek().is_some() && echo.all(|l| l.configured().is_none());
    let estate = master::Estate {
        pidfile,
        ready: None,
        notify,
        store: master::Stored::default(),
    };
    let source = master::Source {
        cli,
        base,
        activated,
        exe,
        args,
    };
    master::run(cfg, listeners, identity, estate, source, Some(h))
}

/// Every startup step that can fail, in an order that lets each failure be
/// reported on the launcher's stderr: bind, lock the pidfile, then detach
/// (unless -f) and write our pid. The flag says the listeners were passed
/// by the service manager.
fn start(
    cfg: &config::Config,
    identity: &daemon::Identity,
    notify: Option<systemd::Notify>,
) -> Result<(Vec<listen::Listener>, master::Estate, bool), String> {
    let (mut listeners, activated, store) = listeners(cfg, identity)?;
    let mut pidfile = cfg
        .pidfile
        .as_deref()
        .map(daemon::PidFile::lock)
        .transpose()?;
    // Only once nothing else failed, so that a real error comes first;
    // and before detaching, so that the operator sees it.
    if cfg.log == LogTarget::Syslog && !logging::syslog_connected() {
        logging::say(format_args!(
            "warning: cannot reach syslog at {}; log lines are dropped until it appears",
            cfg.syslog_socket.display()
        ));
    }
    let ready = if cfg.foreground {
        None
    } else {
        let ready = daemon::detach()?;
        for l in &mut listeners {
            l.adopt();
        }
        Some(ready)
    };
    // Said once detached, so that the lines carry the master's pid.
    for l in &listeners {
        info!("listening on {}", l.name());
    }
    if let Some(p) = &mut pidfile {
        p.write_pid()
            .map_err(|e| format!("cannot write the pidfile: {}", logging::error_text(&e)))?;
    }
    Ok((
        listeners,
        master::Estate {
            pidfile,
            ready,
            notify,
            store,
        },
        activated,
    ))
}

/// The sockets passed by systemd (socket activation, flagged true), or
/// else the configured addresses, each taken back from systemd's file
/// descriptor store if it kept one for that address (a restart: clients
/// have waited in its backlog), else bound now; and what else the store
/// kept (connections carried across the restart, listeners no longer
/// configured), for the master.
fn listeners(
    cfg: &config::Config,
    identity: &daemon::Identity,
) -> Result<(Vec<listen::Listener>, bool, master::Stored), String> {
    let opts = cfg.bind_options(identity.socket_group());
    let passed = systemd::passed_from_env()?.unwrap_or_default();
    let mut kept = passed.listeners;
    let mut store = master::Stored {
        vault: passed.vault,
        connections: passed.connections,
        stale: Vec::new(),
    };
    let mut bound = Vec::with_capacity(cfg.listen.len());
    let activated = !passed.activated.is_empty();
    if activated {
        info!(
            "using {} passed by the service manager instead of binding",
            logging::counted(passed.activated.len() as u64, "socket", "sockets")
        );
        let names: Vec<String> = passed
            .activated
            .iter()
            .map(|l| l.name().to_string())
            .collect();
        for gap in activation::uncovered(&cfg.listen, &names) {
            log::warn!("{gap}");
        }
        bound = passed.activated;
    }
    for a in &cfg.listen {
        // Under socket activation the service manager passes the echo
        // sockets; --metrics is ours all the same.
        if activated && !matches!(a, ListenAddr::Metrics(_)) {
            continue;
        }
        let shown = a.to_string();
        let l = match kept.iter().position(|(k, _)| *k == shown) {
            Some(i) => {
                let (_, fd) = kept.swap_remove(i);
                let owns_file = matches!(a, ListenAddr::Unix(_));
                listen::Listener::adopt_passed(fd, Some(&shown), owns_file)?
            }
            None => listen::bind(a, &opts)?,
        };
        bound.push(l);
    }
    // Kept for an address no longer configured: closed, and the master
    // takes them out of the store.
    store.stale = kept
        .into_iter()
        .map(|(addr, _)| systemd::listener_name(&addr))
        .collect();
    Ok((bound, activated, store))
}

/// `--inetd`: the connection is on stdin (inetd `nowait`, systemd
/// `Accept=yes`). Like any process that touches a client, drop privileges
/// first, then serve it and exit.
fn inetd(cfg: &config::Config, identity: &daemon::Identity) -> i32 {
    use nix::sys::socket::{getsockopt, sockopt};
    // SAFETY: nothing in this process took fd 0 (std only reads it through
    // `io::stdin`, which this mode never uses); inetd made it ours.
    #[allow(unsafe_code)]
    let stdin = unsafe { sys::inherited_fd(0) };
    let Some(conn) = stdin.filter(|fd| getsockopt(fd, sockopt::SockType).is_ok()) else {
        error!("--inetd: standard input is not a socket");
        if cfg.log != LogTarget::Stderr {
            // Not a socket, so not the client either: safe to say it there
            // too (unless the line above just went there).
            logging::say("--inetd: standard input is not a socket");
        }
        return 1;
    };
    if let Err(e) = sys::set_nonblocking(&conn) {
        error!("--inetd: cannot make the connection non-blocking: {e}");
        return 1;
    }
    if let Err(e) = identity.enter() {
        error!("--inetd: cannot drop privileges: {e}");
        return worker::EXIT_SETUP;
    }
    worker::inetd(conn, cfg.limits())
}
