//! The answer cache: the only code that knows moka, and the TTL policy.
//!
//! Keys are built from the wire question without a full parse ([`Key`]): the flag byte
//! (DO, CD, RD, EDNS present, chase), type, class and the lowercased name. A lookup compares
//! the whole key (moka hashes and then checks equality), never a hash alone (R5).
//!
//! Each [`Entry`] carries its own expiry on the tokio clock, so tests can pause time, and
//! moka gets the same lifetime through [`Expiry`] so memory is released when entries die.
//! `expire_after_update` is overridden: without it a re-inserted key keeps its old deadline.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache as Moka;
use moka::Expiry;
use tokio::time::Instant;

use crate::config::CacheConfig;
use crate::metrics::{CacheStats, Metrics};
use crate::response::{clamp_ttl, Prepared};
use crate::wire::{self, Header, Query};

/// Flag bits of the first key octet.
pub mod keyflag {
    pub const DO: u8 = 0x01;
    pub const CD: u8 = 0x02;
    pub const RD: u8 = 0x04;
    pub const EDNS: u8 = 0x08;
    /// A chase lookup through the resolver, never shared with client queries sent upstream.
    pub const CHASE: u8 = 0x10;
    /// AD=1 in the query asks for the AD bit in the answer (RFC 6840 5.7).
    pub const AD: u8 = 0x20;
    /// The lookup of a zone-stored ALIAS record at the upstream.
    pub const ZONE_ALIAS: u8 = 0x40;
}

/// A cache key built on the stack: no allocation on the hit path.
pub struct Key {
    buf: [u8; 5 + wire::MAX_NAME_LEN],
    len: usize,
}

impl Key {
    /// `flags`, type, class, then the name lowercased.
    pub fn new(flags: u8, qtype: u16, qclass: u16, name: &[u8]) -> Option<Key> {
        if name.len() > wire::MAX_NAME_LEN {
            return None;
        }
        let mut buf = [0u8; 5 + wire::MAX_NAME_LEN];
        buf[0] = flags;
        buf[1..3].copy_from_slice(&qtype.to_be_bytes());
        buf[3..5].copy_from_slice(&qclass.to_be_bytes());
        for (d, s) in buf[5..].iter_mut().zip(name) {
            *d = s.to_ascii_lowercase();
        }
        Some(Key {
            buf,
            len: 5 + name.len(),
        })
    }

    /// The key of a client query, or `None` when the answer must not be shared: an opcode
    /// other than QUERY, or an option asking for the server's own data or the client's subnet
    /// (NSID, EXPIRE, ECS ...: the answer is for this client, R24).
    pub fn for_query(q: &Query<'_>) -> Option<Key> {
        if q.header.opcode() != wire::OPCODE_QUERY || q.edns.is_some_and(|e| e.asks_server_data) {
            return None;
        }
        let mut f = 0;
        if q.do_bit() {
            f |= keyflag::DO;
        }
        if q.header.has(wire::FLAG_CD) {
            f |= keyflag::CD;
        }
        if q.header.has(wire::FLAG_RD) {
            f |= keyflag::RD;
        }
        if q.edns.is_some() {
            f |= keyflag::EDNS;
        }
        if q.header.has(wire::FLAG_AD) {
            f |= keyflag::AD;
        }
        Key::new(f, q.qtype, q.qclass, q.qname())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The key whose [`Key::as_bytes`] are `bytes`; `None` if a key cannot be that long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Key> {
        let mut buf = [0u8; 5 + wire::MAX_NAME_LEN];
        buf.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(Key {
            buf,
            len: bytes.len(),
        })
    }
}

/// What kind of answer an entry holds (for the TTL rule that made it, and for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Positive,
    Flattened,
    Negative,
    Failure,
    /// Not cacheable (TC=1, TTL 0, no SOA ...): shared with coalesced waiters only.
    Uncached,
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    pub answer: Prepared,
    pub kind: Kind,
    /// Made by flatdns, not received: the SERVFAIL it answers when no upstream did.
    pub local: bool,
    pub stored: Instant,
    pub expires: Instant,
}

impl Entry {
    pub fn new(answer: Prepared, kind: Kind, lifetime: u32, now: Instant) -> Entry {
        let kind = if lifetime == 0 { Kind::Uncached } else { kind };
        Entry {
            answer,
            kind,
            local: false,
            stored: now,
            expires: now + Duration::from_secs(lifetime.into()),
        }
    }
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.expires
    }
    /// Whole seconds since the entry was stored, for TTL countdown (R6).
    pub fn age(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.stored)
            .as_secs()
            .min(u32::MAX.into()) as u32
    }
    fn lifetime(&self) -> Duration {
        self.expires.saturating_duration_since(self.stored)
    }
    /// Whether RFC 8767 allows serving this entry after it expired: answers, not failures.
    pub fn may_serve_stale(&self) -> bool {
        matches!(self.kind, Kind::Positive | Kind::Flattened | Kind::Negative)
    }
}

/// A key as moka stores it: inline up to 48 octets (a name of up to 43, which is nearly every
/// name), spilled to the heap beyond. moka puts every key in an `Arc` of its own, so a boxed
/// key was one more allocation per cached entry. It hashes and compares as the `[u8]` it
/// holds, so lookups by `&[u8]` find it.
type StoredKey = smallvec::SmallVec<[u8; 48]>;

/// Tells moka when to drop an entry: at its expiry, plus the serve-stale window if any.
struct Expire {
    stale: Duration,
}

impl Expire {
    fn keep(&self, v: &Entry) -> Duration {
        if v.may_serve_stale() {
            v.lifetime() + self.stale
        } else {
            v.lifetime()
        }
    }
}

impl Expiry<StoredKey, Arc<Entry>> for Expire {
    fn expire_after_create(
        &self,
        _: &StoredKey,
        v: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.keep(v))
    }
    fn expire_after_update(
        &self,
        _: &StoredKey,
        v: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.keep(v))
    }
}

/// In front of a full cache: a one-bit-per-slot filter of the keys seen lately, so a key is
/// cached only on its second miss (the "doorkeeper" of TinyLFU).
///
/// Why: once the cache is full, every insert makes moka evict (or, by its admission policy,
/// reject) an entry, and at 100,000 entries that entry is cold in the CPU caches. Measured on
/// the e2e miss scenario, a miss cost ~6 us more with the cache full than filling (34.5 to
/// 41 us/q). A name asked only once (a flood of random names, the benchmark's misses) gains
/// nothing from being cached and would only push out one that is asked again; dnsdist does
/// not cache at all when full. Here a name seen before does get in, so a name asked twice
/// is cached from its second miss on, and moka's TinyLFU still decides what it replaces.
///
/// Every insert marks its key too, and a key moka still holds is replaced whatever the
/// filter says, so an entry that is refreshed is normally still known. Under a flood that
/// clears the filter often, an expired entry's refresh can be skipped once (its next miss
/// caches it), and so can a name's first failure (R8) or negative answer (R7).
///
/// The filter holds 8 bits per cache entry (at least 4,096 bits, at most 2^27: 16 MiB) and is
/// cleared once 1/8 of its bits are set, so it remembers at least as many names as the cache
/// holds (up to 16.7M entries), and a false "seen" (at most 1 in 8) just lets that answer in.
struct Doorkeeper {
    bits: Box<[AtomicU64]>,
    mask: u64,
    hasher: foldhash::fast::RandomState,
    marks: AtomicU64,
    clear_after: u64,
}

impl Doorkeeper {
    fn new(capacity: u64) -> Doorkeeper {
        let nbits = capacity
            .saturating_mul(8)
            .clamp(1 << 12, 1 << 27)
            .next_power_of_two();
        Doorkeeper {
            bits: (0..nbits / 64).map(|_| AtomicU64::new(0)).collect(),
            mask: nbits - 1,
            hasher: foldhash::fast::RandomState::default(),
            marks: AtomicU64::new(0),
            clear_after: nbits / 8,
        }
    }

    /// Marks `key`; whether it was marked already.
    fn seen(&self, key: &[u8]) -> bool {
        use std::hash::BuildHasher;
        let bit = self.hasher.hash_one(key) & self.mask;
        let (Some(word), flag) = (self.bits.get((bit >> 6) as usize), 1u64 << (bit & 63)) else {
            return false;
        };
        if word.fetch_or(flag, Ordering::Relaxed) & flag != 0 {
            return true;
        }
        if self.marks.fetch_add(1, Ordering::Relaxed) + 1 >= self.clear_after {
            self.marks.store(0, Ordering::Relaxed);
            for w in self.bits.iter() {
                w.store(0, Ordering::Relaxed);
            }
        }
        false
    }
}

/// The bounded answer cache. A size of 0 disables it.
pub struct Cache {
    inner: Option<Moka<StoredKey, Arc<Entry>, foldhash::fast::RandomState>>,
    doorkeeper: Doorkeeper,
    /// Wire bytes of every answer inserted (for the size estimate in the metrics).
    inserted_bytes: Arc<AtomicU64>,
    policy: CacheConfig,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(policy: &CacheConfig) -> Cache {
        Cache::with_metrics(policy, Arc::new(Metrics::new()))
    }

    /// A cache that counts its insertions in `metrics` and reports what it holds there when
    /// scraped ([`Metrics::watch_cache`]). No eviction listener: see `CacheGauges` in
    /// `metrics.rs` for what one would cost.
    pub fn with_metrics(policy: &CacheConfig, metrics: Arc<Metrics>) -> Cache {
        let inner = (policy.size > 0).then(|| {
            Moka::builder()
                .max_capacity(policy.size)
                // The table sized up front (up to a million entries, ~16 MB of buckets at
                // most): no rehashing while a cold cache fills.
                .initial_capacity(policy.size.min(1 << 20) as usize)
                .expire_after(Expire {
                    stale: policy.stale.map_or(Duration::ZERO, |s| s.max_age),
                })
                // Keys are client-chosen names: a per-process random seed, and foldhash
                // rather than SipHash (the key is hashed on every lookup and insert).
                .build_with_hasher(foldhash::fast::RandomState::default())
        });
        let inserted_bytes = Arc::new(AtomicU64::new(0));
        // The insertion counter, not the whole `Metrics`: that owns this closure (no cycle).
        let (probe, bytes, insertions) = (
            inner.clone(),
            inserted_bytes.clone(),
            metrics.cache_insertions.clone(),
        );
        let capacity = policy.size;
        // Inserts can land between the two reads below: the counter never goes back.
        let removed = AtomicU64::new(0);
        metrics.watch_cache(move || {
            let entries = probe.as_ref().map_or(0, |c| {
                c.run_pending_tasks();
                c.entry_count()
            });
            let inserted = insertions.get();
            let mean = bytes
                .load(Ordering::Relaxed)
                .checked_div(inserted)
                .unwrap_or(0);
            CacheStats {
                entries,
                bytes: entries.saturating_mul(mean),
                capacity,
                removals: removed
                    .fetch_max(inserted.saturating_sub(entries), Ordering::Relaxed)
                    .max(inserted.saturating_sub(entries)),
            }
        });
        Cache {
            inner,
            doorkeeper: Doorkeeper::new(policy.size),
            inserted_bytes,
            policy: policy.clone(),
            metrics,
        }
    }

    /// Drops every entry (SIGHUP with `flush_on_reload`).
    pub fn clear(&self) {
        if let Some(c) = &self.inner {
            c.invalidate_all();
            c.run_pending_tasks();
        }
    }

    /// A fresh entry for `key`, if any.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Arc<Entry>> {
        self.lookup(key, now).ok()
    }

    /// [`Cache::get`], telling a miss apart: `Err(true)` when an expired entry is still held
    /// for `key` (an answer to it replaces that entry), `Err(false)` when none is.
    pub fn lookup(&self, key: &[u8], now: Instant) -> Result<Arc<Entry>, bool> {
        let e = self.inner.as_ref().and_then(|c| c.get(key)).ok_or(false)?;
        if e.is_fresh(now) {
            Ok(e)
        } else {
            Err(true)
        }
    }

    /// An expired entry still inside the serve-stale window, if serve-stale is on.
    pub fn get_stale(&self, key: &[u8], now: Instant) -> Option<Arc<Entry>> {
        let window = self.policy.stale?.max_age;
        let e = self.inner.as_ref()?.get(key)?;
        (e.may_serve_stale() && !e.is_fresh(now) && now < e.expires + window).then_some(e)
    }

    pub fn insert(&self, key: &[u8], entry: Arc<Entry>) {
        self.insert_known(key, entry, None);
    }

    /// [`Cache::insert`], for a caller that knows from its own [`Cache::lookup`] whether
    /// an entry is held for `key` (`held`), so a full cache need not be probed again to
    /// learn whether this insert replaces one. The probe is the costlier half of a miss's
    /// cache work once the table is too big for the CPU caches. What the lookup saw can have
    /// changed since (a held entry evicted in the meantime; coalescing keeps any other
    /// lookup of the key from inserting it): then the insert errs only as the doorkeeper
    /// already allows for, with one entry more evicted.
    pub fn insert_known(&self, key: &[u8], entry: Arc<Entry>, held: Option<bool>) {
        if let Some(c) = &self.inner {
            // A failure must not evict an answer that serve-stale could still give (RFC 8767:
            // stale data is for exactly the time the upstream fails).
            if entry.kind == Kind::Failure && self.get_stale(key, entry.stored).is_some() {
                return;
            }
            if entry.kind != Kind::Uncached {
                let seen = self.doorkeeper.seen(key);
                // A key moka still holds is a replacement: it evicts nothing.
                if !seen
                    && c.entry_count() >= self.policy.size
                    && !held.unwrap_or_else(|| c.contains_key(key))
                {
                    self.metrics.cache_skipped.inc();
                    return;
                }
                self.metrics.cache_insertions.inc();
                self.inserted_bytes
                    .fetch_add(entry.answer.len() as u64, Ordering::Relaxed);
                c.insert(StoredKey::from_slice(key), entry);
            }
        }
    }

    /// Entries currently held (moka's count is eventually consistent).
    pub fn entry_count(&self) -> u64 {
        self.inner.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// Applies the TTL rules to every record of `reply` and prepares it for sharing.
    pub fn prepare(&self, reply: &[u8]) -> Option<Prepared> {
        let (min, max) = (self.policy.min_ttl, self.policy.max_ttl);
        Prepared::new(reply, |t| clamp_ttl(t, min, max))
    }

    /// Builds the entry for an upstream reply (RFC 2308 for negative answers, RFC 9520 for
    /// failures). `None` when the reply cannot be prepared for sharing.
    ///
    /// `cap` bounds the lifetime further (a fallback answer lives no longer than its reason).
    /// Every TTL in the stored message is capped at the lifetime, so no client is told to
    /// keep a record longer than flatdns itself keeps it (an SOA in a negative answer, say).
    pub fn entry_for(&self, reply: &[u8], now: Instant, cap: Option<u32>) -> Option<Entry> {
        let mut p = self.prepare(reply)?;
        let (kind, lifetime) = self.lifetime(p.wire());
        let lifetime = cap.map_or(lifetime, |c| lifetime.min(c));
        p.cap_ttls(lifetime);
        Some(Entry::new(p, kind, lifetime, now))
    }

    /// How long a (prepared) reply may be served from the cache, in seconds; 0 = not at all.
    ///
    /// - TC=1, an extended rcode, or an rcode other than those below: not cached.
    /// - NOERROR with answers, or a referral (NS in authority, no SOA): the smallest TTL of
    ///   any record, so no record is ever served past its own TTL.
    /// - NXDOMAIN, or NOERROR without answers but with an SOA in authority: min(SOA TTL,
    ///   SOA MINIMUM), capped at `negative_ttl_max` (RFC 2308 section 5). No SOA: not cached.
    /// - SERVFAIL or REFUSED: `failure_ttl` (RFC 9520 section 3.2).
    pub fn lifetime(&self, msg: &[u8]) -> (Kind, u32) {
        let Some(h) = Header::read(msg) else {
            return (Kind::Uncached, 0);
        };
        if h.has(wire::FLAG_TC) {
            return (Kind::Uncached, 0);
        }
        let mut min_all = u32::MAX;
        let mut soa = None;
        let mut ns = false;
        let mut ext_rcode = 0;
        let walked = wire::walk_records(msg, |r| {
            if r.rtype == wire::TYPE_OPT {
                ext_rcode = (r.ttl(msg) >> 24) as u8;
                return;
            }
            min_all = min_all.min(r.ttl(msg));
            if r.section == wire::Section::Authority {
                match r.rtype {
                    wire::TYPE_SOA if r.rdata.len() >= 22 && soa.is_none() => {
                        let minimum = wire::u32_at(msg, r.rdata.end - 4).unwrap_or(0);
                        soa = Some(r.ttl(msg).min(minimum));
                    }
                    2 => ns = true,
                    _ => {}
                }
            }
        });
        if walked.is_err() || ext_rcode != 0 {
            return (Kind::Uncached, 0);
        }
        match h.rcode() {
            // No record at all (an OPT counted as an answer): nothing to time it by.
            wire::RCODE_NOERROR if h.ancount > 0 && min_all == u32::MAX => (Kind::Uncached, 0),
            wire::RCODE_NOERROR if h.ancount > 0 => (Kind::Positive, min_all),
            // A negative answer lives no longer than any record in it (a CNAME before the
            // NXDOMAIN, say) nor than the RFC 2308 SOA rule allows.
            wire::RCODE_NOERROR | wire::RCODE_NXDOMAIN => match soa {
                Some(t) => (
                    Kind::Negative,
                    t.min(min_all).min(self.policy.negative_ttl_max),
                ),
                None if ns && h.rcode() == wire::RCODE_NOERROR => (Kind::Positive, min_all),
                None => (Kind::Uncached, 0),
            },
            wire::RCODE_SERVFAIL | wire::RCODE_REFUSED => (Kind::Failure, self.policy.failure_ttl),
            _ => (Kind::Uncached, 0),
        }
    }

    pub fn policy(&self) -> &CacheConfig {
        &self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;

    fn policy() -> Cache {
        Cache::new(&CacheConfig {
            size: 10,
            min_ttl: 0,
            max_ttl: 86_400,
            negative_ttl_max: 3600,
            failure_ttl: 5,
            stale: None,
            flush_on_reload: false,
        })
    }

    /// Header with `rcode`, question `x.`/A, then `records` (already wire-encoded, owner
    /// `x.`), counted as answer, authority and additional as given.
    fn msg(rcode: u8, an: &[Vec<u8>], ns: &[Vec<u8>], ar: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![
            0,
            1,
            0x84,
            rcode,
            0,
            1,
            0,
            an.len() as u8,
            0,
            ns.len() as u8,
            0,
            ar.len() as u8,
        ];
        m.extend_from_slice(b"\x01x\x00\x00\x01\x00\x01");
        for r in an.iter().chain(ns).chain(ar) {
            m.extend_from_slice(r);
        }
        m
    }

    fn rr(rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut r = vec![0xc0, 12];
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(rdata);
        r
    }

    /// NOERROR with one `x. A 192.0.2.1`.
    fn answer_a(ttl: u32) -> Vec<u8> {
        msg(
            wire::RCODE_NOERROR,
            &[rr(wire::TYPE_A, ttl, &[192, 0, 2, 1])],
            &[],
            &[],
        )
    }

    fn soa(ttl: u32, minimum: u32) -> Vec<u8> {
        let mut rd = vec![0, 0]; // mname ".", rname "."
        for v in [1u32, 3600, 600, 86400, minimum] {
            rd.extend_from_slice(&v.to_be_bytes());
        }
        rr(wire::TYPE_SOA, ttl, &rd)
    }

    #[test]
    fn negative_lifetime_is_bounded_by_every_record_and_the_soa_rule() {
        let c = policy();
        let cname = rr(wire::TYPE_CNAME, 30, b"\x01y\x00");
        let m = msg(wire::RCODE_NXDOMAIN, &[cname], &[soa(3600, 300)], &[]);
        assert_eq!(c.lifetime(&m), (Kind::Negative, 30));
        let m = msg(wire::RCODE_NXDOMAIN, &[], &[soa(3600, 300)], &[]);
        assert_eq!(c.lifetime(&m), (Kind::Negative, 300));
        // The SOA's own TTL is lowered to the lifetime in what is served.
        let e = c.entry_for(&m, Instant::now(), None).unwrap();
        assert_eq!(e.answer.min_ttl(), Some(300));
        let m = msg(wire::RCODE_NXDOMAIN, &[], &[], &[]);
        assert_eq!(c.lifetime(&m), (Kind::Uncached, 0), "no SOA: not cached");
    }

    #[test]
    fn keys_inline_and_spilled_are_found_whole_and_only_whole() {
        let c = policy();
        let now = Instant::now();
        let m = answer_a(600);
        // Around the 48 octets a stored key holds inline (5 + name): 47, 48, 49, and 260.
        let lens = [42usize, 43, 44, 255];
        let keys: Vec<Key> = (b'a'..)
            .zip(lens)
            .map(|(octet, n)| Key::new(keyflag::RD, 1, 1, &vec![octet; n]).unwrap())
            .collect();
        for k in &keys {
            c.insert(k.as_bytes(), Arc::new(c.entry_for(&m, now, None).unwrap()));
        }
        for k in &keys {
            assert!(
                c.get(k.as_bytes(), now).is_some(),
                "{} octets",
                k.as_bytes().len()
            );
            // The same key with its last octet changed, or cut short, is another key (R5).
            let mut other = k.as_bytes().to_vec();
            if let Some(last) = other.last_mut() {
                *last = b'z';
            }
            assert!(c.get(&other, now).is_none());
            assert!(c
                .get(&k.as_bytes()[..k.as_bytes().len() - 1], now)
                .is_none());
        }
    }

    /// `name{i}` as a key.
    fn key(i: u32) -> Vec<u8> {
        format!("name{i}").into_bytes()
    }

    /// [`policy`]'s cache filled with `name0`..`name9` (every answer goes in while there is
    /// room), and a maker of entries (an A answer, 600 s) stored at `now`.
    fn full(now: Instant) -> (Cache, impl Fn(&Cache) -> Arc<Entry>) {
        let c = policy();
        let m = answer_a(600);
        let entry = move |c: &Cache| Arc::new(c.entry_for(&m, now, None).unwrap());
        for i in 0..10 {
            c.insert(&key(i), entry(&c));
        }
        assert_eq!(c.entry_count(), 10);
        assert_eq!(c.metrics.cache_skipped.get(), 0);
        (c, entry)
    }

    #[test]
    fn a_full_cache_takes_a_name_on_its_second_miss_only() {
        let now = Instant::now();
        let (c, entry) = full(now);
        let entry = || entry(&c);
        // Full: a new name is not cached on its first miss, and nothing is evicted for it...
        c.insert(&key(100), entry());
        assert!(c.get(&key(100), now).is_none());
        assert_eq!(c.metrics.cache_skipped.get(), 1);
        assert_eq!(c.entry_count(), 10);
        assert!((0..10).all(|i| c.get(&key(i), now).is_some()));
        // ...but on its second, moka gets it (and its admission policy decides).
        c.insert(&key(100), entry());
        assert_eq!(c.metrics.cache_skipped.get(), 1);
        assert_eq!(c.metrics.cache_insertions.get(), 11);
        // A name inserted while there was room is known: refreshing it is not skipped.
        c.insert(&key(3), entry());
        assert_eq!(c.metrics.cache_skipped.get(), 1);
        assert!(c.get(&key(3), now).is_some());
        // Nor is it once the filter has forgotten it: moka still holds it, so it is a
        // replacement, which evicts nothing.
        for w in c.doorkeeper.bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
        c.insert(&key(4), entry());
        assert_eq!(c.metrics.cache_skipped.get(), 1);
        assert_eq!(c.metrics.cache_insertions.get(), 13);
    }

    /// A lookup tells an expired entry still held from none; an insert that passes on what
    /// its lookup saw is judged by it, without probing the full cache again.
    #[test]
    fn a_lookup_tells_held_from_absent_and_an_insert_trusts_it() {
        let now = Instant::now();
        let (c, entry) = full(now);
        let entry = || entry(&c);
        assert!(c.lookup(&key(1), now).is_ok());
        let later = now + Duration::from_secs(601);
        assert_eq!(
            c.lookup(&key(1), later).err(),
            Some(true),
            "expired, still held"
        );
        assert_eq!(c.lookup(&key(100), now).err(), Some(false));
        assert!(c.get(&key(1), later).is_none());
        // Full, and the filter has forgotten every name: only what the lookup saw decides.
        for w in c.doorkeeper.bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
        c.insert_known(&key(2), entry(), Some(true));
        assert_eq!(c.metrics.cache_skipped.get(), 0, "a replacement goes in");
        c.insert_known(&key(100), entry(), Some(false));
        assert_eq!(
            c.metrics.cache_skipped.get(),
            1,
            "a new name waits for its second miss"
        );
        assert!(c.get(&key(100), now).is_none());
        // moka's count is eventually consistent: settled first (this runs its pending
        // work), so that the insert below sees the cache full whatever moka's own timing.
        assert_eq!(c.entry_count(), 10);
        c.insert_known(&key(101), entry(), None);
        assert_eq!(
            c.metrics.cache_skipped.get(),
            2,
            "unknown: probed, and not held"
        );
        assert_eq!(c.entry_count(), 10);
    }

    #[test]
    fn the_doorkeeper_forgets_once_an_eighth_of_it_is_set() {
        let d = Doorkeeper::new(100);
        assert_eq!(d.bits.len() * 64, 4096, "the smallest filter");
        assert!(!d.seen(b"a"));
        assert!(d.seen(b"a"));
        // 511 more new names set 1/8 of the 4,096 bits (names sharing a bit with an earlier
        // one set none) and clear the filter.
        let mut i = 0;
        while d.marks.load(Ordering::Relaxed) != 0 {
            d.seen(format!("n{i}").as_bytes());
            i += 1;
            assert!(i < 1000, "the filter never cleared");
        }
        assert!(!d.seen(b"a"), "cleared");
    }

    #[test]
    fn an_answer_without_records_is_not_cached_forever() {
        let c = policy();
        let opt = vec![0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0];
        let m = msg(wire::RCODE_NOERROR, &[opt], &[], &[]);
        assert_eq!(c.lifetime(&m), (Kind::Uncached, 0));
    }

    #[test]
    fn caps_bound_the_lifetime_and_failures_get_the_failure_ttl() {
        let c = policy();
        let m = answer_a(600);
        let now = Instant::now();
        let e = c.entry_for(&m, now, Some(5)).unwrap();
        assert_eq!(e.expires, now + Duration::from_secs(5));
        assert_eq!(e.answer.min_ttl(), Some(5));
        let m = msg(wire::RCODE_SERVFAIL, &[], &[], &[]);
        assert_eq!(c.lifetime(&m), (Kind::Failure, 5));
        let mut tc = msg(
            wire::RCODE_NOERROR,
            &[rr(wire::TYPE_A, 600, &[192, 0, 2, 1])],
            &[],
            &[],
        );
        tc[2] |= 0x02;
        assert_eq!(c.lifetime(&tc), (Kind::Uncached, 0));
    }
}
