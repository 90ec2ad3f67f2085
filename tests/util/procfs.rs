//! Processes as /proc shows them: every pid, a process's state, parent,
//! stat fields, context switches and command line.

/// Every pid in /proc right now.
pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `(pid, state)` of every process whose parent is `ppid`.
pub fn proc_children(ppid: i32) -> Vec<(i32, char)> {
    all_pids()
        .into_iter()
        .filter_map(|pid| match proc_stat(pid) {
            Some((state, parent)) if parent == ppid => Some((pid, state)),
            _ => None,
        })
        .collect()
}

/// `(state, ppid)` of a process, `None` if it is gone.
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Voluntary context switches of a process so far.
pub fn voluntary_switches(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether a process is gone (or only a zombie waiting to be reaped).
pub fn is_dead(pid: i32) -> bool {
    !matches!(proc_stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// Live processes whose command line contains `needle` (a test's unique
/// temporary path, say).
pub fn processes_with_arg(needle: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains(needle))
                && !is_dead(pid)
        })
        .collect()
}

/// Fields of /proc/PID/stat after the command name, 0-based from the state
/// (so index 3 is the session id, 4 the controlling tty).
pub fn stat_fields(pid: i32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(i) = stat.rfind(')') else {
        return Vec::new();
    };
    stat[i + 2..]
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
