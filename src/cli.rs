//! Command-line flags. Every flag has a config-file key (see `config/flatdns.toml`); a flag
//! given on the command line wins over the file.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// A DNS forwarding proxy that flattens CNAME chains into plain A/AAAA answers.
///
/// SIGHUP reloads the config file (upstreams, resolver, ACL, flatten scope, aliases, log
/// level); SIGTERM/SIGINT finish the queries in flight and exit.
#[derive(Debug, Default, Clone, Parser)]
#[command(name = "flatdns", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Config file (TOML). Flags override its values.
    #[arg(long, short = 'c', value_name = "FILE", help_heading = "General")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print it, and exit (status 0 if valid, 2 if not).
    #[arg(long, help_heading = "General")]
    pub check_config: bool,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive. RUST_LOG also works.
    #[arg(long, value_name = "LEVEL", help_heading = "General")]
    pub log_level: Option<String>,

    /// Address to serve on, UDP and TCP (repeatable). Default 127.0.0.1:53 and `[::1]:53`.
    #[arg(long, value_name = "IP:PORT", help_heading = "Serving")]
    pub listen: Vec<String>,

    /// Client network allowed to query (repeatable). Default loopback and private ranges.
    #[arg(long, value_name = "CIDR", help_heading = "Serving")]
    pub allow: Vec<String>,

    /// Upstream nameserver (repeatable; port defaults to 53). Default: /etc/resolv.conf.
    #[arg(long, value_name = "ADDR", help_heading = "Upstream")]
    pub upstream: Vec<String>,

    /// Resolver for the rest of a partial chain (repeatable). Default: the upstreams.
    #[arg(long, value_name = "ADDR", help_heading = "Upstream")]
    pub resolver: Vec<String>,

    /// Time allowed per upstream attempt, e.g. 2s or 500ms. Default 2s.
    #[arg(long, value_name = "DURATION", help_heading = "Upstream")]
    pub timeout: Option<String>,

    /// Most CNAME hops followed in one answer. Default 11.
    #[arg(long, value_name = "N", help_heading = "Flattening")]
    pub max_chain: Option<i64>,

    /// Cache size in entries; 0 disables the cache. Default 100000.
    #[arg(long, value_name = "N", help_heading = "Cache")]
    pub cache_size: Option<i64>,

    /// Lowest TTL given to cached records. Default 0.
    #[arg(long, value_name = "DURATION", help_heading = "Cache")]
    pub min_ttl: Option<String>,

    /// Highest TTL given to cached records. Default 86400 (1 day).
    #[arg(long, value_name = "DURATION", help_heading = "Cache")]
    pub max_ttl: Option<String>,

    /// Cap on how long NXDOMAIN/NODATA answers are cached (RFC 2308). Default 3600.
    #[arg(long, value_name = "DURATION", help_heading = "Cache")]
    pub negative_ttl_max: Option<String>,

    /// How long SERVFAIL, REFUSED and timeouts are cached (RFC 9520). Default 5.
    #[arg(long, value_name = "DURATION", help_heading = "Cache")]
    pub failure_ttl: Option<String>,

    /// Serve expired answers (TTL 30) when the upstream is slow or failing (RFC 8767).
    #[arg(long, help_heading = "Cache")]
    pub serve_stale: bool,

    /// Empty the cache when SIGHUP reloads the configuration (by default it is kept).
    #[arg(long, help_heading = "Cache")]
    pub flush_on_reload: bool,

    /// Serve Prometheus metrics at http://ADDR/metrics (port defaults to 9153). Default: off.
    #[arg(long, value_name = "IP:PORT", help_heading = "Observability")]
    pub metrics: Option<String>,

    /// Log every answered query to stdout: off, text or json. Default: off.
    #[arg(long, value_name = "FORMAT", help_heading = "Observability")]
    pub query_log: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Look NAME up as the proxy would and print the chain walked (each hop's TTL and which
    /// server answered it), the decision (flattened, or why not) and the final answer.
    Explain(ExplainArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    /// The name to look up, e.g. www.example.com
    pub name: String,

    /// Query type: A (default), AAAA, MX, TYPE65401 ...
    #[arg(default_value = "A")]
    pub qtype: String,

    /// Upstream nameserver (repeatable). Default: the config file's, else /etc/resolv.conf.
    #[arg(long, value_name = "ADDR")]
    pub upstream: Vec<String>,

    /// Resolver for the rest of a partial chain (repeatable). Default: the config file's.
    #[arg(long, value_name = "ADDR")]
    pub resolver: Vec<String>,

    /// Config file whose upstreams, resolver, flatten scope and aliases apply.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Time allowed per upstream attempt. Default 2s.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
}

impl ExplainArgs {
    /// The flags that configure the lookup: explain's own, over the top-level ones. It does
    /// not listen, so the listen address is set to one that cannot clash with an upstream.
    pub fn cli(&self, top: &Cli) -> Cli {
        let or =
            |a: &Vec<String>, b: &Vec<String>| if a.is_empty() { b.clone() } else { a.clone() };
        Cli {
            command: None,
            config: self.config.clone().or_else(|| top.config.clone()),
            upstream: or(&self.upstream, &top.upstream),
            resolver: or(&self.resolver, &top.resolver),
            timeout: self.timeout.clone().or_else(|| top.timeout.clone()),
            listen: vec!["127.0.0.1:0".into()],
            metrics: None,
            query_log: Some("off".into()),
            ..top.clone()
        }
    }
}
