//! Coalescing of identical misses: one upstream query per key in flight (R4).
//!
//! The first query for a key becomes the leader and holds a [`Leader`] guard; later ones wait
//! on a watch channel, at most `waiters_per_key` of them. The guard publishes the result when
//! completed, and on drop removes the key — so a leader that fails or is cancelled releases
//! its waiters with an error (they answer SERVFAIL) instead of leaving them hanging. Unlike
//! moka's `try_get_with`, results that must not be cached (TC=1, TTL 0) are still shared.
//!
//! Only misses touch this map; the cache-hit path never does.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::watch;

use crate::cache::Entry;

type Result = Option<Arc<Entry>>;

/// The channel is made by the first waiter, under the shard lock: most misses have no
/// waiter, and a watch channel (eight notifiers) is costly to build and to publish on. The
/// leader removes the key under the same lock before it publishes, so any waiter there is
/// made the channel before the leader looks for it.
struct Slot {
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

/// Keys are client-chosen names: hashed with a per-process random seed (foldhash), so
/// which keys collide cannot be worked out from outside.
type Shard = Mutex<HashMap<Arc<[u8]>, Arc<Slot>, RandomState>>;

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
                .map(|_| Mutex::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            max_waiters,
        }
    }

    fn shard(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % self.shards.len()
    }

    pub fn join(&self, key: &[u8]) -> Join {
        let shard = self.shard(key);
        let mut map = match self.shards[shard].lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(slot) = map.get(key) {
            if slot.waiters.fetch_add(1, Ordering::Relaxed) >= self.max_waiters {
                slot.waiters.fetch_sub(1, Ordering::Relaxed);
                return Join::Full;
            }
            let tx = slot.tx.get_or_init(|| watch::channel(None).0);
            return Join::Waiter(Waiter { rx: tx.subscribe() });
        }
        let slot = Arc::new(Slot {
            tx: OnceLock::new(),
            waiters: AtomicUsize::new(0),
        });
        let key: Arc<[u8]> = key.into();
        if let MapEntry::Vacant(v) = map.entry(key.clone()) {
            v.insert(slot.clone());
        }
        Join::Leader(Leader {
            shards: self.shards.clone(),
            shard,
            key,
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
    key: Arc<[u8]>,
    slot: Arc<Slot>,
    done: bool,
}

impl Leader {
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
        if map
            .get(&*self.key)
            .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
        {
            map.remove(&*self.key);
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
