//! flatdns: a DNS forwarding proxy that flattens CNAME chains.
//!
//! Clients send queries over UDP or TCP; flatdns forwards them to an upstream nameserver and,
//! when an A/AAAA answer is a CNAME chain, answers with the chain's final addresses owned by
//! the question name (Route 53 ALIAS semantics). Where the upstream gave only part of the
//! chain, flatdns resolves the rest through a resolver. Everything else passes through
//! unchanged but for the ID.
//!
//! # Layout
//!
//! ```text
//!  main.rs ── cli.rs, config.rs          flags over file -> validated Config
//!     │
//!  server/ ── udp.rs, tcp.rs             the only code touching client sockets
//!     │
//!  handler.rs                            the pipeline; policy order lives here
//!     ├── wire.rs, response.rs           scan queries, render replies (no full parse)
//!     ├── cache.rs                       moka, keys, TTL policy
//!     ├── inflight.rs                    one upstream query per key
//!     ├── flatten.rs                     pure: message in, decision and message out
//!     ├── upstream/                      the only code talking to nameservers
//!     └── metrics.rs                     counters; /metrics (--metrics)
//!  explain.rs                            `flatdns explain`: the handler with a trace
//! ```
//!
//! # The path of one query
//!
//! socket -> [`wire::Query::parse`] -> ACL -> [`cache::Cache::get`] (hit: patch ID, question
//! case, TTLs; send) -> miss: [`inflight::Inflight::join`] -> [`upstream::Upstream::query`]
//! -> [`flatten::follow`] (maybe chase through the resolver) -> cache insert -> reply.
//! [`handler::Handler`] shows it top to bottom; it counts and logs each reply in one place
//! (`Handler::done`), and swaps what SIGHUP may change as one value
//! ([`handler::Handler::reload`]).

pub mod cache;
pub mod cli;
pub mod config;
pub mod cookie;
pub mod explain;
pub mod flatten;
pub mod handler;
pub mod inflight;
pub mod limit;
pub mod metrics;
pub mod response;
pub mod server;
pub mod shutdown;
pub mod upstream;
pub mod wire;
