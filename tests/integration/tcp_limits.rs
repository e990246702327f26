//! TCP abuse (R12, R13, R15): connection caps, trickling and idle clients, UDP unaffected.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const ZONE: &str = "www.example. 300 IN A 192.0.2.1";

/// True when the server closed the connection (EOF or reset) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn connections_per_client_are_capped_and_udp_keeps_answering() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.tcp_per_client = 16;
        c.limits.tcp_connections = 256;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        tcp_send(&mut s, &Q::new("www.example.", A).wire()).await;
        assert_eq!(R::parse(&tcp_recv(&mut s).await).answer.len(), 1);
        held.push(s);
    }
    // The 17th from the same address is closed at once.
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    // UDP is unaffected at the cap.
    assert_eq!(proxy.udp(&Q::new("www.example.", A)).await.answer.len(), 1);
    // A slot frees when a connection closes.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(proxy.addr).await.unwrap();
    tcp_send(&mut again, &Q::new("www.example.", A).wire()).await;
    assert_eq!(R::parse(&tcp_recv(&mut again).await).answer.len(), 1);
}

#[tokio::test]
async fn total_connections_are_capped() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.tcp_per_client = 100;
        c.limits.tcp_connections = 8;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        tcp_send(&mut s, &Q::new("www.example.", A).wire()).await;
        tcp_recv(&mut s).await;
        held.push(s);
    }
    let mut extra = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn a_trickling_client_is_cut_off_by_the_message_deadline() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.tcp_message_timeout = Duration::from_millis(500);
        c.limits.tcp_idle_timeout = Duration::from_secs(10);
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let q = Q::new("www.example.", A).wire();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let started = Instant::now();
    // One byte every 200 ms: the message would take seconds; the server closes at ~0.5 s.
    let mut closed_at = None;
    for b in framed {
        if s.write_all(&[b]).await.is_err() {
            closed_at = Some(started.elapsed());
            break;
        }
        if closed_within(&mut s, Duration::from_millis(200)).await {
            closed_at = Some(started.elapsed());
            break;
        }
    }
    let at = closed_at.expect("the server closed the connection");
    assert!(at < Duration::from_secs(3), "closed after {at:?}");
    assert!(
        at >= Duration::from_millis(400),
        "not before the deadline: {at:?}"
    );
}

#[tokio::test]
async fn a_client_outside_the_acl_gets_one_refused_and_no_more_time() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.allow = vec!["10.0.0.0/8".parse().unwrap()];
        c.limits.tcp_idle_timeout = Duration::from_secs(10);
        c.limits.tcp_message_timeout = Duration::from_secs(1);
    })
    .await;
    // Its query is answered REFUSED (R1), then the connection closes, long before the idle
    // timeout would have closed it; the second query in the same write gets no answer.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let q = Q::new("www.example.", A).wire();
    let mut two = (q.len() as u16).to_be_bytes().to_vec();
    two.extend_from_slice(&q);
    two.extend_from_within(..);
    s.write_all(&two).await.unwrap();
    assert_eq!(R::parse(&tcp_recv(&mut s).await).rcode(), 5);
    let mut b = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
    assert!(matches!(end, Ok(Ok(0))), "{end:?}");
    // For a while after that, what the client still sends is read and dropped: a socket
    // closed with unread input answers with a reset, which on a slower path could destroy
    // the REFUSED before the client read it. Here a reset would fail the second write.
    s.write_all(&two).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let more = s.write_all(&two).await;
    assert!(more.is_ok(), "reset: {more:?}");
    // One that sends nothing is closed after the message timeout, not the idle timeout.
    let started = Instant::now();
    let mut quiet = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed_within(&mut quiet, Duration::from_secs(3)).await);
    let at = started.elapsed();
    assert!(at >= Duration::from_millis(900), "closed after {at:?}");
    assert_eq!(mock.total(), 0);
}

#[tokio::test]
async fn clients_outside_the_acl_do_not_take_the_slots_of_those_inside() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.allow = vec!["127.0.0.1/32".parse().unwrap()];
        c.limits.tcp_connections = 2;
        c.limits.tcp_per_client = 3;
        c.limits.tcp_message_timeout = Duration::from_secs(5);
    })
    .await;
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind((ip, 0).into()).unwrap();
            sock.connect(proxy.addr).await.unwrap()
        }
    };
    // Two silent connections from outside (127.0.0.2) fill the slots clients outside the
    // ACL share (tcp_per_client, at most tcp_connections); a third from outside is closed at
    // once, though its address is under the per-client cap.
    let mut held = vec![from("127.0.0.2").await, from("127.0.0.2").await];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = from("127.0.0.2").await;
    assert!(closed_within(&mut third, Duration::from_secs(2)).await);
    // Clients inside the ACL still have both of theirs.
    for _ in 0..2 {
        let mut s = from("127.0.0.1").await;
        tcp_send(&mut s, &Q::new("www.example.", A).wire()).await;
        assert_eq!(R::parse(&tcp_recv(&mut s).await).answer.len(), 1);
        held.push(s);
    }
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let mock = Mock::start(ZONE).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.tcp_idle_timeout = Duration::from_millis(300)
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    tcp_send(&mut s, &Q::new("www.example.", A).wire()).await;
    assert_eq!(R::parse(&tcp_recv(&mut s).await).answer.len(), 1);
    assert!(closed_within(&mut s, Duration::from_secs(2)).await);
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_after_the_write_timeout() {
    let mut z = String::from(ZONE);
    for i in 1..=40 {
        z.push_str(&format!("\nbig.example. 300 IN A 10.9.0.{i}"));
    }
    let mock = Mock::start(&z).await;
    let proxy = Proxy::start(&[mock.addr], |c| {
        c.limits.tcp_write_timeout = Duration::from_millis(300)
    })
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // Warm the cache, then send queries without ever reading the ~1 KB answers.
    tcp_send(&mut s, &Q::new("big.example.", A).wire()).await;
    let q = Q::new("big.example.", A).wire();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let batch: Vec<u8> = framed
        .iter()
        .copied()
        .cycle()
        .take(framed.len() * 1000)
        .collect();
    let started = Instant::now();
    let mut write_failed = false;
    while started.elapsed() < Duration::from_secs(10) {
        match tokio::time::timeout(Duration::from_secs(1), s.write_all(&batch)).await {
            Ok(Ok(())) => {}
            // Our writes stall (the server stopped reading) or fail (it closed): either way
            // the server gave up on us.
            _ => {
                write_failed = true;
                break;
            }
        }
    }
    assert!(
        write_failed,
        "the server kept reading from a client that never reads"
    );
    // Back-pressure alone would also stall us; the write timeout must close the connection.
    // Without it, draining would go on as long as we read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut buf = vec![0u8; 65536];
    let mut closed = false;
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(5) {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(_)) => {}
            Err(_) => break,
        }
    }
    assert!(closed, "connection still open after the write timeout");
    // And it is still serving others.
    assert_eq!(proxy.udp(&Q::new("www.example.", A)).await.answer.len(), 1);
    assert_eq!(proxy.tcp(&Q::new("www.example.", A)).await.answer.len(), 1);
}
