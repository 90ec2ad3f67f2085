//! The documentation names the options the binary has: `--help` is the
//! truth, and the man page and the README follow it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::util::{skipped, BIN};

/// Options that exist on the command line only, not as config file keys.
const CLI_ONLY: [&str; 7] = [
    "--foreground",
    "--config",
    "--check",
    "--print-config",
    "--inetd",
    "--help",
    "--version",
];

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn help() -> String {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "--help exited {}", out.status);
    String::from_utf8(out.stdout).expect("--help is UTF-8")
}

fn is_long(word: &str) -> bool {
    word.len() > 2
        && word.starts_with("--")
        && word[2..].starts_with(|c: char| c.is_ascii_lowercase())
        && word[2..]
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The long options `--help` lists: the `--name` on each option's line.
fn help_options(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',']))
        .filter(|w| is_long(w))
        .map(str::to_string)
        .collect()
}

/// The long options an mdoc page names: every argument of an `Fl` macro
/// that starts with a dash (`Fl -max-workers` renders `--max-workers`).
fn man_options(man: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in man.lines().filter(|l| !l.starts_with(".\\\"")) {
        let mut in_fl = false;
        for word in line.trim_start_matches('.').split_whitespace() {
            if word == "Fl" {
                in_fl = true;
            } else if in_fl && word.starts_with('-') {
                let long = format!("-{word}");
                if is_long(&long) {
                    found.insert(long);
                }
            } else if in_fl && !word.starts_with(|c: char| c.is_ascii_lowercase()) {
                // A macro or punctuation ends the flag list; `Fl ft` is short.
                in_fl = false;
            }
        }
    }
    found
}

/// The long options that have their own entry (`.It Fl ...`) in the
/// OPTIONS section: being named in passing elsewhere is not documentation.
fn man_option_entries(man: &str) -> BTreeSet<String> {
    let start = man
        .find("\n.Sh OPTIONS\n")
        .expect("the man page has OPTIONS");
    let section = &man[start + 1..];
    let end = section[1..].find("\n.Sh ").map_or(section.len(), |i| i + 1);
    let items: String = section[..end]
        .lines()
        .filter(|l| l.starts_with(".It Fl "))
        .map(|l| format!("{l}\n"))
        .collect();
    man_options(&items)
}

/// The keys the man page lists as "The full list of keys": the `Cm`
/// arguments up to the end of that sentence.
fn man_config_keys(man: &str) -> BTreeSet<String> {
    let start = man
        .find("The full list of keys:")
        .expect("the man page has \"The full list of keys:\"");
    let mut keys = BTreeSet::new();
    for line in man[start..].lines().skip(1) {
        if !line.starts_with(".Cm ") {
            if line == "and" {
                continue;
            }
            break;
        }
        for word in line[4..].split_whitespace() {
            let word = word.trim_end_matches([',', '.']);
            if !word.is_empty() {
                keys.insert(format!("--{word}"));
            }
        }
    }
    keys
}

fn words_like_options(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| is_long(w))
        .map(str::to_string)
        .collect()
}

fn missing(want: &BTreeSet<String>, have: &BTreeSet<String>) -> Vec<String> {
    want.difference(have).cloned().collect()
}

#[test]
fn help_has_options_and_a_one_line_description() {
    let help = help();
    let first = help.lines().next().unwrap_or_default();
    assert!(first.contains("RFC 862"), "first line of --help: {first:?}");
    let opts = help_options(&help);
    // A floor, so that a parser that finds nothing cannot pass the tests below.
    assert!(
        opts.len() >= 30,
        "only {} options found: {opts:?}",
        opts.len()
    );
    assert!(opts.contains("--max-workers") && opts.contains("--version"));
}

#[test]
fn man_page_documents_exactly_the_options_of_help() {
    let help = help_options(&help());
    let page = read("man/echo-forkd.8");
    let entries = man_option_entries(&page);
    let absent = missing(&help, &entries);
    assert!(
        absent.is_empty(),
        "in --help, without an entry in the man page's OPTIONS: {absent:?}"
    );
    let unknown = missing(&man_options(&page), &help);
    assert!(
        unknown.is_empty(),
        "in the man page, not in --help: {unknown:?}"
    );
}

#[test]
fn man_page_lists_every_config_key() {
    let help = help_options(&help());
    let keys: BTreeSet<String> = help
        .into_iter()
        .filter(|o| !CLI_ONLY.contains(&o.as_str()))
        .collect();
    let listed = man_config_keys(&read("man/echo-forkd.8"));
    assert_eq!(listed, keys, "the man page's list of config keys");
}

#[test]
fn readme_names_every_option_of_help() {
    let help = help_options(&help());
    let readme = words_like_options(&read("README.md"));
    let absent = missing(&help, &readme);
    assert!(absent.is_empty(), "in --help, not in README.md: {absent:?}");
}

#[test]
fn packaged_config_uses_only_known_keys() {
    // `-t` parses the file with the daemon's own rules (unknown keys are
    // errors); the packaged user may not exist here, so name root instead.
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/echo-forkd.conf");
    let out = Command::new(BIN)
        .args(["-t", "-u", "root", "-g", "root", "-c"])
        .arg(&conf)
        .output()
        .expect("run -t");
    assert!(
        out.status.success(),
        "{}: {}",
        conf.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn man_page_parser_sees_flags_in_all_their_forms() {
    let page = ".It Fl f , Fl -foreground\n.Op Fl ft\n.Fl -log Cm stderr\nsee\n.Fl -max-workers ,\n.\\\" .Fl -commented\n";
    let found: Vec<String> = man_options(page).into_iter().collect();
    assert_eq!(found, ["--foreground", "--log", "--max-workers"]);
}

/// The commands of the man page's EXAMPLES (after `# `) and of the
/// README's `sh` blocks, continuation lines joined, comments dropped: (where
/// it is written, the command).
fn documented_commands() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let man = read("man/echo-forkd.8");
    let examples = man
        .split(".Sh EXAMPLES")
        .nth(1)
        .and_then(|s| s.split("\n.Sh ").next())
        .unwrap_or_default();
    let mut pending = String::new();
    for line in examples.lines() {
        let line = line.strip_prefix(".Dl ").unwrap_or(line);
        let text = if pending.is_empty() {
            match line.strip_prefix("# ") {
                Some(t) => t,
                None => continue,
            }
        } else {
            line.trim_start()
        };
        match text.strip_suffix("\\e") {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(text);
                out.push(("man page".to_string(), std::mem::take(&mut pending)));
            }
        }
    }
    let readme = read("README.md");
    for block in readme.split("```sh\n").skip(1) {
        let block = block.split("```").next().unwrap_or_default();
        let mut pending = String::new();
        for line in block.lines() {
            let line = line.split("  #").next().unwrap_or(line).trim_end();
            match line.strip_suffix('\\') {
                Some(head) => pending.push_str(head),
                None => {
                    pending.push_str(line);
                    let cmd = std::mem::take(&mut pending).trim().to_string();
                    if !cmd.is_empty() {
                        out.push(("README".to_string(), cmd));
                    }
                }
            }
        }
    }
    out
}

/// The words of a command line: split at blanks, quotes removed.
fn words(cmd: &str) -> Vec<String> {
    cmd.split_whitespace()
        .map(|w| w.trim_matches(|c| c == '\'' || c == '"').to_string())
        .collect()
}

/// Every documented command that runs echo-forkd is run as written on this
/// machine, with what must differ here substituted: a free port for the
/// one written, a scratch pidfile, `nobody` for the `echo-forkd` user and
/// an empty directory for the chroot where the package is not installed.
/// A daemon it starts must echo, then is stopped. Commands that need root
/// are skipped, saying so, without it. The other commands run in CI, as
/// written: the systemctl lines under a real systemd (`.ci/systemd-check`),
/// the README's package install (`.ci/package-check`) and its install from
/// source (`.ci/source-install-check`).
#[test]
fn documented_commands_run_as_written() {
    use crate::util::{echo_all, Daemon, TempDir};
    let root = nix::unistd::geteuid().is_root();
    let dir = TempDir::new("examples");
    let pidfile = dir.path("echo-forkd.pid");
    let jail = dir.path("jail");
    std::fs::create_dir(&jail).unwrap();
    let user = if nix::unistd::User::from_name("echo-forkd")
        .ok()
        .flatten()
        .is_some()
    {
        "echo-forkd"
    } else {
        "nobody"
    };
    // The packaged config, with its user where the package is missing.
    let conf = dir.path("echo-forkd.conf");
    let packaged =
        read("packaging/echo-forkd.conf").replace("\"echo-forkd\"", &format!("\"{user}\""));
    let group = if user == "nobody" {
        "nogroup"
    } else {
        "echo-forkd"
    };
    std::fs::write(
        &conf,
        packaged.replacen(
            &format!("group = \"{user}\""),
            &format!("group = \"{group}\""),
            1,
        ),
    )
    .unwrap();
    let mut ran = 0;
    for (place, cmd) in documented_commands() {
        let steps: Vec<&str> = cmd.split("&&").map(str::trim).collect();
        let Some(first) = steps.first() else { continue };
        let mut w = words(first);
        if w.first().map(String::as_str) == Some("cargo") && w.iter().any(|x| x == "--") {
            // `cargo run --release -- ARGS`: the built binary with ARGS.
            let at = w.iter().position(|x| x == "--").unwrap_or(0);
            w = std::iter::once("echo-forkd".to_string())
                .chain(w[at + 1..].iter().cloned())
                .collect();
        }
        if w.first().map(String::as_str) != Some("echo-forkd") {
            continue;
        }
        let needs_root = w.iter().any(|x| x == "-u" || x == "--chroot");
        if needs_root && !root {
            skipped(format_args!("needs root: {cmd}"));
            continue;
        }
        let port = crate::util::free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut args: Vec<String> = Vec::new();
        let mut has_listen = false;
        let mut it = w[1..].iter();
        while let Some(a) = it.next() {
            let value =
                |it: &mut std::slice::Iter<'_, String>| it.next().cloned().unwrap_or_default();
            match a.as_str() {
                "-l" | "--listen" => {
                    value(&mut it);
                    args.extend(["-l".to_string(), listen.clone()]);
                    has_listen = true;
                }
                "-p" | "--pidfile" => {
                    value(&mut it);
                    args.extend(["-p".to_string(), pidfile.display().to_string()]);
                }
                "-u" | "--user" => {
                    value(&mut it);
                    args.extend(["-u".to_string(), user.to_string()]);
                }
                "--chroot" => {
                    let written = value(&mut it);
                    let there = Path::new(&written).is_dir();
                    let d = if there {
                        written
                    } else {
                        jail.display().to_string()
                    };
                    args.extend(["--chroot".to_string(), d]);
                }
                "-c" | "--config" => {
                    value(&mut it);
                    args.extend(["-c".to_string(), conf.display().to_string()]);
                }
                _ => args.push(a.clone()),
            }
        }
        let check = args.iter().any(|a| a == "-t");
        if !has_listen && !check {
            // The default [::]:7 is written as such; here, a free port.
            args.extend(["-l".to_string(), listen.clone()]);
        }
        let addr: std::net::SocketAddr = listen.parse().unwrap();
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        println!("{place}: {cmd}\n  runs as: echo-forkd {}", args.join(" "));
        ran += 1;
        if check {
            // Checked and, if it says so, HUP sent to a daemon running with
            // the written pidfile.
            let (code, err) = crate::util::launch(&refs);
            assert_eq!(code, 0, "{place}: {cmd}: {err}");
            if steps.len() > 1 {
                let d = crate::util::Detached::start(
                    &[
                        "-l",
                        &listen,
                        "-p",
                        pidfile.to_str().unwrap(),
                        "--log",
                        "syslog",
                        "--syslog-socket",
                        "/nonexistent",
                    ],
                    &pidfile,
                )
                .unwrap_or_else(|e| panic!("{place}: {cmd}: {e:?}"));
                let hup = format!("kill -HUP \"$(cat {})\"", pidfile.display());
                assert!(steps[1].starts_with("kill -HUP"), "{place}: {cmd}");
                let ok = Command::new("sh").args(["-c", &hup]).status().unwrap();
                assert!(ok.success(), "{place}: {hup}");
                assert_eq!(echo_all(addr, b"after HUP"), b"after HUP", "{place}: {cmd}");
                drop(d);
            }
            continue;
        }
        if args.iter().any(|a| a == "-f") {
            let d = Daemon::start(
                &refs[..]
                    .iter()
                    .filter(|a| **a != "-f")
                    .copied()
                    .collect::<Vec<_>>(),
            );
            assert_eq!(echo_all(addr, b"example"), b"example", "{place}: {cmd}");
            drop(d);
        } else {
            let mut all = refs.clone();
            if !args.iter().any(|a| a == "-p") {
                all.extend(["-p", pidfile.to_str().unwrap()]);
            }
            let d = crate::util::Detached::start(&all, &pidfile)
                .unwrap_or_else(|e| panic!("{place}: {cmd}: {e:?}"));
            assert_eq!(echo_all(addr, b"example"), b"example", "{place}: {cmd}");
            drop(d);
            let _ = std::fs::remove_file(&pidfile);
        }
    }
    assert!(ran >= 3, "only {ran} documented commands found");
}

/// The man page's `/etc/inetd.conf` line, under OpenBSD's inetd (Debian's
/// openbsd-inetd, installed by CI): only the service (a free port on
/// loopback), the user where the package is not installed, and the
/// program's path differ. Two clients at once each get their own process.
#[test]
fn the_man_pages_inetd_line_serves_under_a_real_inetd() {
    use crate::util::{wait_until, DEADLINE};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    let inetd = "/usr/sbin/inetd";
    if !Path::new(inetd).exists() {
        skipped(format_args!("no inetd here (Debian package openbsd-inetd)"));
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        skipped(format_args!(
            "inetd runs a service as another user only as root"
        ));
        return;
    }
    let man = read("man/echo-forkd.8");
    let line = man
        .split(".Pa /etc/inetd.conf :\n.Bd -literal -offset indent\n")
        .nth(1)
        .and_then(|s| s.lines().next())
        .expect("the man page's EXAMPLES has an inetd.conf line");
    let mut fields: Vec<String> = line.split_whitespace().map(String::from).collect();
    assert!(fields.len() >= 7, "inetd.conf has 7 fields: {line}");
    assert_eq!(fields[1..4], ["stream", "tcp", "nowait"], "{line}");
    assert_eq!(fields[5], "/usr/sbin/echo-forkd", "{line}");
    let user = if nix::unistd::User::from_name(&fields[4])
        .ok()
        .flatten()
        .is_some()
    {
        fields[4].clone()
    } else {
        "nobody".to_string()
    };
    let port = crate::util::free_port();
    fields[0] = format!("127.0.0.1:{port}");
    fields[4] = user.clone();
    fields[5] = BIN.to_string();
    let dir = crate::util::TempDir::new("inetd");
    let conf = dir.path("inetd.conf");
    std::fs::write(&conf, fields.join(" ") + "\n").unwrap();
    // It writes /run/inetd.pid even so: what was there is put back (or
    // the file removed) once it is gone, so a real inetd's stays right.
    let _pidfile = PutBack::new("/run/inetd.pid");
    // -d keeps it in the foreground; its chatter goes nowhere.
    let inetd = crate::util::Killed(
        Command::new(inetd)
            .args(["-d", "-i"])
            .arg(&conf)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut a = None;
    assert!(
        wait_until(DEADLINE, || {
            a = TcpStream::connect(addr).ok();
            a.is_some()
        }),
        "inetd did not listen on {addr}"
    );
    let mut a = a.unwrap();
    let mut b = TcpStream::connect(addr).unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
    }
    // b is served while a is still open: a process each.
    for (s, msg) in [(&mut b, &b"second"[..]), (&mut a, &b"first"[..])] {
        s.write_all(msg).unwrap();
        let mut got = vec![0; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg, "{line}");
    }
    let served_as: Vec<String> = crate::util::proc_children(inetd.0.id() as i32)
        .into_iter()
        .filter_map(|(p, _)| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .collect();
    let uid = nix::unistd::User::from_name(&user)
        .unwrap()
        .unwrap()
        .uid
        .to_string();
    assert!(
        served_as.iter().filter(|u| **u == uid).count() >= 2,
        "two echo-forkd processes as {user} ({uid}) under inetd: {served_as:?}"
    );
}

/// The man page's sample startup errors (DIAGNOSTICS) are what the binary
/// says, word for word, with only the pid, the path and the line breaks of
/// the page differing.
#[test]
fn the_man_pages_sample_errors_are_the_binarys() {
    use crate::util::{launch, Detached, TempDir};
    use std::os::unix::process::CommandExt;
    let man = read("man/echo-forkd.8");
    let block = man
        .split("Startup errors name the thing and the cause, for example:\n.Bd -literal -offset indent\n")
        .nth(1)
        .and_then(|s| s.split("\n.Ed").next())
        .expect("DIAGNOSTICS has sample errors");
    let samples: Vec<String> = block
        .replace("\n  ", " ")
        .replace("\\(ga", "`")
        .lines()
        .map(String::from)
        .collect();
    let find = |start: &str| {
        samples
            .iter()
            .find(|s| s.starts_with(start))
            .unwrap_or_else(|| panic!("no sample starting {start:?}: {samples:?}"))
            .clone()
    };
    // The error is the last line; a warning about syslog may come first.
    let said = |err: &str| {
        err.lines()
            .last()
            .unwrap_or_default()
            .trim_start_matches("echo-forkd: ")
            .to_string()
    };

    // A config with the sample's mistake on its line 3.
    let dir = TempDir::new("samples");
    let conf = dir.path("echo-forkd.conf");
    std::fs::write(&conf, "mode = \"fork\"\n\nmax-chidlren = 100\n").unwrap();
    let (code, err) = launch(&["-t", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        said(&err),
        find("config ").replace("/etc/echo-forkd/echo-forkd.conf", conf.to_str().unwrap())
    );

    // A second start on the pidfile of a running daemon.
    let pidfile = dir.path("echo-forkd.pid");
    let p = pidfile.to_str().unwrap();
    let args = ["-l", "127.0.0.1:0", "-w", "1", "--min-spare", "0", "-p", p];
    let first = Detached::start(&args, &pidfile).unwrap();
    let (code, err) = launch(&args);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        said(&err),
        find("already running")
            .replace("pid 812", &format!("pid {}", first.pid))
            .replace("/run/echo-forkd/echo-forkd.pid", p)
    );
    drop(first);

    // Port 7 without the privilege to bind it.
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(1024);
    if start <= 7 {
        skipped(format_args!(
            "skipped the bind sample: ports from {start} need no privilege here"
        ));
        return;
    }
    let mut cmd = Command::new("timeout");
    cmd.args(["10", BIN, "-f", "-l", "0.0.0.0:7"]);
    if nix::unistd::geteuid().is_root() {
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        said(&String::from_utf8_lossy(&out.stderr)),
        find("cannot bind")
    );
}

/// The process models `-m` takes, as `--help` lists its possible values.
fn modes() -> Vec<String> {
    let help = help();
    let section = help
        .split("--mode <MODE>")
        .nth(1)
        .and_then(|s| s.split("Possible values:").nth(1))
        .unwrap_or_default();
    section
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .map_while(|l| l.trim().strip_prefix("- "))
        .filter_map(|l| l.split(':').next())
        .map(str::to_string)
        .collect()
}

/// The signals the master handles (src/signals.rs's `HANDLED`), as the
/// docs name them: `TERM`, not `SIGTERM`.
fn signals() -> Vec<String> {
    let src = read("src/signals.rs");
    let list = src
        .split("pub const HANDLED")
        .nth(1)
        .and_then(|s| s.split("];").next())
        .unwrap_or_default();
    list.split("Signal::SIG")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_alphanumeric()).next())
        .map(str::to_string)
        .collect()
}

/// How prose names each model. A new mode fails here until the docs
/// (and this table) say how it is called.
fn in_prose(mode: &str) -> &'static str {
    match mode {
        "prefork" => "pre-forked",
        "fork" => "per connection",
        "event" => "event-driven",
        other => panic!("mode {other}: say in tests/docs.rs how the docs name it in prose"),
    }
}

/// `text` from the line containing `start` to the next line containing
/// `end` (or its end).
fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let Some(at) = text.find(start) else {
        return "";
    };
    let rest = &text[at..];
    let stop = rest[start.len()..]
        .find(end)
        .map_or(rest.len(), |i| i + start.len());
    &rest[..stop]
}

fn has_word(text: &str, word: &str) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric() && c != '-')
        .any(|w| w == word)
}

#[test]
fn every_mode_is_named_wherever_the_models_are() {
    let modes = modes();
    assert_eq!(modes.len(), 3, "the modes of --help: {modes:?}");
    let man = read("man/echo-forkd.8");
    let readme = read("README.md");
    let cargo = read("Cargo.toml");
    let conf = read("packaging/echo-forkd.conf");
    let places: [(&str, &str, bool); 7] = [
        ("the man page's NAME", between(&man, ".Nd ", "\n"), false),
        (
            "the man page's SYNOPSIS",
            between(&man, ".Op Fl m ", "\n"),
            true,
        ),
        (
            "the man page's DESCRIPTION",
            between(&man, ".Sh DESCRIPTION", ".Sh OPTIONS"),
            true,
        ),
        (
            "Cargo.toml's description",
            between(&cargo, "description = ", "\n"),
            false,
        ),
        (
            "the README's introduction",
            between(&readme, "echo-forkd is", "\n\n"),
            false,
        ),
        (
            "the README's models section",
            between(&readme, "## Process models", "\n## "),
            true,
        ),
        (
            "the packaged config's mode",
            between(&conf, "# Process model", "#mode"),
            true,
        ),
    ];
    for mode in &modes {
        for (place, text, literal) in &places {
            let named = if *literal {
                has_word(text, mode)
            } else {
                // Prose wraps: one space for any run of white space.
                let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
                flat.contains(in_prose(mode))
            };
            assert!(named, "{place} leaves out mode {mode}: {text:?}");
        }
    }
}

#[test]
fn every_signal_is_named_wherever_the_signals_are() {
    let signals = signals();
    assert!(signals.len() >= 9, "the handled signals: {signals:?}");
    let man = read("man/echo-forkd.8");
    let readme = read("README.md");
    let help = help();
    let man_signals = between(&man, ".Sh SIGNALS", ".Sh ENVIRONMENT");
    let readme_signals = between(&readme, "## Signals", "### Reload");
    let help_signals = between(&help, "Signals to the master", "See echo-forkd(8)");
    for sig in &signals {
        assert!(
            has_word(man_signals, sig),
            "the man page's SIGNALS leaves out {sig}"
        );
        assert!(
            has_word(readme_signals, sig),
            "the README's Signals leaves out {sig}"
        );
        // Reaping children is not something an operator sends.
        if sig != "CHLD" {
            assert!(
                has_word(help_signals, sig),
                "--help leaves out {sig}: {help_signals:?}"
            );
        }
    }
}

/// The README's HAProxy configuration, as written, passes `haproxy -c`
/// without a warning (no missing timeout, a health check on each server).
#[test]
fn the_readmes_haproxy_configuration_passes_haproxy_c() {
    let Some(bin) = ["/usr/sbin/haproxy", "haproxy"].into_iter().find(|b| {
        Command::new(b)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        skipped(format_args!("no haproxy here (Debian package haproxy)"));
        return;
    };
    let readme = read("README.md");
    let block = readme
        .split("```haproxy\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```haproxy block in the README");
    assert!(block.contains("send-proxy-v2 check"), "{block}");
    let dir = crate::util::TempDir::new("haproxy-readme");
    let conf = dir.path("haproxy.cfg");
    std::fs::write(&conf, block).unwrap();
    let out = Command::new(bin)
        .arg("-c")
        .arg("-f")
        .arg(&conf)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "haproxy -c: {said}");
    assert!(!said.contains("WARNING"), "haproxy -c warns: {said}");
}

/// The quick start's one-line `nc -N` round trip, as written, against the
/// quick start's server on a free port (netcat-openbsd, which CI installs).
#[test]
fn the_quick_starts_nc_line_prints_the_echo_and_ends() {
    let written = "printf 'x\\n' | nc -N 127.0.0.1 7007";
    let readme = read("README.md");
    assert!(
        readme.contains(&format!("`{written}`")),
        "the README no longer says `{written}`"
    );
    if Command::new("nc").arg("-h").output().is_err() {
        skipped(format_args!("no nc here (Debian package netcat-openbsd)"));
        return;
    }
    let d = crate::util::Daemon::start(&["-l", "127.0.0.1:0"]);
    let line = written.replace("7007", &d.addr().port().to_string());
    let out = Command::new("timeout")
        .args(["10", "sh", "-c", &line])
        .output()
        .unwrap();
    assert!(out.status.success(), "{line}: {out:?}");
    assert_eq!(out.stdout, b"x\n", "{line}");
}

/// A file as it was when made, restored when dropped: removed if it did
/// not exist.
struct PutBack {
    path: &'static str,
    was: Option<Vec<u8>>,
}

impl PutBack {
    fn new(path: &'static str) -> PutBack {
        PutBack {
            path,
            was: std::fs::read(path).ok(),
        }
    }
}

impl Drop for PutBack {
    fn drop(&mut self) {
        let _ = match &self.was {
            Some(b) => std::fs::write(self.path, b),
            None => std::fs::remove_file(self.path),
        };
    }
}

/// The example alert rules the README points to load in Prometheus
/// (`promtool check rules`, from Debian's prometheus, which CI installs),
/// and name only metrics the daemon exports.
#[test]
fn the_example_alert_rules_pass_promtool() {
    let rules = read("contrib/prometheus-alerts.yml");
    let exported = read("src/metrics.rs");
    for name in rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("echo_forkd_"))
    {
        let family = name.strip_prefix("echo_forkd_").unwrap_or(name);
        assert!(
            exported.contains(&format!("\"{family}\"")),
            "the rules use {name}, which the daemon does not export"
        );
    }
    let readme = read("README.md");
    assert!(
        readme.contains("contrib/prometheus-alerts.yml"),
        "the README does not point to the rules"
    );
    let Ok(out) = Command::new("promtool")
        .args(["check", "rules"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/prometheus-alerts.yml"))
        .output()
    else {
        skipped(format_args!("no promtool here (Debian package prometheus)"));
        return;
    };
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
