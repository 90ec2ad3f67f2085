//! The binary run other ways than under the `Daemon` guard: to completion
//! (`-t`, `--help`, a launch that detaches or fails), detached with a
//! pidfile, and as `--inetd` on a socketpair. Each is bounded or killed
//! on drop.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use super::{is_dead, wait_until, BIN, DEADLINE};

/// A daemon started without -f: the launcher has exited; the daemon's pid
/// comes from its pidfile. Dropping the guard kills it (its children follow
/// the master's death).
pub struct Detached {
    pub pid: i32,
}

impl Detached {
    /// Runs `echo-forkd ARGS` (no -f) to completion: `Ok` with the guard if
    /// it exited 0 (reading the pid from `pidfile`), else `Err((code, stderr))`.
    pub fn start(args: &[&str], pidfile: &Path) -> Result<Detached, (i32, String)> {
        let out = launch(args);
        if out.0 != 0 {
            return Err(out);
        }
        let text =
            std::fs::read_to_string(pidfile).map_err(|e| (-1, format!("no pidfile: {e}")))?;
        let pid = text
            .trim()
            .parse()
            .map_err(|_| (-1, format!("bad pidfile {text:?}")))?;
        Ok(Detached { pid })
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        wait_until(DEADLINE, || is_dead(self.pid));
    }
}

/// Runs echo-forkd with `args` and waits for it, at most [`DEADLINE`]
/// (then it is killed and the test fails): (exit code, stderr).
pub fn launch(args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = run_bounded(args, None);
    (code, stderr)
}

/// `launch` with `dir` as the working directory.
pub fn launch_in(dir: &Path, args: &[&str]) -> (i32, String) {
    let (code, _, stderr) = run_bounded(args, Some(dir));
    (code, stderr)
}

/// Like `launch`, for what it prints on stdout: (exit code, stdout).
pub fn launch_stdout(args: &[&str]) -> (i32, String) {
    let (code, stdout, _) = run_bounded(args, None);
    (code, stdout)
}

fn run_bounded(args: &[&str], dir: Option<&Path>) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run echo-forkd");
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let mut status = None;
    let exited = wait_until(DEADLINE, || {
        status = child.try_wait().ok().flatten();
        status.is_some()
    });
    if !exited {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        panic!("echo-forkd {args:?} was still running after {DEADLINE:?}");
    }
    // The pipes reach EOF once every holder is gone; a detached daemon has
    // let go of them by the time the launcher exits.
    let code = status.and_then(|s| s.code()).unwrap_or(-1);
    (
        code,
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// echo-forkd --inetd with one end of a socketpair as its stdin and stdout;
/// `conn` is the client's end. Killed and reaped on drop.
pub struct Inetd {
    pub child: Child,
    pub conn: std::os::unix::net::UnixStream,
}

impl Inetd {
    pub fn spawn(args: &[&str]) -> Inetd {
        use std::os::fd::OwnedFd;
        let (conn, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let stdout = theirs.try_clone().unwrap();
        let child = Command::new(BIN)
            .arg("--inetd")
            .args(args)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::from(OwnedFd::from(stdout)))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn echo-forkd --inetd");
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        Inetd { child, conn }
    }
}

impl Drop for Inetd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why this machine cannot run event workers on io_uring, as the
/// daemon's own probe says (`-T --io-engine uring`), or None if it can.
pub fn no_uring() -> Option<String> {
    let out = std::process::Command::new(BIN)
        .args(["-f", "-T", "-m", "event", "-l", "127.0.0.1:0"])
        .args(["--io-engine", "uring"])
        .env_remove("ECHO_FORKD_IO_ENGINE")
        .output()
        .expect("run echo-forkd -T");
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
}
