//! `reload`: a HUP while clients hold connections, which the retiring
//! workers hand to the new generation (fork-mode children go on).

use super::*;

/// `n` clients hold a connection each, echoed once; then the master gets
/// a HUP, and the clients go on with round trips on every connection until
/// the old workers are gone, then make one more round. Reports how many
/// still echo after it (every byte checked), how long until the last old
/// worker exited (it had handed its connections over), and the latency of
/// the round trips made meanwhile.
pub(crate) fn reload(server: &Server, kind: Kind, n: usize) -> Measure {
    let mut m = Measure::default();
    let mut conns = connect_all(server, n, &mut m.errors);
    let mut rng = Rng(0x4e10ad);
    round(&mut conns, &mut rng, &mut m.errors, &mut Vec::new());
    let old = children(server.pid());
    let goes_on = matches!(kind, Kind::Fork | Kind::ForkBase);
    let hup = Instant::now();
    let master = nix::unistd::Pid::from_raw(server.pid());
    if nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGHUP).is_err() {
        m.errors.other += 1;
        return m;
    }
    let mut lat = Vec::new();
    let deadline = hup + Duration::from_secs(30);
    let mut gone = None;
    let mut rounds = 0;
    while gone.is_none() && Instant::now() < deadline && !conns.is_empty() {
        round(&mut conns, &mut rng, &mut m.errors, &mut lat);
        rounds += 1;
        let now = children(server.pid());
        if goes_on {
            // Its children are not retired: a few rounds show they serve on.
            if rounds >= 3 {
                break;
            }
        } else if !old.iter().any(|p| now.contains(p)) {
            gone = Some(hup.elapsed());
        }
    }
    let mut after = Vec::new();
    round(&mut conns, &mut rng, &mut m.errors, &mut after);
    m.value = conns.len() as f64;
    m.last_ms = gone.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    (m.p50_us, m.p99_us) = percentiles(lat);
    m.workers = children(server.pid()).len() as f64;
    m
}

/// One round trip of 64 checked bytes on every connection, one after
/// another; a connection that fails is counted and dropped.
fn round(conns: &mut Vec<TcpStream>, rng: &mut Rng, errors: &mut Errors, lat: &mut Vec<u64>) {
    conns.retain_mut(|s| {
        let mut sent = [0u8; PAYLOAD];
        rng.fill(&mut sent);
        let t = Instant::now();
        let mut got = [0u8; PAYLOAD];
        match s.write_all(&sent).and_then(|()| s.read_exact(&mut got)) {
            Ok(()) if got == sent => {
                lat.push(elapsed_ns(t));
                true
            }
            Ok(()) => {
                errors.mismatch += 1;
                false
            }
            Err(e) => {
                errors.count(&e);
                false
            }
        }
    });
}
