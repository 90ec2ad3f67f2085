//! The master's lifecycle as an explicit state machine: the phase it is
//! in (starting, serving, reloading, checking an upgrade, stopping), the
//! requests that must wait for the phase to end, and the rules that move
//! it from one phase to the next. Pure, like pool.rs: [`Life::on`] takes
//! what happened and says what to do; the master does it and reports
//! back what came of it (a reload that could not be prepared, a check
//! that passed). So the rules are unit tests here: a HUP during a reload
//! waits for it, a TERM during an upgrade check wins, a second TERM makes
//! the stop immediate, a HUP and a USR2 that both waited run one after
//! the other, HUP first.
//!
//! A new phase is a variant of [`Phase`], the events that lead into and
//! out of it arms of [`Life::on`], and what it costs the master an
//! [`Action`] or two.

use std::time::{Duration, Instant};

/// How long a new generation of workers may take to become ready, at
/// startup, after an upgrade or on reload.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new executable's `-t` may take (USR2).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the service manager may take to say whether a TERM is part
/// of a restart; no answer in time is a stop.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the master is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The generation in force is starting and readiness is not announced
    /// yet: at startup, or after an upgrade's exec (`upgraded_from`: the
    /// old code's generation, still serving, retired once this one is
    /// ready). Given up at `until`.
    Starting {
        until: Instant,
        upgraded_from: Option<u32>,
    },
    /// The generation in force serves; nothing is under way.
    Serving,
    /// SIGHUP: generation `next` is starting beside the one in force,
    /// which serves until it is ready (abandoned at `until`).
    Reloading { next: u32, until: Instant },
    /// SIGUSR2: the new executable's `-t` runs (given up at `until`).
    Checking { until: Instant },
    /// A TERM under a service manager that keeps descriptors across a
    /// restart: asking whether this is a restart (the unit's job) before
    /// stopping, still serving meanwhile (`why`: the signal).
    Asking { until: Instant, why: &'static str },
    /// Stopping: listeners closed, children finish until `until`, then are
    /// killed (`killed`: they were); a `restart` hands their connections
    /// to the next master (the vault).
    Stopping {
        until: Instant,
        killed: bool,
        restart: bool,
    },
    /// The stop is over: the master exits with `code`.
    Exited { code: i32 },
}

/// What happened, as the master tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or SIGINT (named for the log): a graceful stop.
    Stop(&'static str),
    /// SIGQUIT: an immediate stop.
    Quit,
    Hup,
    Usr2,
    /// The generation in force has all its workers ready (at startup or
    /// after an upgrade).
    Ready,
    /// The reload's new generation has all its workers ready.
    NextReady,
    /// A worker of the starting generation (in force, or the reload's
    /// new one: `next`) died before it was ready.
    DiedBeforeReady {
        next: bool,
        why: String,
    },
    /// The reload could not be prepared (config, bind, fork).
    ReloadFailed(String),
    /// The upgrade check could not be started.
    CheckNotStarted(String),
    /// The check exited: 0, or not (and what it said).
    Checked(Result<(), String>),
    /// The exec of the new code failed; the old code goes on.
    ExecFailed(String),
    /// Time passed: deadlines are due at `now`.
    Tick,
    /// A stop is under way and no child is left.
    ChildrenGone,
    /// The service manager's answer: the TERM is part of a restart (and
    /// its file descriptor store keeps what is put there), or not.
    Restart(bool),
}

/// What the master is to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Say "ready": the log, systemd's READY=1, the launcher waiting.
    AnnounceReady,
    /// After an upgrade, the new generation serves: retire the old code's
    /// generation `old` and everything before it.
    RetireUpgraded { old: u32 },
    /// The upgraded code's workers did not start: retire them, and let
    /// generation `old` (the old code's workers) serve on.
    UpgradeFailed { old: u32, why: String },
    /// Startup failed: log `why`, exit 1 (the stop follows).
    Fatal(String),
    /// Read the configuration again, bind, and start generation `next`.
    PrepareReload { next: u32 },
    /// Put the new generation in force; retire the old one.
    Commit,
    /// Give the reload up; the configuration in force stays.
    Abandon(String),
    /// A stop began during a reload: forget the new generation's
    /// configuration (its workers retire with the rest).
    DropReload,
    /// Start the new executable's `-t`.
    StartCheck,
    /// Kill the check and its process group.
    EndCheck,
    /// The check failed or took too long: log it; the running code goes on.
    RefuseUpgrade(String),
    /// Re-execute the new code.
    Exec,
    /// After a failed exec: say it, and say ready again.
    ExecFailed(String),
    /// A request waits for what is under way (log it).
    Defer(&'static str),
    /// A request is ignored: the master stops (log it).
    Ignore(&'static str),
    /// Ask the service manager whether the TERM is part of a restart.
    AskRestart,
    /// Begin a stop (named for the log): close the listeners, tell the
    /// children; `immediate` kills them; `restart`: the service manager
    /// starts the daemon again at once, and keeps the listeners and the
    /// connections (handed over to the master) for the next instance.
    BeginStop {
        why: &'static str,
        immediate: bool,
        restart: bool,
    },
    /// A stop that was graceful becomes immediate (a second TERM).
    StopNow(&'static str),
    /// The shutdown timeout passed: kill what is left.
    KillAll,
    /// Leave, with this status.
    Exit(i32),
}

/// A request that arrived while something was under way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deferred {
    pub hup: bool,
    pub usr2: bool,
}

/// The lifecycle: the phase, the generation in force, what waits, and
/// the exit status.
#[derive(Clone, Debug)]
pub struct Life {
    phase: Phase,
    /// The configuration in force is the n-th (1 at startup).
    generation: u32,
    deferred: Deferred,
    exit_code: i32,
    /// `--shutdown-timeout` in force.
    shutdown: Duration,
    /// A TERM is first asked about (see [`Phase::Asking`]).
    asks: bool,
}

impl Life {
    /// A master starting generation `generation` (1, or after an upgrade
    /// the one after the old code's), at `now`.
    pub fn new(now: Instant, upgraded_from: Option<u32>, shutdown: Duration) -> Life {
        Life {
            phase: Phase::Starting {
                until: now + READY_TIMEOUT,
                upgraded_from,
            },
            generation: upgraded_from.map_or(1, |g| g.saturating_add(1)),
            deferred: Deferred::default(),
            exit_code: 0,
            shutdown,
            asks: false,
        }
    }

    /// A TERM is first asked about: the master runs under a service
    /// manager that can carry descriptors across a restart.
    pub fn asking_about_restarts(mut self) -> Life {
        self.asks = true;
        self
    }

    /// The phase.
    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The generation in force.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The reload's new generation, while one starts.
    pub fn next(&self) -> Option<u32> {
        match self.phase {
            Phase::Reloading { next, .. } => Some(next),
            _ => None,
        }
    }

    /// Whether a stop is under way.
    pub fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// Whether this stop is a restart: connections go to the vault.
    pub fn restarting(&self) -> bool {
        matches!(self.phase, Phase::Stopping { restart: true, .. })
    }

    /// The exit status, once the stop is over.
    pub fn exited(&self) -> Option<i32> {
        match self.phase {
            Phase::Exited { code } => Some(code),
            _ => None,
        }
    }

    /// Whether the children were killed (a stop's end).
    pub fn killed(&self) -> bool {
        matches!(self.phase, Phase::Stopping { killed: true, .. })
    }

    /// Whether ready is yet to be announced for the generation in force.
    pub fn starting(&self) -> bool {
        matches!(self.phase, Phase::Starting { .. })
    }

    /// The requests waiting.
    #[cfg(test)]
    pub fn deferred(&self) -> Deferred {
        self.deferred
    }

    /// The exit status, once the stop is over.
    #[cfg(test)]
    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }

    /// `--shutdown-timeout` changed (a reload put a new one in force).
    pub fn set_shutdown(&mut self, shutdown: Duration) {
        self.shutdown = shutdown;
    }

    /// When the phase's time runs out, if it can.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Starting { until, .. }
            | Phase::Reloading { until, .. }
            | Phase::Checking { until }
            | Phase::Asking { until, .. }
            | Phase::Stopping {
                until,
                killed: false,
                ..
            } => Some(until),
            Phase::Serving | Phase::Stopping { killed: true, .. } | Phase::Exited { .. } => None,
        }
    }

    /// Takes an event at `now`: moves to the next phase and says what to
    /// do, in order.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        use Action as A;
        use Event as E;
        use Phase as P;
        let due = |until: Instant| now >= until;
        match (self.phase, event) {
            // Stopping comes before everything else, and ends everything.
            (P::Stopping { killed, .. }, E::Stop(why)) if !killed => {
                self.killed_now();
                vec![A::StopNow(why)]
            }
            (P::Stopping { killed, .. }, E::Quit) if !killed => {
                self.killed_now();
                vec![A::StopNow("SIGQUIT")]
            }
            (P::Stopping { .. }, E::Stop(_) | E::Quit) => vec![],
            (P::Stopping { .. }, E::Hup) => vec![A::Ignore("SIGHUP")],
            (P::Stopping { .. }, E::Usr2) => vec![A::Ignore("SIGUSR2")],
            (P::Stopping { until, killed, .. }, E::Tick) if !killed && due(until) => {
                self.killed_now();
                vec![A::KillAll]
            }
            (P::Stopping { .. }, E::ChildrenGone) => {
                self.phase = Phase::Exited {
                    code: self.exit_code,
                };
                vec![A::Exit(self.exit_code)]
            }
            (P::Stopping { .. }, _) | (P::Exited { .. }, _) => vec![],
            // Is it a restart? A second TERM, or QUIT, does not wait.
            (P::Asking { why, .. }, E::Restart(restart)) => {
                self.stop(P::Serving, now, why, false, restart)
            }
            (P::Asking { until, why }, E::Tick) if due(until) => {
                self.stop(P::Serving, now, why, false, false)
            }
            (P::Asking { .. }, E::Stop(why)) => self.stop(P::Serving, now, why, true, false),
            (P::Asking { .. }, E::Quit) => self.stop(P::Serving, now, "SIGQUIT", true, false),
            (P::Asking { .. }, E::Hup) => vec![A::Ignore("SIGHUP")],
            (P::Asking { .. }, E::Usr2) => vec![A::Ignore("SIGUSR2")],
            (P::Asking { .. }, _) => vec![],
            (phase, E::Stop(why)) if self.asks => {
                let mut act = self.drop_under_way(phase);
                self.phase = P::Asking {
                    until: now + ASK_TIMEOUT,
                    why,
                };
                act.push(A::AskRestart);
                act
            }
            (phase, E::Stop(why)) => self.stop(phase, now, why, false, false),
            (phase, E::Quit) => self.stop(phase, now, "SIGQUIT", true, false),

            // Requests that must wait for what is under way.
            (P::Starting { .. } | P::Reloading { .. } | P::Checking { .. }, E::Hup) => {
                self.deferred.hup = true;
                vec![A::Defer("SIGHUP")]
            }
            (P::Starting { .. } | P::Reloading { .. } | P::Checking { .. }, E::Usr2) => {
                self.deferred.usr2 = true;
                vec![A::Defer("SIGUSR2")]
            }
            (P::Serving, E::Hup) => self.reload(now),
            (P::Serving, E::Usr2) => self.check(now),

            // Startup, and the new code after an upgrade.
            (P::Starting { upgraded_from, .. }, E::Ready) => {
                let mut act = vec![A::AnnounceReady];
                if let Some(old) = upgraded_from {
                    act.push(A::RetireUpgraded { old });
                }
                self.serve(now, act)
            }
            (
                P::Starting {
                    until,
                    upgraded_from,
                },
                E::Tick,
            ) if due(until) => {
                let why = format!(
                    "the workers did not become ready within {} s",
                    READY_TIMEOUT.as_secs()
                );
                self.start_failed(now, upgraded_from, why)
            }
            (P::Starting { upgraded_from, .. }, E::DiedBeforeReady { next: false, why }) => {
                self.start_failed(now, upgraded_from, why)
            }

            // A reload.
            (P::Reloading { next, .. }, E::NextReady) => {
                self.generation = next;
                self.serve(now, vec![A::Commit])
            }
            (P::Reloading { until, .. }, E::Tick) if due(until) => {
                let why = format!(
                    "the new workers did not become ready within {} s",
                    READY_TIMEOUT.as_secs()
                );
                self.serve(now, vec![A::Abandon(why)])
            }
            (P::Reloading { .. }, E::DiedBeforeReady { next: true, why })
            | (P::Reloading { .. }, E::ReloadFailed(why)) => self.serve(now, vec![A::Abandon(why)]),

            // An upgrade.
            (P::Checking { .. }, E::CheckNotStarted(why)) => {
                self.serve(now, vec![A::RefuseUpgrade(why)])
            }
            (P::Checking { .. }, E::Checked(Ok(()))) => {
                // If the exec works, this code is gone; if not, ExecFailed.
                self.phase = P::Serving;
                vec![A::Exec]
            }
            (P::Checking { .. }, E::Checked(Err(why))) => {
                self.serve(now, vec![A::RefuseUpgrade(why)])
            }
            (P::Checking { until }, E::Tick) if due(until) => {
                let why = format!("-t took more than {} s", CHECK_TIMEOUT.as_secs());
                self.serve(now, vec![A::EndCheck, A::RefuseUpgrade(why)])
            }
            (P::Serving, E::ExecFailed(why)) => self.serve(now, vec![A::ExecFailed(why)]),

            // Anything else changes nothing: a Tick before a deadline, a
            // report that no longer applies (a worker of an abandoned
            // reload), ChildrenGone while running.
            _ => vec![],
        }
    }

    /// What a stop from `phase` drops: a reload or an upgrade check under
    /// way, and the requests that waited.
    fn drop_under_way(&mut self, phase: Phase) -> Vec<Action> {
        self.deferred = Deferred::default();
        match phase {
            Phase::Reloading { .. } => vec![Action::DropReload],
            Phase::Checking { .. } => vec![Action::EndCheck],
            _ => vec![],
        }
    }

    /// Begins a stop from `phase`; what was under way is dropped.
    fn stop(
        &mut self,
        phase: Phase,
        now: Instant,
        why: &'static str,
        immediate: bool,
        restart: bool,
    ) -> Vec<Action> {
        let mut act = self.drop_under_way(phase);
        self.phase = Phase::Stopping {
            until: crate::time::after(now, self.shutdown),
            killed: immediate,
            restart,
        };
        act.push(Action::BeginStop {
            why,
            immediate,
            restart,
        });
        act
    }

    fn killed_now(&mut self) {
        if let Phase::Stopping { until, restart, .. } = self.phase {
            self.phase = Phase::Stopping {
                until,
                killed: true,
                restart,
            };
        }
    }

    fn reload(&mut self, now: Instant) -> Vec<Action> {
        let next = self.generation.saturating_add(1);
        self.phase = Phase::Reloading {
            next,
            until: now + READY_TIMEOUT,
        };
        vec![Action::PrepareReload { next }]
    }

    fn check(&mut self, now: Instant) -> Vec<Action> {
        self.phase = Phase::Checking {
            until: now + CHECK_TIMEOUT,
        };
        vec![Action::StartCheck]
    }

    /// The generation in force could not start: after an upgrade the old
    /// code's workers serve on; at startup the daemon exits 1.
    fn start_failed(
        &mut self,
        now: Instant,
        upgraded_from: Option<u32>,
        why: String,
    ) -> Vec<Action> {
        match upgraded_from {
            Some(old) => {
                self.generation = old;
                self.serve(now, vec![Action::UpgradeFailed { old, why }])
            }
            None => {
                self.exit_code = 1;
                let mut act = vec![Action::Fatal(why)];
                act.extend(self.stop(self.phase, now, "startup failed", true, false));
                act
            }
        }
    }

    /// Back to serving after `act`; a request that waited starts now (a
    /// HUP before a USR2: the upgrade then checks the new configuration).
    fn serve(&mut self, now: Instant, mut act: Vec<Action>) -> Vec<Action> {
        self.phase = Phase::Serving;
        if std::mem::take(&mut self.deferred.hup) {
            act.extend(self.reload(now));
        } else if std::mem::take(&mut self.deferred.usr2) {
            act.extend(self.check(now));
        }
        act
    }
}

#[cfg(test)]
mod tests;
