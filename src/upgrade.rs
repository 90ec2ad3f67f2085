//! What a master hands to the new code it re-executes on USR2, in the
//! environment variable [`ENV`] (in the spirit of `LISTEN_FDS` and nginx's
//! `NGINX=`): the descriptors it keeps open across `execve` and what they
//! are, and the children it leaves to its successor. Pure text both ways,
//! so it is unit-tested.
//!
//! The format is `key=value` pairs joined by `;`; lists join items with
//! `,` and an item's fields with `/`; paths and addresses are hex, so that
//! no byte of theirs can be taken for a separator. `-` is "none". Version
//! `v=1`; a new master that does not know the version refuses to adopt.

use std::os::fd::RawFd;
use std::path::PathBuf;

use crate::kind::Kind;

/// The environment variable the inheritance travels in.
pub const ENV: &str = "ECHO_FORKD_UPGRADE";
const VERSION: &str = "1";

/// A listening socket passed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassedListener {
    pub fd: RawFd,
    /// The address it was bound for, as configured (`None`: systemd's).
    pub configured: Option<String>,
    /// A unix socket file this daemon created, to remove on exit.
    pub owns_file: bool,
}

/// A child left to the new master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassedChild {
    pub pid: i32,
    pub generation: u32,
    pub role: PassedRole,
}

/// What a passed child is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassedRole {
    /// A worker: its kind, its scoreboard slot, the write end of its
    /// control pipe, and whether it was already told to stop.
    Worker {
        kind: Kind,
        slot: Option<usize>,
        ctl: Option<RawFd>,
        retiring: bool,
    },
    /// A fork-mode child serving one connection, the place its client
    /// holds in `--max-per-ip` if the master keeps it (see
    /// [`Inheritance::places`]), and (behind a proxy) its word in the
    /// scoreboard's fork table.
    Conn {
        place: Option<u128>,
        slot: Option<usize>,
    },
}

impl PassedChild {
    /// The write end of its control pipe, if it has one.
    pub fn ctl(&self) -> Option<RawFd> {
        match self.role {
            PassedRole::Worker { ctl, .. } => ctl,
            PassedRole::Conn { .. } => None,
        }
    }
}

/// Everything the new master needs to take over.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inheritance {
    /// The pid it was made for: the same process after `execve`.
    pub pid: u32,
    /// The generation in force.
    pub generation: u32,
    pub started_secs_ago: u64,
    pub listeners: Vec<PassedListener>,
    /// The locked pidfile and its path.
    pub pidfile: Option<(RawFd, PathBuf)>,
    /// systemd's notification socket.
    pub notify: Option<RawFd>,
    /// The scoreboard's memfd and its number of slots.
    pub scoreboard: Option<(RawFd, usize)>,
    /// The workers' notice pipe (read, write).
    pub notice: Option<(RawFd, RawFd)>,
    /// Fork mode's control pipe (read, write).
    pub fork_ctl: Option<(RawFd, RawFd)>,
    /// The relay's two ends (send, receive); `None` from an older master.
    pub relay: Option<(RawFd, RawFd)>,
    /// The vault's two ends (vault.rs), under systemd.
    pub vault: Option<(RawFd, RawFd)>,
    pub children: Vec<PassedChild>,
    /// Connections served by workers gone, and handed to fork-mode
    /// children, so that the counts go on.
    pub served_by_gone: u64,
    pub accepted: u64,
    /// The refusals and datagram drops, by kind, as the log last reported
    /// them, so that the new master reports only what is new. `None` from
    /// an older master.
    pub reported: Option<(Vec<u64>, Vec<u64>)>,
    /// A fork-mode child's `place` is its index in the scoreboard's places
    /// table, counted there; false from an older master, which passes its
    /// client's address, counted in that master's memory only.
    pub places: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err(format!("'{s}' is not hex"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| format!("'{s}' is not hex")))
        .collect()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

fn pair(p: Option<(RawFd, RawFd)>) -> String {
    p.map_or("-".into(), |(a, b)| format!("{a}/{b}"))
}

impl Inheritance {
    /// The text of the environment variable.
    pub fn encode(&self) -> String {
        use std::os::unix::ffi::OsStrExt;
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                format!(
                    "{}/{}/{}",
                    l.fd,
                    l.configured
                        .as_deref()
                        .map_or("-".into(), |a| hex(a.as_bytes())),
                    u8::from(l.owns_file)
                )
            })
            .collect();
        let children: Vec<String> = self
            .children
            .iter()
            .map(|c| match &c.role {
                PassedRole::Worker {
                    kind,
                    slot,
                    ctl,
                    retiring,
                } => format!(
                    "{}/{}/{}/{}/{}/{}",
                    c.pid,
                    c.generation,
                    kind.tag(),
                    opt(*slot),
                    opt(*ctl),
                    u8::from(*retiring)
                ),
                PassedRole::Conn { place, slot } => format!(
                    "{}/{}/c/{}/{}",
                    c.pid,
                    c.generation,
                    place.map_or("-".into(), |p| format!("{p:x}")),
                    opt(*slot)
                ),
            })
            .collect();
        let mut out = vec![
            format!("v={VERSION}"),
            format!("pid={}", self.pid),
            format!("gen={}", self.generation),
            format!("up={}", self.started_secs_ago),
            format!("l={}", listeners.join(",")),
            format!(
                "pidfile={}",
                self.pidfile.as_ref().map_or("-".into(), |(fd, p)| format!(
                    "{fd}/{}",
                    hex(p.as_os_str().as_bytes())
                ))
            ),
            format!("notify={}", opt(self.notify)),
            format!(
                "sb={}",
                self.scoreboard
                    .map_or("-".into(), |(fd, n)| format!("{fd}/{n}"))
            ),
            format!("notice={}", pair(self.notice)),
            format!("ctl={}", pair(self.fork_ctl)),
            format!("relay={}", pair(self.relay)),
            format!("vault={}", pair(self.vault)),
            format!("c={}", children.join(",")),
        ];
        out.push(format!("served={}", self.served_by_gone));
        out.push(format!("accepted={}", self.accepted));
        if self.places {
            out.push("places=1".into());
        }
        if let Some((refused, dropped)) = &self.reported {
            let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join("/");
            out.push(format!("reported={},{}", list(refused), list(dropped)));
        }
        out.join(";")
    }

    /// Reads the environment variable's text back.
    pub fn decode(text: &str) -> Result<Inheritance, String> {
        use std::os::unix::ffi::OsStringExt;
        let mut h = Inheritance::default();
        let mut version = None;
        let num = |k: &str, v: &str| -> Result<u64, String> {
            v.parse().map_err(|_| format!("{k}: '{v}' is not a number"))
        };
        let fd = |v: &str| -> Result<RawFd, String> {
            v.parse().map_err(|_| format!("'{v}' is not a descriptor"))
        };
        fn maybe(v: &str) -> Option<&str> {
            (v != "-").then_some(v)
        }
        let pair = |v: &str| -> Result<Option<(RawFd, RawFd)>, String> {
            match maybe(v) {
                None => Ok(None),
                Some(v) => {
                    let (a, b) = v.split_once('/').ok_or(format!("'{v}' is not a pair"))?;
                    Ok(Some((fd(a)?, fd(b)?)))
                }
            }
        };
        for part in text.split(';') {
            let (k, v) = part.split_once('=').ok_or(format!("'{part}' has no '='"))?;
            match k {
                "v" => version = Some(v.to_string()),
                "pid" => h.pid = num(k, v)? as u32,
                "gen" => h.generation = num(k, v)? as u32,
                "up" => h.started_secs_ago = num(k, v)?,
                "served" => h.served_by_gone = num(k, v)?,
                "accepted" => h.accepted = num(k, v)?,
                "places" => h.places = v == "1",
                "reported" => {
                    let (r, d) = v.split_once(',').ok_or(format!("reported '{v}'"))?;
                    let list = |s: &str| {
                        s.split('/')
                            .filter(|n| !n.is_empty())
                            .map(|n| num(k, n))
                            .collect::<Result<Vec<u64>, String>>()
                    };
                    h.reported = Some((list(r)?, list(d)?));
                }
                "notify" => h.notify = maybe(v).map(fd).transpose()?,
                "notice" => h.notice = pair(v)?,
                "ctl" => h.fork_ctl = pair(v)?,
                "relay" => h.relay = pair(v)?,
                "vault" => h.vault = pair(v)?,
                "sb" => {
                    h.scoreboard = match maybe(v) {
                        None => None,
                        Some(v) => {
                            let (f, n) = v.split_once('/').ok_or(format!("sb '{v}'"))?;
                            Some((fd(f)?, num(k, n)? as usize))
                        }
                    }
                }
                "pidfile" => {
                    h.pidfile = match maybe(v) {
                        None => None,
                        Some(v) => {
                            let (f, p) = v.split_once('/').ok_or(format!("pidfile '{v}'"))?;
                            Some((
                                fd(f)?,
                                PathBuf::from(std::ffi::OsString::from_vec(unhex(p)?)),
                            ))
                        }
                    }
                }
                "l" => {
                    for item in v.split(',').filter(|i| !i.is_empty()) {
                        let f: Vec<&str> = item.split('/').collect();
                        let [fdv, addr, owns] = f[..] else {
                            return Err(format!("listener '{item}'"));
                        };
                        let configured = match maybe(addr) {
                            None => None,
                            Some(a) => Some(
                                String::from_utf8(unhex(a)?)
                                    .map_err(|_| format!("listener '{item}': not UTF-8"))?,
                            ),
                        };
                        h.listeners.push(PassedListener {
                            fd: fd(fdv)?,
                            configured,
                            owns_file: owns == "1",
                        });
                    }
                }
                "c" => {
                    for item in v.split(',').filter(|i| !i.is_empty()) {
                        let bad = || format!("child '{item}'");
                        let f: Vec<&str> = item.split('/').collect();
                        let role = match f[..] {
                            [_, _, tag, slot, ctl, retiring]
                                if Kind::from_tag(tag).is_some_and(Kind::is_worker) =>
                            {
                                PassedRole::Worker {
                                    kind: Kind::from_tag(tag).ok_or_else(bad)?,
                                    slot: maybe(slot)
                                        .map(|s| num("slot", s))
                                        .transpose()?
                                        .map(|s| s as usize),
                                    ctl: maybe(ctl).map(fd).transpose()?,
                                    retiring: retiring == "1",
                                }
                            }
                            [_, _, "c", peer, ref slot @ ..] if slot.len() <= 1 => {
                                PassedRole::Conn {
                                    place: maybe(peer)
                                        .map(|p| u128::from_str_radix(p, 16))
                                        .transpose()
                                        .map_err(|_| bad())?,
                                    // An older master passes no index.
                                    slot: slot
                                        .first()
                                        .and_then(|s| maybe(s))
                                        .map(|s| num("slot", s))
                                        .transpose()?
                                        .map(|s| s as usize),
                                }
                            }
                            _ => return Err(bad()),
                        };
                        h.children.push(PassedChild {
                            pid: f[0].parse().map_err(|_| bad())?,
                            generation: num("generation", f[1])? as u32,
                            role,
                        });
                    }
                }
                _ => {} // a later version's addition: ignored
            }
        }
        match version.as_deref() {
            Some(VERSION) => Ok(h),
            Some(v) => Err(format!(
                "inheritance version {v}, this build reads {VERSION}"
            )),
            None => Err("no inheritance version".into()),
        }
    }

    /// Every descriptor it names: those to keep open across `execve`.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self.listeners.iter().map(|l| l.fd).collect();
        v.extend(self.pidfile.as_ref().map(|(fd, _)| *fd));
        v.extend(self.notify);
        v.extend(self.scoreboard.map(|(fd, _)| fd));
        for (a, b) in [self.notice, self.fork_ctl, self.relay, self.vault]
            .into_iter()
            .flatten()
        {
            v.extend([a, b]);
        }
        v.extend(self.children.iter().filter_map(PassedChild::ctl));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Inheritance {
        Inheritance {
            pid: 4242,
            generation: 3,
            started_secs_ago: 99,
            listeners: vec![
                PassedListener {
                    fd: 5,
                    configured: Some("127.0.0.1:0".into()),
                    owns_file: false,
                },
                PassedListener {
                    fd: 6,
                    configured: Some("unix:/run/a;b,c/d=e.sock".into()),
                    owns_file: true,
                },
                PassedListener {
                    fd: 7,
                    configured: None,
                    owns_file: false,
                },
            ],
            pidfile: Some((8, PathBuf::from("/run/echo-forkd/echo,forkd;1.pid"))),
            notify: Some(9),
            scoreboard: Some((10, 8192)),
            notice: Some((11, 12)),
            fork_ctl: Some((13, 14)),
            relay: Some((17, 18)),
            vault: Some((19, 20)),
            children: vec![
                PassedChild {
                    pid: 100,
                    generation: 3,
                    role: PassedRole::Worker {
                        slot: Some(0),
                        ctl: Some(15),
                        retiring: false,
                        kind: Kind::Pool,
                    },
                },
                PassedChild {
                    pid: 102,
                    generation: 3,
                    role: PassedRole::Worker {
                        slot: Some(1),
                        ctl: Some(16),
                        retiring: true,
                        kind: Kind::Udp,
                    },
                },
                PassedChild {
                    pid: 101,
                    generation: 2,
                    role: PassedRole::Conn {
                        place: Some(0x7f01),
                        slot: Some(3),
                    },
                },
            ],
            served_by_gone: 77,
            accepted: 88,
            reported: Some((vec![1, 0, 2, 0], vec![0, 0, 0, 5, 0, 1])),
            places: true,
        }
    }

    #[test]
    fn what_is_encoded_is_decoded_whatever_the_paths_hold() {
        let h = sample();
        let text = h.encode();
        assert_eq!(Inheritance::decode(&text).unwrap(), h);
        let none = Inheritance {
            pid: 1,
            ..Inheritance::default()
        };
        assert_eq!(Inheritance::decode(&none.encode()).unwrap(), none);
    }

    #[test]
    fn every_passed_descriptor_is_named() {
        let mut fds = sample().fds();
        fds.sort();
        assert_eq!(fds, (5..=20).collect::<Vec<_>>());
    }

    #[test]
    fn garbage_or_another_version_is_refused() {
        let text = sample().encode();
        assert!(Inheritance::decode(&text.replace("v=1", "v=2")).is_err());
        assert!(Inheritance::decode("pid=1").is_err());
        assert!(Inheritance::decode("v=1;l=x/y").is_err());
        assert!(Inheritance::decode("v=1;c=1/2/w").is_err());
        assert!(Inheritance::decode("v=1;pidfile=8/zz").is_err());
    }
}
