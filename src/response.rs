//! Replies to clients: ID and question echo, TTL ageing, truncation, error replies.
//!
//! An answer that may be given to more than one client (a cache entry, or a result shared by
//! coalesced queries) is kept as a [`Prepared`] message: wire bytes plus the offsets of every
//! TTL. Serving it is one copy and a few in-place patches — the client's ID, the client's exact
//! question bytes (so 0x20 case randomisation survives, RFC 5452 section 9.3), and TTLs counted
//! down by the entry's age — with no parse and no allocation beyond the reply buffer.

use crate::wire::{self, Header, Query, RecordPos, HEADER_LEN};

/// RFC 8914's recommended and DNS Flag Day 2020's UDP payload limit: the largest UDP reply
/// flatdns sends, whatever size the client advertises (R16).
pub const DEFAULT_UDP_CAP: usize = 1232;

/// EDNS values flatdns puts in an OPT record it writes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptFields {
    pub udp_size: u16,
    /// The TTL field: extended rcode, version, flags.
    pub ttl: u32,
}

/// An answer ready to be served to any client whose query has the same cache key.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The message, then the offset of every TTL in it (two octets each, native order): one
    /// allocation per cached answer rather than two.
    buf: Box<[u8]>,
    /// Where the message ends in `buf`.
    wire_len: u16,
    question_end: u16,
    opt: Option<OptFields>,
    /// Where the OPT record's RDLENGTH sits, when the OPT is the last record (so an option
    /// such as our own COOKIE can be appended to the rendered reply).
    opt_rdlen: Option<u16>,
}

impl Prepared {
    /// Prepares a reply for sharing. Options answer the one client that asked — COOKIE
    /// (RFC 7873), ECS (RFC 7871), NSID (RFC 5001 2.2: only to a query that asked), EXPIRE,
    /// KEEPALIVE, PADDING (sized for one reply) ... — so all but Extended DNS Errors, which
    /// describe the answer itself, are removed and never replayed to another (R24); every
    /// TTL passes through `ttl_fix`. Returns `None` for a reply that cannot be scanned or
    /// whose OPT cannot be rewritten safely (OPT not the last record).
    pub fn new(reply: &[u8], ttl_fix: impl Fn(u32) -> u32) -> Option<Prepared> {
        // On the stack for a typical answer (a few records, authority, OPT): no allocation.
        let mut records: smallvec::SmallVec<[RecordPos; 16]> = smallvec::SmallVec::new();
        let question_end = wire::walk_records(reply, |r| records.push(r.clone())).ok()?;
        // More than one OPT is malformed (RFC 6891 6.1.1); stripping only the first would let
        // a second carry one client's options to another.
        let opts = records.iter().filter(|r| r.rtype == wire::TYPE_OPT).count();
        if opts > 1 {
            return None;
        }
        // Bytes after the last record are no part of the message: dropped, so an OPT that
        // ends the records also ends what is stored, and an option appended to it later (our
        // cookie) lands inside it rather than after the junk.
        let end = records.last().map_or(question_end, |r| r.rdata.end);
        // The message, then two octets per TTL (every record but the OPT).
        let mut wire_bytes = Vec::with_capacity(end + 2 * (records.len() - opts));
        wire_bytes.extend_from_slice(&reply[..end]);
        let mut opt = None;
        if let Some(idx) = records.iter().position(|r| r.rtype == wire::TYPE_OPT) {
            let r = &records[idx];
            opt = Some(OptFields {
                udp_size: r.class,
                ttl: r.ttl(reply),
            });
            let rdata = &reply[r.rdata.clone()];
            let opts: Vec<_> = wire::options(rdata).collect::<Result<_, _>>().ok()?;
            if opts.iter().any(|(c, _)| !shareable_option(*c)) {
                if idx + 1 != records.len() {
                    return None;
                }
                let mut kept = Vec::with_capacity(rdata.len());
                for (code, range) in &opts {
                    if shareable_option(*code) {
                        kept.extend_from_slice(&rdata[range.clone()]);
                    }
                }
                wire_bytes.truncate(r.rdata.start - 2);
                wire_bytes.extend_from_slice(&(kept.len() as u16).to_be_bytes());
                wire_bytes.extend_from_slice(&kept);
            }
        }
        // Only an OPT that is the last record: rewriting its options (above) kept it last and
        // its RDLENGTH where it was.
        let opt_rdlen = match records.last() {
            Some(r) if r.rtype == wire::TYPE_OPT => Some(u16::try_from(r.rdata.start - 2).ok()?),
            _ => None,
        };
        let wire_len = u16::try_from(wire_bytes.len()).ok()?;
        for r in records.iter().filter(|r| r.rtype != wire::TYPE_OPT) {
            let ttl = ttl_fix(r.ttl(reply));
            wire::put_u32(&mut wire_bytes, r.ttl_pos, ttl);
            wire_bytes.extend_from_slice(&u16::try_from(r.ttl_pos).ok()?.to_ne_bytes());
        }
        Some(Prepared {
            buf: wire_bytes.into_boxed_slice(),
            wire_len,
            question_end: u16::try_from(question_end).ok()?,
            opt,
            opt_rdlen,
        })
    }

    pub fn wire(&self) -> &[u8] {
        &self.buf[..usize::from(self.wire_len)]
    }

    /// Where the TTLs are in [`Prepared::wire`].
    fn ttl_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        offsets(&self.buf[usize::from(self.wire_len)..])
    }

    /// Lowers every TTL above `max` to `max`.
    pub fn cap_ttls(&mut self, max: u32) {
        let (wire, offs) = self.buf.split_at_mut(usize::from(self.wire_len));
        for off in offsets(offs) {
            if wire::u32_at(wire, off).is_some_and(|t| t > max) {
                wire::put_u32(wire, off, max);
            }
        }
    }

    /// Offset of the OPT's RDLENGTH when the OPT is the last record.
    pub fn opt_rdlen(&self) -> Option<usize> {
        self.opt_rdlen.map(usize::from)
    }
    pub fn header(&self) -> Header {
        // A Prepared message always has a full header (walk_records checked it).
        Header::read(self.wire()).unwrap_or(Header {
            id: 0,
            flags: 0,
            qdcount: 0,
            ancount: 0,
            nscount: 0,
            arcount: 0,
        })
    }
    pub fn len(&self) -> usize {
        usize::from(self.wire_len)
    }
    pub fn is_empty(&self) -> bool {
        self.wire_len == 0
    }
    /// The smallest TTL in the message (after `ttl_fix`), if it has records.
    pub fn min_ttl(&self) -> Option<u32> {
        self.ttl_offsets()
            .filter_map(|o| wire::u32_at(self.wire(), o))
            .min()
    }

    /// Writes this answer for a client: its ID, its question bytes, TTLs aged by `age_secs`;
    /// a truncated reply (TC=1, question only) when longer than `limit`.
    ///
    /// Returns false when the stored question does not line up with the client's (not the
    /// same name length): the caller treats that as a miss rather than send a wrong question.
    pub fn render(
        &self,
        id: u16,
        question: &[u8],
        age_secs: u32,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let age = |ttl: u32| ttl.saturating_sub(age_secs);
        let fix = (age_secs > 0).then_some(&age as &dyn Fn(u32) -> u32);
        self.render_ttl(id, question, fix, limit, out)
    }

    /// Like [`Prepared::render`], with every TTL set to `ttl` (serve-stale, RFC 8767).
    pub fn render_stale(
        &self,
        id: u16,
        question: &[u8],
        ttl: u32,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        self.render_ttl(id, question, Some(&|_| ttl), limit, out)
    }

    fn render_ttl(
        &self,
        id: u16,
        question: &[u8],
        fix: Option<&dyn Fn(u32) -> u32>,
        limit: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        if HEADER_LEN + question.len() != self.question_end as usize {
            return false;
        }
        out.clear();
        if self.len() > limit {
            truncated(id, self.header().flags, question, self.opt, out);
            return true;
        }
        out.extend_from_slice(self.wire());
        wire::put_u16(out, 0, id);
        out[HEADER_LEN..self.question_end as usize].copy_from_slice(question);
        if let Some(fix) = fix {
            for off in self.ttl_offsets() {
                let ttl = wire::u32_at(out, off).unwrap_or(0);
                wire::put_u32(out, off, fix(ttl));
            }
        }
        true
    }
}

/// The TTL offsets stored after a prepared message.
fn offsets(buf: &[u8]) -> impl Iterator<Item = usize> + '_ {
    buf.chunks_exact(2)
        .map(|c| usize::from(u16::from_ne_bytes([c[0], c[1]])))
}

/// Whether an EDNS option in an answer may be given to clients other than the one that asked:
/// only Extended DNS Errors (RFC 8914), which describe the answer.
fn shareable_option(code: u16) -> bool {
    code == wire::OPT_EDE
}

/// The TTL rules applied to every record before it is cached or shared (R6): a TTL with the
/// top bit set counts as 0 (RFC 2181 section 8), then it is clamped into `[min, max]`.
pub fn clamp_ttl(ttl: u32, min: u32, max: u32) -> u32 {
    let ttl = if ttl & 0x8000_0000 != 0 { 0 } else { ttl };
    ttl.clamp(min, max.max(min))
}

/// Sends a reply that is too long for UDP as TC=1 with the question only (RFC 2181 9,
/// RFC 6891 7), so the client retries over TCP. The OPT is written afresh without options.
pub fn truncated(id: u16, flags: u16, question: &[u8], opt: Option<OptFields>, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(flags | wire::FLAG_TC | wire::FLAG_QR).to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(opt.is_some())]);
    out.extend_from_slice(question);
    if let Some(o) = opt {
        push_opt(out, o);
    }
}

/// An OPT record with `o`'s values and no options.
pub fn opt_record(o: OptFields) -> [u8; 11] {
    let mut r = [0u8; 11];
    r[1..3].copy_from_slice(&wire::TYPE_OPT.to_be_bytes());
    r[3..5].copy_from_slice(&o.udp_size.to_be_bytes());
    r[5..9].copy_from_slice(&o.ttl.to_be_bytes());
    r
}

fn push_opt(out: &mut Vec<u8>, o: OptFields) {
    out.push(0);
    out.extend_from_slice(&wire::TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&o.udp_size.to_be_bytes());
    out.extend_from_slice(&o.ttl.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
}

/// Fits a reply received from the upstream for one client: the client's ID, and TC=1 with
/// the question only when it exceeds `limit`. Everything else stays byte-identical (F5).
pub fn passthrough(reply: &[u8], id: u16, question: &[u8], limit: usize, out: &mut Vec<u8>) {
    out.clear();
    if reply.len() > limit {
        let flags = wire::u16_at(reply, 2).unwrap_or(wire::FLAG_QR);
        let opt = opt_of(reply);
        truncated(id, flags, question, opt, out);
        return;
    }
    out.extend_from_slice(reply);
    wire::put_u16(out, 0, id);
}

/// The OPT fields of a message, if it has one and can be scanned.
pub fn opt_of(msg: &[u8]) -> Option<OptFields> {
    let mut opt = None;
    wire::walk_records(msg, |r| {
        if r.rtype == wire::TYPE_OPT && opt.is_none() {
            opt = Some(OptFields {
                udp_size: r.class,
                ttl: r.ttl(msg),
            });
        }
    })
    .ok()?;
    opt
}

/// The OPT flatdns writes in replies it makes itself: our UDP size, version 0, the client's
/// DO bit echoed (RFC 3225), other flags and options not echoed (RFC 6891 6.1.4).
pub fn own_opt(q: &Query<'_>, ext_rcode: u8) -> Option<OptFields> {
    q.edns.as_ref().and_then(|e| opt_for(e, ext_rcode))
}

/// [`own_opt`] for a query's OPT record.
pub fn opt_for(e: &wire::Edns, ext_rcode: u8) -> Option<OptFields> {
    Some(OptFields {
        udp_size: DEFAULT_UDP_CAP as u16,
        ttl: (u32::from(ext_rcode) << 24) | (u32::from(e.flags) & wire::EDNS_DO),
    })
}

/// An error reply (FORMERR, SERVFAIL, REFUSED, NOTIMP, BADVERS) with the client's question.
///
/// Copies opcode, RD and CD from the query; RA is set when recursion was asked for, because
/// flatdns serves recursion on behalf of its upstreams. `question` is `None` when the query's
/// question could not be read (FORMERR with QDCOUNT 0).
pub fn error(
    id: u16,
    query_flags: u16,
    question: Option<&[u8]>,
    rcode: u8,
    opt: Option<OptFields>,
    out: &mut Vec<u8>,
) {
    out.clear();
    let flags = reply_flags(query_flags) | u16::from(rcode & 0x0f);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[
        0,
        u8::from(question.is_some()),
        0,
        0,
        0,
        0,
        0,
        u8::from(opt.is_some()),
    ]);
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
    if let Some(o) = opt {
        push_opt(out, o);
    }
}

/// Header flags of a reply flatdns writes itself: QR, the query's opcode, RD and CD, and RA
/// when recursion was asked for.
pub fn reply_flags(query_flags: u16) -> u16 {
    let mut flags = wire::FLAG_QR | (query_flags & (0x7800 | wire::FLAG_RD | wire::FLAG_CD));
    if query_flags & wire::FLAG_RD != 0 {
        flags |= wire::FLAG_RA;
    }
    flags
}

/// Error reply for a scanned query.
pub fn error_for(q: &Query<'_>, rcode: u8, out: &mut Vec<u8>) {
    error(
        q.id(),
        q.header.flags,
        Some(q.question()),
        rcode,
        own_opt(q, 0),
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// www.example. A 192.0.2.1 TTL 300 with an OPT carrying a cookie.
    fn reply() -> Vec<u8> {
        let mut m = vec![0xab, 0xcd, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 1];
        m.extend_from_slice(b"\x03www\x07example\x00\x00\x01\x00\x01");
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1]);
        m.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 12, 0, 10, 0, 8]);
        m.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        m
    }

    #[test]
    fn render_patches_id_question_and_ttl() {
        let p = Prepared::new(&reply(), |t| clamp_ttl(t, 0, 86400)).unwrap();
        // Cookie stripped: OPT rdlen now 0.
        assert_eq!(&p.wire()[p.len() - 2..], &[0, 0]);
        let mut out = Vec::new();
        let q = b"\x03WwW\x07exAMple\x00\x00\x01\x00\x01";
        assert!(p.render(7, q, 100, 1232, &mut out));
        assert_eq!(&out[0..2], &[0, 7]);
        assert_eq!(&out[12..12 + q.len()], q);
        let ttl_pos = 12 + q.len() + 6;
        assert_eq!(wire::u32_at(&out, ttl_pos), Some(200));
        // Older than the TTL: zero, never wrapped.
        assert!(p.render(7, q, 1000, 1232, &mut out));
        assert_eq!(wire::u32_at(&out, ttl_pos), Some(0));
    }

    #[test]
    fn bytes_after_the_last_record_are_not_stored() {
        let clean = Prepared::new(&reply(), |t| t).unwrap();
        let mut junk = reply();
        junk.extend_from_slice(b"XYZ");
        let p = Prepared::new(&junk, |t| t).unwrap();
        assert_eq!(p.wire(), clean.wire());
        // The OPT still ends the message: its RDLENGTH is the last two octets.
        assert_eq!(p.opt_rdlen(), Some(p.len() - 2));
    }

    #[test]
    fn render_truncates_over_limit() {
        let p = Prepared::new(&reply(), |t| t).unwrap();
        let mut out = Vec::new();
        let q = &reply()[12..29];
        assert!(p.render(1, q, 0, 40, &mut out));
        let h = Header::read(&out).unwrap();
        assert!(h.has(wire::FLAG_TC));
        assert_eq!((h.qdcount, h.ancount, h.arcount), (1, 0, 1));
        assert_eq!(out.len(), 12 + q.len() + 11);
    }

    #[test]
    fn ttl_top_bit_counts_as_zero() {
        assert_eq!(clamp_ttl(0x8000_0001, 0, 86400), 0);
        assert_eq!(clamp_ttl(1_000_000, 0, 86400), 86400);
        assert_eq!(clamp_ttl(5, 30, 86400), 30);
    }
}
