//! Becoming a daemon: the pidfile and detaching from the terminal.
//!
//! Every startup check happens before detaching, and the launching process
//! waits on a pipe until the daemon says it is ready, so `echo-forkd`
//! without `-f` exits 0 only once the daemon listens, and non-zero (with the
//! daemon's message on its stderr) when startup fails.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};
use nix::unistd::{
    chdir, chroot, dup2_stderr, dup2_stdin, dup2_stdout, geteuid, setgid, setsid, setuid, Gid,
    Group, Uid, User,
};

use crate::sys;

/// The pidfile, locked for the master's whole life and removed when the
/// master drops it. A forked child's copy neither unlocks nor removes it.
///
/// Like a careful pidfile(3): it must be a regular file owned by us and
/// writable by nobody else (or a user who can rewrite it could make an
/// operator's `kill $(cat …)` hit any process); it always names a live
/// process while it is locked (the launcher's pid, then the daemon's); a
/// lock held by a process the file does not name (anyone who can read the
/// file can take one) does not keep us from starting; and it is removed
/// only if this process wrote it and the path still leads to it.
#[derive(Debug)]
pub struct PidFile {
    file: File,
    path: PathBuf,
    owner: u32,
    written: bool,
}

/// How long a locked pidfile may stay empty before its lock is judged to
/// belong to no daemon: a starting instance writes its pid right after it
/// locks the file.
const PIDFILE_SETTLE: std::time::Duration = std::time::Duration::from_millis(200);

impl PidFile {
    /// Checks a pidfile path without touching it (for `-t`): an existing
    /// file must be one [`PidFile::lock`] would accept, and its directory
    /// must exist.
    pub fn check(path: &Path) -> Result<(), String> {
        let shown = path.display();
        match std::fs::symlink_metadata(path) {
            Ok(meta) => acceptable(path, &meta),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                match dir.map(std::fs::metadata) {
                    Some(Ok(m)) if !m.is_dir() => Err(format!(
                        "pidfile {shown}: {} is not a directory",
                        dir.map(Path::display)
                            .map(|d| d.to_string())
                            .unwrap_or_default()
                    )),
                    Some(Err(e)) => Err(format!(
                        "pidfile {shown}: its directory: {}",
                        crate::logging::error_text(&e)
                    )),
                    _ => Ok(()),
                }
            }
            Err(e) => Err(format!(
                "pidfile {shown}: {}",
                crate::logging::error_text(&e)
            )),
        }
    }

    /// Opens (without following a symlink, and only if it is a regular file
    /// of ours) and locks `path`, and writes this process's pid into it.
    /// If a running process holds the lock: "already running (pid N)".
    pub fn lock(path: &Path) -> Result<PidFile, String> {
        let shown = path.display();
        // A few rounds at most: another one after replacing a file whose
        // lock belongs to no daemon.
        for _ in 0..3 {
            let (file, created) = open_pidfile(path)?;
            match sys::try_lock(&file) {
                Ok(true) => {
                    let mut p = PidFile {
                        file,
                        path: path.to_path_buf(),
                        owner: std::process::id(),
                        written: false,
                    };
                    p.write_pid().map_err(|e| {
                        format!(
                            "cannot write pidfile {shown}: {}",
                            crate::logging::error_text(&e)
                        )
                    })?;
                    return Ok(p);
                }
                Ok(false) => {}
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(format!(
                        "cannot lock pidfile {shown}: {}",
                        crate::logging::error_text(&e)
                    ));
                }
            }
            match holder(&file) {
                Holder::Running(pid) => {
                    return Err(format!("already running (pid {pid}, pidfile {shown})"))
                }
                Holder::Nobody(named) => {
                    // The lock is someone else's and names no live daemon:
                    // put a new file in its place; the squatter keeps a
                    // lock on a file nobody looks at any more.
                    log::warn!(
                        "pidfile {shown} is locked by a process that is not a running echo-forkd ({named}): replacing it"
                    );
                    if same_file(path, &file) {
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        Err(format!(
            "cannot lock pidfile {shown}: it keeps being locked by other processes"
        ))
    }

    /// Writes this process's pid (replacing the one there) and takes
    /// ownership: from now on this process removes the file on drop. The
    /// new text is written over the old before the rest is cut, so a
    /// reader never finds the file empty.
    pub fn write_pid(&mut self) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.owner = std::process::id();
        let text = format!("{}\n", self.owner);
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)?;
        self.written = true;
        Ok(())
    }
}

impl PidFile {
    /// The locked file's descriptor, to pass across a re-exec.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.file.as_raw_fd()
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pidfile a previous master passed across its re-exec (USR2): the
    /// same file, still locked (the lock belongs to the open file, which
    /// the exec kept), naming this same pid.
    pub fn adopt(fd: std::os::fd::OwnedFd, path: PathBuf) -> PidFile {
        PidFile {
            file: File::from(fd),
            path,
            owner: std::process::id(),
            written: true,
        }
    }

    /// In a forked child: closes the descriptor (the lock stays the
    /// master's: it belongs to the open file, which the master keeps) and
    /// forgets the path, neither removing the file nor freeing memory.
    pub fn close_in_child(self) {
        use std::os::fd::AsRawFd;
        // The File is forgotten with `self` below and never dropped, so
        // this is the descriptor's one and only close here.
        let _ = nix::unistd::close(self.file.as_raw_fd());
        std::mem::forget(self);
    }
}

/// Opens the pidfile: creates it (mode 0644) or opens the existing one,
/// never following a symbolic link and never opening anything but a
/// regular file (a device or FIFO is refused before it is opened, and
/// checked again after). True if we created it.
fn open_pidfile(path: &Path) -> Result<(File, bool), String> {
    let shown = path.display();
    let open = |create: bool| {
        let mut o = OpenOptions::new();
        o.read(true)
            .write(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY);
        if create {
            o.create_new(true);
        }
        o.open(path)
    };
    let fail = |e: io::Error| match e.raw_os_error() {
        Some(libc::ELOOP) => format!("cannot open pidfile {shown}: it is a symbolic link"),
        _ => format!(
            "cannot open pidfile {shown}: {}",
            crate::logging::error_text(&e)
        ),
    };
    let (file, created) = match open(true) {
        Ok(f) => (f, true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path).map_err(fail)?;
            acceptable(path, &meta)?;
            (open(false).map_err(fail)?, false)
        }
        Err(e) => return Err(fail(e)),
    };
    let meta = file.metadata().map_err(fail)?;
    acceptable(path, &meta)?;
    Ok((file, created))
}

/// Whether an existing pidfile is one we may use: a regular file, ours,
/// and writable by nobody else.
fn acceptable(path: &Path, meta: &std::fs::Metadata) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    if !meta.file_type().is_file() {
        let what = if meta.file_type().is_symlink() {
            "a symbolic link"
        } else if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(format!("pidfile {shown}: {what}; refusing to use it"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "pidfile {shown}: owned by uid {}, not by us (uid {me}); refusing it, as its owner could rewrite it",
            meta.uid()
        ));
    }
    let group_may_write = meta.mode() & 0o020 != 0 && meta.gid() != nix::unistd::getegid().as_raw();
    if meta.mode() & 0o002 != 0 || group_may_write {
        return Err(format!(
            "pidfile {shown}: writable by others (mode {:04o}); refusing it (chmod go-w, or remove it)",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Whether `path` still leads to the file `file` has open.
fn same_file(path: &Path, file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

enum Holder {
    /// The pid the file names is alive.
    Running(i32),
    /// What the file says, when no live process is named.
    Nobody(String),
}

/// Who holds the lock on a pidfile, judging by the pid it names; waits a
/// moment for a file that is empty (a daemon between its lock and its
/// write).
fn holder(file: &File) -> Holder {
    use std::os::unix::fs::FileExt;
    let start = std::time::Instant::now();
    loop {
        let mut buf = [0u8; 32];
        let n = file.read_at(&mut buf, 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        let text = text.lines().next().unwrap_or("").trim().to_string();
        if let Ok(pid) = text.parse::<i32>() {
            if pid > 0 {
                // Alive, even if we may not signal it.
                let alive = matches!(
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
                    Ok(()) | Err(nix::errno::Errno::EPERM)
                );
                return if alive {
                    Holder::Running(pid)
                } else {
                    Holder::Nobody(format!("it names pid {pid}, which is not running"))
                };
            }
        }
        if start.elapsed() >= PIDFILE_SETTLE {
            return Holder::Nobody(if text.is_empty() {
                "it is empty".into()
            } else {
                format!("it holds {text:?}, not a pid")
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Remove before the lock goes with the descriptor, so a successor
        // never sees our file unlocked; and only our own file.
        if self.written && std::process::id() == self.owner && same_file(&self.path, &self.file) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Raises the soft RLIMIT_NOFILE (as nginx's `worker_rlimit_nofile`) to
/// what `cfg` may need in one process, warning if the hard limit is in
/// the way: the master holds one descriptor per worker, a reload may run
/// two full generations, and an event worker holds each of its
/// connections. The limit is per process (and children inherit it), so
/// `workers` × `worker-connections` may well exceed it; that is said once.
pub fn make_room_for_descriptors(cfg: &crate::config::Config, listeners: usize) {
    let why = match cfg.mode {
        crate::config::Mode::Event => "worker-connections",
        _ => "max-workers",
    };
    if let Err(e) = ensure_nofile(nofile_need(cfg, listeners), why, why) {
        log::warn!("{e}");
    }
    if cfg.mode == crate::config::Mode::Event {
        let total = u64::from(cfg.workers) * u64::from(cfg.worker_connections);
        let (soft, _) = crate::sys::nofile_limit();
        if total > soft {
            log::info!(
                "{} workers × {} worker-connections = {total} connections, more than RLIMIT_NOFILE ({soft}); the limit is per process, so each worker may still hold its {}",
                cfg.workers, cfg.worker_connections, cfg.worker_connections
            );
        }
    }
}

/// The descriptors the master may hold with `cfg` in force: its own (the
/// signal pipe, notice and control pipes, log and notify sockets, pidfile:
/// under 32), the listeners of two configurations, and one control pipe
/// per worker of two full generations.
fn nofile_need(cfg: &crate::config::Config, listeners: usize) -> u64 {
    let workers = match cfg.mode {
        crate::config::Mode::Prefork | crate::config::Mode::Event => u64::from(cfg.max_workers),
        crate::config::Mode::Fork => 0,
    };
    let per_worker = match cfg.mode {
        // Each event worker holds its connections itself, in its own
        // process; the limit is per process, so this is what one needs.
        crate::config::Mode::Event => u64::from(cfg.worker_connections) + 64,
        _ => 0,
    };
    (32 + 2 * listeners as u64 + 2 * workers).max(per_worker)
}

/// Makes room for `need` open descriptors: raises the soft RLIMIT_NOFILE
/// (never above the hard one) if it is lower. Err says, with the numbers,
/// why there cannot be room; `why` names what needs them, and `lower` the
/// setting that would need fewer.
pub fn ensure_nofile(need: u64, why: &str, lower: &str) -> Result<(), String> {
    let (soft, hard) = sys::nofile_limit();
    if need <= soft {
        return Ok(());
    }
    if need <= hard {
        if let Err(e) = sys::set_nofile(need) {
            return Err(format!(
                "{why} needs about {need} open descriptors, but RLIMIT_NOFILE is {soft} and cannot be raised: {}",
                crate::logging::error_text(&e)
            ));
        }
        log::info!("raised RLIMIT_NOFILE from {soft} to {need}: {why} needs about that many");
        return Ok(());
    }
    Err(format!(
        "{why} needs about {need} open descriptors, but RLIMIT_NOFILE is {soft} (hard limit {hard}); raise it (LimitNOFILE= under systemd, ulimit -n) or lower {lower}"
    ))
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
    let (mut r, w) = crate::sys::pipe(false).map_err(|e| format!("cannot create a pipe: {e}"))?;
    // SAFETY: startup is single-threaded: no thread has been started yet.
    #[allow(unsafe_code)]
    let launcher = unsafe { sys::fork_plain() }
        .map_err(|e| format!("cannot fork: {}", crate::logging::error_text(&e)))?;
    if launcher {
        drop(w);
        let mut word = [0u8; 1];
        let ok = matches!(nix::unistd::read(&mut r, &mut word), Ok(1));
        if !ok {
            crate::logging::say("the daemon exited during startup");
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
    /// `-g` was given (not only implied by `-u`).
    group_given: bool,
    chroot: Option<PathBuf>,
}

impl Identity {
    /// Who the event workers are, for the io_uring probe.
    pub fn engine_workers(&self) -> crate::engine::Workers {
        crate::engine::Workers {
            as_master: self.stays_root() || self.gid().is_none(),
            gid: self.gid(),
        }
    }

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
                Ok(None) => Err(format!(
                    "unknown user '{name}' (create it, as the package does: useradd --system --no-create-home {name})"
                )),
                Err(e) => Err(format!("cannot look up user '{name}': {e}")),
            })
            .transpose()?;
        let gid = match group {
            Some(name) => match Group::from_name(name) {
                Ok(Some(g)) => Some(g.gid),
                Ok(None) => {
                    return Err(format!(
                        "unknown group '{name}' (create it: groupadd --system {name})"
                    ))
                }
                Err(e) => return Err(format!("cannot look up group '{name}': {e}")),
            },
            None => user.as_ref().map(|u| u.gid),
        };
        let id = Identity {
            uid: user.map(|u| u.uid),
            gid,
            group_given: group.is_some(),
            chroot: chroot.map(Path::to_path_buf),
        };
        if id.changes_anything() && !geteuid().is_root() {
            return Err("-u, -g and --chroot need echo-forkd to be started as root".into());
        }
        if let Some(dir) = &id.chroot {
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(format!("--chroot {}: not a directory", dir.display())),
                Err(e) => {
                    return Err(format!(
                        "--chroot {}: {}",
                        dir.display(),
                        crate::logging::error_text(&e)
                    ))
                }
            }
        }
        Ok(id)
    }

    /// The group our unix socket files get: `-g`'s, if it was given.
    pub fn socket_group(&self) -> Option<Gid> {
        self.gid.filter(|_| self.group_given)
    }

    /// The group children run with, when they change it (`-u`, `-g`).
    pub fn gid(&self) -> Option<u32> {
        self.gid.map(Gid::as_raw)
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
            crate::sys::set_groups(gid).map_err(|e| format!("setgroups: {e}"))?;
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
