//! What the master says about itself: the USR1 status line and the list
//! of workers, systemd's STATUS=, and the periodic report of refusals.

use std::time::Instant;

use log::{info, warn};
use nix::unistd::Pid;

use super::{Master, TICK};
use crate::admission::Refusal;
use crate::children::Kind;
use crate::config::Mode;
use crate::logging::{counted, REPORT_EVERY};
use crate::scoreboard::{Cut, Dropped, State};

/// The most workers the USR1 line names one by one.
const NAMED_WORKERS: usize = 64;

impl Master {
    /// SIGUSR1: the status line, then every worker by pid and state.
    pub(super) fn status(&self, now: Instant) {
        let text = self.status_text(now);
        info!("status: {text}");
        let mut workers: Vec<(Pid, String)> = self
            .children
            .iter()
            .filter(|(_, c)| c.kind != Kind::Conn)
            .filter_map(|(pid, c)| {
                let e = self.scoreboard.get(c.slot?)?;
                let retiring = if c.retire_by.is_none() {
                    ""
                } else {
                    ", retiring"
                };
                if c.kind != Kind::Pool {
                    return Some((
                        pid,
                        format!(
                            "{pid} {} (generation {}{retiring})",
                            c.kind.name(),
                            e.generation
                        ),
                    ));
                }
                let open = if self.cfg.mode == Mode::Event {
                    format!("open {}, ", e.open)
                } else {
                    String::new()
                };
                Some((
                    pid,
                    format!(
                        "{pid} {} (generation {}, {open}served {}{retiring})",
                        e.state.name(),
                        e.generation,
                        e.served
                    ),
                ))
            })
            .collect();
        if !workers.is_empty() {
            workers.sort();
            let more = workers.len().saturating_sub(NAMED_WORKERS);
            let named: Vec<String> = workers
                .into_iter()
                .take(NAMED_WORKERS)
                .map(|(_, w)| w)
                .collect();
            let more = if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            };
            info!("workers: {}{more}", named.join(", "));
        }
        self.notify(&format!("STATUS={text}"));
    }

    /// The USR1 line and systemd's STATUS=.
    pub(super) fn status_text(&self, now: Instant) -> String {
        let uptime = now.duration_since(self.reports.started).as_secs();
        let (mut busy, mut idle, mut other) = (0, 0, 0);
        // What /metrics says (echo_forkd_connections_total), from the same word.
        let (served, _) = self.scoreboard.served_totals();
        let mut open = 0;
        for (_, c) in self
            .children
            .iter()
            .filter(|(_, c)| matches!(c.kind, Kind::Pool | Kind::Conn))
        {
            if let Some(e) = c.slot.and_then(|s| self.scoreboard.get(s)) {
                open += e.open;
                match e.state {
                    State::Busy => busy += 1,
                    State::Idle if c.active() => idle += 1,
                    _ => other += 1,
                }
            }
        }
        let starting = if other > 0 {
            format!(", starting or stopping {other}")
        } else {
            String::new()
        };
        let refused = self.scoreboard.refusals();
        let refused = if refused.iter().any(|&n| n > 0) {
            let parts: Vec<String> = Refusal::ALL
                .iter()
                .zip(refused)
                .map(|(r, n)| format!("{} {n}", r.name()))
                .collect();
            format!(", refused ({})", parts.join(", "))
        } else {
            String::new()
        };
        let text = match self.cfg.mode {
            Mode::Prefork => format!(
                "mode prefork, generation {}, workers {} (busy {busy}, idle {idle}{starting}; floor {}, max {}, max reached {}), connections served {served}{refused}, uptime {uptime} s",
                self.life.generation(),
                self.children.workers(),
                self.cfg.workers,
                self.cfg.max_workers,
                counted(self.prefork.at_max.total(), "time", "times")
            ),
            Mode::Event => format!(
                "mode event, generation {}, workers {} (busy {busy}, idle {idle}{starting}), open connections {open} (at most {} per worker), connections served {served}{refused}, uptime {uptime} s",
                self.life.generation(),
                self.children.workers(),
                self.cfg.worker_connections
            ),
            Mode::Fork => format!(
                "mode fork, generation {}, children {} of at most {}, connections {}, limit reached {}{refused}, uptime {uptime} s",
                self.life.generation(),
                self.children.conns(),
                self.cfg.max_children,
                self.fork.accepted + self.prefork.served_by_gone,
                counted(self.fork.saturation.hits, "time", "times")
            ),
        };
        format!(
            "{text}{}, version {}",
            self.udp_status(),
            env!("CARGO_PKG_VERSION")
        )
    }

    /// Under systemd, once a second at most: STATUS= again if its figures
    /// moved since it was last sent (`systemctl status` shows what
    /// `/metrics` says; an idle daemon sends nothing).
    fn refresh_status(&mut self, now: Instant) {
        if self.estate.notify.is_none() {
            return;
        }
        let text = self.status_text(now);
        let figures = without_uptime(&text);
        if figures != self.reports.status_sent {
            self.notify(&format!("STATUS={text}"));
            self.reports.status_sent = figures;
        }
    }

    /// The UDP part of the status line: empty without UDP workers.
    fn udp_status(&self) -> String {
        let workers = self.children.count(Kind::Udp);
        let (echoed, dropped) = self.scoreboard.udp_counts();
        if workers == 0 && echoed == 0 && dropped.iter().all(|&n| n == 0) {
            return String::new();
        }
        let parts: Vec<String> = Dropped::ALL
            .iter()
            .zip(dropped)
            .filter(|(_, n)| *n > 0)
            .map(|(d, n)| format!("{} {n}", d.name()))
            .collect();
        let dropped = if parts.is_empty() {
            String::new()
        } else {
            format!(", dropped ({})", parts.join(", "))
        };
        format!(", udp workers {workers}, datagrams echoed {echoed}{dropped}")
    }

    /// Once a second: logs refused connections (counted by whoever
    /// refused them), open connections cut, and datagrams dropped, at
    /// most every REPORT_EVERY, never dropping a count.
    pub(super) fn tick(&mut self, now: Instant) {
        if now < self.reports.next_tick {
            return;
        }
        self.reports.next_tick = now + TICK;
        self.refresh_status(now);
        for (i, n, all) in self.reports.refused.report(now, self.scoreboard.refusals()) {
            let (n, why) = (counted(n, "connection", "connections"), Refusal::ALL[i]);
            warn!(
                "refused {n} ({}) since the last report; {all} in all",
                why.name()
            );
        }
        for (i, n, all) in self.reports.cut.report(now, self.scoreboard.cuts()) {
            let (n, why) = (
                counted(n, "open connection", "open connections"),
                Cut::ALL[i],
            );
            warn!(
                "closed {n} since the last report: {}; {all} in all",
                why.describe()
            );
        }
        let (_, dropped) = self.scoreboard.udp_counts();
        for (i, n, all) in self.reports.dropped.report(now, dropped) {
            let (n, why) = (counted(n, "datagram", "datagrams"), Dropped::ALL[i]);
            warn!(
                "dropped {n} unanswered ({}) since the last report; {all} in all",
                why.describe()
            );
        }
    }
}

/// Counters logged at most every [`REPORT_EVERY`], never losing a count:
/// the values last logged, and when.
pub(super) struct Counted<const N: usize> {
    logged: [u64; N],
    at: Option<Instant>,
}

impl<const N: usize> Default for Counted<N> {
    fn default() -> Self {
        Counted {
            logged: [0; N],
            at: None,
        }
    }
}

impl<const N: usize> Counted<N> {
    /// Counts that were logged already (by the code before an upgrade),
    /// as many as there are of them; the rest as none.
    pub(super) fn from_logged(logged: &[u64]) -> Counted<N> {
        Counted {
            logged: std::array::from_fn(|i| logged.get(i).copied().unwrap_or(0)),
            at: None,
        }
    }

    /// If some counter grew and the last report is old enough: how much
    /// each grew since (and `counts` become the ones logged).
    pub(super) fn due(&mut self, now: Instant, counts: [u64; N]) -> Option<[u64; N]> {
        if counts == self.logged || self.at.is_some_and(|t| now < t + REPORT_EVERY) {
            return None;
        }
        let new = std::array::from_fn(|i| counts[i].saturating_sub(self.logged[i]));
        self.logged = counts;
        self.at = Some(now);
        Some(new)
    }

    /// The counts as last logged.
    pub(super) fn logged(&self) -> [u64; N] {
        self.logged
    }

    /// As [`Counted::due`]: each counter that grew, by its index, with
    /// how much, and its count in all.
    pub(super) fn report(
        &mut self,
        now: Instant,
        counts: [u64; N],
    ) -> impl Iterator<Item = (usize, u64, u64)> {
        let new = self.due(now, counts).unwrap_or([0; N]);
        let all = self.logged;
        (0..N)
            .filter(move |&i| new[i] > 0)
            .map(move |i| (i, new[i], all[i]))
    }
}

/// A status line without its uptime, which moves every second.
fn without_uptime(text: &str) -> String {
    match text.split_once(", uptime ") {
        Some((before, after)) => {
            let rest = after.split_once(" s").map_or("", |(_, r)| r);
            format!("{before}{rest}")
        }
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_reported_at_most_every_interval_and_never_lost() {
        let mut c = Counted::<2>::default();
        let t = Instant::now();
        assert_eq!(c.due(t, [0, 0]), None, "nothing new");
        assert_eq!(c.due(t, [3, 0]), Some([3, 0]));
        assert_eq!(c.due(t + REPORT_EVERY / 2, [5, 1]), None, "too soon");
        // What came meanwhile is in the next report.
        assert_eq!(c.due(t + REPORT_EVERY, [7, 1]), Some([4, 1]));
        assert_eq!(c.logged(), [7, 1]);
    }

    #[test]
    fn the_uptime_alone_does_not_count_as_a_change() {
        let a = "mode prefork, connections served 3, uptime 12 s, udp workers 1, version 0.1.0";
        let b = "mode prefork, connections served 3, uptime 13 s, udp workers 1, version 0.1.0";
        assert_eq!(without_uptime(a), without_uptime(b));
        assert_eq!(
            without_uptime(a),
            "mode prefork, connections served 3, udp workers 1, version 0.1.0"
        );
        let c = "mode prefork, connections served 4, uptime 13 s, udp workers 1, version 0.1.0";
        assert_ne!(without_uptime(a), without_uptime(c));
    }
}
