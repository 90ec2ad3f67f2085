//! An event worker's door: connections taken (new ones through the
//! admission gate, admission.rs; handed-over ones as they were), put in
//! the slab and the epoll set, and, behind a load balancer, their PROXY
//! header read as it comes before the client it names is checked.

use super::*;
use crate::admission::Gate;
use crate::event::ring;

impl<'a> Loop<'a> {
    /// Accepts while there is room, up to a batch (connections handed
    /// over by retiring workers first); at the cap (or paused after a
    /// resource error) [`Loop::arm`] takes the listeners out.
    pub(super) fn accept(&mut self, buf: &mut [u8], now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            if self.stopping || self.open >= self.max_open {
                break;
            }
            let room = self.open < self.fd_room;
            match self.acceptor.next(now, self.ctx.board, room) {
                None => break,
                Some(Incoming::New(i, conn)) => {
                    let tcp = self.acceptor.listeners()[i].is_tcp();
                    self.admit(conn, tcp, buf, now);
                }
                Some(Incoming::Relayed(conn, carried)) => self.adopt(conn, carried, buf, now),
            }
            if self.max_requests != 0 && self.accepted >= self.max_requests {
                debug!(
                    "accepted {} connections; retiring: they go to other workers",
                    self.accepted
                );
                self.stop(now);
            }
        }
    }

    /// Checks a new connection's client, then opens it and serves what it
    /// already sent. Behind a proxy only the proxy is checked here; the
    /// client is, once its header is read.
    fn admit(&mut self, fd: OwnedFd, tcp: bool, buf: &mut [u8], now: Instant) {
        let policy = &self.ctx.policy;
        let (ticket, header) = match policy.gate(self.ctx.board, fd.as_fd(), tcp, Holder::Here) {
            Gate::Admit(_, ticket) => (ticket, None),
            Gate::Header(proxy) => {
                let reader = Box::new(proxy::Reader::new(now, policy.proxy_timeout));
                (None, Some((reader, proxy)))
            }
            Gate::Refuse => return, // closed at once, unread
        };
        let name = (header.is_none() && log::log_enabled!(log::Level::Debug))
            .then(|| worker::peer_name(&fd, tcp));
        let conn = Conn::new(fd, now);
        // max-requests counts the connections this worker accepted, not
        // those handed to it.
        self.accepted += 1;
        self.open_conn(conn, ticket, header, name, (tcp, None), buf, now);
    }

    /// Puts a connection in the slab and the epoll set, with its deadlines,
    /// and serves what its client already sent.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_conn(
        &mut self,
        conn: Conn,
        ticket: Option<Ticket<'a>>,
        header: Option<(Box<proxy::Reader>, SocketAddr)>,
        name: Option<String>,
        (tcp, client): (bool, Option<SocketAddr>),
        buf: &mut [u8],
        now: Instant,
    ) {
        let index = self.free.pop().unwrap_or(self.slots.len());
        let token = index as u64;
        if self.ring.is_none() {
            if let Err(e) = self
                .epoll
                .add(conn.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))
            {
                warn!("cannot watch a new connection: {e}");
                self.free.push(index);
                return;
            }
        }
        if index == self.slots.len() {
            self.slots.push(None);
        }
        self.serial += 1;
        if let Some(t) = conn.deadline(&self.ctx.limits) {
            self.deadlines.push(Reverse((t, index, self.serial)));
        }
        if let Some((r, _)) = &header {
            self.deadlines
                .push(Reverse((r.deadline, index, self.serial)));
        }
        let flow = ring::Flow::after(conn.bytes());
        self.slots[index] = Some(Open {
            conn,
            serial: self.serial,
            ticket,
            writing: false,
            name,
            tcp,
            client,
            header,
            flow,
        });
        self.open += 1;
        if self.ring.is_some() {
            self.ring_start(index);
            return;
        }
        // Clients speak first: their bytes are usually here already.
        self.ready(index, buf, now);
    }

    /// Behind a proxy: reads the header of the connection at `index`.
    /// True once it is read and its client admitted; false while it is
    /// still coming, or when the connection was refused (and closed).
    pub(super) fn header(&mut self, index: usize) -> bool {
        let Some(Some(o)) = self.slots.get_mut(index) else {
            return false;
        };
        let Some((reader, proxy)) = &mut o.header else {
            return true;
        };
        let client = match reader.pull(o.conn.fd()) {
            None => return false,
            Some(Ok(proxy::Header::Proxied { src, .. })) => src,
            Some(Ok(proxy::Header::Local)) => *proxy,
            Some(Err(why)) => {
                self.unserved(index, why);
                return false;
            }
        };
        match self.ctx.policy.check(self.ctx.board, client, Holder::Here) {
            Some(ticket) => {
                if let Some(Some(o)) = self.slots.get_mut(index) {
                    o.header = None;
                    o.ticket = Some(ticket);
                    o.client = Some(client);
                    if log::log_enabled!(log::Level::Debug) {
                        o.name = Some(client.to_string());
                    }
                }
                true
            }
            None => {
                self.remove(index);
                false
            }
        }
    }

    /// Closes a connection refused before it was served, unread (the
    /// gate counted why).
    fn remove(&mut self, index: usize) -> bool {
        let Some(mut o) = self.slots.get_mut(index).and_then(Option::take) else {
            return false;
        };
        if let Some(r) = self.ring.as_deref_mut() {
            r.forget(&mut o.flow, index, o.serial);
        }
        self.free.push(index);
        self.open -= 1;
        true
    }

    /// Closes the connection at `index`, whose PROXY header did not come
    /// for `why` (see [`admission::unserved_behind_proxy`]).
    pub(super) fn unserved(&mut self, index: usize, why: &str) {
        if self.remove(index) {
            admission::unserved_behind_proxy(self.ctx.board, why);
        }
    }
}
