//! Fuzz target `query`: the bytes as a client query, through `wire::Query::parse` and
//! `Handler::answer_fast` (everything flatdns does before it needs the upstream).
//!
//! Invariants (R1, R5, R16, R17, R20): a parsed query's question lies inside the input, is
//! an uncompressed name of at most 255 octets, and its UDP limit is in 512..=1232; only a
//! headerless or QR=1 message is dropped; every reply is a well-formed message with QR set and
//! the client's ID; outside the ACL it is REFUSED; other opcodes get NOTIMP or REFUSED without
//! a question; a malformed query gets FORMERR; a question, when echoed, is the client's exact
//! bytes; an OPT is present exactly when the query had one; over UDP a reply never exceeds the
//! client's limit. The cache is seeded with answers for `www.example.` (small) and
//! `big.example.` (100 A records) under every flag combination, so cache hits, TTL ageing and
//! truncation are reached.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use flatdns::cache::{keyflag, Entry, Key};
use flatdns::config::Config;
use flatdns::handler::{Fast, Handler, Transport};
use flatdns::wire::{self, Header, Query, QueryError, HEADER_LEN};
use libfuzzer_sys::fuzz_target;
use tokio::time::Instant;

const ALLOWED: &str = "127.0.0.1:5300";
const OUTSIDE: &str = "192.0.2.7:5300";

fn reply_for(name: &[u8], addrs: usize, edns: Option<u16>) -> Vec<u8> {
    let mut m = vec![0, 0, 0x81, 0x80, 0, 1];
    m.extend_from_slice(&(addrs as u16).to_be_bytes());
    m.extend_from_slice(&[0, 0, 0, u8::from(edns.is_some())]);
    m.extend_from_slice(name);
    m.extend_from_slice(&[0, 1, 0, 1]);
    for i in 0..addrs {
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 1, 0x51, 0x80, 0, 4, 192, 0, 2]);
        m.push(i as u8);
    }
    if let Some(flags) = edns {
        m.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0]);
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&[0, 0]);
    }
    m
}

fn handler() -> &'static Handler {
    static H: OnceLock<Handler> = OnceLock::new();
    H.get_or_init(|| {
        let cfg = Config::for_test(
            "127.0.0.1:0".parse().unwrap(),
            vec!["127.0.0.1:9".parse().unwrap()],
        );
        let h = Handler::new(cfg);
        for (name, addrs) in [
            (&b"\x03www\x07example\x00"[..], 2),
            (&b"\x03big\x07example\x00"[..], 100),
        ] {
            for flags in 0u8..16 {
                let edns = (flags & keyflag::EDNS != 0).then_some(if flags & keyflag::DO != 0 {
                    0x8000
                } else {
                    0
                });
                let reply = reply_for(name, addrs, edns);
                let entry: Entry = h.cache().entry_for(&reply, Instant::now(), None).unwrap();
                let key = Key::new(flags, wire::TYPE_A, wire::CLASS_IN, name).unwrap();
                h.cache().insert(key.as_bytes(), std::sync::Arc::new(entry));
            }
        }
        h
    })
}

/// Whether `name` is an uncompressed wire name of at most 255 octets: labels of at most 63
/// octets, ending with the root label exactly at its end (RFC 1035 sections 2.3.4, 4.1.2).
fn is_plain_name(name: &[u8]) -> bool {
    let mut pos = 0;
    while let Some(&len) = name.get(pos) {
        if len == 0 {
            return pos + 1 == name.len() && name.len() <= wire::MAX_NAME_LEN;
        }
        if len > 63 {
            return false;
        }
        pos += 1 + usize::from(len);
    }
    false
}

fn opt_count(msg: &[u8]) -> usize {
    let mut n = 0;
    let _ = wire::walk_records(msg, |r| n += usize::from(r.rtype == wire::TYPE_OPT));
    n
}

fuzz_target!(|data: &[u8]| {
    let parsed = Query::parse(data);
    match &parsed {
        Ok(q) => {
            let base = data.as_ptr() as usize;
            let qs = q.question();
            assert_eq!(qs.as_ptr() as usize, base + HEADER_LEN);
            assert!(qs.len() >= 5 && HEADER_LEN + qs.len() <= data.len());
            assert_eq!(qs.len(), q.qname().len() + 4);
            assert!(
                is_plain_name(q.qname()),
                "accepted a question name that is compressed or too long: {:02x?}",
                q.qname()
            );
            assert_eq!(q.qtype, wire::u16_at(qs, qs.len() - 4).unwrap());
            assert_eq!(q.qclass, wire::u16_at(qs, qs.len() - 2).unwrap());
            assert!((512..=1232).contains(&q.udp_limit(1232)));
            assert!((512..=4096).contains(&q.udp_limit(4096)));
            assert_eq!(q.udp_limit(0), 512);
            assert!(!q.header.has(wire::FLAG_QR) && q.header.qdcount == 1);
            assert!(wire::walk_records(data, |_| {}).is_ok());
        }
        Err(QueryError::Drop) => assert!(data.len() < HEADER_LEN || data[2] & 0x80 != 0),
        Err(QueryError::FormErr { .. }) => assert!(data.len() >= HEADER_LEN),
    }

    let h = handler();
    let udp_cap = h.config().limits.udp_size;
    let mut out = Vec::new();
    for (client, transport) in [
        (ALLOWED, Transport::Udp),
        (ALLOWED, Transport::Tcp),
        (OUTSIDE, Transport::Udp),
    ] {
        let client: SocketAddr = client.parse().unwrap();
        let allowed = client.ip().is_loopback();
        match h.answer_fast(data, client, transport, &mut out) {
            f @ (Fast::Reply | Fast::Refused) => {
                assert_eq!(
                    f == Fast::Refused,
                    !allowed,
                    "Refused exactly outside the ACL"
                );
                let r = Header::read(&out).expect("reply shorter than a header");
                assert!(r.has(wire::FLAG_QR), "reply without QR");
                assert_eq!(&out[..2], &data[..2], "reply with another ID");
                assert!(r.qdcount <= 1);
                assert!(
                    wire::walk_records(&out, |_| {}).is_ok(),
                    "reply does not scan"
                );
                assert!(out.len() <= 65_535);
                let opcode = (data[2] >> 3) & 0x0f;
                if !allowed {
                    // R1: outside the ACL everything with a header is refused, nothing more.
                    assert_eq!(r.rcode(), wire::RCODE_REFUSED, "outside the ACL");
                    assert_eq!((r.ancount, r.nscount), (0, 0));
                } else if opcode != wire::OPCODE_QUERY {
                    // Unknown opcodes NOTIMP, NOTIFY/UPDATE refused; no question echoed.
                    assert!(matches!(
                        r.rcode(),
                        wire::RCODE_NOTIMP | wire::RCODE_REFUSED
                    ));
                    assert_eq!((r.qdcount, r.ancount, r.nscount), (0, 0, 0));
                } else {
                    match &parsed {
                        Err(QueryError::FormErr { .. }) => {
                            assert_eq!(r.rcode(), wire::RCODE_FORMERR);
                            assert_eq!((r.ancount, r.nscount), (0, 0));
                        }
                        Err(QueryError::Drop) => panic!("reply to a message that must be dropped"),
                        Ok(_) => {}
                    }
                }
                if let Ok(q) = &parsed {
                    if r.qdcount == 1 {
                        assert_eq!(
                            &out[HEADER_LEN..HEADER_LEN + q.question().len()],
                            q.question(),
                            "question not echoed byte for byte"
                        );
                    }
                    assert_eq!(r.opcode(), q.header.opcode());
                    if opcode == wire::OPCODE_QUERY {
                        assert_eq!(
                            opt_count(&out),
                            usize::from(q.edns.is_some()),
                            "OPT in the reply iff in the query"
                        );
                    }
                    if transport == Transport::Udp {
                        assert!(
                            out.len() <= q.udp_limit(udp_cap),
                            "UDP reply of {} over the client's limit {}",
                            out.len(),
                            q.udp_limit(udp_cap)
                        );
                    }
                }
            }
            Fast::Drop => assert_eq!(parsed.as_ref().err(), Some(&QueryError::Drop)),
            Fast::Miss => {
                assert!(
                    parsed.is_ok() && allowed && data[2] & 0x78 == 0,
                    "miss for a query that needs no upstream"
                );
            }
        }
    }
});
