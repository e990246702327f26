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
    let mut pos = HEADER_LEN;
    for _ in 0..h.qdcount {
        // `Question::parse`: a name, then type and class.
        match name_end(msg, pos, limit) {
            Some(end) if end + 4 <= limit => pos = end + 4,
            _ => return Some((false, 0)),
        }
    }
    let mut opts = 0;
    let records = usize::from(h.ancount) + usize::from(h.nscount) + usize::from(h.arcount);
    for _ in 0..records {
        // `ParsedRecord::parse`: owner, type, class, TTL, RDLENGTH, then the data in range.
        let Some(fixed) = name_end(msg, pos, limit).filter(|&f| f + 10 <= limit) else {
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
            wire::TYPE_CNAME | TYPE_NS | TYPE_PTR => name_end(msg, start, end) == Some(end),
            TYPE_MX => rdlen >= 2 && name_end(msg, start + 2, end) == Some(end),
            wire::TYPE_SOA => name_end(msg, start, end)
                .and_then(|p| name_end(msg, p, end))
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

/// `ParsedName::parse` over `msg[..limit]` from `pos`: where the name ends in the linear
/// order (just past its root label or its first compression pointer), or `None` if it does
/// not parse. As in `domain`: a label type of 0x40-0xBF is an error; every pointer must point
/// before its own position; at most 255 pointers; the labels may add up to 254 octets (255
/// with the root); every octet read, after a jump too, lies before `limit`.
fn name_end(msg: &[u8], pos: usize, limit: usize) -> Option<usize> {
    let mut len = 0;
    let (end, mut ptr) = labels(msg, pos, limit, &mut len)?;
    // Just past the pointer being followed.
    let mut at = end;
    for _ in 0..255 {
        let Some(target) = ptr else {
            return Some(end);
        };
        if target >= at - 2 {
            return None;
        }
        (at, ptr) = labels(msg, target, limit, &mut len)?;
    }
    ptr.is_none().then_some(end)
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

    #[test]
    fn agrees_with_domain_on_a_typical_reply_and_its_cuts() {
        let r = reply();
        assert_eq!(scan(&r), Some(true));
        assert!(super::super::well_formed_domain(&r));
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
