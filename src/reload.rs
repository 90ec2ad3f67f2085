//! What a reload (SIGHUP) changes: which listeners stay, which settings
//! must wait for a restart. Pure, so it is unit-tested without a daemon;
//! the master does the binding, forking and retiring.

use crate::config::Config;
use crate::listen::{ListenAddr, Listener};

/// One listener of the new configuration.
pub enum Planned {
    /// The current listener at this index stays, socket and port unchanged.
    Kept(usize),
    /// A socket bound for the new configuration.
    Bound(Listener),
}

/// For each wanted address, the index of a current listener bound for the
/// same address, if there is one; each current listener matches at most
/// once (so `127.0.0.1:0` twice keeps both ephemeral sockets).
pub fn match_listeners(
    current: &[Option<&ListenAddr>],
    wanted: &[ListenAddr],
) -> Vec<Option<usize>> {
    let mut taken = vec![false; current.len()];
    wanted
        .iter()
        .map(|w| {
            let i = (0..current.len()).find(|&i| !taken[i] && current[i] == Some(w))?;
            taken[i] = true;
            Some(i)
        })
        .collect()
}

/// Settings a running daemon cannot change: `new` gets the values in force
/// again, and the names of those that differed are returned for a warning.
pub fn keep_fixed(current: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut kept = Vec::new();
    macro_rules! keep {
        ($($field:ident => $name:literal),* $(,)?) => {
            $( if new.$field != current.$field {
                new.$field = current.$field.clone();
                kept.push($name);
            } )*
        };
    }
    keep!(
        pidfile => "pidfile",
        log => "log",
        syslog_socket => "syslog-socket",
        syslog_facility => "syslog-facility",
    );
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, Options};
    use clap::Parser;

    fn addr(s: &str) -> ListenAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unchanged_addresses_keep_their_listener() {
        let a = addr("127.0.0.1:7");
        let b = addr("unix:/run/echo.sock");
        let zero = addr("127.0.0.1:0");
        let current = [Some(&a), Some(&zero), Some(&zero), None];
        let wanted = [
            zero.clone(),
            b.clone(),
            a.clone(),
            zero.clone(),
            zero.clone(),
        ];
        assert_eq!(
            match_listeners(&current, &wanted),
            [Some(1), None, Some(0), Some(2), None]
        );
        assert_eq!(match_listeners(&current, &[]), []);
    }

    #[test]
    fn fixed_settings_are_kept_and_named() {
        let conf = |args: &[&str]| {
            let mut all = vec!["echo-forkd", "-f"];
            all.extend_from_slice(args);
            resolve(Options::parse_from(all)).unwrap()
        };
        let current = conf(&["-p", "/run/a.pid", "-w", "2"]);
        let mut new = conf(&["-p", "/run/b.pid", "-w", "5", "--log", "syslog"]);
        let mut kept = keep_fixed(&current, &mut new);
        kept.sort();
        assert_eq!(kept, ["log", "pidfile"]);
        assert_eq!(new.pidfile, current.pidfile);
        assert_eq!(new.log, current.log);
        assert_eq!(new.workers, 5, "the pool size may change");
    }
}
