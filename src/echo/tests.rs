//! One connection's unit tests: exact echo over socket pairs, half-close,
//! every limit, and the hand-over points.

use super::*;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::thread;

fn serve_pair(limits: Limits) -> (UnixStream, thread::JoinHandle<Summary>) {
    let (client, server) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    let h = thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        serve(
            server.as_fd(),
            &mut buf,
            &limits,
            Progress::new(Instant::now()),
            None,
            &mut || Watch::Forget,
            false,
        )
    });
    (client, h)
}

/// Serves `server` with no limits, its watched fd readable from the start
/// and `answer` the caller's word on it.
fn serve_told(server: &UnixStream, buf: &mut [u8], from: Progress, answer: Watch) -> Summary {
    let (mut tell, watched) = UnixStream::pair().unwrap();
    tell.write_all(b"x").unwrap();
    serve(
        server.as_fd(),
        buf,
        &Limits::default(),
        from,
        Some(watched.as_fd()),
        &mut || answer,
        false,
    )
}

#[test]
fn echoes_exactly_then_eof_on_half_close() {
    let (mut c, h) = serve_pair(Limits::default());
    let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let writer = {
        let mut c = c.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || {
            c.write_all(&data).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let mut back = Vec::new();
    c.read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == data);
    let s = h.join().unwrap();
    assert!(matches!(s.end, End::Eof));
    assert_eq!(s.bytes, data.len() as u64);
}

#[test]
fn idle_client_is_released() {
    let (mut c, h) = serve_pair(Limits {
        idle: Some(Duration::from_millis(100)),
        ..Limits::default()
    });
    c.write_all(b"hi").unwrap();
    let s = h.join().unwrap();
    assert!(matches!(s.end, End::Idle), "{:?}", s.end);
    assert_eq!(s.bytes, 2);
}

#[test]
fn idle_is_counted_from_the_last_move_though_the_clock_is_read_lazily() {
    let idle = Duration::from_millis(150);
    let (mut c, h) = serve_pair(Limits {
        idle: Some(idle),
        ..Limits::default()
    });
    let t0 = Instant::now();
    let mut back = [0u8; 1];
    c.write_all(b"a").unwrap();
    c.read_exact(&mut back).unwrap();
    // The client's own pace: a pause shorter than the idle limit.
    thread::sleep(Duration::from_millis(100));
    let moved = Instant::now();
    c.write_all(b"b").unwrap();
    c.read_exact(&mut back).unwrap();
    let s = h.join().unwrap();
    assert!(matches!(s.end, End::Idle), "{:?}", s.end);
    assert_eq!(s.bytes, 2);
    // Not from the first move, nor early: a whole idle period after the
    // second.
    assert!(
        moved.elapsed() >= idle,
        "ended {:?} after the last move",
        moved.elapsed()
    );
    assert!(t0.elapsed() >= Duration::from_millis(250));
}

#[test]
fn a_hand_over_carries_when_it_last_moved() {
    let (mut c, server) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    let long_ago = Instant::now() - Duration::from_secs(10);
    c.write_all(b"x").unwrap();
    let mut buf = [0u8; 4096];
    let before = Instant::now();
    let s = serve_told(&server, &mut buf, Progress::new(long_ago), Watch::HandOver);
    assert!(matches!(s.end, End::HandOver), "{:?}", s.end);
    assert_eq!(s.bytes, 1);
    // It moved (echoed "x") before it was handed over: the next process
    // counts its idle time from then, not from its accept.
    assert!(s.progress.last >= before, "last move not stamped");
    assert_eq!(s.progress.start, long_ago);
}

#[test]
fn byte_cap_echoes_exactly_the_cap() {
    let (mut c, h) = serve_pair(Limits {
        max_bytes: 5,
        ..Limits::default()
    });
    c.write_all(b"0123456789").unwrap();
    let s = h.join().unwrap();
    assert!(matches!(s.end, End::Bytes));
    let mut back = Vec::new();
    let _ = c.read_to_end(&mut back);
    assert_eq!(back, b"01234");
}

#[test]
fn byte_cap_holds_on_a_stream() {
    // Larger than the buffer: many full reads, the cap inside one.
    let (mut c, h) = serve_pair(Limits {
        max_bytes: 150_001,
        ..Limits::default()
    });
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = {
        let mut c = c.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || {
            let _ = c.write_all(&data);
        })
    };
    let mut back = Vec::new();
    let _ = c.read_to_end(&mut back);
    let s = h.join().unwrap();
    drop(c);
    writer.join().unwrap();
    assert!(matches!(s.end, End::Bytes), "{:?}", s.end);
    assert_eq!(s.bytes, 150_001);
    assert!(back == data[..150_001]);
}

#[test]
fn watch_can_abort() {
    let (_c, server) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    let s = serve_told(
        &server,
        &mut buf,
        Progress::new(Instant::now()),
        Watch::Abort,
    );
    assert!(matches!(s.end, End::Aborted));
}

#[test]
fn a_hand_over_comes_once_everything_read_is_echoed_and_resumes_the_count() {
    let (mut c, server) = UnixStream::pair().unwrap();
    server.set_nonblocking(true).unwrap();
    c.write_all(b"first").unwrap();
    let mut buf = [0u8; 16];
    let start = Instant::now() - Duration::from_secs(60);
    let from = Progress {
        start,
        last: start,
        bytes: 100,
    };
    let s = serve_told(&server, &mut buf, from, Watch::HandOver);
    assert!(matches!(s.end, End::HandOver), "{:?}", s.end);
    // What was read first came back; the count goes on from 100.
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"first");
    assert_eq!((s.bytes, s.progress.start), (105, start));
    // max-session counts from the first accept: over at once here.
    let limits = Limits {
        session: Some(Duration::from_secs(30)),
        ..Limits::default()
    };
    let s = serve(
        server.as_fd(),
        &mut buf,
        &limits,
        s.progress,
        None,
        &mut || Watch::Forget,
        false,
    );
    assert!(matches!(s.end, End::Session), "{:?}", s.end);
}

#[test]
fn a_client_that_never_pauses_does_not_hold_back_a_hand_over_or_a_stop() {
    for (answer, want) in [(Watch::HandOver, "HandOver"), (Watch::Abort, "Aborted")] {
        let (mut c, server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        // More than MAX_DIRECT_READS buffers: the connection is still
        // readable at the poll that follows them, as under a stream.
        let sent = 16 * (MAX_DIRECT_READS as usize + 1) * 2;
        c.write_all(&vec![b'x'; sent]).unwrap();
        let mut buf = [0u8; 16];
        let s = serve_told(&server, &mut buf, Progress::new(Instant::now()), answer);
        assert_eq!(format!("{:?}", s.end), want);
        // At the first poll, not once the client paused.
        assert_eq!(s.bytes, 16 * u64::from(MAX_DIRECT_READS), "{want}");
    }
}
