//! The pipeline for one query, top to bottom. Policy order lives here and nowhere else:
//!
//! 1. no header or QR=1: drop
//! 2. ACL (outside: REFUSED, nothing goes upstream)
//! 3. NOTIFY/UPDATE: REFUSED; other opcodes: NOTIMP (both before the question is checked);
//!    then scan the query (malformed: FORMERR); EDNS version not 0: BADVERS;
//!    ANY over UDP: TC=1 (RFC 8482, so nothing is amplified)
//! 4. cache lookup (hit: the stored answer with the client's ID, question bytes, aged TTLs)
//! 5. miss: the client takes a pending slot (R9) and coalesces on the key; the leader takes
//!    an in-flight permit (R11); a config-defined ALIAS answers A/AAAA from its target,
//!    otherwise the leader asks the upstream
//! 6. flatten the upstream's answer, chasing the rest of a partial chain through the resolver
//!    (each chase step is itself cached and coalesced); on NODATA, a zone-stored ALIAS
//!    (TYPE65401) starts a chain of its own
//! 7. cache the final answer; reply (TC=1 with the question only if it is too long for UDP);
//!    with serve-stale on, an expired entry answers when the refresh is slow or fails
//!
//! Steps 1-4 are [`Handler::answer_fast`], which never waits: listeners call it inline and
//! spawn a task only for a miss. Any per-query failure ends here as an rcode; nothing a client
//! or an upstream sends can stop a listener.
//!
//! Every query that gets a reply is counted once, where its reply is final (`Handler::done`):
//! the query metrics and the query log. What a SIGHUP may change (upstreams, resolver, ACL,
//! flatten scope, aliases) sits in one [`Settings`] value swapped atomically
//! ([`Handler::reload`]); a query in flight finishes with the settings it started with.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use ipnet::IpNet;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};
use tracing::debug;

use crate::cache::{keyflag, Cache, Entry, Key, Kind};
use crate::config::{Alias, Config, FlattenConfig, QueryLog, STALE_TTL, TYPE_ALIAS};
use crate::cookie::CookieSecret;
use crate::explain::{Event, Trace};
use crate::flatten::{self, Chain, Skip, Step};
use crate::inflight::{Inflight, Join, Leader, Waiter};
use crate::limit::PerClient;
use crate::metrics::{Metrics, Source};
use crate::response::{self, Prepared};
use crate::upstream::{Upstream, UpstreamError};
use crate::wire::{self, Query, QueryError};

mod miss;
pub use miss::{Miss, Progress, Started, Task};

/// How the client's query arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What [`Handler::answer_fast`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    /// `out` holds the reply.
    Reply,
    /// `out` holds REFUSED for a client outside the ACL (R1): send it; over TCP the
    /// connection then closes.
    Refused,
    /// Send nothing.
    Drop,
    /// Needs the upstream: call [`Handler::answer`] from a task.
    Miss,
}

/// What [`Handler::fast`] did.
// Returned and matched at once, on the stack: boxing the key would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Fasted<'m> {
    Done(Fast),
    Miss(Missed<'m>),
}

/// A query that missed the cache: the scan, the key (none for a query that is never shared,
/// such as one with ECS), when it arrived (for the query log), and the time the cache was
/// looked at (if it was), so the miss reads the clock no more.
struct Missed<'m> {
    q: Query<'m>,
    key: Option<Key>,
    started: Option<std::time::Instant>,
    now: Option<Instant>,
    /// Whether the cache still holds an expired entry for the key ([`Cache::lookup`]).
    held: Option<bool>,
}

/// What a leader produced for its key: the entry to share, and the upstream's own reply when
/// the answer is passed through (the leader's client gets those bytes unchanged, F5).
struct Produced {
    entry: Option<Arc<Entry>>,
    raw: Option<Bytes>,
}

/// Why the upstream's own answer is given, and how long it may be cached at most.
struct Fallback {
    skip: Skip,
    cap: Option<u32>,
}

enum Got {
    Leader(Produced),
    Shared(Arc<Entry>),
    Failed,
}

/// A miss's place among the lookups in flight for its key.
enum Role {
    Lead(Lead),
    Wait(Waiter),
    Failed,
}

/// What the one lookup that goes upstream for a key holds until its answer is settled.
struct Lead {
    leader: Leader,
    _permit: OwnedSemaphorePermit,
    _inflight: GaugeGuard,
    /// The cache generation when the lookup started ([`Handler::settle`]).
    generation: u64,
    /// Whether the cache held an (expired) entry for the key when the miss was found, if
    /// known ([`Cache::insert_known`]).
    held: Option<bool>,
}

/// How a reply came about: where from, whether it is a flattened answer, and the upper
/// eight bits of its rcode, which live in its OPT record (RFC 6891 6.1.3).
#[derive(Debug, Clone, Copy)]
struct Served {
    source: Source,
    flattened: bool,
    /// Set only where flatdns writes an extended rcode itself (BADVERS). An upstream's own
    /// extended rcode (BADCOOKIE, say) is counted by its lower four bits: finding it would
    /// mean reading the OPT of every reply, cache hits included, for rcodes this proxy's
    /// queries do not draw (its upstream queries are EDNS version 0, without cookies).
    ext_rcode: u8,
}

impl Served {
    const LOCAL: Served = Served {
        source: Source::Local,
        flattened: false,
        ext_rcode: 0,
    };
    const BADVERS: Served = Served {
        ext_rcode: wire::EXT_RCODE_BADVERS,
        ..Served::LOCAL
    };
    fn upstream(flattened: bool) -> Served {
        Served {
            source: Source::Upstream,
            flattened,
            ext_rcode: 0,
        }
    }
}

/// What a configuration reload (SIGHUP) may change; everything else (listen addresses,
/// cache size, limits, metrics address, query log) is fixed at start, since changing it
/// would mean dropping sockets or state.
pub struct Settings {
    allow: Vec<IpNet>,
    upstream: Upstream,
    resolver: Upstream,
    flatten: FlattenConfig,
    aliases: HashMap<Vec<u8>, Alias>,
    alias_from_zone: bool,
}

impl Settings {
    /// `limits` are the running ones (a reload does not change them).
    fn new(config: &Config, limits: &crate::config::Limits, metrics: &Metrics) -> Settings {
        let upstream = Upstream::new(
            config.upstreams.clone(),
            config.timeout,
            config.attempts,
            limits.upstream_tcp_idle,
        )
        .with_metrics(metrics, "upstream");
        let resolver = if config.resolvers.is_empty() {
            upstream.clone()
        } else {
            Upstream::new(
                config.resolvers.clone(),
                config.timeout,
                config.attempts,
                limits.upstream_tcp_idle,
            )
            .with_metrics(metrics, "resolver")
        };
        Settings {
            allow: config.allow.clone(),
            upstream,
            resolver,
            flatten: config.flatten.clone(),
            aliases: config
                .aliases
                .iter()
                .map(|a| (a.name.clone(), a.clone()))
                .collect(),
            alias_from_zone: config.alias_from_zone,
        }
    }

    fn allowed(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Keys whose new value waits for a restart (the running value stays).
    pub need_restart: Vec<&'static str>,
    pub flushed: bool,
}

/// Everything a query needs, shared by all listeners.
pub struct Handler {
    /// The configuration as started: limits, cache policy and sockets never change.
    config: Config,
    settings: ArcSwap<Settings>,
    cache: Cache,
    inflight: Inflight,
    permits: Arc<Semaphore>,
    pending: Arc<PerClient>,
    cookies: CookieSecret,
    metrics: Arc<Metrics>,
    query_log: bool,
    trace: Option<Arc<Trace>>,
    /// Bumped by a reload that flushes the cache: a lookup that started before it does not
    /// put its (old-settings) answer into the emptied cache.
    generation: AtomicU64,
}

impl Handler {
    pub fn new(config: Config) -> Handler {
        let metrics = Arc::new(Metrics::new());
        Handler {
            settings: ArcSwap::from_pointee(Settings::new(&config, &config.limits, &metrics)),
            generation: AtomicU64::new(0),
            cache: Cache::with_metrics(&config.cache, metrics.clone()),
            inflight: Inflight::new(config.limits.waiters_per_key),
            permits: Arc::new(Semaphore::new(config.limits.max_inflight)),
            pending: PerClient::new(config.limits.pending_per_client),
            cookies: CookieSecret::random(),
            query_log: config.query_log != QueryLog::Off,
            metrics,
            trace: None,
            config,
        }
    }

    /// A handler that records every upstream exchange and decision in `trace` (for
    /// `flatdns explain`).
    pub fn with_trace(mut self, trace: Arc<Trace>) -> Handler {
        self.trace = Some(trace);
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether the ACL, as it stands now (reloads change it), lets `ip` in (R1).
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.settings.load().allowed(ip)
    }

    /// Applies what may change at run time from `new` (upstreams, resolver, ACL, flatten
    /// scope, aliases); queries already in flight finish with the old settings. Keys that
    /// need a restart keep their running value and are named in the result. The cache is
    /// kept unless the new configuration sets `flush_on_reload` (or `--flush-on-reload`
    /// was given): answers cached under the old settings then live out their TTLs.
    pub fn reload(&self, new: Config) -> Reloaded {
        let old = &self.config;
        let mut need_restart = Vec::new();
        let mut fixed = |changed: bool, key: &'static str| {
            if changed {
                need_restart.push(key);
            }
        };
        fixed(new.listen != old.listen, "listen");
        let cache = crate::config::CacheConfig {
            flush_on_reload: old.cache.flush_on_reload,
            ..new.cache.clone()
        };
        fixed(cache != old.cache, "cache");
        fixed(new.limits != old.limits, "limits");
        fixed(new.metrics != old.metrics, "metrics");
        fixed(new.query_log != old.query_log, "query_log");
        let flushed = new.cache.flush_on_reload;
        self.settings.store(Arc::new(Settings::new(
            &new,
            &self.config.limits,
            &self.metrics,
        )));
        if flushed {
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.cache.clear();
        }
        self.metrics.reloads.inc();
        Reloaded {
            need_restart,
            flushed,
        }
    }

    fn note(&self, event: impl FnOnce() -> Event) {
        if let Some(t) = &self.trace {
            t.push(event());
        }
    }

    /// The one place a reply is counted and logged.
    fn done(
        &self,
        transport: Transport,
        client: SocketAddr,
        q: Option<&Query<'_>>,
        out: &[u8],
        served: Served,
        started: Option<std::time::Instant>,
    ) {
        let rcode =
            u16::from(served.ext_rcode) << 4 | out.get(3).map_or(0, |b| u16::from(b & 0x0f));
        let qtype = q.map_or(0, |q| q.qtype);
        self.metrics.query(transport, qtype, rcode);
        match served.source {
            Source::Cache => self.metrics.cache_hits.inc(),
            Source::Stale => self.metrics.stale_answers.inc(),
            _ => 0,
        };
        if self.query_log {
            let latency_us = started.map_or(0, |t| t.elapsed().as_micros() as u64);
            let name = q.map_or_else(String::new, |q| crate::config::display_name(q.qname()));
            tracing::info!(
                target: "flatdns::query",
                client = %client.ip(),
                transport = match transport { Transport::Udp => "udp", Transport::Tcp => "tcp" },
                name = %name,
                qtype = %domain::base::iana::Rtype::from_int(qtype),
                rcode = crate::metrics::rcode_name(rcode),
                flattened = served.flattened,
                source = served.source.as_str(),
                latency_us,
            );
        }
    }

    fn limit(&self, q: &Query<'_>, transport: Transport) -> usize {
        match transport {
            Transport::Udp => q.udp_limit(self.config.limits.udp_size),
            Transport::Tcp => usize::from(u16::MAX),
        }
    }

    /// Steps 1-4: everything that needs no upstream. Never waits.
    pub fn answer_fast(
        &self,
        msg: &[u8],
        client: SocketAddr,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Fast {
        match self.fast(msg, client, transport, out) {
            Fasted::Done(f) => f,
            Fasted::Miss(_) => Fast::Miss,
        }
    }

    /// [`Handler::answer_fast`], handing a miss on with what was worked out for it.
    fn fast<'m>(
        &self,
        msg: &'m [u8],
        client: SocketAddr,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Fasted<'m> {
        let started = self.query_log.then(std::time::Instant::now);
        let Some(header) = wire::Header::read(msg).filter(|h| !h.has(wire::FLAG_QR)) else {
            self.metrics.dropped.inc();
            return Fasted::Done(Fast::Drop);
        };
        if !self.allows(client.ip()) {
            debug!(%client, "refused by ACL");
            match Query::parse(msg) {
                Ok(q) => {
                    response::error_for(&q, wire::RCODE_REFUSED, out);
                    self.done(transport, client, Some(&q), out, Served::LOCAL, started);
                }
                Err(_) => {
                    let opt = wire::find_opt(msg).and_then(|e| response::opt_for(&e, 0));
                    response::error(header.id, header.flags, None, wire::RCODE_REFUSED, opt, out);
                    self.done(transport, client, None, out, Served::LOCAL, started);
                }
            }
            return Fasted::Done(Fast::Refused);
        }
        if header.opcode() != wire::OPCODE_QUERY {
            // Before the question is checked: BIND answers an unknown opcode NOTIMP whatever
            // the question count (RFC 8906 3.1.4), without echoing one. NOTIFY and UPDATE,
            // relayed, would reach the upstream from flatdns's own address and slip past its
            // address-based ACLs: refused as policy.
            let rcode = match header.opcode() {
                wire::OPCODE_NOTIFY | wire::OPCODE_UPDATE => wire::RCODE_REFUSED,
                _ => wire::RCODE_NOTIMP,
            };
            let opt = wire::find_opt(msg).and_then(|e| response::opt_for(&e, 0));
            response::error(header.id, header.flags, None, rcode, opt, out);
            self.done(transport, client, None, out, Served::LOCAL, started);
            return Fasted::Done(Fast::Reply);
        }
        let q = match Query::parse(msg) {
            Ok(q) => q,
            Err(QueryError::Drop) => {
                self.metrics.dropped.inc();
                return Fasted::Done(Fast::Drop);
            }
            Err(QueryError::FormErr { question_ok }) => {
                formerr(msg, question_ok, out);
                self.done(transport, client, None, out, Served::LOCAL, started);
                return Fasted::Done(Fast::Reply);
            }
        };
        if q.edns.is_some_and(|e| e.version != 0) {
            // RFC 6891 6.1.3: BADVERS, advertising the version we do support (0).
            let opt = response::own_opt(&q, wire::EXT_RCODE_BADVERS);
            response::error(q.id(), q.header.flags, Some(q.question()), 0, opt, out);
            self.done(transport, client, Some(&q), out, Served::BADVERS, started);
            return Fasted::Done(Fast::Reply);
        }
        if q.qtype == wire::TYPE_ANY && transport == Transport::Udp {
            // RFC 8482 4.4 allows TC=1 over UDP; a retry over TCP gets the upstream's answer.
            let flags = response::reply_flags(q.header.flags);
            response::truncated(q.id(), flags, q.question(), response::own_opt(&q, 0), out);
            self.done(transport, client, Some(&q), out, Served::LOCAL, started);
            return Fasted::Done(Fast::Reply);
        }
        let key = Key::for_query(&q);
        let (mut looked, mut held) = (None, None);
        if let Some(key) = &key {
            let now = Instant::now();
            looked = Some(now);
            let found = self.cache.lookup(key.as_bytes(), now);
            held = found.as_ref().err().copied();
            if let Ok(e) = found {
                let limit = self.limit(&q, transport);
                if e.answer
                    .render(q.id(), q.question(), e.age(now), limit, out)
                {
                    self.add_cookie(&e.answer, &q, client.ip(), limit, out);
                    debug!(%client, qtype = q.qtype, len = out.len(), "cache hit");
                    let served = Served {
                        source: Source::Cache,
                        flattened: e.kind == Kind::Flattened,
                        ext_rcode: 0,
                    };
                    self.done(transport, client, Some(&q), out, served, started);
                    return Fasted::Done(Fast::Reply);
                }
            }
        }
        Fasted::Miss(Missed {
            q,
            key,
            started,
            now: looked,
            held,
        })
    }

    /// The whole pipeline. Returns the reply to send, or `None` to send nothing.
    pub async fn answer(
        self: &Arc<Self>,
        msg: Bytes,
        client: SocketAddr,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        // Listeners call this after their own answer_fast said Miss: the second look is
        // deliberate, since a leader may have filled the cache in between, and a hit here
        // saves an upstream query that coalescing could no longer prevent.
        match self.answer_fast(&msg, client, transport, &mut out) {
            Fast::Reply | Fast::Refused => return Some(out),
            Fast::Drop => return None,
            Fast::Miss => {}
        }
        let started = self.query_log.then(std::time::Instant::now);
        let q = Query::parse(&msg).ok()?;
        self.metrics.cache_misses.inc();
        let Some(_pending) = self.pending.acquire(client.ip()) else {
            debug!(%client, "pending-per-client limit reached");
            response::error_for(&q, wire::RCODE_SERVFAIL, &mut out);
            self.done(transport, client, Some(&q), &out, Served::LOCAL, started);
            return Some(out);
        };
        let served = match self.stale_candidate(&q) {
            Some(stale) => {
                let (reply, served) = self
                    .fresh_or_stale(stale, msg.clone(), &q, client.ip(), transport)
                    .await;
                out = reply;
                served
            }
            None => self.resolve(&q, client.ip(), transport, &mut out).await,
        };
        debug!(%client, qtype = q.qtype, rcode = out.get(3).map(|b| b & 0x0f), len = out.len(), "answered");
        self.done(transport, client, Some(&q), &out, served, started);
        Some(out)
    }

    fn stale_candidate(&self, q: &Query<'_>) -> Option<Arc<Entry>> {
        self.config.cache.stale?;
        let key = Key::for_query(q)?;
        self.cache.get_stale(key.as_bytes(), Instant::now())
    }

    /// Serve-stale (RFC 8767 section 5): the refresh runs as its own task, so it completes
    /// and updates the cache whatever happens here. The client gets its answer if that comes
    /// within `stale_answer_after` and is not a failure; otherwise the stale entry, TTL 30.
    async fn fresh_or_stale(
        self: &Arc<Self>,
        stale: Arc<Entry>,
        msg: Bytes,
        q: &Query<'_>,
        client: IpAddr,
        transport: Transport,
    ) -> (Vec<u8>, Served) {
        let wait = self
            .config
            .cache
            .stale
            .map_or(Duration::ZERO, |s| s.answer_after);
        let h = self.clone();
        let ip = client;
        let mut refresh = tokio::spawn(async move {
            let q = Query::parse(&msg).ok()?;
            let mut out = Vec::new();
            let served = h.resolve(&q, ip, transport, &mut out).await;
            Some((out, served))
        });
        if let Ok(Ok(Some((out, served)))) = tokio::time::timeout(wait, &mut refresh).await {
            let rcode = wire::Header::read(&out).map(|h| h.rcode());
            if rcode != Some(wire::RCODE_SERVFAIL) && rcode != Some(wire::RCODE_REFUSED) {
                return (out, served);
            }
        }
        debug!("serving stale");
        let mut out = Vec::new();
        let limit = self.limit(q, transport);
        let served = if stale
            .answer
            .render_stale(q.id(), q.question(), STALE_TTL, limit, &mut out)
        {
            self.add_cookie(&stale.answer, q, client, limit, &mut out);
            Served {
                source: Source::Stale,
                flattened: stale.kind == Kind::Flattened,
                ext_rcode: 0,
            }
        } else {
            response::error_for(q, wire::RCODE_SERVFAIL, &mut out);
            Served::LOCAL
        };
        (out, served)
    }

    /// Our own server cookie for a client that sent one, on a shared answer that was not
    /// truncated (the other client's cookie was stripped from it, R24).
    fn add_cookie(
        &self,
        answer: &Prepared,
        q: &Query<'_>,
        client: IpAddr,
        limit: usize,
        out: &mut Vec<u8>,
    ) {
        if let (Some(c), Some(pos)) = (q.edns.and_then(|e| e.cookie), answer.opt_rdlen()) {
            if out.len() == answer.len() {
                self.cookies.append(out, pos, &c, client, limit);
            }
        }
    }

    /// Steps 5-7 for a query that missed the cache.
    async fn resolve(
        &self,
        q: &Query<'_>,
        client: IpAddr,
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Served {
        let deadline = Instant::now() + self.config.limits.client_deadline;
        let limit = self.limit(q, transport);
        let tcp = transport == Transport::Tcp;
        // One snapshot for the whole query: a reload in between does not mix two configs.
        let s = self.settings.load_full();
        let Some(key) = Key::for_query(q) else {
            // Not shareable (ECS): forward as is, still within the in-flight limit (R11).
            let Ok(_permit) = self.permits.try_acquire() else {
                response::error_for(q, wire::RCODE_SERVFAIL, out);
                return Served::LOCAL;
            };
            let _inflight = GaugeGuard::new(&self.metrics.inflight);
            return match s.upstream.query(q.wire, tcp, deadline).await {
                Ok(reply) => {
                    response::passthrough(&reply, q.id(), q.question(), limit, out);
                    Served::upstream(false)
                }
                Err(_) => {
                    response::error_for(q, wire::RCODE_SERVFAIL, out);
                    Served::LOCAL
                }
            };
        };
        let got = self
            .coalesce(key.as_bytes(), deadline, || {
                self.produce(&s, q, tcp, deadline)
            })
            .await;
        self.render_got(got, q, client, limit, None, out)
    }

    /// The client's reply from what its lookup got.
    ///
    /// `now`: the time, if the caller has just read the clock (a shared answer's age counts
    /// from it).
    fn render_got(
        &self,
        got: Got,
        q: &Query<'_>,
        client: IpAddr,
        limit: usize,
        now: Option<Instant>,
        out: &mut Vec<u8>,
    ) -> Served {
        match got {
            Got::Leader(Produced { raw: Some(raw), .. }) => {
                response::passthrough(&raw, q.id(), q.question(), limit, out);
                Served::upstream(false)
            }
            Got::Leader(Produced { entry: Some(e), .. }) | Got::Shared(e) => {
                let age = e.age(now.unwrap_or_else(Instant::now));
                if e.answer.render(q.id(), q.question(), age, limit, out) {
                    self.add_cookie(&e.answer, q, client, limit, out);
                    if e.local {
                        Served::LOCAL
                    } else {
                        Served::upstream(e.kind == Kind::Flattened)
                    }
                } else {
                    response::error_for(q, wire::RCODE_SERVFAIL, out);
                    Served::LOCAL
                }
            }
            Got::Leader(_) | Got::Failed => {
                response::error_for(q, wire::RCODE_SERVFAIL, out);
                Served::LOCAL
            }
        }
    }

    /// Runs `produce` if this is the first miss for `key`, else waits for the one that is.
    /// The leader needs an in-flight permit (R11); without one it fails at once.
    async fn coalesce<F, Fut>(&self, key: &[u8], deadline: Instant, produce: F) -> Got
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Produced>,
    {
        match self.role(key, None) {
            Role::Lead(lead) => {
                let p = produce().await;
                self.settle(lead, &p);
                Got::Leader(p)
            }
            Role::Wait(w) => match timeout_at(deadline, w.wait()).await {
                Ok(Some(e)) => Got::Shared(e),
                _ => Got::Failed,
            },
            Role::Failed => Got::Failed,
        }
    }

    /// Joins the lookups in flight for `key`: the first becomes the leader, with an
    /// in-flight permit (R11; without one it fails at once).
    /// `held`: what the caller's cache lookup saw ([`Lead::held`]).
    fn role(&self, key: &[u8], held: Option<bool>) -> Role {
        match self.inflight.join(key) {
            Join::Leader(leader) => match self.permits.clone().try_acquire_owned() {
                Ok(permit) => Role::Lead(Lead {
                    leader,
                    _permit: permit,
                    _inflight: GaugeGuard::new(&self.metrics.inflight),
                    generation: self.generation.load(Ordering::Acquire),
                    held,
                }),
                Err(_) => {
                    debug!("in-flight limit reached");
                    Role::Failed
                }
            },
            Join::Waiter(w) => Role::Wait(w),
            Join::Full => Role::Failed,
        }
    }

    /// A leader's answer goes into the cache and to its waiters.
    fn settle(&self, lead: Lead, p: &Produced) {
        if let Some(e) = &p.entry {
            // Not into a cache flushed by a reload while this lookup ran: its answer came
            // under the old settings (waiters still get it).
            if self.generation.load(Ordering::Acquire) == lead.generation {
                self.cache
                    .insert_known(lead.leader.key(), e.clone(), lead.held);
            }
        }
        lead.leader.complete(p.entry.clone());
    }

    /// The leader's work: ask the upstream, flatten if the answer qualifies.
    async fn produce(&self, s: &Settings, q: &Query<'_>, tcp: bool, deadline: Instant) -> Produced {
        if !s.aliases.is_empty() {
            if let Some(p) = self.config_alias(s, q, deadline).await {
                return p;
            }
        }
        let now = Instant::now();
        let asked = s.upstream.query_from(q.wire, tcp, deadline).await;
        self.note(|| Event::asked("upstream", &s.upstream, q.qname(), q.qtype, &asked, now));
        self.produced(s, q, asked.map(|(r, _)| r), now, deadline)
            .await
    }

    /// The rest of the leader's work once the upstream has answered (or failed to).
    async fn produced(
        &self,
        s: &Settings,
        q: &Query<'_>,
        asked: Result<Bytes, UpstreamError>,
        now: Instant,
        deadline: Instant,
    ) -> Produced {
        let reply = match asked {
            Ok(r) => r,
            Err(e) => return self.failed(q, e),
        };
        let flattened = self.flatten(s, q, &reply, deadline).await;
        self.entry_from(reply, flattened, now)
    }

    /// A failed upstream lookup's result.
    fn failed(&self, q: &Query<'_>, e: UpstreamError) -> Produced {
        debug!(error = %e, "upstream failed");
        Produced {
            entry: self.failure_entry(q, e.is_upstream_fault()),
            raw: None,
        }
    }

    /// What the leader shares, from the upstream's reply and the flattening decision.
    fn entry_from(
        &self,
        reply: Bytes,
        flattened: Result<(Vec<u8>, u32), Fallback>,
        now: Instant,
    ) -> Produced {
        self.note(|| Event::Decision(flattened.as_ref().map(|f| f.1).map_err(|f| f.skip)));
        match flattened {
            Ok((flat, ttl)) => {
                if let Some(p) = self.cache.prepare(&flat) {
                    let ttl = p.min_ttl().unwrap_or(ttl);
                    let e = Entry::new(p, Kind::Flattened, ttl, now);
                    return Produced {
                        entry: Some(Arc::new(e)),
                        raw: None,
                    };
                }
                let entry = self.cache.entry_for(&reply, now, None).map(Arc::new);
                Produced {
                    entry,
                    raw: Some(reply),
                }
            }
            Err(Fallback { skip, cap }) => {
                debug!(reason = skip.as_str(), "passed through");
                self.metrics.fallback(skip);
                let entry = self.cache.entry_for(&reply, now, cap).map(Arc::new);
                Produced {
                    entry,
                    raw: Some(reply),
                }
            }
        }
    }

    /// A SERVFAIL for `q`: cached for `failure_ttl` like an upstream SERVFAIL (R8) when the
    /// upstream is at fault (timeout, refused), shared with waiters only when the fault is
    /// ours (out of sockets, say), so a local hiccup is not remembered for seconds.
    fn failure_entry(&self, q: &Query<'_>, cache_it: bool) -> Option<Arc<Entry>> {
        let mut msg = Vec::new();
        response::error_for(q, wire::RCODE_SERVFAIL, &mut msg);
        let p = self.cache.prepare(&msg)?;
        let ttl = if cache_it {
            self.config.cache.failure_ttl
        } else {
            0
        };
        let mut e = Entry::new(p, Kind::Failure, ttl, Instant::now());
        e.local = true;
        Some(Arc::new(e))
    }

    /// Decides whether `reply` is flattened and, if so, builds the flattened answer and its
    /// TTL. Any failure on the way means the upstream's own answer is given instead (F4).
    async fn flatten(
        &self,
        s: &Settings,
        q: &Query<'_>,
        reply: &[u8],
        deadline: Instant,
    ) -> Result<(Vec<u8>, u32), Fallback> {
        let (mut chain, mut step, nodata) = self.chain_start(s, q, reply)?;
        let start = chain.start().to_vec();
        let mut zone_alias = false;
        if step == Step::Fail(Skip::NoChain) && nodata && s.alias_from_zone {
            // NODATA: an ALIAS record in the zone may stand there (a static A/AAAA wins, as
            // in PowerDNS, because then the answer is not NODATA).
            if let Some((target, ttl)) = self.zone_alias(s, &start, deadline).await {
                self.note(|| Event::Alias {
                    source: "zone",
                    name: start.clone(),
                    target: target.clone(),
                    ttl: Some(ttl),
                });
                zone_alias = true;
                step = match chain.push_alias(&target, ttl) {
                    Ok(()) => Step::Continue(target),
                    Err(skip) => Step::Fail(skip),
                };
            }
        }
        let completed = self.complete(s, &mut chain, step, q.qtype, deadline).await;
        self.chain_end(q, reply, &chain, completed, zone_alias)
    }

    /// [`Handler::flatten`] for a reply that needs no further lookup (no chase, no zone
    /// ALIAS), without waiting; `None` when it does need one.
    fn flatten_now(
        &self,
        s: &Settings,
        q: &Query<'_>,
        reply: &[u8],
    ) -> Option<Result<(Vec<u8>, u32), Fallback>> {
        let (chain, step, nodata) = match self.chain_start(s, q, reply) {
            Ok(started) => started,
            Err(fallback) => return Some(Err(fallback)),
        };
        let completed = match step {
            Step::Continue(_) => return None,
            Step::Fail(Skip::NoChain) if nodata && s.alias_from_zone => return None,
            // As `complete` ends them.
            Step::Done(rrs) => {
                let ttl = flatten::answer_ttl(&chain, &rrs);
                Ok((rrs, ttl))
            }
            Step::Fail(skip) => Err(Fallback { skip, cap: None }),
        };
        Some(self.chain_end(q, reply, &chain, completed, false))
    }

    /// The first part of flattening: whether `reply` qualifies, and the chain as far as the
    /// reply itself goes (the owner name, lowercased; the chain; the next step; NODATA).
    fn chain_start(
        &self,
        s: &Settings,
        q: &Query<'_>,
        reply: &[u8],
    ) -> Result<(Chain, Step, bool), Fallback> {
        let mut start = Vec::with_capacity(q.qname().len());
        wire::push_lower(&mut start, q.qname());
        let plain = |skip| Fallback { skip, cap: None };
        if let Err(skip) = flatten::eligible(&s.flatten, &start, q.qtype, q.qclass, q.do_bit()) {
            // Out of scope, excluded or DNSSEC only matter (and are counted) where there is
            // a chain to flatten.
            let scoped = matches!(skip, Skip::Dnssec | Skip::Excluded | Skip::OutOfScope);
            let chained = scoped && {
                let mut probe = Chain::new(&start, s.flatten.max_chain);
                flatten::follow(reply, &start, q.qtype, &mut probe) != Step::Fail(Skip::NoChain)
            };
            return Err(plain(if scoped && !chained {
                Skip::NoChain
            } else {
                skip
            }));
        }
        if wire::Header::read(reply).is_some_and(|h| h.has(wire::FLAG_TC)) {
            // A cut answer (the TCP retry failed): never flattened, never cached (R16).
            return Err(plain(Skip::Truncated));
        }
        let surveyed = flatten::survey(reply);
        if !surveyed.noerror {
            return Err(plain(Skip::NotNoError));
        }
        let mut chain = Chain::starting_at(start, s.flatten.max_chain);
        let step = flatten::follow_start(reply, surveyed, q.qtype, &mut chain);
        let nodata = wire::Header::read(reply).is_some_and(|h| h.ancount == 0);
        Ok((chain, step, nodata))
    }

    /// The last part: the flattened answer from the completed chain.
    fn chain_end(
        &self,
        q: &Query<'_>,
        reply: &[u8],
        chain: &Chain,
        completed: Result<(flatten::Rrs, u32), Fallback>,
        zone_alias: bool,
    ) -> Result<(Vec<u8>, u32), Fallback> {
        self.note(|| Event::Chain(chain.links.to_vec()));
        let (rrs, ttl) = completed?;
        let out = flatten::build(reply, q.question(), &rrs, ttl).ok_or(Fallback {
            skip: Skip::Malformed,
            cap: None,
        })?;
        self.flattened(chain.hops(), zone_alias.then_some(false));
        Ok((out, ttl))
    }

    /// Counts a flattened answer: its hops, and the alias it came from (`Some(true)`: a
    /// config alias, `Some(false)`: a zone-stored one).
    fn flattened(&self, hops: usize, alias: Option<bool>) {
        self.metrics.flattened.inc();
        self.metrics.chain_length.observe(hops as f64);
        match alias {
            Some(true) => self.metrics.alias_config.inc(),
            Some(false) => self.metrics.alias_zone.inc(),
            None => 0,
        };
    }

    /// Follows `step` to the end of the chain, chasing the rest through the resolver. The
    /// final records and the answer TTL, or why not (with how long the fallback may live).
    async fn complete(
        &self,
        s: &Settings,
        chain: &mut Chain,
        mut step: Step,
        qtype: u16,
        deadline: Instant,
    ) -> Result<(flatten::Rrs, u32), Fallback> {
        // Once a chase answer decided the outcome, the upstream's answer may be cached only as
        // long as that chase answer holds: a fallback must not outlive its reason (F4).
        let mut cap: Option<u32> = None;
        loop {
            match step {
                Step::Done(rrs) => {
                    let ttl = flatten::answer_ttl(chain, &rrs);
                    return Ok((rrs, ttl));
                }
                Step::Fail(skip) => return Err(Fallback { skip, cap }),
                Step::Continue(target) => {
                    let chased = self.lookup(keyflag::CHASE, &target, qtype, &s.resolver, deadline);
                    let Some((answer, remaining)) = chased.await else {
                        let cap = Some(self.config.cache.failure_ttl);
                        return Err(Fallback {
                            skip: Skip::ChaseFailed,
                            cap,
                        });
                    };
                    cap = Some(cap.map_or(remaining, |c| c.min(remaining)));
                    match flatten::rcode(&answer) {
                        Some(wire::RCODE_NOERROR) => {}
                        Some(wire::RCODE_NXDOMAIN) => {
                            return Err(Fallback {
                                skip: Skip::Dangling,
                                cap,
                            })
                        }
                        _ => {
                            let cap = Some(self.config.cache.failure_ttl);
                            return Err(Fallback {
                                skip: Skip::ChaseFailed,
                                cap,
                            });
                        }
                    }
                    step = match flatten::follow(&answer, &target, qtype, chain) {
                        Step::Continue(next) if next == target => Step::Fail(Skip::NoData),
                        Step::Fail(Skip::NoChain) => Step::Fail(Skip::NoData),
                        other => other,
                    };
                }
            }
        }
    }

    /// The ALIAS (TYPE65401) record at `name` in the upstream's zone, if any: one extra
    /// upstream query, cached and coalesced like any other.
    async fn zone_alias(
        &self,
        s: &Settings,
        name: &[u8],
        deadline: Instant,
    ) -> Option<(Vec<u8>, u32)> {
        let (answer, _) = self
            .lookup(keyflag::ZONE_ALIAS, name, TYPE_ALIAS, &s.upstream, deadline)
            .await?;
        flatten::alias_target(&answer, name)
    }

    /// At start-up: says so when a config-defined alias's name also holds A or AAAA records
    /// in the upstream's zone (the alias answers, as configured, so those records are unseen).
    pub async fn check_aliases(&self) {
        let s = self.settings.load_full();
        for alias in s.aliases.values() {
            for qtype in [wire::TYPE_A, wire::TYPE_AAAA] {
                let query =
                    flatten::chase_query(&alias.name, qtype, self.config.limits.udp_size as u16);
                let deadline = Instant::now() + self.config.limits.client_deadline;
                let Ok(reply) = s.upstream.query(&query, false, deadline).await else {
                    continue;
                };
                let answered = wire::Header::read(&reply)
                    .is_some_and(|h| h.rcode() == wire::RCODE_NOERROR && h.ancount > 0);
                if answered {
                    tracing::warn!(
                        name = %crate::config::display_name(&alias.name),
                        qtype,
                        "the upstream's zone holds records where a config alias stands; the alias answers"
                    );
                }
            }
        }
    }

    /// A, AAAA for a config-defined alias: the target's addresses through the resolver, TTL
    /// the smaller of the alias's and the chain's. `None` when there is no such alias or its
    /// target does not resolve: then the upstream is asked as usual (F4).
    async fn config_alias(
        &self,
        s: &Settings,
        q: &Query<'_>,
        deadline: Instant,
    ) -> Option<Produced> {
        if !matches!(q.qtype, wire::TYPE_A | wire::TYPE_AAAA) || q.qclass != wire::CLASS_IN {
            return None;
        }
        let mut name = Vec::with_capacity(q.qname().len());
        wire::push_lower(&mut name, q.qname());
        let alias = s.aliases.get(&name)?;
        self.note(|| Event::Alias {
            source: "config",
            name: name.clone(),
            target: alias.target.clone(),
            ttl: alias.ttl,
        });
        let mut chain = Chain::new(&name, s.flatten.max_chain);
        chain
            .push_alias(&alias.target, alias.ttl.unwrap_or(i32::MAX as u32))
            .ok()?;
        let step = Step::Continue(alias.target.clone());
        let completed = self.complete(s, &mut chain, step, q.qtype, deadline).await;
        self.note(|| Event::Chain(chain.links.to_vec()));
        self.note(|| Event::Decision(completed.as_ref().map(|c| c.1).map_err(|f| f.skip)));
        let (rrs, ttl) = match completed {
            Ok(c) => c,
            Err(f) => {
                // The upstream is asked instead; count why the alias did not answer.
                self.metrics.fallback(f.skip);
                return None;
            }
        };
        self.flattened(chain.hops(), Some(true));
        let flags = response::reply_flags(q.header.flags) | wire::FLAG_AA;
        let opt = response::own_opt(q, 0).map(response::opt_record);
        let out = flatten::write(flags, q.question(), &rrs, ttl, opt.as_ref().map(|o| &o[..]))?;
        let p = self.cache.prepare(&out)?;
        let ttl = p.min_ttl().unwrap_or(ttl);
        let e = Entry::new(p, Kind::Flattened, ttl, Instant::now());
        Some(Produced {
            entry: Some(Arc::new(e)),
            raw: None,
        })
    }

    /// Looks `name`/`qtype` up through `via` (the resolver for a chase, the upstream for a
    /// zone ALIAS), cached and coalesced under a key marked `kind` so it never meets a client
    /// entry; returns the answer with TTLs aged to now, and how many seconds it stays cached.
    async fn lookup(
        &self,
        kind: u8,
        name: &[u8],
        qtype: u16,
        via: &Upstream,
        deadline: Instant,
    ) -> Option<(Vec<u8>, u32)> {
        let key = Key::new(
            kind | keyflag::RD | keyflag::EDNS,
            qtype,
            wire::CLASS_IN,
            name,
        )?;
        let now = Instant::now();
        let entry = match self.cache.get(key.as_bytes(), now) {
            Some(e) => e,
            None => {
                let produce = || async {
                    let query =
                        flatten::chase_query(name, qtype, self.config.limits.udp_size as u16);
                    if kind == keyflag::CHASE {
                        self.metrics.chase_queries.inc();
                    }
                    let began = Instant::now();
                    let asked = via.query_from(&query, false, deadline).await;
                    let role = if kind == keyflag::CHASE {
                        "resolver"
                    } else {
                        "upstream"
                    };
                    self.note(|| Event::asked(role, via, name, qtype, &asked, began));
                    let entry = match asked.map(|(r, _)| r) {
                        Ok(reply) => self
                            .cache
                            .entry_for(&reply, Instant::now(), None)
                            .map(Arc::new),
                        Err(e) => {
                            debug!(error = %e, "chase failed");
                            None
                        }
                    };
                    Produced { entry, raw: None }
                };
                match self.coalesce(key.as_bytes(), deadline, produce).await {
                    Got::Leader(Produced { entry: Some(e), .. }) | Got::Shared(e) => e,
                    _ => return None,
                }
            }
        };
        let now = Instant::now();
        let remaining = entry.expires.saturating_duration_since(now).as_secs() as u32;
        let mut out = Vec::new();
        let wire = entry.answer.wire();
        let question_end = wire::HEADER_LEN + name.len() + 4;
        let question = wire.get(wire::HEADER_LEN..question_end)?.to_vec();
        let age = entry.age(now);
        entry
            .answer
            .render(0, &question, age, usize::MAX, &mut out)
            .then_some((out, remaining))
    }
}

/// Holds one unit of a gauge (queries in flight) and gives it back on drop, so a cancelled
/// task cannot leave the gauge high.
struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    fn new(g: &prometheus_client::metrics::gauge::Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// FORMERR for a query that could not be scanned; the question is echoed when it was readable,
/// and an OPT is included when the query's own OPT was sound (RFC 6891 7).
fn formerr(msg: &[u8], question_ok: bool, out: &mut Vec<u8>) {
    let id = wire::u16_at(msg, 0).unwrap_or(0);
    let flags = wire::u16_at(msg, 2).unwrap_or(0);
    let question = question_ok
        .then(|| wire::skip_name(msg, wire::HEADER_LEN).ok())
        .flatten()
        .and_then(|end| msg.get(wire::HEADER_LEN..end + 4));
    let opt = wire::find_opt(msg).and_then(|e| response::opt_for(&e, 0));
    response::error(id, flags, question, wire::RCODE_FORMERR, opt, out);
}
