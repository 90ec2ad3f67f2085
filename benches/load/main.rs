//! The load benchmark: `cargo bench [-- OPTIONS]`.
//!
//! It starts each server fresh for each run, on 127.0.0.1, and drives it
//! from this process: `conn`, `rtt` and `burst` from an epoll loop per CPU
//! (benches/load/ev.rs), so that the client is not what is measured;
//! streams, UDP and holds from plain threads. Servers: echo-forkd in prefork
//! (at several pool sizes), fork and event mode; the floors of each model, built
//! only for this benchmark (a minimal fork-per-connection server and a
//! minimal single-threaded epoll echo, this binary re-run as `serve-fork`
//! and `serve-epoll`, and a minimal liburing echo in C,
//! benches/floors/uring_echo.c, built at start where liburing is); a minimal tokio server (`serve-tokio`); and Python's
//! `ForkingTCPServer` and `ThreadingTCPServer` (benches/peers.py). It
//! sweeps what users vary: pool sizes, 1 to 500 ping-ponging clients, a
//! burst of 2,000 clients at once, 100 and 10,000 idle connections, a
//! reload (HUP) and an upgrade (USR2) under 1,000 to 10,000 held
//! connections (how long until all are handed over, and that none is
//! lost; a storm of HUPs and a stopped master if asked), and a UDP flood (echo-forkd's UDP worker against Python's `UDPServer`, a
//! minimal tokio UDP echo and a bare recvfrom/sendto loop, `serve-udp`).
//! Servers take turns within each round,
//! and each round starts one server later (A B C, B C A, C A B …), so that
//! a noisy neighbour hurts them all alike; the figures that count are
//! ratios within a round, of which the medians are reported. Every echoed
//! byte is checked. See PERFORMANCE.md.

mod clients;
mod ev;
mod opts;
mod peers;
mod reload;
mod report;
mod servers;

use clients::*;
use ev::*;
use opts::*;
use peers::*;
use reload::*;
use report::*;
use servers::*;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    bind, connect, recvmmsg, sendmmsg, setsockopt, socket, sockopt, AddressFamily, Backlog,
    MsgFlags, MultiHeaders, SockFlag, SockType, SockaddrIn,
};
use nix::sys::time::TimeVal;

pub(crate) const PAYLOAD: usize = 64;
/// Client source addresses: 127.0.0.1 to 127.0.0.16, so that the client's
/// ephemeral ports never run out (one address gives out near 14k conn/s).
pub(crate) const SOURCES: u8 = 16;
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_echo-forkd");
/// The listen backlog of the servers built into this binary: room for
/// the whole burst, as echo-forkd is given in that case (its default,
/// 1024, serves every other case), so that the burst measures the
/// servers, not the kernel dropping SYNs beyond the backlog.
pub(crate) const BACKLOG: i32 = 4096;
/// Idle connections above which `hold` runs only the servers that hold
/// many per process.
pub(crate) const HOLD_PER_PROCESS: usize = 1000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve-tokio") => return serve_tokio(),
        Some("serve-fork") => return serve_fork(),
        Some("serve-epoll") => return serve_epoll(),
        Some("serve-tokio-udp") => return serve_tokio_udp(),
        Some("serve-udp") => return serve_udp(),
        _ => {}
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let mut opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    make_room_for_clients(&mut opts);
    if opts.servers.contains(&Kind::Uring) {
        if let Err(why) = build_uring_floor() {
            println!("uring left out: {why}");
            opts.servers.retain(|&k| k != Kind::Uring);
        }
    }
    run(&opts);
}

pub(crate) const USAGE: &str = "usage: cargo bench --bench load -- [OPTIONS]
  --rounds N          rounds of every server in turn (default 3)
  --secs S            seconds per timed run (default 3)
  --scenarios LIST    conn,rtt,stream,hold,burst,udp,reload,upgrade (the
                      default), and reload-storm, reload-stopped if named
  --servers LIST      prefork,fork,event,min-fork,epoll,uring,tokio,py-forking,
                      py-threading,min-udp,py-udp (default: all)
  --clients N         clients for conn (default 50)
  --rtt-clients LIST  connections for rtt, one run each (default 1,50,500)
  --pools LIST        prefork pool sizes for conn (default 8,64,256)
  --stream-mib N      MiB each stream connection sends (default 256)
  --hold LIST         idle connections held, one run each (default 100,10000)
  --burst N           clients arriving at once in burst (default 2000)
  --udp-clients LIST  UDP clients flooding, one run each (default 1,16,64)
  --reload LIST       connections held across a reload, an upgrade (and a
                      storm, a stopped master), one run each (default
                      1000,4000,10000; --quick: the smallest); prefork and
                      fork run up to 4092 of them
  --out FILE          also write the markdown tables here
  --baseline BIN      also run this echo-forkd build, after each of ours
  --quick             1 round of 1 s, 32 MiB streams, reload 1000 only:
                      a smoke test";

pub(crate) type Results = BTreeMap<(Case, Target), Vec<Measure>>;

/// Raises this process's descriptor limit for the clients of the largest
/// hold (and the burst, and the reload); a hold or reload the hard limit
/// cannot carry is left out, with a word.
fn make_room_for_clients(o: &mut Opts) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let most = o
        .hold
        .iter()
        .copied()
        .chain([o.burst])
        // A reload's client also watches the old workers exit, a pidfd
        // each: up to one per connection (prefork), within max-workers.
        .chain(
            o.reload
                .iter()
                .map(|&n| n + (n + 4).min(RELOAD_MAX_WORKERS)),
        )
        .max()
        .unwrap_or(0) as u64;
    let _ = setrlimit(
        Resource::RLIMIT_NOFILE,
        (most + 1024).max(soft).min(hard),
        hard,
    );
    o.hold.retain(|&n| {
        let fits = n as u64 + 1024 <= hard;
        if !fits {
            println!("hold {n} left out: RLIMIT_NOFILE's hard limit is {hard}");
        }
        fits
    });
    o.reload.retain(|&n| {
        let fits = n as u64 + 1024 <= hard;
        if !fits {
            println!("reload {n} left out: RLIMIT_NOFILE's hard limit is {hard}");
        }
        fits
    });
}

fn run(o: &Opts) {
    println!("{}", machine());
    println!(
        "rounds {}, {} s per timed run, conn with {} clients, rtt with {:?}, prefork pools {:?}, streams of {} MiB, hold {:?}, burst {}, udp with {:?} clients, reload holding {:?}\n",
        o.rounds, o.secs, o.clients, o.rtt_clients, o.pools, o.stream_mib, o.hold, o.burst, o.udp_clients, o.reload
    );
    for case in o.cases() {
        for &kind in &o.servers {
            if let (true, Some(why)) = (kind.is_ours(), o.left_out(kind, case)) {
                println!("{} {}: left out: {why}", case.label(), kind.name());
            }
        }
    }
    let mut results = Results::new();
    for round in 1..=o.rounds {
        for case in o.cases() {
            // Each round starts one server later, so that none always runs
            // first (just after another scenario's teardown) or last.
            let targets = o.targets(case);
            let n = targets.len();
            for j in 0..n {
                let t = targets[(j + round - 1) % n];
                let server = Server::start(t, case, o);
                let m = match case.scenario {
                    Scenario::Conn => conn(&server, case.clients, o),
                    Scenario::Rtt => rtt(&server, case.clients, o),
                    Scenario::Stream => stream(&server, o),
                    Scenario::Hold => hold(&server, t.kind, case.clients),
                    Scenario::Burst => burst(&server, case.clients),
                    Scenario::Udp => udp(&server, case.clients, o),
                    _ => reload(&server, t.kind, case),
                };
                drop(server);
                if case.scenario.is_reload() {
                    println!(
                        "round {round} {:<19} {:<8} held {:>5.0}  lost {:>4.0}  hand-over {:>8} ms  p50 {:>8} us  p99 {:>8} us  longest {:>8} ms  cpu {:>6} us/conn  faults {:>7} /conn  client cpu {:>3.0} %  errors {}",
                        case.label(),
                        t.name(),
                        m.held,
                        m.held - m.value,
                        handover_ms(m.last_ms),
                        micros(m.p50_us),
                        micros(m.p99_us),
                        micros(m.max_us / 1e3),
                        cpu_per_conn(m.cpu_us, m.held),
                        faults(m.faults),
                        m.client_cpu * 100.0,
                        m.errors.describe()
                    );
                    results.entry((case, t)).or_default().push(m);
                    continue;
                }
                println!(
                    "round {round} {:<11} {:<16} {:>12.1}  p50 {:>8} us  p99 {:>8} us  cpu {:>6} us/op  faults {:>7} /op  errors {}",
                    case.label(),
                    t.name(),
                    m.value,
                    micros(m.p50_us),
                    micros(m.p99_us),
                    micros(m.cpu_us),
                    faults(m.faults),
                    m.errors.describe()
                );
                results.entry((case, t)).or_default().push(m);
            }
        }
    }
    let table = report(&results);
    println!("\n{table}");
    if let Some(path) = &o.out {
        if let Err(e) = std::fs::write(path, &table) {
            eprintln!("load: cannot write {}: {e}", path.display());
        }
    }
    // The peers and the baseline are measured, not judged; echo-forkd
    // must carry every scenario without a single error.
    let failed: Vec<String> = results
        .iter()
        .filter(|((_, t), ms)| {
            t.kind.is_ours() && !t.kind.is_base() && ms.iter().any(|m| m.errors.total() > 0)
        })
        .map(|((c, t), _)| format!("{} {}", c.label(), t.name()))
        .collect();
    if !failed.is_empty() {
        eprintln!("load: echo-forkd had errors in: {}", failed.join(", "));
        std::process::exit(1);
    }
}
