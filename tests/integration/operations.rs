//! Issue 6: metrics, the query log, `explain` and reload, in process and on the binary.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use flatdns::config::{Alias, Config};

use crate::harness::*;

const UPSTREAM: &str = "
example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
one.example. 300 IN CNAME a.example.
a.example. 120 IN A 192.0.2.10
www.example. 200 IN CNAME target.elsewhere.
loop1.example. 300 IN CNAME loop2.example.
loop2.example. 300 IN CNAME loop1.example.
plain.example. 300 IN A 192.0.2.99
plain.example. 300 IN MX 10 mail.example.
apex.example. 3600 IN MX 10 mail.example.
";

const RESOLVER: &str = "
elsewhere. 3600 IN SOA ns.elsewhere. host.elsewhere. 1 3600 600 86400 60
target.elsewhere. 60 IN A 198.51.100.1
target.elsewhere. 60 IN A 198.51.100.2
";

/// GET `path` over HTTP/1.1 with a plain socket: (status code, body).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: flatdns\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// Every sample of an exposition: `name{labels}` -> value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("{key} missing from {m:#?}"))
}

#[tokio::test]
async fn metrics_move_with_real_queries() {
    let up = Mock::start(UPSTREAM).await;
    let res = Mock::start(RESOLVER).await;
    let p = Proxy::start(&[up.addr], |c| {
        c.resolvers = vec![res.addr];
        c.metrics = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let maddr = p.running.as_ref().unwrap().metrics_addr().unwrap();

    let (status, before) = http_get(maddr, "/metrics").await;
    assert_eq!(status, 200);
    let before = samples(&before);
    assert_eq!(get(&before, "flatdns_flattened_total"), 0.0);

    // In-zone chain (flattened), the same again (a hit), a partial chain (a chase), a loop
    // (a fallback), a plain answer over TCP, an MX.
    assert_eq!(p.udp(&Q::new("one.example.", A)).await.answer.len(), 1);
    assert_eq!(p.udp(&Q::new("one.example.", A)).await.answer.len(), 1);
    assert_eq!(p.udp(&Q::new("www.example.", A)).await.answer.len(), 2);
    assert_eq!(p.udp(&Q::new("loop1.example.", A)).await.answer.len(), 2);
    assert_eq!(p.tcp(&Q::new("plain.example.", A)).await.answer.len(), 1);
    assert_eq!(p.udp(&Q::new("nothere.example.", MX)).await.rcode(), 3);
    // EDNS version 1: BADVERS, header rcode 0 with 1 in the OPT's upper bits.
    let mut badvers = Q::new("one.example.", A).edns(1232, false).wire();
    let n = badvers.len();
    badvers[n - 5] = 1;
    let r = R::parse(
        &udp_exchange(p.addr, &badvers, Duration::from_secs(2))
            .await
            .unwrap(),
    );
    assert_eq!((r.rcode(), r.opt.map(|o| o.1 >> 24)), (0, Some(1)));

    let (_, after) = http_get(maddr, "/metrics").await;
    let m = samples(&after);
    let q = |t: &str, ty: &str, rc: &str| {
        let key = format!(r#"flatdns_queries_total{{transport="{t}",type="{ty}",rcode="{rc}"}}"#);
        get(&m, &key)
    };
    assert_eq!(q("udp", "A", "NOERROR"), 4.0, "BADVERS is not NOERROR");
    assert_eq!(q("udp", "A", "BADVERS"), 1.0);
    assert_eq!(q("tcp", "A", "NOERROR"), 1.0);
    assert_eq!(q("udp", "MX", "NXDOMAIN"), 1.0);
    assert_eq!(get(&m, "flatdns_flattened_total"), 2.0);
    assert_eq!(get(&m, "flatdns_chain_length_count"), 2.0);
    assert_eq!(get(&m, "flatdns_chain_length_sum"), 2.0);
    assert_eq!(get(&m, "flatdns_chase_queries_total"), 1.0);
    assert_eq!(
        get(&m, r#"flatdns_flatten_fallbacks_total{reason="loop"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"flatdns_flatten_fallbacks_total{reason="dangling"}"#),
        0.0
    );
    assert_eq!(get(&m, "flatdns_cache_hits_total"), 1.0);
    assert_eq!(get(&m, "flatdns_cache_misses_total"), 5.0);
    // one, www, the chase, loop1, plain, the NXDOMAIN (with its SOA).
    assert_eq!(get(&m, "flatdns_cache_insertions_total"), 6.0);
    assert_eq!(get(&m, "flatdns_cache_entries"), 6.0);
    assert!(get(&m, "flatdns_cache_size_bytes") > 6.0 * 40.0);
    assert_eq!(get(&m, "flatdns_cache_removals_total"), 0.0);
    let size = p.running.as_ref().unwrap().handler().config().cache.size;
    assert_eq!(get(&m, "flatdns_cache_capacity"), size as f64);
    let up_key = |what: &str| format!(r#"flatdns_{what}{{role="upstream",server="{}"}}"#, up.addr);
    let res_key =
        |what: &str| format!(r#"flatdns_{what}{{role="resolver",server="{}"}}"#, res.addr);
    assert_eq!(get(&m, &up_key("upstream_queries_total")), 5.0);
    assert_eq!(get(&m, &res_key("upstream_queries_total")), 1.0);
    assert_eq!(get(&m, &up_key("upstream_latency_seconds_count")), 5.0);
    assert_eq!(get(&m, &up_key("upstream_timeouts_total")), 0.0);
    assert_eq!(get(&m, "flatdns_inflight"), 0.0);
    assert!(m.contains_key("flatdns_tcp_connections"));

    // A timeout is counted against its server.
    up.set("slow.example.", Behavior::Drop);
    assert_eq!(p.udp(&Q::new("slow.example.", A)).await.rcode(), 2);
    let (_, later) = http_get(maddr, "/metrics").await;
    let m = samples(&later);
    assert!(get(&m, &up_key("upstream_timeouts_total")) >= 1.0);
    assert_eq!(q("udp", "A", "NOERROR"), 4.0, "earlier counts do not move");
    assert_eq!(
        get(
            &m,
            r#"flatdns_queries_total{transport="udp",type="A",rcode="SERVFAIL"}"#
        ),
        1.0
    );

    // Only /metrics is served.
    assert_eq!(http_get(maddr, "/").await.0, 404);
}

#[tokio::test]
async fn alias_answers_are_counted_by_source() {
    // zalias.example. holds a zone-stored ALIAS to target.elsewhere. (wire form).
    let up = Mock::start(
        "example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
apex.example. 3600 IN MX 10 mail.example.
zalias.example. 300 IN TYPE65401 \\# 18 0674617267657409656c7365776865726500",
    )
    .await;
    let res = Mock::start(RESOLVER).await;
    let p = Proxy::start(&[up.addr], |c| {
        c.resolvers = vec![res.addr];
        c.alias_from_zone = true;
        c.metrics = Some("127.0.0.1:0".parse().unwrap());
        c.aliases = vec![Alias {
            name: name("apex.example."),
            target: name("target.elsewhere."),
            ttl: Some(30),
        }];
    })
    .await;
    let r = p.udp(&Q::new("apex.example.", A)).await;
    assert_eq!(r.answer.len(), 2);
    let maddr = p.running.as_ref().unwrap().metrics_addr().unwrap();
    let m = samples(&http_get(maddr, "/metrics").await.1);
    assert_eq!(
        get(&m, r#"flatdns_alias_answers_total{source="config"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"flatdns_alias_answers_total{source="zone"}"#),
        0.0
    );
    assert_eq!(get(&m, "flatdns_flattened_total"), 1.0);

    let r = p.udp(&Q::new("zalias.example.", A)).await;
    assert_eq!(r.answer.len(), 2);
    let m = samples(&http_get(maddr, "/metrics").await.1);
    assert_eq!(
        get(&m, r#"flatdns_alias_answers_total{source="zone"}"#),
        1.0
    );
    assert_eq!(
        get(&m, r#"flatdns_alias_answers_total{source="config"}"#),
        1.0
    );
    assert_eq!(get(&m, "flatdns_flattened_total"), 2.0);
}

fn config(up: SocketAddr, res: SocketAddr) -> Config {
    let mut c = Config::for_test("127.0.0.1:0".parse().unwrap(), vec![up]);
    c.resolvers = vec![res];
    c.timeout = Duration::from_millis(300);
    c.limits.client_deadline = Duration::from_millis(1500);
    c
}

#[tokio::test]
async fn explain_reports_in_zone_partial_and_looping_chains() {
    let up = Mock::start(UPSTREAM).await;
    let res = Mock::start(RESOLVER).await;
    let c = config(up.addr, res.addr);

    let text = flatdns::explain::explain(c.clone(), &name("one.example."), A).await;
    assert!(
        text.contains(&format!(
            "upstream {} asked one.example. A: NOERROR",
            up.addr
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "1. one.example. -> a.example.  CNAME, TTL 300, from upstream {}",
            up.addr
        )),
        "{text}"
    );
    assert!(
        text.contains("flattened: the final records, owned by one.example., TTL 120"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "end: a.example. A, TTL 120, from upstream {}",
            up.addr
        )),
        "{text}"
    );
    assert!(text.contains("one.example. 120 IN A 192.0.2.10"), "{text}");

    let text = flatdns::explain::explain(c.clone(), &name("www.example."), A).await;
    assert!(
        text.contains(&format!(
            "resolver {} asked target.elsewhere. A: NOERROR, 2 answer record(s)",
            res.addr
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "www.example. -> target.elsewhere.  CNAME, TTL 200, from upstream {}",
            up.addr
        )),
        "{text}"
    );
    assert!(text.contains("TTL 60 (the smallest"), "{text}");
    assert!(
        text.contains(&format!(
            "end: target.elsewhere. A, TTL 60, from resolver {}",
            res.addr
        )),
        "{text}"
    );
    assert!(text.contains("www.example. 60 IN A 198.51.100.1"), "{text}");
    assert!(text.contains("www.example. 60 IN A 198.51.100.2"), "{text}");

    let text = flatdns::explain::explain(c.clone(), &name("loop1.example."), A).await;
    assert!(text.contains("not flattened (loop)"), "{text}");
    assert!(
        text.contains("loop1.example. 300 IN CNAME loop2.example."),
        "{text}"
    );

    let text = flatdns::explain::explain(c.clone(), &name("plain.example."), MX).await;
    assert!(text.contains("not flattened (not-address)"), "{text}");
    assert!(
        text.contains("plain.example. 300 IN MX 10 mail.example."),
        "{text}"
    );

    // An upstream that does not answer: said so, and the client's SERVFAIL shown.
    up.set("slow.example.", Behavior::Drop);
    let text = flatdns::explain::explain(c, &name("slow.example."), A).await;
    assert!(text.contains("asked slow.example. A: failed"), "{text}");
    assert!(text.contains("SERVFAIL"), "{text}");
}

#[tokio::test]
async fn explain_shows_a_config_alias() {
    let up = Mock::start(UPSTREAM).await;
    let res = Mock::start(RESOLVER).await;
    let mut c = config(up.addr, res.addr);
    c.aliases = vec![Alias {
        name: name("apex.example."),
        target: name("target.elsewhere."),
        ttl: Some(30),
    }];
    let text = flatdns::explain::explain(c, &name("apex.example."), A).await;
    assert!(
        text.contains("ALIAS (config-defined) at apex.example. -> target.elsewhere. (TTL 30)"),
        "{text}"
    );
    assert!(
        text.contains("1. apex.example. -> target.elsewhere.  ALIAS (config), TTL 30"),
        "{text}"
    );
    assert!(text.contains("TTL 30 (the smallest"), "{text}");
    assert!(
        text.contains("apex.example. 30 IN A 198.51.100.1"),
        "{text}"
    );
}

#[tokio::test]
async fn reload_swaps_upstreams_acl_and_scope_keeping_the_cache() {
    let one =
        Mock::start("www.example. 300 IN A 192.0.2.1\nother.example. 300 IN A 192.0.2.1").await;
    let two = Mock::start(
        "www.example. 300 IN A 192.0.2.2\nother.example. 300 IN A 192.0.2.2
c.example. 300 IN CNAME www.example.",
    )
    .await;
    let p = Proxy::start(&[one.addr], |_| {}).await;
    let h = p.handler();
    assert_eq!(
        p.udp(&Q::new("www.example.", A)).await.answer_no_ttl(),
        vec!["www.example. A 192.0.2.1"]
    );

    let mut new = h.config().clone();
    new.upstreams = vec![two.addr];
    new.flatten.enabled = false;
    let done = h.reload(new.clone());
    assert!(done.need_restart.is_empty() && !done.flushed);
    // The cache survived; a new name goes to the new upstream; the new scope applies.
    assert_eq!(
        p.udp(&Q::new("www.example.", A)).await.answer_no_ttl(),
        vec!["www.example. A 192.0.2.1"]
    );
    assert_eq!(two.count("www.example.", A), 0);
    assert_eq!(
        p.udp(&Q::new("other.example.", A)).await.answer_no_ttl(),
        vec!["other.example. A 192.0.2.2"]
    );
    assert_eq!(one.count("other.example.", A), 0);
    assert_eq!(
        p.udp(&Q::new("c.example.", A)).await.answer.len(),
        2,
        "not flattened"
    );

    // Keys that need a restart are named, and keep their running value.
    let mut fixed = new.clone();
    fixed.limits.max_inflight = 10;
    fixed.cache.size = 5;
    let done = h.reload(fixed);
    assert_eq!(done.need_restart, vec!["cache", "limits"]);
    assert_eq!(h.config().limits.max_inflight, 4096);

    // Flush on reload, and an ACL that leaves the client out.
    let mut flush = new.clone();
    flush.cache.flush_on_reload = true;
    flush.allow = vec!["192.0.2.0/24".parse().unwrap()];
    assert!(h.reload(flush).flushed);
    // The flushed entries count as removals; the gauges are read from the cache itself.
    let m = samples(&h.metrics().render());
    assert_eq!(get(&m, "flatdns_cache_entries"), 0.0);
    assert!(get(&m, "flatdns_cache_removals_total") >= 1.0);
    assert_eq!(
        get(&m, "flatdns_cache_removals_total"),
        get(&m, "flatdns_cache_insertions_total")
    );
    assert_eq!(p.udp(&Q::new("www.example.", A)).await.rcode(), 5);
    let mut open = new;
    open.cache.flush_on_reload = true;
    h.reload(open);
    assert_eq!(
        p.udp(&Q::new("www.example.", A)).await.answer_no_ttl(),
        vec!["www.example. A 192.0.2.2"]
    );
}

/// A flushing reload while a lookup is in flight: that lookup's answer (from the old
/// settings) reaches its client but not the emptied cache.
#[tokio::test]
async fn a_flushing_reload_keeps_in_flight_answers_out_of_the_cache() {
    let one = Mock::start("slow.example. 300 IN A 192.0.2.1").await;
    let two = Mock::start("slow.example. 300 IN A 192.0.2.2").await;
    one.set("slow.example.", Behavior::Delay(Duration::from_millis(200)));
    let p = Proxy::start(&[one.addr], |_| {}).await;
    let addr = p.addr;
    let pending =
        tokio::spawn(async move { udp_query(addr, &Q::new("slow.example.", A).wire()).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut new = p.handler().config().clone();
    new.upstreams = vec![two.addr];
    new.cache.flush_on_reload = true;
    assert!(p.handler().reload(new).flushed);
    let old = pending.await.unwrap();
    assert_eq!(old.answer_no_ttl(), vec!["slow.example. A 192.0.2.1"]);
    let r = p.udp(&Q::new("slow.example.", A)).await;
    assert_eq!(r.answer_no_ttl(), vec!["slow.example. A 192.0.2.2"]);
    assert_eq!(two.count("slow.example.", A), 1);
}
