//! Fuzz target `reply`: the bytes as an upstream's reply, through everything flatdns does with
//! one before flattening: `upstream::matches`, `Cache::lifetime` / `Cache::entry_for`
//! (`response::Prepared::new`), `Prepared::render` at several ages and size limits, and
//! `response::passthrough`.
//!
//! Invariants (R3, R5, R6, R16, R20, R24, F5): a matching reply has the query's ID, QR, one
//! question and scans; TC=1 is never cached; a cached lifetime is at most the TTL cap and no
//! positive answer outlives its smallest TTL; a prepared answer replays no COOKIE or ECS
//! option; a render echoes the client's ID and question, counts TTLs down without wrapping,
//! and never exceeds the limit (unless the limit is below the minimal truncated reply);
//! passthrough changes only the ID unless it must truncate.
#![no_main]

use flatdns::cache::{Cache, Kind};
use flatdns::config::Config;
use flatdns::response::{self, clamp_ttl, Prepared};
use flatdns::upstream::{self, matches};
use flatdns::wire::{self, Header, HEADER_LEN};
use flatdns_fuzz::{START, START_MIXED};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tokio::time::Instant;

/// `www.example.` A with EDNS (4096, no options), ID 0x1234, RD.
fn fixed_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    q.extend_from_slice(START);
    q.extend_from_slice(&[0, 1, 0, 1, 0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    q
}

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        Config::for_test(
            "127.0.0.1:0".parse().unwrap(),
            vec!["127.0.0.1:9".parse().unwrap()],
        )
    })
}

/// What [`scan`] returns.
type Scanned = (Vec<(wire::Section, u16, u32)>, Vec<u16>);

/// Every record's `(section, type, ttl)` and the codes of every complete option in any OPT
/// record, or `None` if the message does not scan.
fn scan(msg: &[u8]) -> Option<Scanned> {
    let mut recs = Vec::new();
    let mut codes = Vec::new();
    wire::walk_records(msg, |r| {
        recs.push((r.section, r.rtype, r.ttl(msg)));
        if r.rtype == wire::TYPE_OPT {
            // Leniently: a later option cut short must not hide an earlier COOKIE.
            let rd = &msg[r.rdata.clone()];
            let mut pos = 0;
            while let (Some(code), Some(len)) = (wire::u16_at(rd, pos), wire::u16_at(rd, pos + 2)) {
                pos += 4 + usize::from(len);
                if pos > rd.len() {
                    break;
                }
                codes.push(code);
            }
        }
    })
    .ok()?;
    Some((recs, codes))
}

/// The truncated form: TC and QR set, the question only, perhaps an OPT.
fn check_truncated(out: &[u8], id: u16, question: &[u8]) {
    let h = Header::read(out).unwrap();
    assert!(h.has(wire::FLAG_TC) && h.has(wire::FLAG_QR));
    assert_eq!((h.id, h.qdcount, h.ancount, h.nscount), (id, 1, 0, 0));
    assert!(h.arcount <= 1);
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + question.len()], question);
    assert!(out.len() == HEADER_LEN + question.len() + 11 * usize::from(h.arcount));
}

fn check_render(p: &Prepared, question_end: usize, question: &[u8]) {
    let prepared = scan(p.wire()).expect("a prepared answer does not scan");
    let mut out = Vec::new();
    let n = p.len();
    for limit in [0, 12, 100, 512, 1232, n.saturating_sub(1), n, 65_535] {
        for age in [0u32, 1, 300, u32::MAX] {
            let ok = p.render(0xbeef, question, age, limit, &mut out);
            assert_eq!(ok, HEADER_LEN + question.len() == question_end);
            if !ok {
                continue;
            }
            let min_truncated = HEADER_LEN + question.len() + 11;
            assert!(
                out.len() <= limit.max(min_truncated),
                "render of {} octets over the limit {limit}",
                out.len()
            );
            if n > limit {
                check_truncated(&out, 0xbeef, question);
                continue;
            }
            assert_eq!(out.len(), n);
            assert_eq!(&out[..2], &[0xbe, 0xef]);
            assert_eq!(&out[2..HEADER_LEN], &p.wire()[2..HEADER_LEN]);
            assert_eq!(&out[HEADER_LEN..question_end], question);
            let (recs, _) = scan(&out).expect("a rendered answer does not scan");
            assert_eq!(recs.len(), prepared.0.len());
            for (a, b) in recs.iter().zip(&prepared.0) {
                if a.1 == wire::TYPE_OPT {
                    assert_eq!(a, b);
                } else {
                    assert_eq!(a.2, b.2.saturating_sub(age), "TTL not counted down");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let cfg = config();
    let scanned = scan(data);
    let walked = wire::walk_records(data, |_| {});
    let h = Header::read(data);

    // R3: the fixed query, and a query made from the reply's own question (so the ID and
    // question match and the rest of the rule is exercised).
    let q = fixed_query();
    if matches(&q, data) {
        let h = h.unwrap();
        assert!(h.id == 0x1234 && h.has(wire::FLAG_QR) && h.qdcount == 1 && walked.is_ok());
        assert!(upstream::well_formed(data));
    }
    if let (Some(h), Ok(end)) = (h, wire::skip_name(data, HEADER_LEN)) {
        if end + 4 <= data.len() {
            let mut own = data[..HEADER_LEN].to_vec();
            own[2] &= 0x78; // QR, AA, TC, RD cleared; opcode kept
            own[3] = 0;
            own[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
            own.extend_from_slice(&data[HEADER_LEN..end + 4]);
            let mut opts = 0;
            let _ = wire::walk_records(data, |r| opts += usize::from(r.rtype == wire::TYPE_OPT));
            let want = h.has(wire::FLAG_QR)
                && h.qdcount == 1
                && walked.is_ok()
                && opts <= 1
                && upstream::well_formed(data);
            assert_eq!(
                matches(&own, data),
                want,
                "matches() disagrees on its own question"
            );
        }
    }

    // Cache policy.
    let cache = Cache::new(&cfg.cache);
    let (kind, life) = cache.lifetime(data);
    if h.is_none_or(|h| h.has(wire::FLAG_TC)) || walked.is_err() {
        assert_eq!(
            (kind, life),
            (Kind::Uncached, 0),
            "TC=1 or unscannable reply cached"
        );
    }
    let cap = cfg
        .cache
        .max_ttl
        .max(cfg.cache.negative_ttl_max)
        .max(cfg.cache.failure_ttl);
    let now = Instant::now();
    for limit in [None, Some(0), Some(7), Some(u32::MAX)] {
        let Some(e) = cache.entry_for(data, now, limit) else {
            continue;
        };
        let lifetime = e.expires.saturating_duration_since(e.stored).as_secs();
        assert!(lifetime <= u64::from(cap), "cached for {lifetime} s");
        assert!(
            limit.is_none_or(|l| lifetime <= u64::from(l)),
            "cap ignored"
        );
        // No client is told to keep a record longer than flatdns keeps it.
        let ttls = scan(e.answer.wire())
            .expect("a cached answer does not scan")
            .0;
        for (_, t, ttl) in ttls {
            if t != wire::TYPE_OPT {
                assert!(
                    u64::from(ttl) <= lifetime,
                    "TTL {ttl} above the lifetime {lifetime}"
                );
            }
        }
        if e.kind == Kind::Positive {
            if let Some(min) = e.answer.min_ttl() {
                assert!(lifetime <= u64::from(min), "served past a record's TTL");
            }
        }
        if e.kind != Kind::Uncached {
            assert!(h.is_some_and(|h| !h.has(wire::FLAG_TC)));
        }
    }

    // Preparing for sharing: no client's COOKIE/ECS survives (R24); TTLs clamped (R6).
    let Ok(question_end) = walked else {
        assert!(Prepared::new(data, |t| t).is_none());
        passthrough_checks(data);
        return;
    };
    if let Some(p) = Prepared::new(data, |t| clamp_ttl(t, 0, 86_400)) {
        let (recs, codes) = scan(p.wire()).expect("a prepared answer does not scan");
        assert!(
            !codes.contains(&wire::OPT_COOKIE) && !codes.contains(&wire::OPT_ECS),
            "COOKIE or ECS kept in a shared answer (R24)"
        );
        for (_, t, ttl) in &recs {
            if *t != wire::TYPE_OPT {
                assert!(*ttl <= 86_400, "TTL above the cap");
            }
        }
        assert_eq!(
            p.min_ttl(),
            recs.iter()
                .filter(|r| r.1 != wire::TYPE_OPT)
                .map(|r| r.2)
                .min()
        );
        // Every answer flatdns shares has exactly one question (`matches`, or its own).
        if h.is_none_or(|h| h.qdcount != 1) {
            passthrough_checks(data);
            return;
        }
        let own = data[HEADER_LEN..question_end].to_vec();
        check_render(&p, question_end, &own);
        // The same question in another case, and the fixed query's question.
        let flipped: Vec<u8> = own
            .iter()
            .map(|b| {
                if b.is_ascii_alphabetic() {
                    b ^ 0x20
                } else {
                    *b
                }
            })
            .collect();
        check_render(&p, question_end, &flipped);
        let mut fixed = START_MIXED.to_vec();
        fixed.extend_from_slice(&[0, 1, 0, 1]);
        check_render(&p, question_end, &fixed);
    } else {
        // Only a reply with an OPT that cannot be rewritten is refused.
        assert!(scanned.is_some_and(|(recs, _)| recs.iter().any(|r| r.1 == wire::TYPE_OPT)));
    }
    passthrough_checks(data);
});

fn passthrough_checks(data: &[u8]) {
    let mut question = START_MIXED.to_vec();
    question.extend_from_slice(&[0, 1, 0, 1]);
    let mut out = Vec::new();
    let n = data.len();
    for limit in [0, 12, 512, 1232, n.saturating_sub(1), n, 65_535] {
        response::passthrough(data, 0x4242, &question, limit, &mut out);
        let min_truncated = HEADER_LEN + question.len() + 11;
        assert!(
            out.len() <= limit.max(min_truncated),
            "passthrough over the limit"
        );
        if n <= limit {
            assert_eq!(out.len(), n);
            if n >= 2 {
                assert_eq!(&out[..2], &[0x42, 0x42]);
                assert_eq!(
                    &out[2..],
                    &data[2..],
                    "passthrough changed more than the ID"
                );
            }
        } else {
            check_truncated(&out, 0x4242, &question);
        }
    }
}
