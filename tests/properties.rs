#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property tests (proptest) for the flattening invariants and hostile client input
//! (F2, R6, R19, R20, R21). They run in the normal `cargo test` and take a few seconds.
//!
//! Chains are generated as data (random names, TTLs including ones with the top bit set,
//! record order, unrelated records, compression, letter case, perhaps one defect), written as
//! an upstream reply on the wire, and put through `flatten::follow` and `flatten::build`.
//! The expected outcome is computed from the generated data, never from flatdns.

use std::net::SocketAddr;
use std::sync::OnceLock;

use flatdns::config::Config;
use flatdns::flatten::{self, Chain, Skip, Step};
use flatdns::handler::{Fast, Handler, Transport};
use flatdns::wire::{self, Header, Query, QueryError, HEADER_LEN};
use proptest::prelude::*;

const MAX_HOPS: usize = 11;
const TYPE_TXT: u16 = 16;
/// First octet of every address that is not on the chain: never in a flattened answer (R19).
const OFF_CHAIN: u8 = 0xee;

/// A TTL with the top bit set counts as 0 (RFC 2181 section 8).
fn sane(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 {
        0
    } else {
        ttl
    }
}

// ---------------------------------------------------------------------------------------------
// The generated case.

#[derive(Debug, Clone)]
enum Defect {
    None,
    /// The last link points back to `names[j]`.
    Loop(usize),
    /// No records of the asked type at the end: a partial chain.
    Cut,
    /// A second CNAME at `names[i]`.
    TwoCnames(usize),
    /// A record of the asked type beside the CNAME at `names[i]`.
    DataBeside(usize),
}

#[derive(Debug, Clone)]
enum Extra {
    /// An address of the asked type at an unrelated name.
    Decoy,
    /// A CNAME from an unrelated name to a name on the chain.
    CnameInto(usize),
    /// An address of the other family at the final name.
    OtherFamily,
    /// A TXT record at the final name.
    Txt,
}

#[derive(Debug, Clone)]
struct Case {
    qtype: u16,
    /// `names[0]` is the question name; `names[i]` the target of link `i - 1`. Lowercase.
    names: Vec<Vec<u8>>,
    link_ttls: Vec<u32>,
    /// Records of the asked type at the last name: rdata and TTL.
    finals: Vec<(Vec<u8>, u32)>,
    extras: Vec<(Extra, u32)>,
    defect: Defect,
    /// Drives record order, compression and letter case.
    seed: u64,
    with_opt: bool,
    flags: u16,
}

/// One record as written into the answer section.
#[derive(Debug, Clone)]
struct Rec {
    owner: Vec<u8>,
    rtype: u16,
    ttl: u32,
    /// For a CNAME the target name (lowercase wire form), else the rdata.
    data: Vec<u8>,
    on_chain: bool,
}

fn wire_name(labels: &[String]) -> Vec<u8> {
    let mut n = Vec::new();
    for l in labels {
        n.push(l.len() as u8);
        n.extend_from_slice(l.as_bytes());
    }
    n.push(0);
    n
}

fn ttl_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..=3600,
        2 => any::<u32>(),
        2 => 0x8000_0000u32..=u32::MAX,
        1 => Just(0u32),
        1 => Just(u32::MAX),
        1 => Just(0x7fff_ffffu32),
    ]
}

/// `count` distinct random names: random labels, then a label unique to the index.
fn names_strategy(count: usize) -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(
        prop::collection::vec("[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", 0..4),
        count,
    )
    .prop_map(|all| {
        all.into_iter()
            .enumerate()
            .map(|(i, mut labels)| {
                labels.insert(0, format!("n{i}"));
                wire_name(&labels)
            })
            .collect()
    })
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (
        1usize..=14,
        prop_oneof![Just(wire::TYPE_A), Just(wire::TYPE_AAAA)],
    )
        .prop_flat_map(|(hops, qtype)| {
            let alen = if qtype == wire::TYPE_A { 4 } else { 16 };
            let address = prop::collection::vec(any::<u8>(), alen).prop_map(|mut a| {
                if a[0] == OFF_CHAIN {
                    a[0] = 0;
                }
                a
            });
            let defect = prop_oneof![
                6 => Just(Defect::None),
                1 => (0..hops).prop_map(Defect::Loop),
                1 => Just(Defect::Cut),
                1 => (0..hops).prop_map(Defect::TwoCnames),
                1 => (0..hops).prop_map(Defect::DataBeside),
            ];
            let extra = prop_oneof![
                Just(Extra::Decoy),
                (0..=hops).prop_map(Extra::CnameInto),
                Just(Extra::OtherFamily),
                Just(Extra::Txt),
            ];
            (
                Just(qtype),
                names_strategy(hops + 1),
                prop::collection::vec(ttl_strategy(), hops),
                prop::collection::vec((address, ttl_strategy()), 1..50),
                prop::collection::vec((extra, ttl_strategy()), 0..6),
                defect,
                any::<u64>(),
                any::<bool>(),
                prop_oneof![Just(0x8180u16), Just(0x81a0), Just(0x8580), Just(0x8380)],
            )
        })
        .prop_map(
            |(qtype, names, link_ttls, finals, extras, defect, seed, with_opt, flags)| Case {
                qtype,
                names,
                link_ttls,
                finals,
                extras,
                defect,
                seed,
                with_opt,
                flags,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Writing a case on the wire.

/// xorshift64*: the choices a case makes from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

impl Case {
    fn hops(&self) -> usize {
        self.link_ttls.len()
    }
    fn alen(&self) -> usize {
        if self.qtype == wire::TYPE_A {
            4
        } else {
            16
        }
    }
    fn last(&self) -> &[u8] {
        &self.names[self.hops()]
    }

    /// Every record of the answer section, in generation order.
    fn records(&self) -> Vec<Rec> {
        let hops = self.hops();
        let mut recs = Vec::new();
        for i in 0..hops {
            let target = match self.defect {
                Defect::Loop(j) if i + 1 == hops => self.names[j].clone(),
                _ => self.names[i + 1].clone(),
            };
            recs.push(Rec {
                owner: self.names[i].clone(),
                rtype: wire::TYPE_CNAME,
                ttl: self.link_ttls[i],
                data: target,
                on_chain: true,
            });
        }
        match self.defect {
            Defect::TwoCnames(i) => recs.push(Rec {
                owner: self.names[i].clone(),
                rtype: wire::TYPE_CNAME,
                ttl: 300,
                data: b"\x05other\x07invalid\x00".to_vec(),
                on_chain: false,
            }),
            Defect::DataBeside(i) => recs.push(Rec {
                owner: self.names[i].clone(),
                rtype: self.qtype,
                ttl: 300,
                data: vec![OFF_CHAIN; self.alen()],
                on_chain: false,
            }),
            _ => {}
        }
        if !matches!(self.defect, Defect::Cut) {
            for (rdata, ttl) in &self.finals {
                recs.push(Rec {
                    owner: self.last().to_vec(),
                    rtype: self.qtype,
                    ttl: *ttl,
                    data: rdata.clone(),
                    on_chain: true,
                });
            }
        }
        for (k, (extra, ttl)) in self.extras.iter().enumerate() {
            let unrelated = format!("\x02zz\x01{}\x09unrelated\x00", (b'a' + k as u8) as char);
            let (owner, rtype, data) = match extra {
                Extra::Decoy => {
                    let mut rd = vec![OFF_CHAIN; self.alen()];
                    rd[1] = k as u8;
                    (unrelated.into_bytes(), self.qtype, rd)
                }
                Extra::CnameInto(i) => (
                    unrelated.into_bytes(),
                    wire::TYPE_CNAME,
                    self.names[*i].clone(),
                ),
                Extra::OtherFamily => {
                    let (t, len) = if self.qtype == wire::TYPE_A {
                        (wire::TYPE_AAAA, 16)
                    } else {
                        (wire::TYPE_A, 4)
                    };
                    (self.last().to_vec(), t, vec![OFF_CHAIN; len])
                }
                Extra::Txt => (self.last().to_vec(), TYPE_TXT, b"\x04text".to_vec()),
            };
            recs.push(Rec {
                owner,
                rtype,
                ttl: *ttl,
                data,
                on_chain: false,
            });
        }
        recs
    }

    /// The question as the client wrote it (random case), and the reply message with the
    /// answer records shuffled; also the records in their final order.
    fn to_wire(&self) -> (Vec<u8>, Vec<u8>, Vec<Rec>) {
        let mut rng = Rng(self.seed | 1);
        let mut recs = self.records();
        for i in (1..recs.len()).rev() {
            let j = rng.below(i + 1);
            recs.swap(i, j);
        }
        let mut w = Writer {
            msg: Vec::with_capacity(1024),
            seen: Vec::new(),
        };
        w.msg.extend_from_slice(&(rng.next() as u16).to_be_bytes());
        w.msg.extend_from_slice(&self.flags.to_be_bytes());
        w.msg.extend_from_slice(&[0, 1]);
        w.msg.extend_from_slice(&(recs.len() as u16).to_be_bytes());
        w.msg.extend_from_slice(&[0, 0, 0, u8::from(self.with_opt)]);
        w.name(&mut rng, &self.names[0]);
        w.msg.extend_from_slice(&self.qtype.to_be_bytes());
        w.msg.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
        let question = w.msg[HEADER_LEN..].to_vec();
        for r in &recs {
            w.name(&mut rng, &r.owner);
            w.msg.extend_from_slice(&r.rtype.to_be_bytes());
            w.msg.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
            w.msg.extend_from_slice(&r.ttl.to_be_bytes());
            if r.rtype == wire::TYPE_CNAME {
                let at = w.msg.len();
                w.msg.extend_from_slice(&[0, 0]);
                w.name(&mut rng, &r.data);
                let len = (w.msg.len() - at - 2) as u16;
                w.msg[at..at + 2].copy_from_slice(&len.to_be_bytes());
            } else {
                w.msg
                    .extend_from_slice(&(r.data.len() as u16).to_be_bytes());
                w.msg.extend_from_slice(&r.data);
            }
        }
        if self.with_opt {
            w.msg
                .extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
        }
        (question, w.msg, recs)
    }
}

struct Writer {
    msg: Vec<u8>,
    seen: Vec<(Vec<u8>, usize)>,
}

impl Writer {
    /// Writes a name in random case, or (when it was written before) perhaps as a pointer.
    fn name(&mut self, rng: &mut Rng, name: &[u8]) {
        if let Some(&(_, at)) = self.seen.iter().find(|(n, _)| n == name) {
            if rng.coin() {
                self.msg
                    .extend_from_slice(&(0xc000 | at as u16).to_be_bytes());
                return;
            }
        }
        let at = self.msg.len();
        let mut len_octet = true;
        let mut left = 0;
        for &b in name {
            // Only letters are case-folded; length octets stay as they are.
            let flip = !len_octet && b.is_ascii_lowercase() && rng.below(3) == 0;
            self.msg.push(if flip { b.to_ascii_uppercase() } else { b });
            if len_octet {
                left = b;
                len_octet = left == 0;
            } else {
                left -= 1;
                len_octet = left == 0;
            }
        }
        if at < 0x3fff {
            self.seen.push((name.to_vec(), at));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The invariants.

/// The answer-section records of a flattened message: (start, type, class, ttl, rdata).
fn answers(msg: &[u8]) -> Vec<(usize, u16, u16, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let walked = wire::walk_records(msg, |r| {
        if r.section == wire::Section::Answer {
            out.push((
                r.start,
                r.rtype,
                r.class,
                r.ttl(msg),
                msg[r.rdata.clone()].to_vec(),
            ));
        }
    });
    assert!(walked.is_ok(), "flattened answer does not scan: {walked:?}");
    out
}

/// The miss path's `follow_start` (after `survey`) ends where `follow` from the question
/// name does, with the same chain.
fn same_from_the_start(
    msg: &[u8],
    case: &Case,
    step: &Step,
    chain: &Chain,
) -> Result<(), TestCaseError> {
    let mut again = Chain::new(&case.names[0], MAX_HOPS);
    let surveyed = flatten::survey(msg);
    let from_start = flatten::follow_start(msg, surveyed, case.qtype, &mut again);
    prop_assert_eq!(&from_start, step);
    prop_assert_eq!(format!("{again:?}"), format!("{chain:?}"));
    Ok(())
}

fn check_case(case: &Case) -> Result<(), TestCaseError> {
    let (question, msg, recs) = case.to_wire();
    let mut chain = Chain::new(&case.names[0], MAX_HOPS);
    let step = flatten::follow(&msg, &case.names[0], case.qtype, &mut chain);
    same_from_the_start(&msg, case, &step, &chain)?;
    let hops = case.hops();

    // The expected outcome, from the generated data alone.
    if hops > MAX_HOPS {
        prop_assert!(!matches!(step, Step::Done(_)), "over-long chain flattened");
        if matches!(case.defect, Defect::None | Defect::Cut) {
            prop_assert_eq!(&step, &Step::Fail(Skip::TooLong));
        }
    } else {
        match case.defect {
            Defect::None => prop_assert!(matches!(step, Step::Done(_)), "got {:?}", step),
            Defect::Loop(_) => prop_assert_eq!(&step, &Step::Fail(Skip::Loop)),
            Defect::Cut => prop_assert_eq!(&step, &Step::Continue(case.last().to_vec())),
            Defect::TwoCnames(_) | Defect::DataBeside(_) => {
                prop_assert_eq!(&step, &Step::Fail(Skip::Ambiguous))
            }
        }
    }
    let Step::Done(rrs) = step else {
        return Ok(());
    };
    prop_assert!(chain.hops() <= MAX_HOPS);
    prop_assert_eq!(chain.hops(), hops);

    // Final records: those at the end of the chain, in the upstream's order (F2).
    let finals: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.on_chain && r.rtype == case.qtype)
        .collect();
    let got: Vec<&[u8]> = rrs.iter().map(|r| r.rdata.as_slice()).collect();
    let want: Vec<&[u8]> = finals.iter().map(|r| r.data.as_slice()).collect();
    prop_assert_eq!(got, want, "final RRset changed");

    let ttl = flatten::answer_ttl(&chain, &rrs);
    let out = flatten::build(&msg, &question, &rrs, ttl).expect("build failed");
    let h = Header::read(&out).unwrap();
    prop_assert_eq!(h.qdcount, 1);
    prop_assert_eq!(usize::from(h.ancount), case.finals.len());
    prop_assert!(!h.has(wire::FLAG_AD) && !h.has(wire::FLAG_TC));
    prop_assert_eq!(&out[HEADER_LEN..HEADER_LEN + question.len()], &question[..]);

    let min_ttl = case
        .link_ttls
        .iter()
        .chain(case.finals.iter().map(|(_, t)| t))
        .map(|&t| sane(t))
        .min()
        .unwrap();
    let final_rdata: Vec<&[u8]> = case.finals.iter().map(|(r, _)| r.as_slice()).collect();
    for (start, rtype, class, t, rdata) in answers(&out) {
        prop_assert_ne!(rtype, wire::TYPE_CNAME, "CNAME in a flattened answer");
        prop_assert_eq!(rtype, case.qtype);
        prop_assert_eq!(class, wire::CLASS_IN);
        prop_assert_eq!(
            &out[start..start + 2],
            &[0xc0, 0x0c][..],
            "owner is not the question name"
        );
        for &l in &case.link_ttls {
            prop_assert!(t <= sane(l), "TTL {} above a link's {}", t, sane(l));
        }
        for (_, f) in &case.finals {
            prop_assert!(
                t <= sane(*f),
                "TTL {} above a final record's {}",
                t,
                sane(*f)
            );
        }
        prop_assert_eq!(t, min_ttl, "TTL is not the minimum (F2)");
        prop_assert!(
            final_rdata.contains(&rdata.as_slice()),
            "address not at the end of the chain"
        );
        prop_assert_ne!(rdata[0], OFF_CHAIN, "record off the chain served (R19)");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Flattening a generated chain: no CNAME out, TTL the minimum, only addresses from the
    /// end of the chain, owner = the question name; loops, cuts, ambiguity and chains over 11
    /// hops never flatten; records off the chain never appear (R19).
    #[test]
    fn flatten_invariants(case in case_strategy()) {
        check_case(&case)?;
    }

    /// Same chains with the upstream's message cut short at any point: never a panic, and
    /// whatever flattens still meets the output invariants.
    #[test]
    fn flatten_survives_cut_messages(case in case_strategy(), cut in any::<prop::sample::Index>()) {
        let (question, msg, _) = case.to_wire();
        let msg = &msg[..cut.index(msg.len() + 1)];
        let mut chain = Chain::new(&case.names[0], MAX_HOPS);
        let step = flatten::follow(msg, &case.names[0], case.qtype, &mut chain);
        same_from_the_start(msg, &case, &step, &chain)?;
        if let Step::Done(rrs) = step {
            prop_assert!(chain.hops() <= MAX_HOPS);
            let ttl = flatten::answer_ttl(&chain, &rrs);
            for l in &chain.links {
                prop_assert!(ttl <= l.ttl);
            }
            if let Some(out) = flatten::build(msg, &question, &rrs, ttl) {
                for (_, rtype, _, t, rdata) in answers(&out) {
                    prop_assert_ne!(rtype, wire::TYPE_CNAME);
                    prop_assert_eq!(t, ttl);
                    prop_assert!(case.finals.iter().any(|(r, _)| *r == rdata));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile client queries (R1, R20).

fn handler() -> &'static Handler {
    static H: OnceLock<Handler> = OnceLock::new();
    H.get_or_init(|| {
        Handler::new(Config::for_test(
            "127.0.0.1:0".parse().unwrap(),
            vec!["127.0.0.1:9".parse().unwrap()],
        ))
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

/// A well-formed query with EDNS, a cookie and an ECS option, for mutation.
fn valid_query() -> Vec<u8> {
    let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    q.extend_from_slice(b"\x03www\x07example\x00\x00\x01\x00\x01");
    q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 23]);
    q.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    q.extend_from_slice(&[0, 8, 0, 7, 0, 1, 24, 0, 192, 0, 2]);
    q
}

fn query_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        // A valid query with a few octets overwritten and perhaps cut short.
        (
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            any::<prop::sample::Index>(),
        )
            .prop_map(|(edits, cut)| {
                let mut q = valid_query();
                for (at, v) in edits {
                    let i = at.index(q.len());
                    q[i] = v;
                }
                let keep = HEADER_LEN.min(q.len()) + cut.index(q.len() - HEADER_LEN + 1);
                q.truncate(keep);
                q
            }),
        // A question name that ends in a compression pointer, or runs past 255 octets.
        (
            prop::collection::vec(1u8..=63, 0..6),
            0u8..=0x3f,
            prop_oneof![Just(0u8), any::<u8>()],
            any::<bool>(),
        )
            .prop_map(|(labels, hi, lo, pointer)| {
                let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
                for l in labels {
                    q.push(l);
                    q.extend(std::iter::repeat_n(b'a', usize::from(l)));
                }
                if pointer {
                    q.extend_from_slice(&[0xc0 | hi, lo]);
                } else {
                    q.push(0);
                }
                q.extend_from_slice(&[0, 1, 0, 1]);
                q
            }),
        // A header claiming far more than follows.
        prop::collection::vec(any::<u8>(), 12..40).prop_map(|mut q| {
            q[2] &= 0x7f;
            q[4..12].copy_from_slice(&[0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
            q
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes from any client: `Query::parse` and `Handler::answer_fast` never panic; a
    /// parsed question is an uncompressed name of at most 255 octets; every reply has QR set
    /// and echoes the ID; a query from outside the ACL gets REFUSED, a malformed one FORMERR.
    #[test]
    fn hostile_queries(
        msg in query_bytes(),
        outside in any::<bool>(),
        tcp in any::<bool>(),
    ) {
        let parsed = Query::parse(&msg);
        if let Ok(q) = &parsed {
            prop_assert!(
                is_plain_name(q.qname()),
                "accepted a question name that is compressed or too long: {:02x?}",
                q.qname()
            );
            prop_assert!(HEADER_LEN + q.question().len() <= msg.len());
            prop_assert_eq!(q.question(), &msg[HEADER_LEN..q.question_end()]);
            prop_assert!((512..=1232).contains(&q.udp_limit(1232)));
        }
        let client: SocketAddr = if outside { "192.0.2.7:5353" } else { "127.0.0.1:5353" }
            .parse()
            .unwrap();
        let transport = if tcp { Transport::Tcp } else { Transport::Udp };
        let mut out = Vec::new();
        match handler().answer_fast(&msg, client, transport, &mut out) {
            f @ (Fast::Reply | Fast::Refused) => {
                prop_assert_eq!(f == Fast::Refused, outside, "Refused exactly outside the ACL");
                let h = Header::read(&out).expect("reply shorter than a header");
                prop_assert!(h.has(wire::FLAG_QR));
                prop_assert_eq!(&out[..2], &msg[..2], "ID not echoed");
                let opcode = (msg[2] >> 3) & 0x0f;
                if outside {
                    // R1: everything from outside the ACL is refused.
                    prop_assert_eq!(h.rcode(), wire::RCODE_REFUSED);
                } else if opcode != wire::OPCODE_QUERY {
                    prop_assert!(matches!(h.rcode(), wire::RCODE_NOTIMP | wire::RCODE_REFUSED));
                } else {
                    match &parsed {
                        Err(QueryError::FormErr { .. }) => {
                            prop_assert_eq!(h.rcode(), wire::RCODE_FORMERR)
                        }
                        Err(QueryError::Drop) => prop_assert!(false, "reply to a dropped message"),
                        Ok(_) => {}
                    }
                }
            }
            Fast::Drop => {
                prop_assert!(msg.len() < HEADER_LEN || msg[2] & 0x80 != 0);
            }
            Fast::Miss => prop_assert!(parsed.is_ok() && !outside && msg[2] & 0x78 == 0),
        }
    }
}
