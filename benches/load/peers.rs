//! The reference servers built into this binary (run as `serve-…`): the
//! floors of each model (a bare fork-per-connection loop, a bare epoll
//! loop, a bare UDP loop) and minimal tokio servers. Python's are in
//! benches/peers.py.

use super::*;

pub(crate) fn serve_tokio() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let std_listener = bench_listener();
        std_listener.set_nonblocking(true).expect("non-blocking");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// The floor of the fork model, as small as it can be: accept, fork, echo
/// with read/write on a stack buffer, `_exit`; finished children reaped
/// (`waitpid(WNOHANG)`) before each accept, so that their CPU time is
/// counted as the others' is. No limits, no supervision, no logging.
pub(crate) fn serve_fork() {
    let listener = bench_listener();
    // SAFETY: SIG_IGN runs no code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    loop {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        while matches!(
            waitpid(None::<nix::unistd::Pid>, Some(WaitPidFlag::WNOHANG)),
            Ok(s) if s != WaitStatus::StillAlive
        ) {}
        let Ok((conn, _)) = listener.accept() else {
            continue;
        };
        // SAFETY: this process has one thread (the benchmark's main thread
        // re-run as a server before starting any other); the child only
        // echoes and `_exit`s.
        match unsafe { libc::fork() } {
            0 => {
                // Left uninitialised, as a C server's stack buffer would be:
                // zeroing 64 KiB per connection is no part of the floor.
                let mut buf = std::mem::MaybeUninit::<[u8; 64 * 1024]>::uninit();
                let fd = conn.as_raw_fd();
                loop {
                    // SAFETY: read(2) writes at most the buffer's length
                    // into memory we own.
                    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 64 * 1024) };
                    if n <= 0 {
                        break;
                    }
                    // SAFETY: the first `n` bytes were just written by read.
                    let data = unsafe {
                        std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n as usize)
                    };
                    if write_all(fd, data).is_err() {
                        break;
                    }
                }
                // SAFETY: `_exit` does not return and runs no destructor.
                unsafe { libc::_exit(0) }
            }
            _ => drop(conn),
        }
    }
}

pub(crate) fn write_all(fd: std::os::fd::RawFd, mut data: &[u8]) -> nix::Result<()> {
    // SAFETY: `fd` is open for the whole call (the caller owns it).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(n) => data = &data[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The floor of an event loop: one thread, one level-triggered epoll set,
/// non-blocking sockets, one shared 64 KiB read buffer, and what a client
/// does not read kept per connection until it can be written.
pub(crate) fn serve_epoll() {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    const LISTENER: u64 = u64::MAX;
    let listener = bench_listener();
    listener.set_nonblocking(true).expect("non-blocking");
    let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    ep.add(&listener, EpollEvent::new(EpollFlags::EPOLLIN, LISTENER))
        .expect("epoll add");
    // By fd number: the connection and its unsent bytes.
    let mut conns: Vec<Option<(TcpStream, Vec<u8>)>> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let n = match ep.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(_) => continue,
        };
        for ev in &events[..n] {
            if ev.data() == LISTENER {
                while let Ok((c, _)) = listener.accept() {
                    let _ = c.set_nonblocking(true);
                    let fd = c.as_raw_fd() as usize;
                    if ep
                        .add(&c, EpollEvent::new(EpollFlags::EPOLLIN, fd as u64))
                        .is_ok()
                    {
                        if conns.len() <= fd {
                            conns.resize_with(fd + 1, || None);
                        }
                        conns[fd] = Some((c, Vec::new()));
                    }
                }
                continue;
            }
            let fd = ev.data() as usize;
            let Some(Some((c, pending))) = conns.get_mut(fd) else {
                continue;
            };
            let mut close = false;
            if !pending.is_empty() {
                match c.write(pending) {
                    Ok(k) => {
                        pending.drain(..k);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => close = true,
                }
                if pending.is_empty() && !close {
                    let mut back = EpollEvent::new(EpollFlags::EPOLLIN, fd as u64);
                    let _ = ep.modify(&*c, &mut back);
                }
            } else {
                match c.read(&mut buf) {
                    Ok(0) => close = true,
                    Ok(k) => {
                        let sent = match c.write(&buf[..k]) {
                            Ok(w) => w,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                            Err(_) => {
                                close = true;
                                k
                            }
                        };
                        if sent < k && !close {
                            pending.extend_from_slice(&buf[sent..k]);
                            let mut out = EpollEvent::new(EpollFlags::EPOLLOUT, fd as u64);
                            let _ = ep.modify(&*c, &mut out);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => close = true,
                }
            }
            if close {
                if let Some((c, _)) = conns[fd].take() {
                    let _ = ep.delete(&c);
                }
            }
        }
    }
}

/// A UDP server socket on 127.0.0.1:0; prints the port.
pub(crate) fn bench_udp_socket() -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind UDP");
    println!("{}", s.local_addr().expect("local addr").port());
    s
}

/// The minimal tokio UDP echo: one task, `recv_from` then `send_to`.
pub(crate) fn serve_tokio_udp() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let std_socket = bench_udp_socket();
        std_socket.set_nonblocking(true).expect("non-blocking");
        let socket = tokio::net::UdpSocket::from_std(std_socket).expect("tokio socket");
        let mut buf = vec![0u8; 65_536];
        loop {
            if let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        }
    });
}

/// The floor of a UDP echo: a blocking `recv_from`/`send_to` loop.
pub(crate) fn serve_udp() {
    let s = bench_udp_socket();
    let mut buf = vec![0u8; 65_536];
    loop {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
}
