//! `flatdns explain NAME [TYPE]`: runs one lookup through the real pipeline, as the proxy
//! would answer a stub resolver's query (RD=1, EDNS with a 1232-octet buffer, DO=0, over UDP),
//! and prints what happened: every exchange with a nameserver (which server, what it
//! answered, how long it took), the chain walked with each hop's TTL and where it came from,
//! the decision (flattened, or why not) and the answer a client would get.
//!
//! Nothing is simulated: the handler is the one the server uses, with an empty cache and a
//! [`Trace`] that records events as the pipeline passes its decision points.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::config::{display_name, Config};
use crate::flatten::{Link, Skip};
use crate::handler::{Handler, Transport};
use crate::upstream::UpstreamError;
use crate::wire;

/// One thing the pipeline did.
#[derive(Debug, Clone)]
pub enum Event {
    /// An exchange with a nameserver (`role`: "upstream" or "resolver"). `server` is the one
    /// that answered; after a failure, `tried` lists the servers that were asked.
    Asked {
        role: &'static str,
        name: Vec<u8>,
        qtype: u16,
        server: Option<SocketAddr>,
        tried: Vec<SocketAddr>,
        reply: Result<Bytes, String>,
        elapsed: Duration,
    },
    /// An ALIAS stood at `name` (`source`: "config" or "zone").
    Alias {
        source: &'static str,
        name: Vec<u8>,
        target: Vec<u8>,
        ttl: Option<u32>,
    },
    /// The links of the chain as walked.
    Chain(Vec<Link>),
    /// Flattened with this answer TTL, or why not.
    Decision(Result<u32, Skip>),
}

impl Event {
    pub fn asked(
        role: &'static str,
        via: &crate::upstream::Upstream,
        name: &[u8],
        qtype: u16,
        result: &Result<(Bytes, SocketAddr), UpstreamError>,
        began: Instant,
    ) -> Event {
        let (server, reply) = match result {
            Ok((r, s)) => (Some(*s), Ok(r.clone())),
            Err(e) => (None, Err(e.to_string())),
        };
        Event::Asked {
            role,
            name: name.to_vec(),
            qtype,
            server,
            tried: via.tried(),
            reply,
            elapsed: began.elapsed(),
        }
    }
}

/// The events of one lookup, in order.
#[derive(Debug, Default)]
pub struct Trace {
    events: Mutex<Vec<Event>>,
}

impl Trace {
    pub fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Parses a type given on the command line: a mnemonic (A, AAAA, MX ...), TYPEnnn or a number.
pub fn parse_type(text: &str) -> Option<u16> {
    if let Ok(n) = text.parse::<u16>() {
        return Some(n);
    }
    let upper = text.to_ascii_uppercase();
    if upper == "ALIAS" {
        return Some(crate::config::TYPE_ALIAS);
    }
    let t: domain::base::iana::Rtype = upper.parse().ok()?;
    Some(t.to_int())
}

/// Runs the lookup of `name` (wire form) / `qtype` with `config`'s upstreams, resolver,
/// flatten scope and aliases, and returns the report. The ACL is not applied (explain asks
/// as a local client).
pub async fn explain(mut config: Config, name: &[u8], qtype: u16) -> String {
    // 0.0.0.0/0 and ::/0 (ipnet's defaults).
    config.allow = vec![
        ipnet::IpNet::V4(Default::default()),
        ipnet::IpNet::V6(Default::default()),
    ];
    let trace = Arc::new(Trace::default());
    let handler = Arc::new(Handler::new(config).with_trace(trace.clone()));
    let query = crate::flatten::chase_query(name, qtype, 1232);
    let client = SocketAddr::from(([127, 0, 0, 1], 53_000));
    let started = Instant::now();
    let reply = handler
        .answer(Bytes::from(query), client, Transport::Udp)
        .await;
    report(
        name,
        qtype,
        &trace.events(),
        reply.as_deref(),
        started.elapsed(),
    )
}

/// The type's mnemonic as the records print it (the ALIAS type is TYPE65401 there too).
fn type_name(t: u16) -> String {
    domain::base::iana::Rtype::from_int(t).to_string()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Each record of `msg`'s answer section as zone-file text, and the rcode.
fn answer_records(msg: &[u8]) -> (String, Vec<String>) {
    use domain::base::name::ParsedName;
    use domain::base::Message;
    use domain::rdata::AllRecordData;
    let rcode =
        crate::metrics::rcode_name(msg.get(3).map_or(0, |b| u16::from(b & 0x0f))).to_string();
    let mut out = Vec::new();
    let Ok(m) = Message::from_slice(msg) else {
        return (rcode, out);
    };
    let Ok(section) = m.answer() else {
        return (rcode, out);
    };
    for rr in section.flatten() {
        match rr.to_any_record::<AllRecordData<&[u8], ParsedName<&[u8]>>>() {
            Ok(rec) => out.push(rec.to_string()),
            Err(_) => out.push("(unparsable record)".into()),
        }
    }
    (rcode, out)
}

fn why(skip: Skip) -> &'static str {
    match skip {
        Skip::Disabled => "flattening is disabled ([flatten] enabled = false)",
        Skip::NotAddress => "only A and AAAA answers are flattened",
        Skip::NotNoError => "the upstream's answer is not NOERROR",
        Skip::Truncated => "the upstream's answer was truncated",
        Skip::Dnssec => "the client set DO and [flatten] dnssec = \"passthrough\"",
        Skip::OutOfScope => "the name is outside [flatten] zones",
        Skip::Excluded => "the name matches [flatten] exclude",
        Skip::NoChain => "there is no CNAME at the name: nothing to flatten",
        Skip::Loop => "the chain loops (a name on it repeats)",
        Skip::TooLong => "the chain is longer than [flatten] max_chain",
        Skip::Ambiguous => "two CNAMEs, or a CNAME beside other data, at one name",
        Skip::Dangling => "the chain ends at a name that does not exist (NXDOMAIN)",
        Skip::NoData => "the chain ends at a name without records of this type",
        Skip::ChaseFailed => "the resolver failed or timed out while chasing the chain",
        Skip::Malformed => "a message on the chain could not be read",
    }
}

/// The report printed by `flatdns explain`.
pub fn report(
    name: &[u8],
    qtype: u16,
    events: &[Event],
    reply: Option<&[u8]>,
    took: Duration,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "query: {} {} (as a stub resolver asks: RD=1, EDNS 1232, DO=0, UDP)",
        display_name(name),
        type_name(qtype)
    );
    let mut chain: Vec<Link> = Vec::new();
    let mut decision = None;
    let mut aliases = Vec::new();
    let _ = writeln!(s, "\nexchanges:");
    for e in events {
        match e {
            Event::Asked {
                role,
                name,
                qtype,
                server,
                tried,
                reply,
                elapsed,
            } => {
                let server = server.map_or_else(
                    || {
                        let all: Vec<String> = tried.iter().map(|a| a.to_string()).collect();
                        format!("({})", all.join(", "))
                    },
                    |a| a.to_string(),
                );
                let q = format!("{} {}", display_name(name), type_name(*qtype));
                match reply {
                    Ok(r) => {
                        let (rcode, records) = answer_records(r);
                        let _ = writeln!(
                            s,
                            "  {role} {server} asked {q}: {rcode}, {} answer record(s), {}",
                            records.len(),
                            ms(*elapsed)
                        );
                        for r in records {
                            let _ = writeln!(s, "      {r}");
                        }
                    }
                    Err(err) => {
                        let _ = writeln!(
                            s,
                            "  {role} {server} asked {q}: failed ({err}), {}",
                            ms(*elapsed)
                        );
                    }
                }
            }
            Event::Alias {
                source,
                name,
                target,
                ttl,
            } => {
                let ttl = ttl.map_or_else(|| "no TTL of its own".into(), |t| format!("TTL {t}"));
                let _ = writeln!(
                    s,
                    "  ALIAS ({source}-defined) at {} -> {} ({ttl})",
                    display_name(name),
                    display_name(target)
                );
                aliases.push((name.clone(), *source));
            }
            Event::Chain(links) => chain = links.clone(),
            Event::Decision(d) => decision = Some(*d),
        }
    }
    if events
        .iter()
        .all(|e| !matches!(e, Event::Asked { .. } | Event::Alias { .. }))
    {
        let _ = writeln!(s, "  (none)");
    }

    let _ = writeln!(s, "\nchain ({} hop(s)):", chain.len());
    if chain.is_empty() {
        let _ = writeln!(s, "  (none)");
    }
    for (i, l) in chain.iter().enumerate() {
        let alias = aliases.iter().find(|(n, _)| wire::name_eq(n, &l.owner));
        // The TTL and server as the exchange showed them: the chain itself works on cached
        // copies whose TTLs may be cut to the message's smallest (same minimum, same answer).
        let (kind, found) = match alias {
            Some((_, "config")) => ("ALIAS (config)".to_string(), None),
            Some((_, source)) => (
                format!("ALIAS ({source})"),
                record_at(events, &l.owner, "TYPE65401"),
            ),
            None => ("CNAME".to_string(), record_at(events, &l.owner, "CNAME")),
        };
        let ttl = match (&found, alias) {
            (Some(r), _) => format!("TTL {}", r.ttl),
            (None, Some((_, "config"))) if l.ttl >= i32::MAX as u32 => "no TTL of its own".into(),
            (None, _) => format!("TTL {}", l.ttl),
        };
        let from = found.map_or_else(String::new, |r| format!(", from {} {}", r.role, r.server));
        let _ = writeln!(
            s,
            "  {}. {} -> {}  {kind}, {ttl}{from}",
            i + 1,
            display_name(&l.owner),
            display_name(&l.target),
        );
    }
    if decision == Some(Err(Skip::Loop)) {
        // The link that closes the loop is never added to the chain: show it from the reply.
        let last = chain.last().map_or(name, |l| &l.target[..]);
        if let Some(r) = record_at(events, last, "CNAME") {
            let _ = writeln!(
                s,
                "  loop: {} -> {}  CNAME, TTL {}, from {} {}: already on the chain",
                display_name(last),
                r.rdata,
                r.ttl,
                r.role,
                r.server
            );
        }
    }

    if decision.is_some_and(|d| d.is_ok()) {
        let end = chain.last().map_or(name, |l| &l.target[..]);
        let ty = type_name(qtype);
        let ttl = records_at(events, end, &ty).map(|r| r.ttl).min();
        let from = record_at(events, end, &ty)
            .map_or_else(String::new, |r| format!(", from {} {}", r.role, r.server));
        let ttl = ttl.map_or_else(String::new, |t| format!(", TTL {t}"));
        let _ = writeln!(s, "  end: {} {ty}{ttl}{from}", display_name(end));
    }

    let _ = writeln!(s, "\ndecision:");
    match decision {
        Some(Ok(ttl)) => {
            let _ = writeln!(
                s,
                "  flattened: the final records, owned by {}, TTL {ttl} (the smallest on the chain)",
                display_name(name)
            );
        }
        Some(Err(skip)) => {
            let _ = writeln!(
                s,
                "  not flattened ({}): {}; the client gets the upstream's own answer",
                skip.as_str(),
                why(skip)
            );
        }
        None => {
            let _ = writeln!(s, "  no upstream answer to decide on (see the exchanges)");
        }
    }

    let _ = writeln!(s, "\nanswer:");
    match reply {
        Some(r) => {
            let (rcode, records) = answer_records(r);
            let flags = wire::Header::read(r).map(|h| h.flags).unwrap_or(0);
            let tc = if flags & wire::FLAG_TC != 0 {
                ", TC=1"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  {rcode}{tc}, {} record(s), {}",
                records.len(),
                ms(took)
            );
            for r in records {
                let _ = writeln!(s, "  {r}");
            }
        }
        None => {
            let _ = writeln!(s, "  (no reply)");
        }
    }
    s
}

/// A record as an exchange showed it.
struct Seen {
    role: &'static str,
    server: SocketAddr,
    ttl: u32,
    rdata: String,
}

/// The records of type `ty` at `owner` in each reply, in the order they were seen. The
/// zone-file text is `owner TTL class type rdata`.
fn records_at<'a>(
    events: &'a [Event],
    owner: &'a [u8],
    ty: &'a str,
) -> impl Iterator<Item = Seen> + 'a {
    let owner_text = display_name(owner).to_ascii_lowercase();
    events.iter().flat_map(move |e| {
        let mut found = Vec::new();
        if let Event::Asked {
            role,
            server: Some(server),
            reply: Ok(r),
            ..
        } = e
        {
            for rec in answer_records(r).1 {
                let f: Vec<&str> = rec.split_whitespace().collect();
                if f.len() >= 5 && f[0].to_ascii_lowercase() == owner_text && f[3] == ty {
                    found.push(Seen {
                        role,
                        server: *server,
                        ttl: f[1].parse().unwrap_or(0),
                        rdata: f[4..].join(" "),
                    });
                }
            }
        }
        found
    })
}

/// The first `ty` record at `owner` that an exchange showed.
fn record_at(events: &[Event], owner: &[u8], ty: &str) -> Option<Seen> {
    records_at(events, owner, ty).next()
}
