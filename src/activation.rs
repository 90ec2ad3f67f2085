//! Socket activation's blind spot: under a socket unit the service
//! manager's sockets replace the configured echo addresses (DESIGN.md,
//! systemd), so a configured listener the socket unit does not pass (a
//! `udp:` one beside the packaged `ListenStream=7`, say) is served by
//! nobody, silently. This names each one and the directive that fixes it:
//! at start from the sockets passed, and for `-t` from what the packaged
//! socket unit listens on, when it is enabled or active.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};

use crate::listen::ListenAddr;

/// The packaged socket unit, the one `-t` asks systemd about.
pub const SOCKET_UNIT: &str = "echo-forkd.socket";

/// A warning for each configured echo listener (not `--metrics`, which is
/// always ours) that none of the `passed` sockets covers (each named as
/// the log names a listener: `[::]:7`, `udp:[::]:7`, `unix:/PATH`).
pub fn uncovered(configured: &[ListenAddr], passed: &[String]) -> Vec<String> {
    let passed: Vec<ListenAddr> = passed.iter().filter_map(|p| p.parse().ok()).collect();
    let shown = passed
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    configured
        .iter()
        .filter(|a| !matches!(a, ListenAddr::Metrics(_)))
        .filter(|a| !passed.iter().any(|p| covers(p, a)))
        .map(|a| {
            format!(
                "socket activation: {a} is configured but not among the sockets the service \
                 manager passes ({shown}), so nothing answers on it; add {} to the socket unit \
                 (systemctl edit {SOCKET_UNIT}), or use the service without the socket unit",
                directive(a)
            )
        })
        .collect()
}

/// Whether the passed socket `p` serves what `a` configures: the same
/// kind (TCP, UDP, unix), the same port (any, for port 0), and an address
/// at least as wide (a wildcard covers every address; an address only
/// itself; IPv4's and IPv6's wildcards are alike, `[::]` being dual-stack).
fn covers(p: &ListenAddr, a: &ListenAddr) -> bool {
    match (p, a) {
        (ListenAddr::Unix(x), ListenAddr::Unix(y)) => x == y,
        (ListenAddr::Udp(x), ListenAddr::Udp(y)) => covers(x, y),
        (ListenAddr::Tcp(_) | ListenAddr::Any(_), ListenAddr::Tcp(_) | ListenAddr::Any(_)) => {
            let (pip, pport) = ip_port(p);
            let (aip, aport) = ip_port(a);
            let port = aport == 0 || pport == aport;
            let wide = match (pip, aip) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(x), Some(y)) => x == y,
            };
            port && wide
        }
        _ => false,
    }
}

/// A TCP or UDP address's IP (`None`: every address) and port.
fn ip_port(a: &ListenAddr) -> (Option<IpAddr>, u16) {
    match a {
        ListenAddr::Any(port) => (None, *port),
        ListenAddr::Tcp(s) if s.ip().is_unspecified() => (None, s.port()),
        ListenAddr::Tcp(s) => (Some(s.ip()), s.port()),
        _ => (None, 0),
    }
}

/// The socket unit's line that would pass `a`.
fn directive(a: &ListenAddr) -> String {
    let at = |inner: &ListenAddr| match ip_port(inner) {
        (None, port) => port.to_string(),
        (Some(ip), port) => SocketAddr::new(ip, port).to_string(),
    };
    match a {
        ListenAddr::Udp(inner) => format!("ListenDatagram={}", at(inner)),
        ListenAddr::Unix(path) => format!("ListenStream={}", path.display()),
        other => format!("ListenStream={}", at(other)),
    }
}

/// For `-t`: the sockets the packaged socket unit passes, named as the log
/// names listeners, if systemd runs this host and the unit is enabled or
/// active (`None` otherwise: nothing to compare with).
pub fn socket_unit_passes() -> Option<Vec<String>> {
    if !std::path::Path::new("/run/systemd/system").exists() {
        return None;
    }
    let out = Command::new("systemctl")
        .args([
            "show",
            "-p",
            "UnitFileState",
            "-p",
            "ActiveState",
            "-p",
            "Listen",
        ])
        .arg(SOCKET_UNIT)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    parse_show(&String::from_utf8_lossy(&out.stdout))
}

/// `systemctl show`'s answer: the `Listen=` lines (`[::]:7 (Stream)`,
/// `[::]:7 (Datagram)`, `/run/echo.sock (Stream)`) if the unit is in use.
fn parse_show(text: &str) -> Option<Vec<String>> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or("")
    };
    let in_use = field("UnitFileState") == "enabled"
        || matches!(field("ActiveState"), "active" | "activating");
    if !in_use {
        return None;
    }
    let listens = text
        .lines()
        .filter_map(|l| l.strip_prefix("Listen="))
        .filter_map(|l| {
            let (addr, kind) = l.rsplit_once(' ')?;
            let addr = normalise(addr);
            match kind {
                "(Stream)" if addr.starts_with('/') => Some(format!("unix:{addr}")),
                "(Stream)" => Some(addr),
                "(Datagram)" => Some(format!("udp:{addr}")),
                _ => None,
            }
        })
        .collect();
    Some(listens)
}

/// systemd writes a port alone as `[::]:7` already; an IPv6 address
/// without brackets gets them.
fn normalise(addr: &str) -> String {
    match addr.rsplit_once(':') {
        Some((host, port)) if host.parse::<Ipv6Addr>().is_ok() => format!("[{host}]:{port}"),
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<ListenAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_udp_listener_the_socket_unit_does_not_pass_is_named_with_its_fix() {
        let cfg = addrs(&["[::]:7", "udp:[::]:7", "metrics:127.0.0.1:9100"]);
        let said = uncovered(&cfg, &names(&["[::]:7"]));
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("udp:[::]:7 is configured"), "{}", said[0]);
        assert!(
            said[0].contains("add ListenDatagram=7 to the socket unit"),
            "{}",
            said[0]
        );
        assert!(said[0].contains("passes ([::]:7)"), "{}", said[0]);
        assert!(uncovered(&cfg, &names(&["[::]:7", "udp:[::]:7"])).is_empty());
    }

    #[test]
    fn coverage_is_by_kind_port_and_width() {
        let cases = [
            ("[::]:7", "*:7", true),
            ("0.0.0.0:7", "[::]:7", true),
            ("[::]:7", "127.0.0.1:7", true),
            ("127.0.0.1:7", "[::]:7", false),
            ("127.0.0.1:7", "127.0.0.2:7", false),
            ("[::]:7", "[::]:8", false),
            ("[::]:7", "udp:[::]:7", false),
            ("udp:[::]:7", "[::]:7", false),
            ("udp:0.0.0.0:7", "udp:127.0.0.1:7", true),
            ("[::]:4000", "127.0.0.1:0", true),
            ("unix:/run/e.sock", "unix:/run/e.sock", true),
            ("unix:/run/e.sock", "unix:/run/f.sock", false),
        ];
        for (p, a, want) in cases {
            let (p, a) = (p.parse().unwrap(), a.parse().unwrap());
            assert_eq!(covers(&p, &a), want, "{p} covers {a}");
        }
    }

    #[test]
    fn the_directive_says_what_the_socket_unit_needs() {
        for (a, want) in [
            ("udp:*:7", "ListenDatagram=7"),
            ("udp:127.0.0.1:7", "ListenDatagram=127.0.0.1:7"),
            ("udp:[::1]:7", "ListenDatagram=[::1]:7"),
            ("[::]:7", "ListenStream=7"),
            ("10.0.0.1:7", "ListenStream=10.0.0.1:7"),
            ("unix:/run/e.sock", "ListenStream=/run/e.sock"),
        ] {
            assert_eq!(directive(&a.parse().unwrap()), want, "{a}");
        }
    }

    #[test]
    fn systemctl_show_is_read_only_for_a_unit_in_use() {
        let enabled = "UnitFileState=enabled\nActiveState=inactive\nListen=[::]:7 (Stream)\nListen=[::]:7 (Datagram)\nListen=/run/e.sock (Stream)\n";
        assert_eq!(
            parse_show(enabled),
            Some(names(&["[::]:7", "udp:[::]:7", "unix:/run/e.sock"]))
        );
        let unused = "UnitFileState=disabled\nActiveState=inactive\nListen=[::]:7 (Stream)\n";
        assert_eq!(parse_show(unused), None);
        let missing = "UnitFileState=\nActiveState=inactive\n";
        assert_eq!(parse_show(missing), None);
        assert_eq!(
            parse_show("UnitFileState=static\nActiveState=active\nListen=127.0.0.1:7 (Stream)\n"),
            Some(names(&["127.0.0.1:7"]))
        );
    }
}
