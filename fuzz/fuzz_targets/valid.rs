//! Fuzz target `valid`: `upstream::valid::scan`, our scan of an upstream reply for the common
//! record types, against the full parse with `domain` it stands in for (R3, R20). Whenever
//! the scan decides (`Some`), it must decide as `domain` does; a reply it passes must walk
//! (`wire::walk_records`) with as many OPT records as it counted.
//!
//! The bytes are tried as a reply as they are, and they also drive a generator of replies
//! made mostly of the modelled types: zero to two questions; names of labels and compression
//! pointers (backward, forward, to themselves, into chains of up to 300 pointers that an OPT
//! option carries); RDATA sometimes a little short or long; OPT options that do or do not
//! fit; counts off by one; cut messages. Raw bytes rarely get past the first record; the
//! generated replies reach every rule.
#![no_main]

use arbitrary::{Result, Unstructured};
use flatdns::upstream::{valid, well_formed_domain};
use flatdns::wire;
use libfuzzer_sys::fuzz_target;

fn check(msg: &[u8]) {
    if let Some((ok, opts)) = valid::scan_counting(msg) {
        assert_eq!(
            ok,
            well_formed_domain(msg),
            "scan and domain disagree on {msg:02x?}"
        );
        // `upstream::matches` counts OPT records with the scan instead of a walk.
        if ok {
            let mut walked = 0;
            let walk =
                wire::walk_records(msg, |r| walked += usize::from(r.rtype == wire::TYPE_OPT));
            assert!(walk.is_ok(), "scanned but does not walk: {msg:02x?}");
            assert_eq!(opts, walked, "OPT counts differ on {msg:02x?}");
        }
    }
}

/// A name at the end of `out`: labels, then the root or a pointer (sometimes to the end of a
/// pointer chain in `chains`).
fn name(u: &mut Unstructured, out: &mut Vec<u8>, chains: &[usize]) -> Result<()> {
    for _ in 0..u.int_in_range(0..=4)? {
        let len = match u.int_in_range(0..=9)? {
            0 => u.int_in_range(0..=255)?, // any type octet, 0x40-0xbf too
            9 => 63,
            n => n,
        };
        out.push(len);
        for _ in 0..len.min(63) {
            out.push(u.arbitrary()?);
        }
    }
    if u.ratio(1, 2)? {
        out.push(0);
    } else {
        // A pointer: usually back into the message so far, sometimes anywhere.
        let at = out.len();
        let target = if !chains.is_empty() && u.ratio(1, 2)? {
            *u.choose(chains)?
        } else if at > 0 && u.ratio(3, 4)? {
            u.int_in_range(0..=at - 1)?
        } else {
            u.int_in_range(0..=at + 8)?
        };
        out.push(0xc0 | ((target >> 8) as u8 & 0x3f));
        out.push(target as u8);
    }
    Ok(())
}

fn reply(u: &mut Unstructured) -> Result<Vec<u8>> {
    let qd: u8 = *u.choose(&[1, 1, 1, 0, 2])?;
    let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, qd, 0, 0, 0, 0, 0, 0];
    let mut chains = Vec::new();
    for _ in 0..qd {
        name(u, &mut m, &chains)?;
        m.extend_from_slice(&[0, 1, 0, 1]);
    }
    let n: u8 = u.int_in_range(0..=6)?;
    for _ in 0..n {
        name(u, &mut m, &chains)?;
        let rtype: u16 = *u.choose(&[1, 28, 5, 2, 12, 15, 6, 41, 16, 99])?;
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        let at = m.len();
        m.extend_from_slice(&[0, 0]);
        match rtype {
            1 => m.extend_from_slice(&[192, 0, 2, 1]),
            28 => m.extend_from_slice(&[0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            15 => {
                m.extend_from_slice(&[0, 10]);
                name(u, &mut m, &chains)?;
            }
            6 => {
                name(u, &mut m, &chains)?;
                name(u, &mut m, &chains)?;
                m.extend_from_slice(&[0; 20]);
            }
            41 if m.len() > 12 && u.ratio(1, 3)? => {
                // One option whose data is a chain of pointers, each to the one before, the
                // first to the question (or wherever): names may end on any of them.
                let hops: u16 = *u.choose(&[1, 2, 100, 253, 254, 255, 256, 300])?;
                m.extend_from_slice(&[0, 99]);
                m.extend_from_slice(&(2 * hops).to_be_bytes());
                let mut prev = 12;
                for _ in 0..hops {
                    let at = m.len();
                    m.extend_from_slice(&(0xc000 | (prev as u16 & 0x3fff)).to_be_bytes());
                    prev = at;
                }
                chains.push(prev);
                chains.push(prev - 2);
            }
            41 => {
                for _ in 0..u.int_in_range(0..=2)? {
                    let len: u8 = u.int_in_range(0..=6)?;
                    m.extend_from_slice(&[0, 10, 0, len]);
                    m.extend(std::iter::repeat_n(7, len.into()));
                }
            }
            16 | 99 => m.extend_from_slice(b"\x03abc"),
            _ => name(u, &mut m, &chains)?,
        }
        let mut rdlen = (m.len() - at - 2) as i32;
        if u.ratio(1, 5)? {
            rdlen += u.int_in_range(-3..=3)?;
        }
        let rdlen = rdlen.clamp(0, 0xffff) as u16;
        m[at..at + 2].copy_from_slice(&rdlen.to_be_bytes());
    }
    // Answer, authority and additional counts that add up to the records written (or not).
    let a = u.int_in_range(0..=n)?;
    let b = u.int_in_range(0..=n - a)?;
    let mut c = n - a - b;
    if u.ratio(1, 8)? {
        c = c.wrapping_add(1);
    }
    m[7] = a;
    m[9] = b;
    m[11] = c;
    if u.ratio(1, 8)? {
        let cut = u.int_in_range(0..=m.len())?;
        m.truncate(cut);
    }
    Ok(m)
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Ok(m) = reply(&mut Unstructured::new(data)) {
        check(&m);
    }
});
