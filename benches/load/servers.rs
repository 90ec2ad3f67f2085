//! Starting and stopping the server under test for one run: echo-forkd
//! with the case's flags, a peer of this binary, or Python's; learning
//! its port from what it prints.

use super::*;

/// Where the io_uring floor is built (see [`build_uring_floor`]).
pub(crate) fn uring_floor() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("uring_echo")
}

/// Builds the io_uring floor (benches/floors/uring_echo.c) with the
/// system's C compiler and liburing; why not, where it cannot be built.
pub(crate) fn build_uring_floor() -> Result<(), String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/floors/uring_echo.c");
    let out = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(uring_floor())
        .arg(&src)
        .arg("-luring")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cc: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().find(|l| l.contains("error")).unwrap_or("");
    Err(format!(
        "cc could not build {} (liburing's headers are in Debian's liburing-dev): {first}",
        src.display()
    ))
}

/// A server under test, in its own process group, killed with it on drop.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

impl Server {
    pub(crate) fn start(t: Target, case: Case, o: &Opts) -> Server {
        let kind = t.kind;
        let mut cmd = match kind {
            k if k.is_ours() => {
                let bin = match (kind, &o.baseline) {
                    (Kind::PreforkBase | Kind::ForkBase | Kind::EventBase, Some(b)) => b.as_path(),
                    _ => Path::new(BIN),
                };
                let mut c = Command::new(bin);
                c.args(["-f", "-l", "127.0.0.1:0", "--log-level", "info"]);
                c.args(daemon_args(t, case, o));
                if case.scenario.is_reload() {
                    // The default, as operators run it (a prefork pool of
                    // 4,000 takes its time to start a new generation, and
                    // what a worker cannot hand over meanwhile waits at
                    // most this); a build without hand-over cuts then.
                    c.args(["--shutdown-timeout", "10"]);
                }
                c.stderr(Stdio::piped()).stdout(Stdio::null());
                c
            }
            Kind::PyForking | Kind::PyThreading | Kind::PyUdp => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers.py");
                let mut c = Command::new("python3");
                c.arg(script)
                    .arg(match kind {
                        Kind::PyForking => "forking",
                        Kind::PyThreading => "threading",
                        _ => "udp",
                    })
                    .stdout(Stdio::piped());
                c
            }
            Kind::Uring => {
                let mut c = Command::new(uring_floor());
                c.stdout(Stdio::piped());
                c
            }
            _ => {
                let mut c = Command::new(std::env::current_exe().expect("own path"));
                c.arg(match kind {
                    Kind::Tokio if case.scenario == Scenario::Udp => "serve-tokio-udp",
                    Kind::Tokio => "serve-tokio",
                    Kind::MinFork => "serve-fork",
                    Kind::MinUdp => "serve-udp",
                    _ => "serve-epoll",
                })
                .stdout(Stdio::piped());
                c
            }
        };
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // Its own group keeps a Ctrl-C meant for the benchmark from reaching
        // it, and the benchmark's Drop does not run when it is killed: the
        // kernel ends the server with the benchmark instead (echo-forkd's
        // workers follow their master).
        #[cfg(any(target_os = "linux", target_os = "android"))]
        // SAFETY: the closure runs in the child between fork and exec, where
        // only async-signal-safe calls may be made: it makes one prctl
        // system call and allocates nothing.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", kind.name()));
        let port = if kind.is_ours() {
            let err = child.stderr.take().expect("piped stderr");
            daemon_port(err, case.scenario == Scenario::Udp)
        } else {
            let out = child.stdout.take().expect("piped stdout");
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            line.trim().parse().ok()
        };
        let mut server = Server { child, port: 0 };
        server.port =
            port.unwrap_or_else(|| panic!("{} did not say which port it listens on", t.name()));
        server
    }

    pub(crate) fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port)
    }

    pub(crate) fn pid(&self) -> i32 {
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

/// echo-forkd's settings for a case: what an operator would give it to
/// carry that load.
pub(crate) fn daemon_args(t: Target, case: Case, o: &Opts) -> Vec<String> {
    let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if matches!(t.kind, Kind::Fork | Kind::ForkBase) {
        let max = (case.clients.max(1024) + 64).to_string();
        let backlog = BACKLOG.to_string();
        return args(&["-m", "fork", "--max-children", &max, "--backlog", &backlog]);
    }
    if matches!(t.kind, Kind::Event | Kind::EventBase | Kind::EventEpoll) {
        // One worker per CPU (the default), each with room for every
        // client, however the kernel spreads them (or a hand-over gives
        // them to one worker of the new generation).
        let conns = case.clients.max(1024).to_string();
        let backlog = BACKLOG.to_string();
        let mut a = args(&[
            "-m",
            "event",
            "--worker-connections",
            &conns,
            "--backlog",
            &backlog,
        ]);
        if case.scenario.is_reload() {
            // Two workers whatever the machine, so that the figures of
            // a hand-over compare from one machine to the next.
            a.extend(args(&["-w", "2"]));
        }
        if t.kind == Kind::EventEpoll {
            a.extend(args(&["--io-engine", "epoll"]));
        }
        return a;
    }
    if case.scenario == Scenario::Udp {
        // The UDP worker (one, the default) with no per-source limit: a
        // benchmark is the flood an operator asks for. The pool is kept
        // to one idle TCP worker.
        return args(&[
            "-l",
            "udp:127.0.0.1:0",
            "--udp-rate",
            "0",
            "-w",
            "1",
            "--min-spare",
            "0",
        ]);
    }
    if case.scenario == Scenario::Burst {
        // A small pool with room to grow: the figure is how fast it does.
        let max = (o.burst + 48).max(256).to_string();
        let backlog = BACKLOG.to_string();
        return args(&[
            "-m",
            "prefork",
            "-w",
            "2",
            "--max-workers",
            &max,
            "--backlog",
            &backlog,
        ]);
    }
    // A fixed pool: the figures are then the pool's, not its growth's.
    let workers = match case.scenario {
        Scenario::Conn => t.pool,
        Scenario::Rtt => case.clients + 2,
        Scenario::Stream => 6,
        _ => case.clients + 4,
    };
    let w = workers.to_string();
    let max = if case.scenario.is_reload() {
        // A worker per held connection, in the generation that takes them
        // over too: room up to the ceiling.
        RELOAD_MAX_WORKERS
    } else {
        workers.max(256)
    }
    .to_string();
    args(&[
        "-m",
        "prefork",
        "-w",
        &w,
        "--max-workers",
        &max,
        "--min-spare",
        "0",
    ])
}

/// Reads echo-forkd's log until `ready`; returns the port of its `listening
/// on` line and leaves a thread draining the rest.
pub(crate) fn daemon_port(err: std::process::ChildStderr, udp: bool) -> Option<u16> {
    let mut lines = BufReader::new(err).lines();
    let mut port = None;
    let listening = if udp {
        "listening on udp:127.0.0.1:"
    } else {
        "listening on 127.0.0.1:"
    };
    for line in lines.by_ref() {
        let line = line.ok()?;
        if let Some(rest) = line.split(listening).nth(1) {
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

/// The listener of the servers built into this binary: 127.0.0.1:0, the
/// same backlog as echo-forkd's, TCP_NODELAY inherited by connections;
/// prints the port for the benchmark.
pub(crate) fn bench_listener() -> TcpListener {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    setsockopt(&fd, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    setsockopt(&fd, sockopt::TcpNoDelay, &true).expect("TCP_NODELAY");
    let any = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
    bind(fd.as_raw_fd(), &any).expect("bind");
    nix::sys::socket::listen(&fd, Backlog::new(BACKLOG).expect("backlog")).expect("listen");
    let l = TcpListener::from(fd);
    println!("{}", l.local_addr().expect("local addr").port());
    l
}
