//! Becoming a daemon: the pidfile and detaching from the terminal.
//!
//! Every startup check happens before detaching, and the launching process
//! waits on a pipe until the daemon says it is ready, so `echo-forkd`
//! without `-f` exits 0 only once the daemon listens, and non-zero (with the
//! daemon's message on its stderr) when startup fails.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::stat::{umask, Mode};
use nix::unistd::{
    chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout, geteuid, pipe2, setgid, setgroups, setsid,
    setuid, Gid, Group, Uid, User,
};

use crate::sys;

/// The pidfile, locked for the master's whole life and removed when the
/// master drops it. A forked child's copy neither unlocks nor removes it.
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
    owner: u32,
}

impl PidFile {
    /// Opens (without following a symlink) and locks `path`. If another
    /// process holds the lock: "already running (pid N)".
    pub fn lock(path: &Path) -> Result<PidFile, String> {
        let shown = path.display();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => format!("cannot open pidfile {shown}: it is a symbolic link"),
                _ => format!("cannot open pidfile {shown}: {}", crate::error_text(&e)),
            })?;
        match sys::try_lock(&file) {
            Ok(true) => {}
            Ok(false) => {
                let mut text = String::new();
                let _ = (&file).read_to_string(&mut text);
                let pid = text.trim();
                return Err(if pid.is_empty() {
                    format!("already running (pidfile {shown} is locked)")
                } else {
                    format!("already running (pid {pid}, pidfile {shown})")
                });
            }
            Err(e) => {
                return Err(format!(
                    "cannot lock pidfile {shown}: {}",
                    crate::error_text(&e)
                ))
            }
        }
        Ok(PidFile {
            file,
            path: path.to_path_buf(),
            owner: std::process::id(),
        })
    }

    /// Writes this process's pid (replacing a stale one) and takes
    /// ownership: from now on this process removes the file on drop.
    pub fn write_pid(&mut self) -> io::Result<()> {
        self.owner = std::process::id();
        self.file.set_len(0)?;
        (&self.file).write_all(format!("{}\n", self.owner).as_bytes())?;
        Ok(())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Remove before the lock goes with the descriptor, so a successor
        // never sees our file unlocked.
        if std::process::id() == self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The daemon's side of the launcher's pipe: say "ready" once.
pub struct ReadyPipe(OwnedFd);

impl ReadyPipe {
    /// Tells the launcher to exit 0, and only then lets go of the
    /// terminal: stdin, stdout and stderr become /dev/null.
    pub fn ready(self) {
        let _ = nix::unistd::write(&self.0, b"1");
        drop(self.0);
        stdio_to_null();
    }

    /// In a child forked before "ready": it must not keep the launcher's
    /// terminal (or a pipe someone reads to its end) open.
    pub fn close_in_child(self) {
        drop(self.0);
        stdio_to_null();
    }
}

fn stdio_to_null() {
    if let Ok(null) = OpenOptions::new().read(true).write(true).open("/dev/null") {
        let _ = dup2_stdin(&null);
        let _ = dup2_stdout(&null);
        let _ = dup2_stderr(&null);
    }
}

/// Detaches: forks; the launcher waits for the daemon's word and exits with
/// 0 (ready) or 1 (the daemon died first; its message is already on stderr).
/// In the daemon: a new session without a controlling terminal, umask 022,
/// cwd `/`. Returns the pipe to report readiness on.
pub fn detach() -> Result<ReadyPipe, String> {
    let (mut r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
    let launcher =
        sys::fork_plain().map_err(|e| format!("cannot fork: {}", crate::error_text(&e)))?;
    if launcher {
        drop(w);
        let mut word = [0u8; 1];
        let ok = matches!(nix::unistd::read(&mut r, &mut word), Ok(1));
        if !ok {
            eprintln!("echo-forkd: the daemon exited during startup");
        }
        // Leave without dropping anything: the listeners and the pidfile
        // belong to the daemon now.
        sys::exit_now(if ok { 0 } else { 1 });
    }
    drop(r);
    setsid().map_err(|e| format!("setsid: {e}"))?;
    umask(Mode::from_bits_truncate(0o022));
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(ReadyPipe(w))
}

/// Who the children that touch clients run as (`-u`, `-g`, `--chroot`),
/// resolved at startup so that an unknown name fails before detaching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    uid: Option<Uid>,
    gid: Option<Gid>,
    chroot: Option<PathBuf>,
}

impl Identity {
    /// Looks up the user and group. `-u` alone means the user's primary
    /// group. Changing identity needs root; asking for it without root is
    /// an error now rather than in every child later.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
        chroot: Option<&Path>,
    ) -> Result<Identity, String> {
        let user = user
            .map(|name| match User::from_name(name) {
                Ok(Some(u)) => Ok(u),
                Ok(None) => Err(format!("unknown user '{name}'")),
                Err(e) => Err(format!("cannot look up user '{name}': {e}")),
            })
            .transpose()?;
        let gid = match group {
            Some(name) => match Group::from_name(name) {
                Ok(Some(g)) => Some(g.gid),
                Ok(None) => return Err(format!("unknown group '{name}'")),
                Err(e) => return Err(format!("cannot look up group '{name}': {e}")),
            },
            None => user.as_ref().map(|u| u.gid),
        };
        let id = Identity {
            uid: user.map(|u| u.uid),
            gid,
            chroot: chroot.map(Path::to_path_buf),
        };
        if id.changes_anything() && !geteuid().is_root() {
            return Err("-u, -g and --chroot need echo-forkd to be started as root".into());
        }
        if let Some(dir) = &id.chroot {
            if !dir.is_dir() {
                return Err(format!("--chroot {}: not a directory", dir.display()));
            }
        }
        Ok(id)
    }

    fn changes_anything(&self) -> bool {
        self.uid.is_some() || self.gid.is_some() || self.chroot.is_some()
    }

    /// Whether children would keep running as root.
    pub fn stays_root(&self) -> bool {
        geteuid().is_root() && self.uid.is_none_or(|u| u.is_root())
    }

    /// In a child: chroot, then drop supplementary groups, then the group,
    /// then the user, and make sure root cannot be regained.
    pub fn enter(&self) -> Result<(), String> {
        if let Some(dir) = &self.chroot {
            chroot(dir).map_err(|e| format!("chroot {}: {e}", dir.display()))?;
            chdir("/").map_err(|e| format!("chdir / in the chroot: {e}"))?;
        }
        if let Some(gid) = self.gid {
            setgroups(&[gid]).map_err(|e| format!("setgroups: {e}"))?;
            setgid(gid).map_err(|e| format!("setgid {gid}: {e}"))?;
        }
        if let Some(uid) = self.uid {
            setuid(uid).map_err(|e| format!("setuid {uid}: {e}"))?;
            if !uid.is_root() && setuid(Uid::from_raw(0)).is_ok() {
                return Err("root could be regained after setuid".into());
            }
        }
        Ok(())
    }
}
