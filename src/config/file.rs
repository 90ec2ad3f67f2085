//! The config file: read safely (no FIFO waits, a size ceiling), parsed
//! as TOML whose keys are the long options, and errors that name the line
//! and the key (with "did you mean" for a slip).

use std::path::Path;

use super::{ceiling, Options};

/// Every key a config file may have (the long options that are not
/// command-line only).
pub(super) fn keys() -> Vec<String> {
    use clap::CommandFactory;
    const CLI_ONLY: [&str; 7] = [
        "foreground",
        "config",
        "check",
        "print-config",
        "inetd",
        "help",
        "version",
    ];
    Options::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !CLI_ONLY.contains(l))
        .map(str::to_string)
        .collect()
}

/// `msg`, an error about a setting that `path` gives, with the file and
/// the line it is set on (`config FILE: line N: …`), if it can be read
/// and the line found.
pub fn in_file(path: &Path, msg: String) -> String {
    let Ok((_, text)) = read_file(path) else {
        return msg;
    };
    let located = locate(&text, msg.clone());
    if located == msg {
        return msg;
    }
    format!("config {}: {located}", path.display())
}

/// Prefixes `msg`, an error about a setting, with the line of the file
/// `text` that sets the key it names first (`line 3: …`), if any does.
pub(super) fn locate(text: &str, msg: String) -> String {
    let named = keys()
        .into_iter()
        .filter_map(|k| {
            // A whole word of the message: "max-workers" is not "workers".
            let at = msg.match_indices(k.as_str()).find(|(i, _)| {
                let before = msg[..*i].chars().next_back();
                let after = msg[i + k.len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '-')
                    && !after.is_some_and(|c| c.is_alphanumeric() || c == '-')
            })?;
            let line = text.lines().position(|l| {
                l.trim_start()
                    .strip_prefix(k.as_str())
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })?;
            Some((at.0, line + 1))
        })
        .min();
    match named {
        Some((_, line)) => format!("line {line}: {msg}"),
        None => msg,
    }
}

/// The key of `keys` nearest to `word` (a typing slip away), if one is.
fn nearest(word: &str, keys: &[String]) -> Option<String> {
    keys.iter()
        .map(|k| (edit_distance(word, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k.clone())
}

/// Levenshtein distance, for "did you mean".
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != *cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Parses a config file into [`Options`].
///
/// The file is opened without blocking (a FIFO would otherwise wait for a
/// writer, and the master with it) and must be a regular file of at most
/// [`ceiling::CONFIG_BYTES`].
/// Returns the options and the text they were read from.
pub fn read_file(path: &Path) -> Result<(Options, String), String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let shown = path.display();
    let fail = |e: std::io::Error| {
        format!(
            "cannot read config {shown}: {}",
            crate::logging::error_text(&e)
        )
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)
        .map_err(fail)?;
    let meta = file.metadata().map_err(fail)?;
    if !meta.is_file() {
        return Err(format!("config {shown}: not a regular file"));
    }
    if meta.len() > ceiling::CONFIG_BYTES {
        return Err(format!(
            "config {shown}: {} bytes, more than the {} a config file may have",
            meta.len(),
            ceiling::CONFIG_BYTES
        ));
    }
    let mut text = String::new();
    // The size was checked, but the file may grow while we read it.
    file.take(ceiling::CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(fail)?;
    if text.len() as u64 > ceiling::CONFIG_BYTES {
        return Err(format!(
            "config {shown}: it grew past {} bytes while being read",
            ceiling::CONFIG_BYTES
        ));
    }
    let options = parse_file(&text).map_err(|e| format!("config {shown}: {e}"))?;
    Ok((options, text))
}

/// Parses the text of a config file; errors say the line and the key.
pub(super) fn parse_file(text: &str) -> Result<Options, String> {
    toml::from_str::<Options>(text).map_err(|e| {
        let mut what = e.message().trim_end().replace('\n', " ");
        // serde lists every key; one near the slip says more.
        if let Some(word) = what
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            what = match nearest(word, &keys()) {
                Some(k) => format!("unknown key `{word}`; did you mean `{k}`?"),
                None => format!("unknown key `{word}` (the keys are the long options of --help)"),
            };
        }
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                if what == "duplicate key" {
                    // Name it: the span is the key as written.
                    let key = text.get(span.clone()).unwrap_or_default().trim();
                    what = format!("`{key}` is set twice; keep one");
                }
                format!("line {line}: {what}")
            }
            None => what,
        }
    })
}
