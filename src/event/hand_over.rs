//! An event worker's side of the hand-over (relay/, vault.rs): a
//! retiring worker passes each open connection on once nothing it sent
//! waits to go back, to the workers that serve on or, the master
//! restarting or gone, into the vault for the next master; a worker with
//! room takes them as it accepts new ones.

use super::*;
use crate::relay::Offer;
use crate::worker::Dest;

impl<'a> Loop<'a> {
    /// Retiring: lets go of every connection that can go now (nothing
    /// it sent waits to go back and, behind a proxy, its header is read);
    /// the others go as soon as they can. If the relay is full, tries
    /// again shortly, serving them meanwhile.
    pub(super) fn hand_over(&mut self, now: Instant) {
        if self.relay_retry.is_some_and(|t| now < t) {
            return;
        }
        self.relay_retry = None;
        match self.ctx.dest(&self.acceptor) {
            Some(Dest::Workers) => {
                self.ring_hold(true);
                self.hand_to_workers(now);
            }
            Some(Dest::NextMaster) => {
                self.ring_hold(true);
                self.keep_for_next_master();
            }
            None => self.handing_over = false,
        }
        if !self.handing_over {
            // Given up: what was held receives again, and is served here.
            self.ring_hold(false);
        }
    }

    /// What the connection at `index` carries, if it can go now.
    fn movable(&self, index: usize) -> Option<Carried> {
        let o = self.slots.get(index)?.as_ref()?;
        if o.header.is_some() || o.conn.wants_write() || !o.flow.quiet() {
            return None;
        }
        Some(Carried {
            tcp: o.tcp,
            client: o.client,
            place: o.ticket.as_ref().and_then(Ticket::place),
            progress: o.conn.progress(),
        })
    }

    /// Takes the connection at `index` out of this loop: it lives on
    /// elsewhere.
    fn let_go(&mut self, index: usize) -> Option<Open<'a>> {
        let mut o = self.slots.get_mut(index)?.take()?;
        // Out of this epoll set first: the registration is the
        // connection's, which lives on in the receiver; and a poll of the
        // ring's is cancelled (it took nothing from the socket).
        let _ = self.epoll.delete(o.conn.fd());
        if let Some(r) = self.ring.as_deref_mut() {
            r.forget(&mut o.flow, index, o.serial);
        }
        self.free.push(index);
        self.open -= 1;
        o.log_end(&End::HandOver);
        Some(o)
    }

    fn hand_to_workers(&mut self, now: Instant) {
        if !self.acceptor.hands_over() {
            self.handing_over = false;
            return;
        }
        for index in 0..self.slots.len() {
            let Some(carried) = self.movable(index) else {
                continue;
            };
            let Some(Some(o)) = self.slots.get(index) else {
                continue;
            };
            match self
                .acceptor
                .hand_over(o.conn.fd(), &carried, self.ctx.board)
            {
                None => continue,
                Some(Offer::Sent) => {
                    if let Some(t) = self.let_go(index).and_then(|o| o.ticket) {
                        t.handed_over();
                    }
                    // Dropping it closed this process's copy.
                }
                Some(Offer::Full(e)) => {
                    // Full, or over the descriptors in flight this user
                    // may have: both pass as the receivers take theirs.
                    if e == Errno::ETOOMANYREFS {
                        if let Some(more) = self.refs_warned.hit(now) {
                            warn!("cannot hand a connection over yet: too many descriptors in flight (ETOOMANYREFS, bounded by RLIMIT_NOFILE); trying again ({more} more since the last report)");
                        }
                    }
                    self.relay_retry = Some(now + RELAY_RETRY);
                    return;
                }
                Some(Offer::Failed(e)) => {
                    warn!("cannot hand connections over: {e}; serving them until they end");
                    self.handing_over = false;
                    return;
                }
            }
        }
    }

    /// Puts every connection that can go now in the vault, in one go
    /// (they travel in bags; see vault.rs).
    fn keep_for_next_master(&mut self) {
        let mut conns = Vec::new();
        for index in 0..self.slots.len() {
            let Some(mut carried) = self.movable(index) else {
                continue;
            };
            // The next master counts its clients again.
            carried.place = None;
            if let Some(o) = self.let_go(index) {
                conns.push((o.conn.into_fd(), carried));
            }
        }
        self.ctx.keep_for_next_master(conns);
    }

    /// Takes a connection another worker handed over, as it was.
    pub(super) fn adopt(&mut self, fd: OwnedFd, c: Carried, buf: &mut [u8], now: Instant) {
        let ticket = admission::adopt(self.ctx.board, c.place, Holder::Here);
        let name = log::log_enabled!(log::Level::Debug).then(|| {
            c.client
                .map_or_else(|| worker::peer_name(&fd, c.tcp), |a| a.to_string())
        });
        let conn = Conn::resume(fd, c.progress);
        self.open_conn(conn, Some(ticket), None, name, (c.tcp, c.client), buf, now);
    }
}
