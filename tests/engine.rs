//! `--io-engine`: event workers on io_uring where it can run, on epoll
//! otherwise, and the log line, `-T` and the metric saying which and why;
//! `uring` where io_uring cannot run is an error at start and a refused
//! reload. The causes are made real: a seccomp filter (installed in the
//! daemon before exec), a small RLIMIT_MEMLOCK, and (run alone, see
//! `kernel_io_uring_disabled_is_named`) the sysctl.
//!
//! Every daemon here runs without `ECHO_FORKD_IO_ENGINE` (the knob .ci/run
//! sets for its second run of the event-mode tests): these tests say what
//! `auto` does themselves.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::*;

/// The testing knob the daemon reads (src/engine.rs).
const KNOB: &str = "ECHO_FORKD_IO_ENGINE";

/// `echo-forkd -f ARGS` without the knob, with `adjust` applied.
fn spawn(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Daemon {
    Daemon::spawn_with(args, |c| {
        c.env_remove(KNOB);
        adjust(c);
    })
}

/// Like `spawn`, waiting for `ready`.
fn start(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Daemon {
    let d = spawn(args, adjust);
    assert!(
        d.wait_line("ready", DEADLINE).is_some(),
        "echo-forkd {args:?} did not become ready; stderr:\n{}",
        d.stderr_text()
    );
    d
}

/// The `event workers use` line.
fn engine_line(d: &Daemon) -> String {
    d.wait_line("event workers use", DEADLINE)
        .unwrap_or_else(|| panic!("no engine line; stderr:\n{}", d.stderr_text()))
}

/// The metrics' address from the `listening on metrics:` line.
fn metrics_addr(d: &Daemon) -> SocketAddr {
    d.wait_line("listening on metrics:", DEADLINE);
    d.listening()
        .iter()
        .find_map(|a| a.strip_prefix("metrics:").and_then(|a| a.parse().ok()))
        .unwrap_or_else(|| panic!("no metrics listener; stderr:\n{}", d.stderr_text()))
}

/// The body of `GET /metrics`.
fn scrape(addr: SocketAddr) -> String {
    let mut s = connect(addr);
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The metric says `engine` is in force, and only it.
fn metric_says(d: &Daemon, engine: &str) {
    let body = scrape(metrics_addr(d));
    let other = if engine == "uring" { "epoll" } else { "uring" };
    for (name, value) in [(engine, 1), (other, 0)] {
        let line = format!("echo_forkd_io_engine{{engine=\"{name}\"}} {value}\n");
        assert!(body.contains(&line), "no {line:?} in:\n{body}");
    }
    assert!(
        body.contains("# TYPE echo_forkd_io_engine gauge\n"),
        "{body}"
    );
}

/// The children of the daemon that hold an io_uring instance.
fn with_rings(d: &Daemon) -> Vec<i32> {
    d.children()
        .into_iter()
        .filter(|&p| holds_a_ring(p))
        .collect()
}

/// Installs, in the process about to exec, a seccomp filter under which
/// `io_uring_setup` fails with ENOSYS (as Docker's default profile makes
/// it fail), everything else being allowed.
fn forbid_io_uring(c: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes two prctl calls on data it owns (no allocation, no locks).
    unsafe {
        c.pre_exec(seccomp::install);
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod seccomp {
    /// `io_uring_setup`, the same number on both architectures.
    const IO_URING_SETUP: u32 = 425;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64
    /// Offsets in `struct seccomp_data`.
    const NR: u32 = 0;
    const ARCH_AT: u32 = 4;

    fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }

    fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }

    /// In the child before exec: no new privileges, then the filter.
    pub fn install() -> std::io::Result<()> {
        use libc::*;
        let program = [
            stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_AT),
            // Another architecture (a 32-bit call): allowed as is.
            jump(BPF_JMP | BPF_JEQ | BPF_K, ARCH, 0, 3),
            stmt(BPF_LD | BPF_W | BPF_ABS, NR),
            jump(BPF_JMP | BPF_JEQ | BPF_K, IO_URING_SETUP, 0, 1),
            stmt(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS as u32),
            stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
        ];
        let prog = sock_fprog {
            len: program.len() as u16,
            filter: program.as_ptr() as *mut sock_filter,
        };
        // SAFETY: plain prctl calls; `prog` and the program it points at
        // live across the call, which copies them into the kernel.
        unsafe {
            if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if prctl(
                PR_SET_SECCOMP,
                SECCOMP_MODE_FILTER as libc::c_ulong,
                &prog as *const sock_fprog,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod seccomp {
    pub fn install() -> std::io::Result<()> {
        Err(std::io::Error::other("no filter for this architecture"))
    }
}

/// Whether the tests with a seccomp filter can run here.
fn filter_missing() -> bool {
    if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return false;
    }
    skipped("the seccomp filter of these tests is written for x86_64 and aarch64");
    true
}

#[test]
fn event_mode_runs_on_io_uring_where_it_can() {
    if let Some(why) = no_uring() {
        skipped(format_args!("io_uring cannot run here: {why}"));
        return;
    }
    let d = start(
        &[
            "-m",
            "event",
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        |_| {},
    );
    let line = engine_line(&d);
    assert!(line.ends_with("event workers use io_uring"), "{line}");
    assert_eq!(writer(&line), Some(d.pid), "the master says it: {line}");
    metric_says(&d, "uring");
    assert_eq!(echo_all(d.addr(), b"on a ring"), b"on a ring");
    // The event worker really holds a ring.
    assert!(
        wait_until(DEADLINE, || !with_rings(&d).is_empty()),
        "no child of {} holds an io_uring instance; stderr:\n{}",
        d.pid,
        d.stderr_text()
    );
}

#[test]
fn io_engine_epoll_is_said_and_used() {
    let d = start(
        &[
            "-m",
            "event",
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--io-engine",
            "epoll",
        ],
        |_| {},
    );
    let line = engine_line(&d);
    assert!(
        line.ends_with("event workers use epoll (io-engine epoll)"),
        "{line}"
    );
    metric_says(&d, "epoll");
    assert_eq!(echo_all(d.addr(), b"on epoll"), b"on epoll");
    assert!(with_rings(&d).is_empty(), "a ring under --io-engine epoll");
}

#[test]
fn other_modes_say_and_expose_no_engine() {
    let d = start(
        &[
            "-w",
            "1",
            "--min-spare",
            "0",
            "-l",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        |_| {},
    );
    let body = scrape(metrics_addr(&d));
    assert!(!body.contains("io_engine"), "{body}");
    assert!(!d.stderr_text().contains("event workers use"));
}

#[test]
fn auto_falls_back_to_epoll_under_a_seccomp_filter_and_says_why() {
    if filter_missing() {
        return;
    }
    let d = start(
        &[
            "-m",
            "event",
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
        forbid_io_uring,
    );
    let line = engine_line(&d);
    assert!(
        line.contains("event workers use epoll: io_uring is not available (io_uring_setup is forbidden (it fails with ENOSYS"),
        "{line}"
    );
    assert!(line.contains("seccomp"), "{line}");
    metric_says(&d, "epoll");
    assert_eq!(echo_all(d.addr(), b"filtered"), b"filtered");
    assert!(with_rings(&d).is_empty());
}

#[test]
fn uring_under_a_seccomp_filter_is_an_error_naming_the_cause() {
    if filter_missing() {
        return;
    }
    for extra in [
        &["--io-engine", "uring"][..],
        &["--io-engine", "uring", "-t"],
    ] {
        let mut args = vec!["-m", "event", "-l", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        let mut d = spawn(&args, forbid_io_uring);
        let status = d.wait_exit(DEADLINE).expect("it exits");
        let err = d.stderr_text();
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("io-engine uring"), "{err}");
        assert!(err.contains("io_uring_setup is forbidden"), "{err}");
        assert!(err.contains("--io-engine epoll"), "{err}");
        assert!(!err.contains("ready"), "{err}");
    }
    // Other modes never probe: uring there is no error.
    let mut d = spawn(
        &[
            "-t",
            "-m",
            "prefork",
            "--io-engine",
            "uring",
            "-l",
            "127.0.0.1:0",
        ],
        forbid_io_uring,
    );
    assert_eq!(d.wait_exit(DEADLINE).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_reload_to_uring_under_a_seccomp_filter_is_refused_and_the_old_config_serves() {
    if filter_missing() {
        return;
    }
    let dir = TempDir::new("engine-reload");
    let conf = dir.path("echo.toml");
    let text = |engine: &str| {
        format!(
            "listen = [\"127.0.0.1:0\"]\nmode = \"event\"\nworkers = 1\nio-engine = \"{engine}\"\n"
        )
    };
    std::fs::write(&conf, text("auto")).unwrap();
    let d = start(&["-c", conf.to_str().unwrap()], forbid_io_uring);
    assert!(engine_line(&d).contains("use epoll: io_uring is not available"));
    let before = d.wait_children(1);
    std::fs::write(&conf, text("uring")).unwrap();
    d.signal(Signal::SIGHUP);
    let failed = d
        .wait_line("reload failed", DEADLINE)
        .unwrap_or_else(|| panic!("no refusal; stderr:\n{}", d.stderr_text()));
    assert!(failed.contains("io-engine uring"), "{failed}");
    assert!(failed.contains("--io-engine epoll"), "{failed}");
    assert!(failed.contains("unchanged"), "{failed}");
    assert_eq!(echo_all(d.addr(), b"still here"), b"still here");
    assert_eq!(d.children(), before, "the workers were replaced");
    assert!(!d.stderr_text().contains("reloaded:"));
}

#[test]
fn a_small_memlock_limit_is_named() {
    let root = nix::unistd::geteuid().is_root();
    let d = start(&["-m", "event", "-w", "1", "-l", "127.0.0.1:0"], |c| {
        // Root has CAP_IPC_LOCK, which io_uring's charge spares: run
        // as nobody, as a service without it would.
        if root {
            c.uid(65534).gid(65534).current_dir("/");
        }
        // SAFETY: one setrlimit call in the child before exec.
        unsafe {
            c.pre_exec(|| {
                let none = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &none) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let line = engine_line(&d);
    if line.ends_with("use io_uring") {
        skipped(
            "this kernel does not charge io_uring's memory to RLIMIT_MEMLOCK (or the test keeps CAP_IPC_LOCK)",
        );
        return;
    }
    assert!(
        line.contains("use epoll: io_uring is not available (the locked-memory limit (RLIMIT_MEMLOCK, 0 KiB) is too small"),
        "{line}"
    );
    assert_eq!(echo_all(d.addr(), b"unlocked"), b"unlocked");
}

/// Sets `/proc/sys/kernel/io_uring_disabled` and puts the old value back
/// when dropped, whatever the test did.
struct Sysctl {
    path: &'static Path,
    old: String,
}

impl Sysctl {
    fn set(value: &str) -> Result<Sysctl, String> {
        let path = Path::new("/proc/sys/kernel/io_uring_disabled");
        let old = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::write(path, value).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

/// The sysctl is global: it would take io_uring from every other test
/// running beside this one. So it is ignored by a plain run, and .ci/run
/// runs it alone after the suite (`-- --ignored --exact`). Needs root and
/// a writable /proc/sys/kernel/io_uring_disabled (skipped otherwise).
#[test]
#[ignore = "writes the global sysctl kernel.io_uring_disabled: run alone (.ci/run does)"]
fn kernel_io_uring_disabled_is_named() {
    if let Some(why) = no_uring() {
        skipped(format_args!("io_uring cannot run here anyway: {why}"));
        return;
    }
    let args = ["-m", "event", "-w", "1", "-l", "127.0.0.1:0"];
    {
        let _off = match Sysctl::set("2") {
            Ok(s) => s,
            Err(e) => {
                skipped(format_args!("cannot set kernel.io_uring_disabled: {e}"));
                return;
            }
        };
        let d = start(&args, |_| {});
        let line = engine_line(&d);
        assert!(
            line.contains("use epoll: io_uring is not available (kernel.io_uring_disabled = 2"),
            "{line}"
        );
        assert_eq!(echo_all(d.addr(), b"disabled"), b"disabled");
        drop(d);
        let mut args = args.to_vec();
        args.extend(["--io-engine", "uring"]);
        let mut d = spawn(&args, |_| {});
        let status = d.wait_exit(DEADLINE).expect("it exits");
        let err = d.stderr_text();
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(err.contains("kernel.io_uring_disabled = 2"), "{err}");
        assert!(err.contains("--io-engine epoll"), "{err}");
    }
    // 1: root's workers may (CAP_SYS_ADMIN), workers that drop root may
    // not, unless in kernel.io_uring_group.
    let _restricted = Sysctl::set("1").expect("set it a moment ago");
    let d = start(&args, |_| {});
    assert!(engine_line(&d).ends_with("use io_uring"));
    drop(d);
    if !matches!(nix::unistd::User::from_name("nobody"), Ok(Some(_))) {
        skipped("no user nobody to run the workers as");
        return;
    }
    let mut args = args.to_vec();
    args.extend(["-u", "nobody"]);
    let d = start(&args, |_| {});
    let line = engine_line(&d);
    assert!(line.contains("kernel.io_uring_disabled = 1"), "{line}");
    assert!(line.contains("use epoll"), "{line}");
}
