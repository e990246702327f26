//! Micro-benchmarks of the query path: parse, warm (cache hit), flatten, and cold (a miss
//! that goes to an in-process upstream over loopback UDP).
//!
//! `cargo bench --bench hotpath`. Compare figures within one run only: the machine is shared.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use tokio::time::Instant;

use flatdns::cache::Key;
use flatdns::config::Config;
use flatdns::flatten::{self, Chain, Step};
use flatdns::handler::{Fast, Handler, Transport};
use flatdns::wire::Query;

fn name(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for l in text.split('.').filter(|l| !l.is_empty()) {
        out.push(l.len() as u8);
        out.extend_from_slice(l.as_bytes());
    }
    out.push(0);
    out
}

/// A query as dig sends it: RD, EDNS 1232 with a cookie.
fn query(qname: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0, 0, 1];
    q.extend(name(qname));
    q.extend_from_slice(&[0, 1, 0, 1]);
    q.extend_from_slice(&[
        0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 12, 0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8,
    ]);
    q
}

/// `qname` CNAME target.example. plus `n` A records at the target, and an OPT.
fn chain_reply(q: &[u8], n: usize) -> Vec<u8> {
    let qlen = q.len() - 23;
    let mut m = q[..qlen].to_vec();
    m[2] = 0x85;
    m[3] = 0x80;
    m[6..8].copy_from_slice(&((n + 1) as u16).to_be_bytes());
    let target = name("target.example.");
    m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 1, 44]);
    m.extend_from_slice(&(target.len() as u16).to_be_bytes());
    let target_at = m.len();
    m.extend_from_slice(&target);
    for i in 0..n {
        m.extend_from_slice(&[
            0xc0 | (target_at >> 8) as u8,
            target_at as u8,
            0,
            1,
            0,
            1,
            0,
            0,
            0,
            60,
            0,
            4,
        ]);
        m.extend_from_slice(&[198, 51, (i >> 8) as u8, i as u8]);
    }
    m.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    m
}

/// R22's hostile case: `qname` CNAME to a 255-octet name (127 one-letter labels), then as
/// many A records at that name as fit in 64 KiB, each owned by a compression pointer to the
/// owner before it. The pointers chain back as far as a name may (255 pointers): every owner
/// takes 255 pointer hops and 127 labels to read, where a friendly reply takes one hop.
fn pointer_chain_reply(q: &[u8]) -> Vec<u8> {
    let qlen = q.len() - 23;
    let mut m = q[..qlen].to_vec();
    m[2] = 0x85;
    m[3] = 0x80;
    let target: Vec<u8> = std::iter::repeat_n([1, b'a'], 127)
        .flatten()
        .chain([0])
        .collect();
    m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 1, 44]);
    m.extend_from_slice(&(target.len() as u16).to_be_bytes());
    // Owners by how many pointers it takes to read them: the target itself, none.
    let mut owners = vec![m.len()];
    m.extend_from_slice(&target);
    let mut n = 0u16;
    while m.len() + 16 + 11 <= 65_535 {
        // Through the owner with 254 pointers at most, so this one has 255 at most.
        let to = owners[owners.len().min(255) - 1];
        owners.push(m.len());
        m.extend_from_slice(&[
            0xc0 | (to >> 8) as u8,
            to as u8,
            0,
            1,
            0,
            1,
            0,
            0,
            0,
            60,
            0,
            4,
        ]);
        m.extend_from_slice(&[198, 51, (n >> 8) as u8, n as u8]);
        n += 1;
    }
    m[6..8].copy_from_slice(&(n + 1).to_be_bytes());
    m.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
    m
}

fn handler(upstream: SocketAddr, cache: u64) -> Handler {
    let mut c = Config::for_test("127.0.0.1:0".parse().unwrap(), vec![upstream]);
    c.cache.size = cache;
    Handler::new(c)
}

fn benches(c: &mut Criterion) {
    let q = query("www.example.");
    c.bench_function("parse query", |b| {
        b.iter(|| Query::parse(std::hint::black_box(&q)).unwrap().qtype)
    });

    // Warm: a cached answer served by the synchronous hit path.
    let h = handler("127.0.0.1:9".parse().unwrap(), 1000);
    let reply = chain_reply(&q, 2);
    let parsed = Query::parse(&q).unwrap();
    let key = Key::for_query(&parsed).unwrap();
    let entry = h.cache().entry_for(&reply, Instant::now(), None).unwrap();
    h.cache().insert(key.as_bytes(), Arc::new(entry));
    let client: SocketAddr = "127.0.0.1:5353".parse().unwrap();
    let mut out = Vec::with_capacity(4096);
    c.bench_function("warm: cache hit", |b| {
        b.iter(|| {
            assert_eq!(
                h.answer_fast(&q, client, Transport::Udp, &mut out),
                Fast::Reply
            )
        })
    });

    // Flatten: walk and build, no I/O.
    let start = name("www.example.");
    let flat = |reply: &[u8]| {
        let mut chain = Chain::new(&start, 11);
        match flatten::follow(reply, &start, 1, &mut chain) {
            Step::Done(rrs) => flatten::build(reply, parsed.question(), &rrs, 60)
                .unwrap()
                .len(),
            other => panic!("{other:?}"),
        }
    };
    c.bench_function("flatten: 2 addresses", |b| b.iter(|| flat(&reply)));
    // As the e2e harness's flattened misses: a longer name, one address.
    let long_q = query("r1234567.fmiss.bench.test.");
    let long_start = name("r1234567.fmiss.bench.test.");
    let long = chain_reply(&long_q, 1);
    let long_parsed = Query::parse(&long_q).unwrap();
    c.bench_function("flatten: 1 address, 4 labels", |b| {
        b.iter(|| {
            let mut chain = Chain::new(&long_start, 11);
            match flatten::follow(&long, &long_start, 1, &mut chain) {
                Step::Done(rrs) => flatten::build(&long, long_parsed.question(), &rrs, 60)
                    .unwrap()
                    .len(),
                other => panic!("{other:?}"),
            }
        })
    });
    // R22: a worst-case 64 KiB message (4,000 address records).
    let big = chain_reply(&q, 4000);
    assert!(big.len() > 60_000);
    c.bench_function("flatten: 64 KiB reply", |b| b.iter(|| flat(&big)));
    // R22's hostile case, from the reply's check (R3, R20) to the flattened answer: every
    // name is read through a chain of 255 compression pointers.
    let hostile = pointer_chain_reply(&q);
    assert!(hostile.len() > 65_000 && hostile.len() <= 65_535);
    c.bench_function("flatten: 64 KiB reply of pointer chains, checked", |b| {
        b.iter(|| {
            assert!(flatdns::upstream::well_formed(&hostile));
            flat(&hostile)
        })
    });
    // The same with TXT records, a type the check leaves to `domain`: checked by `domain`,
    // then walked (the chain stops at the target, which holds no address).
    let mut txt = hostile.clone();
    let mut pos = 12 + 17 + 12 + 255;
    while pos + 16 + 11 <= txt.len() {
        txt[pos + 3] = 16; // TYPE TXT
        txt[pos + 12] = 3; // one 3-octet string
        pos += 16;
    }
    assert!(flatdns::upstream::valid::scan(&txt).is_none());
    c.bench_function(
        "flatten: 64 KiB TXT reply of pointer chains, checked",
        |b| {
            b.iter(|| {
                assert!(flatdns::upstream::well_formed(&txt));
                let mut chain = Chain::new(&start, 11);
                let step = flatten::follow(&txt, &start, 1, &mut chain);
                assert!(matches!(step, Step::Continue(_)), "{step:?}");
            })
        },
    );

    // Cold: every query a miss, answered by an upstream on loopback that replies at once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(async {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let reply = reply.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, src)) = s.recv_from(&mut buf).await {
                let mut r = reply.clone();
                r[..2].copy_from_slice(&buf[..2]);
                let _ = n;
                let _ = s.send_to(&r, src).await;
            }
        });
        addr
    });
    let cold = Arc::new(handler(upstream, 0));
    let msg = Bytes::from(q.clone());
    c.bench_function("cold: miss via loopback upstream, flattened", |b| {
        b.iter(|| {
            rt.block_on(async {
                cold.answer(msg.clone(), client, Transport::Udp)
                    .await
                    .unwrap()
                    .len()
            })
        })
    });
}

criterion_group!(group, benches);
criterion_main!(group);
