//! Clients: connections with timeouts, one-shot echoes over TCP, UDP and
//! unix sockets, round trips, the deterministic byte streams clients send
//! and check, and conversations held by client threads with their
//! outcomes tallied.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use super::DEADLINE;

/// A connection with timeouts, so a broken server fails a test instead of
/// hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, DEADLINE).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_write_timeout(Some(DEADLINE)).unwrap();
    s
}

/// Sends `data`, closes the write side and returns everything read back.
pub fn echo_all(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    let reader = {
        let mut r = s.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut back = Vec::new();
            r.read_to_end(&mut back).map(|_| back)
        })
    };
    s.write_all(data).expect("write");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    reader.join().unwrap().expect("read echo")
}

/// Sends one datagram to `addr` from 127.0.0.1 and returns its answer,
/// waiting up to [`DEADLINE`].
pub fn echo_udp(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    s.connect(addr)?;
    s.set_read_timeout(Some(DEADLINE))?;
    s.send(data)?;
    let mut buf = vec![0u8; 65_536];
    let n = s.recv(&mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// `echo_all` over a unix socket.
pub fn echo_unix(path: &Path, data: &[u8]) -> Vec<u8> {
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(data).expect("write");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read echo");
    back
}

/// One round trip of `msg` on an open connection.
pub fn round_trip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}

/// Deterministic pseudo-random bytes (xorshift64*), cheap to regenerate on
/// the reading side instead of keeping what was sent. The sequence does not
/// depend on how it is cut into buffers.
pub struct Stream {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Stream {
    pub fn new(seed: u64) -> Stream {
        Stream {
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// How one client conversation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte came back, then the server closed after our half-close.
    Echoed,
    Refused,
    Reset,
    /// The server closed early; what came back was a true prefix.
    Cut,
    /// Bytes came back that were not sent.
    Wrong,
    /// Any other error (a timeout, …).
    Failed,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Echoed,
        Outcome::Refused,
        Outcome::Reset,
        Outcome::Cut,
        Outcome::Wrong,
        Outcome::Failed,
    ];
}

/// One conversation: a few round trips of random sizes, then a half-close;
/// the connection spans time, so signals and kills land inside it.
pub fn conversation(addr: SocketAddr, rng: &mut Stream) -> Outcome {
    use std::io::ErrorKind;
    let mut s = match TcpStream::connect_timeout(&addr, DEADLINE) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(_) => return Outcome::Failed,
    };
    let _ = s.set_read_timeout(Some(DEADLINE));
    let failed = |e: std::io::Error| match e.kind() {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Outcome::Reset,
        _ => Outcome::Failed,
    };
    let mut word = [0u8; 2];
    rng.fill(&mut word);
    for _ in 0..1 + word[0] % 8 {
        let mut data = vec![0u8; 1 + usize::from(word[1]) * 16];
        rng.fill(&mut data);
        if let Err(e) = s.write_all(&data) {
            return failed(e);
        }
        let mut back = vec![0u8; data.len()];
        let mut got = 0;
        while got < back.len() {
            match s.read(&mut back[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => {
                    if back[..got] != data[..got] {
                        return Outcome::Wrong;
                    }
                    return failed(e);
                }
            }
        }
        if back[..got] != data[..got] {
            return Outcome::Wrong;
        }
        if got < data.len() {
            return Outcome::Cut;
        }
        rng.fill(&mut word);
    }
    if let Err(e) = s.shutdown(std::net::Shutdown::Write) {
        return failed(e);
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Outcome::Echoed,
        Ok(_) => Outcome::Wrong,
        Err(e) => failed(e),
    }
}

/// Outcomes counted across client threads.
#[derive(Default)]
pub struct Tally([std::sync::atomic::AtomicUsize; 6]);

impl Tally {
    pub fn add(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(5);
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn get(&self, o: Outcome) -> usize {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(5);
        self.0[i].load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn total(&self) -> usize {
        Outcome::ALL.iter().map(|o| self.get(*o)).sum()
    }

    /// Every outcome with its count, for messages.
    pub fn counts(&self) -> Vec<(Outcome, usize)> {
        Outcome::ALL.iter().map(|o| (*o, self.get(*o))).collect()
    }
}

/// Runs `n` client threads, each holding conversations with `addr` until
/// `stop` is set; returns their handles.
pub fn clients(
    addr: SocketAddr,
    n: u64,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    tally: &Arc<Tally>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|k| {
            let (stop, tally) = (Arc::clone(stop), Arc::clone(tally));
            std::thread::spawn(move || {
                let mut rng = Stream::new(0x9e37_79b9 + k);
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    tally.add(conversation(addr, &mut rng));
                }
            })
        })
        .collect()
}
