//! Whether an upstream reply parses (R3, R20), for the record types nearly every reply is made
//! of, without building `domain`'s message model.
//!
//! [`scan`] makes exactly the decision [`super::well_formed_domain`] makes (a full parse with
//! `domain`, every record through `AllRecordData`) for a reply whose records are all A, AAAA,
//! CNAME, NS, PTR, MX, SOA or OPT; for any other type it answers `None` and the caller asks
//! `domain`. The rules below are `domain` 0.12's, restated; the fuzz target `valid` checks the
//! two against each other on arbitrary bytes and on generated replies.
//!
//! Why: the full parse cost about 1.5 us of CPU per miss on this machine (measured by leaving
//! it out), most of it in cold generic code, against ~0.1 us for this scan.

use crate::wire::{self, Header, HEADER_LEN};

const TYPE_NS: u16 = 2;
const TYPE_PTR: u16 = 12;
const TYPE_MX: u16 = 15;

/// `Some(parses)` when every record's type is one modelled here, else `None`.
pub fn scan(msg: &[u8]) -> Option<bool> {
    scan_counting(msg).map(|(parses, _)| parses)
}

/// [`scan`], with the number of OPT records when the message parses (a message that parses
/// here also walks with [`wire::walk_records`], whose checks are a subset of these).
pub fn scan_counting(msg: &[u8]) -> Option<(bool, usize)> {
    // `Message::from_slice`: a header, nothing more.
    let Some(h) = Header::read(msg) else {
        return Some((false, 0));
    };
    let limit = msg.len();
    let mut names = Names::new(msg);
    let mut pos = HEADER_LEN;
    for _ in 0..h.qdcount {
        // `Question::parse`: a name, then type and class.
        match names.end(pos, limit) {
            Some(end) if end + 4 <= limit => pos = end + 4,
            _ => return Some((false, 0)),
        }
    }
    let mut opts = 0;
    let records = usize::from(h.ancount) + usize::from(h.nscount) + usize::from(h.arcount);
    for _ in 0..records {
        // `ParsedRecord::parse`: owner, type, class, TTL, RDLENGTH, then the data in range.
        let Some(fixed) = names.end(pos, limit).filter(|&f| f + 10 <= limit) else {
            return Some((false, 0));
        };
        let rtype = wire::u16_at(msg, fixed).unwrap_or(0);
        let rdlen = usize::from(wire::u16_at(msg, fixed + 8).unwrap_or(0));
        let (start, end) = (fixed + 10, fixed + 10 + rdlen);
        if end > limit {
            return Some((false, 0));
        }
        // `parse_into_any_record`: the type's parser over exactly the RDATA (its names may
        // point back anywhere before it, but may not run past its end), nothing left over.
        let ok = match rtype {
            wire::TYPE_A => rdlen == 4,
            wire::TYPE_AAAA => rdlen == 16,
            wire::TYPE_CNAME | TYPE_NS | TYPE_PTR => names.end(start, end) == Some(end),
            TYPE_MX => rdlen >= 2 && names.end(start + 2, end) == Some(end),
            wire::TYPE_SOA => names
                .end(start, end)
                .and_then(|p| names.end(p, end))
                .is_some_and(|p| p + 20 == end),
            wire::TYPE_OPT => {
                opts += 1;
                options_fit(&msg[start..end])
            }
            _ => return None,
        };
        if !ok {
            return Some((false, 0));
        }
        pos = end;
    }
    Some((true, opts))
}

/// A name may take this many compression pointers before the scan reads the message's
/// names through [`Names`]'s memo. Real compressors point once or twice per name.
const DIRECT_POINTERS: usize = 8;

/// Compression pointers reach only the first 16 KiB of a message (14-bit offsets).
const POINTABLE: usize = 1 << 14;

/// The names of one message, read with `domain`'s rules ([`Names::end`]).
///
/// Why the memo: a name may take up to 255 compression pointers, each to the one before, and
/// a 64 KiB reply holds ~4,000 names. Read one by one, such a reply took ~5 ms to check,
/// where R22 allows 5 ms for the whole of parsing, flattening and encoding. A name that
/// takes more than [`DIRECT_POINTERS`] pointers turns the memo on for the rest of the
/// message: what the name from each pointed-to position comes to (its label octets, its
/// pointers and the furthest octet read), so each position is read once and such a reply
/// costs what its size does. Nothing a reply is judged by changes: the memo only saves
/// reading the same octets again.
struct Names<'a> {
    msg: &'a [u8],
    /// Empty until a name needs it; then one entry per position pointers can reach:
    /// [`Suffix`] packed, 0 while unknown.
    memo: Vec<u64>,
    /// The name being read: each run of labels on the way not yet in the memo, as (start,
    /// label octets, end, whether a pointer ends it).
    runs: Vec<(usize, usize, usize, bool)>,
}

/// What the name from a position comes to: label octets (with their length octets, not the
/// root), compression pointers, and the end of the furthest octet read.
#[derive(Clone, Copy)]
struct Suffix {
    octets: usize,
    pointers: usize,
    reach: usize,
}

impl Suffix {
    fn pack(self) -> u64 {
        // octets < 255 and pointers <= 255 when stored; reach > 0 (past an octet read).
        (self.reach as u64) << 16 | (self.pointers as u64) << 8 | self.octets as u64
    }

    fn unpack(v: u64) -> Option<Suffix> {
        (v != 0).then_some(Suffix {
            octets: (v & 0xff) as usize,
            pointers: (v >> 8 & 0xff) as usize,
            reach: (v >> 16) as usize,
        })
    }
}

impl<'a> Names<'a> {
    fn new(msg: &'a [u8]) -> Names<'a> {
        Names {
            msg,
            memo: Vec::new(),
            runs: Vec::new(),
        }
    }

    /// `ParsedName::parse` over `msg[..limit]` from `pos`: where the name ends in the linear
    /// order (just past its root label or its first compression pointer), or `None` if it
    /// does not parse. As in `domain`: a label type of 0x40-0xBF is an error; every pointer
    /// must point before its own position; at most 255 pointers; the labels may add up to
    /// 254 octets (255 with the root); every octet read, after a jump too, lies before
    /// `limit`.
    fn end(&mut self, pos: usize, limit: usize) -> Option<usize> {
        if !self.memo.is_empty() {
            return self.end_memo(pos, limit);
        }
        let msg = self.msg;
        let mut len = 0;
        let (end, mut ptr) = labels(msg, pos, limit, &mut len)?;
        // Just past the pointer being followed.
        let mut at = end;
        for hop in 0..255 {
            let Some(target) = ptr else {
                return Some(end);
            };
            if target >= at - 2 {
                return None;
            }
            if hop == DIRECT_POINTERS {
                self.memo = vec![0; msg.len().min(POINTABLE)];
                return self.end_memo(pos, limit);
            }
            (at, ptr) = labels(msg, target, limit, &mut len)?;
        }
        ptr.is_none().then_some(end)
    }

    /// [`Names::end`] through the memo.
    fn end_memo(&mut self, pos: usize, limit: usize) -> Option<usize> {
        let msg = self.msg;
        let mut len = 0;
        let (end, ptr) = labels(msg, pos, limit, &mut len)?;
        let Some(target) = ptr else {
            return Some(end);
        };
        if target >= end - 2 {
            return None;
        }
        let rest = self.suffix(target)?;
        (len + rest.octets < 255 && rest.pointers < 255 && rest.reach <= limit).then_some(end)
    }

    /// What the name from `pos` (a pointer's target) comes to, read with no limit but the
    /// message's, from the memo where it can be and into it; `None` if no name through it
    /// can parse.
    fn suffix(&mut self, mut pos: usize) -> Option<Suffix> {
        let msg = self.msg;
        self.runs.clear();
        let mut rest = loop {
            if let Some(known) = self.memo.get(pos).copied().and_then(Suffix::unpack) {
                break known;
            }
            let mut len = 0;
            let (end, ptr) = labels(msg, pos, msg.len(), &mut len)?;
            self.runs.push((pos, len, end, ptr.is_some()));
            match ptr {
                None => {
                    break Suffix {
                        octets: 0,
                        pointers: 0,
                        reach: 0,
                    }
                }
                // A name through more than 255 pointers never parses.
                Some(_) if self.runs.len() > 255 => return None,
                Some(target) if target >= end - 2 => return None,
                Some(target) => pos = target,
            }
        };
        for &(start, len, end, pointer) in self.runs.iter().rev() {
            rest = Suffix {
                octets: rest.octets + len,
                pointers: rest.pointers + usize::from(pointer),
                reach: rest.reach.max(end),
            };
            if rest.octets >= 255 || rest.pointers > 255 {
                return None;
            }
            if let Some(slot) = self.memo.get_mut(start) {
                *slot = rest.pack();
            }
        }
        Some(rest)
    }
}

/// Labels from `pos` up to the root (`(just past it, None)`) or a compression pointer
/// (`(just past it, Some(target))`), adding their lengths to `len`.
fn labels(
    msg: &[u8],
    mut pos: usize,
    limit: usize,
    len: &mut usize,
) -> Option<(usize, Option<usize>)> {
    let byte = |p: usize| if p < limit { msg.get(p).copied() } else { None };
    loop {
        match byte(pos)? {
            0 => return Some((pos + 1, None)),
            l @ 1..=0x3f => {
                let l = usize::from(l);
                if pos + 1 + l > limit {
                    return None;
                }
                pos += 1 + l;
                *len += l + 1;
                if *len >= 255 {
                    return None;
                }
            }
            hi @ 0xc0..=0xff => {
                let lo = byte(pos + 1)?;
                let target = (usize::from(hi & 0x3f) << 8) | usize::from(lo);
                return Some((pos + 2, Some(target)));
            }
            _ => return None,
        }
    }
}

/// `Opt::check_slice`: options (code, length, data) that fill the RDATA exactly.
fn options_fit(mut rdata: &[u8]) -> bool {
    while !rdata.is_empty() {
        let Some(len) = wire::u16_at(rdata, 2) else {
            return false;
        };
        match rdata.get(4 + usize::from(len)..) {
            Some(rest) => rdata = rest,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::hex;

    /// www.example. A: CNAME to a.example. (compressed), its A, an SOA, an OPT with a cookie.
    fn reply() -> Vec<u8> {
        hex("1234 8180 0001 0002 0001 0001
             03777777 076578616d706c65 00 0001 0001
             c00c 0005 0001 0000003c 0004 0161 c010
             c029 0001 0001 0000003c 0004 c0000201
             c010 0006 0001 0000003c 0018 c010 c010 00000001 00000002 00000003 00000004 00000005
             00 0029 1000 00000000 000c 000a 0008 0102030405060708")
    }

    /// The scan decides as `domain` on every cut of `r` (the whole of it excluded).
    fn agrees_on_every_cut(r: &[u8]) {
        for cut in 0..r.len() {
            let c = &r[..cut];
            assert_eq!(
                scan(c),
                Some(super::super::well_formed_domain(c)),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn agrees_with_domain_on_a_typical_reply_and_its_cuts() {
        let r = reply();
        assert_eq!(scan(&r), Some(true));
        assert!(super::super::well_formed_domain(&r));
        agrees_on_every_cut(&r);
    }

    #[test]
    fn pointers_must_point_back_and_stay_inside_their_rdata() {
        let mut r = reply();
        // The CNAME target's pointer (at 43) aimed at itself, then forward.
        for target in [43u8, 60] {
            r[44] = target;
            assert_eq!(scan(&r), Some(false));
            assert!(!super::super::well_formed_domain(&r));
        }
        // An RDLENGTH one short leaves the target's pointer outside the RDATA.
        let mut r = reply();
        r[40] = 3;
        assert_eq!(scan(&r), Some(false));
    }

    /// A query for `a.` answered by an OPT whose option data holds `hops - 1` compression
    /// pointers, each to the one before (the first to the question name), then an A record
    /// owned by a pointer to the last: its owner follows `hops` pointers.
    fn pointer_chain(hops: usize) -> Vec<u8> {
        let mut m = hex("0001 8180 0001 0002 0000 0000 0161 00 0001 0001");
        let data = 2 * (hops - 1);
        m.extend_from_slice(&hex("00 0029 1000 00000000"));
        m.extend_from_slice(&((data + 4) as u16).to_be_bytes());
        m.extend_from_slice(&[0, 99]);
        m.extend_from_slice(&(data as u16).to_be_bytes());
        let mut prev = 12;
        for _ in 0..hops - 1 {
            let at = m.len();
            m.extend_from_slice(&(0xc000 | prev as u16).to_be_bytes());
            prev = at;
        }
        m.extend_from_slice(&(0xc000 | prev as u16).to_be_bytes());
        m.extend_from_slice(&hex("0001 0001 0000003c 0004 c0000201"));
        m
    }

    #[test]
    fn at_most_255_pointers_per_name_as_in_domain() {
        for (hops, ok) in [
            (1, true),
            (254, true),
            (255, true),
            (256, false),
            (300, false),
        ] {
            let m = pointer_chain(hops);
            assert_eq!(scan(&m), Some(ok), "{hops} pointers");
            assert_eq!(super::super::well_formed_domain(&m), ok, "{hops} pointers");
        }
    }

    #[test]
    fn the_memo_agrees_with_domain_on_long_chains_and_their_cuts() {
        // 20 pointers: the memo is on from the A record's owner. Then a second A record owned
        // by a pointer to the first's owner (21 pointers, from the memo), and a third owned
        // by 253 octets of labels in front of a pointer to the second's, whose labels (the
        // question's `a`) make 255: one too many, found in the memo's sum.
        let mut m = pointer_chain(20);
        let first = m.len() - 16;
        m[7] = 3;
        m.extend_from_slice(&(0xc000 | first as u16).to_be_bytes());
        m.extend_from_slice(&hex("0001 0001 0000003c 0004 c0000202"));
        let ok = m.clone();
        let second = m.len() - 16;
        m[7] = 4;
        for len in [50u8, 50, 50, 50, 48] {
            m.push(len);
            m.extend(std::iter::repeat_n(b'z', len.into()));
        }
        m.extend_from_slice(&(0xc000 | second as u16).to_be_bytes());
        m.extend_from_slice(&hex("0001 0001 0000003c 0004 c0000203"));
        assert_eq!(scan(&ok), Some(true));
        assert_eq!(scan(&m), Some(false));
        assert!(!super::super::well_formed_domain(&m));
        agrees_on_every_cut(&ok);
        agrees_on_every_cut(&m);
    }

    #[test]
    fn names_up_to_255_octets_as_in_domain() {
        // Question names of 63-octet labels and one shorter label: 254 octets of labels
        // plus the root parse, 255 plus the root do not.
        for (last, ok) in [(61u8, true), (62, false)] {
            let mut m = hex("0001 8180 0001 0000 0000 0000");
            for _ in 0..3 {
                m.push(63);
                m.extend_from_slice(&[b'x'; 63]);
            }
            m.push(last);
            m.extend(std::iter::repeat_n(b'y', last.into()));
            m.extend_from_slice(&hex("00 0001 0001"));
            assert_eq!(scan(&m), Some(ok), "last label {last}");
            assert_eq!(
                super::super::well_formed_domain(&m),
                ok,
                "last label {last}"
            );
        }
    }

    #[test]
    fn other_types_are_left_to_domain() {
        let mut r = reply();
        r[48] = 16; // the A record becomes a TXT
        assert_eq!(scan(&r), None);
    }
}
