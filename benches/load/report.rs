//! The tables: medians of the rounds, ratios within a round, the machine.

use super::*;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A latency, or a dash where the scenario has none.
pub(crate) fn micros(us: f64) -> String {
    if us.is_nan() || us == 0.0 {
        "–".into()
    } else {
        format!("{us:.1}")
    }
}

/// Minor page faults per op, or a dash where none were counted for the
/// scenario (`hold` measures memory, not an interval of work; in a
/// reload, fork's children go on and no hand-over ends one). Every
/// server runs as a child of the benchmark (its top process, or echo-forkd's
/// master, is ours to read in `/proc`), so none is left without a figure.
pub(crate) fn faults(per_op: f64) -> String {
    if per_op.is_nan() {
        "–".into()
    } else if per_op >= 1000.0 {
        format!("{per_op:.0}")
    } else if per_op >= 10.0 {
        format!("{per_op:.1}")
    } else {
        format!("{per_op:.2}")
    }
}

/// A hand-over's time in ms: `n/a` where nothing is handed over (fork's
/// children go on), `not done` where it never finished.
pub(crate) fn handover_ms(ms: f64) -> String {
    if ms.is_nan() {
        "n/a".into()
    } else if ms.is_infinite() {
        "not done".into()
    } else {
        format!("{ms:.0}")
    }
}

/// The server's CPU µs per connection over a hand-over: `–` where there
/// is none (fork), below one clock tick's worth where none was counted.
pub(crate) fn cpu_per_conn(us: f64, held: f64) -> String {
    if us.is_nan() {
        "–".into()
    } else if us == 0.0 {
        format!("< {:.1}", 1e6 / ticks_per_sec() / held.max(1.0))
    } else {
        format!("{us:.1}")
    }
}

pub(crate) fn unit(s: Scenario) -> &'static str {
    match s {
        Scenario::Conn => "conn/s",
        Scenario::Rtt => "round trips/s",
        Scenario::Stream => "MB/s",
        Scenario::Hold => "echoed after holding",
        Scenario::Burst => "echoed",
        Scenario::Udp => "replies/s",
        Scenario::Reload | Scenario::Upgrade | Scenario::ReloadStorm | Scenario::ReloadStopped => {
            "kept"
        }
    }
}

pub(crate) fn med(ms: &[Measure], f: impl Fn(&Measure) -> f64) -> f64 {
    median(ms.iter().map(f).collect())
}

pub(crate) fn report(results: &Results) -> String {
    let mut t = String::new();
    let timed = |c: &Case| c.scenario != Scenario::Burst && !c.scenario.is_reload();
    if results.keys().any(|(c, _)| timed(c)) {
        let _ = writeln!(
            t,
            "| case | server | median | p50 µs | p99 µs | server CPU µs per op | server minor faults per op | errors |"
        );
        let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---|");
    }
    for ((case, target), ms) in results {
        if !timed(case) {
            continue;
        }
        let mut errors = Errors::default();
        ms.iter().for_each(|m| errors.add(&m.errors));
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} {} | {} | {} | {} | {} | {} |",
            case.label(),
            target.name(),
            med(ms, |m| m.value),
            unit(case.scenario),
            micros(med(ms, |m| m.p50_us)),
            micros(med(ms, |m| m.p99_us)),
            micros(med(ms, |m| m.cpu_us)),
            faults(med(ms, |m| m.faults)),
            errors.describe()
        );
    }
    let bursts: Vec<_> = results
        .iter()
        .filter(|((c, _), _)| c.scenario == Scenario::Burst)
        .collect();
    if !bursts.is_empty() {
        let _ = writeln!(
            t,
            "\n| burst: clients arriving at once, holding | server | echoed | p50 ms | p99 ms | last ms | processes | errors |"
        );
        let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---|");
        for ((case, target), ms) in bursts {
            let mut errors = Errors::default();
            ms.iter().for_each(|m| errors.add(&m.errors));
            let _ = writeln!(
                t,
                "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {} |",
                case.label(),
                target.name(),
                med(ms, |m| m.value),
                med(ms, |m| m.p50_us) / 1e3,
                med(ms, |m| m.p99_us) / 1e3,
                med(ms, |m| m.last_ms),
                med(ms, |m| m.workers),
                errors.describe()
            );
        }
    }
    let reloads: Vec<_> = results
        .iter()
        .filter(|((c, _), _)| c.scenario.is_reload())
        .collect();
    if !reloads.is_empty() {
        let _ = writeln!(
            t,
            "\n| signal under held connections (reload: HUP, upgrade: USR2, reload-storm: 30 HUPs in 3 s, reload-stopped: HUP, master stopped 3 s) | server | held | lost, all rounds | hand-over ms | pings meanwhile, p50 / p99 µs | longest ping ms | server CPU µs per connection, signal to hand-over done | server minor faults per connection, likewise | processes after | errors |"
        );
        let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for ((case, target), ms) in reloads {
            let mut errors = Errors::default();
            ms.iter().for_each(|m| errors.add(&m.errors));
            // Every connection lost in any round counts: a sum, not a median.
            let lost: f64 = ms.iter().map(|m| m.held - m.value).sum();
            let _ = writeln!(
                t,
                "| {} | {} | {:.0} | {lost:.0} | {} | {} / {} | {} | {} | {} | {:.0} | {} |",
                case.label(),
                target.name(),
                med(ms, |m| m.held),
                handover_ms(med(ms, |m| m.last_ms)),
                micros(med(ms, |m| m.p50_us)),
                micros(med(ms, |m| m.p99_us)),
                micros(med(ms, |m| m.max_us) / 1e3),
                cpu_per_conn(med(ms, |m| m.cpu_us), med(ms, |m| m.held)),
                faults(med(ms, |m| m.faults)),
                med(ms, |m| m.workers),
                errors.describe()
            );
        }
    }
    let holds: Vec<_> = results
        .iter()
        .filter(|((c, _), _)| c.scenario == Scenario::Hold)
        .collect();
    let mut shown = None;
    for ((case, target), ms) in holds {
        if shown != Some(case.clients) {
            shown = Some(case.clients);
            let _ = writeln!(
                t,
                "\n| memory, {} idle connections held | master RSS KiB | processes | their private KiB | per process KiB | largest KiB |",
                case.clients
            );
            let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|");
        }
        {
            let rss = med(ms, |m| m.master_rss_kib);
            let n = med(ms, |m| m.workers);
            let private = med(ms, |m| m.workers_private_kib);
            let largest = med(ms, |m| m.workers_private_max_kib);
            // A single-process server (threads or tasks) has everything in
            // the master's RSS; there are no per-connection processes.
            let _ = if n > 0.0 {
                writeln!(
                    t,
                    "| {} | {rss:.0} | {n:.0} | {private:.0} | {:.1} | {largest:.0} |",
                    target.name(),
                    private / n
                )
            } else {
                writeln!(t, "| {} | {rss:.0} | – | – | – | – |", target.name())
            };
        }
    }
    let _ = writeln!(t, "\n| ratio (median of the per-round ratios) | value |");
    let _ = writeln!(t, "|---|---:|");
    for (label, r) in ratios(results) {
        let _ = writeln!(t, "| {label} | {r:.2}× |");
    }
    t
}

/// Each of echo-forkd's targets against the references of its case: the
/// async runtime, the floor of its model (min-fork for fork, the bare
/// epoll loop for all), Python's forking server, and the baseline build.
pub(crate) fn ratios(results: &Results) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for ((case, a), xs) in results {
        if !a.kind.is_ours()
            || matches!(case.scenario, Scenario::Hold | Scenario::Burst)
            || case.scenario.is_reload()
        {
            continue;
        }
        let mut refs = vec![Kind::Tokio, Kind::Epoll, Kind::MinUdp, Kind::PyUdp];
        match a.kind {
            Kind::Fork => refs.extend([Kind::MinFork, Kind::PyForking, Kind::ForkBase]),
            Kind::Prefork => refs.extend([Kind::PyForking, Kind::PreforkBase]),
            Kind::Event => refs.extend([Kind::EventEpoll, Kind::Uring, Kind::EventBase]),
            Kind::EventEpoll => refs.push(Kind::Uring),
            _ => {}
        }
        for b in refs {
            // The baseline runs the same pool sizes.
            let pool = if b.is_prefork() { a.pool } else { 0 };
            let Some(ys) = results.get(&(*case, Target { kind: b, pool })) else {
                continue;
            };
            let by_round = |f: fn(&Measure) -> f64| {
                median(xs.iter().zip(ys).map(|(x, y)| f(x) / f(y)).collect())
            };
            let name = format!("{} {} / {}", case.label(), a.name(), b.name());
            out.push((name.clone(), by_round(|m| m.value)));
            if case.scenario == Scenario::Rtt && case.clients == 1 {
                out.push((format!("{name}, p50 latency"), by_round(|m| m.p50_us)));
            }
        }
    }
    out
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("machine: {cpus} CPUs ({cpu}), Linux {}", kernel.trim())
}
