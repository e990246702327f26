//! Configuration in two layers: the raw file (serde, unknown keys rejected) and command-line
//! flags are merged into a [`Config`] whose every value has been checked against its bounds.
//!
//! Every error names where the value came from (file and line, or the flag), the key, the
//! value and the rule it broke; `main` turns it into exit status 2. `config/flatdns.toml`
//! documents every key with its default, and a test parses it.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::cli::Cli;

/// Where a rejected value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File { path: PathBuf, line: usize },
    Flag(&'static str),
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Flag(flag) => write!(f, "command line {flag}"),
            Origin::Default => write!(f, "built-in default"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{origin}: {key} = {value:?}: {reason}")]
    Invalid {
        origin: Origin,
        key: String,
        value: String,
        reason: String,
    },
}

/// What to do with clients that set DO (they asked for DNSSEC records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnssecPolicy {
    /// Flattened records cannot carry valid signatures: give DO=1 clients the upstream's
    /// answer unflattened (the default).
    Passthrough,
    /// Flatten anyway and drop the RRSIGs.
    Strip,
}

/// Cache sizing and TTL policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Maximum entries; 0 disables the cache (coalescing still applies).
    pub size: u64,
    pub min_ttl: u32,
    pub max_ttl: u32,
    pub negative_ttl_max: u32,
    pub failure_ttl: u32,
    /// RFC 8767 serve-stale: `Some` when on.
    pub stale: Option<StaleConfig>,
    /// Empty the cache when SIGHUP reloads the configuration (it survives by default).
    pub flush_on_reload: bool,
}

/// Serve-stale (RFC 8767): how long to wait for a fresh answer before serving a stale one,
/// and how long past expiry an entry may still be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleConfig {
    pub answer_after: Duration,
    pub max_age: Duration,
}

/// The TTL of records served stale (RFC 8767 section 4 recommends 30 s).
pub const STALE_TTL: u32 = 30;

/// Where flattening applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlattenConfig {
    pub enabled: bool,
    /// Lowercased wire names; empty = everywhere.
    pub zones: Vec<Vec<u8>>,
    /// Names never flattened: a single label starting with `_` matches any name whose first
    /// label it is; any other name matches itself and everything below it.
    pub exclude: Vec<Exclude>,
    /// Total CNAME hops followed, upstream answer and chasing together.
    pub max_chain: usize,
    pub dnssec: DnssecPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclude {
    FirstLabel(Vec<u8>),
    Subtree(Vec<u8>),
}

/// Resource limits (R9, R11-R14, R16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_inflight: usize,
    pub waiters_per_key: usize,
    /// Queries waiting for the upstream per client address (R9).
    pub pending_per_client: usize,
    pub client_deadline: Duration,
    pub udp_size: usize,
    /// UDP sockets (and receive threads) per listen address; 0 = one per CPU core.
    pub udp_workers: usize,
    pub tcp_connections: usize,
    pub tcp_per_client: usize,
    pub tcp_pipeline: usize,
    pub tcp_idle_timeout: Duration,
    pub tcp_message_timeout: Duration,
    pub tcp_write_timeout: Duration,
    /// How long an upstream TCP connection with nothing outstanding stays open (R26).
    pub upstream_tcp_idle: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// True when `listen` is the default list (given or not): an address this host lacks
    /// (no IPv6 loopback, say) is then skipped with a warning rather than fatal.
    pub listen_is_default: bool,
    pub upstreams: Vec<SocketAddr>,
    /// Where partial chains are chased; empty means the upstreams.
    pub resolvers: Vec<SocketAddr>,
    pub allow: Vec<IpNet>,
    pub timeout: Duration,
    /// Upstream attempts per client query (R8).
    pub attempts: usize,
    pub log_level: String,
    pub cache: CacheConfig,
    pub flatten: FlattenConfig,
    pub limits: Limits,
    /// Config-defined aliases (`[[alias]]`): A/AAAA at `name` answered with `target`'s addresses.
    pub aliases: Vec<Alias>,
    /// Honour PowerDNS-style ALIAS records (TYPE65401) held in the upstream's zone.
    pub alias_from_zone: bool,
    /// Where `/metrics` is served (Prometheus); `None`: not served.
    pub metrics: Option<SocketAddr>,
    /// One log line per answered query, and its format.
    pub query_log: QueryLog,
}

/// The structured query log (`--query-log`): off, or one line per answered query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryLog {
    Off,
    /// tracing-subscriber's plain text lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl QueryLog {
    pub fn parse(text: &str) -> Option<QueryLog> {
        match text {
            "off" => Some(QueryLog::Off),
            "text" => Some(QueryLog::Text),
            "json" => Some(QueryLog::Json),
            _ => None,
        }
    }
}

/// An ALIAS defined in the config file (Route 53 semantics, for a zone apex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alias {
    /// Lowercased wire names.
    pub name: Vec<u8>,
    pub target: Vec<u8>,
    /// Upper bound on the answer's TTL; the target chain's TTLs bound it too.
    pub ttl: Option<u32>,
}

/// The record type PowerDNS uses for ALIAS; a BIND zone can carry it as an unknown type.
pub const TYPE_ALIAS: u16 = 65401;

/// dnsdist's default ACL: loopback, RFC 1918, CGNAT, link-local, ULA (R1, RFC 5358).
pub const DEFAULT_ALLOW: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
];

pub const DEFAULT_LISTEN: &[&str] = &["127.0.0.1:53", "[::1]:53"];

// ---------------------------------------------------------------------------------------------
// Raw layer

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Secs(u64),
    Text(String),
}

type S<T> = Option<Spanned<T>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    listen: S<Vec<String>>,
    upstream: S<Vec<String>>,
    resolver: S<Vec<String>>,
    allow: S<Vec<String>>,
    timeout: S<RawDuration>,
    log_level: S<String>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    flatten: RawFlatten,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    alias: Vec<RawAlias>,
    alias_from_zone: S<bool>,
    metrics: S<String>,
    query_log: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlias {
    name: Spanned<String>,
    target: Spanned<String>,
    ttl: S<RawDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    size: S<i64>,
    min_ttl: S<RawDuration>,
    max_ttl: S<RawDuration>,
    negative_ttl_max: S<RawDuration>,
    failure_ttl: S<RawDuration>,
    serve_stale: S<bool>,
    stale_answer_after: S<RawDuration>,
    stale_max_age: S<RawDuration>,
    flush_on_reload: S<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlatten {
    enabled: S<bool>,
    zones: S<Vec<String>>,
    exclude: S<Vec<String>>,
    max_chain: S<i64>,
    dnssec: S<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_inflight: S<i64>,
    waiters_per_key: S<i64>,
    pending_per_client: S<i64>,
    client_deadline: S<RawDuration>,
    udp_size: S<i64>,
    udp_workers: S<i64>,
    tcp_connections: S<i64>,
    tcp_per_client: S<i64>,
    tcp_pipeline: S<i64>,
    tcp_idle_timeout: S<RawDuration>,
    tcp_message_timeout: S<RawDuration>,
    tcp_write_timeout: S<RawDuration>,
    upstream_tcp_idle: S<RawDuration>,
}

/// A value with where it came from, on its way to validation.
struct Val<T> {
    v: T,
    origin: Origin,
}

struct Layer<'a> {
    path: Option<&'a Path>,
    src: &'a str,
}

impl Layer<'_> {
    fn origin(&self, span: Range<usize>) -> Origin {
        match self.path {
            Some(p) => Origin::File {
                path: p.to_path_buf(),
                line: self.src[..span.start.min(self.src.len())]
                    .matches('\n')
                    .count()
                    + 1,
            },
            None => Origin::Default,
        }
    }
    /// Flag value if given, else the file's, else the default.
    fn pick<T: Clone>(&self, flag: (&'static str, Option<T>), file: &S<T>, default: T) -> Val<T> {
        if let Some(v) = flag.1 {
            return Val {
                v,
                origin: Origin::Flag(flag.0),
            };
        }
        match file {
            Some(s) => Val {
                v: s.get_ref().clone(),
                origin: self.origin(s.span()),
            },
            None => Val {
                v: default,
                origin: Origin::Default,
            },
        }
    }
    fn pick_list(
        &self,
        flag: (&'static str, &[String]),
        file: &S<Vec<String>>,
        default: &[&str],
    ) -> Val<Vec<String>> {
        let given = (!flag.1.is_empty()).then(|| flag.1.to_vec());
        self.pick(
            (flag.0, given),
            file,
            default.iter().map(|s| s.to_string()).collect(),
        )
    }
    fn pick_dur(
        &self,
        flag: (&'static str, Option<&String>),
        file: &S<RawDuration>,
        default: &str,
    ) -> Val<String> {
        let file = file.as_ref().map(|s| {
            let text = match s.get_ref() {
                RawDuration::Secs(n) => n.to_string(),
                RawDuration::Text(t) => t.clone(),
            };
            Spanned::new(s.span(), text)
        });
        self.pick((flag.0, flag.1.cloned()), &file, default.to_string())
    }
}

fn invalid<T: std::fmt::Debug>(val: &Val<T>, key: &str, reason: impl Into<String>) -> ConfigError {
    let value = format!("{:?}", val.v);
    ConfigError::Invalid {
        origin: val.origin.clone(),
        key: key.to_string(),
        value: value.trim_matches('"').to_string(),
        reason: reason.into(),
    }
}

/// Parses `2s`, `500ms`, `5m`, `1h`, `1d`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| "expected a duration such as 2s, 500ms, 5m, 1h, 1d".to_string())?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        other => return Err(format!("unknown unit {other:?}; use ms, s, m, h or d")),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err("duration out of range".into());
    }
    Ok(Duration::from_secs_f64(secs))
}

fn dur(
    val: &Val<String>,
    key: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let d = parse_duration(&val.v).map_err(|e| invalid(val, key, e))?;
    if d < min || d > max {
        return Err(invalid(
            val,
            key,
            format!("must be between {min:?} and {max:?}"),
        ));
    }
    Ok(d)
}

fn secs(val: &Val<String>, key: &str, max: u32) -> Result<u32, ConfigError> {
    let d = dur(val, key, Duration::ZERO, Duration::from_secs(max.into()))?;
    Ok(d.as_secs() as u32)
}

fn int(val: &Val<i64>, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
    if val.v < min || val.v > max {
        return Err(invalid(
            val,
            key,
            format!("must be between {min} and {max}"),
        ));
    }
    Ok(val.v)
}

/// Parses `IP`, `IP:PORT`, `[IPv6]:PORT` or a bare IPv6 address; the port defaults to `port`.
pub fn parse_addr(text: &str, port: u16) -> Result<SocketAddr, String> {
    let t = text.trim();
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let ip = t.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .map_err(|_| "expected IP, IP:PORT or [IPv6]:PORT".into())
}

/// Parses a domain name into lowercased uncompressed wire form.
pub fn parse_name(text: &str) -> Result<Vec<u8>, String> {
    let t = text.trim().trim_end_matches('.');
    let mut out = Vec::with_capacity(t.len() + 2);
    if !t.is_empty() {
        for label in t.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err("each label must be 1 to 63 characters".into());
            }
            if !label.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
                return Err("names are written in plain ASCII, without escapes".into());
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    if out.len() > 255 {
        return Err("name longer than 255 octets".into());
    }
    Ok(out)
}

/// An uncompressed wire name as text ("www.example.") in presentation format (RFC 1035
/// 5.1): a byte outside the printable ASCII range as `\DDD`, and `.`, `\`, `"` inside a
/// label escaped with a backslash. A label may hold any byte, and the text goes into logs:
/// without escaping, a query name with a newline could forge a log line.
pub fn display_name(wire: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&len) = wire.get(pos) {
        if len == 0 {
            break;
        }
        let label = wire
            .get(pos + 1..pos + 1 + len as usize)
            .unwrap_or_default();
        for &b in label {
            match b {
                b'.' | b'\\' | b'"' => {
                    out.push('\\');
                    out.push(b as char);
                }
                0x21..=0x7e => out.push(b as char),
                _ => {
                    let _ = write!(out, "\\{b:03}");
                }
            }
        }
        out.push('.');
        pos += 1 + len as usize;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// `nameserver` lines of a resolv.conf (scoped IPv6 addresses skipped).
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        .filter_map(|w| w.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// True when sending to `upstream` would reach one of our own listeners.
fn is_own(upstream: &SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == upstream.port()
            && (l.ip() == upstream.ip() || (l.ip().is_unspecified() && upstream.ip().is_loopback()))
    })
}

impl Config {
    /// Loads the file named by `--config` (if any), applies the flags, validates.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let (path, src) = match &cli.config {
            Some(p) => {
                let s = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.clone(),
                    source: e,
                })?;
                (Some(p.as_path()), s)
            }
            None => (None, String::new()),
        };
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        Self::build(cli, path, &src, &resolv)
    }

    /// Parses config file text without flags (used by tests and `--check-config`).
    pub fn from_toml(path: &Path, src: &str) -> Result<Config, ConfigError> {
        Self::build(&Cli::default(), Some(path), src, "")
    }

    /// Merges `src` (file text), the flags and the system's resolv.conf text.
    pub fn build(
        cli: &Cli,
        path: Option<&Path>,
        src: &str,
        resolv_conf: &str,
    ) -> Result<Config, ConfigError> {
        let raw: RawFile = match path {
            Some(p) => toml::from_str(src).map_err(|e| ConfigError::Syntax {
                path: p.to_path_buf(),
                message: e.to_string().trim_end().to_string(),
            })?,
            None => RawFile::default(),
        };
        let l = Layer { path, src };

        let listen_v = l.pick_list(("--listen", &cli.listen), &raw.listen, DEFAULT_LISTEN);
        let mut listen = Vec::new();
        for a in &listen_v.v {
            let sa = parse_addr(a, 53).map_err(|e| invalid(&listen_v, "listen", e))?;
            if !listen.contains(&sa) {
                listen.push(sa);
            }
        }
        if listen.is_empty() {
            return Err(invalid(
                &listen_v,
                "listen",
                "at least one address is needed",
            ));
        }

        let up_v = l.pick_list(("--upstream", &cli.upstream), &raw.upstream, &[]);
        let mut upstreams = Vec::new();
        for a in &up_v.v {
            let sa = parse_addr(a, 53).map_err(|e| invalid(&up_v, "upstream", e))?;
            if is_own(&sa, &listen) {
                return Err(invalid(
                    &up_v,
                    "upstream",
                    "is one of flatdns's own listen addresses (a forwarding loop)",
                ));
            }
            upstreams.push(sa);
        }
        if up_v.origin == Origin::Default {
            upstreams = resolv_conf_nameservers(resolv_conf)
                .into_iter()
                .filter(|u| !is_own(u, &listen))
                .collect();
        }
        if upstreams.is_empty() {
            return Err(ConfigError::Invalid {
                origin: Origin::Default,
                key: "upstream".into(),
                value: String::new(),
                reason: "no upstream: /etc/resolv.conf names no nameserver other than flatdns itself; give --upstream ADDR".into(),
            });
        }

        let res_v = l.pick_list(("--resolver", &cli.resolver), &raw.resolver, &[]);
        let mut resolvers = Vec::new();
        for a in &res_v.v {
            let sa = parse_addr(a, 53).map_err(|e| invalid(&res_v, "resolver", e))?;
            if is_own(&sa, &listen) {
                return Err(invalid(
                    &res_v,
                    "resolver",
                    "is one of flatdns's own listen addresses (a loop)",
                ));
            }
            resolvers.push(sa);
        }

        let allow_v = l.pick_list(("--allow", &cli.allow), &raw.allow, DEFAULT_ALLOW);
        let mut allow = Vec::new();
        for a in &allow_v.v {
            let net = a
                .parse::<IpNet>()
                .or_else(|_| a.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        &allow_v,
                        "allow",
                        format!("{a:?} is not a CIDR such as 192.0.2.0/24"),
                    )
                })?;
            allow.push(net.trunc());
        }

        let timeout_v = l.pick_dur(("--timeout", cli.timeout.as_ref()), &raw.timeout, "2s");
        let timeout = dur(
            &timeout_v,
            "timeout",
            Duration::from_millis(10),
            Duration::from_secs(30),
        )?;

        let log_v = l.pick(
            ("--log-level", cli.log_level.clone()),
            &raw.log_level,
            "info".to_string(),
        );
        if tracing_subscriber::EnvFilter::try_new(&log_v.v).is_err() {
            return Err(invalid(
                &log_v,
                "log_level",
                "expected error, warn, info, debug, trace or a tracing filter",
            ));
        }

        let c = &raw.cache;
        let size_v = l.pick(("--cache-size", cli.cache_size), &c.size, 100_000);
        let size = int(&size_v, "cache.size", 0, 100_000_000)? as u64;
        let min_v = l.pick_dur(("--min-ttl", cli.min_ttl.as_ref()), &c.min_ttl, "0");
        let min_ttl = secs(&min_v, "cache.min_ttl", 86_400)?;
        let max_v = l.pick_dur(("--max-ttl", cli.max_ttl.as_ref()), &c.max_ttl, "86400");
        let max_ttl = secs(&max_v, "cache.max_ttl", 604_800)?;
        if max_ttl < min_ttl {
            return Err(invalid(
                &max_v,
                "cache.max_ttl",
                "must not be below cache.min_ttl",
            ));
        }
        let neg_v = l.pick_dur(
            ("--negative-ttl-max", cli.negative_ttl_max.as_ref()),
            &c.negative_ttl_max,
            "3600",
        );
        let negative_ttl_max = secs(&neg_v, "cache.negative_ttl_max", 86_400)?;
        let fail_v = l.pick_dur(
            ("--failure-ttl", cli.failure_ttl.as_ref()),
            &c.failure_ttl,
            "5",
        );
        let failure_ttl = secs(&fail_v, "cache.failure_ttl", 300)?;
        let stale_on = l.pick(
            ("--serve-stale", cli.serve_stale.then_some(true)),
            &c.serve_stale,
            false,
        );
        let after_v = l.pick_dur(("", None), &c.stale_answer_after, "1.8s");
        let answer_after = dur(
            &after_v,
            "cache.stale_answer_after",
            Duration::from_millis(10),
            Duration::from_secs(30),
        )?;
        let age_v = l.pick_dur(("", None), &c.stale_max_age, "1d");
        let max_age = dur(
            &age_v,
            "cache.stale_max_age",
            Duration::from_secs(1),
            Duration::from_secs(7 * 86_400),
        )?;
        let flush_on_reload = l
            .pick(
                ("--flush-on-reload", cli.flush_on_reload.then_some(true)),
                &c.flush_on_reload,
                false,
            )
            .v;
        let stale = stale_on.v.then_some(StaleConfig {
            answer_after,
            max_age,
        });

        let f = &raw.flatten;
        let enabled = l.pick(("", None), &f.enabled, true).v;
        let zones_v = l.pick_list(("", &[]), &f.zones, &[]);
        let mut zones = Vec::new();
        for z in &zones_v.v {
            zones.push(
                parse_name(z)
                    .map_err(|e| invalid(&zones_v, "flatten.zones", format!("{z:?}: {e}")))?,
            );
        }
        let excl_v = l.pick_list(("", &[]), &f.exclude, &["_acme-challenge"]);
        let mut exclude = Vec::new();
        for x in &excl_v.v {
            let name = parse_name(x)
                .map_err(|e| invalid(&excl_v, "flatten.exclude", format!("{x:?}: {e}")))?;
            let single_underscore =
                name.len() == name[0] as usize + 2 && name.get(1) == Some(&b'_');
            exclude.push(if single_underscore {
                Exclude::FirstLabel(name[..name.len() - 1].to_vec())
            } else {
                Exclude::Subtree(name)
            });
        }
        let chain_v = l.pick(("--max-chain", cli.max_chain), &f.max_chain, 11);
        let max_chain = int(&chain_v, "flatten.max_chain", 1, 32)? as usize;
        let dnssec_v = l.pick(("", None), &f.dnssec, "passthrough".to_string());
        let dnssec = match dnssec_v.v.as_str() {
            "passthrough" => DnssecPolicy::Passthrough,
            "strip" => DnssecPolicy::Strip,
            _ => {
                return Err(invalid(
                    &dnssec_v,
                    "flatten.dnssec",
                    "expected \"passthrough\" or \"strip\"",
                ))
            }
        };

        let m = &raw.limits;
        let lim = |key: &'static str, file: &S<i64>, default: i64, min: i64, max: i64| {
            int(&l.pick(("", None), file, default), key, min, max).map(|v| v as usize)
        };
        let limits = Limits {
            max_inflight: lim("limits.max_inflight", &m.max_inflight, 4096, 1, 1_000_000)?,
            waiters_per_key: lim(
                "limits.waiters_per_key",
                &m.waiters_per_key,
                100,
                1,
                100_000,
            )?,
            pending_per_client: lim(
                "limits.pending_per_client",
                &m.pending_per_client,
                1000,
                1,
                1_000_000,
            )?,
            udp_size: lim("limits.udp_size", &m.udp_size, 1232, 512, 4096)?,
            udp_workers: lim("limits.udp_workers", &m.udp_workers, 0, 0, 256)?,
            tcp_connections: lim(
                "limits.tcp_connections",
                &m.tcp_connections,
                256,
                1,
                100_000,
            )?,
            tcp_per_client: lim("limits.tcp_per_client", &m.tcp_per_client, 16, 1, 100_000)?,
            tcp_pipeline: lim("limits.tcp_pipeline", &m.tcp_pipeline, 128, 1, 65_535)?,
            client_deadline: dur(
                &l.pick_dur(("", None), &m.client_deadline, "4.5s"),
                "limits.client_deadline",
                Duration::from_millis(100),
                Duration::from_secs(60),
            )?,
            tcp_idle_timeout: dur(
                &l.pick_dur(("", None), &m.tcp_idle_timeout, "10s"),
                "limits.tcp_idle_timeout",
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            tcp_message_timeout: dur(
                &l.pick_dur(("", None), &m.tcp_message_timeout, "2s"),
                "limits.tcp_message_timeout",
                Duration::from_millis(100),
                Duration::from_secs(60),
            )?,
            tcp_write_timeout: dur(
                &l.pick_dur(("", None), &m.tcp_write_timeout, "5s"),
                "limits.tcp_write_timeout",
                Duration::from_millis(100),
                Duration::from_secs(60),
            )?,
            upstream_tcp_idle: dur(
                &l.pick_dur(("", None), &m.upstream_tcp_idle, "10s"),
                "limits.upstream_tcp_idle",
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
        };

        let mut aliases: Vec<Alias> = Vec::new();
        for a in &raw.alias {
            let name_v = Val {
                v: a.name.get_ref().clone(),
                origin: l.origin(a.name.span()),
            };
            let name = parse_name(&name_v.v).map_err(|e| invalid(&name_v, "alias.name", e))?;
            let target_v = Val {
                v: a.target.get_ref().clone(),
                origin: l.origin(a.target.span()),
            };
            let target =
                parse_name(&target_v.v).map_err(|e| invalid(&target_v, "alias.target", e))?;
            if target == name {
                return Err(invalid(
                    &target_v,
                    "alias.target",
                    "an alias cannot point at itself",
                ));
            }
            if aliases.iter().any(|x| x.name == name) {
                return Err(invalid(&name_v, "alias.name", "defined twice"));
            }
            let ttl = match &a.ttl {
                Some(_) => Some(secs(
                    &l.pick_dur(("", None), &a.ttl, "0"),
                    "alias.ttl",
                    604_800,
                )?),
                None => None,
            };
            aliases.push(Alias { name, target, ttl });
        }
        let alias_from_zone = l.pick(("", None), &raw.alias_from_zone, false).v;

        let metrics_v = l.pick(
            ("--metrics", cli.metrics.clone()),
            &raw.metrics,
            String::new(),
        );
        let metrics = match metrics_v.v.as_str() {
            "" => None,
            a => Some(parse_addr(a, 9153).map_err(|e| invalid(&metrics_v, "metrics", e))?),
        };
        if let Some(m) = metrics.filter(|m| m.port() != 0) {
            if listen.iter().any(|l| {
                l.port() == m.port()
                    && (l.ip() == m.ip() || l.ip().is_unspecified() || m.ip().is_unspecified())
            }) {
                return Err(invalid(
                    &metrics_v,
                    "metrics",
                    "is a DNS listen address (flatdns serves DNS over TCP there)",
                ));
            }
        }
        let qlog_v = l.pick(
            ("--query-log", cli.query_log.clone()),
            &raw.query_log,
            "off".to_string(),
        );
        let query_log = QueryLog::parse(&qlog_v.v).ok_or_else(|| {
            invalid(
                &qlog_v,
                "query_log",
                "expected \"off\", \"text\" or \"json\"",
            )
        })?;

        Ok(Config {
            aliases,
            alias_from_zone,
            metrics,
            query_log,
            listen_is_default: DEFAULT_LISTEN
                .iter()
                .map(|a| parse_addr(a, 53).ok())
                .eq(listen.iter().map(|a| Some(*a))),
            listen,
            upstreams,
            resolvers,
            allow,
            timeout,
            attempts: 2,
            log_level: log_v.v,
            cache: CacheConfig {
                size,
                min_ttl,
                max_ttl,
                negative_ttl_max,
                failure_ttl,
                stale,
                flush_on_reload,
            },
            flatten: FlattenConfig {
                enabled,
                zones,
                exclude,
                max_chain,
                dnssec,
            },
            limits,
        })
    }

    /// A configuration for tests and embedding: listen on `listen`, forward to `upstreams`,
    /// every other value at its default.
    pub fn for_test(listen: SocketAddr, upstreams: Vec<SocketAddr>) -> Config {
        let cli = Cli {
            listen: vec![listen.to_string()],
            upstream: upstreams.iter().map(|u| u.to_string()).collect(),
            ..Cli::default()
        };
        match Self::build(&cli, None, "", "") {
            Ok(c) => c,
            // The defaults are valid by construction; a test config that is not is a bug.
            Err(e) => panic!("default config invalid: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(src: &str) -> Result<Config, ConfigError> {
        let cli = Cli {
            upstream: vec!["192.0.2.1".into()],
            ..Cli::default()
        };
        Config::build(&cli, Some(Path::new("t.toml")), src, "")
    }

    #[test]
    fn defaults() {
        let c = file("").unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.upstreams, vec!["192.0.2.1:53".parse().unwrap()]);
        assert_eq!(c.timeout, Duration::from_secs(2));
        assert_eq!(c.cache.max_ttl, 86_400);
        assert_eq!(c.flatten.max_chain, 11);
        assert_eq!(c.limits.client_deadline, Duration::from_millis(4500));
        // The requirements' figures (R4, R8, R9, R11-R14, R16, R26) are the defaults.
        let l = &c.limits;
        assert_eq!(
            (l.max_inflight, l.waiters_per_key, l.pending_per_client),
            (4096, 100, 1000)
        );
        assert_eq!(
            (l.tcp_connections, l.tcp_per_client, l.udp_size),
            (256, 16, 1232)
        );
        assert_eq!(l.tcp_idle_timeout, Duration::from_secs(10));
        assert_eq!(l.tcp_message_timeout, Duration::from_secs(2));
        assert_eq!(l.tcp_write_timeout, Duration::from_secs(5));
        assert_eq!(l.upstream_tcp_idle, Duration::from_secs(10));
        assert!(l.tcp_pipeline >= 100);
        assert_eq!(c.attempts, 2);
        assert_eq!((c.cache.negative_ttl_max, c.cache.failure_ttl), (3600, 5));
        assert!(c.cache.stale.is_none(), "serve-stale is off by default");
        let on = Config::build(
            &Cli {
                upstream: vec!["192.0.2.1".into()],
                serve_stale: true,
                ..Cli::default()
            },
            None,
            "",
            "",
        )
        .unwrap();
        let stale = on.cache.stale.unwrap();
        assert_eq!(
            (stale.answer_after, stale.max_age),
            (Duration::from_millis(1800), Duration::from_secs(86_400))
        );
        assert_eq!(
            c.flatten.exclude,
            vec![Exclude::FirstLabel(b"\x0f_acme-challenge".to_vec())]
        );
    }

    #[test]
    fn errors_name_key_value_and_line() {
        let e = file("timeout = \"2s\"\n\n[cache]\nmax_ttl = \"3x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.toml:4") && e.contains("cache.max_ttl") && e.contains("3x"),
            "{e}"
        );
        let e = file("listen = [\"nonsense\"]").unwrap_err().to_string();
        assert!(
            e.contains("t.toml:1") && e.contains("listen") && e.contains("nonsense"),
            "{e}"
        );
        let e = file("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("bogus") && e.contains("line 1"), "{e}");
        let e = file("[flatten]\nmax_chain = 0").unwrap_err().to_string();
        assert!(
            e.contains("t.toml:2") && e.contains("flatten.max_chain"),
            "{e}"
        );
    }

    #[test]
    fn flags_win_over_file() {
        let cli = Cli {
            timeout: Some("300ms".into()),
            upstream: vec!["[::1]:5300".into()],
            ..Cli::default()
        };
        let c = Config::build(
            &cli,
            Some(Path::new("t.toml")),
            "timeout = 1\nupstream = [\"192.0.2.9\"]",
            "",
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(300));
        assert_eq!(c.upstreams, vec!["[::1]:5300".parse().unwrap()]);
    }

    #[test]
    fn default_upstreams_skip_own_listeners() {
        let cli = Cli {
            listen: vec!["127.0.0.1:53".into()],
            ..Cli::default()
        };
        let c = Config::build(
            &cli,
            None,
            "",
            "nameserver 127.0.0.1\nnameserver 192.0.2.53\n",
        )
        .unwrap();
        assert_eq!(c.upstreams, vec!["192.0.2.53:53".parse().unwrap()]);
        let e = Config::build(&cli, None, "", "nameserver 127.0.0.1\n").unwrap_err();
        assert!(e.to_string().contains("--upstream"));
        let cli = Cli {
            listen: vec!["127.0.0.1:53".into()],
            upstream: vec!["127.0.0.1".into()],
            ..Cli::default()
        };
        assert!(Config::build(&cli, None, "", "")
            .unwrap_err()
            .to_string()
            .contains("loop"));
    }

    #[test]
    fn shipped_config_parses_and_states_the_defaults() {
        let cli = Cli {
            upstream: vec!["192.0.2.1".into()],
            ..Cli::default()
        };
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/flatdns.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let shipped = Config::build(&cli, Some(path), &text, "").unwrap();
        let defaults = Config::build(&cli, None, "", "").unwrap();
        assert_eq!(
            shipped, defaults,
            "config/flatdns.toml must document the real defaults"
        );
    }

    #[test]
    fn aliases_parse_and_bad_ones_name_their_line() {
        let c = file(
            "alias_from_zone = true\n[[alias]]\nname = \"Example.com\"\ntarget = \"lb.provider.net.\"\nttl = 60\n",
        )
        .unwrap();
        assert!(c.alias_from_zone);
        assert_eq!(
            c.aliases,
            vec![Alias {
                name: b"\x07example\x03com\x00".to_vec(),
                target: b"\x02lb\x08provider\x03net\x00".to_vec(),
                ttl: Some(60),
            }]
        );
        let e = file("[[alias]]\nname = \"a.example\"\ntarget = \"a.example\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.toml:3") && e.contains("alias.target"), "{e}");
        let e = file("[[alias]]\nname = \"a..example\"\ntarget = \"b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.toml:2") && e.contains("alias.name"), "{e}");
        let e = file("[[alias]]\nname = \"a\"\n").unwrap_err().to_string();
        assert!(e.contains("target"), "{e}");
    }

    #[test]
    fn names_print_in_presentation_format() {
        assert_eq!(display_name(b"\x03www\x07example\x00"), "www.example.");
        assert_eq!(display_name(b"\x00"), ".");
        // A newline, a dot and a backslash inside labels cannot forge log lines or labels.
        assert_eq!(
            display_name(b"\x04a\nb.\x02\\\"\x00"),
            "a\\010b\\..\\\\\\\"."
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("4.5s").unwrap(), Duration::from_millis(4500));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
