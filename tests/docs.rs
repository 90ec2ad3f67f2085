//! The documentation names the options the binary has: `--help` is the
//! truth, and the man page and the README follow it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::util::BIN;

/// Options that exist on the command line only, not as config file keys.
const CLI_ONLY: [&str; 6] = [
    "--foreground",
    "--config",
    "--check",
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
