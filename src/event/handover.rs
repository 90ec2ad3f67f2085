//! An event worker's side of the hand-over (relay.rs): a retiring worker
//! passes each open connection on once nothing it sent waits to go back;
//! a worker with room takes them as it accepts new ones.

use super::*;

impl<'a> Loop<'a> {
    /// Retiring: hands over every connection at a moment nothing it sent
    /// waits to go back (and, behind a proxy, its header is read); the
    /// others go as soon as they are. If the relay is full, tries again
    /// shortly, serving them meanwhile.
    pub(super) fn hand_over(&mut self, now: Instant) {
        if self.relay_retry.is_some_and(|t| now < t) {
            return;
        }
        self.relay_retry = None;
        let Some(tx) = &self.ctx.relay_tx else {
            return;
        };
        let board = self.ctx.board;
        for index in 0..self.slots.len() {
            let Some(o) = &self.slots[index] else {
                continue;
            };
            if o.header.is_some() || o.conn.wants_write() {
                continue;
            }
            let carried = Carried {
                tcp: o.tcp,
                client: o.client,
                place: o.ticket.as_ref().and_then(Ticket::place),
                progress: o.conn.progress(),
            };
            match relay::send(tx.as_fd(), o.conn.fd(), &carried, board.relayed()) {
                Ok(()) => {
                    // Out of this epoll set first: the registration is the
                    // connection's, which lives on in the receiver.
                    let _ = self.epoll.delete(o.conn.fd());
                    if let Some(o) = self.slots[index].take() {
                        self.free.push(index);
                        self.open -= 1;
                        o.log_end(&End::HandOver);
                        if let Some(t) = o.ticket {
                            t.handed_over();
                        }
                        // Dropping it closes this process's copy.
                    }
                }
                Err(Errno::EAGAIN) => {
                    self.relay_retry = Some(now + RELAY_RETRY);
                    return;
                }
                Err(e) => {
                    warn!("cannot hand connections over: {e}; serving them until they end");
                    self.handing_over = false;
                    return;
                }
            }
        }
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
