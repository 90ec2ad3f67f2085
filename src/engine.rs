//! Which I/O engine an event worker runs on: io_uring where the kernel
//! lets this process use it, epoll otherwise (see event/ring.rs).

use std::fmt;

/// What the operator asked for (`--io-engine`, config key `io-engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choice {
    /// io_uring where it can run, epoll otherwise.
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// The engine in force for event workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Engine {
    Uring,
    #[default]
    Epoll,
}

impl Engine {
    /// As the option and the metric name it.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Uring => "uring",
            Engine::Epoll => "epoll",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A ring for one event worker (or the probe): one issuer, its task work
/// run only when it waits (6.1), else cooperative task work (5.19), else
/// a plain ring. `cq` is the completion queue's size.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub fn ring(entries: u32, cq: u32) -> std::io::Result<io_uring::IoUring> {
    let mut b = io_uring::IoUring::builder();
    b.setup_cqsize(cq)
        .setup_single_issuer()
        .setup_defer_taskrun();
    if let Ok(r) = b.build(entries) {
        return Ok(r);
    }
    let mut b = io_uring::IoUring::builder();
    b.setup_cqsize(cq).setup_coop_taskrun();
    if let Ok(r) = b.build(entries) {
        return Ok(r);
    }
    let mut b = io_uring::IoUring::builder();
    b.setup_cqsize(cq);
    b.build(entries)
}
