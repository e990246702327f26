//! The answer cache: the only code that knows moka, and the TTL policy.
//!
//! Keys are built from the wire question without a full parse ([`Key`]): the flag byte
//! (DO, CD, RD, EDNS present, chase), type, class and the lowercased name. A lookup compares
//! the whole key (moka hashes and then checks equality), never a hash alone (R5).
//!
//! Each [`Entry`] carries its own expiry on the tokio clock, so tests can pause time, and
//! moka gets the same lifetime through [`Expiry`] so memory is released when entries die.
//! `expire_after_update` is overridden: without it a re-inserted key keeps its old deadline.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache as Moka;
use moka::Expiry;
use tokio::time::Instant;

use crate::config::CacheConfig;
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
    /// other than QUERY, or a client-subnet option (the answer may be tailored to the
    /// subnet, R24).
    pub fn for_query(q: &Query<'_>) -> Option<Key> {
        if q.header.opcode() != wire::OPCODE_QUERY || q.edns.is_some_and(|e| e.has_ecs) {
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
        Key::new(f, q.qtype, q.qclass, q.qname())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
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
    pub stored: Instant,
    pub expires: Instant,
}

impl Entry {
    pub fn new(answer: Prepared, kind: Kind, lifetime: u32, now: Instant) -> Entry {
        let kind = if lifetime == 0 { Kind::Uncached } else { kind };
        Entry {
            answer,
            kind,
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

impl Expiry<Box<[u8]>, Arc<Entry>> for Expire {
    fn expire_after_create(
        &self,
        _: &Box<[u8]>,
        v: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.keep(v))
    }
    fn expire_after_update(
        &self,
        _: &Box<[u8]>,
        v: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.keep(v))
    }
}

/// The bounded answer cache. A size of 0 disables it.
pub struct Cache {
    inner: Option<Moka<Box<[u8]>, Arc<Entry>>>,
    policy: CacheConfig,
}

impl Cache {
    pub fn new(policy: &CacheConfig) -> Cache {
        let inner = (policy.size > 0).then(|| {
            Moka::builder()
                .max_capacity(policy.size)
                .expire_after(Expire {
                    stale: policy.stale.map_or(Duration::ZERO, |s| s.max_age),
                })
                .build()
        });
        Cache {
            inner,
            policy: policy.clone(),
        }
    }

    /// A fresh entry for `key`, if any.
    pub fn get(&self, key: &[u8], now: Instant) -> Option<Arc<Entry>> {
        let e = self.inner.as_ref()?.get(key)?;
        e.is_fresh(now).then_some(e)
    }

    /// An expired entry still inside the serve-stale window, if serve-stale is on.
    pub fn get_stale(&self, key: &[u8], now: Instant) -> Option<Arc<Entry>> {
        let window = self.policy.stale?.max_age;
        let e = self.inner.as_ref()?.get(key)?;
        (e.may_serve_stale() && !e.is_fresh(now) && now < e.expires + window).then_some(e)
    }

    pub fn insert(&self, key: &[u8], entry: Arc<Entry>) {
        if let Some(c) = &self.inner {
            if entry.kind != Kind::Uncached {
                c.insert(key.into(), entry);
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
    pub fn entry_for(&self, reply: &[u8], now: Instant) -> Option<Entry> {
        let p = self.prepare(reply)?;
        let (kind, lifetime) = self.lifetime(p.wire());
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
            wire::RCODE_NOERROR if h.ancount > 0 => (Kind::Positive, min_all),
            wire::RCODE_NOERROR | wire::RCODE_NXDOMAIN => match soa {
                Some(t) => (Kind::Negative, t.min(self.policy.negative_ttl_max)),
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
