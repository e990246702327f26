//! Prometheus metrics: what is counted, and the `/metrics` endpoint (`--metrics ADDR`).
//!
//! Counting is always on (a relaxed atomic add per event; the endpoint is what is optional),
//! so the hot path has no branch on whether anybody scrapes. Names follow the Prometheus
//! conventions: `flatdns_` prefix, `_total` on counters, seconds for durations. The encoding
//! is the `prometheus-client` crate's (OpenMetrics text); the HTTP side is hyper's.
//!
//! The busiest series, queries by transport, type and rcode, are a fixed table of atomics
//! rather than a label map, so counting a query takes no lock and no hashing; only non-zero
//! cells are exposed. Types outside a list of common ones are counted as `OTHER`, so a client
//! asking for random types cannot grow the exposition.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::flatten::Skip;
use crate::handler::Transport;
use crate::shutdown::Shutdown;

/// Query types with a series of their own; any other is `OTHER`.
const TYPES: [(u16, &str); 17] = [
    (1, "A"),
    (28, "AAAA"),
    (5, "CNAME"),
    (15, "MX"),
    (16, "TXT"),
    (2, "NS"),
    (6, "SOA"),
    (12, "PTR"),
    (33, "SRV"),
    (65, "HTTPS"),
    (64, "SVCB"),
    (257, "CAA"),
    (43, "DS"),
    (48, "DNSKEY"),
    (35, "NAPTR"),
    (255, "ANY"),
    (crate::config::TYPE_ALIAS, "ALIAS"),
];
const OTHER: usize = TYPES.len();
/// The sixteen header rcodes, BADVERS (16, the only extended one flatdns writes itself) and
/// any other extended rcode.
const RCODES: [&str; 18] = [
    "NOERROR",
    "FORMERR",
    "SERVFAIL",
    "NXDOMAIN",
    "NOTIMP",
    "REFUSED",
    "YXDOMAIN",
    "YXRRSET",
    "NXRRSET",
    "NOTAUTH",
    "NOTZONE",
    "DSOTYPENI",
    "RCODE12",
    "RCODE13",
    "RCODE14",
    "RCODE15",
    "BADVERS",
    "OTHER",
];
const TRANSPORTS: [&str; 2] = ["udp", "tcp"];

/// Why an answer was not flattened, as counted (the reasons where a chain was there).
const FALLBACKS: [Skip; 11] = [
    Skip::Loop,
    Skip::TooLong,
    Skip::Dangling,
    Skip::NoData,
    Skip::ChaseFailed,
    Skip::Dnssec,
    Skip::Excluded,
    Skip::OutOfScope,
    Skip::Ambiguous,
    Skip::Truncated,
    Skip::Malformed,
];

/// Where an answer came from, for the query counters and the query log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh cache entry.
    Cache,
    /// The upstream (or the resolver), now.
    Upstream,
    /// An expired entry served under RFC 8767.
    Stale,
    /// flatdns itself: REFUSED, FORMERR, NOTIMP, BADVERS, TC for ANY, SERVFAIL at a limit or
    /// when no upstream answered.
    Local,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Cache => "cache",
            Source::Upstream => "upstream",
            Source::Stale => "stale",
            Source::Local => "local",
        }
    }
}

/// The row of `qtype` in [`TYPES`]: a match the compiler turns into a jump table, since this
/// runs for every query.
fn type_index(qtype: u16) -> usize {
    match qtype {
        1 => 0,
        28 => 1,
        5 => 2,
        15 => 3,
        16 => 4,
        2 => 5,
        6 => 6,
        12 => 7,
        33 => 8,
        65 => 9,
        64 => 10,
        257 => 11,
        43 => 12,
        48 => 13,
        35 => 14,
        255 => 15,
        crate::config::TYPE_ALIAS => 16,
        _ => OTHER,
    }
}

/// The mnemonic of a response code: the header's four bits, and above them the eight of
/// the OPT record's extended rcode.
pub fn rcode_name(rcode: u16) -> &'static str {
    RCODES[rcode_index(rcode)]
}

fn rcode_index(rcode: u16) -> usize {
    usize::from(rcode).min(RCODES.len() - 1)
}

type Labels = Vec<(&'static str, String)>;

/// The table behind `flatdns_queries_total{transport,type,rcode}`.
#[derive(Debug)]
struct QueryTable {
    cells: Box<[AtomicU64]>,
}

impl QueryTable {
    fn new() -> QueryTable {
        let n = TRANSPORTS.len() * (TYPES.len() + 1) * RCODES.len();
        QueryTable {
            cells: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn index(transport: Transport, qtype: u16, rcode: u16) -> usize {
        let t = match transport {
            Transport::Udp => 0,
            Transport::Tcp => 1,
        };
        let ty = type_index(qtype);
        (t * (TYPES.len() + 1) + ty) * RCODES.len() + rcode_index(rcode)
    }
    fn count(&self, transport: Transport, qtype: u16, rcode: u16) {
        if let Some(c) = self.cells.get(Self::index(transport, qtype, rcode)) {
            c.fetch_add(1, Relaxed);
        }
    }
}

impl Collector for QueryTable {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(
            "queries",
            "Queries answered, by transport, query type and response code.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (i, cell) in self.cells.iter().enumerate() {
            let v = cell.load(Relaxed);
            if v == 0 {
                continue;
            }
            let rcode = RCODES[i % RCODES.len()];
            let rest = i / RCODES.len();
            let ty = TYPES.get(rest % (TYPES.len() + 1)).map_or("OTHER", |t| t.1);
            let transport = TRANSPORTS[rest / (TYPES.len() + 1)];
            let labels = [("transport", transport), ("type", ty), ("rcode", rcode)];
            ConstCounter::new(v).encode(metric.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// What the cache holds, read when `/metrics` is scraped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    /// Estimated: entries times the mean size of the answers inserted so far.
    pub bytes: u64,
    pub capacity: u64,
    /// Entries gone again (replaced, evicted for the size bound, expired or flushed):
    /// insertions minus entries.
    pub removals: u64,
}

type Probe = Box<dyn Fn() -> CacheStats + Send + Sync>;

/// The cache's gauges, computed at scrape time from the cache itself.
///
/// Why not kept up to date on every change: moka reports removals only to an eviction
/// listener, and with a listener it takes a per-key lock around every insert (a concurrent
/// map insert and removal of its own) so that notifications stay ordered. That was an eighth
/// of a miss's instructions. Without it, moka still knows its entry count exactly once its
/// pending maintenance has run, which the probe does first.
#[derive(Default)]
struct CacheGauges(OnceLock<Probe>);

impl std::fmt::Debug for CacheGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheGauges")
    }
}

impl Collector for CacheGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(probe) = self.0.get() else {
            return Ok(());
        };
        let s = probe();
        let gauges = [
            ("cache_entries", "Entries in the cache.", s.entries),
            (
                "cache_size_bytes",
                "Wire bytes of the answers in the cache, estimated as entries times the mean size of the answers inserted.",
                s.bytes,
            ),
            ("cache_capacity", "The cache's size bound, in entries.", s.capacity),
        ];
        for (name, help, v) in gauges {
            let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let c = ConstCounter::new(s.removals);
        c.encode(encoder.encode_descriptor(
            "cache_removals",
            "Entries removed again: replaced, evicted for the size bound, expired or flushed.",
            None,
            c.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The counters of one upstream or resolver server.
#[derive(Clone, Debug, Default)]
pub struct ServerStats {
    pub queries: Counter,
    pub timeouts: Counter,
    pub errors: Counter,
    latency: Option<Histogram>,
}

impl ServerStats {
    /// A reply arrived `elapsed` after the attempt started.
    pub fn answered(&self, elapsed: Duration) {
        if let Some(h) = &self.latency {
            h.observe(elapsed.as_secs_f64());
        }
    }
}

/// Every metric flatdns keeps. One per process, shared by the handler, the listeners and the
/// upstream clients.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    queries: Arc<QueryTable>,
    pub dropped: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_insertions: Counter,
    /// Not cached: the cache was full and the name new to it (`Cache`'s doorkeeper).
    pub cache_skipped: Counter,
    cache_gauges: Arc<CacheGauges>,
    pub flattened: Counter,
    fallbacks: Vec<(Skip, Counter)>,
    pub chase_queries: Counter,
    pub chain_length: Histogram,
    pub alias_config: Counter,
    pub alias_zone: Counter,
    pub stale_answers: Counter,
    pub inflight: Gauge,
    pub tcp_connections: Gauge,
    pub reloads: Counter,
    pub reload_failures: Counter,
    upstream_queries: Family<Labels, Counter>,
    upstream_timeouts: Family<Labels, Counter>,
    upstream_errors: Family<Labels, Counter>,
    upstream_latency: Family<Labels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 100 us .. ~3.3 s, doubling: loopback answers to the 2 s attempt timeout.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("flatdns");
        let queries = Arc::new(QueryTable::new());
        r.register_collector(Box::new(queries.clone()));
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let dropped = counter(
            &mut r,
            "dropped",
            "Datagrams dropped unanswered (no header, QR=1).",
        );
        let cache_hits = counter(&mut r, "cache_hits", "Queries answered from the cache.");
        let cache_misses = counter(&mut r, "cache_misses", "Queries that missed the cache.");
        let cache_insertions = counter(&mut r, "cache_insertions", "Answers stored in the cache.");
        let cache_skipped = counter(
            &mut r,
            "cache_skipped",
            "Answers not cached because the cache was full and their name had not missed it lately (cached from its next miss on).",
        );
        let cache_gauges = Arc::new(CacheGauges::default());
        r.register_collector(Box::new(cache_gauges.clone()));
        let flattened = counter(
            &mut r,
            "flattened",
            "Answers flattened (CNAME chain or ALIAS).",
        );
        let fallback_family = Family::<Labels, Counter>::default();
        r.register(
            "flatten_fallbacks",
            "Chains not flattened, by reason; the client got the upstream's own answer.",
            fallback_family.clone(),
        );
        let fallbacks = FALLBACKS
            .iter()
            .map(|&s| {
                let labels = vec![("reason", s.as_str().to_string())];
                (s, fallback_family.get_or_create_owned(&labels))
            })
            .collect();
        let chase_queries = counter(
            &mut r,
            "chase_queries",
            "Queries sent to the resolver for the rest of a partial chain.",
        );
        let chain_length = Histogram::new((1..=11).map(f64::from));
        r.register(
            "chain_length",
            "CNAME/ALIAS hops in flattened answers.",
            chain_length.clone(),
        );
        let alias_family = Family::<Labels, Counter>::default();
        r.register(
            "alias_answers",
            "A/AAAA answers given for an ALIAS, by where the alias is defined.",
            alias_family.clone(),
        );
        let alias_config = alias_family.get_or_create_owned(&vec![("source", "config".into())]);
        let alias_zone = alias_family.get_or_create_owned(&vec![("source", "zone".into())]);
        let stale_answers = counter(
            &mut r,
            "stale_answers",
            "Expired answers served because the upstream was slow or failing (RFC 8767).",
        );
        let inflight = gauge(
            &mut r,
            "inflight",
            "Upstream lookups in flight (R11 bound).",
        );
        let tcp_connections = gauge(&mut r, "tcp_connections", "Client TCP connections open.");
        let reloads = counter(&mut r, "reloads", "Configuration reloads applied (SIGHUP).");
        let reload_failures = counter(
            &mut r,
            "reload_failures",
            "Configuration reloads rejected; the running configuration stayed.",
        );
        let upstream_queries = Family::<Labels, Counter>::default();
        let upstream_timeouts = Family::<Labels, Counter>::default();
        let upstream_errors = Family::<Labels, Counter>::default();
        let upstream_latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        r.register(
            "upstream_queries",
            "Attempts sent to each upstream and resolver server.",
            upstream_queries.clone(),
        );
        r.register(
            "upstream_timeouts",
            "Attempts that got no answer in time.",
            upstream_timeouts.clone(),
        );
        r.register(
            "upstream_errors",
            "Attempts that failed with a network error, or were answered SERVFAIL/REFUSED.",
            upstream_errors.clone(),
        );
        r.register(
            "upstream_latency_seconds",
            "Time from sending an attempt to accepting its reply.",
            upstream_latency.clone(),
        );
        Metrics {
            registry: r,
            queries,
            dropped,
            cache_hits,
            cache_misses,
            cache_insertions,
            cache_skipped,
            cache_gauges,
            flattened,
            fallbacks,
            chase_queries,
            chain_length,
            alias_config,
            alias_zone,
            stale_answers,
            inflight,
            tcp_connections,
            reloads,
            reload_failures,
            upstream_queries,
            upstream_timeouts,
            upstream_errors,
            upstream_latency,
        }
    }

    /// Where the cache gauges come from (the first cache to ask keeps them).
    pub fn watch_cache(&self, probe: impl Fn() -> CacheStats + Send + Sync + 'static) {
        let _ = self.cache_gauges.0.set(Box::new(probe));
    }

    /// Counts one answered query.
    pub fn query(&self, transport: Transport, qtype: u16, rcode: u16) {
        self.queries.count(transport, qtype, rcode);
    }

    /// Counts a chain that was not flattened, if `skip` is a reason worth counting (a chain
    /// was there); "nothing to flatten" is not a fallback.
    pub fn fallback(&self, skip: Skip) {
        if let Some((_, c)) = self.fallbacks.iter().find(|(s, _)| *s == skip) {
            c.inc();
        }
    }

    /// The counters of `server` in `role` ("upstream" or "resolver"), created on first use;
    /// a server that comes back after a reload continues its series.
    pub fn server(&self, role: &'static str, server: SocketAddr) -> ServerStats {
        let labels = vec![("role", role.to_string()), ("server", server.to_string())];
        ServerStats {
            queries: self.upstream_queries.get_or_create_owned(&labels),
            timeouts: self.upstream_timeouts.get_or_create_owned(&labels),
            errors: self.upstream_errors.get_or_create_owned(&labels),
            latency: Some(self.upstream_latency.get_or_create_owned(&labels)),
        }
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            debug!(error = %e, "encoding metrics");
        }
        out
    }
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Scrapers are few; more concurrent connections than this are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` on `listener` until shutdown. Anything else gets 404 (405 for a
/// method other than GET/HEAD). A connection that does not send its request headers within
/// 2 s is closed, so a trickling client cannot hold one of the few slots for long; the
/// endpoint has no ACL of its own, so bind it where only scrapers reach it.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Some((stream, peer)) = crate::server::accept(&listener, &mut shutdown, "metrics").await
        else {
            break;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "metrics connection limit reached");
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move { Ok::<_, Infallible>(respond(&metrics, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(2))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = tokio::time::timeout(Duration::from_secs(30), conn).await {
                debug!(%peer, error = %e, "metrics connection");
            }
            drop(slot);
        });
    }
}

fn respond<B>(metrics: &Metrics, req: &Request<B>) -> Response<Full<Bytes>> {
    let status = |s: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = s;
        r
    };
    if req.uri().path() != "/metrics" {
        return status(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let body = if req.method() == Method::HEAD {
        Bytes::new()
    } else {
        Bytes::from(metrics.render())
    };
    let mut r = Response::new(Full::new(body));
    if let Ok(v) = hyper::header::HeaderValue::from_str(CONTENT_TYPE) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_table_exposes_non_zero_cells_with_their_labels() {
        let m = Metrics::new();
        m.query(Transport::Udp, 1, 0);
        m.query(Transport::Udp, 1, 0);
        m.query(Transport::Tcp, 28, 3);
        m.query(Transport::Udp, 999, 2);
        m.query(Transport::Udp, 1, 16);
        m.query(Transport::Udp, 1, 23);
        let text = m.render();
        assert!(
            text.contains(r#"flatdns_queries_total{transport="udp",type="A",rcode="NOERROR"} 2"#),
            "{text}"
        );
        assert!(text
            .contains(r#"flatdns_queries_total{transport="tcp",type="AAAA",rcode="NXDOMAIN"} 1"#));
        assert!(text
            .contains(r#"flatdns_queries_total{transport="udp",type="OTHER",rcode="SERVFAIL"} 1"#));
        assert!(
            text.contains(r#"flatdns_queries_total{transport="udp",type="A",rcode="BADVERS"} 1"#)
        );
        // BADCOOKIE (23), never written by flatdns: its own cell, not another's.
        assert!(text.contains(r#"flatdns_queries_total{transport="udp",type="A",rcode="OTHER"} 1"#));
        assert_eq!(text.matches("flatdns_queries_total{").count(), 5);
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn type_index_agrees_with_the_table() {
        for (i, (t, _)) in TYPES.iter().enumerate() {
            assert_eq!(type_index(*t), i);
        }
        assert_eq!(type_index(999), OTHER);
    }

    #[test]
    fn fallbacks_count_only_reasons_where_a_chain_was_there() {
        let m = Metrics::new();
        m.fallback(Skip::Loop);
        m.fallback(Skip::NoChain);
        let text = m.render();
        assert!(
            text.contains(r#"flatdns_flatten_fallbacks_total{reason="loop"} 1"#),
            "{text}"
        );
        assert!(!text.contains(r#"reason="no-chain""#));
    }
}
