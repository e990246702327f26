//! Issue 3: the cache (R4-R8, R24) and coalescing.

use std::net::SocketAddr;
use std::time::Duration;

use flatdns::handler::{Fast, Handler, Transport};

use crate::harness::*;

const ZONE: &str = "
example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
www.example. 300 IN A 192.0.2.1
short.example. 5 IN A 192.0.2.5
huge.example. 4000000000 IN A 192.0.2.6
";

fn client() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

/// Serves `q` without I/O: a cache hit or nothing.
fn hit(h: &Handler, q: &Q) -> Option<R> {
    let mut out = Vec::new();
    match h.answer_fast(&q.wire(), client(), Transport::Udp, &mut out) {
        Fast::Reply => Some(R::parse(&out)),
        _ => None,
    }
}

#[tokio::test]
async fn ttls_count_down_and_entries_expire() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let q = Q::new("www.example.", A).id(5);
    assert_eq!(
        proxy.udp(&q).await.answer,
        vec!["www.example. 300 A 192.0.2.1"]
    );
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(100)).await;
    let r = hit(proxy.handler(), &q).expect("hit");
    assert_eq!(r.id, 5);
    assert_eq!(r.answer, vec!["www.example. 200 A 192.0.2.1"]);
    tokio::time::advance(Duration::from_secs(200)).await;
    assert!(hit(proxy.handler(), &q).is_none(), "expired at 300 s");
}

#[tokio::test]
async fn ttl_cap_and_top_bit() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| c.cache.max_ttl = 3600).await;
    let q = Q::new("huge.example.", A);
    proxy.udp(&q).await;
    // 4,000,000,000 has the top bit set: it counts as 0 (RFC 2181), so not cached at all.
    assert!(hit(proxy.handler(), &q).is_none());
    let proxy = Proxy::start(&[mock.addr], |c| c.cache.max_ttl = 100).await;
    let q = Q::new("www.example.", A);
    proxy.udp(&q).await;
    assert_eq!(
        hit(proxy.handler(), &q).unwrap().answer,
        vec!["www.example. 100 A 192.0.2.1"]
    );
}

#[tokio::test]
async fn negative_answers_are_cached_by_rfc2308() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let q = Q::new("nope.example.", A);
    assert_eq!(proxy.udp(&q).await.rcode(), 3);
    tokio::time::pause();
    // min(SOA TTL 3600, MINIMUM 300) = 300.
    tokio::time::advance(Duration::from_secs(299)).await;
    assert_eq!(hit(proxy.handler(), &q).unwrap().rcode(), 3);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(hit(proxy.handler(), &q).is_none());
}

#[tokio::test]
async fn negative_ttl_is_capped() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| c.cache.negative_ttl_max = 10).await;
    let q = Q::new("nope.example.", A);
    proxy.udp(&q).await;
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(hit(proxy.handler(), &q).is_none());
}

#[tokio::test]
async fn negative_answers_without_soa_are_not_cached() {
    let mock = Mock::start("www.example. 300 IN A 192.0.2.1").await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let q = Q::new("nope.example.", A);
    assert_eq!(proxy.udp(&q).await.rcode(), 3);
    assert!(hit(proxy.handler(), &q).is_none());
    proxy.udp(&q).await;
    assert_eq!(mock.count("nope.example.", A), 2);
}

#[tokio::test]
async fn servfail_is_cached_for_the_failure_ttl() {
    let mock = Mock::start(ZONE).await;
    mock.set_default(Behavior::Servfail);
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let q = Q::new("www.example.", A);
    assert_eq!(proxy.udp(&q).await.rcode(), 2);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(4)).await;
    assert_eq!(hit(proxy.handler(), &q).unwrap().rcode(), 2);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(hit(proxy.handler(), &q).is_none(), "5 s by default");
}

#[tokio::test]
async fn do_cd_and_edns_never_share_an_entry() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let variants = [
        Q::new("www.example.", A),
        Q::new("www.example.", A).edns(1232, false),
        Q::new("www.example.", A).edns(1232, true),
        Q::new("www.example.", A).edns(1232, true).cd(),
        Q::new("www.example.", A).edns(1232, false).ad(),
    ];
    for q in &variants {
        proxy.udp(q).await;
    }
    assert_eq!(mock.count("www.example.", A), 5);
    for q in &variants {
        let r = hit(proxy.handler(), q).unwrap();
        assert_eq!(r.opt.is_some(), q.edns.is_some());
        assert_eq!(
            r.opt.map(|o| o.1 & 0x8000 != 0),
            q.edns.map(|e| e.1),
            "DO echoed per entry"
        );
    }
}

#[tokio::test]
async fn identical_concurrent_misses_reach_the_upstream_once() {
    let mock = Mock::start(ZONE).await;
    mock.set("www.example.", Behavior::Delay(Duration::from_millis(500)));
    let proxy = Proxy::start(&[mock.addr], |c| c.timeout = Duration::from_secs(2)).await;
    let mut tasks = Vec::new();
    for i in 0..50u16 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            udp_query(addr, &Q::new("www.example.", A).id(i).wire()).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.id, i as u16);
        assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    }
    assert_eq!(mock.count("www.example.", A), 1);
}

#[tokio::test]
async fn waiters_beyond_the_cap_get_servfail() {
    let mock = Mock::start(ZONE).await;
    mock.set("www.example.", Behavior::Delay(Duration::from_millis(800)));
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.waiters_per_key = 3;
        c.timeout = Duration::from_secs(2);
        c.limits.client_deadline = Duration::from_secs(3);
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..10u16 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            udp_query(addr, &Q::new("www.example.", A).id(i).wire()).await
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ok = 0;
    let mut servfail = 0;
    for t in tasks {
        match t.await.unwrap().rcode() {
            0 => ok += 1,
            2 => servfail += 1,
            other => panic!("rcode {other}"),
        }
    }
    assert_eq!((ok, servfail), (4, 6), "one leader and three waiters");
    assert_eq!(mock.count("www.example.", A), 1);
}

#[tokio::test]
async fn cookies_are_not_replayed_to_another_client() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let a = Q::new("www.example.", A)
        .edns(1232, false)
        .option(10, b"AAAAAAAA");
    proxy.udp(&a).await;
    let b = Q::new("www.example.", A)
        .edns(1232, false)
        .option(10, b"BBBBBBBB");
    let r = proxy.udp(&b).await;
    assert_eq!(mock.count("www.example.", A), 1, "served from the cache");
    let opt = r.opt.unwrap();
    assert!(!opt.2.windows(8).any(|w| w == b"AAAAAAAA"));
    // B gets its own client cookie back with flatdns's server cookie (RFC 7873/9018).
    assert_eq!(&opt.2[..4], &[0, 10, 0, 24]);
    assert_eq!(&opt.2[4..12], b"BBBBBBBB");
    assert_eq!(opt.2[12], 1, "server cookie version 1");
    // A malformed cookie (5 octets) is a FORMERR, as BIND answers it.
    let bad = Q::new("www.example.", A)
        .edns(1232, false)
        .option(10, b"short");
    assert_eq!(proxy.udp(&bad).await.rcode(), 1);
}

#[tokio::test]
async fn client_subnet_queries_bypass_the_cache() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let ecs = Q::new("www.example.", A)
        .edns(1232, false)
        .option(8, &[0, 1, 24, 0, 192, 0, 2]);
    proxy.udp(&ecs).await;
    proxy.udp(&ecs).await;
    assert_eq!(mock.count("www.example.", A), 2);
}

#[tokio::test]
async fn cache_size_zero_disables_the_cache() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| c.cache.size = 0).await;
    let q = Q::new("www.example.", A);
    proxy.udp(&q).await;
    proxy.udp(&q).await;
    assert_eq!(mock.count("www.example.", A), 2);
}

#[tokio::test]
async fn the_cache_is_bounded() {
    let mut z = ZONE.to_string();
    for i in 0..300 {
        z.push_str(&format!("u{i}.example. 300 IN A 10.3.0.1\n"));
    }
    let mock = Mock::start(&z).await;
    let proxy = Proxy::start(&[mock.addr], |c| c.cache.size = 50).await;
    for i in 0..300 {
        proxy.udp(&Q::new(&format!("u{i}.example."), A)).await;
    }
    let n = proxy.handler().cache().entry_count();
    assert!(n <= 50, "{n} entries with a bound of 50");
    assert!(n > 0);
}

#[tokio::test]
async fn truncated_replies_are_passed_on_and_never_cached() {
    // TC=1 over UDP and no TCP service: the TCP retry is refused, TC goes to the client.
    let mock = Mock::start_with(ZONE, false).await;
    mock.set("www.example.", Behavior::TruncateUdp);
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let q = Q::new("www.example.", A).edns(1232, false);
    let r = proxy.udp(&q).await;
    assert!(r.tc());
    assert!(hit(proxy.handler(), &q).is_none());
    proxy.udp(&q).await;
    assert_eq!(
        mock.log().iter().filter(|l| !l.tcp).count(),
        2,
        "asked again: nothing cached"
    );
}

#[tokio::test]
async fn pending_queries_per_client_are_capped() {
    let mut z = ZONE.to_string();
    for i in 0..10 {
        z.push_str(&format!("d{i}.example. 300 IN A 10.4.0.1\n"));
    }
    let mock = Mock::start(&z).await;
    mock.set_default(Behavior::Delay(Duration::from_millis(600)));
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.pending_per_client = 4;
        c.timeout = Duration::from_secs(2);
        c.limits.client_deadline = Duration::from_secs(3);
    })
    .await;
    let mut tasks = Vec::new();
    for i in 0..10u16 {
        let addr = proxy.addr;
        let q = Q::new(&format!("d{i}.example."), A).id(i);
        tasks.push(tokio::spawn(async move {
            udp_query(addr, &q.wire()).await.rcode()
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut rcodes = Vec::new();
    for t in tasks {
        rcodes.push(t.await.unwrap());
    }
    assert_eq!(rcodes.iter().filter(|&&r| r == 0).count(), 4, "{rcodes:?}");
    assert_eq!(rcodes.iter().filter(|&&r| r == 2).count(), 6, "{rcodes:?}");
    assert_eq!(mock.total(), 4, "refused queries cause no upstream traffic");
}

#[tokio::test]
async fn at_the_inflight_cap_misses_fail_fast_and_hits_are_served() {
    let mut z = ZONE.to_string();
    for i in 0..10 {
        z.push_str(&format!("s{i}.example. 300 IN A 10.5.0.1\n"));
    }
    let mock = Mock::start(&z).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.max_inflight = 3;
        c.timeout = Duration::from_secs(2);
        c.limits.client_deadline = Duration::from_secs(3);
    })
    .await;
    // A cached name first.
    proxy.udp(&Q::new("www.example.", A)).await;
    mock.set_default(Behavior::Drop);
    let mut stalled = Vec::new();
    for i in 0..3 {
        let addr = proxy.addr;
        let q = Q::new(&format!("s{i}.example."), A);
        stalled.push(tokio::spawn(async move {
            udp_query(addr, &q.wire()).await.rcode()
        }));
    }
    for _ in 0..100 {
        if mock.total() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The fourth miss fails at once: no upstream query, SERVFAIL well before any timeout.
    let started = std::time::Instant::now();
    let r = proxy.udp(&Q::new("s9.example.", A)).await;
    assert_eq!(r.rcode(), 2);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mock.count("s9.example.", A), 0);
    // Hits are still served.
    assert_eq!(proxy.udp(&Q::new("www.example.", A)).await.answer.len(), 1);
    for t in stalled {
        assert_eq!(t.await.unwrap(), 2);
    }
    // Recovery: with the stalled queries gone and the upstream back, misses are answered.
    mock.set_default(Behavior::Answer);
    assert_eq!(proxy.udp(&Q::new("s8.example.", A)).await.rcode(), 0);
}

fn stale_on(c: &mut flatdns::config::Config) {
    c.cache.stale = Some(flatdns::config::StaleConfig {
        answer_after: Duration::from_millis(200),
        max_age: Duration::from_secs(86_400),
    });
    c.timeout = Duration::from_secs(2);
    c.limits.client_deadline = Duration::from_secs(3);
}

const SHORT: &str = "
example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
one.example. 1 IN A 192.0.2.7
";

#[tokio::test]
async fn serve_stale_answers_when_the_refresh_is_slow_and_the_refresh_lands() {
    let mock = Mock::start(SHORT).await;
    let proxy = Proxy::start(&[mock.addr], stale_on).await;
    let q = Q::new("one.example.", A);
    assert_eq!(
        proxy.udp(&q).await.answer,
        vec!["one.example. 1 A 192.0.2.7"]
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mock.set("one.example.", Behavior::Delay(Duration::from_millis(600)));
    let started = std::time::Instant::now();
    let r = proxy.udp(&q).await;
    assert_eq!(
        r.answer,
        vec!["one.example. 30 A 192.0.2.7"],
        "stale, TTL 30"
    );
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    // The refresh went on and refreshed the cache.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(mock.count("one.example.", A), 2);
    let r = hit(proxy.handler(), &q).expect("fresh entry from the refresh");
    assert_eq!(r.answer, vec!["one.example. 1 A 192.0.2.7"]);
}

#[tokio::test]
async fn serve_stale_answers_when_the_upstream_fails() {
    let mock = Mock::start(SHORT).await;
    let proxy = Proxy::start(&[mock.addr], stale_on).await;
    let q = Q::new("one.example.", A);
    proxy.udp(&q).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mock.set("one.example.", Behavior::Servfail);
    let r = proxy.udp(&q).await;
    assert_eq!(r.rcode(), 0);
    assert_eq!(r.answer, vec!["one.example. 30 A 192.0.2.7"]);
}

#[tokio::test]
async fn without_serve_stale_an_expired_entry_is_never_served() {
    let mock = Mock::start(SHORT).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let q = Q::new("one.example.", A);
    proxy.udp(&q).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mock.set("one.example.", Behavior::Servfail);
    assert_eq!(proxy.udp(&q).await.rcode(), 2);
}

#[tokio::test]
async fn a_failing_refresh_does_not_evict_the_stale_answer() {
    let mock = Mock::start(SHORT).await;
    let proxy = Proxy::start(&[mock.addr], stale_on).await;
    let q = Q::new("one.example.", A);
    proxy.udp(&q).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    mock.set("one.example.", Behavior::Servfail);
    for _ in 0..3 {
        let r = proxy.udp(&q).await;
        assert_eq!(r.answer, vec!["one.example. 30 A 192.0.2.7"]);
    }
}

#[tokio::test]
async fn unshareable_queries_count_against_the_inflight_limit() {
    let mock = Mock::start(ZONE).await;
    mock.set_default(Behavior::Drop);
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.max_inflight = 1;
        c.timeout = Duration::from_secs(1);
    })
    .await;
    let ecs = |n: &str| {
        Q::new(n, A)
            .edns(1232, false)
            .option(8, &[0, 1, 24, 0, 192, 0, 2])
    };
    let addr = proxy.addr;
    let first = tokio::spawn(async move { udp_query(addr, &ecs("www.example.").wire()).await });
    for _ in 0..100 {
        if mock.total() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let r = proxy.udp(&ecs("short.example.")).await;
    assert_eq!(r.rcode(), 2);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(mock.total(), 1, "the second ECS query never went upstream");
    first.abort();
}
