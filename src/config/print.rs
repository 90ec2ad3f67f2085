//! `-T`: the configuration in force, written as a TOML file that `-c`
//! reads back to the same output (as `nginx -T` or `gunicorn
//! --print-config` show theirs); and what `-t` warns about.

use std::fmt::Write as _;
use std::time::Duration;

use clap::ValueEnum;

use super::file::keys;
use super::Config;
use crate::listen::ListenAddr;

/// Every setting in force (defaults, file and flags merged), one `key =
/// value` line each in the order of `--help`; a setting that is off (no
/// user, no metrics address) is left out, as a file would leave it out.
pub fn effective(cfg: &Config) -> String {
    let mut out =
        String::from("# echo-forkd -T: the configuration in force (defaults, file and flags)\n");
    for key in keys() {
        if let Some(v) = value(cfg, &key) {
            let _ = writeln!(out, "{key} = {v}");
        }
    }
    out
}

/// The value of `key` in TOML, or `None` when the setting is off.
fn value(cfg: &Config, key: &str) -> Option<String> {
    let secs = |d: Option<Duration>| d.map_or(0, |d| d.as_secs()).to_string();
    let name = |v: Option<clap::builder::PossibleValue>| v.map(|p| quote(p.get_name()));
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| quote(&p.to_string_lossy()));
    Some(match key {
        "listen" => list(
            cfg.listen
                .iter()
                .filter(|a| !matches!(a, ListenAddr::Metrics(_)))
                .map(ToString::to_string),
        ),
        "metrics" => {
            return cfg.listen.iter().find_map(|a| match a {
                ListenAddr::Metrics(inner) => Some(quote(&inner.to_string())),
                _ => None,
            })
        }
        "mode" => quote(&cfg.mode.to_string()),
        "workers" => cfg.workers.to_string(),
        "worker-connections" => cfg.worker_connections.to_string(),
        // In event mode, the engine in force too, as a comment.
        "io-engine" => match &cfg.engine {
            Some(e) => format!("{}   # in force: {}", quote(cfg.io_engine.name()), e.said()),
            None => quote(cfg.io_engine.name()),
        },
        "max-workers" => cfg.max_workers.to_string(),
        "min-spare" => cfg.min_spare.to_string(),
        "max-spare" => cfg.max_spare.to_string(),
        "max-children" => cfg.max_children.to_string(),
        "max-requests" => cfg.max_requests.to_string(),
        "max-requests-jitter" => cfg.max_requests_jitter.to_string(),
        "max-per-ip" => cfg.max_per_ip.to_string(),
        "max-conn-rate" => cfg.max_conn_rate.to_string(),
        "ipv6-prefix" => cfg.ipv6_prefix.to_string(),
        "udp-workers" => cfg.udp_workers.to_string(),
        "udp-rate" => cfg.udp_rate.to_string(),
        "proxy-protocol" => cfg.proxy.is_some().to_string(),
        "proxy-protocol-timeout" => cfg.proxy_timeout.as_secs().to_string(),
        "trusted-proxy" => list(cfg.proxy.iter().flat_map(|t| t.networks())),
        "allow" => list(cfg.rules.networks(true).into_iter()),
        "deny" => list(cfg.rules.networks(false).into_iter()),
        "idle-timeout" => secs(cfg.idle_timeout),
        "max-session" => secs(cfg.max_session),
        "max-bytes" => cfg.max_bytes.to_string(),
        "shutdown-timeout" => cfg.shutdown_timeout.as_secs().to_string(),
        "backlog" => cfg.backlog.to_string(),
        "socket-mode" => quote(&format!("{:04o}", cfg.socket_mode)),
        "user" => return cfg.user.as_deref().map(quote),
        "group" => return cfg.group.as_deref().map(quote),
        "chroot" => return path(&cfg.chroot),
        "pidfile" => return path(&cfg.pidfile),
        "log" => return name(cfg.log.to_possible_value()),
        "syslog-socket" => quote(&cfg.syslog_socket.to_string_lossy()),
        "syslog-facility" => return name(cfg.syslog_facility.to_possible_value()),
        "log-level" => return name(cfg.log_level.to_possible_value()),
        // A key this does not know yet: the unit test names it.
        _ => return None,
    })
}

/// A TOML array of strings, on one line.
fn list(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.map(|s| quote(&s)).collect();
    format!("[{}]", items.join(", "))
}

/// A TOML basic string: quotes, backslashes and control characters
/// escaped, so that any path reads back as itself.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04X}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// What works but is risky: `-t` prints it, and the daemon logs it at
/// start. `workers_as_root`: no `-u`, and the master is root.
pub fn risks(cfg: &Config, workers_as_root: bool) -> Vec<String> {
    let mut out = Vec::new();
    if workers_as_root {
        out.push("workers run as root: use -u to give them an unprivileged user".to_string());
    }
    for a in cfg.listen.iter().filter(|a| a.is_wildcard()) {
        match a {
            ListenAddr::Udp(_) if cfg.udp_rate == 0 => out.push(format!(
                "{a} answers every source at any rate (udp-rate 0 on a wildcard address): \
                 a reflector for forged datagrams; bind a specific address or set --udp-rate"
            )),
            ListenAddr::Metrics(inner) => out.push(format!(
                "metrics on {inner}, every address of the host: anyone who reaches it reads \
                 them; bind 127.0.0.1 or a unix: socket"
            )),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::parse_file;
    use crate::config::{resolve, Options};
    use clap::Parser;

    fn config(args: &[&str]) -> Config {
        let mut all = vec!["echo-forkd", "-f"];
        all.extend_from_slice(args);
        resolve(Options::try_parse_from(all).expect("valid command line")).expect("resolves")
    }

    #[test]
    fn every_key_is_printed_when_every_setting_is_on() {
        let cfg = config(&[
            "--metrics",
            "127.0.0.1:9100",
            "-u",
            "nobody",
            "-g",
            "nogroup",
            "--chroot",
            "/var/empty",
            "-p",
            "/run/e.pid",
            "--log",
            "syslog",
        ]);
        let text = effective(&cfg);
        for key in keys() {
            assert!(
                text.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "-T leaves out {key}:\n{text}"
            );
        }
    }

    #[test]
    fn what_is_printed_reads_back_to_the_same() {
        for args in [
            &[][..],
            &["-m", "event", "-w", "3", "--idle-timeout", "0"],
            &["-m", "event", "--io-engine", "epoll"],
            &[
                "-l",
                "127.0.0.1:7007",
                "-l",
                "udp:[::1]:7",
                "-l",
                "unix:/tmp/a \"b\"\\c",
                "--metrics",
                "unix:/run/m.sock",
                "--allow",
                "10.0.0.0/8",
                "--deny",
                "10.1.0.0/16",
                "--proxy-protocol",
                "--trusted-proxy",
                "::1/128",
                "--socket-mode",
                "0640",
                "--syslog-facility",
                "local3",
            ],
        ] {
            let first = effective(&config(args));
            // Read back as `echo-forkd -f -T -c FILE` would.
            let file = parse_file(&first).expect("-T output parses");
            let cli = Options::try_parse_from(["echo-forkd", "-f"]).expect("-f");
            let again = resolve(cli.over(file)).expect("-T output resolves");
            assert_eq!(effective(&again), first, "{args:?}");
        }
    }

    #[test]
    fn the_engine_in_force_is_a_comment_that_reads_back() {
        let mut cfg = config(&["-m", "event", "--io-engine", "uring"]);
        cfg.engine = Some(crate::engine::InForce {
            engine: crate::engine::Engine::Uring,
            why: "(io-engine uring)".into(),
        });
        let text = effective(&cfg);
        assert!(
            text.contains("io-engine = \"uring\"   # in force: io_uring (io-engine uring)\n"),
            "{text}"
        );
        let file = parse_file(&text).expect("-T output parses");
        assert_eq!(file.io_engine, Some(crate::engine::Choice::Uring));
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote("a\"b\\c\n\u{1}"), "\"a\\\"b\\\\c\\n\\u0001\"");
    }

    #[test]
    fn risks_are_named() {
        let quiet = config(&["-l", "127.0.0.1:7", "-l", "udp:*:7", "--metrics", "unix:/m"]);
        assert!(risks(&quiet, false).is_empty());
        let loud = config(&["-l", "udp:*:7", "--udp-rate", "0", "--metrics", "0.0.0.0:9"]);
        let said = risks(&loud, true);
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[1].contains("udp:*:7") && said[2].contains("0.0.0.0:9"));
    }
}
