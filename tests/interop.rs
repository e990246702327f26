//! Interop: the real `flatdns` binary against real BIND 9 and real Unbound.
//!
//! Issue 2 (forwarding transparency): flatdns in front of BIND must be invisible. The same
//! query bytes sent to BIND directly and through flatdns get the same reply bytes, the ID
//! aside; dig sees the same answers; a client outside the ACL gets REFUSED and BIND sees
//! nothing.
//!
//! Issue 3 (flattening): BIND #1 is a legacy authoritative server whose CNAMEs point into a
//! zone served by BIND #2; Unbound resolves through stub zones for both. flatdns, with BIND
//! #1 as upstream and Unbound as resolver, turns those chains into plain A/AAAA answers,
//! falls back to BIND #1's own answer whenever a chain cannot be flattened, and serves
//! repeats from its cache; glibc's stub resolver gets the addresses.
//!
//! Every test starts its own servers on free loopback ports. The programs come from the
//! Debian packages bind9, unbound, bind9-dnsutils (`.ci/run` installs them); without them a
//! test fails when `CI` is set and is skipped with a message otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "interop/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use support::dns::{self, Edns, Query, Reply, Transport};
use support::procs::{zone, Flatdns, Named, TempDir, Unbound};
use support::tools::{self, DigView};

// ==========================================================================================
// Issue 2: forwarding transparency (flatdns in front of one BIND)

/// 200 characters, for TXT answers too big for 512-byte UDP.
fn chunk(c: char) -> String {
    std::iter::repeat_n(c, 200).collect()
}

/// The zone BIND serves in the forwarding tests: one name per query shape, so that every
/// shape's first query through flatdns is a cache miss.
fn forwarding_zone() -> String {
    let big = format!(
        "\"{}\" \"{}\" \"{}\" \"{}\"",
        chunk('a'),
        chunk('b'),
        chunk('c'),
        chunk('d')
    );
    zone(
        "example.test",
        &format!(
            r#"
a          A      192.0.2.1
v6         AAAA   2001:db8::6
mail       MX     10 mx1.example.test.
mail       MX     20 mx2.example.test.
mx1        A      192.0.2.25
mx2        AAAA   2001:db8::25
txt        TXT    "hello" "world"
_sip._udp  SRV    10 60 5060 sip.example.test.
sip        A      192.0.2.50
@          CAA    0 issue "ca.example.net"
@          CAA    0 iodef "mailto:security@example.test"
child      NS     ns.child.example.test.
ns.child   A      127.0.0.1
noedns     A      192.0.2.2
nsid       A      192.0.2.3
unkopt     A      192.0.2.4
dobit      A      192.0.2.5
tcp        A      192.0.2.6
cd         A      192.0.2.7
mixed      A      192.0.2.8
cookie     A      192.0.2.11
rd0        A      192.0.2.12
udp4096    A      192.0.2.13
multi      A      192.0.2.21
multi      A      192.0.2.22
multi      A      192.0.2.23
unk        TYPE65400 \# 4 0a0b0c0d
any        A      192.0.2.9
any        TXT    "any"
any        MX     0 .
anyudp     A      192.0.2.10
anyudp     TXT    "any over udp"
alias      CNAME  mail.example.test.
alias2     CNAME  txt.example.test.
dn         DNAME  sub.example.test.
x.sub      TXT    "via dname"
*.wild     TXT    "wild"
big        TXT    {big}
big1232    TXT    {big}
bignoedns  TXT    {big}
acl-probe  A      192.0.2.30
acl-control A     192.0.2.31
"#
        ),
    )
}

fn forwarding_tools(test: &str) -> bool {
    tools::available(test, &["named", "dig"])
}

/// What must hold between BIND's reply and flatdns's reply to the same query.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Byte-identical but for the ID.
    Same,
    /// Too big for the client's UDP size: BIND truncates; flatdns must answer TC=1 too
    /// (never a silently cut message), with the same rcode and the client's question.
    Truncated,
    /// Identical but for the ID and TTLs (may be answered from flatdns's cache).
    SameButTtl,
}

struct Shape {
    label: &'static str,
    query: Query,
    transport: Transport,
    expect: Expect,
    /// What BIND's own reply must show, so that the shape really exercises what its label
    /// says (a check of the test, not of flatdns).
    bind: fn(&Reply) -> bool,
}

fn shape(
    label: &'static str,
    query: Query,
    transport: Transport,
    expect: Expect,
    bind: fn(&Reply) -> bool,
) -> Shape {
    Shape {
        label,
        query,
        transport,
        expect,
        bind,
    }
}

/// NOERROR with exactly `n` answer records, the first of type `rtype`.
fn answered(r: &Reply, rtype: u16, n: usize) -> bool {
    r.rcode() == dns::NOERROR && r.answer.len() == n && r.answer[0].rtype == rtype
}

fn has_option(r: &Reply, code: u16) -> bool {
    r.options().iter().any(|(c, _)| *c == code)
}

/// The query shapes of issue 2, each written by hand. Names are distinct wherever two
/// shapes would share a cache key, so each is a cold query through flatdns.
fn shapes() -> Vec<Shape> {
    use dns::*;
    use Expect::*;
    use Transport::{Tcp, Udp};
    let q = Query::new;
    let edns = |e: Edns| Some(e);
    vec![
        shape("A", q("a.example.test", A), Udp, Same, |r| {
            answered(r, A, 1)
        }),
        shape("AAAA", q("v6.example.test", AAAA), Udp, Same, |r| {
            answered(r, AAAA, 1)
        }),
        shape(
            "MX, glue in additional",
            q("mail.example.test", MX),
            Udp,
            Same,
            |r| answered(r, MX, 2) && r.additional.len() == 3,
        ),
        shape("TXT", q("txt.example.test", TXT), Udp, Same, |r| {
            answered(r, TXT, 1)
        }),
        shape("SRV", q("_sip._udp.example.test", SRV), Udp, Same, |r| {
            answered(r, SRV, 1) && r.additional.iter().any(|a| a.rtype == A)
        }),
        shape("CAA", q("example.test", CAA), Udp, Same, |r| {
            answered(r, CAA, 2)
        }),
        shape("NS", q("example.test", NS), Udp, Same, |r| {
            answered(r, NS, 1)
        }),
        shape(
            "SOA, RD=0",
            q("example.test", SOA).flags(0),
            Udp,
            Same,
            |r| answered(r, SOA, 1) && !r.authority.is_empty(),
        ),
        shape("NXDOMAIN", q("nope.example.test", A), Udp, Same, |r| {
            r.rcode() == 3 && r.authority.iter().any(|a| a.rtype == SOA)
        }),
        shape(
            "NODATA (A on an AAAA-only name)",
            q("v6.example.test", A),
            Udp,
            Same,
            |r| r.rcode() == NOERROR && r.answer.is_empty() && r.authority[0].rtype == SOA,
        ),
        shape(
            "referral to a child zone (NS + glue)",
            q("host.child.example.test", A),
            Udp,
            Same,
            |r| {
                r.answer.is_empty()
                    && !r.has(FLAG_AA)
                    && r.authority.iter().any(|a| a.rtype == NS)
                    && r.additional.iter().any(|a| a.rtype == A)
            },
        ),
        shape(
            "EDNS NSID option",
            q("nsid.example.test", A).edns(edns(Edns::new(1232).option(OPT_NSID, &[]))),
            Udp,
            Same,
            |r| has_option(r, OPT_NSID),
        ),
        shape(
            "EDNS unknown option 65001",
            q("unkopt.example.test", A).edns(edns(
                Edns::new(1232).option(65001, &[0xde, 0xad, 0xbe, 0xef]),
            )),
            Udp,
            Same,
            |r| answered(r, A, 1) && r.opt().is_some(),
        ),
        shape(
            "DO bit",
            q("dobit.example.test", A).edns(edns(Edns::new(1232).dnssec())),
            Udp,
            Same,
            |r| r.opt().is_some_and(|o| o.ttl & 0x8000 != 0),
        ),
        shape(
            "no EDNS",
            q("noedns.example.test", A).edns(None),
            Udp,
            Same,
            |r| answered(r, A, 1) && r.opt().is_none(),
        ),
        shape(
            "EDNS 4096 buffer",
            q("udp4096.example.test", A).edns(edns(Edns::new(4096))),
            Udp,
            Same,
            |r| answered(r, A, 1),
        ),
        shape("RD=0", q("rd0.example.test", A).flags(0), Udp, Same, |r| {
            answered(r, A, 1) && !r.has(FLAG_RD)
        }),
        shape("TCP", q("tcp.example.test", A), Tcp, Same, |r| {
            answered(r, A, 1)
        }),
        shape(
            "large TXT, EDNS 512 over UDP",
            q("big.example.test", TXT).edns(edns(Edns::new(512))),
            Udp,
            Truncated,
            |r| r.has(FLAG_TC),
        ),
        // The client's retry over TCP. flatdns already fetched this answer over TCP when
        // BIND truncated it, and may serve it from its cache: TTLs may have counted down.
        shape(
            "large TXT, retried over TCP",
            q("big.example.test", TXT).edns(edns(Edns::new(512))),
            Tcp,
            SameButTtl,
            |r| answered(r, TXT, 1) && r.wire.len() > 800,
        ),
        shape(
            "large TXT, EDNS 1232 over UDP (fits)",
            q("big1232.example.test", TXT),
            Udp,
            Same,
            |r| answered(r, TXT, 1) && r.wire.len() > 800,
        ),
        shape(
            "large TXT, no EDNS over UDP",
            q("bignoedns.example.test", TXT).edns(None),
            Udp,
            Truncated,
            |r| r.has(FLAG_TC),
        ),
        shape(
            "unknown type TYPE65400 (RFC 3597)",
            q("unk.example.test", TYPE65400),
            Udp,
            Same,
            |r| answered(r, TYPE65400, 1) && r.answer[0].rdata == [10, 11, 12, 13],
        ),
        shape("ANY over TCP", q("any.example.test", ANY), Tcp, Same, |r| {
            answered(r, A, 3)
        }),
        shape(
            "mixed-case qname (0x20)",
            q("MiXeD.ExAmPlE.tEsT", A),
            Udp,
            Same,
            |r| answered(r, A, 1) && r.question.starts_with(b"\x05MiXeD"),
        ),
        shape(
            "several A records, order kept",
            q("multi.example.test", A),
            Udp,
            Same,
            |r| answered(r, A, 3),
        ),
        shape(
            "CD bit",
            q("cd.example.test", A).flags(FLAG_RD | FLAG_CD),
            Udp,
            Same,
            |r| answered(r, A, 1) && r.has(FLAG_CD),
        ),
        shape(
            "MX on a CNAME name",
            q("alias.example.test", MX),
            Udp,
            Same,
            |r| answered(r, CNAME, 3),
        ),
        shape(
            "CNAME query on a CNAME name",
            q("alias2.example.test", CNAME),
            Udp,
            Same,
            |r| answered(r, CNAME, 1),
        ),
        shape(
            "TXT through a DNAME",
            q("x.dn.example.test", TXT),
            Udp,
            Same,
            |r| answered(r, 39, 3),
        ),
        shape(
            "wildcard TXT",
            q("anything.wild.example.test", TXT),
            Udp,
            Same,
            |r| answered(r, TXT, 1),
        ),
        shape(
            "REFUSED (a zone BIND does not serve)",
            q("www.example.org", A),
            Udp,
            Same,
            |r| r.rcode() == REFUSED,
        ),
        shape(
            "class CH (version.bind TXT)",
            q("version.bind", TXT).class(CLASS_CH),
            Udp,
            Same,
            |r| answered(r, TXT, 1) && r.answer[0].class == CLASS_CH,
        ),
    ]
}

/// Checks one exchange pair against `expect`; `None` when it holds, else what went wrong.
fn check(label: &str, q: &Query, expect: Expect, direct: &[u8], via: &[u8]) -> Option<String> {
    let d = Reply::parse(direct);
    let v = Reply::parse(via);
    if v.id != q.id {
        return Some(format!(
            "{label}: ID {:#06x}, query had {:#06x}",
            v.id, q.id
        ));
    }
    if v.question != q.question_wire() {
        return Some(format!(
            "{label}: question not echoed exactly: {:02x?} vs query {:02x?}",
            v.question,
            q.question_wire()
        ));
    }
    match expect {
        Expect::Same => (d.without_id() != v.without_id())
            .then(|| dns::diff(label, &d.without_id(), &v.without_id())),
        Expect::SameButTtl => (d.without_id_and_ttls() != v.without_id_and_ttls())
            .then(|| dns::diff(label, &d.without_id(), &v.without_id())),
        Expect::Truncated => {
            if !d.has(dns::FLAG_TC) {
                return Some(format!("{label}: test error: BIND did not truncate"));
            }
            let ok = v.has(dns::FLAG_TC)
                && v.has(dns::FLAG_QR)
                && v.rcode() == d.rcode()
                && v.answer.is_empty()
                && v.authority.is_empty()
                && v.additional.iter().all(|r| r.rtype == dns::OPT)
                && v.opt().is_some() == q.edns.is_some();
            (!ok).then(|| {
                format!(
                    "{label}: expected TC=1, rcode {}, no records, OPT iff the query had one\n{}",
                    d.rcode(),
                    dns::diff(label, &d.without_id(), &v.without_id())
                )
            })
        }
    }
}

/// Issue 2: 30+ query shapes, each sent as the same bytes to BIND and through flatdns.
/// First pass cold (each shape's first query through flatdns), second pass warm (cache
/// hits, where TTLs may have counted down and nothing else may differ).
#[test]
fn forwarding_is_byte_transparent_cold_and_warm() {
    if !forwarding_tools("forwarding_is_byte_transparent_cold_and_warm") {
        return;
    }
    let bind = Named::start(&[("example.test", forwarding_zone())]);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);

    let shapes = shapes();
    assert!(shapes.len() >= 20);
    let mut failures = Vec::new();
    for (i, s) in shapes.iter().enumerate() {
        let q = s.query.clone().id(0x4000 + i as u16);
        let wire = q.to_wire();
        let direct = dns::exchange(bind.addr, &wire, s.transport);
        let via = dns::exchange(fd.addr, &wire, s.transport);
        if !(s.bind)(&Reply::parse(&direct)) {
            failures.push(format!(
                "[cold] {}: test error: BIND's reply is not what the shape needs:\n{}",
                s.label,
                dns::hex(&direct)
            ));
        }
        if let Some(f) = check(s.label, &q, s.expect, &direct, &via) {
            failures.push(format!("[cold] {f}"));
        }
    }
    for (i, s) in shapes.iter().enumerate() {
        let expect = match s.expect {
            Expect::Same | Expect::SameButTtl => Expect::SameButTtl,
            Expect::Truncated => Expect::Truncated,
        };
        let q = s.query.clone().id(0x6000 + i as u16);
        let wire = q.to_wire();
        let direct = dns::exchange(bind.addr, &wire, s.transport);
        let via = dns::exchange(fd.addr, &wire, s.transport);
        if let Some(f) = check(s.label, &q, expect, &direct, &via) {
            failures.push(format!("[warm] {f}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} exchanges differ:\n\n{}\n\nflatdns log:\n{}",
        failures.len(),
        2 * shapes.len(),
        failures.join("\n\n"),
        fd.log()
    );
}

/// Issue 2, COOKIE: the server cookie holds a timestamp, so it is masked in the byte
/// comparison. On a miss flatdns passes BIND's server cookie through (RFC 7873); a cache hit
/// never replays one client's cookie to another (R24).
#[test]
fn forwarding_passes_cookies_on_a_miss_and_never_replays_them() {
    if !forwarding_tools("forwarding_passes_cookies_on_a_miss_and_never_replays_them") {
        return;
    }
    let bind = Named::start(&[("example.test", forwarding_zone())]);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);

    // COOKIE on a miss: flatdns passes BIND's server cookie through (RFC 7873).
    let client_cookie = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let q = Query::new("cookie.example.test", dns::A).edns(Some(
        Edns::new(1232).option(dns::OPT_COOKIE, &client_cookie),
    ));
    let direct = Reply::parse(&dns::udp(bind.addr, &q.to_wire(), Duration::from_secs(5)));
    let via = Reply::parse(&dns::udp(fd.addr, &q.to_wire(), Duration::from_secs(5)));
    let cookie_of = |r: &Reply| {
        r.options()
            .into_iter()
            .find(|(c, _)| *c == dns::OPT_COOKIE)
            .map(|(_, d)| d)
    };
    let d_cookie = cookie_of(&direct).expect("BIND sends a server cookie");
    assert_eq!(
        direct.options().len(),
        1,
        "BIND: the cookie is the only option"
    );
    assert_eq!(
        via.options().len(),
        1,
        "through flatdns: {:?}",
        via.options()
    );
    let v_cookie = cookie_of(&via).unwrap_or_else(|| {
        panic!(
            "no COOKIE option through flatdns on a miss:\n{}",
            dns::hex(&via.wire)
        )
    });
    assert_eq!(
        d_cookie.len(),
        24,
        "BIND cookie: 8 client + 16 server bytes"
    );
    assert_eq!(
        v_cookie.len(),
        24,
        "server cookie through flatdns: {v_cookie:02x?}"
    );
    assert_eq!(&v_cookie[..8], &client_cookie, "client part echoed");
    // Everything but the server cookie's bytes (and the ID) is identical.
    let masked = |r: &Reply| {
        let mut w = r.without_id();
        let at = w.len() - 16; // OPT is last, the cookie its only option
        w[at..].fill(0);
        w
    };
    assert_eq!(
        masked(&direct),
        masked(&via),
        "{}",
        dns::diff(
            "cookie (server part masked)",
            &masked(&direct),
            &masked(&via)
        )
    );

    // The same question from another client, answered from the cache: the first client's
    // cookie must not be replayed to it (R24).
    let other_cookie = [9u8, 9, 9, 9, 8, 8, 8, 8];
    let q2 = Query::new("cookie.example.test", dns::A)
        .id(0x7777)
        .edns(Some(Edns::new(1232).option(dns::OPT_COOKIE, &other_cookie)));
    let hit = Reply::parse(&dns::udp(fd.addr, &q2.to_wire(), Duration::from_secs(5)));
    assert_eq!(hit.rcode(), dns::NOERROR);
    assert_eq!(hit.answers_of(dns::A).len(), 1, "{:?}", hit.answer);
    assert!(
        !hit.wire.windows(8).any(|w| w == client_cookie),
        "first client's cookie replayed to another client:\n{}",
        dns::hex(&hit.wire)
    );
    if let Some(c) = cookie_of(&hit) {
        assert_eq!(
            &c[..8],
            &other_cookie,
            "a cookie, if any, is the asking client's"
        );
    }
}

/// Issue 2, EDNS version 1: flatdns answers BADVERS itself (extended rcode 16, OPT version
/// 0), as BIND does.
#[test]
fn forwarding_edns_version_1_gets_badvers_like_bind() {
    if !forwarding_tools("forwarding_edns_version_1_gets_badvers_like_bind") {
        return;
    }
    let bind = Named::start(&[("example.test", forwarding_zone())]);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);
    let q = Query::new("a.example.test", dns::A).edns(Some(Edns {
        version: 1,
        ..Edns::new(1232)
    }));
    let direct = Reply::parse(&dns::udp(bind.addr, &q.to_wire(), Duration::from_secs(5)));
    let via = Reply::parse(&dns::udp(fd.addr, &q.to_wire(), Duration::from_secs(5)));
    let ext = |r: &Reply| {
        let opt = r.opt().expect("OPT in a BADVERS reply");
        (
            (u16::from(opt.ttl.to_be_bytes()[0]) << 4) | u16::from(r.rcode()),
            opt.ttl.to_be_bytes()[1],
        )
    };
    assert_eq!(ext(&direct), (16, 0), "BIND: BADVERS, version 0");
    assert_eq!(ext(&via), ext(&direct), "BADVERS through flatdns");
    assert!(via.answer.is_empty());
    assert_eq!(via.question, q.question_wire());
}

/// R25 (RFC 8482): BIND answers ANY over UDP in full; flatdns answers TC=1 so it amplifies
/// nothing, and the client's retry over TCP gets BIND's answer.
#[test]
fn forwarding_any_over_udp_is_truncated() {
    if !forwarding_tools("forwarding_any_over_udp_is_truncated") {
        return;
    }
    let bind = Named::start(&[("example.test", forwarding_zone())]);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);
    let q = Query::new("anyudp.example.test", dns::ANY);
    let direct = Reply::parse(&dns::udp(bind.addr, &q.to_wire(), Duration::from_secs(5)));
    assert!(!direct.has(dns::FLAG_TC) && direct.answer.len() == 2);
    let via = Reply::parse(&dns::udp(fd.addr, &q.to_wire(), Duration::from_secs(5)));
    assert!(
        via.has(dns::FLAG_TC),
        "ANY over UDP without TC:\n{}",
        dns::hex(&via.wire)
    );
    assert!(
        via.answer.is_empty(),
        "TC reply carries records: {:?}",
        via.answer
    );
    let direct = dns::tcp(bind.addr, &q.to_wire(), Duration::from_secs(5));
    let via = dns::tcp(fd.addr, &q.to_wire(), Duration::from_secs(5));
    assert_eq!(
        Reply::parse(&direct).without_id_and_ttls(),
        Reply::parse(&via).without_id_and_ttls(),
        "{}",
        dns::diff("ANY over TCP", &direct, &via)
    );
}

/// dig's view of a few shapes, over UDP and TCP: same status, flags, records (TTLs may be
/// lower through flatdns when served from its cache) and the same `+short` output. Ends with
/// SIGTERM: flatdns exits 0.
#[test]
fn forwarding_dig_sees_what_it_sees_from_bind() {
    if !forwarding_tools("forwarding_dig_sees_what_it_sees_from_bind") {
        return;
    }
    let bind = Named::start(&[("example.test", forwarding_zone())]);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);

    let cases: &[&[&str]] = &[
        &["a.example.test", "A"],
        &["v6.example.test", "AAAA"],
        &["mail.example.test", "MX"],
        &["txt.example.test", "TXT"],
        &["_sip._udp.example.test", "SRV"],
        &["example.test", "CAA"],
        &["multi.example.test", "A"],
        &["nope.example.test", "A"],
        &["unk.example.test", "TYPE65400"],
        &["alias.example.test", "MX"],
        // Too big for 512 bytes: both truncate, dig retries over TCP.
        &["big.example.test", "TXT", "+bufsize=512"],
    ];
    let full = [
        "+noall",
        "+comments",
        "+answer",
        "+authority",
        "+additional",
    ];
    let mut failures = Vec::new();
    for case in cases {
        for tcp in [false, true] {
            let mut args: Vec<&str> = case.to_vec();
            if tcp {
                args.push("+tcp");
            }
            let mut long = args.clone();
            long.extend(full);
            let d = DigView::parse(&tools::dig(bind.addr, &long));
            let v = DigView::parse(&tools::dig(fd.addr, &long));
            if d.status.is_empty() || (d.records.is_empty() && d.status == "NOERROR") {
                failures.push(format!("{args:?}: test error: BIND gave {d:?}"));
            }
            if let Some(f) = same_but_ttl(&d, &v) {
                failures.push(format!("{args:?}: {f}"));
            }
            if case.contains(&"+bufsize=512") && !tcp && !(d.retried_tcp && v.retried_tcp) {
                failures.push(format!(
                    "{args:?}: no TC=1 then TCP: BIND {d:#?}\nflatdns {v:#?}"
                ));
            }
            let mut short = args.clone();
            short.push("+short");
            let d_short = tools::dig(bind.addr, &short);
            let v_short = tools::dig(fd.addr, &short);
            if d_short != v_short {
                failures.push(format!(
                    "{args:?} +short: BIND\n{d_short}\nflatdns\n{v_short}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "dig disagrees:\n{}\n\nflatdns log:\n{}",
        failures.join("\n"),
        fd.log()
    );
    let status = fd.stop();
    assert!(
        status.success(),
        "flatdns exit status after SIGTERM: {status}"
    );
}

/// Equal views, except that each TTL through flatdns may be up to 2 s lower (cache ageing).
fn same_but_ttl(d: &DigView, v: &DigView) -> Option<String> {
    let split = |r: &String| {
        let f: Vec<&str> = r.splitn(3, ' ').collect();
        let ttl = f.get(1).and_then(|t| t.parse::<u32>().ok());
        match (ttl, f.len()) {
            (Some(t), 3) => (format!("{} _ {}", f[0], f[2]), Some(t)),
            _ => (r.clone(), None),
        }
    };
    let dr: Vec<_> = d.records.iter().map(split).collect();
    let vr: Vec<_> = v.records.iter().map(split).collect();
    let ttl_ok = dr.len() == vr.len()
        && dr.iter().zip(&vr).all(|((a, at), (b, bt))| {
            a == b
                && match (at, bt) {
                    (Some(x), Some(y)) => y <= x && x - y <= 2,
                    (None, None) => true,
                    _ => false,
                }
        });
    (d.status != v.status || d.flags != v.flags || d.retried_tcp != v.retried_tcp || !ttl_ok)
        .then(|| format!("BIND {d:#?}\nflatdns {v:#?}"))
}

/// Issue 2 / R1: a client outside the ACL gets REFUSED and nothing reaches BIND.
#[test]
fn forwarding_client_outside_acl_is_refused_and_bind_sees_nothing() {
    if !forwarding_tools("forwarding_client_outside_acl_is_refused_and_bind_sees_nothing") {
        return;
    }
    let bind = Named::start(&[("example.test", forwarding_zone())]);
    let up = bind.addr.to_string();
    // 127.0.0.1 is not in 10.0.0.0/8.
    let fd = Flatdns::start(&["--upstream", &up, "--allow", "10.0.0.0/8"]);

    // The query log works: a direct query shows up in it.
    dns::udp(
        bind.addr,
        &Query::new("acl-control.example.test", dns::A).to_wire(),
        Duration::from_secs(5),
    );
    bind.sync_query_log();
    assert_eq!(bind.queries_for("acl-control.example.test", "A"), 1);

    for transport in [Transport::Udp, Transport::Tcp] {
        let q = Query::new("acl-probe.example.test", dns::A);
        let r = Reply::parse(&dns::exchange(fd.addr, &q.to_wire(), transport));
        assert_eq!(
            r.rcode(),
            dns::REFUSED,
            "{transport:?}: {}",
            dns::hex(&r.wire)
        );
        assert!(r.answer.is_empty(), "{transport:?}: REFUSED with records");
        assert_eq!(r.question, q.question_wire());
    }
    let out = tools::dig(fd.addr, &["acl-probe.example.test", "A"]);
    assert_eq!(DigView::parse(&out).status, "REFUSED", "{out}");

    bind.sync_query_log();
    assert_eq!(
        bind.queries_for("acl-probe.example.test", "A"),
        0,
        "BIND saw a refused client's query:\n{}",
        bind.query_log()
    );
}

// ==========================================================================================
// Issue 3: flattening (BIND #1 legacy authoritative, BIND #2 the CNAME targets, Unbound)

/// BIND #1: the legacy zone, CNAMEs into elsewhere.test, which it does not serve.
fn legacy_zone() -> String {
    zone(
        "example.test",
        r#"
a          120 A      192.0.2.10
www        300 CNAME  target.elsewhere.test.
inzone     600 CNAME  a.example.test.
chain      300 CNAME  hop1.elsewhere.test.
loop1          CNAME  loop2.example.test.
loop2          CNAME  loop1.example.test.
xloop          CNAME  xl.elsewhere.test.
dangling       CNAME  nothere.elsewhere.test.
nodata         CNAME  onlyv6.elsewhere.test.
multi          CNAME  many.elsewhere.test.
mx             CNAME  target.elsewhere.test.
long           CNAME  l1.elsewhere.test.
"#,
    )
}

/// BIND #2: where the chains end.
fn elsewhere_zone() -> String {
    let mut body = String::from(
        r#"
target     60  A      198.51.100.1
target     60  A      198.51.100.2
target     60  AAAA   2001:db8::1
target         MX     10 target.elsewhere.test.
target         TXT    "target"
onlyv6         AAAA   2001:db8::6
hop1       200 CNAME  hop2.elsewhere.test.
hop2       80  CNAME  target2.elsewhere.test.
target2    90  A      198.51.100.20
xl             CNAME  xloop.example.test.
"#,
    );
    for i in 1..=40 {
        body.push_str(&format!("many 300 A 203.0.113.{i}\n"));
    }
    // long -> l1 -> ... -> l12 -> A: 13 CNAMEs, more than the 11-hop cap.
    for i in 1..=11 {
        body.push_str(&format!("l{i} CNAME l{}.elsewhere.test.\n", i + 1));
    }
    body.push_str("l12 A 198.51.100.12\n");
    zone("elsewhere.test", &body)
}

struct Lab {
    legacy: Named,
    _elsewhere: Named,
    unbound: Unbound,
    fd: Flatdns,
}

fn flatten_tools(test: &str) -> bool {
    tools::available(test, &["named", "unbound", "dig"])
}

/// BIND #1, BIND #2, Unbound with stub zones for both, and flatdns with BIND #1 as upstream
/// and Unbound as resolver. `extra` goes on flatdns's command line.
fn lab(extra: &[&str]) -> Lab {
    let legacy = Named::start(&[("example.test", legacy_zone())]);
    let elsewhere = Named::start(&[("elsewhere.test", elsewhere_zone())]);
    let unbound = Unbound::start(&[
        ("example.test", legacy.addr),
        ("elsewhere.test", elsewhere.addr),
    ]);
    let up = legacy.addr.to_string();
    let res = unbound.addr.to_string();
    let mut args = vec!["--upstream", &up, "--resolver", &res];
    args.extend_from_slice(extra);
    let fd = Flatdns::start(&args);
    Lab {
        legacy,
        _elsewhere: elsewhere,
        unbound,
        fd,
    }
}

/// `dig` through flatdns with the header and every section shown.
fn dig_full(server: SocketAddr, args: &[&str]) -> DigView {
    let mut a = args.to_vec();
    a.extend(["+noall", "+comments", "+answer"]);
    DigView::parse(&tools::dig(server, &a))
}

fn header_flags(v: &DigView) -> BTreeSet<String> {
    v.flags
        .split(';')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Asserts a flattened dig answer: only `rtype` records, all owned by `owner`, with `ttl`
/// (or, for cache hits, at most 2 s less) and exactly the addresses `want`, AD clear.
fn assert_flat(
    v: &DigView,
    owner: &str,
    rtype: &str,
    ttl: std::ops::RangeInclusive<u32>,
    want: &[&str],
) {
    assert_eq!(v.status, "NOERROR", "{v:#?}");
    assert!(
        !header_flags(v).contains("ad"),
        "AD set on a flattened answer: {v:#?}"
    );
    let recs = v.of_type(rtype);
    assert_eq!(
        recs.len(),
        v.records.len(),
        "records other than {rtype} in a flattened answer: {v:#?}"
    );
    let got: Vec<&str> = recs.iter().map(|r| r.2.as_str()).collect();
    assert_eq!(got, want, "{v:#?}");
    for (o, t, _) in &recs {
        assert_eq!(o, owner, "owner is the question name: {v:#?}");
        assert!(ttl.contains(t), "TTL {t}, want {ttl:?}: {v:#?}");
    }
}

/// Issue 3: chains into another zone, in-zone chains and multi-hop chains become plain
/// A/AAAA answers owned by the question name, with the minimum TTL of the whole chain.
#[test]
fn flattening_turns_chains_into_addresses() {
    if !flatten_tools("flattening_turns_chains_into_addresses") {
        return;
    }
    let lab = lab(&[]);
    let fd = lab.fd.addr;

    // Cold: TTL = min(www 300, target 60) exactly.
    let v = dig_full(fd, &["www.example.test", "A"]);
    assert_flat(
        &v,
        "www.example.test.",
        "A",
        60..=60,
        &["198.51.100.1", "198.51.100.2"],
    );
    let v = dig_full(fd, &["www.example.test", "AAAA"]);
    assert_flat(&v, "www.example.test.", "AAAA", 60..=60, &["2001:db8::1"]);
    // In-zone chain (BIND #1 answers the whole chain itself): min(600, 120).
    let v = dig_full(fd, &["inzone.example.test", "A"]);
    assert_flat(&v, "inzone.example.test.", "A", 120..=120, &["192.0.2.10"]);
    // chain(300) -> hop1(200) -> hop2(80) -> target2(90): the minimum is a middle link.
    let v = dig_full(fd, &["chain.example.test", "A"]);
    assert_flat(&v, "chain.example.test.", "A", 80..=80, &["198.51.100.20"]);
    // CNAME to a name with only AAAA: AAAA flattens (A does not; see the fallback test).
    let v = dig_full(fd, &["nodata.example.test", "AAAA"]);
    assert_flat(
        &v,
        "nodata.example.test.",
        "AAAA",
        1..=300,
        &["2001:db8::6"],
    );
    // Over TCP too.
    let v = dig_full(fd, &["www.example.test", "A", "+tcp"]);
    assert_flat(
        &v,
        "www.example.test.",
        "A",
        58..=60,
        &["198.51.100.1", "198.51.100.2"],
    );

    // Raw bytes, mixed case (a cache hit now): the owner is the question exactly as written,
    // no CNAME, AD clear, no RRSIG, class IN.
    let q = Query::new("WwW.ExAmple.TEST", dns::A);
    let r = Reply::parse(&dns::udp(fd, &q.to_wire(), Duration::from_secs(5)));
    assert_eq!(r.rcode(), dns::NOERROR);
    assert!(!r.has(dns::FLAG_AD));
    assert_eq!(r.question, q.question_wire());
    assert_eq!(r.answer.len(), 2, "{:?}", r.answer);
    for rec in &r.answer {
        assert_eq!(rec.owner, "WwW.ExAmple.TEST.");
        assert_eq!((rec.rtype, rec.class), (dns::A, dns::CLASS_IN));
        assert!((58..=60).contains(&rec.ttl), "TTL {}", rec.ttl);
    }
    let addrs: Vec<&[u8]> = r.answer.iter().map(|a| a.rdata.as_slice()).collect();
    assert_eq!(addrs, [&[198, 51, 100, 1][..], &[198, 51, 100, 2][..]]);
}

/// Issue 3 / F4: whenever a chain cannot be flattened, the client gets BIND #1's own answer,
/// byte for byte; a dangling target never turns into NXDOMAIN for the owner.
#[test]
fn flattening_falls_back_to_the_upstream_answer() {
    if !flatten_tools("flattening_falls_back_to_the_upstream_answer") {
        return;
    }
    let lab = lab(&[]);
    let cases = [
        ("loop1.example.test", dns::A, "in-zone loop"),
        ("xloop.example.test", dns::A, "loop across zones"),
        (
            "dangling.example.test",
            dns::A,
            "dangling (target NXDOMAIN)",
        ),
        ("dangling.example.test", dns::AAAA, "dangling, AAAA"),
        ("nodata.example.test", dns::A, "NODATA at the end"),
        (
            "long.example.test",
            dns::A,
            "13 CNAMEs, over the 11-hop cap",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (name, qtype, label)) in cases.iter().enumerate() {
        let q = Query::new(name, *qtype).id(0x3000 + i as u16);
        let direct = Reply::parse(&dns::udp(
            lab.legacy.addr,
            &q.to_wire(),
            Duration::from_secs(5),
        ));
        let via = Reply::parse(&dns::udp(lab.fd.addr, &q.to_wire(), Duration::from_secs(5)));
        if direct.answers_of(dns::CNAME).is_empty() {
            failures.push(format!("{label}: test error: BIND #1 gave no CNAME"));
        }
        // BIND itself says SERVFAIL for its in-zone loop; a dangling target must stay NOERROR.
        if name.starts_with("dangling") && (direct.rcode(), via.rcode()) != (0, 0) {
            failures.push(format!(
                "{label}: rcode {} through flatdns (BIND #1: {}), want NOERROR",
                via.rcode(),
                direct.rcode()
            ));
        }
        if via.id != q.id || direct.without_id() != via.without_id() {
            failures.push(dns::diff(label, &direct.without_id(), &via.without_id()));
        }
    }
    // dig (a cache hit now for the A query): NOERROR with the CNAME, not NXDOMAIN.
    let v = dig_full(lab.fd.addr, &["dangling.example.test", "A"]);
    if v.status != "NOERROR" || v.of_type("CNAME").len() != 1 || v.records.len() != 1 {
        failures.push(format!("dig dangling: {v:#?}"));
    }
    assert!(
        failures.is_empty(),
        "{}\n\nflatdns log:\n{}",
        failures.join("\n\n"),
        lab.fd.log()
    );
}

/// Issue 3 / F1, F5: other types on a CNAME name, and clients that set DO, get BIND #1's
/// answer unchanged.
#[test]
fn flattening_leaves_other_types_and_dnssec_clients_alone() {
    if !flatten_tools("flattening_leaves_other_types_and_dnssec_clients_alone") {
        return;
    }
    let lab = lab(&[]);
    let cases = [
        (Query::new("mx.example.test", dns::MX), "MX on a CNAME name"),
        (
            Query::new("www.example.test", dns::TXT),
            "TXT on a CNAME name",
        ),
        (Query::new("www.example.test", dns::CNAME), "CNAME query"),
        (
            Query::new("www.example.test", dns::A).edns(Some(Edns::new(1232).dnssec())),
            "A with DO=1",
        ),
        (
            Query::new("www.example.test", dns::AAAA).edns(Some(Edns::new(1232).dnssec())),
            "AAAA with DO=1",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (q, label)) in cases.iter().enumerate() {
        let q = q.clone().id(0x2000 + i as u16);
        let direct = Reply::parse(&dns::udp(
            lab.legacy.addr,
            &q.to_wire(),
            Duration::from_secs(5),
        ));
        let via = Reply::parse(&dns::udp(lab.fd.addr, &q.to_wire(), Duration::from_secs(5)));
        if direct.answers_of(dns::CNAME).len() != 1 {
            failures.push(format!(
                "{label}: test error: BIND #1 gave {:?}",
                direct.answer
            ));
        }
        if direct.without_id() != via.without_id() {
            failures.push(dns::diff(label, &direct.without_id(), &via.without_id()));
        }
    }
    // dig as a client: MX and +dnssec show the CNAME, as BIND #1 does.
    for args in [
        &["mx.example.test", "MX"][..],
        &["www.example.test", "A", "+dnssec"][..],
    ] {
        let d = dig_full(lab.legacy.addr, args);
        let v = dig_full(lab.fd.addr, args);
        if let Some(f) = same_but_ttl(&d, &v) {
            failures.push(format!("dig {args:?}: {f}"));
        }
        if v.of_type("CNAME").len() != 1 {
            failures.push(format!("dig {args:?}: no CNAME through flatdns: {v:#?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n\nflatdns log:\n{}",
        failures.join("\n\n"),
        lab.fd.log()
    );
}

/// Issue 3 / R16: 40 flattened addresses do not fit 512 bytes: TC=1 over UDP without EDNS,
/// dig retries over TCP and gets all 40, owned by the question name.
#[test]
fn flattening_large_answer_truncates_then_tcp_gets_all() {
    if !flatten_tools("flattening_large_answer_truncates_then_tcp_gets_all") {
        return;
    }
    let lab = lab(&[]);
    let fd = lab.fd.addr;
    let want: Vec<String> = (1..=40).map(|i| format!("203.0.113.{i}")).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();

    let out = tools::dig(
        fd,
        &[
            "multi.example.test",
            "A",
            "+noedns",
            "+noall",
            "+comments",
            "+answer",
        ],
    );
    let v = DigView::parse(&out);
    assert!(v.retried_tcp, "dig did not get TC=1 over UDP:\n{out}");
    assert_flat(&v, "multi.example.test.", "A", 1..=300, &want);

    let v = dig_full(fd, &["multi.example.test", "A", "+tcp"]);
    assert!(!v.retried_tcp);
    assert_flat(&v, "multi.example.test.", "A", 1..=300, &want);

    // The raw UDP reply: TC=1, the question, nothing else.
    let q = Query::new("multi.example.test", dns::A).edns(None);
    let r = Reply::parse(&dns::udp(fd, &q.to_wire(), Duration::from_secs(5)));
    assert!(r.has(dns::FLAG_TC), "{}", dns::hex(&r.wire));
    assert!(r.wire.len() <= 512);
    assert!(r.answer.is_empty() && r.authority.is_empty() && r.additional.is_empty());
    // With EDNS 1232 it fits over UDP.
    let q = Query::new("multi.example.test", dns::A);
    let r = Reply::parse(&dns::udp(fd, &q.to_wire(), Duration::from_secs(5)));
    assert!(!r.has(dns::FLAG_TC));
    assert_eq!(r.answers_of(dns::A).len(), 40);
    assert_eq!(r.answer.len(), 40);
}

/// Issue 3 / cache: five identical questions, one query at BIND #1.
#[test]
fn flattening_repeats_are_served_from_the_cache() {
    if !flatten_tools("flattening_repeats_are_served_from_the_cache") {
        return;
    }
    let lab = lab(&[]);
    for i in 0..5 {
        let v = dig_full(lab.fd.addr, &["www.example.test", "A"]);
        assert_flat(
            &v,
            "www.example.test.",
            "A",
            55..=60,
            &["198.51.100.1", "198.51.100.2"],
        );
        if i == 0 {
            lab.legacy.sync_query_log();
            assert_eq!(lab.legacy.queries_for("www.example.test", "A"), 1);
        }
    }
    lab.legacy.sync_query_log();
    assert_eq!(
        lab.legacy.queries_for("www.example.test", "A"),
        1,
        "BIND #1 query log:\n{}",
        lab.legacy.query_log()
    );
}

/// Issue 3 / glibc: the system stub resolver, pointed at flatdns on port 53 through a
/// resolv.conf bind-mounted in a private mount namespace, gets the flattened addresses.
#[test]
fn flattening_glibc_getent_gets_addresses() {
    if !flatten_tools("flattening_glibc_getent_gets_addresses")
        || !tools::available(
            "flattening_glibc_getent_gets_addresses",
            &["unshare", "getent", "mount"],
        )
    {
        return;
    }
    // Port 53 and a mount namespace need root.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        let msg = "flattening_glibc_getent_gets_addresses: needs root (port 53, mount namespace)";
        assert!(std::env::var_os("CI").is_none(), "{msg}: not root in CI");
        eprintln!("SKIPPED {msg}");
        return;
    }
    let lab = lab(&[]);
    // glibc only talks to port 53. A loopback address of our own avoids any local resolver
    // on 127.0.0.1:53 and other runs of this test (derived from the pid).
    let pid = std::process::id();
    let ip = format!("127.53.{}.{}", (pid >> 8) % 250 + 1, pid % 250 + 1);
    let listen = format!("{ip}:53");
    let up = lab.legacy.addr.to_string();
    let res = lab.unbound.addr.to_string();
    let stub = Flatdns::start(&["--listen", &listen, "--upstream", &up, "--resolver", &res]);
    assert_eq!(stub.addr.to_string(), listen);

    let dir = TempDir::new("glibc");
    let resolv = dir.write(
        "resolv.conf",
        &format!("nameserver {ip}\noptions timeout:2 attempts:2\n"),
    );
    let script = format!(
        "mount --bind '{}' /etc/resolv.conf && getent ahostsv4 www.example.test && echo --- && getent ahosts www.example.test",
        resolv.display()
    );
    let mut cmd = Command::new(tools::path_of("unshare").unwrap());
    cmd.args(["--mount", "sh", "-c", &script]);
    let out = tools::run_bounded(cmd, Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "unshare/getent failed ({}):\n{stdout}\n{}\nflatdns log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        stub.log()
    );
    let (v4, all) = stdout.split_once("---").expect("both getent outputs");
    // ahostsv4: the two addresses, once per socket type, and the canonical name is the
    // question name (no CNAME was seen).
    let addrs: BTreeSet<&str> = v4
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(
        addrs,
        BTreeSet::from(["198.51.100.1", "198.51.100.2"]),
        "getent ahostsv4:\n{v4}"
    );
    assert!(
        v4.lines()
            .next()
            .is_some_and(|l| l.ends_with("www.example.test")),
        "canonical name:\n{v4}"
    );
    assert!(
        all.contains("198.51.100.1") && all.contains("198.51.100.2"),
        "getent ahosts:\n{all}"
    );
    // The host's own resolv.conf was not touched.
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    assert!(!host.contains(&ip), "host /etc/resolv.conf changed: {host}");
}

// ==========================================================================================
// Issue 5: protocol compliance (R17, R25), the ISC DNS compliance probes (genreport)

fn compliance_tools(test: &str, extra: &[&str]) -> bool {
    let mut needed = vec!["named", "dig"];
    needed.extend_from_slice(extra);
    tools::available(test, &needed)
}

/// R17: genreport's probes, run with dig against BIND and through flatdns, read the same.
///
/// Pass 1: every probe on a zone of its own, so that its first query through flatdns is a
/// real miss (cold) and its repeat is served from the cache (warm); "up" counts the queries
/// flatdns sent BIND for it. Pass 2: all probes on one signed zone through a fresh flatdns,
/// in genreport's order, twice, as genreport runs them against a server: answers cached for
/// one probe serve the next ones that share a cache key.
#[test]
fn compliance_probes_read_the_same_through_flatdns_cold_and_warm() {
    use support::compliance::{self, Probe, Row, Seen};
    let test = "compliance_probes_read_the_same_through_flatdns_cold_and_warm";
    if !compliance_tools(test, &["dnssec-keygen", "dnssec-signzone"]) {
        return;
    }
    let started = std::time::Instant::now();
    let keys = TempDir::new("dnssec");
    let zones = compliance::zones(&keys);
    let zone_refs: Vec<(&str, String)> = zones
        .iter()
        .map(|(origin, text)| (origin.as_str(), text.clone()))
        .collect();
    let bind = Named::start(&zone_refs);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);
    let probes = compliance::probes();
    let mut failures = Vec::new();

    // Pass 1: BIND direct, flatdns cold, flatdns warm; BIND's query log counted between.
    let run = |server: SocketAddr| -> Vec<Seen> {
        probes
            .iter()
            .map(|p| compliance::probe(server, p, p.zone().as_deref()))
            .collect()
    };
    let counts = || -> Vec<Option<usize>> {
        bind.sync_query_log();
        probes
            .iter()
            .map(|p: &Probe| p.zone().map(|z| bind.queries_for(&z, p.qtype)))
            .collect()
    };
    let direct = run(bind.addr);
    let c0 = counts();
    let cold = run(fd.addr);
    let c1 = counts();
    let warm = run(fd.addr);
    let c2 = counts();
    let diff = |a: &Option<usize>, b: &Option<usize>| match (a, b) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let mut rows = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        if !(p.setup)(&direct[i].verdict) {
            failures.push(format!(
                "test setup: BIND's reply to {} is not {}: {}\n{}",
                p.name, p.setup_text, direct[i].verdict, direct[i].raw
            ));
        }
        rows.push(Row {
            probe: p.name,
            bind: direct[i].clone(),
            flatdns: vec![cold[i].clone(), warm[i].clone()],
            upstream: vec![diff(&c0[i], &c1[i]), diff(&c1[i], &c2[i])],
        });
    }
    let columns = ["flatdns cold", "flatdns warm"];
    println!(
        "{}",
        compliance::table(
            "Pass 1: a zone per probe (up = queries flatdns sent BIND)",
            &columns,
            &rows
        )
    );
    failures.extend(compliance::differences("per-probe zone", &columns, &rows));

    // Pass 2: one zone, genreport's order, a fresh cache, all probes twice.
    let fd2 = Flatdns::start(&["--upstream", &up]);
    let one = |server: SocketAddr| -> Vec<Seen> {
        probes
            .iter()
            .map(|p| {
                let zone = (p.target != compliance::Target::None).then_some(compliance::SIGNED);
                compliance::probe(server, p, zone)
            })
            .collect()
    };
    let direct = one(bind.addr);
    let first = one(fd2.addr);
    let second = one(fd2.addr);
    // The same in reverse order through another fresh flatdns: what one probe leaves in the
    // cache is then served to the probes before it in genreport's order.
    let fd3 = Flatdns::start(&["--upstream", &up]);
    let reverse: Vec<Seen> = {
        let mut seen: Vec<Seen> = probes
            .iter()
            .rev()
            .map(|p| {
                let zone = (p.target != compliance::Target::None).then_some(compliance::SIGNED);
                compliance::probe(fd3.addr, p, zone)
            })
            .collect();
        seen.reverse();
        seen
    };
    let rows: Vec<Row> = probes
        .iter()
        .enumerate()
        .map(|(i, p)| Row {
            probe: p.name,
            bind: direct[i].clone(),
            flatdns: vec![first[i].clone(), second[i].clone(), reverse[i].clone()],
            upstream: Vec::new(),
        })
        .collect();
    let columns = [
        "flatdns 1st round",
        "flatdns 2nd round",
        "flatdns, reverse order",
    ];
    println!(
        "{}",
        compliance::table(
            &format!("Pass 2: every probe on {} in order", compliance::SIGNED),
            &columns,
            &rows
        )
    );
    failures.extend(compliance::differences("one zone", &columns, &rows));
    println!("compliance probes took {:?}", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} difference(s):\n\n{}\n\nflatdns log:\n{}",
        failures.len(),
        failures.join("\n\n"),
        fd.log()
    );
}

/// R17 on the wire: every reply flatdns writes itself (cache hits, flattened answers,
/// BADVERS, NOTIMP, REFUSED, TC=1, FORMERR) has an OPT exactly when the query had one, of
/// version 0, and echoes neither the header Z bit nor an unknown EDNS flag or option.
#[test]
fn compliance_self_written_answers_have_opt_exactly_when_the_query_had_one() {
    use support::compliance;
    let test = "compliance_self_written_answers_have_opt_exactly_when_the_query_had_one";
    if !compliance_tools(test, &[]) {
        return;
    }
    let bind = Named::start(&[(compliance::RAW, compliance::raw_zone())]);
    let up = bind.addr.to_string();
    let fd = Flatdns::start(&["--upstream", &up]);
    let (lines, failures) = compliance::self_written(&bind, fd.addr);
    println!("\nReplies flatdns writes itself:");
    for l in &lines {
        println!("  {}", l.text);
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n\n{}\n\nflatdns log:\n{}",
        failures.len(),
        failures.join("\n\n"),
        fd.log()
    );
}

/// The verdict is not blind: against a server that echoes every query back, it reports the
/// unknown option, the unknown EDNS flag, the Z bit and the EDNS version as echoed.
#[test]
fn compliance_verdict_sees_what_a_broken_server_echoes() {
    use support::compliance::{self, Echo, Verdict};
    if !tools::available(
        "compliance_verdict_sees_what_a_broken_server_echoes",
        &["dig"],
    ) {
        return;
    }
    let echo = Echo::start();
    let probes = compliance::probes();
    let by_name = |name: &str| -> Verdict {
        let p = probes.iter().find(|p| p.name == name).unwrap();
        compliance::probe(echo.addr, p, Some("example.test")).verdict
    };
    let v = by_name("ednsopt");
    assert!(v.options.contains("OPT=100"), "ednsopt: {v}");
    let v = by_name("ednsflags");
    assert!(v.edns.as_ref().is_some_and(|e| e.mbz), "ednsflags: {v}");
    let v = by_name("zflag");
    assert!(v.flags.contains("z"), "zflag: {v}");
    let v = by_name("edns1");
    assert!(
        v.status == "NOERROR" && v.edns.as_ref().is_some_and(|e| e.version == 1),
        "edns1: {v}"
    );
    let v = by_name("optlist");
    assert!(
        v.options.contains("NSID") && v.options.contains("COOKIE(echoed)"),
        "optlist: {v}"
    );
    let v = by_name("opcode");
    assert!(v.opcode == "RESERVED15" && v.question == 1, "opcode: {v}");
}

// ==========================================================================================
// Issue 7: ALIAS at the zone apex, in front of a legacy BIND

/// The ALIAS lab: BIND #1 (legacy) with `cfg.test` and `zone.test` (TYPE65401 at its apex,
/// pointing at target.elsewhere.test), BIND #2 with elsewhere.test, and Unbound resolving it.
fn alias_lab() -> (Named, Named, Unbound) {
    let apex_body = "@ 3600 MX 10 mail\nmail 300 A 192.0.2.25\n";
    // TYPE65401 rdata: target.elsewhere.test. in wire form (23 octets).
    let zone_body = format!(
        "{apex_body}@ 120 TYPE65401 \\# 23 0674617267657409656c73657768657265047465737400\n"
    );
    let legacy = Named::start(&[
        ("cfg.test", zone("cfg.test", apex_body)),
        ("zone.test", zone("zone.test", &zone_body)),
    ]);
    let elsewhere = Named::start(&[("elsewhere.test", elsewhere_zone())]);
    let unbound = Unbound::start(&[("elsewhere.test", elsewhere.addr)]);
    (legacy, elsewhere, unbound)
}

/// BIND serves two zones, `cfg.test` (an ALIAS at its apex defined in flatdns's config) and
/// `zone.test` (an ALIAS at its apex stored in the zone as TYPE65401); both point at
/// target.elsewhere.test, which only BIND #2 serves, through Unbound.
#[test]
fn alias_at_the_apex_config_and_zone_stored() {
    if !flatten_tools("alias_at_the_apex_config_and_zone_stored") {
        return;
    }
    let (legacy, _elsewhere, unbound) = alias_lab();
    let dir = TempDir::new("alias");
    let conf = dir.write(
        "flatdns.toml",
        "alias_from_zone = true\n\n[[alias]]\nname = \"cfg.test\"\ntarget = \"target.elsewhere.test\"\nttl = 30\n",
    );
    let (up, res) = (legacy.addr.to_string(), unbound.addr.to_string());
    let conf = conf.to_string_lossy().to_string();
    let fd = Flatdns::start(&["--upstream", &up, "--resolver", &res, "--config", &conf]);
    let fd = fd.addr;

    // Config-defined: the target's addresses, TTL min(alias 30, target 60).
    let v = dig_full(fd, &["cfg.test", "A"]);
    assert_flat(
        &v,
        "cfg.test.",
        "A",
        29..=30,
        &["198.51.100.1", "198.51.100.2"],
    );
    let v = dig_full(fd, &["cfg.test", "AAAA"]);
    assert_flat(&v, "cfg.test.", "AAAA", 29..=30, &["2001:db8::1"]);
    // Zone-stored: min(ALIAS record 120, target 60).
    let v = dig_full(fd, &["zone.test", "A"]);
    assert_flat(
        &v,
        "zone.test.",
        "A",
        59..=60,
        &["198.51.100.1", "198.51.100.2"],
    );

    // Every other type at the apex is BIND's own answer.
    for name in ["cfg.test", "zone.test"] {
        for qtype in ["MX", "SOA", "NS"] {
            let via = dig_full(fd, &[name, qtype]);
            let direct = dig_full(legacy.addr, &[name, qtype]);
            assert_eq!(via.status, direct.status, "{name} {qtype}");
            assert_eq!(
                via.records, direct.records,
                "{name} {qtype}: BIND's own answer"
            );
            assert!(!via.records.is_empty(), "{name} {qtype}");
        }
    }
}

// ==========================================================================================
// Issues 6 and 7: `flatdns explain` against the same servers

/// What one `flatdns explain` run printed, and how it exited.
struct Explained {
    code: Option<i32>,
    out: String,
    err: String,
}

/// One exchange with a nameserver as the report shows it, with the answer records under it.
#[derive(Debug)]
struct Exchange {
    role: String,
    /// `None` when the exchange failed (the report then names no server).
    server: Option<String>,
    /// "name. TYPE"
    question: String,
    /// "NOERROR", "SERVFAIL" ... or "failed (...)".
    outcome: String,
    records: Vec<String>,
}

impl Exchange {
    /// (role, server, question), the parts most assertions compare at once.
    fn asked(&self) -> (&str, Option<&str>, &str) {
        (&self.role, self.server.as_deref(), &self.question)
    }
}

/// Runs `flatdns explain ARGS` (bounded).
fn explain_raw(args: &[&str]) -> Explained {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatdns"));
    cmd.arg("explain")
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG");
    let out = tools::run_bounded(cmd, Duration::from_secs(30));
    Explained {
        code: out.status.code(),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `flatdns explain NAME TYPE` with `upstream` and `resolver` (1 s per attempt) and `extra`
/// flags; asserts that the lookup ran (exit 0, nothing on stderr) and that the report opens
/// with the question as a stub asks it.
fn explain(
    name: &str,
    qtype: &str,
    upstream: SocketAddr,
    resolver: SocketAddr,
    extra: &[&str],
) -> Explained {
    let (up, res) = (upstream.to_string(), resolver.to_string());
    let mut args = vec![
        name,
        qtype,
        "--upstream",
        &up,
        "--resolver",
        &res,
        "--timeout",
        "1s",
    ];
    args.extend_from_slice(extra);
    let e = explain_raw(&args);
    assert_eq!(
        (e.code, e.err.as_str()),
        (Some(0), ""),
        "explain {args:?}:\n{}",
        e.out
    );
    let first = e.out.lines().next().unwrap_or("");
    assert_eq!(
        first,
        format!("query: {name}. {qtype} (as a stub resolver asks: RD=1, EDNS 1232, DO=0, UDP)"),
        "{}",
        e.out
    );
    e
}

/// Collapses runs of whitespace, so lines compare by content, not by alignment.
fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Explained {
    /// The heading line of the section whose heading starts with `heading`, and its lines.
    fn section(&self, heading: &str) -> (&str, Vec<&str>) {
        let block = self
            .out
            .split("\n\n")
            .find(|b| b.starts_with(heading))
            .unwrap_or_else(|| panic!("no section {heading:?} in:\n{}", self.out));
        let mut lines = block.lines().filter(|l| !l.trim().is_empty());
        let head = lines.next().unwrap_or("");
        (head, lines.collect())
    }

    /// The exchanges with nameservers, in order. The count on each exchange line must be the
    /// number of records listed under it.
    fn exchanges(&self) -> Vec<Exchange> {
        let mut out: Vec<(Exchange, Option<usize>)> = Vec::new();
        for line in self.section("exchanges:").1 {
            if line.starts_with("      ") {
                let (last, _) = out
                    .last_mut()
                    .unwrap_or_else(|| panic!("a record before any exchange:\n{}", self.out));
                last.records.push(squash(line));
                continue;
            }
            let line = line.trim();
            let Some((role, rest)) = line.split_once(' ') else {
                continue;
            };
            if !matches!(role, "upstream" | "resolver") {
                continue;
            }
            let bad = format!("exchange line {line:?} in:\n{}", self.out);
            // "{role} {server} asked {q}: {RCODE}, {N} answer record(s), {X} ms", or
            // "{role} asked {q}: failed ({why}), {X} ms".
            let (server, rest) = match rest.strip_prefix("asked ") {
                Some(rest) => (None, rest),
                None => {
                    let (server, rest) = rest.split_once(" asked ").expect(&bad);
                    (Some(server.to_string()), rest)
                }
            };
            let (question, rest) = rest.split_once(": ").expect(&bad);
            let (rest, took) = rest.rsplit_once(", ").expect(&bad);
            assert!(
                took.strip_suffix(" ms")
                    .is_some_and(|t| t.parse::<f64>().is_ok()),
                "{bad}"
            );
            let (outcome, count) = if rest.starts_with("failed (") {
                (rest, None)
            } else {
                let (rcode, n) = rest.split_once(", ").expect(&bad);
                let n = n
                    .strip_suffix(" answer record(s)")
                    .and_then(|n| n.parse().ok())
                    .expect(&bad);
                (rcode, Some(n))
            };
            out.push((
                Exchange {
                    role: role.to_string(),
                    server,
                    question: question.to_string(),
                    outcome: outcome.to_string(),
                    records: Vec::new(),
                },
                count,
            ));
        }
        out.into_iter()
            .map(|(e, count)| {
                assert_eq!(
                    count.unwrap_or(0),
                    e.records.len(),
                    "{e:?}: record count:\n{}",
                    self.out
                );
                e
            })
            .collect()
    }

    /// The ALIAS lines of the exchanges section.
    fn aliases(&self) -> Vec<String> {
        self.section("exchanges:")
            .1
            .iter()
            .map(|l| squash(l))
            .filter(|l| l.starts_with("ALIAS "))
            .collect()
    }

    /// The chain's hop lines; the heading's hop count must be their number.
    fn chain(&self) -> Vec<String> {
        let (head, lines) = self.section("chain (");
        let hops: Vec<String> = lines
            .iter()
            .map(|l| squash(l))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .collect();
        assert_eq!(
            head,
            format!("chain ({} hop(s)):", hops.len()),
            "{}",
            self.out
        );
        hops
    }

    /// The chain's `end:` line (where the final records were found), if any.
    fn chain_end(&self) -> Option<String> {
        let (_, lines) = self.section("chain (");
        let mut ends = lines
            .iter()
            .map(|l| squash(l))
            .filter(|l| l.starts_with("end: "));
        let end = ends.next();
        assert!(ends.next().is_none(), "two end lines:\n{}", self.out);
        end
    }

    /// The decision line.
    fn decision(&self) -> String {
        let (_, lines) = self.section("decision:");
        assert_eq!(lines.len(), 1, "{}", self.out);
        squash(lines[0])
    }

    /// The answer's rcode and records; the count on the answer line must be their number.
    fn answer(&self) -> (String, Vec<String>) {
        let (_, lines) = self.section("answer:");
        let (summary, records) = lines.split_first().expect("an answer line");
        let records: Vec<String> = records.iter().map(|l| squash(l)).collect();
        let summary = squash(summary);
        let parts: Vec<&str> = summary.split(", ").collect();
        assert_eq!(parts.len(), 3, "answer line {summary:?}");
        assert_eq!(
            parts[1],
            format!("{} record(s)", records.len()),
            "{}",
            self.out
        );
        assert!(
            parts[2]
                .strip_suffix(" ms")
                .is_some_and(|t| t.parse::<f64>().is_ok()),
            "answer line without its time: {summary:?}"
        );
        (parts[0].to_string(), records)
    }
}

/// The answer section `server` gives to `name TYPE` (asked as dig asks), record by record.
fn answer_of(server: SocketAddr, name: &str, qtype: &str) -> (String, Vec<String>) {
    let v = DigView::parse(&tools::dig(
        server,
        &[name, qtype, "+noall", "+comments", "+answer"],
    ));
    (v.status, v.records)
}

/// The servers explain is run against: BIND #1 serving `legacy`'s zones, BIND #2 serving
/// elsewhere.test, and Unbound with stub zones for every zone of BIND #1 (or, given
/// `public_example`, for example.test at a third BIND serving that text: another view of the
/// same zone) and for elsewhere.test.
struct Servers {
    legacy: Named,
    elsewhere: Named,
    _public: Option<Named>,
    unbound: Unbound,
}

fn servers(
    legacy: &[(&str, String)],
    elsewhere: String,
    public_example: Option<String>,
) -> Servers {
    let legacy_bind = Named::start(legacy);
    let elsewhere = Named::start(&[("elsewhere.test", elsewhere)]);
    let public = public_example.map(|z| Named::start(&[("example.test", z)]));
    let mut stubs: Vec<(&str, SocketAddr)> = legacy
        .iter()
        .map(|(origin, _)| match (&public, *origin) {
            (Some(p), "example.test") => (*origin, p.addr),
            _ => (*origin, legacy_bind.addr),
        })
        .collect();
    stubs.push(("elsewhere.test", elsewhere.addr));
    let unbound = Unbound::start(&stubs);
    Servers {
        legacy: legacy_bind,
        elsewhere,
        _public: public,
        unbound,
    }
}

/// Issue 6: a chain wholly inside BIND's zone. BIND answers the whole chain itself, so there
/// is one exchange (with BIND, showing exactly BIND's answer), every hop is attributed to
/// BIND with the TTL of its zone-file line, and the answer is the final address owned by the
/// question name with the smallest TTL on the chain (a middle link's).
#[test]
fn explain_in_zone_chain_names_every_hop_with_binds_ttls() {
    if !flatten_tools("explain_in_zone_chain_names_every_hop_with_binds_ttls") {
        return;
    }
    // deep -> mid -> inzone -> a (the last link and the A record are legacy_zone()'s).
    let hops = [
        ("deep.example.test.", 500, "mid.example.test."),
        ("mid.example.test.", 45, "inzone.example.test."),
        ("inzone.example.test.", 600, "a.example.test."),
    ];
    let (final_ttl, final_addr) = (120, "192.0.2.10");
    let extra: String = hops[..2]
        .iter()
        .map(|(o, t, target)| format!("{o} {t} CNAME {target}\n"))
        .collect();
    let s = servers(
        &[("example.test", legacy_zone() + &extra)],
        elsewhere_zone(),
        None,
    );
    let bind = s.legacy.addr.to_string();
    // A check of the test: BIND serves the chain as written above.
    let (status, direct) = answer_of(s.legacy.addr, "deep.example.test", "A");
    let mut want_direct: Vec<String> = hops
        .iter()
        .map(|(o, t, target)| format!("{o} {t} IN CNAME {target}"))
        .collect();
    want_direct.push(format!("a.example.test. {final_ttl} IN A {final_addr}"));
    assert_eq!((status.as_str(), &direct), ("NOERROR", &want_direct));
    s.legacy.sync_query_log();
    let asked_before = s.legacy.queries_for("deep.example.test", "A");

    let e = explain("deep.example.test", "A", s.legacy.addr, s.unbound.addr, &[]);
    let out = &e.out;

    let ex = e.exchanges();
    assert_eq!(ex.len(), 1, "one exchange, with BIND only:\n{out}");
    assert_eq!(ex[0].role, "upstream", "{out}");
    assert_eq!(ex[0].server.as_deref(), Some(bind.as_str()), "{out}");
    assert_eq!(ex[0].question, "deep.example.test. A", "{out}");
    assert_eq!(ex[0].outcome, "NOERROR", "{out}");
    assert_eq!(
        ex[0].records, direct,
        "the exchange shows BIND's answer:\n{out}"
    );
    assert!(e.aliases().is_empty(), "{out}");

    let want: Vec<String> = hops
        .iter()
        .enumerate()
        .map(|(i, (o, t, target))| {
            format!(
                "{}. {o} -> {target} CNAME, TTL {t}, from upstream {bind}",
                i + 1
            )
        })
        .collect();
    assert_eq!(e.chain(), want, "{out}");
    assert_eq!(
        e.chain_end(),
        Some(format!(
            "end: a.example.test. A, TTL {final_ttl}, from upstream {bind}"
        )),
        "{out}"
    );

    let min = hops.iter().map(|h| h.1).chain([final_ttl]).min().unwrap();
    assert_eq!(min, 45, "a check of the test: the smallest TTL is mid's");
    assert_eq!(
        e.decision(),
        format!(
            "flattened: the final records, owned by deep.example.test., TTL {min} (the smallest on the chain)"
        ),
        "{out}"
    );
    assert_eq!(
        e.answer(),
        (
            "NOERROR".to_string(),
            vec![format!("deep.example.test. {min} IN A {final_addr}")]
        ),
        "{out}"
    );

    // The exchange is real: BIND logged one more query for the name, and none for the rest
    // of the chain.
    s.legacy.sync_query_log();
    assert_eq!(
        s.legacy.queries_for("deep.example.test", "A") - asked_before,
        1,
        "{}",
        s.legacy.query_log()
    );
    for (o, _, _) in &hops[1..] {
        assert_eq!(s.legacy.queries_for(o.trim_end_matches('.'), "A"), 0, "{o}");
    }
}

/// Issue 6: a chain that leaves BIND's zone. BIND answers the first link; Unbound (the
/// resolver) the rest, from BIND #2. The report shows both exchanges with the right server,
/// attributes each hop to the server whose answer held it, and answers with the other zone's
/// addresses.
#[test]
fn explain_partial_chain_shows_the_upstream_and_the_resolver() {
    if !flatten_tools("explain_partial_chain_shows_the_upstream_and_the_resolver") {
        return;
    }
    let s = servers(&[("example.test", legacy_zone())], elsewhere_zone(), None);
    let bind = s.legacy.addr.to_string();
    let unbound = s.unbound.addr.to_string();
    assert_ne!(bind, unbound);

    // www (300) -> target.elsewhere.test: A 198.51.100.1, .2 at TTL 60.
    let e = explain("www.example.test", "A", s.legacy.addr, s.unbound.addr, &[]);
    let out = &e.out;
    let ex = e.exchanges();
    assert_eq!(ex.len(), 2, "{out}");
    assert_eq!(
        ex[0].asked(),
        ("upstream", Some(bind.as_str()), "www.example.test. A"),
        "{out}"
    );
    assert_eq!(ex[0].outcome, "NOERROR", "{out}");
    assert_eq!(
        ex[0].records,
        ["www.example.test. 300 IN CNAME target.elsewhere.test."],
        "{out}"
    );
    assert_eq!(
        ex[1].asked(),
        (
            "resolver",
            Some(unbound.as_str()),
            "target.elsewhere.test. A"
        ),
        "{out}"
    );
    assert_eq!(ex[1].outcome, "NOERROR", "{out}");
    assert_eq!(
        ex[1].records,
        [
            "target.elsewhere.test. 60 IN A 198.51.100.1",
            "target.elsewhere.test. 60 IN A 198.51.100.2"
        ],
        "{out}"
    );
    assert_eq!(
        e.chain(),
        [format!(
            "1. www.example.test. -> target.elsewhere.test. CNAME, TTL 300, from upstream {bind}"
        )],
        "{out}"
    );
    assert_eq!(
        e.chain_end(),
        Some(format!(
            "end: target.elsewhere.test. A, TTL 60, from resolver {unbound}"
        )),
        "{out}"
    );
    assert_eq!(
        e.decision(),
        "flattened: the final records, owned by www.example.test., TTL 60 (the smallest on the chain)",
        "{out}"
    );
    assert_eq!(
        e.answer(),
        (
            "NOERROR".to_string(),
            vec![
                "www.example.test. 60 IN A 198.51.100.1".to_string(),
                "www.example.test. 60 IN A 198.51.100.2".to_string()
            ]
        ),
        "{out}"
    );
    // Unbound really asked BIND #2; BIND #1 was asked the question only.
    s.elsewhere.sync_query_log();
    assert_eq!(
        s.elsewhere.queries_for("target.elsewhere.test", "A"),
        1,
        "{}",
        s.elsewhere.query_log()
    );
    s.legacy.sync_query_log();
    assert_eq!(s.legacy.queries_for("www.example.test", "A"), 1);

    // chain (300) -> hop1 (200) -> hop2 (80) -> target2 (90, A 198.51.100.20): the first
    // link from BIND, the other two from Unbound's one answer.
    let e = explain(
        "chain.example.test",
        "A",
        s.legacy.addr,
        s.unbound.addr,
        &[],
    );
    let out = &e.out;
    let ex = e.exchanges();
    assert_eq!(ex.len(), 2, "{out}");
    assert_eq!(
        (ex[0].role.as_str(), ex[0].server.as_deref()),
        ("upstream", Some(bind.as_str())),
        "{out}"
    );
    assert_eq!(
        ex[0].records,
        ["chain.example.test. 300 IN CNAME hop1.elsewhere.test."],
        "{out}"
    );
    assert_eq!(
        ex[1].asked(),
        ("resolver", Some(unbound.as_str()), "hop1.elsewhere.test. A"),
        "{out}"
    );
    assert_eq!(
        ex[1].records,
        [
            "hop1.elsewhere.test. 200 IN CNAME hop2.elsewhere.test.",
            "hop2.elsewhere.test. 80 IN CNAME target2.elsewhere.test.",
            "target2.elsewhere.test. 90 IN A 198.51.100.20"
        ],
        "{out}"
    );
    let chain = e.chain();
    assert_eq!(chain.len(), 3, "{out}");
    assert_eq!(
        chain[0],
        format!(
            "1. chain.example.test. -> hop1.elsewhere.test. CNAME, TTL 300, from upstream {bind}"
        ),
        "{out}"
    );
    assert_eq!(
        chain[1],
        format!("2. hop1.elsewhere.test. -> hop2.elsewhere.test. CNAME, TTL 200, from resolver {unbound}"),
        "{out}"
    );
    assert_eq!(
        chain[2],
        format!("3. hop2.elsewhere.test. -> target2.elsewhere.test. CNAME, TTL 80, from resolver {unbound}"),
        "{out}"
    );
    assert_eq!(
        e.chain_end(),
        Some(format!(
            "end: target2.elsewhere.test. A, TTL 90, from resolver {unbound}"
        )),
        "{out}"
    );
    assert_eq!(
        e.decision(),
        "flattened: the final records, owned by chain.example.test., TTL 80 (the smallest on the chain)",
        "{out}"
    );
    assert_eq!(
        e.answer(),
        (
            "NOERROR".to_string(),
            vec!["chain.example.test. 80 IN A 198.51.100.20".to_string()]
        ),
        "{out}"
    );
}

/// Issue 6: looping chains. (1) A loop that only flatdns sees: BIND #1 (the internal view of
/// example.test) says sv -> sv.elsewhere.test, BIND #2 says sv.elsewhere.test -> back to
/// sv.example.test, which Unbound resolves through the public view (a third BIND) to an
/// address. Neither server sees a loop; flatdns must, and give BIND #1's own answer, never
/// the public address. (2) BIND's own in-zone loop (loop1 <-> loop2), which BIND answers with
/// SERVFAIL and both CNAMEs: not flattened, and the client gets exactly that.
#[test]
fn explain_looping_chain_is_not_flattened() {
    if !flatten_tools("explain_looping_chain_is_not_flattened") {
        return;
    }
    let public_addr = "192.0.2.77";
    let s = servers(
        &[(
            "example.test",
            legacy_zone() + "sv 300 CNAME sv.elsewhere.test.\n",
        )],
        elsewhere_zone() + "sv 240 CNAME sv.example.test.\n",
        Some(zone("example.test", &format!("sv 30 A {public_addr}\n"))),
    );
    let bind = s.legacy.addr.to_string();
    let unbound = s.unbound.addr.to_string();

    let e = explain("sv.example.test", "A", s.legacy.addr, s.unbound.addr, &[]);
    let out = &e.out;
    let ex = e.exchanges();
    assert_eq!(ex.len(), 2, "{out}");
    assert_eq!(
        (
            ex[0].role.as_str(),
            ex[0].server.as_deref(),
            ex[0].outcome.as_str()
        ),
        ("upstream", Some(bind.as_str()), "NOERROR"),
        "{out}"
    );
    assert_eq!(
        ex[0].records,
        ["sv.example.test. 300 IN CNAME sv.elsewhere.test."],
        "{out}"
    );
    assert_eq!(
        ex[1].asked(),
        ("resolver", Some(unbound.as_str()), "sv.elsewhere.test. A"),
        "{out}"
    );
    assert_eq!(
        ex[1].records,
        [
            "sv.elsewhere.test. 240 IN CNAME sv.example.test.".to_string(),
            format!("sv.example.test. 30 IN A {public_addr}")
        ],
        "a check of the test: Unbound sees no loop:\n{out}"
    );
    let chain = e.chain();
    assert_eq!(
        chain.first().map(String::as_str),
        Some(
            format!(
                "1. sv.example.test. -> sv.elsewhere.test. CNAME, TTL 300, from upstream {bind}"
            )
            .as_str()
        ),
        "{out}"
    );
    assert!(chain.iter().all(|l| !l.contains(public_addr)), "{out}");
    // The link that closes the loop, from Unbound's reply.
    assert!(
        out.contains(&format!(
            "  loop: sv.elsewhere.test. -> sv.example.test.  CNAME, TTL 240, from resolver {}: already on the chain",
            s.unbound.addr
        )),
        "{out}"
    );
    assert_eq!(e.chain_end(), None, "not flattened: no end:\n{out}");
    let d = e.decision();
    assert!(
        d.starts_with("not flattened (loop): ")
            && d.ends_with("; the client gets the upstream's own answer"),
        "{out}"
    );
    let direct = answer_of(s.legacy.addr, "sv.example.test", "A");
    assert_eq!(e.answer(), direct, "BIND #1's own answer:\n{out}");
    assert!(!out.split("answer:").nth(1).unwrap().contains(public_addr));

    // BIND's in-zone loop: BIND itself gives up (SERVFAIL, both CNAMEs); no chase.
    let e = explain(
        "loop1.example.test",
        "A",
        s.legacy.addr,
        s.unbound.addr,
        &[],
    );
    let out = &e.out;
    let cnames = [
        "loop1.example.test. 300 IN CNAME loop2.example.test.",
        "loop2.example.test. 300 IN CNAME loop1.example.test.",
    ];
    let ex = e.exchanges();
    assert_eq!(ex.len(), 1, "no resolver is asked:\n{out}");
    assert_eq!(
        (ex[0].server.as_deref(), ex[0].outcome.as_str()),
        (Some(bind.as_str()), "SERVFAIL"),
        "{out}"
    );
    assert_eq!(ex[0].records, cnames, "{out}");
    assert!(e.decision().starts_with("not flattened ("), "{out}");
    let direct = answer_of(s.legacy.addr, "loop1.example.test", "A");
    assert_eq!(
        direct,
        ("SERVFAIL".to_string(), cnames.map(String::from).to_vec())
    );
    assert_eq!(e.answer(), direct, "BIND's own answer:\n{out}");
}

/// Issue 7: explain covers aliases. A config-defined ALIAS (with and without a TTL of its
/// own) answers without asking the upstream; a zone-stored one (TYPE65401 at the apex of
/// zone.test in BIND) is found by a second upstream query. Either way the report shows the
/// ALIAS line, a chain hop marked with the alias's source, and the target's addresses owned
/// by the question name.
#[test]
fn explain_aliases_config_and_zone_stored() {
    if !flatten_tools("explain_aliases_config_and_zone_stored") {
        return;
    }
    let (legacy, _elsewhere, unbound) = alias_lab();
    let dir = TempDir::new("explain-alias");
    let conf = dir.write(
        "flatdns.toml",
        "alias_from_zone = true\n\n\
         [[alias]]\nname = \"cfg.test\"\ntarget = \"target.elsewhere.test\"\nttl = 30\n\n\
         [[alias]]\nname = \"bare.cfg.test\"\ntarget = \"target2.elsewhere.test\"\n",
    );
    let conf = conf.to_string_lossy().to_string();
    let cfg = ["--config", conf.as_str()];
    let (bind, res) = (legacy.addr.to_string(), unbound.addr.to_string());
    // Each case asks Unbound a different question, so every TTL is fresh from BIND #2.

    // Config-defined, TTL 30: min(30, target's AAAA 60).
    let e = explain("cfg.test", "AAAA", legacy.addr, unbound.addr, &cfg);
    let out = &e.out;
    assert_eq!(
        e.aliases(),
        ["ALIAS (config-defined) at cfg.test. -> target.elsewhere.test. (TTL 30)"],
        "{out}"
    );
    let ex = e.exchanges();
    assert_eq!(ex.len(), 1, "the upstream is not asked:\n{out}");
    assert_eq!(
        ex[0].asked(),
        (
            "resolver",
            Some(res.as_str()),
            "target.elsewhere.test. AAAA"
        ),
        "{out}"
    );
    assert_eq!(
        ex[0].records,
        ["target.elsewhere.test. 60 IN AAAA 2001:db8::1"],
        "{out}"
    );
    assert_eq!(
        e.chain(),
        ["1. cfg.test. -> target.elsewhere.test. ALIAS (config), TTL 30"],
        "{out}"
    );
    assert_eq!(
        e.chain_end(),
        Some(format!(
            "end: target.elsewhere.test. AAAA, TTL 60, from resolver {res}"
        )),
        "{out}"
    );
    assert_eq!(
        e.decision(),
        "flattened: the final records, owned by cfg.test., TTL 30 (the smallest on the chain)",
        "{out}"
    );
    assert_eq!(
        e.answer(),
        (
            "NOERROR".to_string(),
            vec!["cfg.test. 30 IN AAAA 2001:db8::1".to_string()]
        ),
        "{out}"
    );

    // Config-defined without a TTL: the target's (target2 A 90).
    let e = explain("bare.cfg.test", "A", legacy.addr, unbound.addr, &cfg);
    let out = &e.out;
    assert_eq!(
        e.aliases(),
        ["ALIAS (config-defined) at bare.cfg.test. -> target2.elsewhere.test. (no TTL of its own)"],
        "{out}"
    );
    let ex = e.exchanges();
    assert_eq!(ex.len(), 1, "{out}");
    assert_eq!(
        (ex[0].role.as_str(), ex[0].server.as_deref()),
        ("resolver", Some(res.as_str())),
        "{out}"
    );
    assert_eq!(
        ex[0].records,
        ["target2.elsewhere.test. 90 IN A 198.51.100.20"],
        "{out}"
    );
    let chain = e.chain();
    assert_eq!(chain.len(), 1, "{out}");
    assert_eq!(
        chain[0], "1. bare.cfg.test. -> target2.elsewhere.test. ALIAS (config), no TTL of its own",
        "{out}"
    );
    assert_eq!(
        e.chain_end(),
        Some(format!(
            "end: target2.elsewhere.test. A, TTL 90, from resolver {res}"
        )),
        "{out}"
    );
    assert_eq!(
        e.decision(),
        "flattened: the final records, owned by bare.cfg.test., TTL 90 (the smallest on the chain)",
        "{out}"
    );
    assert_eq!(
        e.answer(),
        (
            "NOERROR".to_string(),
            vec!["bare.cfg.test. 90 IN A 198.51.100.20".to_string()]
        ),
        "{out}"
    );
    legacy.sync_query_log();
    for name in ["cfg.test", "bare.cfg.test"] {
        for qtype in ["A", "AAAA"] {
            assert_eq!(legacy.queries_for(name, qtype), 0, "{name} {qtype}");
        }
    }

    // Zone-stored: BIND's NODATA for A, then its ALIAS record (TTL 120); min(120, target 60).
    let e = explain("zone.test", "A", legacy.addr, unbound.addr, &cfg);
    let out = &e.out;
    let ex = e.exchanges();
    assert_eq!(ex.len(), 3, "{out}");
    assert_eq!(
        ex[0].asked(),
        ("upstream", Some(bind.as_str()), "zone.test. A"),
        "{out}"
    );
    assert_eq!(ex[0].outcome, "NOERROR", "{out}");
    assert!(ex[0].records.is_empty(), "{out}");
    assert_eq!(
        ex[1].asked(),
        ("upstream", Some(bind.as_str()), "zone.test. TYPE65401"),
        "{out}"
    );
    assert_eq!(ex[1].records.len(), 1, "{out}");
    assert!(
        ex[1].records[0].starts_with("zone.test. 120 IN TYPE65401 "),
        "{out}"
    );
    assert_eq!(
        ex[2].asked(),
        ("resolver", Some(res.as_str()), "target.elsewhere.test. A"),
        "{out}"
    );
    assert_eq!(
        ex[2].records,
        [
            "target.elsewhere.test. 60 IN A 198.51.100.1",
            "target.elsewhere.test. 60 IN A 198.51.100.2"
        ],
        "{out}"
    );
    assert_eq!(
        e.aliases(),
        ["ALIAS (zone-defined) at zone.test. -> target.elsewhere.test. (TTL 120)"],
        "{out}"
    );
    let chain = e.chain();
    assert_eq!(chain.len(), 1, "{out}");
    assert_eq!(
        chain[0],
        format!(
            "1. zone.test. -> target.elsewhere.test. ALIAS (zone), TTL 120, from upstream {bind}"
        ),
        "{out}"
    );
    assert_eq!(
        e.chain_end(),
        Some(format!(
            "end: target.elsewhere.test. A, TTL 60, from resolver {res}"
        )),
        "{out}"
    );
    assert_eq!(
        e.decision(),
        "flattened: the final records, owned by zone.test., TTL 60 (the smallest on the chain)",
        "{out}"
    );
    assert_eq!(
        e.answer(),
        (
            "NOERROR".to_string(),
            vec![
                "zone.test. 60 IN A 198.51.100.1".to_string(),
                "zone.test. 60 IN A 198.51.100.2".to_string()
            ]
        ),
        "{out}"
    );
    legacy.sync_query_log();
    assert_eq!(legacy.queries_for("zone.test", "A"), 1);
    assert_eq!(legacy.queries_for("zone.test", "TYPE65401"), 1);
}

/// A bad name, type, config file or flag value is refused with exit status 2 and a message
/// on stderr, before anything is asked; an upstream that never answers is not bad input: the
/// lookup runs (exit 0) and the report says the exchange failed.
#[test]
fn explain_bad_input_exits_2_and_asks_nothing() {
    let upstream = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap().to_string();
    let dir = TempDir::new("explain-bad");
    let self_alias = dir.write(
        "flatdns.toml",
        "[[alias]]\nname = \"a.example\"\ntarget = \"a.example\"\n",
    );
    let self_alias = self_alias.to_string_lossy().to_string();
    let cases: [(&[&str], &[&str]); 5] = [
        (&["bad..name"], &["bad..name"]),
        (&["www.example.test", "BOGUS"], &["BOGUS"]),
        (
            &["www.example.test", "A", "--config", &self_alias],
            &["flatdns.toml:3", "alias.target"],
        ),
        (&["www.example.test", "A", "--timeout", "soon"], &["soon"]),
        (
            &["www.example.test", "A", "--upstream", "not-an-address"],
            &["not-an-address"],
        ),
    ];
    for (args, mentions) in cases {
        let mut all = args.to_vec();
        if !args.contains(&"--upstream") {
            all.extend(["--upstream", &up]);
        }
        let e = explain_raw(&all);
        assert_eq!(
            e.code,
            Some(2),
            "{all:?}: stdout:\n{}\nstderr:\n{}",
            e.out,
            e.err
        );
        assert!(e.out.is_empty(), "{all:?}: stdout:\n{}", e.out);
        for m in mentions {
            assert!(
                e.err.starts_with("flatdns: ") && e.err.contains(m),
                "{all:?}: stderr should name {m:?}:\n{}",
                e.err
            );
        }
    }
    upstream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    assert!(
        upstream.recv(&mut buf).is_err(),
        "bad input still sent a query to the upstream"
    );

    // A silent upstream: the lookup runs, fails, and is reported.
    let e = explain_raw(&[
        "www.example.test",
        "A",
        "--upstream",
        &up,
        "--timeout",
        "1s",
    ]);
    assert_eq!(e.code, Some(0), "{}\n{}", e.out, e.err);
    let ex = e.exchanges();
    assert!(!ex.is_empty(), "{}", e.out);
    for x in &ex {
        assert_eq!(x.role, "upstream", "{}", e.out);
        assert!(x.outcome.starts_with("failed ("), "{}", e.out);
    }
    assert!(e.chain().is_empty(), "{}", e.out);
    assert_eq!(e.chain_end(), None, "{}", e.out);
    assert_eq!(
        e.answer(),
        ("SERVFAIL".to_string(), Vec::new()),
        "{}",
        e.out
    );
    let n = ex.len();
    let mut got = 0;
    while upstream.recv(&mut buf).is_ok() {
        got += 1;
    }
    assert!(
        got >= n,
        "the report shows {n} exchange(s), the upstream got {got} queries"
    );
}
