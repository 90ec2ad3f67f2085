//! Deadlines and timeouts: the arithmetic every loop shares, done so that
//! it cannot overflow whatever value the configuration allowed.

use std::time::{Duration, Instant};

/// `now + d`, or the latest instant the platform can represent on the
/// way there. Configured durations have ceilings (see `config`), so this
/// only matters if one is ever raised; a deadline must never panic.
pub(crate) fn after(now: Instant, d: Duration) -> Instant {
    if let Some(t) = now.checked_add(d) {
        return t;
    }
    // Halve the step until it fits: at worst a deadline comes early by a
    // few centuries.
    let mut step = d;
    let mut t = now;
    while !step.is_zero() {
        match t.checked_add(step) {
            Some(later) => t = later,
            None => step /= 2,
        }
    }
    t
}

/// A poll(2) timeout for "at most `d`" (None: wait forever), rounded up to
/// the next millisecond so a wake-up never comes before the deadline.
pub(crate) fn poll_timeout(d: Option<Duration>) -> nix::poll::PollTimeout {
    match d {
        None => nix::poll::PollTimeout::NONE,
        Some(d) => {
            // In 64 bits: 128-bit division is a call into code a fork-mode
            // child would otherwise fault in for this alone.
            let ms = d
                .as_secs()
                .saturating_mul(1000)
                .saturating_add(u64::from(d.subsec_nanos().div_ceil(1_000_000)));
            let ms = i32::try_from(ms).unwrap_or(i32::MAX);
            nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
        }
    }
}

/// CLOCK_MONOTONIC in microseconds, for systemd's MONOTONIC_USEC=.
pub(crate) fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}

/// `t` on CLOCK_MONOTONIC, in microseconds: an instant another process
/// (or this one after an exec) can read back with [`from_usec`].
pub(crate) fn to_usec(t: Instant) -> u64 {
    let now = Instant::now();
    let us = monotonic_usec();
    match now.checked_duration_since(t) {
        Some(ago) => us.saturating_sub(ago.as_micros() as u64),
        None => us.saturating_add(t.duration_since(now).as_micros() as u64),
    }
}

/// The instant that was `us` on CLOCK_MONOTONIC (see [`to_usec`]).
pub(crate) fn from_usec(us: u64) -> Instant {
    let now = Instant::now();
    let then = monotonic_usec();
    if us <= then {
        now.checked_sub(Duration::from_micros(then - us))
            .unwrap_or(now)
    } else {
        after(now, Duration::from_micros(us - then))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_never_panics_and_is_exact_when_it_fits() {
        let now = Instant::now();
        assert_eq!(
            after(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let far = after(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(86_400 * 365 * 100));
        assert!(after(far, Duration::MAX) >= far);
    }

    #[test]
    fn poll_timeout_rounds_up_and_saturates() {
        let ms = |d| i32::from(poll_timeout(Some(d)));
        assert_eq!(ms(Duration::from_micros(1)), 1);
        assert_eq!(ms(Duration::from_millis(7)), 7);
        assert_eq!(ms(Duration::new(1, 999_000_001)), 2000);
        assert_eq!(ms(Duration::from_nanos(1)), 1);
        assert_eq!(ms(Duration::MAX), i32::MAX);
        assert_eq!(i32::from(poll_timeout(None)), -1);
    }
}
