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
    /// Stopping: listeners closed, children finish until `until`, then are
    /// killed (`killed`: they were).
    Stopping { until: Instant, killed: bool },
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
    /// Begin a stop (named for the log): close the listeners, tell the
    /// children; `immediate` kills them.
    BeginStop { why: &'static str, immediate: bool },
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
        }
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
            | Phase::Stopping {
                until,
                killed: false,
            } => Some(until),
            Phase::Serving | Phase::Stopping { killed: true, .. } => None,
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
            (P::Stopping { until, killed }, E::Tick) if !killed && due(until) => {
                self.killed_now();
                vec![A::KillAll]
            }
            (P::Stopping { .. }, E::ChildrenGone) => vec![A::Exit(self.exit_code)],
            (P::Stopping { .. }, _) => vec![],
            (phase, E::Stop(why)) => self.stop(phase, now, why, false),
            (phase, E::Quit) => self.stop(phase, now, "SIGQUIT", true),

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

    /// Begins a stop from `phase`; what was under way is dropped.
    fn stop(
        &mut self,
        phase: Phase,
        now: Instant,
        why: &'static str,
        immediate: bool,
    ) -> Vec<Action> {
        let mut act = match phase {
            Phase::Reloading { .. } => vec![Action::DropReload],
            Phase::Checking { .. } => vec![Action::EndCheck],
            _ => vec![],
        };
        self.deferred = Deferred::default();
        self.phase = Phase::Stopping {
            until: crate::time::after(now, self.shutdown),
            killed: immediate,
        };
        act.push(Action::BeginStop { why, immediate });
        act
    }

    fn killed_now(&mut self) {
        if let Phase::Stopping { until, .. } = self.phase {
            self.phase = Phase::Stopping {
                until,
                killed: true,
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
                act.extend(self.stop(self.phase, now, "startup failed", true));
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
mod tests {
    use super::*;
    use Action as A;
    use Event as E;

    const SHUTDOWN: Duration = Duration::from_secs(10);

    fn serving(now: Instant) -> Life {
        let mut l = Life::new(now, None, SHUTDOWN);
        assert_eq!(l.on(E::Ready, now), [A::AnnounceReady]);
        assert_eq!(l.phase(), Phase::Serving);
        l
    }

    #[test]
    fn startup_announces_ready_once_the_workers_are() {
        let t = Instant::now();
        let mut l = Life::new(t, None, SHUTDOWN);
        assert!(l.starting());
        assert_eq!(l.deadline(), Some(t + READY_TIMEOUT));
        assert_eq!(l.on(E::Tick, t), [], "not due yet");
        assert_eq!(l.on(E::Ready, t), [A::AnnounceReady]);
        assert_eq!((l.phase(), l.generation()), (Phase::Serving, 1));
        assert_eq!(l.deadline(), None);
        assert_eq!(l.on(E::Ready, t), [], "said once");
    }

    #[test]
    fn a_startup_that_never_gets_ready_stops_and_exits_1() {
        let t = Instant::now();
        let mut l = Life::new(t, None, SHUTDOWN);
        let act = l.on(E::Tick, t + READY_TIMEOUT);
        assert!(matches!(&act[0], A::Fatal(_)), "{act:?}");
        assert_eq!(
            act[1],
            A::BeginStop {
                why: "startup failed",
                immediate: true
            }
        );
        assert!(l.killed());
        assert_eq!(l.on(E::ChildrenGone, t), [A::Exit(1)]);
    }

    #[test]
    fn a_hup_while_serving_reloads_and_the_new_generation_takes_over() {
        let t = Instant::now();
        let mut l = serving(t);
        assert_eq!(l.on(E::Hup, t), [A::PrepareReload { next: 2 }]);
        assert_eq!(l.next(), Some(2));
        assert_eq!(l.generation(), 1, "the old one is in force meanwhile");
        assert_eq!(l.on(E::NextReady, t), [A::Commit]);
        assert_eq!((l.phase(), l.generation()), (Phase::Serving, 2));
    }

    #[test]
    fn a_reload_that_fails_or_times_out_is_abandoned() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Hup, t);
        assert_eq!(
            l.on(E::ReloadFailed("bad key".into()), t),
            [A::Abandon("bad key".into())]
        );
        assert_eq!((l.phase(), l.generation()), (Phase::Serving, 1));
        l.on(E::Hup, t);
        let act = l.on(E::Tick, t + READY_TIMEOUT);
        assert!(matches!(&act[..], [A::Abandon(_)]), "{act:?}");
        l.on(E::Hup, t);
        let died = E::DiedBeforeReady {
            next: true,
            why: "worker 7 exited".into(),
        };
        assert_eq!(l.on(died, t), [A::Abandon("worker 7 exited".into())]);
        assert_eq!(l.generation(), 1);
    }

    #[test]
    fn a_hup_during_a_reload_waits_for_it_then_reloads_again() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Hup, t);
        assert_eq!(l.on(E::Hup, t), [A::Defer("SIGHUP")]);
        assert!(l.deferred().hup);
        assert_eq!(
            l.on(E::NextReady, t),
            [A::Commit, A::PrepareReload { next: 3 }]
        );
        assert!(!l.deferred().hup);
    }

    #[test]
    fn a_hup_during_startup_waits_for_ready() {
        let t = Instant::now();
        let mut l = Life::new(t, None, SHUTDOWN);
        assert_eq!(l.on(E::Hup, t), [A::Defer("SIGHUP")]);
        assert_eq!(
            l.on(E::Ready, t),
            [A::AnnounceReady, A::PrepareReload { next: 2 }]
        );
    }

    #[test]
    fn a_usr2_during_a_reload_waits_then_checks_the_new_code() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Hup, t);
        assert_eq!(l.on(E::Usr2, t), [A::Defer("SIGUSR2")]);
        assert_eq!(l.on(E::NextReady, t), [A::Commit, A::StartCheck]);
        assert!(matches!(l.phase(), Phase::Checking { .. }));
    }

    #[test]
    fn a_hup_and_a_usr2_that_both_waited_run_in_turn_hup_first() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Usr2, t);
        l.on(E::Usr2, t);
        l.on(E::Hup, t);
        let act = l.on(E::Checked(Err("exited with status 1".into())), t);
        assert_eq!(
            act,
            [
                A::RefuseUpgrade("exited with status 1".into()),
                A::PrepareReload { next: 2 }
            ]
        );
        assert_eq!(l.on(E::NextReady, t), [A::Commit, A::StartCheck]);
    }

    #[test]
    fn an_upgrade_checks_then_execs_and_a_failed_exec_goes_on() {
        let t = Instant::now();
        let mut l = serving(t);
        assert_eq!(l.on(E::Usr2, t), [A::StartCheck]);
        assert_eq!(l.deadline(), Some(t + CHECK_TIMEOUT));
        assert_eq!(l.on(E::Checked(Ok(())), t), [A::Exec]);
        assert_eq!(
            l.on(E::ExecFailed("no such file".into()), t),
            [A::ExecFailed("no such file".into())]
        );
        assert_eq!(l.phase(), Phase::Serving);
    }

    #[test]
    fn a_check_that_hangs_is_ended_and_refused() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Usr2, t);
        let act = l.on(E::Tick, t + CHECK_TIMEOUT);
        assert_eq!(act[0], A::EndCheck);
        assert!(matches!(&act[1], A::RefuseUpgrade(_)));
        assert_eq!(l.phase(), Phase::Serving);
        // Its exit, reaped later, no longer matters.
        assert_eq!(l.on(E::Checked(Ok(())), t), []);
    }

    #[test]
    fn a_term_during_an_upgrade_check_wins() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Usr2, t);
        l.on(E::Hup, t);
        assert_eq!(
            l.on(E::Stop("SIGTERM"), t),
            [
                A::EndCheck,
                A::BeginStop {
                    why: "SIGTERM",
                    immediate: false
                }
            ]
        );
        assert!(l.stopping());
        assert_eq!(l.deferred(), Deferred::default(), "the HUP is dropped");
        assert_eq!(l.on(E::Checked(Ok(())), t), [], "no exec while stopping");
    }

    #[test]
    fn a_term_during_a_reload_abandons_it_and_stops() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Hup, t);
        let act = l.on(E::Stop("SIGINT"), t);
        assert_eq!(act[0], A::DropReload);
        assert_eq!(
            act[1],
            A::BeginStop {
                why: "SIGINT",
                immediate: false
            }
        );
        assert_eq!(l.on(E::NextReady, t), [], "nothing commits now");
    }

    #[test]
    fn requests_while_stopping_are_ignored_and_a_second_term_kills() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Stop("SIGTERM"), t);
        assert_eq!(l.deadline(), Some(t + SHUTDOWN));
        assert_eq!(l.on(E::Hup, t), [A::Ignore("SIGHUP")]);
        assert_eq!(l.on(E::Usr2, t), [A::Ignore("SIGUSR2")]);
        assert_eq!(l.on(E::Stop("SIGTERM"), t), [A::StopNow("SIGTERM")]);
        assert!(l.killed());
        assert_eq!(l.on(E::Stop("SIGTERM"), t), [], "killed once");
        assert_eq!(l.on(E::ChildrenGone, t), [A::Exit(0)]);
    }

    #[test]
    fn the_shutdown_timeout_kills_what_is_left() {
        let t = Instant::now();
        let mut l = serving(t);
        l.on(E::Stop("SIGTERM"), t);
        assert_eq!(l.on(E::Tick, t + SHUTDOWN / 2), []);
        assert_eq!(l.on(E::Tick, t + SHUTDOWN), [A::KillAll]);
        assert_eq!(l.deadline(), None);
        assert_eq!(l.on(E::Tick, t + SHUTDOWN * 2), []);
    }

    #[test]
    fn quit_stops_at_once() {
        let t = Instant::now();
        let mut l = serving(t);
        assert_eq!(
            l.on(E::Quit, t),
            [A::BeginStop {
                why: "SIGQUIT",
                immediate: true
            }]
        );
        assert!(l.killed());
        assert_eq!(l.on(E::ChildrenGone, t), [A::Exit(0)]);
    }

    #[test]
    fn after_an_upgrade_the_new_generation_retires_the_old_once_ready() {
        let t = Instant::now();
        let mut l = Life::new(t, Some(4), SHUTDOWN);
        assert_eq!(l.generation(), 5);
        assert_eq!(
            l.on(E::Ready, t),
            [A::AnnounceReady, A::RetireUpgraded { old: 4 }]
        );
    }

    #[test]
    fn an_upgrade_whose_workers_fail_falls_back_to_the_old_workers() {
        let t = Instant::now();
        let mut l = Life::new(t, Some(4), SHUTDOWN);
        let died = E::DiedBeforeReady {
            next: false,
            why: "worker 9 exited with status 1".into(),
        };
        let act = l.on(died, t);
        assert_eq!(
            act,
            [A::UpgradeFailed {
                old: 4,
                why: "worker 9 exited with status 1".into()
            }]
        );
        assert_eq!((l.phase(), l.generation()), (Phase::Serving, 4));
        assert_eq!(l.exit_code(), 0);
    }

    #[test]
    fn a_worker_of_an_abandoned_reload_dying_later_changes_nothing() {
        let t = Instant::now();
        let mut l = serving(t);
        let died = E::DiedBeforeReady {
            next: true,
            why: "late".into(),
        };
        assert_eq!(l.on(died, t), []);
        assert_eq!(l.phase(), Phase::Serving);
    }
}
