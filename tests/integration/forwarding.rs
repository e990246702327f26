//! Issue 2: transparent forwarding over UDP and TCP, failover, TC fallback, bad input, ACL.

use std::time::{Duration, Instant};

use tokio::net::{TcpStream, UdpSocket};

use crate::harness::*;

const ZONE: &str = "
example. 3600 IN SOA ns.example. host.example. 1 3600 600 86400 300
www.example. 300 IN A 192.0.2.1
www.example. 300 IN AAAA 2001:db8::1
mail.example. 300 IN MX 10 mx.example.
txt.example. 300 IN TXT \"hello\"
slow.example. 300 IN A 192.0.2.2
fast.example. 300 IN A 192.0.2.3
unknown.example. 300 IN TYPE65400 \\# 3 abcdef
";

fn big_zone() -> String {
    let mut z = ZONE.to_string();
    for i in 1..=40 {
        z.push_str(&format!("big.example. 300 IN A 10.0.0.{i}\n"));
    }
    z
}

#[tokio::test]
async fn udp_and_tcp_replies_equal_upstream_but_for_id() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let shapes = [
        Q::new("www.example.", A),
        Q::new("www.example.", AAAA).edns(1232, false),
        Q::new("mail.example.", MX).edns(4096, true),
        Q::new("txt.example.", TXT).cd(),
        Q::new("nope.example.", A).edns(1232, false),
        Q::new("www.example.", TXT),
        Q::new("unknown.example.", 65400),
        Q::new("www.example.", A)
            .edns(1232, false)
            .option(65001, b"xyz"),
    ];
    for (i, q) in shapes.iter().enumerate() {
        let q = q.clone().id(1000 + i as u16);
        let direct = mock.direct(&q, false).await;
        let via = proxy.udp(&q).await;
        assert_eq!(via.id, q.id, "client ID restored");
        assert_eq!(via.body(), direct.body(), "udp shape {i}: {q:?}");
        let via_tcp = proxy.tcp(&q.clone().id(2000 + i as u16)).await;
        assert_eq!(via_tcp.body(), direct.body(), "tcp shape {i}");
    }
}

#[tokio::test]
async fn question_case_is_echoed_exactly() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let r = proxy.udp(&Q::new("wWw.ExAmPlE.", A)).await;
    assert_eq!(&r.wire[12..12 + 13], &name("wWw.ExAmPlE.")[..]);
    // Now from the cache, asked in another case.
    let r = proxy.udp(&Q::new("WWW.example.", A)).await;
    assert_eq!(&r.wire[12..12 + 13], &name("WWW.example.")[..]);
    // Passed through: the answer's owner is as the upstream wrote it (uncompressed here).
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    assert_eq!(mock.count("www.example.", A), 1);
}

#[tokio::test]
async fn tcp_pipelined_queries_are_answered_out_of_order() {
    let mock = Mock::start(ZONE).await;
    mock.set("slow.example.", Behavior::Delay(Duration::from_millis(150)));
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    tcp_send(&mut s, &Q::new("slow.example.", A).id(1).wire()).await;
    tcp_send(&mut s, &Q::new("fast.example.", A).id(2).wire()).await;
    let first = R::parse(&tcp_recv(&mut s).await);
    let second = R::parse(&tcp_recv(&mut s).await);
    assert_eq!(
        (first.id, second.id),
        (2, 1),
        "the fast answer overtakes the slow one"
    );
    assert_eq!(second.answer_no_ttl(), vec!["slow.example. A 192.0.2.2"]);
}

#[tokio::test]
async fn tcp_pipeline_of_100_distinct_queries() {
    let mut z = ZONE.to_string();
    for i in 0..100 {
        z.push_str(&format!("n{i}.example. 300 IN A 10.1.0.{}\n", i + 1));
    }
    let mock = Mock::start(&z).await;
    mock.set_default(Behavior::Delay(Duration::from_millis(200)));
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    for i in 0..100u16 {
        tcp_send(&mut s, &Q::new(&format!("n{i}.example."), A).id(i).wire()).await;
    }
    let mut seen = [false; 100];
    for _ in 0..100 {
        let r = R::parse(&tcp_recv(&mut s).await);
        assert_eq!(
            r.answer_no_ttl(),
            vec![format!("n{}.example. A 10.1.0.{}", r.id, r.id + 1)]
        );
        seen[r.id as usize] = true;
    }
    assert!(seen.iter().all(|&b| b));
    assert_eq!(mock.total(), 100);
    // Concurrently in flight (R14): one after another they would take 100 x 200 ms = 20 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn failover_to_the_next_upstream_on_timeout() {
    let dead = Mock::start(ZONE).await;
    dead.set_default(Behavior::Drop);
    let live = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[dead.addr, live.addr], |_| {}).await;
    let r = proxy.udp(&Q::new("www.example.", A)).await;
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    assert_eq!((dead.total(), live.total()), (1, 1));
}

/// The listener's reply thread waits up to 100 ms at a time when no miss is due; a miss due
/// sooner (a short attempt timeout) wakes it, so the timeout fires on time and not when the
/// thread next looks (~100 ms for every query after the first below, before it did).
#[tokio::test]
async fn a_short_attempt_timeout_fires_on_time_on_the_reply_thread() {
    let dead = Mock::start(ZONE).await;
    dead.set_default(Behavior::Drop);
    let live = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[dead.addr, live.addr], |c| {
        c.timeout = Duration::from_millis(10);
        // One socket, one reply thread: every query below meets the same thread's wait.
        c.limits.udp_workers = 1;
    })
    .await;
    // Misses go to the reply thread once it runs (until then, to tasks): a pause gives it
    // time to start, and the first miss, the thread's first wait to fall into.
    proxy.udp(&Q::new("www.example.", A)).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let start = Instant::now();
        let r = proxy.udp(&Q::new(&format!("n{i}.example."), A)).await;
        slowest = slowest.max(start.elapsed());
        assert_eq!(r.rcode(), 3, "the second upstream's NXDOMAIN");
    }
    assert_eq!(
        (dead.total(), live.total()),
        (6, 6),
        "each query tried both"
    );
    assert!(
        slowest < Duration::from_millis(75),
        "a 10 ms attempt timeout took {slowest:?}"
    );
}

#[tokio::test]
async fn all_upstreams_failing_gives_servfail_after_two_attempts() {
    let a = Mock::start(ZONE).await;
    let b = Mock::start(ZONE).await;
    a.set_default(Behavior::Drop);
    b.set_default(Behavior::Drop);
    let proxy = Proxy::start(&[a.addr, b.addr], |_| {}).await;
    let start = Instant::now();
    let r = proxy
        .udp(&Q::new("www.example.", A).edns(1232, false))
        .await;
    assert_eq!(r.rcode(), 2);
    assert!(r.opt.is_some(), "EDNS query gets an OPT in our SERVFAIL");
    assert_eq!(
        (a.total(), b.total()),
        (1, 1),
        "at most two upstream attempts (R8)"
    );
    // Two attempts of 300 ms each, inside the 1.5 s client deadline of the test config.
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    // The failure is cached briefly: the next query does not go upstream (R8).
    let r = proxy
        .udp(&Q::new("www.example.", A).edns(1232, false))
        .await;
    assert_eq!(r.rcode(), 2);
    assert_eq!(a.total() + b.total(), 2);
}

#[tokio::test]
async fn servfail_or_refused_from_one_upstream_tries_the_other() {
    for b in [Behavior::Servfail, Behavior::Refused] {
        let bad = Mock::start(ZONE).await;
        bad.set_default(b.clone());
        let good = Mock::start(ZONE).await;
        let proxy = Proxy::start(&[bad.addr, good.addr], |_| {}).await;
        let r = proxy.udp(&Q::new("www.example.", A)).await;
        assert_eq!(r.rcode(), 0, "{b:?}");
        assert_eq!(r.answer.len(), 1);
        // With only the failing upstream, its reply is passed on.
        let proxy = Proxy::start(&[bad.addr], |_| {}).await;
        let expected = if b == Behavior::Servfail { 2 } else { 5 };
        assert_eq!(
            proxy.udp(&Q::new("www.example.", AAAA)).await.rcode(),
            expected
        );
    }
}

#[tokio::test]
async fn truncated_upstream_reply_is_retried_over_tcp() {
    let mock = Mock::start(ZONE).await;
    mock.set("www.example.", Behavior::TruncateUdp);
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let r = proxy
        .udp(&Q::new("www.example.", A).edns(1232, false))
        .await;
    assert!(!r.tc());
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    let log = mock.log();
    assert_eq!(
        log.iter().map(|l| l.tcp).collect::<Vec<_>>(),
        vec![false, true]
    );
}

#[tokio::test]
async fn tcp_client_queries_go_upstream_over_tcp() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    proxy.tcp(&Q::new("www.example.", A)).await;
    assert!(mock.log()[0].tcp);
}

#[tokio::test]
async fn udp_reply_too_big_for_the_client_gets_tc_with_question_only() {
    let mock = Mock::start(&big_zone()).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    // 40 uncompressed A records: ~1.1 KB. No EDNS -> 512 limit.
    let r = proxy.udp(&Q::new("big.example.", A)).await;
    assert!(r.tc());
    assert!(r.answer.is_empty() && r.opt.is_none());
    assert_eq!(r.question, "big.example. A");
    // EDNS 4096 -> capped at 1232: fits.
    let r = proxy
        .udp(&Q::new("big.example.", A).edns(4096, false))
        .await;
    assert!(!r.tc());
    assert_eq!(r.answer.len(), 40);
    assert!(r.wire.len() <= 1232);
    // TCP gets it whole.
    assert_eq!(proxy.tcp(&Q::new("big.example.", A)).await.answer.len(), 40);
}

#[tokio::test]
async fn bad_queries_get_formerr_or_are_dropped_and_serving_goes_on() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut buf = vec![0u8; 2048];
    let wait = Duration::from_millis(300);
    // Shorter than a header: dropped.
    s.send_to(&[1, 2, 3, 4, 5], proxy.addr).await.unwrap();
    assert!(tokio::time::timeout(wait, s.recv_from(&mut buf))
        .await
        .is_err());
    // QR=1: dropped (no reflection loops).
    let mut resp = Q::new("www.example.", A).wire();
    resp[2] |= 0x80;
    s.send_to(&resp, proxy.addr).await.unwrap();
    assert!(tokio::time::timeout(wait, s.recv_from(&mut buf))
        .await
        .is_err());
    // QDCOUNT 2: FORMERR without a question.
    let mut two = Q::new("www.example.", A).id(77).wire();
    two[5] = 2;
    let r = R::parse(&udp_exchange(proxy.addr, &two, wait).await.unwrap());
    assert_eq!((r.id, r.rcode(), r.question.as_str()), (77, 1, ""));
    // Label over 63, pointer loop, counts beyond the data: FORMERR.
    let mut long = vec![0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
    long.extend_from_slice(&[b'a'; 64]);
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    let looped = vec![0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1];
    let mut counts = Q::new("www.example.", A).id(9).wire();
    counts[7] = 3;
    for bad in [long, looped, counts] {
        let r = R::parse(&udp_exchange(proxy.addr, &bad, wait).await.unwrap());
        assert_eq!(r.rcode(), 1, "{bad:?}");
    }
    // Random garbage with a header-sized prefix.
    for i in 0..50u8 {
        let junk: Vec<u8> = (0..(12 + i as usize * 7))
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i))
            .collect();
        s.send_to(&junk, proxy.addr).await.unwrap();
    }
    // Still serving.
    let r = proxy.udp(&Q::new("www.example.", A)).await;
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    assert_eq!(
        mock.count("www.example.", A),
        1,
        "no garbage reached the upstream as a query for www"
    );
}

#[tokio::test]
async fn clients_outside_the_acl_are_refused_without_upstream_traffic() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.allow = vec!["10.0.0.0/8".parse().unwrap()]
    })
    .await;
    let r = proxy
        .udp(&Q::new("www.example.", A).edns(1232, false))
        .await;
    assert_eq!(r.rcode(), 5);
    assert_eq!(r.question, "www.example. A");
    let r = proxy.tcp(&Q::new("www.example.", A)).await;
    assert_eq!(r.rcode(), 5);
    assert_eq!(mock.total(), 0);
}

#[tokio::test]
async fn forged_replies_are_ignored() {
    let mock = Mock::start(ZONE).await;
    mock.set("www.example.", Behavior::Spoof);
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let r = proxy.udp(&Q::new("www.example.", A)).await;
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
}

#[tokio::test]
async fn a_reply_carrying_the_client_s_own_id_is_not_taken_for_the_answer() {
    // The ID checked is the fresh one sent upstream (R2, R3), not the one the client chose.
    let mock = Mock::start(ZONE).await;
    mock.set("www.example.", Behavior::ForgeId(0x4242));
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    // Misses go to the listener's reply thread once it runs (until then, to tasks, whose
    // check is the same but separate): a first miss and a pause give it time to start.
    proxy.udp(&Q::new("other.example.", A)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = proxy.udp(&Q::new("www.example.", A).id(0x4242)).await;
    assert_eq!(r.id, 0x4242);
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_misses_use_random_ids_and_at_least_7500_source_ports() {
    // R2 / RFC 5452: every miss a fresh random ID and a fresh random source port. Names
    // outside the zone: each one NXDOMAIN, so each one a miss.
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let addr = proxy.addr;
    for batch in 0..100 {
        let mut tasks = Vec::new();
        for i in 0..100 {
            let q = Q::new(&format!("m{batch}-{i}.example."), A).id(7);
            tasks.push(tokio::spawn(async move {
                udp_query(addr, &q.wire()).await.rcode()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 3);
        }
    }
    let log = mock.log();
    assert_eq!(log.len(), 10_000);
    let ports: std::collections::HashSet<u16> = log.iter().map(|l| l.src.port()).collect();
    let ids: std::collections::HashSet<u16> = log.iter().map(|l| l.id).collect();
    eprintln!(
        "10,000 misses: {} distinct source ports, {} distinct IDs",
        ports.len(),
        ids.len()
    );
    // Random draws from ~28,000 ephemeral ports give about 8,400 distinct; a port reused per
    // upstream or a sequential allocator pinned to a few would fall short.
    assert!(
        ports.len() >= 7_500,
        "distinct source ports {}",
        ports.len()
    );
    // 10,000 draws from 65,536 IDs give about 9,300 distinct; a copied client ID gives 1.
    assert!(ids.len() >= 9_000, "distinct ids {}", ids.len());
}

#[tokio::test]
async fn edns_version_other_than_zero_gets_badvers() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let mut q = Q::new("www.example.", A).edns(1232, false).wire();
    let n = q.len();
    q[n - 5] = 1; // version 1
    let r = R::parse(
        &udp_exchange(proxy.addr, &q, Duration::from_secs(2))
            .await
            .unwrap(),
    );
    let (_, ttl, _) = r.opt.unwrap();
    assert_eq!(
        (ttl >> 24, (ttl >> 16) & 0xff),
        (1, 0),
        "BADVERS, version 0"
    );
    assert_eq!(mock.total(), 0);
}

#[tokio::test]
async fn shutdown_answers_queries_in_flight() {
    let mock = Mock::start(ZONE).await;
    mock.set("slow.example.", Behavior::Delay(Duration::from_millis(600)));
    let mut proxy = Proxy::start(&[mock.addr], |c| c.timeout = Duration::from_secs(2)).await;
    let addr = proxy.addr;
    let pending = tokio::spawn(async move {
        udp_exchange(
            addr,
            &Q::new("slow.example.", A).wire(),
            Duration::from_secs(3),
        )
        .await
    });
    // Wait until the query is in flight upstream.
    for _ in 0..100 {
        if mock.total() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mock.total(), 1);
    proxy
        .running
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(3))
        .await;
    let reply = pending
        .await
        .unwrap()
        .expect("in-flight query answered during shutdown");
    assert_eq!(
        R::parse(&reply).answer_no_ttl(),
        vec!["slow.example. A 192.0.2.2"]
    );
    // And the listener is gone.
    assert!(udp_exchange(
        addr,
        &Q::new("www.example.", A).wire(),
        Duration::from_millis(300)
    )
    .await
    .is_none());
}

#[tokio::test]
async fn any_over_udp_gets_tc_and_no_upstream_query() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let r = proxy
        .udp(&Q::new("www.example.", ANY).edns(1232, false))
        .await;
    assert!(r.tc());
    assert_eq!(
        (r.answer.len(), r.question.as_str()),
        (0, "www.example. TYPE255")
    );
    assert!(r.opt.is_some());
    assert_eq!(mock.total(), 0);
    let r = proxy.tcp(&Q::new("www.example.", ANY)).await;
    assert_eq!(r.answer.len(), 2);
}

#[tokio::test]
async fn other_opcodes_are_answered_locally_without_upstream_traffic() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    // Unknown opcode: NOTIMP. UPDATE and NOTIFY: REFUSED (never relayed from our address).
    for (opcode, rcode) in [(15u8, 4u8), (5, 5), (4, 5)] {
        let mut q = Q::new("www.example.", A).id(31).edns(1232, false).wire();
        q[2] = (q[2] & 0x87) | (opcode << 3);
        let r = R::parse(
            &udp_exchange(proxy.addr, &q, Duration::from_secs(2))
                .await
                .unwrap(),
        );
        assert_eq!(
            (r.id, r.rcode(), ((r.flags >> 11) & 0xf) as u8),
            (31, rcode, opcode)
        );
        assert!(r.opt.is_some());
    }
    assert_eq!(mock.total(), 0);
}

#[tokio::test]
async fn upstream_tcp_connections_are_reused_and_closed_when_idle() {
    let mut z = ZONE.to_string();
    for i in 0..10 {
        z.push_str(&format!("t{i}.example. 300 IN A 10.6.0.1\n"));
    }
    let mock = Mock::start(&z).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.upstream_tcp_idle = Duration::from_millis(400)
    })
    .await;
    // Ten TCP misses, five of them at once: one upstream connection carries them all.
    let mut tasks = Vec::new();
    for i in 0..5 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            tcp_query(addr, &Q::new(&format!("t{i}.example."), A).wire()).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().answer.len(), 1);
    }
    for i in 5..10 {
        assert_eq!(
            proxy
                .tcp(&Q::new(&format!("t{i}.example."), A))
                .await
                .answer
                .len(),
            1
        );
    }
    let ports: std::collections::HashSet<u16> = mock
        .log()
        .iter()
        .filter(|l| l.tcp)
        .map(|l| l.src.port())
        .collect();
    assert_eq!(mock.log().iter().filter(|l| l.tcp).count(), 10);
    assert_eq!(ports.len(), 1, "one reused connection");
    // After the idle timeout the connection is gone (closed: the server sees EOF); the next
    // query opens a new one.
    assert_eq!(mock.tcp_closed(), 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(mock.tcp_closed(), 1, "the idle connection was closed");
    proxy.tcp(&Q::new("www.example.", AAAA)).await;
    let ports: std::collections::HashSet<u16> = mock
        .log()
        .iter()
        .filter(|l| l.tcp)
        .map(|l| l.src.port())
        .collect();
    assert_eq!(ports.len(), 2);
}

#[tokio::test]
async fn refused_upstream_tcp_backs_off() {
    // UDP only: TCP connects are refused.
    let mock = Mock::start_with(ZONE, false).await;
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    // Four refused connects, each after the previous back-off ran out: 100, 200, 400, 800 ms.
    // Distinct names: a repeat would be answered by the cached SERVFAIL.
    for (i, wait) in [150, 250, 450, 0].into_iter().enumerate() {
        assert_eq!(
            proxy
                .tcp(&Q::new(&format!("b{i}.example."), A))
                .await
                .rcode(),
            2
        );
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    // Something now listens on that TCP port and counts connects.
    let listener = tokio::net::TcpListener::bind(mock.addr).await.unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let acceptor = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    // Within the back-off (800 ms after the last refusal) no connect is tried.
    assert_eq!(proxy.tcp(&Q::new("www.example.", AAAA)).await.rcode(), 2);
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no connect while backing off"
    );
    // After it, connects resume.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let _ = proxy.tcp(&Q::new("www.example.", TXT)).await;
    assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    acceptor.abort();
}

#[tokio::test]
async fn malformed_upstream_replies_are_discarded_and_give_servfail() {
    let mock = Mock::start(ZONE).await;
    mock.set("www.example.", Behavior::Malformed);
    let proxy = Proxy::start(&[mock.addr], |_| {}).await;
    let r = proxy
        .udp(&Q::new("www.example.", A).edns(1232, false))
        .await;
    assert_eq!(r.rcode(), 2, "no well-formed reply came: SERVFAIL");
    assert!(r.answer.is_empty());
    // The proxy is unharmed and a good reply still counts.
    mock.set("www.example.", Behavior::Answer);
    assert_eq!(
        proxy.udp(&Q::new("www.example.", AAAA)).await.answer.len(),
        1
    );
}

#[tokio::test]
async fn a_64_kib_upstream_answer_is_flattened_over_tcp() {
    // R22: a ~54 KB answer (a CNAME and 2,000 uncompressed A records) through TCP.
    let mut z = String::from("www.example. 300 IN CNAME target.example.\n");
    for i in 0..2000 {
        z.push_str(&format!(
            "target.example. 300 IN A 10.{}.{}.1\n",
            i / 250,
            i % 250
        ));
    }
    let mock = Mock::start(&z).await;
    let proxy = Proxy::start(&[mock.addr], |c| c.timeout = Duration::from_secs(2)).await;
    let direct = mock.direct(&Q::new("www.example.", A), true).await;
    assert!(direct.wire.len() > 50_000);
    let r = proxy.tcp(&Q::new("www.example.", A)).await;
    assert_eq!(r.answer.len(), 2000);
    assert!(r
        .answer
        .iter()
        .all(|l| l.starts_with("www.example. 300 A 10.")));
    // Over UDP: TC=1, nothing cut silently.
    let r = proxy
        .udp(&Q::new("www.example.", A).edns(4096, false))
        .await;
    assert!(r.tc() && r.answer.is_empty());
}

/// Many UDP misses at once, each finished by the listener's reply thread (some after a
/// delay, some on a second attempt after a dropped first one): every client gets its own
/// answer, and afterwards nothing is left held (in-flight gauge, pending slots, coalescing).
#[tokio::test]
async fn many_concurrent_udp_misses_are_answered_and_nothing_stays_held() {
    let mut zone =
        String::from("many.test. 3600 IN SOA ns.many.test. h.many.test. 1 3600 600 86400 300\n");
    for i in 0..300 {
        zone.push_str(&format!(
            "n{i}.many.test. 300 IN A 10.0.{}.{}\n",
            i / 256,
            i % 256
        ));
    }
    let mock = Mock::start(&zone).await;
    for i in (0..300).step_by(7) {
        mock.set(
            &format!("n{i}.many.test."),
            Behavior::Delay(Duration::from_millis(150)),
        );
    }
    // A second upstream for the names the first drops: their first attempt times out.
    let second = Mock::start(&zone).await;
    for i in (3..300).step_by(50) {
        mock.set(&format!("n{i}.many.test."), Behavior::Drop);
    }
    let proxy = Proxy::start(&[mock.addr, second.addr], |c| {
        c.timeout = Duration::from_millis(300);
        c.attempts = 2;
        c.limits.pending_per_client = 1000;
    })
    .await;
    let addr = proxy.addr;
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            tokio::spawn(async move {
                let q = Q::new(&format!("n{i}.many.test."), A);
                let reply = udp_exchange(addr, &q.wire(), Duration::from_secs(3)).await;
                (i, reply)
            })
        })
        .collect();
    for t in tasks {
        let (i, reply) = t.await.unwrap();
        let reply = reply.unwrap_or_else(|| panic!("n{i}: no answer"));
        assert_eq!(
            R::parse(&reply).answer_no_ttl(),
            vec![format!("n{i}.many.test. A 10.0.{}.{}", i / 256, i % 256)],
            "n{i}"
        );
    }
    assert_eq!(
        second.total(),
        6,
        "only the dropped names went to the second upstream"
    );
    let h = proxy.running.as_ref().unwrap().handler().clone();
    assert_eq!(h.cache().entry_count(), 300);
    let text = h.metrics().render();
    let gauge = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    assert_eq!(gauge("flatdns_inflight"), 0.0);
    // Every pending slot and in-flight key was given back: the same names again are hits,
    // and new names for the same client are still taken on.
    for i in [0, 3, 7, 299] {
        let q = Q::new(&format!("n{i}.many.test."), A);
        assert_eq!(proxy.udp(&q).await.answer.len(), 1);
    }
    assert_eq!(mock.total() + second.total(), 300 + 6);
}
