//! The machine the tests share: free ports, scratch directories, other
//! programs a test starts, the lock heavy tests take, private network
//! namespaces, and the cases skipped where something is missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// A port free now on 127.0.0.1, for a program that takes its port from
/// its configuration rather than reporting the one it was given.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process the test started (HAProxy, inetd), killed and reaped on drop.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("echo-forkd-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether `path` exists.
pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Held by tests that load the machine heavily or measure time, so that
/// they do not run at once and make each other's figures meaningless.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a thread of its own in a new network namespace whose
/// loopback is up and also holds the IPv6 addresses `addrs` (with their
/// /64), so that a test can be several IPv6 hosts of one network without
/// touching the machine's. Daemons and sockets made on that thread live
/// in the namespace, which goes when they do. `None`, saying why, where
/// namespaces need root or `ip` (iproute2) is missing.
pub fn in_netns<T: Send + 'static>(
    addrs: &[&'static str],
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    if !nix::unistd::geteuid().is_root() {
        skipped(format_args!("a private network namespace needs root"));
        return None;
    }
    let addrs = addrs.to_vec();
    std::thread::spawn(move || {
        // SAFETY: unshare(2) with CLONE_NEWNET only moves this thread to a
        // new network namespace; it touches no memory of ours.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            skipped(format_args!(
                "cannot make a network namespace: {}",
                std::io::Error::last_os_error()
            ));
            return None;
        }
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["link", "set", "lo", "up"]) {
            skipped(format_args!(
                "cannot run ip (iproute2) in a network namespace"
            ));
            return None;
        }
        for a in &addrs {
            // nodad: usable at once, not after duplicate detection.
            let cidr = format!("{a}/64");
            assert!(
                ip(&["-6", "addr", "add", &cidr, "dev", "lo", "nodad"]),
                "ip -6 addr add {cidr}"
            );
        }
        // The kernel adds each address's routes from a work queue, even
        // without duplicate detection: on a loaded machine a connect can
        // meet ENETUNREACH for a moment. Wait until each can be bound and
        // routed to (a UDP connect sends nothing).
        for a in &addrs {
            let usable = || {
                let at: std::net::SocketAddr = format!("[{a}]:0").parse().ok()?;
                let s = std::net::UdpSocket::bind(at).ok()?;
                s.connect(format!("[{a}]:9")).ok()
            };
            assert!(
                crate::util::wait_until(std::time::Duration::from_secs(10), || usable().is_some()),
                "{a} not usable in the namespace within 10 s"
            );
        }
        Some(f())
    })
    .join()
    .expect("the test's namespace thread")
}

/// Cases skipped in this run, for the count at its end.
static SKIPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A test, or a case of one, that cannot run here: says so on a line of
/// its own that `cargo test` shows even when the test passes (written to
/// standard error directly, past the harness's capture), and counts it
/// for a line when the run ends.
pub fn skipped(why: impl std::fmt::Display) {
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
    SKIPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    AT_EXIT.call_once(|| {
        // SAFETY: `report` is a plain function that only reads an atomic
        // and writes to standard error, which is safe at exit.
        unsafe {
            libc::atexit(report_skipped);
        }
    });
}

extern "C" fn report_skipped() {
    let n = SKIPPED.load(std::sync::atomic::Ordering::SeqCst);
    let _ = writeln!(
        std::io::stderr(),
        "\n{n} test case(s) SKIPPED (see above): the README's \"Tests\" says what makes the suite complete"
    );
}
