//! The PROXY header parser: the spec's examples, what it refuses, and a
//! property test over a million streams, cut into random pieces.

use super::*;

/// Feeds `stream`, arriving in pieces of the sizes `piece` draws, to
/// [`step`] as [`Reader::pull`] does (peeking for a v1 line): the verdict,
/// if there is one before the stream ends, and the bytes consumed.
fn feed(
    stream: &[u8],
    mut piece: impl FnMut() -> usize,
) -> (Option<Result<Header, &'static str>>, usize) {
    let mut got: Vec<u8> = Vec::new();
    let mut arrived = 0;
    loop {
        let (max, line) = match step(&got) {
            Step::Done(h) => return (Some(Ok(h)), got.len()),
            Step::Invalid(why) => return (Some(Err(why)), got.len()),
            Step::More { max, line } => (max, line),
        };
        assert!(max > 0, "asked for nothing after {got:?}");
        let waiting = arrived - got.len();
        if waiting == 0 {
            if arrived == stream.len() {
                return (None, got.len());
            }
            arrived = (arrived + piece().max(1)).min(stream.len());
            continue;
        }
        let window = &stream[got.len()..got.len() + waiting.min(max)];
        let take = if line {
            window
                .iter()
                .position(|&b| b == b'\n')
                .map_or(window.len(), |i| i + 1)
        } else {
            window.len()
        };
        got.extend_from_slice(&window[..take]);
        assert!(got.len() <= MAX_HEADER, "read {} bytes", got.len());
    }
}

fn whole(stream: &[u8]) -> (Option<Result<Header, &'static str>>, usize) {
    feed(stream, || usize::MAX / 2)
}

fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
    let mut h = SIG.to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(body.len() as u16).to_be_bytes());
    h.extend_from_slice(body);
    h
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn version_1_lines_of_the_spec() {
    let line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET /";
    assert_eq!(
        whole(line),
        (
            Some(Ok(Header::Proxied {
                src: addr("192.168.0.1:56324"),
                dst: addr("192.168.0.11:443")
            })),
            line.len() - b"GET /".len()
        ),
        "the client's bytes after the line are not taken"
    );
    let six = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n";
    assert_eq!(
        whole(six).0,
        Some(Ok(Header::Proxied {
            src: addr("[2001:db8::1]:1"),
            dst: addr("[2001:db8::2]:65535")
        }))
    );
    assert_eq!(whole(b"PROXY UNKNOWN\r\n").0, Some(Ok(Header::Local)));
    assert_eq!(
        whole(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").0,
        Some(Ok(Header::Local))
    );
    // The longest line there can be is accepted.
    let long = format!(
        "PROXY TCP6 {0} {0} 65535 65535\r\n",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    );
    assert_eq!(long.len(), 104);
    assert!(matches!(whole(long.as_bytes()).0, Some(Ok(_))));
}

#[test]
fn malformed_version_1_lines_are_refused() {
    for bad in [
        &b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n"[..],
        b"PROXY TCP4 192.168.0.1  192.168.0.11 56324 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 +1 443\r\n",
        b"PROXY TCP4 2001:db8::1 192.168.0.11 1 443\r\n",
        b"PROXY TCP6 192.168.0.1 2001:db8::1 1 443\r\n",
        b"PROXY TCP4 192.168.000.1 192.168.0.11 1 443\r\n",
        b"PROXY UDP4 192.168.0.1 192.168.0.11 1 443\r\n",
        b"PROXY TCP4 192.168.0.1 192.168.0.11 1\r\n",
        b"PROXY\r\n",
        b"proxy TCP4 1.1.1.1 1.1.1.1 1 1\r\n",
        b"PROXX TCP4",
        b"GET / HTTP/1.0\r\n\r\n",
        b"\x00",
    ] {
        assert!(
            matches!(whole(bad).0, Some(Err(_))),
            "{:?}: {:?}",
            String::from_utf8_lossy(bad),
            whole(bad)
        );
    }
    // No line feed within 107 bytes.
    let mut endless = b"PROXY TCP4 ".to_vec();
    endless.resize(400, b'1');
    assert_eq!(
        whole(&endless),
        (Some(Err("a version 1 line longer than 107 bytes")), 107)
    );
}

#[test]
fn version_2_headers() {
    let mut v4 = vec![10, 0, 0, 1, 10, 0, 0, 2];
    v4.extend_from_slice(&1234u16.to_be_bytes());
    v4.extend_from_slice(&7u16.to_be_bytes());
    let mut stream = v2(1, 0x11, &v4);
    let len = stream.len();
    stream.extend_from_slice(b"client bytes");
    assert_eq!(
        whole(&stream),
        (
            Some(Ok(Header::Proxied {
                src: addr("10.0.0.1:1234"),
                dst: addr("10.0.0.2:7")
            })),
            len
        )
    );
    // TLVs after the addresses are skipped, within the length.
    let mut with_tlv = v4.clone();
    with_tlv.extend_from_slice(&[0x04, 0x00, 0x02, b'h', b'i']);
    assert!(matches!(
        whole(&v2(1, 0x11, &with_tlv)).0,
        Some(Ok(Header::Proxied { .. }))
    ));
    let mut v6 = Vec::new();
    v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    v6.extend_from_slice(&"2001:db8::9".parse::<Ipv6Addr>().unwrap().octets());
    v6.extend_from_slice(&[0, 80, 0, 7]);
    assert_eq!(
        whole(&v2(1, 0x21, &v6)).0,
        Some(Ok(Header::Proxied {
            src: addr("[::1]:80"),
            dst: addr("[2001:db8::9]:7")
        }))
    );
    assert_eq!(whole(&v2(0, 0x00, &[])).0, Some(Ok(Header::Local)));
    assert_eq!(whole(&v2(0, 0x11, &v4)).0, Some(Ok(Header::Local)), "LOCAL");
    assert_eq!(
        whole(&v2(1, 0x00, &[])).0,
        Some(Ok(Header::Local)),
        "UNSPEC"
    );
    for (bad, why) in [
        (v2(1, 0x12, &v4), "UDP"),
        (v2(1, 0x11, &v4[..11]), "short addresses"),
        (v2(1, 0x21, &v4), "short IPv6 addresses"),
        (v2(2, 0x11, &v4), "command 2"),
        (v2(1, 0x41, &v4), "family 4"),
        (v2(1, 0x11, &vec![0; MAX_HEADER]), "over 4 KiB"),
    ] {
        assert!(
            matches!(whole(&bad).0, Some(Err(_))),
            "{why}: {:?}",
            whole(&bad)
        );
    }
    let mut version_1 = v2(1, 0x11, &v4);
    version_1[12] = 0x11;
    assert!(matches!(whole(&version_1).0, Some(Err(_))));
    // The largest header there can be is accepted, and not a byte more.
    let body = vec![0u8; MAX_HEADER - 16];
    assert_eq!(
        whole(&v2(0, 0x00, &body)),
        (Some(Ok(Header::Local)), MAX_HEADER)
    );
}

#[test]
fn nothing_is_decided_before_the_header_is_whole() {
    let line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n";
    assert_eq!(whole(&line[..line.len() - 1]), (None, line.len() - 1));
    let h = v2(0, 0x00, &[1, 2, 3]);
    assert_eq!(whole(&h[..h.len() - 1]), (None, h.len() - 1));
}

/// xorshift64*, for reproducible draws.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A valid header, its length and what it says.
fn valid(r: &mut Rng) -> (Vec<u8>, Header) {
    // 0, 1: v1 (TCP4, TCP6); 2, 3: v2 (the same); 4: v2 LOCAL.
    let form = r.below(5);
    if form == 4 {
        let body = vec![0x5a; r.below(200)];
        return (v2(0, 0x00, &body), Header::Local);
    }
    let v6 = form % 2 == 1;
    let ip = |r: &mut Rng| -> IpAddr {
        if v6 {
            Ipv6Addr::from((u128::from(r.next()) << 64) | u128::from(r.next())).into()
        } else {
            Ipv4Addr::from(r.next() as u32).into()
        }
    };
    let (a, b) = (ip(r), ip(r));
    let (p, q) = (r.next() as u16, r.next() as u16);
    let bytes = if form < 2 {
        let family = if v6 { "TCP6" } else { "TCP4" };
        format!("PROXY {family} {a} {b} {p} {q}\r\n").into_bytes()
    } else {
        let mut body = Vec::new();
        for ip in [a, b] {
            match ip {
                IpAddr::V4(ip) => body.extend_from_slice(&ip.octets()),
                IpAddr::V6(ip) => body.extend_from_slice(&ip.octets()),
            }
        }
        body.extend_from_slice(&p.to_be_bytes());
        body.extend_from_slice(&q.to_be_bytes());
        if !v6 {
            // TLVs after the addresses, which a reader must skip.
            body.resize(12 + r.below(64), 0xab);
        }
        v2(1, if v6 { 0x21 } else { 0x11 }, &body)
    };
    let h = Header::Proxied {
        src: SocketAddr::new(a, p),
        dst: SocketAddr::new(b, q),
    };
    (bytes, h)
}

/// A million streams: valid headers followed by client bytes, the same
/// mutated (bytes flipped, cut, inserted), and noise; each cut into
/// random pieces. A valid header is always taken exactly, whatever the
/// pieces; nothing ever panics, reads past 4 KiB, or takes a byte past a
/// header it accepts; whatever is accepted is a header on its own.
#[test]
fn a_million_streams_in_random_pieces() {
    let cases: u64 = std::env::var("PROXY_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let started = Instant::now();
    for case in 0..cases {
        let (header, said) = valid(&mut r);
        let mut stream = header.clone();
        let tail: Vec<u8> = (0..r.below(40)).map(|_| r.next() as u8).collect();
        stream.extend_from_slice(&tail);
        let kind = r.below(4);
        match kind {
            1 => {
                for _ in 0..1 + r.below(3) {
                    let i = r.below(stream.len());
                    stream[i] ^= 1 << r.below(8);
                }
            }
            2 => stream.truncate(r.below(stream.len() + 1)),
            3 => {
                let i = r.below(stream.len() + 1);
                let noise = r.next() as u8;
                stream.insert(i, noise);
            }
            _ => {}
        }
        if r.below(50) == 0 {
            stream = (0..r.below(300)).map(|_| r.next() as u8).collect();
        }
        let mut pr = Rng(r.next() | 1);
        let one_byte = r.below(4) == 0;
        let (verdict, taken) = feed(&stream, || if one_byte { 1 } else { 1 + pr.below(64) });
        assert!(taken <= stream.len() && taken <= MAX_HEADER, "case {case}");
        if kind == 0 && stream.len() >= header.len() && stream[..header.len()] == header[..] {
            assert_eq!(verdict, Some(Ok(said)), "case {case}: {stream:?}");
            assert_eq!(taken, header.len(), "case {case}: took client bytes");
        }
        if let Some(Ok(h)) = verdict {
            // What was taken is a header by itself, saying the same.
            assert_eq!(whole(&stream[..taken]), (Some(Ok(h)), taken), "case {case}");
        }
    }
    println!(
        "{cases} streams in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn the_reader_takes_the_header_and_leaves_the_rest() {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    let (mut a, b) = UnixStream::pair().unwrap();
    b.set_nonblocking(true).unwrap();
    let mut r = Reader::new(Instant::now(), Duration::from_secs(5));
    a.write_all(b"PROXY TCP4 1.2.3.4 ").unwrap();
    assert_eq!(r.pull(b.as_fd()), None, "half a line");
    a.write_all(b"5.6.7.8 10 20\r\nhello").unwrap();
    assert_eq!(
        r.read(b.as_fd()),
        Ok(Header::Proxied {
            src: addr("1.2.3.4:10"),
            dst: addr("5.6.7.8:20")
        })
    );
    let mut rest = [0u8; 5];
    (&b).read_exact(&mut rest).unwrap();
    assert_eq!(&rest, b"hello");
    // A proxy that sends nothing runs out of time.
    let (_c, d) = UnixStream::pair().unwrap();
    d.set_nonblocking(true).unwrap();
    let mut late = Reader::new(Instant::now(), Duration::ZERO);
    assert_eq!(late.read(d.as_fd()), Err(LATE));
}
