//! Conversations that stay with the process that accepted them, under the
//! load of handover.rs: where nothing is handed over, nothing may be cut
//! either. A fork-mode child finishes its own conversation across a
//! reload and an upgrade, and a prefork worker recycles only when idle,
//! so the conversations held meanwhile are never its. Each test checks
//! that every conversation is held by the same process from its start to
//! its end (which is why these are not in handover.rs, whose every test
//! proves a move).

use super::handover::{across, proxied_client_across_a_reload, two_workers, Moves};
use super::*;

#[test]
fn no_conversation_is_cut_by_a_reload_in_fork_mode() {
    across(
        &two_workers("fork"),
        |d, _| d.signal(Signal::SIGHUP),
        "reloaded:",
        Moves::None,
    );
}

#[test]
fn no_conversation_is_cut_by_an_upgrade_in_fork_mode() {
    across(
        &two_workers("fork"),
        |d, _| d.signal(Signal::SIGUSR2),
        "upgraded: generation",
        Moves::None,
    );
}

/// A prefork worker recycles after a connection ends, with nothing to
/// hand over: the workers of the connect loop recycle, and the
/// conversations held meanwhile go on with theirs.
#[test]
fn no_conversation_is_cut_when_prefork_workers_recycle() {
    across(
        &[
            "-l",
            "127.0.0.1:0",
            "-w",
            "2",
            "--max-requests",
            "5",
            "--shutdown-timeout",
            "2",
        ],
        |_, _| {},
        "exited",
        Moves::None,
    );
}

/// A proxied fork-mode client keeps its child, and so its address and its
/// place, across a reload.
#[test]
fn a_proxied_client_keeps_its_address_and_place_in_fork_mode() {
    proxied_client_across_a_reload(&two_workers("fork"), || {}, false);
}
