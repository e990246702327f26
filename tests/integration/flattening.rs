//! Issue 3: CNAME flattening (F1-F6) and chasing partial chains through the resolver.

use std::time::Duration;

use flatdns::config::{DnssecPolicy, Exclude};

use crate::harness::*;

/// The legacy authoritative server: in-zone chains, and CNAMEs out of its zone.
const UPSTREAM: &str = "
example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
one.example. 300 IN CNAME a.example.
a.example. 120 IN A 192.0.2.10
a.example. 120 IN A 192.0.2.11
a.example. 120 IN AAAA 2001:db8::10
hops.example. 900 IN CNAME h1.example.
h1.example. 45 IN CNAME h2.example.
h2.example. 600 IN CNAME a.example.
www.example. 300 IN CNAME target.elsewhere.
dangling.example. 300 IN CNAME nothere.elsewhere.
nodata.example. 300 IN CNAME v6only.elsewhere.
broken.example. 300 IN CNAME broken.elsewhere.
loop1.example. 300 IN CNAME loop2.example.
loop2.example. 300 IN CNAME loop1.example.
outloop.example. 300 IN CNAME out1.elsewhere.
many.example. 300 IN CNAME many.elsewhere.
alias1.example. 300 IN CNAME target.elsewhere.
alias2.example. 300 IN CNAME target.elsewhere.
_acme-challenge.example. 300 IN CNAME a.example.
mx.example. 300 IN CNAME a.example.
plain.example. 300 IN A 192.0.2.99
";

/// What the resolver knows about the other zone.
fn resolver_zone() -> String {
    let mut z = String::from(
        "
elsewhere. 3600 IN SOA ns.elsewhere. host.elsewhere. 1 3600 600 86400 60
target.elsewhere. 60 IN A 198.51.100.1
target.elsewhere. 60 IN A 198.51.100.2
target.elsewhere. 60 IN AAAA 2001:db8::1
v6only.elsewhere. 60 IN AAAA 2001:db8::6
out1.elsewhere. 60 IN CNAME outloop.example.
",
    );
    for i in 1..=40 {
        z.push_str(&format!("many.elsewhere. 30 IN A 203.0.113.{i}\n"));
    }
    z
}

/// A chain of `n` CNAMEs from c0.example. to the addresses.
fn chain_zone(n: usize) -> String {
    let mut z =
        String::from("example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300\n");
    for i in 0..n {
        z.push_str(&format!("c{i}.example. 300 IN CNAME c{}.example.\n", i + 1));
    }
    z.push_str(&format!("c{n}.example. 300 IN A 192.0.2.77\n"));
    z
}

struct Setup {
    upstream: Mock,
    resolver: Mock,
    proxy: Proxy,
}

async fn setup(tweak: impl FnOnce(&mut flatdns::config::Config)) -> Setup {
    let upstream = Mock::start(UPSTREAM).await;
    let resolver = Mock::start(&resolver_zone()).await;
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

#[tokio::test]
async fn one_hop_in_zone_is_flattened_with_the_minimum_ttl() {
    let s = setup(|_| {}).await;
    s.upstream.set("one.example.", Behavior::Ad);
    let r = s
        .proxy
        .udp(&Q::new("one.example.", A).edns(1232, false))
        .await;
    assert_eq!(r.rcode(), 0);
    assert_eq!(
        r.answer,
        vec![
            "one.example. 120 A 192.0.2.10",
            "one.example. 120 A 192.0.2.11"
        ]
    );
    assert!(r.authority.is_empty() && r.additional.is_empty());
    assert!(!r.ad(), "AD cleared on a synthesised answer");
    assert!(r.opt.is_some(), "OPT kept");
    assert_eq!(s.resolver.total(), 0, "a complete chain needs no chase");
}

#[tokio::test]
async fn several_hops_take_the_smallest_ttl_of_any_link() {
    let s = setup(|_| {}).await;
    let r = s.proxy.udp(&Q::new("hops.example.", A)).await;
    assert_eq!(
        r.answer,
        vec![
            "hops.example. 45 A 192.0.2.10",
            "hops.example. 45 A 192.0.2.11"
        ]
    );
}

#[tokio::test]
async fn partial_chain_is_chased_through_the_resolver() {
    let s = setup(|_| {}).await;
    let r = s.proxy.udp(&Q::new("www.example.", A)).await;
    assert_eq!(
        r.answer,
        vec![
            "www.example. 60 A 198.51.100.1",
            "www.example. 60 A 198.51.100.2"
        ]
    );
    assert_eq!(s.resolver.count("target.elsewhere.", A), 1);
    let r = s.proxy.udp(&Q::new("www.example.", AAAA)).await;
    assert_eq!(r.answer, vec!["www.example. 60 AAAA 2001:db8::1"]);
    // The chase query asks for no DNSSEC records.
    let chase = &s.resolver.log()[0].wire;
    assert_eq!(chase[chase.len() - 4] & 0x80, 0, "DO=0 on chase queries");
}

#[tokio::test]
async fn aliases_to_one_target_share_one_chase() {
    let s = setup(|_| {}).await;
    for n in ["alias1.example.", "alias2.example.", "www.example."] {
        let r = s.proxy.udp(&Q::new(n, A)).await;
        assert_eq!(r.answer.len(), 2, "{n}");
    }
    assert_eq!(s.resolver.count("target.elsewhere.", A), 1);
}

#[tokio::test]
async fn aaaa_in_zone() {
    let s = setup(|_| {}).await;
    let r = s.proxy.udp(&Q::new("one.example.", AAAA)).await;
    assert_eq!(r.answer, vec!["one.example. 120 AAAA 2001:db8::10"]);
}

async fn assert_unchanged(s: &Setup, q: Q) {
    let via = s.proxy.udp(&q).await;
    let direct = s.upstream.direct(&q, false).await;
    assert_eq!(
        via.body(),
        direct.body(),
        "{q:?}: upstream's own answer expected"
    );
}

#[tokio::test]
async fn loops_dangling_nodata_and_chase_failures_give_the_upstream_answer() {
    let s = setup(|_| {}).await;
    s.resolver.set("broken.elsewhere.", Behavior::Servfail);
    for n in [
        "loop1.example.",
        "outloop.example.",
        "dangling.example.",
        "nodata.example.",
        "broken.example.",
    ] {
        assert_unchanged(&s, Q::new(n, A).edns(1232, false)).await;
    }
    // Never an NXDOMAIN for the owner when the target does not exist (PowerDNS #6666).
    let r = s.proxy.udp(&Q::new("dangling.example.", A)).await;
    assert_eq!(r.rcode(), 0);
    assert_eq!(
        r.answer_no_ttl(),
        vec!["dangling.example. CNAME nothere.elsewhere."]
    );
}

#[tokio::test]
async fn chase_timeout_gives_the_upstream_answer() {
    let s = setup(|_| {}).await;
    s.resolver.set("target.elsewhere.", Behavior::Drop);
    assert_unchanged(&s, Q::new("www.example.", A)).await;
}

#[tokio::test]
async fn eleven_hops_flatten_twelve_do_not() {
    for (n, flattened) in [(11, true), (12, false)] {
        let up = Mock::start(&chain_zone(n)).await;
        let proxy = Proxy::start(&[up.addr], |_| {}).await;
        let r = proxy.udp(&Q::new("c0.example.", A)).await;
        if flattened {
            assert_eq!(r.answer, vec!["c0.example. 300 A 192.0.2.77"], "{n} hops");
        } else {
            assert_eq!(r.answer.len(), n + 1, "{n} hops: passed through");
            assert_eq!(
                r.body(),
                up.direct(&Q::new("c0.example.", A), false).await.body()
            );
        }
    }
}

#[tokio::test]
async fn max_chain_flag_is_honoured() {
    let up = Mock::start(&chain_zone(3)).await;
    let proxy = Proxy::start(&[up.addr], |c| c.flatten.max_chain = 2).await;
    assert_eq!(proxy.udp(&Q::new("c0.example.", A)).await.answer.len(), 4);
}

#[tokio::test]
async fn other_types_pass_through_untouched() {
    let s = setup(|_| {}).await;
    for t in [MX, TXT, CNAME] {
        assert_unchanged(&s, Q::new("mx.example.", t)).await;
    }
    // ANY goes over TCP (over UDP it gets TC=1, RFC 8482).
    let q = Q::new("mx.example.", ANY);
    assert_eq!(
        s.proxy.tcp(&q).await.body(),
        s.upstream.direct(&q, true).await.body()
    );
    // A plain A answer without a chain is passed through too.
    assert_unchanged(&s, Q::new("plain.example.", A)).await;
}

#[tokio::test]
async fn dnssec_clients_get_the_unflattened_answer_by_default() {
    let s = setup(|_| {}).await;
    assert_unchanged(&s, Q::new("one.example.", A).edns(1232, true)).await;
    let s = setup(|c| c.flatten.dnssec = DnssecPolicy::Strip).await;
    let r = s
        .proxy
        .udp(&Q::new("one.example.", A).edns(1232, true))
        .await;
    assert_eq!(r.answer.len(), 2);
    assert!(r.answer.iter().all(|l| l.starts_with("one.example. 120 A")));
}

#[tokio::test]
async fn mixed_case_question_owns_the_answer_as_written() {
    let s = setup(|_| {}).await;
    let r = s.proxy.udp(&Q::new("OnE.ExAmple.", A)).await;
    assert_eq!(
        r.answer_no_ttl(),
        vec!["OnE.ExAmple. A 192.0.2.10", "OnE.ExAmple. A 192.0.2.11"]
    );
    // From the cache, another case.
    let r = s.proxy.udp(&Q::new("ONE.EXAMPLE.", A)).await;
    assert_eq!(
        r.answer_no_ttl(),
        vec!["ONE.EXAMPLE. A 192.0.2.10", "ONE.EXAMPLE. A 192.0.2.11"]
    );
    assert_eq!(s.upstream.count("one.example.", A), 1);
}

#[tokio::test]
async fn forty_addresses_truncate_over_udp_and_arrive_whole_over_tcp() {
    let s = setup(|_| {}).await;
    let r = s.proxy.udp(&Q::new("many.example.", A)).await;
    assert!(r.tc(), "640+ octets do not fit 512");
    assert!(r.answer.is_empty());
    let r = s.proxy.tcp(&Q::new("many.example.", A)).await;
    assert_eq!(r.answer.len(), 40);
    assert!(r
        .answer
        .iter()
        .all(|l| l.starts_with("many.example. 30 A 203.0.113.")));
    assert_eq!(
        s.upstream.count("many.example.", A),
        1,
        "the TCP retry came from the cache"
    );
}

#[tokio::test]
async fn scope_zones_and_excludes() {
    let s = setup(|c| c.flatten.zones = vec![b"\x05other\x00".to_vec()]).await;
    assert_unchanged(&s, Q::new("one.example.", A)).await;
    let s = setup(|_| {}).await;
    assert_unchanged(&s, Q::new("_acme-challenge.example.", A)).await;
    let s =
        setup(|c| c.flatten.exclude = vec![Exclude::Subtree(b"\x03one\x07example\x00".to_vec())])
            .await;
    assert_unchanged(&s, Q::new("one.example.", A)).await;
    assert_eq!(
        s.proxy.udp(&Q::new("hops.example.", A)).await.answer.len(),
        2
    );
    let s = setup(|c| c.flatten.enabled = false).await;
    assert_unchanged(&s, Q::new("one.example.", A)).await;
}

#[tokio::test]
async fn upstream_servfail_is_passed_on() {
    let s = setup(|_| {}).await;
    s.upstream.set("one.example.", Behavior::Servfail);
    let r = s.proxy.udp(&Q::new("one.example.", A)).await;
    assert_eq!(r.rcode(), 2);
}

#[tokio::test]
async fn flattened_answers_are_cached_and_count_down() {
    let s = setup(|_| {}).await;
    let q = Q::new("www.example.", A);
    s.proxy.udp(&q).await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(25)).await;
    let mut out = Vec::new();
    let client = "127.0.0.1:9".parse().unwrap();
    let h = s.proxy.handler();
    assert_eq!(
        h.answer_fast(
            &q.wire(),
            client,
            flatdns::handler::Transport::Udp,
            &mut out
        ),
        flatdns::handler::Fast::Reply
    );
    assert_eq!(
        R::parse(&out).answer,
        vec![
            "www.example. 35 A 198.51.100.1",
            "www.example. 35 A 198.51.100.2"
        ]
    );
    tokio::time::advance(Duration::from_secs(40)).await;
    assert_eq!(
        h.answer_fast(
            &q.wire(),
            client,
            flatdns::handler::Transport::Udp,
            &mut out
        ),
        flatdns::handler::Fast::Miss,
        "expired after 60 s"
    );
    assert_eq!(s.upstream.count("www.example.", A), 1);
}

#[tokio::test]
async fn a_failed_chase_is_not_remembered_past_the_failure_ttl() {
    let s = setup(|c| c.cache.failure_ttl = 1).await;
    s.resolver.set("target.elsewhere.", Behavior::Servfail);
    let q = Q::new("www.example.", A);
    assert_unchanged(&s, q.clone()).await;
    s.resolver.set("target.elsewhere.", Behavior::Answer);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = s.proxy.udp(&q).await;
    assert_eq!(
        r.answer_no_ttl(),
        vec!["www.example. A 198.51.100.1", "www.example. A 198.51.100.2"]
    );
}

#[tokio::test]
async fn a_truncated_chain_is_passed_on_not_flattened_nor_cached() {
    // TC=1 with the CNAME and one address; TCP refused, so the cut reply is all there is.
    let upstream = Mock::start_with(UPSTREAM, false).await;
    upstream.set("one.example.", Behavior::TruncateUdpPartial);
    let proxy = Proxy::start(&[upstream.addr], |_| {}).await;
    let q = Q::new("one.example.", A).edns(1232, false);
    let r = proxy.udp(&q).await;
    assert!(r.tc(), "TC passed on");
    assert_eq!(
        r.answer_no_ttl(),
        vec!["one.example. CNAME a.example.", "a.example. A 192.0.2.10"]
    );
    proxy.udp(&q).await;
    assert_eq!(upstream.count("one.example.", A), 2, "never cached");
}
