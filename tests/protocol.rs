//! Exact echo, whatever the data and its segmentation.

use super::*;

/// One worker (or a child per connection), for `mode`.
fn one_worker(mode: &str) -> Daemon {
    Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "1",
        "--min-spare",
        "0",
    ])
}

in_modes!(sixty_four_mib_concurrent_write_and_read: sixty_four_mib; prefork, fork, event);

fn sixty_four_mib(mode: &str) {
    let d = one_worker(mode);
    let total: usize = 64 << 20;
    let s = connect(d.addr());
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut gen = Stream::new(7);
        let mut buf = vec![0u8; 100_000];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            gen.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            left -= n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut r = s;
    let mut expect = Stream::new(7);
    let (mut got, mut want) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    let mut seen = 0usize;
    loop {
        let n = r.read(&mut got).expect("read echo");
        if n == 0 {
            break;
        }
        expect.fill(&mut want[..n]);
        assert!(
            got[..n] == want[..n],
            "echo differs within bytes {seen}..{}",
            seen + n
        );
        seen += n;
    }
    writer.join().unwrap();
    assert_eq!(seen, total);
}

in_modes!(random_size_writes_come_back_as_the_same_stream: random_sizes; prefork, fork, event);

fn random_sizes(mode: &str) {
    let d = one_worker(mode);
    let mut gen = Stream::new(99);
    let mut sizes = [0u8; 2000];
    gen.fill(&mut sizes);
    let mut sent = Vec::new();
    let mut s = connect(d.addr());
    s.set_nodelay(true).unwrap();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        back
    });
    for pair in sizes.chunks(2) {
        // 1 to 65,536 bytes per write, skewed towards small ones.
        let size = 1 + ((pair[0] as usize) << (pair[1] % 9));
        let start = sent.len();
        sent.resize(start + size, 0);
        gen.fill(&mut sent[start..]);
        s.write_all(&sent[start..]).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let back = reader.join().unwrap();
    assert_eq!(back.len(), sent.len());
    assert!(back == sent, "the echoed stream differs from the sent one");
}

in_modes!(every_byte_value_and_half_close: every_byte; prefork, fork, event);

fn every_byte(mode: &str) {
    let d = one_worker(mode);
    let all: Vec<u8> = (0..=255u8).collect();
    // echo_all half-closes and reads to EOF: every byte, then EOF.
    assert_eq!(echo_all(d.addr(), &all), all);
    // After the half-close the server still writes what was in flight.
    let mut s = connect(d.addr());
    s.write_all(b"before").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, b"before");
}

fn many_clients(mode: &str) {
    let d = Daemon::start(&[
        "-l",
        "127.0.0.1:0",
        "-m",
        mode,
        "-w",
        "8",
        "--min-spare",
        "0",
    ]);
    let addr = d.addr();
    let clients: Vec<_> = (0..200u64)
        .map(|i| {
            std::thread::spawn(move || {
                let mut data = vec![0u8; 1 << 20];
                Stream::new(i + 1).fill(&mut data);
                echo_all(addr, &data) == data
            })
        })
        .collect();
    let exact = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .filter(|&ok| ok)
        .count();
    assert_eq!(exact, 200, "clients with an exact echo");
}

in_modes!(two_hundred_clients_of_a_mebibyte_each: many_clients; prefork, fork, event);

#[test]
fn unix_socket_listener_echoes_and_its_file_is_removed_on_exit() {
    let dir = TempDir::new("unix");
    let path = dir.path("echo.sock");
    let arg = format!("unix:{}", path.display());
    let mut d = Daemon::start(&["-l", &arg, "-w", "1", "--min-spare", "0"]);
    assert_eq!(d.listening(), vec![arg.clone()]);
    assert_eq!(echo_unix(&path, b"over unix"), b"over unix");
    d.signal(Signal::SIGTERM);
    assert!(d.wait_exit(DEADLINE).is_some_and(|s| s.success()));
    assert!(!exists(&path), "socket file left behind");
}

#[test]
fn ipv6_loopback() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skipped(format_args!("IPv6 loopback is not available here"));
        return;
    }
    let d = Daemon::start(&["-l", "[::1]:0", "-w", "1", "--min-spare", "0"]);
    let addr = d.addr();
    assert!(addr.is_ipv6());
    assert_eq!(echo_all(addr, b"six"), b"six");
}
