//! Prefork workers taking turns (src/turns.rs), the wait of systems
//! without `EPOLLEXCLUSIVE`, run here on Linux where
//! `ECHO_FORKD_TAKE_TURNS=1` puts the workers on it. (.ci/run also runs
//! the whole suite so.) Which worker leads is read from the system call
//! each one sleeps in: the leader polls, its followers wait in `pselect`.

use nix::sys::signal::kill;
use nix::unistd::Pid;

use super::*;

/// A pool of `size` prefork workers taking turns (and `more` options),
/// ready, and its workers.
fn taking_turns(size: usize, more: &[&str]) -> (Daemon, Vec<i32>) {
    let n = size.to_string();
    let mut args = vec!["-l", "127.0.0.1:0", "-w", &n, "--min-spare", "0"];
    args.extend_from_slice(more);
    let d = Daemon::spawn_with(&args, |c| {
        c.env("ECHO_FORKD_TAKE_TURNS", "1");
    });
    assert!(
        d.wait_line("ready", DEADLINE).is_some(),
        "not ready; stderr:\n{}",
        d.stderr_text()
    );
    let workers = d.wait_children(size);
    (d, workers)
}

/// The system call `pid` sleeps in, from /proc/PID/syscall.
fn sleeping_in(pid: i32) -> Option<i64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Of `workers`, the ones asleep outside `pselect` (leading: polling the
/// listeners) and inside it (following), once all of them are asleep.
fn roles(workers: &[i32]) -> Option<(Vec<i32>, Vec<i32>)> {
    let mut lead = Vec::new();
    let mut follow = Vec::new();
    for &w in workers {
        if !matches!(proc_stat(w), Some(('S', _))) {
            return None;
        }
        match sleeping_in(w)? {
            n if n == libc::SYS_pselect6 => follow.push(w),
            _ => lead.push(w),
        }
    }
    Some((lead, follow))
}

/// [`taking_turns`], where /proc/PID/syscall can be read (it takes
/// ptrace rights); `None`, said, where it cannot.
fn watched_turns(size: usize) -> Option<(Daemon, Vec<i32>)> {
    let (d, workers) = taking_turns(size, &[]);
    if sleeping_in(workers[0]).is_none() {
        skipped("/proc/PID/syscall cannot be read here (ptrace rights)");
        return None;
    }
    Some((d, workers))
}

/// Waits until one of `workers` leads and the others follow; returns the
/// leader.
fn settled(workers: &[i32]) -> i32 {
    let mut leader = None;
    let ok = wait_until(DEADLINE, || match roles(workers) {
        Some((lead, follow)) if lead.len() == 1 && follow.len() == workers.len() - 1 => {
            leader = Some(lead[0]);
            true
        }
        _ => false,
    });
    assert!(ok, "not one leader: {:?}", roles(workers));
    leader.unwrap_or_default()
}

/// Each connection wakes the leader, which serves it, and the follower it
/// names; the rest sleep on, whatever the pool size (the herd would wake
/// all of them).
#[test]
fn a_connection_wakes_two_workers_whatever_the_pool_size() {
    let _heavy = heavy();
    for size in [8, 64] {
        let (d, workers) = taking_turns(size, &[]);
        let addr = d.addr();
        assert_eq!(echo_all(addr, b"warm"), b"warm");
        let switches = || {
            workers
                .iter()
                .map(|&p| voluntary_switches(p))
                .collect::<Vec<_>>()
        };
        let mut woken = 0;
        let mut before = switches();
        for i in 0..100u32 {
            assert_eq!(echo_all(addr, &i.to_be_bytes()), i.to_be_bytes());
            let after = switches();
            woken += before.iter().zip(&after).filter(|(b, a)| a > b).count();
            before = after;
        }
        let per = woken as f64 / 100.0;
        println!("{per:.2} of {size} idle workers woke per connection, taking turns");
        assert!(
            per < 3.0,
            "{per:.2} of {size} workers woke per connection: the herd is back"
        );
    }
}

#[test]
fn one_idle_worker_leads_and_the_others_follow() {
    let Some((d, workers)) = watched_turns(6) else {
        return;
    };
    let addr = d.addr();
    let first = settled(&workers);
    // Whoever takes a connection names another leader.
    assert_eq!(echo_all(addr, b"one"), b"one");
    let second = settled(&workers);
    assert_ne!(first, second, "the leader kept its turn after a connection");
    // Four clients held open: four workers serve them (in their own poll),
    // one of the other two leads and one follows.
    let held: Vec<_> = (0..4)
        .map(|i| {
            let mut s = connect(addr);
            assert_eq!(round_trip(&mut s, &[i]).unwrap(), [i]);
            s
        })
        .collect();
    let one_follows = wait_until(DEADLINE, || {
        roles(&workers).is_some_and(|(_, follow)| follow.len() == 1)
    });
    assert!(one_follows, "{:?}", roles(&workers));
    drop(held);
    settled(&workers);
}

/// The master names a leader when the one leading dies: without it every
/// follower would sleep on with the listeners unwatched.
#[test]
fn a_leader_that_dies_is_replaced() {
    let Some((d, workers)) = watched_turns(4) else {
        return;
    };
    let addr = d.addr();
    let leader = settled(&workers);
    kill(Pid::from_raw(leader), Signal::SIGKILL).unwrap();
    assert!(wait_until(DEADLINE, || is_dead(leader)));
    for i in 0..20u32 {
        assert_eq!(echo_all(addr, &i.to_be_bytes()), i.to_be_bytes());
    }
}

/// Followers watch their control pipe: retired by TTOU, a reload or a
/// stop, they leave at once, not at the shutdown timeout (60 s here).
#[test]
fn followers_told_to_stop_leave_at_once() {
    let (mut d, first) = taking_turns(6, &["--shutdown-timeout", "60"]);
    let addr = d.addr();
    for left in [5, 4] {
        d.signal(Signal::SIGTTOU);
        let retired = wait_until(DEADLINE, || d.children().len() == left);
        assert!(retired, "TTOU to {left}: {:?}", d.all_children());
    }
    d.signal(Signal::SIGHUP);
    assert!(d.wait_line("reloaded", DEADLINE).is_some());
    let gone = wait_until(DEADLINE, || first.iter().all(|&p| is_dead(p)));
    assert!(gone, "old workers left: {:?}", d.all_children());
    assert_eq!(echo_all(addr, b"after"), b"after");
    let start = Instant::now();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(DEADLINE).expect("stopped within the deadline");
    assert!(status.success(), "{status:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}
