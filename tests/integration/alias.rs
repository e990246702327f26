//! Issue 7: ALIAS at the zone apex, config-defined and zone-stored (TYPE65401).

use flatdns::config::Alias;

use crate::harness::*;

/// TYPE65401 rdata is the target name in wire form: "target.elsewhere." is
/// 0674617267657409656c7365776865726500, "nothere.elsewhere." 076e6f746865726509656c7365776865726500.
const UPSTREAM: &str = "
example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
example. 3600 IN MX 10 mail.example.
zalias.example. 300 IN TYPE65401 \\# 18 0674617267657409656c7365776865726500
static.example. 300 IN A 192.0.2.50
static.example. 300 IN TYPE65401 \\# 18 0674617267657409656c7365776865726500
zdangling.example. 300 IN TYPE65401 \\# 19 076e6f746865726509656c7365776865726500
";

const RESOLVER: &str = "
elsewhere. 3600 IN SOA ns.elsewhere. host.elsewhere. 1 3600 600 86400 60
target.elsewhere. 60 IN A 198.51.100.1
target.elsewhere. 60 IN A 198.51.100.2
target.elsewhere. 60 IN AAAA 2001:db8::1
";

fn name(s: &str) -> Vec<u8> {
    flatdns::config::parse_name(s).unwrap()
}

struct Setup {
    upstream: Mock,
    resolver: Mock,
    proxy: Proxy,
}

async fn setup(tweak: impl FnOnce(&mut flatdns::config::Config)) -> Setup {
    let upstream = Mock::start(UPSTREAM).await;
    let resolver = Mock::start(RESOLVER).await;
    let raddr = resolver.addr;
    let proxy = Proxy::start(&[upstream.addr], |c| {
        c.resolvers = vec![raddr];
        tweak(c);
    })
    .await;
    Setup {
        upstream,
        resolver,
        proxy,
    }
}

fn apex_alias(c: &mut flatdns::config::Config) {
    c.aliases = vec![
        Alias {
            name: name("example."),
            target: name("target.elsewhere."),
            ttl: Some(30),
        },
        Alias {
            name: name("www.example."),
            target: name("target.elsewhere."),
            ttl: None,
        },
        Alias {
            name: name("gone.example."),
            target: name("nothere.elsewhere."),
            ttl: None,
        },
    ];
}

#[tokio::test]
async fn config_alias_answers_a_and_aaaa_at_the_apex() {
    let s = setup(apex_alias).await;
    let r = s.proxy.udp(&Q::new("Example.", A).edns(1232, false)).await;
    assert_eq!(r.rcode(), 0);
    assert_eq!(
        r.answer,
        vec!["Example. 30 A 198.51.100.1", "Example. 30 A 198.51.100.2"]
    );
    assert!(r.opt.is_some());
    let r = s.proxy.udp(&Q::new("example.", AAAA)).await;
    assert_eq!(r.answer, vec!["example. 30 AAAA 2001:db8::1"]);
    // Without an alias TTL, the chain's TTL.
    let r = s.proxy.udp(&Q::new("www.example.", A)).await;
    assert_eq!(r.answer_no_ttl().len(), 2);
    assert!(
        r.answer.iter().all(|l| l.contains(" 60 A ")),
        "{:?}",
        r.answer
    );
    // Two aliases, one target: one lookup.
    assert_eq!(s.resolver.count("target.elsewhere.", A), 1);
    // Client A/AAAA queries for alias names never reach the upstream: the only ones it saw
    // are the start-up check's (one per name and type, with EDNS, which these clients lack).
    let from_clients = s
        .upstream
        .log()
        .iter()
        .filter(|l| {
            l.qtype == A && l.wire[11] == 0 && (l.name == "example." || l.name == "www.example.")
        })
        .count();
    assert_eq!(from_clients, 0);
}

#[tokio::test]
async fn other_types_at_the_alias_still_come_from_the_upstream() {
    let s = setup(apex_alias).await;
    for t in [MX, SOA, TXT] {
        let q = Q::new("example.", t);
        assert_eq!(
            s.proxy.udp(&q).await.body(),
            s.upstream.direct(&q, false).await.body()
        );
    }
}

#[tokio::test]
async fn config_alias_that_does_not_resolve_gives_the_upstream_answer() {
    let s = setup(apex_alias).await;
    let q = Q::new("gone.example.", A);
    let r = s.proxy.udp(&q).await;
    assert_eq!(r.body(), s.upstream.direct(&q, false).await.body());
    assert_eq!(
        r.rcode(),
        3,
        "the upstream's own NXDOMAIN, nothing invented"
    );
}

#[tokio::test]
async fn zone_stored_alias_is_followed_on_nodata() {
    let s = setup(|c| c.alias_from_zone = true).await;
    let r = s.proxy.udp(&Q::new("zalias.example.", A)).await;
    assert_eq!(
        r.answer_no_ttl(),
        vec![
            "zalias.example. A 198.51.100.1",
            "zalias.example. A 198.51.100.2"
        ]
    );
    assert_eq!(s.upstream.count("zalias.example.", 65401), 1);
    // Cached: no new lookups.
    s.proxy.udp(&Q::new("zalias.example.", A)).await;
    assert_eq!(
        s.upstream.count("zalias.example.", 65401) + s.upstream.count("zalias.example.", A),
        2
    );
    // A static A/AAAA in the zone wins.
    let r = s.proxy.udp(&Q::new("static.example.", A)).await;
    assert_eq!(r.answer_no_ttl(), vec!["static.example. A 192.0.2.50"]);
}

#[tokio::test]
async fn zone_stored_alias_that_does_not_resolve_gives_the_nodata() {
    let s = setup(|c| c.alias_from_zone = true).await;
    let q = Q::new("zdangling.example.", A);
    let r = s.proxy.udp(&q).await;
    assert_eq!(r.rcode(), 0);
    assert!(r.answer.is_empty());
    assert_eq!(r.authority.len(), 1, "the upstream's NODATA with its SOA");
}

#[tokio::test]
async fn zone_stored_aliases_are_ignored_unless_enabled() {
    let s = setup(|_| {}).await;
    let q = Q::new("zalias.example.", A);
    assert_eq!(
        s.proxy.udp(&q).await.body(),
        s.upstream.direct(&q, false).await.body()
    );
    assert_eq!(s.upstream.count("zalias.example.", 65401), 0);
}
