//! CNAME flattening as pure functions: message in, decision and flattened message out.
//!
//! A chain is followed from the question name by a linear walk over the answer section with a
//! visited set and a hop cap shared by the whole chain (upstream answer and chase answers
//! together), never by recursion over untrusted data. Only records on that chain are used
//! (R19): anything else the message holds is ignored.
//!
//! The flattened answer (F2) is written directly: header flags from the upstream with AD
//! cleared, the client's question, then the final RRset with every owner a compression pointer
//! to the question name (offset 12). The owner therefore reads exactly as the client wrote the
//! question, and a cache hit that patches the question case patches the owners with it.

use crate::config::{Exclude, FlattenConfig};
use crate::wire::{self, Header, HEADER_LEN};
use smallvec::SmallVec;

/// Why an answer is passed through unflattened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    Disabled,
    NotAddress,
    NotNoError,
    /// The upstream's reply is truncated (its TCP retry failed).
    Truncated,
    Dnssec,
    OutOfScope,
    Excluded,
    /// No CNAME at the question name: nothing to flatten.
    NoChain,
    Loop,
    TooLong,
    /// Two CNAMEs at one owner, or a CNAME beside other data.
    Ambiguous,
    /// The target does not exist (NXDOMAIN).
    Dangling,
    /// The chain ends at a name without records of the asked type.
    NoData,
    /// SERVFAIL, timeout or overload while chasing.
    ChaseFailed,
    Malformed,
}

impl Skip {
    pub fn as_str(&self) -> &'static str {
        match self {
            Skip::Disabled => "disabled",
            Skip::NotAddress => "not-address",
            Skip::NotNoError => "not-noerror",
            Skip::Truncated => "truncated",
            Skip::Dnssec => "dnssec",
            Skip::OutOfScope => "out-of-scope",
            Skip::Excluded => "excluded",
            Skip::NoChain => "no-chain",
            Skip::Loop => "loop",
            Skip::TooLong => "too-long",
            Skip::Ambiguous => "ambiguous",
            Skip::Dangling => "dangling",
            Skip::NoData => "nodata",
            Skip::ChaseFailed => "chase-failure",
            Skip::Malformed => "malformed",
        }
    }
}

/// One record of the final RRset. Its RDATA (an address: 4 or 16 octets) and the RRset
/// itself (nearly always one or two addresses) are inline: a flattened answer allocates
/// neither on its way to the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rr {
    pub rtype: u16,
    pub ttl: u32,
    pub rdata: SmallVec<[u8; 16]>,
}

/// The records a chain ends at.
pub type Rrs = SmallVec<[Rr; 2]>;

/// A name on a chain (lowercased wire form): inline up to 48 octets, as the cache's keys
/// (`src/cache.rs`), which holds nearly every CNAME owner and target, so walking a link
/// allocates nothing.
pub type Name = SmallVec<[u8; 48]>;

/// One CNAME link walked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub owner: Name,
    pub target: Name,
    pub ttl: u32,
}

/// A chain's links: inline up to two, the most nearly every chain has.
pub type Links = SmallVec<[Link; 2]>;

/// State of one chain across the messages that answer parts of it.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The name the chain starts at (lowercased wire name).
    start: Vec<u8>,
    /// Every link so far, in order: their targets are the names visited after the start.
    pub links: Links,
    pub min_ttl: u32,
    max_hops: usize,
}

impl Chain {
    /// A chain starting at `start` (lowercased wire name), following at most `max_hops` CNAMEs.
    pub fn new(start: &[u8], max_hops: usize) -> Chain {
        Chain::starting_at(start.to_vec(), max_hops)
    }

    /// [`Chain::new`] taking the start name as it is.
    pub fn starting_at(start: Vec<u8>, max_hops: usize) -> Chain {
        Chain {
            start,
            links: Links::new(),
            min_ttl: u32::MAX,
            max_hops,
        }
    }

    /// The name the chain starts at.
    pub fn start(&self) -> &[u8] {
        &self.start
    }

    /// Whether `name` is already on the chain (the start or a target).
    fn visits(&self, name: &[u8]) -> bool {
        self.start == name || self.links.iter().any(|l| l.target[..] == *name)
    }
    pub fn hops(&self) -> usize {
        self.links.len()
    }

    /// Adds a link that no message holds: an ALIAS from the chain's current end to `target`,
    /// with the same loop and length checks as a CNAME.
    pub fn push_alias(&mut self, target: &[u8], ttl: u32) -> Result<(), Skip> {
        let owner = Name::from_slice(self.links.last().map_or(&self.start[..], |l| &l.target));
        if self.visits(target) {
            return Err(Skip::Loop);
        }
        if self.links.len() >= self.max_hops {
            return Err(Skip::TooLong);
        }
        self.min_ttl = self.min_ttl.min(sane_ttl(ttl));
        self.links.push(Link {
            owner,
            target: Name::from_slice(target),
            ttl,
        });
        Ok(())
    }
}

/// Where a walk over one message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The chain ends here with these records of the asked type.
    Done(Rrs),
    /// The chain goes on at this name (lowercased wire form), which the message does not answer.
    Continue(Vec<u8>),
    Fail(Skip),
}

/// A TTL with the top bit set counts as 0 (RFC 2181 section 8).
fn sane_ttl(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 != 0 {
        0
    } else {
        ttl
    }
}

/// What one walk of a reply tells before any name is read: whether its rcode, with the
/// first OPT's extended bits, is plain NOERROR, and whether its answer section holds a CNAME
/// of class IN (`None` when the reply does not scan). Decompresses nothing and allocates
/// nothing: most answers hold no CNAME, and this is all they need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Survey {
    pub noerror: bool,
    pub cname: Option<bool>,
}

pub fn survey(msg: &[u8]) -> Survey {
    let rcode = Header::read(msg).map(|h| h.rcode());
    let (mut any, mut ext_rcode) = (false, None);
    let walked = wire::walk_records(msg, |r| {
        if r.rtype == wire::TYPE_OPT {
            ext_rcode.get_or_insert((r.ttl(msg) >> 24) as u8);
        }
        any |= r.section == wire::Section::Answer
            && r.rtype == wire::TYPE_CNAME
            && r.class == wire::CLASS_IN;
    });
    let scanned = walked.is_ok();
    Survey {
        // A reply that does not scan is judged by its header alone (and fails as malformed).
        noerror: rcode == Some(wire::RCODE_NOERROR)
            && (!scanned || ext_rcode.is_none_or(|e| e == 0)),
        cname: scanned.then_some(any),
    }
}

/// Follows the chain from `start` through the answer section of `msg`.
///
/// Names are read with a [`wire::NameReader`], a bounded decompressor (backward pointers
/// only, 255 octets at most, each pointed-to position read once however long the pointer
/// chains), straight from the wire: no message model is built for this walk.
pub fn follow(msg: &[u8], start: &[u8], qtype: u16, chain: &mut Chain) -> Step {
    follow_at(msg, Some(start), None, qtype, chain)
}

/// [`follow`] from the chain's own start name, for a reply `surveyed` by [`survey`] (so an
/// answer without a CNAME, the common case, is settled without another walk).
pub fn follow_start(msg: &[u8], surveyed: Survey, qtype: u16, chain: &mut Chain) -> Step {
    follow_at(msg, None, Some(surveyed), qtype, chain)
}

/// `start`: where the walk begins; `None` for the chain's start.
fn follow_at(
    msg: &[u8],
    start: Option<&[u8]>,
    surveyed: Option<Survey>,
    qtype: u16,
    chain: &mut Chain,
) -> Step {
    // Most answers hold no CNAME: then there is no chain to walk, and no need to decompress
    // a single name (or to allocate anything) to know it. A continuing chain (a chase
    // answer) walks on: it found its records already, or has none.
    if chain.links.is_empty() {
        match surveyed.unwrap_or_else(|| survey(msg)).cname {
            None => return Step::Fail(Skip::Malformed),
            Some(false) => return Step::Fail(Skip::NoChain),
            Some(true) => {}
        }
    }
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut s) => {
            let step = walk(msg, start, qtype, chain, &mut s);
            // A huge reply does not leave a huge buffer behind on the thread.
            if s.names.capacity() > 4096 || s.found.capacity() > 256 {
                *s = Scratch::default();
            }
            step
        }
        Err(_) => walk(msg, start, qtype, chain, &mut Scratch::default()),
    })
}

/// [`follow`]'s working buffers, kept per thread: a flattened miss would otherwise allocate
/// both (on a thread that rarely frees what it allocates, so each allocation takes
/// glibc's slow path).
#[derive(Default)]
struct Scratch {
    /// Owners and CNAME targets of the records that can be on the chain, lowercased.
    names: Vec<u8>,
    found: Vec<Found>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

fn walk(
    msg: &[u8],
    start: Option<&[u8]>,
    qtype: u16,
    chain: &mut Chain,
    scratch: &mut Scratch,
) -> Step {
    // One scan: every name of the question and answer sections must decompress, whatever
    // record it owns, since a message with one unreadable name is malformed as a whole (R20).
    // The owners (and CNAME targets) of the records that can be on the chain are kept,
    // lowercased, in one buffer, read straight into it (through a `NameReader`, so a reply
    // of long compression-pointer chains costs what its size does, R22); nothing else is
    // copied until the chain is known.
    let Scratch { names, found } = scratch;
    names.clear();
    found.clear();
    let mut reader = wire::NameReader::default();
    let mut pos = HEADER_LEN;
    for _ in 0..Header::read(msg).map_or(0, |h| h.qdcount) {
        match reader.read(msg, pos, names) {
            Ok(end) => pos = end + 4,
            Err(_) => return Step::Fail(Skip::Malformed),
        }
    }
    let mut malformed = false;
    let walked = wire::walk_records(msg, |r| {
        if malformed || r.section != wire::Section::Answer {
            return;
        }
        let from = names.len();
        if reader.read(msg, r.start, names).is_err() {
            malformed = true;
            return;
        }
        let want = match r.rtype {
            _ if r.class != wire::CLASS_IN => None,
            wire::TYPE_CNAME => Some(0),
            t if t != qtype => None,
            wire::TYPE_A => Some(4),
            wire::TYPE_AAAA => Some(16),
            _ => None,
        };
        // A name not kept stays in the buffer all the same: the reader may point into it.
        let Some(want) = want else {
            return;
        };
        let owner = from..names.len();
        let mut target = 0..0;
        if want == 0 {
            // The target must fill the RDATA exactly (RFC 1035 3.3.1).
            match reader.read(msg, r.rdata.start, names) {
                Ok(end) if end == r.rdata.end => {}
                _ => {
                    malformed = true;
                    return;
                }
            }
            target = owner.end..names.len();
        } else if r.rdata.len() != want {
            malformed = true;
            return;
        }
        found.push(Found {
            rtype: r.rtype,
            ttl: sane_ttl(r.ttl(msg)),
            owner,
            target,
            rdata: r.rdata.clone(),
        });
    });
    if walked.is_err() || malformed {
        return Step::Fail(Skip::Malformed);
    }

    // The name the walk stands at: a range of `names` (the start name is put there too).
    let mut cur = {
        let s = start.unwrap_or(&chain.start);
        names.extend_from_slice(s);
        names.len() - s.len()..names.len()
    };
    let at = |f: &Found, cname: bool, cur: &std::ops::Range<usize>| {
        (f.rtype == wire::TYPE_CNAME) == cname && names[f.owner.clone()] == names[cur.clone()]
    };
    loop {
        let mut at_cur = found.iter().filter(|f| at(f, true, &cur));
        match (at_cur.next(), at_cur.next()) {
            (Some(_), Some(_)) => return Step::Fail(Skip::Ambiguous),
            (Some(link), None) => {
                if found.iter().any(|f| at(f, false, &cur)) {
                    return Step::Fail(Skip::Ambiguous);
                }
                let target = &names[link.target.clone()];
                if chain.visits(target) {
                    return Step::Fail(Skip::Loop);
                }
                if chain.links.len() >= chain.max_hops {
                    return Step::Fail(Skip::TooLong);
                }
                chain.min_ttl = chain.min_ttl.min(link.ttl);
                chain.links.push(Link {
                    owner: Name::from_slice(&names[link.owner.clone()]),
                    target: Name::from_slice(target),
                    ttl: link.ttl,
                });
                cur = link.target.clone();
            }
            (None, _) => {
                let rrs: Rrs = found
                    .iter()
                    .filter(|f| at(f, false, &cur))
                    .map(|f| Rr {
                        rtype: f.rtype,
                        ttl: f.ttl,
                        rdata: SmallVec::from_slice(&msg[f.rdata.clone()]),
                    })
                    .collect();
                if !rrs.is_empty() {
                    if chain.links.is_empty() {
                        return Step::Fail(Skip::NoChain);
                    }
                    return Step::Done(rrs);
                }
                if chain.links.is_empty() {
                    return Step::Fail(Skip::NoChain);
                }
                return Step::Continue(names[cur].to_vec());
            }
        }
    }
}

/// An answer record that can be on a chain, as [`follow`] found it: positions in its name
/// buffer (`target` is empty but for a CNAME) and in the message.
struct Found {
    rtype: u16,
    ttl: u32,
    owner: std::ops::Range<usize>,
    target: std::ops::Range<usize>,
    rdata: std::ops::Range<usize>,
}

/// Whether flattening applies to this question at all (F1, F6).
pub fn eligible(
    cfg: &FlattenConfig,
    qname_lower: &[u8],
    qtype: u16,
    qclass: u16,
    do_bit: bool,
) -> Result<(), Skip> {
    if !cfg.enabled {
        return Err(Skip::Disabled);
    }
    if (qtype != wire::TYPE_A && qtype != wire::TYPE_AAAA) || qclass != wire::CLASS_IN {
        return Err(Skip::NotAddress);
    }
    if do_bit && cfg.dnssec == crate::config::DnssecPolicy::Passthrough {
        return Err(Skip::Dnssec);
    }
    if !cfg.zones.is_empty() && !cfg.zones.iter().any(|z| is_subdomain(qname_lower, z)) {
        return Err(Skip::OutOfScope);
    }
    for x in &cfg.exclude {
        let hit = match x {
            Exclude::FirstLabel(l) => qname_lower.starts_with(l),
            Exclude::Subtree(n) => is_subdomain(qname_lower, n),
        };
        if hit {
            return Err(Skip::Excluded);
        }
    }
    Ok(())
}

/// Whether `name` equals `zone` or lies below it (both lowercased uncompressed wire names).
pub fn is_subdomain(name: &[u8], zone: &[u8]) -> bool {
    let mut pos = 0;
    while pos < name.len() {
        if name[pos..] == *zone {
            return true;
        }
        pos += name[pos] as usize + 1;
    }
    false
}

/// The header rcode of a chase reply ([`survey`] also checks the extended bits).
pub fn rcode(msg: &[u8]) -> Option<u8> {
    Header::read(msg).map(|h| h.rcode())
}

/// Writes the flattened answer: `upstream`'s header flags (AD and TC cleared), the client's
/// `question`, `rrs` with owner = the question name and TTL = `ttl`, and `upstream`'s OPT
/// record if it had one. Returns `None` if the result would exceed 65,535 octets.
pub fn build(upstream: &[u8], question: &[u8], rrs: &[Rr], ttl: u32) -> Option<Vec<u8>> {
    let h = Header::read(upstream)?;
    let mut opt = None;
    wire::walk_records(upstream, |r| {
        if r.rtype == wire::TYPE_OPT && opt.is_none() {
            opt = Some(r.start..r.end());
        }
    })
    .ok()?;
    write(h.flags, question, rrs, ttl, opt.map(|o| &upstream[o]))
}

/// Writes an answer: header `flags` with AD and TC cleared, `question`, `rrs` owned by the
/// question name with TTL `ttl`, and `opt` (a whole OPT record) if given.
pub fn write(
    flags: u16,
    question: &[u8],
    rrs: &[Rr],
    ttl: u32,
    opt: Option<&[u8]>,
) -> Option<Vec<u8>> {
    let size = HEADER_LEN
        + question.len()
        + rrs.iter().map(|r| 12 + r.rdata.len()).sum::<usize>()
        + opt.map_or(0, |o| o.len());
    if size > usize::from(u16::MAX) || rrs.len() > usize::from(u16::MAX) {
        return None;
    }
    let mut out = Vec::with_capacity(size);
    let flags = flags & !(wire::FLAG_AD | wire::FLAG_TC);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(&(rrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, u8::from(opt.is_some())]);
    out.extend_from_slice(question);
    for r in rrs {
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&r.rtype.to_be_bytes());
        out.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(r.rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&r.rdata);
    }
    if let Some(o) = opt {
        out.extend_from_slice(o);
    }
    Some(out)
}

/// The target and TTL of an ALIAS record (TYPE65401, rdata = the target name uncompressed in
/// wire form, as PowerDNS stores it) owned by `owner` in the answer section of `msg`.
pub fn alias_target(msg: &[u8], owner: &[u8]) -> Option<(Vec<u8>, u32)> {
    let mut found = None;
    let mut bad = false;
    let mut name = Vec::with_capacity(32);
    wire::walk_records(msg, |r| {
        if found.is_some()
            || r.section != wire::Section::Answer
            || r.rtype != crate::config::TYPE_ALIAS
        {
            return;
        }
        if wire::read_name(msg, r.start, &mut name).is_err() {
            bad = true;
            return;
        }
        if name != owner {
            return;
        }
        let rdata = &msg[r.rdata.clone()];
        if wire::skip_name(rdata, 0) == Ok(rdata.len()) && rdata.last() == Some(&0) {
            found = Some((rdata.to_ascii_lowercase(), sane_ttl(r.ttl(msg))));
        }
    })
    .ok()?;
    if bad {
        return None;
    }
    found
}

/// The TTL of a flattened answer (F2): the minimum over every link and the final RRset.
pub fn answer_ttl(chain: &Chain, rrs: &[Rr]) -> u32 {
    rrs.iter().map(|r| r.ttl).fold(chain.min_ttl, u32::min)
}

/// A query for `name`/`qtype` as flatdns sends it when chasing: RD=1, EDNS with our UDP size,
/// DO=0 (flattened answers carry no signatures).
pub fn chase_query(name: &[u8], qtype: u16, udp_size: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(HEADER_LEN + name.len() + 15);
    q.extend_from_slice(&[0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    q.extend_from_slice(name);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
    q.extend_from_slice(&[0, 0, 41]);
    q.extend_from_slice(&udp_size.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::hex;

    /// `www.example.` A: one answer (`answer`: type, RDATA), then an OPT with `ext` as its
    /// extended rcode bits.
    fn reply(rcode: u8, answer: &str, ext: u8) -> Vec<u8> {
        let mut m = hex("12348180000100010000000103777777076578616d706c650000010001c00c");
        m[3] |= rcode;
        m.extend_from_slice(&hex(answer));
        m.extend_from_slice(&[0, 0, 41, 4, 208, ext, 0, 0, 0, 0, 0]);
        m
    }

    const A: &str = "000100010000003c0004c0000201";
    const CNAME: &str = "000500010000003c0002c00c";

    #[test]
    fn survey_reads_rcode_extended_bits_and_cnames_in_one_walk() {
        let s = survey(&reply(0, A, 0));
        assert_eq!((s.noerror, s.cname), (true, Some(false)));
        assert_eq!(survey(&reply(0, CNAME, 0)).cname, Some(true));
        // NOERROR in the header, but extended bits set (BADVERS and the like).
        assert!(!survey(&reply(0, A, 1)).noerror);
        assert!(!survey(&reply(3, A, 0)).noerror);
        // Cut inside the answer: judged by the header, no CNAME answer possible.
        let cut = &reply(0, CNAME, 0)[..40];
        assert_eq!(
            survey(cut),
            Survey {
                noerror: true,
                cname: None
            }
        );
        assert!(!survey(&[0x12]).noerror);
    }

    #[test]
    fn only_class_in_cnames_and_addresses_make_the_chain() {
        // www.example. CNAME a.example. in class CH, then in class IN www.example. CNAME
        // b.example. and the A records of a. (one) and b. (two, one of them CH).
        let mut m = hex("12348180000100050000000003777777076578616d706c650000010001");
        m.extend_from_slice(&hex("c00c 0005 0003 0000003c 0004 0161 c010"));
        m.extend_from_slice(&hex("c00c 0005 0001 0000001e 0004 0162 c010"));
        m.extend_from_slice(&hex("c029 0001 0001 0000003c 0004 c0000201"));
        m.extend_from_slice(&hex("c039 0001 0003 0000003c 0004 c0000202"));
        m.extend_from_slice(&hex("c039 0001 0001 0000003c 0004 c0000203"));
        let start = hex("03777777076578616d706c6500");
        let mut chain = Chain::new(&start, 11);
        let Step::Done(rrs) = follow(&m, &start, wire::TYPE_A, &mut chain) else {
            panic!("no answer");
        };
        assert_eq!(chain.links.len(), 1);
        assert_eq!(chain.links[0].target[..], hex("0162076578616d706c6500"));
        assert_eq!(rrs.len(), 1);
        assert_eq!(rrs[0].rdata[..], [192, 0, 2, 3]);
    }
}
