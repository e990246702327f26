//! Coalescing of identical misses: one upstream query per key in flight (R4).
//!
//! The first query for a key becomes the leader and holds a [`Leader`] guard; later ones wait
//! on a watch channel, at most `waiters_per_key` of them. The guard publishes the result when
//! completed, and on drop removes the key — so a leader that fails or is cancelled releases
//! its waiters with an error (they answer SERVFAIL) instead of leaving them hanging. Unlike
//! moka's `try_get_with`, results that must not be cached (TC=1, TTL 0) are still shared.
//!
//! Only misses touch this map; the cache-hit path never does.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hash, Hasher};

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::watch;

use crate::cache::{Entry, Key};

type Result = Option<Arc<Entry>>;

/// The channel is made by the first waiter, under the shard lock: most misses have no
/// waiter, and a watch channel (eight notifiers) is costly to build and to publish on. The
/// leader removes the key under the same lock before it publishes, so any waiter there is
/// made the channel before the leader looks for it.
///
/// The slot holds its key inline: one allocation per miss, not one for the slot and one for
/// the key. A miss is started on the listener's receive thread and usually ends on its reply
/// thread, so each of these allocations is freed by another thread than the one that made it,
/// which glibc's per-thread caches serve worst.
struct Slot {
    key: Key,
    tx: OnceLock<watch::Sender<Option<Result>>>,
    waiters: AtomicUsize,
}

impl Slot {
    fn publish(&self, result: Result) {
        if let Some(tx) = self.tx.get() {
            tx.send_replace(Some(result));
        }
    }
}

/// A slot in its shard's set, found by its key's bytes.
struct Keyed(Arc<Slot>);

impl Borrow<[u8]> for Keyed {
    fn borrow(&self) -> &[u8] {
        self.0.key.as_bytes()
    }
}

// Hash and equality are those of the key's bytes, as `Borrow` requires.
impl Hash for Keyed {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.key.as_bytes().hash(state);
    }
}

impl PartialEq for Keyed {
    fn eq(&self, other: &Keyed) -> bool {
        self.0.key.as_bytes() == other.0.key.as_bytes()
    }
}

impl Eq for Keyed {}

/// Keys are client-chosen names: hashed with a per-process random seed (foldhash), so
/// which keys collide cannot be worked out from outside.
type Shard = Mutex<HashSet<Keyed, RandomState>>;

/// Keys with a query in flight, sharded to keep lock hold times short.
pub struct Inflight {
    /// Shared with the [`Leader`] guards, which own their query's key and so can move to
    /// whichever thread finishes the lookup.
    shards: Arc<[Shard]>,
    hasher: RandomState,
    max_waiters: usize,
}

pub enum Join {
    Leader(Leader),
    Waiter(Waiter),
    /// Too many waiters on this key already.
    Full,
}

impl Inflight {
    pub fn new(max_waiters: usize) -> Inflight {
        Inflight {
            shards: (0..64)
                .map(|_| Mutex::new(HashSet::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            max_waiters,
        }
    }

    fn shard(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % self.shards.len()
    }

    /// `key` is a cache key's bytes ([`Key::as_bytes`]); anything longer than a key can be is
    /// turned away as [`Join::Full`].
    pub fn join(&self, key: &[u8]) -> Join {
        let shard = self.shard(key);
        let mut map = match self.shards[shard].lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(Keyed(slot)) = map.get(key) {
            if slot.waiters.fetch_add(1, Ordering::Relaxed) >= self.max_waiters {
                slot.waiters.fetch_sub(1, Ordering::Relaxed);
                return Join::Full;
            }
            let tx = slot.tx.get_or_init(|| watch::channel(None).0);
            return Join::Waiter(Waiter { rx: tx.subscribe() });
        }
        let Some(key) = Key::from_bytes(key) else {
            return Join::Full;
        };
        let slot = Arc::new(Slot {
            key,
            tx: OnceLock::new(),
            waiters: AtomicUsize::new(0),
        });
        map.insert(Keyed(slot.clone()));
        Join::Leader(Leader {
            shards: self.shards.clone(),
            shard,
            slot,
            done: false,
        })
    }

    /// Keys with a query in flight.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Held by the one query that goes upstream for a key.
pub struct Leader {
    shards: Arc<[Shard]>,
    shard: usize,
    slot: Arc<Slot>,
    done: bool,
}

impl Leader {
    /// The key this leader looks up.
    pub fn key(&self) -> &[u8] {
        self.slot.key.as_bytes()
    }

    /// Publishes the result to every waiter and frees the key.
    pub fn complete(mut self, result: Result) {
        self.release();
        self.slot.publish(result);
        self.done = true;
    }

    fn release(&self) {
        let mut map = match self.shards[self.shard].lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Taken out and put back if it is not this leader's (it always is: a key's slot goes
        // only when its leader is done, and this one is not yet): one hash, not two.
        if let Some(other) = map.take(self.slot.key.as_bytes()) {
            if !Arc::ptr_eq(&other.0, &self.slot) {
                map.insert(other);
            }
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.done {
            self.release();
            self.slot.publish(None);
        }
    }
}

pub struct Waiter {
    rx: watch::Receiver<Option<Result>>,
}

impl Waiter {
    /// The leader's result; `None` if it failed or went away.
    pub async fn wait(mut self) -> Result {
        match self.rx.wait_for(|v| v.is_some()).await {
            Ok(v) => v.clone().flatten(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        Key::new(0, 1, 1, name.as_bytes()).unwrap()
    }

    #[test]
    fn one_leader_per_key_until_it_is_done() {
        let inflight = Inflight::new(2);
        let (a, b) = (key("\x01a"), key("\x01b"));
        let Join::Leader(lead) = inflight.join(a.as_bytes()) else {
            panic!("the first query for a key leads");
        };
        assert_eq!(lead.key(), a.as_bytes());
        assert!(matches!(inflight.join(a.as_bytes()), Join::Waiter(_)));
        assert!(matches!(inflight.join(b.as_bytes()), Join::Leader(_)));
        assert_eq!(inflight.len(), 1, "b's leader was dropped at once");
        lead.complete(None);
        assert!(inflight.is_empty());
        assert!(matches!(inflight.join(a.as_bytes()), Join::Leader(_)));
    }

    #[test]
    fn waiters_are_capped_and_bytes_longer_than_any_key_are_turned_away() {
        let inflight = Inflight::new(1);
        let a = key("\x01a");
        let _lead = inflight.join(a.as_bytes());
        assert!(matches!(inflight.join(a.as_bytes()), Join::Waiter(_)));
        assert!(matches!(inflight.join(a.as_bytes()), Join::Full));
        assert!(matches!(inflight.join(&[0u8; 300]), Join::Full));
    }
}
