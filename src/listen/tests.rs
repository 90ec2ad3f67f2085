//! Address syntax, binding, stale unix sockets, permissions.

use super::*;

fn opts(backlog: i32) -> BindOptions {
    BindOptions {
        backlog,
        socket_mode: 0o666,
        socket_group: None,
    }
}

#[test]
fn parses_every_form() {
    assert_eq!(
        "127.0.0.1:7".parse::<ListenAddr>().unwrap(),
        ListenAddr::Tcp("127.0.0.1:7".parse().unwrap())
    );
    assert_eq!(
        "[::1]:0".parse::<ListenAddr>().unwrap(),
        ListenAddr::Tcp("[::1]:0".parse().unwrap())
    );
    assert_eq!("*:7".parse::<ListenAddr>().unwrap(), ListenAddr::Any(7));
    assert_eq!(
        "unix:/run/echo.sock".parse::<ListenAddr>().unwrap(),
        ListenAddr::Unix("/run/echo.sock".into())
    );
    assert_eq!(
        "localhost:9".parse::<ListenAddr>().unwrap(),
        ListenAddr::Tcp("127.0.0.1:9".parse().unwrap())
    );
}

#[test]
fn refuses_what_it_would_have_to_resolve_or_guess() {
    for bad in [
        "example.org:7",
        "127.0.0.1",
        "127.0.0.1:70000",
        "::1:7",
        "unix:",
        "[::1:7",
    ] {
        let err = bad.parse::<ListenAddr>().unwrap_err();
        assert!(err.contains(bad), "{err}");
    }
}

#[test]
fn overlapping_addresses_are_found() {
    let o = |a: &str, b: &str| {
        let (a, b): (ListenAddr, ListenAddr) = (a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(a.overlaps(&b), b.overlaps(&a), "{a} {b}");
        a.overlaps(&b)
    };
    assert!(o("*:7", "[::]:7"));
    assert!(o("*:7", "0.0.0.0:7"));
    assert!(o("*:7", "127.0.0.1:7"));
    assert!(o("*:7", "[::1]:7"));
    assert!(o("0.0.0.0:7", "127.0.0.1:7"));
    assert!(o("[::]:7", "[::1]:7"));
    assert!(o("127.0.0.1:7", "127.0.0.1:7"));
    assert!(o("unix:/a", "unix:/a"));
    assert!(!o("*:7", "*:8"));
    assert!(!o("127.0.0.1:7", "127.0.0.2:7"));
    assert!(!o("0.0.0.0:7", "[::1]:7"));
    assert!(!o("127.0.0.1:0", "127.0.0.1:0"));
    assert!(!o("*:0", "[::]:0"));
    assert!(!o("unix:/a", "unix:/b"));
    assert!(!o("unix:/a", "*:7"));
}

#[test]
fn port_zero_is_resolved_in_the_name() {
    let l = bind(&"127.0.0.1:0".parse().unwrap(), &opts(16)).unwrap();
    let port: u16 = l.name().rsplit_once(':').unwrap().1.parse().unwrap();
    assert_ne!(port, 0);
}

#[test]
fn accepted_connections_inherit_tcp_nodelay() {
    // worker/ relies on this on Linux and FreeBSD instead of a
    // setsockopt per connection.
    let l = bind(&"127.0.0.1:0".parse().unwrap(), &opts(16)).unwrap();
    let _c = std::net::TcpStream::connect(l.name()).unwrap();
    let mut conn = None;
    for _ in 0..1000 {
        match l.accept() {
            Ok(c) => {
                conn = Some(c);
                break;
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
        }
    }
    let conn = conn.expect("accept");
    assert!(nix::sys::socket::getsockopt(&conn, sockopt::TcpNoDelay).unwrap());
}

#[test]
fn address_in_use_is_explained() {
    let l = bind(&"127.0.0.1:0".parse().unwrap(), &opts(16)).unwrap();
    let err = bind(&l.name().parse().unwrap(), &opts(16)).unwrap_err();
    assert!(err.contains(l.name()) && err.contains("in use"), "{err}");
}

#[test]
fn unix_socket_file_is_removed_on_drop_and_stale_files_replaced() {
    let dir = std::env::temp_dir().join(format!("echo-forkd-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("s");
    let addr = ListenAddr::Unix(path.clone());
    let l = bind(&addr, &opts(4)).unwrap();
    assert!(bind(&addr, &opts(4))
        .unwrap_err()
        .contains("another process listens there"));
    // A stale file: bound socket gone, file left behind.
    std::mem::forget(l.file);
    drop(l.fd);
    assert!(path.exists());
    let l = bind(&addr, &opts(4)).unwrap();
    drop(l);
    assert!(!path.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
