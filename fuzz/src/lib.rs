//! Helpers shared by the fuzz targets: an independent, lenient reader of DNS messages (the
//! oracle the invariants are checked against), a structured generator of CNAME-chain replies,
//! and the flattening invariants themselves.
//!
//! The reader here deliberately does not reuse flatdns's scanner or the `domain` crate's
//! parser, so an invariant compares flatdns's view of a message with a second one.

use arbitrary::Unstructured;
use flatdns::flatten::{self, Chain, Step};
use flatdns::wire::{self, Header, HEADER_LEN};

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const CLASS_IN: u16 = 1;
pub const CLASS_CH: u16 = 3;

/// `www.example.`, the question name every target asks (lowercase wire form).
pub const START: &[u8] = b"\x03www\x07example\x00";
/// The same name as a client with 0x20 randomisation might write it.
pub const START_MIXED: &[u8] = b"\x03wWw\x07ExAMPle\x00";

/// A TTL with the top bit set counts as 0 (RFC 2181 section 8; R6).
pub fn sane(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 {
        0
    } else {
        ttl
    }
}

pub fn u16_at(b: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(pos..pos + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(pos..pos + 4)?.try_into().ok()?))
}

/// Reads the (possibly compressed) name at `pos`, lowercased, and the offset just past it.
///
/// Lenient on purpose (pointers may point anywhere, up to 255 of them), so that anything the
/// `domain` crate accepts is accepted here too; labels over 63 and names over 255 octets fail.
pub fn read_name(msg: &[u8], mut pos: usize) -> Option<(Vec<u8>, usize)> {
    let mut out = Vec::new();
    let mut end = None;
    let mut jumps = 0;
    loop {
        let b = *msg.get(pos)?;
        match b & 0xc0 {
            0x00 if b == 0 => {
                out.push(0);
                if out.len() > 255 {
                    return None;
                }
                return Some((out, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let label = msg.get(pos + 1..pos + 1 + b as usize)?;
                out.push(b);
                out.extend(label.iter().map(u8::to_ascii_lowercase));
                if out.len() >= 255 {
                    return None;
                }
                pos += 1 + b as usize;
            }
            0xc0 => {
                let ptr = usize::from(u16_at(msg, pos)? & 0x3fff);
                end.get_or_insert(pos + 2);
                jumps += 1;
                if jumps > 255 {
                    return None;
                }
                pos = ptr;
            }
            _ => return None,
        }
    }
}

/// One record of a message as the oracle reads it.
#[derive(Debug, Clone)]
pub struct Rec {
    pub owner: Vec<u8>,
    pub owner_raw: std::ops::Range<usize>,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    pub rdata: Vec<u8>,
    /// The CNAME target, lowercased and decompressed.
    pub target: Option<Vec<u8>>,
}

/// The question count's questions skipped, then the first `max` answer-section records.
/// `None` if the oracle cannot read the message that far.
pub fn answer_records(msg: &[u8]) -> Option<Vec<Rec>> {
    let h = Header::read(msg)?;
    let mut pos = HEADER_LEN;
    for _ in 0..h.qdcount {
        pos = read_name(msg, pos)?.1 + 4;
        if pos > msg.len() {
            return None;
        }
    }
    let mut out = Vec::new();
    for _ in 0..h.ancount {
        let start = pos;
        let (owner, fixed) = read_name(msg, pos)?;
        let rtype = u16_at(msg, fixed)?;
        let class = u16_at(msg, fixed + 2)?;
        let ttl = u32_at(msg, fixed + 4)?;
        let rdlen = usize::from(u16_at(msg, fixed + 8)?);
        let rdata = msg.get(fixed + 10..fixed + 10 + rdlen)?.to_vec();
        let target = if rtype == TYPE_CNAME {
            read_name(msg, fixed + 10).map(|(n, _)| n)
        } else {
            None
        };
        pos = fixed + 10 + rdlen;
        out.push(Rec {
            owner,
            owner_raw: start..fixed,
            rtype,
            class,
            ttl,
            rdata,
            target,
        });
    }
    Some(out)
}

/// Runs `flatten::follow` from [`START`] over `msg`, and when it reports `Done`, builds the
/// flattened answer for a client that asked with `question`, checking every invariant of
/// F1/F2/R19 against the oracle's reading of `msg`. Returns the step for further checks.
pub fn check_flatten(msg: &[u8], qtype: u16, question: &[u8]) -> Step {
    let mut chain = Chain::new(START, 11);
    let step = flatten::follow(msg, START, qtype, &mut chain);
    assert!(chain.hops() <= 11, "more than 11 hops followed");
    let Step::Done(rrs) = &step else {
        if let Step::Continue(next) = &step {
            assert!(!chain.links.is_empty(), "Continue without a link");
            assert_eq!(chain.links.last().map(|l| &l.target[..]), Some(&next[..]));
        }
        return step;
    };
    assert!(!rrs.is_empty(), "Done with no records");
    assert!(!chain.links.is_empty(), "Done without any CNAME");

    let recs = answer_records(msg).expect("oracle cannot read a message follow() accepted");
    let in_class = |r: &&Rec| r.class == CLASS_IN;

    // The chain: starts at the question name, each link a CNAME of the input, no name twice.
    let mut seen = vec![START.to_vec()];
    let mut cur = START.to_vec();
    for link in &chain.links {
        assert_eq!(link.owner[..], cur[..], "link does not continue the chain");
        let recs_here: Vec<&Rec> = recs
            .iter()
            .filter(in_class)
            .filter(|r| r.rtype == TYPE_CNAME && r.owner == cur)
            .collect();
        assert_eq!(recs_here.len(), 1, "link owner must hold exactly one CNAME");
        assert_eq!(recs_here[0].target.as_deref(), Some(&link.target[..]));
        assert_eq!(link.ttl, sane(recs_here[0].ttl), "link TTL misread");
        assert!(
            !recs
                .iter()
                .filter(in_class)
                .any(|r| r.rtype == qtype && r.owner == cur),
            "CNAME beside data of the asked type"
        );
        assert!(!seen.contains(&link.target.to_vec()), "loop followed");
        seen.push(link.target.to_vec());
        cur = link.target.to_vec();
    }
    // The final RRset: exactly the records of the asked type at the end of the chain, in order.
    let finals: Vec<&Rec> = recs
        .iter()
        .filter(in_class)
        .filter(|r| r.rtype == qtype && r.owner == cur)
        .collect();
    assert_eq!(finals.len(), rrs.len(), "final RRset incomplete or padded");
    for (rr, rec) in rrs.iter().zip(&finals) {
        assert_eq!(rr.rtype, qtype);
        assert_eq!(
            rr.rdata[..],
            rec.rdata[..],
            "final record order or data changed"
        );
        assert_eq!(rr.ttl, sane(rec.ttl));
    }

    let ttl = flatten::answer_ttl(&chain, rrs);
    let min = chain
        .links
        .iter()
        .map(|l| l.ttl)
        .chain(rrs.iter().map(|r| r.ttl))
        .min()
        .unwrap_or(u32::MAX);
    assert_eq!(
        ttl, min,
        "answer TTL is not the minimum over links and records (F2)"
    );

    let Some(out) = flatten::build(msg, question, rrs, ttl) else {
        // Only when the whole message does not scan, or the result would pass 64 KiB.
        return step;
    };
    check_flattened(&out, msg, question, qtype, &chain, rrs, ttl, &finals);
    step
}

#[allow(clippy::too_many_arguments)]
fn check_flattened(
    out: &[u8],
    msg: &[u8],
    question: &[u8],
    qtype: u16,
    chain: &Chain,
    rrs: &[flatten::Rr],
    ttl: u32,
    finals: &[&Rec],
) {
    assert!(out.len() <= 65_535);
    let h = Header::read(out).expect("flattened answer without a header");
    let up = Header::read(msg).expect("upstream without a header");
    assert_eq!(h.flags, up.flags & !(wire::FLAG_AD | wire::FLAG_TC));
    assert_eq!(h.qdcount, 1);
    assert_eq!(usize::from(h.ancount), rrs.len());
    assert_eq!(h.nscount, 0);
    assert_eq!(&out[HEADER_LEN..HEADER_LEN + question.len()], question);
    let mut answers = Vec::new();
    let mut opts = 0;
    let walked = wire::walk_records(out, |r| {
        if r.section == wire::Section::Answer {
            answers.push(r.clone());
        } else if r.rtype == TYPE_OPT {
            opts += 1;
        }
    });
    assert_eq!(
        walked,
        Ok(HEADER_LEN + question.len()),
        "flattened answer does not scan"
    );
    assert!(opts <= 1);
    assert_eq!(answers.len(), rrs.len());
    let input_rdata: Vec<&[u8]> = finals.iter().map(|r| r.rdata.as_slice()).collect();
    for r in &answers {
        assert_ne!(r.rtype, TYPE_CNAME, "CNAME left in a flattened answer");
        assert_eq!(r.rtype, qtype);
        assert_eq!(r.class, CLASS_IN);
        assert_eq!(
            &out[r.start..r.start + 2],
            &[0xc0, 0x0c],
            "owner is not the question name"
        );
        let t = r.ttl(out);
        assert_eq!(t, ttl);
        for l in &chain.links {
            assert!(t <= l.ttl, "TTL above a link's");
        }
        for f in finals {
            assert!(t <= sane(f.ttl), "TTL above a final record's");
        }
        let rd = &out[r.rdata.clone()];
        assert!(
            input_rdata.contains(&rd),
            "address not in the input at the end of the chain"
        );
        assert!(
            msg.windows(rd.len().max(1)).any(|w| w == rd),
            "rdata not in the input at all"
        );
    }
    // Owner reads as the client wrote the question.
    if let Some((name, _)) = read_name(out, answers.first().map_or(HEADER_LEN, |r| r.start)) {
        let mut lower = Vec::new();
        wire::push_lower(&mut lower, &question[..question.len() - 4]);
        assert_eq!(name, lower);
    }
}

// ---------------------------------------------------------------------------------------------
// Structured generator: a reply holding a CNAME chain, so the fuzzer reaches `Done` often.

/// What the generated message must produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A clean chain of at most 11 hops: exactly these final rdatas, in this order.
    Done(Vec<Vec<u8>>),
    /// Loop, too long, ambiguous, cut, or a link in another class: never `Done`.
    NotDone,
}

/// A generated reply.
#[derive(Debug)]
pub struct Built {
    pub msg: Vec<u8>,
    pub qtype: u16,
    pub expect: Expect,
    /// rdata of records not on the chain (R19): never in the output.
    pub unrelated: Vec<Vec<u8>>,
}

struct Writer {
    msg: Vec<u8>,
    names: Vec<(Vec<u8>, usize)>,
}

impl Writer {
    /// Writes `name` (lowercase wire form) with random case, or a pointer to an earlier copy.
    fn name(&mut self, u: &mut Unstructured<'_>, name: &[u8]) {
        let earlier = self.names.iter().find(|(n, _)| n == name).map(|(_, o)| *o);
        if let Some(o) = earlier {
            if u.arbitrary::<bool>().unwrap_or(true) {
                self.msg
                    .extend_from_slice(&(0xc000 | o as u16).to_be_bytes());
                return;
            }
        }
        let at = self.msg.len();
        for &b in name {
            let up = b.is_ascii_lowercase() && u.ratio(1, 4).unwrap_or(false);
            self.msg.push(if up { b.to_ascii_uppercase() } else { b });
        }
        if at < 0x3fff {
            self.names.push((name.to_vec(), at));
        }
    }
}

struct RecSpec {
    owner: Vec<u8>,
    rtype: u16,
    class: u16,
    ttl: u32,
    /// For CNAMEs, the target name; else the rdata.
    data: Vec<u8>,
}

fn ttl(u: &mut Unstructured<'_>) -> u32 {
    match u.int_in_range(0..=3).unwrap_or(0) {
        0 => u.int_in_range(0..=600).unwrap_or(300),
        1 => 0x8000_0000 | u.arbitrary::<u32>().unwrap_or(0),
        _ => u.arbitrary::<u32>().unwrap_or(3600),
    }
}

fn chain_name(u: &mut Unstructured<'_>, i: usize) -> Vec<u8> {
    const POOL: &[&[u8]] = &[b"cdn", b"edge", b"example", b"net", b"a", b"x-1"];
    let mut n = Vec::new();
    let hop = format!("h{i}");
    n.push(hop.len() as u8);
    n.extend_from_slice(hop.as_bytes());
    let extra = u.int_in_range(1..=3).unwrap_or(1);
    for _ in 0..extra {
        let l = u.choose(POOL).copied().unwrap_or(b"net");
        n.push(l.len() as u8);
        n.extend_from_slice(l);
    }
    n.push(0);
    n
}

/// Builds a reply to `www.example.` A or AAAA holding a CNAME chain with random names, TTLs,
/// record order, unrelated records and compression, and perhaps one defect.
pub fn build_chain(u: &mut Unstructured<'_>) -> Built {
    let qtype = if u.arbitrary::<bool>().unwrap_or(false) {
        TYPE_AAAA
    } else {
        TYPE_A
    };
    let alen = if qtype == TYPE_A { 4 } else { 16 };
    let hops: usize = u.int_in_range(1..=14).unwrap_or(2);
    let mut names = vec![START.to_vec()];
    for i in 1..=hops {
        names.push(chain_name(u, i));
    }
    let defect = u.int_in_range(0u8..=9).unwrap_or(9);
    let mut recs = Vec::new();
    let mut not_done = hops > 11;
    for i in 0..hops {
        let mut target = names[i + 1].clone();
        let mut class = CLASS_IN;
        if i + 1 == hops && defect == 0 {
            // Loop back to a name already on the chain.
            let j = u.int_in_range(0..=i).unwrap_or(0);
            target = names[j].clone();
            not_done = true;
        }
        if defect == 1 && i == u.int_in_range(0..=hops - 1).unwrap_or(0) {
            class = CLASS_CH;
            not_done = true;
        }
        recs.push(RecSpec {
            owner: names[i].clone(),
            rtype: TYPE_CNAME,
            class,
            ttl: ttl(u),
            data: target,
        });
    }
    if defect == 2 {
        // A second CNAME at one owner.
        let i = u.int_in_range(0..=hops - 1).unwrap_or(0);
        recs.push(RecSpec {
            owner: names[i].clone(),
            rtype: TYPE_CNAME,
            class: CLASS_IN,
            ttl: ttl(u),
            data: b"\x05other\x07example\x00".to_vec(),
        });
        not_done = true;
    }
    if defect == 3 {
        // Data of the asked type beside a CNAME.
        let i = u.int_in_range(0..=hops - 1).unwrap_or(0);
        recs.push(RecSpec {
            owner: names[i].clone(),
            rtype: qtype,
            class: CLASS_IN,
            ttl: ttl(u),
            data: vec![0xee; alen],
        });
        not_done = true;
    }
    let last = names[hops].clone();
    let mut finals = Vec::new();
    if defect == 4 {
        // The chain is cut: no final records (a partial answer).
        not_done = true;
    } else {
        let n = u.int_in_range(1..=50).unwrap_or(1);
        for _ in 0..n {
            let mut rd = u.bytes(alen).map(<[u8]>::to_vec).unwrap_or(vec![1; alen]);
            if rd[0] == 0xee {
                rd[0] = 0xed;
            }
            finals.push(rd.clone());
            recs.push(RecSpec {
                owner: last.clone(),
                rtype: qtype,
                class: CLASS_IN,
                ttl: ttl(u),
                data: rd,
            });
        }
    }
    // Unrelated records (R19): other names, other types at chain names.
    let mut unrelated = Vec::new();
    let extras = u.int_in_range(0..=6).unwrap_or(0);
    for k in 0..extras {
        let kind = u.int_in_range(0..=3).unwrap_or(0);
        let mut rd = vec![0xee; alen];
        rd[alen - 1] = k as u8;
        let owner_other = format!("\x03zz{k}\x09unrelated\x00").into_bytes();
        let (owner, rtype, data) = match kind {
            0 => (owner_other, qtype, rd.clone()),
            1 => (
                owner_other,
                TYPE_CNAME,
                names[u.int_in_range(0..=hops).unwrap_or(0)].clone(),
            ),
            2 => {
                let other = if qtype == TYPE_A { TYPE_AAAA } else { TYPE_A };
                let olen = if other == TYPE_A { 4 } else { 16 };
                let mut rd = vec![0xee; olen];
                rd[olen - 1] = k as u8;
                (last.clone(), other, rd)
            }
            _ => (last.clone(), TYPE_TXT, b"\x05hello".to_vec()),
        };
        if rtype == qtype {
            unrelated.push(data.clone());
        }
        recs.push(RecSpec {
            owner,
            rtype,
            class: CLASS_IN,
            ttl: ttl(u),
            data,
        });
    }
    // Random order.
    for i in (1..recs.len()).rev() {
        let j = u.int_in_range(0..=i).unwrap_or(i);
        recs.swap(i, j);
    }
    let expect = if not_done {
        Expect::NotDone
    } else {
        // Upstream order of the final records is kept (F2).
        Expect::Done(
            recs.iter()
                .filter(|r| r.rtype == qtype && r.owner == last)
                .map(|r| r.data.clone())
                .collect(),
        )
    };

    let opt = u.arbitrary::<bool>().unwrap_or(false);
    let mut w = Writer {
        msg: Vec::with_capacity(512),
        names: Vec::new(),
    };
    let id = u.arbitrary::<u16>().unwrap_or(0);
    w.msg.extend_from_slice(&id.to_be_bytes());
    w.msg.extend_from_slice(&[0x81, 0xa0, 0, 1]);
    w.msg.extend_from_slice(&(recs.len() as u16).to_be_bytes());
    w.msg.extend_from_slice(&[0, 0, 0, u8::from(opt)]);
    w.name(u, START);
    w.msg.extend_from_slice(&qtype.to_be_bytes());
    w.msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    for r in &recs {
        w.name(u, &r.owner);
        w.msg.extend_from_slice(&r.rtype.to_be_bytes());
        w.msg.extend_from_slice(&r.class.to_be_bytes());
        w.msg.extend_from_slice(&r.ttl.to_be_bytes());
        if r.rtype == TYPE_CNAME {
            let len_at = w.msg.len();
            w.msg.extend_from_slice(&[0, 0]);
            w.name(u, &r.data);
            let len = (w.msg.len() - len_at - 2) as u16;
            w.msg[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
        } else {
            w.msg
                .extend_from_slice(&(r.data.len() as u16).to_be_bytes());
            w.msg.extend_from_slice(&r.data);
        }
    }
    if opt {
        w.msg
            .extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    Built {
        msg: w.msg,
        qtype,
        expect,
        unrelated,
    }
}

/// The question section a client writes for `name` and `qtype`.
pub fn question(name: &[u8], qtype: u16) -> Vec<u8> {
    let mut q = name.to_vec();
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generator reaches every outcome, and its expectations hold, over simple inputs.
    #[test]
    fn generator_reaches_done_and_defects() {
        let (mut done, mut not_done) = (0, 0);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..400)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let built = build_chain(&mut Unstructured::new(&bytes));
            let step = check_flatten(&built.msg, built.qtype, &question(START_MIXED, built.qtype));
            match (&built.expect, &step) {
                (Expect::Done(want), Step::Done(rrs)) => {
                    let got: Vec<&Vec<u8>> = rrs.iter().map(|r| &r.rdata).collect();
                    assert_eq!(got, want.iter().collect::<Vec<_>>());
                    done += 1;
                }
                (Expect::NotDone, Step::Done(_)) => panic!("defective chain flattened"),
                (Expect::NotDone, _) => not_done += 1,
                (Expect::Done(_), other) => panic!("clean chain not flattened: {other:?}"),
            }
        }
        assert!(
            done > 300 && not_done > 300,
            "done {done}, not done {not_done}"
        );
    }
}
