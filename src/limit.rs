//! Per-client-address counters with a cap: TCP connections per address (R12) and pending
//! queries per address (R9). A [`Slot`] holds one unit and gives it back on drop, so a count
//! can never leak on an early return or a cancelled task.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts units per client address, at most `max` each.
pub struct PerClient {
    /// Client addresses, hashed with a per-process random seed.
    counts: Mutex<HashMap<IpAddr, usize, foldhash::fast::RandomState>>,
    max: usize,
}

/// One unit held for `ip`.
pub struct Slot {
    table: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    pub fn new(max: usize) -> Arc<PerClient> {
        Arc::new(PerClient {
            counts: Mutex::new(HashMap::default()),
            max,
        })
    }

    /// Takes a unit for `ip`, or `None` when it already holds `max`.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut t = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = t.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            table: self.clone(),
            ip,
        })
    }

    /// Units held by `ip` now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let t = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        t.get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = t.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_and_releases_on_drop() {
        let t = PerClient::new(2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = t.acquire(ip).unwrap();
        let _b = t.acquire(ip).unwrap();
        assert!(t.acquire(ip).is_none());
        assert!(t.acquire("192.0.2.2".parse().unwrap()).is_some());
        drop(a);
        assert_eq!(t.held(ip), 1);
        assert!(t.acquire(ip).is_some());
    }
}
