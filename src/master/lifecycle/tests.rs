//! The lifecycle's rules, one test each.

use super::*;
use Action as A;
use Event as E;

const SHUTDOWN: Duration = Duration::from_secs(10);

/// A stop that begins, for `why`.
fn begin(why: &'static str, immediate: bool) -> Action {
    A::BeginStop {
        why,
        immediate,
        restart: false,
    }
}

/// A master just started (`upgraded_from`: the generation it replaces).
fn started(upgraded_from: Option<u32>) -> (Instant, Life) {
    let t = Instant::now();
    (t, Life::new(t, upgraded_from, SHUTDOWN))
}

/// A master serving its first generation.
fn serving() -> (Instant, Life) {
    let (t, mut l) = started(None);
    assert_eq!(l.on(E::Ready, t), [A::AnnounceReady]);
    assert_eq!(l.phase(), Phase::Serving);
    (t, l)
}

#[test]
fn startup_announces_ready_once_the_workers_are() {
    let (t, mut l) = started(None);
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
    let (t, mut l) = started(None);
    let act = l.on(E::Tick, t + READY_TIMEOUT);
    assert!(matches!(&act[0], A::Fatal(_)), "{act:?}");
    assert_eq!(act[1], begin("startup failed", true));
    assert!(l.killed());
    assert_eq!(l.on(E::ChildrenGone, t), [A::Exit(1)]);
}

#[test]
fn a_hup_while_serving_reloads_and_the_new_generation_takes_over() {
    let (t, mut l) = serving();
    assert_eq!(l.on(E::Hup, t), [A::PrepareReload { next: 2 }]);
    assert_eq!(l.next(), Some(2));
    assert_eq!(l.generation(), 1, "the old one is in force meanwhile");
    assert_eq!(l.on(E::NextReady, t), [A::Commit]);
    assert_eq!((l.phase(), l.generation()), (Phase::Serving, 2));
}

#[test]
fn a_reload_that_fails_or_times_out_is_abandoned() {
    let (t, mut l) = serving();
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
    let (t, mut l) = serving();
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
    let (t, mut l) = started(None);
    assert_eq!(l.on(E::Hup, t), [A::Defer("SIGHUP")]);
    assert_eq!(
        l.on(E::Ready, t),
        [A::AnnounceReady, A::PrepareReload { next: 2 }]
    );
}

#[test]
fn a_usr2_during_a_reload_waits_then_checks_the_new_code() {
    let (t, mut l) = serving();
    l.on(E::Hup, t);
    assert_eq!(l.on(E::Usr2, t), [A::Defer("SIGUSR2")]);
    assert_eq!(l.on(E::NextReady, t), [A::Commit, A::StartCheck]);
    assert!(matches!(l.phase(), Phase::Checking { .. }));
}

#[test]
fn a_hup_and_a_usr2_that_both_waited_run_in_turn_hup_first() {
    let (t, mut l) = serving();
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
    let (t, mut l) = serving();
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
    let (t, mut l) = serving();
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
    let (t, mut l) = serving();
    l.on(E::Usr2, t);
    l.on(E::Hup, t);
    assert_eq!(
        l.on(E::Stop("SIGTERM"), t),
        [A::EndCheck, begin("SIGTERM", false)]
    );
    assert!(l.stopping());
    assert_eq!(l.deferred(), Deferred::default(), "the HUP is dropped");
    assert_eq!(l.on(E::Checked(Ok(())), t), [], "no exec while stopping");
}

#[test]
fn a_term_during_a_reload_abandons_it_and_stops() {
    let (t, mut l) = serving();
    l.on(E::Hup, t);
    let act = l.on(E::Stop("SIGINT"), t);
    assert_eq!(act[0], A::DropReload);
    assert_eq!(act[1], begin("SIGINT", false));
    assert_eq!(l.on(E::NextReady, t), [], "nothing commits now");
}

#[test]
fn requests_while_stopping_are_ignored_and_a_second_term_kills() {
    let (t, mut l) = serving();
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
    let (t, mut l) = serving();
    l.on(E::Stop("SIGTERM"), t);
    assert_eq!(l.on(E::Tick, t + SHUTDOWN / 2), []);
    assert_eq!(l.on(E::Tick, t + SHUTDOWN), [A::KillAll]);
    assert_eq!(l.deadline(), None);
    assert_eq!(l.on(E::Tick, t + SHUTDOWN * 2), []);
}

#[test]
fn quit_stops_at_once() {
    let (t, mut l) = serving();
    assert_eq!(l.on(E::Quit, t), [begin("SIGQUIT", true)]);
    assert!(l.killed());
    assert_eq!(l.on(E::ChildrenGone, t), [A::Exit(0)]);
}

#[test]
fn after_an_upgrade_the_new_generation_retires_the_old_once_ready() {
    let (t, mut l) = started(Some(4));
    assert_eq!(l.generation(), 5);
    assert_eq!(
        l.on(E::Ready, t),
        [A::AnnounceReady, A::RetireUpgraded { old: 4 }]
    );
}

#[test]
fn an_upgrade_whose_workers_fail_falls_back_to_the_old_workers() {
    let (t, mut l) = started(Some(4));
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
    let (t, mut l) = serving();
    let died = E::DiedBeforeReady {
        next: true,
        why: "late".into(),
    };
    assert_eq!(l.on(died, t), []);
    assert_eq!(l.phase(), Phase::Serving);
}

#[test]
fn under_a_service_manager_a_term_asks_first_and_a_restart_keeps_what_it_can() {
    let (t, l) = started(None);
    let mut l = l.asking_about_restarts();
    l.on(E::Ready, t);
    assert_eq!(l.on(E::Stop("SIGTERM"), t), [A::AskRestart]);
    assert!(!l.stopping(), "it serves while it asks");
    assert_eq!(l.deadline(), Some(t + ASK_TIMEOUT));
    assert_eq!(l.on(E::Hup, t), [A::Ignore("SIGHUP")]);
    assert_eq!(
        l.on(E::Restart(true), t),
        [A::BeginStop {
            why: "SIGTERM",
            immediate: false,
            restart: true
        }]
    );
    assert!(l.stopping());
}

#[test]
fn no_answer_in_time_is_a_stop_and_a_second_term_does_not_wait() {
    let (t, l) = started(None);
    let mut l = l.asking_about_restarts();
    l.on(E::Ready, t);
    l.on(E::Stop("SIGTERM"), t);
    assert_eq!(l.on(E::Tick, t + ASK_TIMEOUT), [begin("SIGTERM", false)]);
    let mut l = Life::new(t, None, SHUTDOWN).asking_about_restarts();
    l.on(E::Ready, t);
    l.on(E::Stop("SIGTERM"), t);
    assert_eq!(l.on(E::Stop("SIGTERM"), t), [begin("SIGTERM", true)]);
    assert_eq!(l.on(E::Restart(true), t), [], "too late to matter");
}

#[test]
fn a_term_during_a_reload_under_a_service_manager_drops_the_reload_then_asks() {
    let (t, l) = started(None);
    let mut l = l.asking_about_restarts();
    l.on(E::Ready, t);
    l.on(E::Hup, t);
    assert_eq!(l.on(E::Stop("SIGTERM"), t), [A::DropReload, A::AskRestart]);
    assert_eq!(l.on(E::NextReady, t), [], "nothing commits now");
}
