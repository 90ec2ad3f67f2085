//! The scoreboard's hash tables, keyed by a client's source (see
//! `admission`): counts in one-second windows for the connection and
//! datagram rates, and places for `--max-per-ip`. Sources that share a
//! bucket share its count, which errs towards refusing; the hash is
//! seeded so that clients cannot choose their collisions. A place is a
//! bucket's index, so that whoever holds one can publish it in a single
//! word (its slot's, or a fork-mode child's), which the master takes back
//! if the holder dies: one atomic swap decides who gives it back.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Region, Scoreboard, HASH_SEED, PLACES_EPOCH};

/// Buckets of each rate table.
pub(super) const RATE_BUCKETS: usize = 8192;
/// Buckets of the places table: 64 Ki keep shared counts rare.
pub(super) const PLACE_BUCKETS: usize = 65_536;
/// The most fork-mode children at once (`max-children`'s ceiling): the
/// scoreboard keeps a word of places for each.
pub const MAX_CHILDREN: u32 = 65_536;
/// Words of fork-mode children's places, one per child at most.
pub(super) const FORK_HELD: usize = MAX_CHILDREN as usize;

/// A source's bucket in the places table: what a holder publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place(usize);

impl Place {
    /// As published in a word (0 is "none").
    pub(super) fn word(self) -> u64 {
        self.0 as u64 + 1
    }

    /// From a published word.
    pub(super) fn from_word(w: u64) -> Option<Place> {
        (w != 0 && w <= PLACE_BUCKETS as u64).then(|| Place(w as usize - 1))
    }

    /// The number passed on to a new master (the same scoreboard's).
    pub fn index(self) -> usize {
        self.0
    }

    /// A place passed on by an old master.
    pub fn from_index(i: usize) -> Option<Place> {
        (i < PLACE_BUCKETS).then_some(Place(i))
    }
}

impl Scoreboard {
    pub(super) fn region(&self, r: Region) -> &[AtomicU64] {
        &self.mem.words()[r.range(self.slots)]
    }

    /// The source's hash, seeded so that clients cannot choose collisions.
    fn hash(&self, source: u128) -> usize {
        let mut h = self.header(HASH_SEED).load(Ordering::Relaxed)
            ^ (source as u64)
            ^ ((source >> 64) as u64).rotate_left(29);
        // splitmix64's finaliser.
        h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^= h >> 31;
        h as usize
    }

    /// Counts a new connection from `source` in the current one-second
    /// window and says whether it is within `limit`; each window starts
    /// from zero, so a refusal is a pause, never a ban.
    pub fn conn_rate_ok(&self, source: u128, limit: u32) -> bool {
        let t = self.region(Region::ConnRate);
        self.count_in_window(&t[self.hash(source) % t.len()], limit)
    }

    /// As [`Scoreboard::conn_rate_ok`], for a datagram, in a table of
    /// its own.
    pub fn datagram_rate_ok(&self, source: u128, limit: u32) -> bool {
        let t = self.region(Region::DatagramRate);
        self.count_in_window(&t[self.hash(source) % t.len()], limit)
    }

    fn count_in_window(&self, b: &AtomicU64, limit: u32) -> bool {
        let second = (self.elapsed_us() / 1_000_000) & 0xffff_ffff;
        let mut cur = b.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == second {
                // The count stays in its 32 bits.
                (cur & !0xffff_ffff) | ((cur & 0xffff_ffff) + 1).min(0xffff_ffff)
            } else {
                (second << 32) | 1
            };
            match b.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return next & 0xffff_ffff <= u64::from(limit),
                Err(seen) => cur = seen,
            }
        }
    }

    /// The place of `source`.
    pub fn place_of(&self, source: u128) -> Place {
        Place(self.hash(source) % PLACE_BUCKETS)
    }

    fn place(&self, p: Place) -> &AtomicU64 {
        &self.region(Region::Places)[p.0]
    }

    /// Takes a place at `p` if that keeps it within `limit`; false
    /// (nothing taken) if not.
    pub fn take_place(&self, p: Place, limit: u32) -> bool {
        let b = self.place(p);
        let mut cur = b.load(Ordering::Relaxed);
        loop {
            if cur >= u64::from(limit) {
                return false;
            }
            match b.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    /// Counts a place at `p` whatever the limit (one held before the
    /// table was rebuilt, or passed on by an older master).
    pub fn recount_place(&self, p: Place) {
        self.place(p).fetch_add(1, Ordering::Relaxed);
    }

    /// Gives a place at `p` back.
    pub fn give_place(&self, p: Place) {
        // Never below zero, even for a count a rebuild already dropped.
        let _ = self
            .place(p)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The places table's generation: when it changes, every event worker
    /// counts the places it holds into it again.
    #[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
    pub fn places_epoch(&self) -> u64 {
        self.header(PLACES_EPOCH).load(Ordering::Acquire)
    }

    /// Master, after an event worker died holding places (which it could
    /// not publish one by one): empties the table and asks the live
    /// workers to count theirs again. Until they do, counts are low,
    /// which errs towards admitting, for a moment.
    pub fn rebuild_places(&self) {
        for w in self.region(Region::Places) {
            if w.load(Ordering::Relaxed) != 0 {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.header(PLACES_EPOCH).fetch_add(1, Ordering::AcqRel);
    }

    /// The word where the fork-mode child at `index` publishes its place.
    pub fn fork_held(&self, index: usize) -> &AtomicU64 {
        let t = self.region(Region::ForkHeld);
        &t[index % t.len()]
    }
}

/// The bit of a fork-mode child's word that says it accepted its
/// connection (see [`mark_taken`]); the place is in the bits below.
const TAKEN: u64 = 1 << 62;

/// Takes the place published in `w`, if any: whoever takes it gives it
/// back, exactly once. Whether the child took a connection stays said.
pub fn take_held(w: &AtomicU64) -> Option<Place> {
    Place::from_word(w.fetch_and(TAKEN, Ordering::AcqRel) & !TAKEN)
}

/// Publishes `p` in `w`.
pub fn hold(w: &AtomicU64, p: Place) {
    let _ = w.fetch_update(Ordering::Release, Ordering::Relaxed, |old| {
        Some(old & TAKEN | p.word())
    });
}

/// A fork-mode child forked to accept says in its word that it took a
/// connection (the master then forks the next one).
pub fn mark_taken(w: &AtomicU64) {
    w.fetch_or(TAKEN, Ordering::Release);
}

/// Whether the child whose word is `w` took a connection.
pub fn taken(w: &AtomicU64) -> bool {
    w.load(Ordering::Acquire) & TAKEN != 0
}

/// Clears `w` for a new child.
pub fn clear(w: &AtomicU64) {
    w.store(0, Ordering::Release);
}
