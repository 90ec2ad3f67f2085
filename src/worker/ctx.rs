//! What every child gets from the master ([`Ctx`]), and what it does
//! with it besides serving: admitting a new connection through the gate
//! (admission.rs), publishing its state, telling its master's death from
//! a stop, and letting go of its connections (to the workers that serve
//! on through the relay, or into the vault for the next master).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use log::{error, warn};
use nix::unistd::{getppid, Pid};

use super::{Admitted, EXIT_ORPHAN};
use crate::accept::Acceptor;
use crate::admission::{self, Gate, Holder, Policy, Ticket};
use crate::echo::{Limits, Progress};
use crate::proxy;
use crate::relay::{Carried, Inbox, Offer, Outbox};
use crate::scoreboard::{Cut, HandOver, Scoreboard, Slot, State};
use crate::vault::Vault;

/// Where a child's open connections go when it lets go of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dest {
    /// To the workers that serve on, through the relay.
    Workers,
    /// Into the vault, for the next master: the master restarts, or died.
    NextMaster,
}

/// What became of a connection offered on.
pub(super) enum Offered {
    Gone,
    /// No room for it yet: serve it a little, and offer it again.
    Later(OwnedFd),
    /// It cannot go: serve it to its end.
    Stays(OwnedFd),
}

/// What every child needs from the master.
pub struct Ctx<'a> {
    /// The control pipe's read end.
    pub ctl: BorrowedFd<'a>,
    pub master: Pid,
    pub limits: Limits,
    /// Which clients are served (prefork and event: checked here; fork:
    /// by the master, or behind a proxy by the child).
    pub policy: &'a Policy,
    /// A prefork worker's scoreboard slot.
    pub slot: Option<Slot<'a>>,
    /// The scoreboard, where every child counts what it served.
    pub board: &'a Scoreboard,
    /// fork mode behind a proxy with `--max-per-ip`: the child's word in
    /// the scoreboard's fork table, where it publishes its client's place.
    pub fork_slot: Option<usize>,
    /// fork mode: whether the child adds its bytes to the scoreboard
    /// (only for `--metrics`: the shared page costs each child a fault).
    pub count_bytes: bool,
    /// Where a worker tells the master it is ready (one byte).
    pub notice: Option<BorrowedFd<'a>>,
    /// The relay (see relay/): where this child hands its connections
    /// over when it retires, and (a pool worker) takes others' from.
    pub relay_tx: Option<Outbox>,
    pub relay_rx: Option<Inbox>,
    /// Under systemd: where its connections wait for the next master when
    /// the master restarts or dies (vault.rs).
    pub vault: Option<&'a Vault>,
    /// `--shutdown-timeout`: how long it may take to let go of them.
    pub shutdown: Duration,
    /// The control pipe ended without the master saying it stops: it
    /// died (see [`Ctx::pipe_ended`]).
    pub orphaned: std::cell::Cell<bool>,
    /// A fork-mode child: its master tells it its news by SIGTERM as well
    /// as by the control pipe, so it may wait for a chatty client in a
    /// blocking read (echo/block.rs).
    pub blocking_reads: bool,
}

impl Ctx<'_> {
    /// Whether the master is gone: it died (the control pipe ended
    /// without a word), or this child has another parent now.
    pub(crate) fn master_gone(&self) -> bool {
        self.orphaned.get() || getppid() != self.master
    }

    /// The control pipe ended: whether that is the master's death. The
    /// master marks a child it tells to stop (its slot, or for fork-mode
    /// children the whole daemon's stop) before it closes the pipe; a
    /// pipe that ends unmarked was closed by the kernel as the master
    /// died. (Its parent pid alone cannot tell: the pipe ends as the
    /// master's descriptors close, before the kernel gives its children
    /// a new parent.)
    pub(crate) fn pipe_ended(&self) -> bool {
        crate::sys::step_aside();
        let told = match &self.slot {
            Some(slot) => slot.told(),
            None => self.board.stopping(),
        };
        if !told {
            self.orphaned.set(true);
        }
        self.master_gone()
    }

    /// Publishes a state; wakes the master if spares just ran short.
    pub(crate) fn set(&self, state: State) {
        if self.slot.is_some_and(|slot| slot.set(state)) {
            self.wake();
        }
    }

    fn wake(&self) {
        if let Some(fd) = self.notice {
            // Non-blocking: a full pipe already holds a wake-up.
            let _ = nix::unistd::write(fd, b"r");
        }
    }

    /// A fork-mode child forked to accept took its connection: says so in
    /// its word of the fork table, and wakes the master to fork the next.
    pub(super) fn took_one(&self) {
        if let Some(index) = self.fork_slot {
            crate::scoreboard::mark_taken(self.board.fork_held(index));
        }
        if let Some(fd) = self.notice {
            // From the stack, which this child has written already: a
            // constant's page would be one more fault in a new process.
            let byte = std::hint::black_box([b't']);
            let _ = nix::unistd::write(fd, &byte);
        }
    }

    /// Publishes "ready" and wakes the master, which may be waiting for a
    /// new generation before it retires the old one.
    pub(crate) fn ready(&self) {
        self.set(State::Idle);
        self.wake();
    }

    /// Publishes "ready" as busy and wakes the master: a carrier, which
    /// never waits for a new connection, must never look like an idle
    /// worker (prefork workers taking turns would name it the one that
    /// waits for the listeners, and nobody would). (A carrier is the
    /// event loop: Linux only.)
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub(crate) fn ready_busy(&self) {
        self.set(State::Busy);
        self.wake();
    }

    /// Passes a new connection through the admission gate; behind a
    /// load balancer reads its PROXY header (waiting for it: this process
    /// serves one connection) and checks the client it names. `None`: it
    /// was refused (counted), and is to be closed unread.
    pub(super) fn admit(&self, conn: &OwnedFd, tcp: bool) -> Option<Admitted<'_>> {
        let holder = match (self.slot, self.fork_slot) {
            (Some(slot), _) => Holder::Slot(slot),
            (None, Some(index)) => Holder::Fork(index),
            (None, None) => Holder::Here,
        };
        match self.policy.gate(self.board, conn.as_fd(), tcp, holder) {
            Gate::Admit(client, ticket) => Some((client, ticket)),
            Gate::Refuse => None,
            Gate::Header(proxy) => self.behind_proxy(conn, proxy, holder),
        }
    }

    /// Reads the PROXY header `proxy` sent before its client's bytes and
    /// checks the client it names. Out of line: its header buffer makes
    /// a stack frame over a page, which a fork-mode child would otherwise
    /// pay a copied page for on every connection, proxy or not.
    #[inline(never)]
    fn behind_proxy<'s>(
        &'s self,
        conn: &OwnedFd,
        proxy: SocketAddr,
        holder: Holder<'s>,
    ) -> Option<Admitted<'s>> {
        let mut reader = proxy::Reader::new(Instant::now(), self.policy.proxy_timeout);
        let client = match reader.read(conn.as_fd()) {
            Ok(proxy::Header::Proxied { src, .. }) => src,
            Ok(proxy::Header::Local) => proxy,
            Err(why) => {
                admission::unserved_behind_proxy(self.board, why);
                return None;
            }
        };
        let ticket = self.policy.check(self.board, client, holder)?;
        Some((Some(client), Some(ticket)))
    }

    /// Where this child's open connections go when it lets go of them:
    /// with its master gone, to the next master (if there is a vault);
    /// told to stop, as the master said (to the workers if `door` hands
    /// over); `None`: they stay to their end.
    pub(crate) fn dest(&self, door: &Acceptor) -> Option<Dest> {
        if self.master_gone() {
            return self.vault.as_ref().map(|_| Dest::NextMaster);
        }
        match self.board.hand_over() {
            HandOver::Finish => None,
            HandOver::ToWorkers => door.hands_over().then_some(Dest::Workers),
            HandOver::ToNextMaster => self.vault.as_ref().map(|_| Dest::NextMaster),
        }
    }

    /// Offers `conn` on, as [`Ctx::dest`] says, with where it is, its
    /// client and its place (which goes with it to a worker; the next
    /// master counts its clients again).
    pub(super) fn offer(
        &self,
        door: &Acceptor,
        conn: OwnedFd,
        tcp: bool,
        client: Option<SocketAddr>,
        ticket: Option<&Ticket<'_>>,
        p: Progress,
    ) -> Offered {
        let mut carried = Carried {
            tcp,
            client,
            place: ticket.and_then(Ticket::place),
            progress: p,
        };
        match self.dest(door) {
            Some(Dest::Workers) => match door.hand_over(conn.as_fd(), &carried, self.board) {
                Some(Offer::Sent) => Offered::Gone,
                Some(Offer::Full(_)) => Offered::Later(conn),
                Some(Offer::Failed(e)) => {
                    warn!("cannot hand a connection over: {e}; serving it until the end");
                    Offered::Stays(conn)
                }
                None => Offered::Stays(conn),
            },
            Some(Dest::NextMaster) => {
                carried.place = None;
                self.keep_for_next_master(vec![(conn, carried)]);
                Offered::Gone
            }
            None => Offered::Stays(conn),
        }
    }

    /// Puts `conns` in the vault for the next master; what cannot be put
    /// is closed, counted and logged.
    pub(crate) fn keep_for_next_master(&self, conns: Vec<(OwnedFd, Carried)>) {
        let Some(vault) = &self.vault else { return };
        if conns.is_empty() {
            return;
        }
        if let Err(lost) = vault.put(conns, Instant::now() + self.shutdown) {
            self.board.cut(Cut::Vault, lost.conns as u64);
            error!(
                "cannot keep {} for the next master: {}; closed",
                crate::logging::counted(lost.conns as u64, "connection", "connections"),
                crate::logging::error_text(&std::io::Error::from(lost.why))
            );
        }
    }

    /// With the master gone: what waits in the relay goes to the next
    /// master too (nobody else would take it).
    pub(crate) fn relay_to_next_master(&self, door: &Acceptor) {
        if self.vault.is_some() {
            self.keep_for_next_master(door.drain_relay(self.board));
        }
    }

    pub(super) fn served(&self, bytes: u64) {
        self.board.served(bytes);
        if let Some(slot) = &self.slot {
            slot.served_one();
        }
    }
}

/// Arranges for the kernel to kill this child if the master dies, even while
/// it is blocked; the control pipe covers systems without this. A child
/// with a vault outlives its master instead, long enough to put its
/// connections there for the next one (the control pipe's end tells it).
pub(crate) fn follow_master(ctx: &Ctx<'_>) -> Result<(), i32> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if ctx.vault.is_none() {
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    } else {
        // A pipe of its own does not end when the master dies: the
        // kernel's signal ends it (sys/told.rs).
        crate::sys::told::on_master_death();
    }
    // The master may have died before the line above took effect.
    if ctx.master_gone() {
        return Err(EXIT_ORPHAN);
    }
    Ok(())
}
