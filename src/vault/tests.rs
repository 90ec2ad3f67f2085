use super::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use crate::echo::Progress;

/// A connection carrying `k` as its byte count, and the client's end.
fn conn(k: u64) -> ((OwnedFd, Carried), UnixStream) {
    let (client, server) = UnixStream::pair().unwrap();
    let c = Carried {
        tcp: false,
        client: None,
        place: None,
        progress: Progress {
            bytes: k,
            ..Progress::new(Instant::now())
        },
    };
    ((OwnedFd::from(server), c), client)
}

/// Reads everything out of `vault`, and checks that each connection is
/// the one its record says (what its client sends arrives there) and
/// that each came out once.
fn read_back(vault: &Vault, clients: &mut [UnixStream]) {
    let mut seen = vec![false; clients.len()];
    let mut out = Unpacked::default();
    while let Some((fd, c)) = out.next(vault).unwrap() {
        let k = c.progress.bytes as usize;
        assert!(!seen[k], "connection {k} came out twice");
        seen[k] = true;
        clients[k].write_all(&(k as u64).to_le_bytes()).unwrap();
        let mut s = UnixStream::from(fd);
        s.set_nonblocking(false).unwrap();
        let mut got = [0u8; 8];
        s.read_exact(&mut got).unwrap();
        assert_eq!(
            u64::from_le_bytes(got),
            k as u64,
            "a record went with another connection"
        );
    }
    assert!(out.is_done());
    let missing = seen.iter().filter(|s| !**s).count();
    assert_eq!(missing, 0, "{missing} connections never came out");
}

fn room() {
    let (_, hard) = crate::sys::nofile_limit();
    let _ = crate::sys::set_nofile(hard.min(65_536));
}

#[test]
fn a_full_vault_is_packed_so_that_one_connection_at_a_time_always_fits() {
    room();
    let vault = Vault::new().unwrap();
    // The smallest buffer the kernel allows: a few messages fill it, so
    // nearly every put below finds it full and packs what waits.
    nix::sys::socket::setsockopt(&vault.tx, nix::sys::socket::sockopt::SndBuf, &1).unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let mut clients = Vec::new();
    for k in 0..1500 {
        let (c, client) = conn(k);
        clients.push(client);
        vault.put(vec![c], until).unwrap();
    }
    read_back(&vault, &mut clients);
}

#[test]
fn many_connections_go_in_bags_and_come_back_whole() {
    room();
    let vault = Vault::new().unwrap();
    let mut clients = Vec::new();
    let mut batch = Vec::new();
    for k in 0..1200 {
        let (c, client) = conn(k);
        clients.push(client);
        batch.push(c);
    }
    vault
        .put(batch, Instant::now() + Duration::from_secs(10))
        .unwrap();
    // One record in the vault: the bag.
    let mut probe = recv(vault.rx.as_fd()).unwrap().unwrap();
    assert_eq!(probe.len(), 1);
    assert!(probe[0].is_bag());
    assert_eq!(probe[0].conns, 1200);
    send(vault.tx.as_fd(), &probe).unwrap();
    probe.clear();
    read_back(&vault, &mut clients);
}

#[test]
fn what_is_not_ours_is_closed_and_counted() {
    let vault = Vault::new().unwrap();
    let (a, _b) = UnixStream::pair().unwrap();
    let stray = Item {
        fd: OwnedFd::from(a),
        record: [7u8; RECORD],
        conns: 1,
    };
    send(vault.tx.as_fd(), &[stray]).unwrap();
    let (c, mut client) = conn(0);
    vault.put(vec![c], Instant::now()).unwrap();
    let mut out = Unpacked::default();
    let (fd, got) = out.next(&vault).unwrap().expect("the connection after it");
    assert_eq!(got.progress.bytes, 0);
    assert_eq!(out.foreign, 1);
    client.write_all(b"x").unwrap();
    let mut s = UnixStream::from(fd);
    s.set_nonblocking(false).unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).unwrap();
    assert!(out.next(&vault).unwrap().is_none());
}

#[test]
fn the_ends_of_a_passed_vault_are_read_alike() {
    let vault = Vault::new().unwrap();
    let (c, _client) = conn(3);
    vault.put(vec![c], Instant::now()).unwrap();
    // As the next master gets them: in either order.
    let Vault { tx, rx } = vault;
    let again = Vault::adopt(rx, tx);
    let mut out = Unpacked::default();
    let (_, got) = out.next(&again).unwrap().expect("found from the other end");
    assert_eq!(got.progress.bytes, 3);
}

#[test]
fn senders_that_find_it_full_together_lose_nothing() {
    room();
    let vault = std::sync::Arc::new(Vault::new().unwrap());
    nix::sys::socket::setsockopt(&vault.tx, nix::sys::socket::sockopt::SndBuf, &1).unwrap();
    // Eight senders at once, as workers whose master died: each packs
    // what the others left there while they pack it too.
    let until = Instant::now() + Duration::from_secs(20);
    let handles: Vec<_> = (0..8u64)
        .map(|t| {
            let vault = vault.clone();
            std::thread::spawn(move || {
                (0..150u64)
                    .map(|i| {
                        let (c, client) = conn(t * 150 + i);
                        vault.put(vec![c], until).unwrap();
                        client
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut clients: Vec<UnixStream> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    read_back(&vault, &mut clients);
}
