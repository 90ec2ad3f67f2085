//! The scoreboard's slots, counters and tables, and a child writing
//! what the parent reads.

use nix::unistd::Pid;

use super::*;
use crate::scoreboard::Refusal;

#[test]
fn slots_are_claimed_written_and_released() {
    let mut board = Scoreboard::new(2, 1).unwrap();
    let a = board.claim(1).unwrap();
    let b = board.claim(1).unwrap();
    assert_ne!(a, b);
    assert!(board.claim(1).is_none(), "only two slots");
    board.set_pid(a, Pid::from_raw(42));
    let e = board.get(a).unwrap();
    assert_eq!(
        (e.pid.as_raw(), e.generation, e.state),
        (42, 1, State::Starting)
    );
    let slot = board.slot(a);
    slot.set(State::Busy);
    slot.served_one();
    slot.set(State::Idle);
    let e = board.release(a).unwrap();
    assert_eq!((e.state, e.served), (State::Idle, 1));
    assert!(board.get(a).is_none());
    // A reused slot starts from scratch.
    let c = board.claim(2).unwrap();
    assert_eq!(c, a);
    let e = board.get(c).unwrap();
    assert_eq!((e.generation, e.served, e.state), (2, 0, State::Starting));
}

#[test]
fn idle_count_wakes_the_master_only_when_spares_run_short() {
    let mut board = Scoreboard::new(3, 1).unwrap();
    let (a, b) = (board.claim(1).unwrap(), board.claim(1).unwrap());
    board.set_wake_below(1);
    assert!(!board.slot(a).set(State::Idle));
    assert!(!board.slot(b).set(State::Idle));
    assert!(!board.slot(a).set(State::Busy), "one idle left");
    assert!(board.slot(b).set(State::Busy), "none idle left");
    board.set_wake_below(0);
    assert!(!board.slot(b).set(State::Idle));
    assert!(!board.slot(b).set(State::Busy), "waking disarmed");
    // A worker that dies idle is taken off the count by the master.
    board.set_wake_below(1);
    board.slot(a).set(State::Idle);
    board.release(a);
    assert!(!board.slot(b).set(State::Idle));
    assert!(board.slot(b).set(State::Busy), "a's death was counted");
}

#[test]
fn rates_are_counted_per_source_in_windows() {
    let board = Scoreboard::new(4, 7).unwrap();
    let y = crate::access::key([127, 0, 0, 2].into());
    assert!((0..3).all(|_| board.conn_rate_ok(y, 3)));
    assert!(!board.conn_rate_ok(y, 3), "a fourth in the same second");
    assert!(board.datagram_rate_ok(y, 1), "the datagram table is apart");
    board.refused(Refusal::Rate);
    assert_eq!(board.refusals(), [0, 0, 1, 0]);
}

#[test]
fn places_are_bounded_published_and_rebuilt() {
    let mut board = Scoreboard::new(1, 3).unwrap();
    let (x, y) = (
        board.place_of(crate::access::key([192, 0, 2, 1].into())),
        board.place_of(crate::access::key([192, 0, 2, 2].into())),
    );
    assert!(board.take_place(x, 2) && board.take_place(x, 2));
    assert!(!board.take_place(x, 2), "a third would be one too many");
    assert!(board.take_place(y, 2));
    board.give_place(x);
    assert!(board.take_place(x, 2), "a place came free");
    // A worker died holding places: the table starts over, and the live
    // ones count theirs again.
    let epoch = board.places_epoch();
    board.rebuild_places();
    assert_ne!(board.places_epoch(), epoch);
    board.recount_place(y);
    assert!(board.take_place(x, 2) && board.take_place(x, 2));
    assert!(!board.take_place(y, 1));
    board.give_place(y);
    board.give_place(y);
    assert!(board.take_place(y, 1), "never below zero");
    // A place published in a slot is taken back once, and a released
    // slot holds none.
    let s = board.claim(1).unwrap();
    hold(board.slot(s).held(), x);
    assert_eq!(take_held(board.slot_held(s)), Some(x));
    assert_eq!(take_held(board.slot_held(s)), None);
    hold(board.fork_held(3), y);
    assert_eq!(take_held(board.fork_held(3)), Some(y));
    // A fork-mode child's word says it took a connection apart from its
    // place, whichever is written first and after the place is taken.
    let w = board.fork_held(4);
    assert!(!taken(w));
    mark_taken(w);
    hold(w, y);
    assert!(taken(w));
    assert_eq!(take_held(w), Some(y));
    assert_eq!(take_held(w), None);
    assert!(taken(w), "taking the place back leaves the mark");
    clear(w);
    assert!(!taken(w));
    hold(w, x);
    mark_taken(w);
    assert_eq!(take_held(w), Some(x));
    hold(board.slot(s).held(), x);
    board.release(s);
    let s = board.claim(2).unwrap();
    assert_eq!(take_held(board.slot_held(s)), None);
}

#[test]
fn setup_failures_are_reported_once_per_interval() {
    let board = Scoreboard::new(1, 1).unwrap();
    let every = std::time::Duration::from_secs(3600);
    assert_eq!(board.setup_failure_report(every), Some(0));
    assert_eq!(board.setup_failure_report(every), None);
    assert_eq!(board.setup_failure_report(every), None);
    let now = std::time::Duration::ZERO;
    assert_eq!(board.setup_failure_report(now), Some(2));
}

#[test]
fn a_child_writes_what_the_parent_reads() {
    let mut board = Scoreboard::new(1, 1).unwrap();
    let s = board.claim(1).unwrap();
    // SAFETY: the test harness has other threads, but this child only
    // touches atomics in the shared mapping and `_exit`s: no heap, no
    // lock, which is what spawn's contract guards.
    #[allow(unsafe_code)]
    let pid = unsafe {
        crate::sys::spawn(&[], &[], || {
            board.slot(s).served_one();
            board.slot(s).set(State::Busy);
            0
        })
    }
    .unwrap();
    let _ = nix::sys::wait::waitpid(pid, None).unwrap();
    let e = board.get(s).unwrap();
    assert_eq!((e.state, e.served), (State::Busy, 1));
}
