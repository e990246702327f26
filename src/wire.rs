//! Wire-format scanning for the hot path.
//!
//! A cache hit must not pay for a full parse (see `cache.rs`), so the few facts the hot path
//! needs — the question, the OPT record, where every TTL sits — are read here straight off the
//! bytes. Everything is bounds-checked and linear: names are *skipped* (a compression pointer
//! ends a name, it is never followed), so a hostile message cannot make this loop or over-read
//! (R20). Code that needs names decompressed (flattening) uses the `domain` crate instead.

use std::ops::Range;

/// Length of the fixed DNS header (RFC 1035 section 4.1.1).
pub const HEADER_LEN: usize = 12;
/// Longest name on the wire (RFC 1035 section 2.3.4).
pub const MAX_NAME_LEN: usize = 255;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_RRSIG: u16 = 46;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;

pub const OPCODE_QUERY: u8 = 0;
pub const OPCODE_NOTIFY: u8 = 4;
pub const OPCODE_UPDATE: u8 = 5;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;
/// BADVERS is extended rcode 16: 1 in the OPT's upper bits, 0 in the header.
pub const EXT_RCODE_BADVERS: u8 = 1;

pub const OPT_NSID: u16 = 3;
pub const OPT_ECS: u16 = 8;
pub const OPT_EXPIRE: u16 = 9;
pub const OPT_COOKIE: u16 = 10;
pub const OPT_CHAIN: u16 = 13;
pub const OPT_EDE: u16 = 15;
pub const OPT_ZONEVERSION: u16 = 19;

// Header flag bits (second and third octet as one u16).
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_AD: u16 = 0x0020;
pub const FLAG_CD: u16 = 0x0010;
/// DO bit in the OPT record's TTL field (RFC 3225).
pub const EDNS_DO: u32 = 0x0000_8000;

/// Why a message could not be scanned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message shorter than its contents claim")]
    Short,
    #[error("bad label or name")]
    BadName,
    #[error("more than one OPT record or OPT not at the root")]
    BadOpt,
}

#[inline]
pub fn u16_at(b: &[u8], pos: usize) -> Option<u16> {
    let s = b.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

#[inline]
pub fn u32_at(b: &[u8], pos: usize) -> Option<u32> {
    let s = b.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

#[inline]
pub fn put_u16(b: &mut [u8], pos: usize, v: u16) {
    if let Some(s) = b.get_mut(pos..pos + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

#[inline]
pub fn put_u32(b: &mut [u8], pos: usize, v: u32) {
    if let Some(s) = b.get_mut(pos..pos + 4) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

/// Header fields of a message at least [`HEADER_LEN`] long.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn read(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            id: u16_at(b, 0)?,
            flags: u16_at(b, 2)?,
            qdcount: u16_at(b, 4)?,
            ancount: u16_at(b, 6)?,
            nscount: u16_at(b, 8)?,
            arcount: u16_at(b, 10)?,
        })
    }
    pub fn opcode(&self) -> u8 {
        ((self.flags >> 11) & 0x0f) as u8
    }
    pub fn rcode(&self) -> u8 {
        (self.flags & 0x000f) as u8
    }
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Returns the offset just past the name starting at `pos`, without following pointers.
///
/// Rejects labels over 63 octets (the 0x40/0x80 label types are unassigned or obsolete) and
/// names whose uncompressed part exceeds 255 octets.
pub fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize, WireError> {
    let mut len = 0usize;
    loop {
        let b = *msg.get(pos).ok_or(WireError::Short)?;
        match b & 0xc0 {
            0x00 if b == 0 => return Ok(pos + 1),
            0x00 => {
                len += b as usize + 1;
                if len + 1 > MAX_NAME_LEN {
                    return Err(WireError::BadName);
                }
                pos += b as usize + 1;
            }
            0xc0 => {
                if pos + 2 > msg.len() {
                    return Err(WireError::Short);
                }
                return Ok(pos + 2);
            }
            _ => return Err(WireError::BadName),
        }
    }
}

/// Like [`skip_name`] for a name that must not be compressed (the question of a query):
/// any compression pointer is an error, wherever it stands.
fn skip_plain_name(msg: &[u8], mut pos: usize) -> Result<usize, WireError> {
    let mut len = 0usize;
    loop {
        let b = *msg.get(pos).ok_or(WireError::Short)?;
        match b {
            0 => return Ok(pos + 1),
            1..=63 => {
                len += b as usize + 1;
                if len + 1 > MAX_NAME_LEN {
                    return Err(WireError::BadName);
                }
                pos += b as usize + 1;
            }
            _ => return Err(WireError::BadName),
        }
    }
}

/// Which section a record sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Answer,
    Authority,
    Additional,
}

/// Where one resource record sits in a message.
#[derive(Debug, Clone)]
pub struct RecordPos {
    pub section: Section,
    pub start: usize,
    pub rtype: u16,
    pub class: u16,
    /// Offset of the 32-bit TTL field.
    pub ttl_pos: usize,
    pub rdata: Range<usize>,
}

impl RecordPos {
    pub fn ttl(&self, msg: &[u8]) -> u32 {
        u32_at(msg, self.ttl_pos).unwrap_or(0)
    }
    pub fn end(&self) -> usize {
        self.rdata.end
    }
}

/// Walks every record after the question section, calling `f` for each.
///
/// Returns the offset just past the question section (`qdcount` questions). Fails when the
/// counts claim more than the data holds or a name is malformed.
pub fn walk_records(msg: &[u8], mut f: impl FnMut(&RecordPos)) -> Result<usize, WireError> {
    let h = Header::read(msg).ok_or(WireError::Short)?;
    let mut pos = HEADER_LEN;
    for _ in 0..h.qdcount {
        pos = skip_name(msg, pos)? + 4;
        if pos > msg.len() {
            return Err(WireError::Short);
        }
    }
    let question_end = pos;
    let sections = [
        (Section::Answer, h.ancount),
        (Section::Authority, h.nscount),
        (Section::Additional, h.arcount),
    ];
    for (section, count) in sections {
        for _ in 0..count {
            let start = pos;
            let fixed = skip_name(msg, pos)?;
            let rtype = u16_at(msg, fixed).ok_or(WireError::Short)?;
            let class = u16_at(msg, fixed + 2).ok_or(WireError::Short)?;
            let rdlen = u16_at(msg, fixed + 8).ok_or(WireError::Short)? as usize;
            let rdata = fixed + 10..fixed + 10 + rdlen;
            if rdata.end > msg.len() {
                return Err(WireError::Short);
            }
            pos = rdata.end;
            f(&RecordPos {
                section,
                start,
                rtype,
                class,
                ttl_pos: fixed + 4,
                rdata,
            });
        }
    }
    Ok(question_end)
}

/// The OPT pseudo-record of a message (RFC 6891).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    pub udp_size: u16,
    pub ext_rcode: u8,
    pub version: u8,
    /// The 16 flag bits (DO is the top one).
    pub flags: u16,
    pub has_ecs: bool,
    /// The query asks for data about the server or for its own subnet (NSID, EXPIRE, ECS,
    /// CHAIN, ZONEVERSION): its answer is neither taken from nor put in the cache.
    pub asks_server_data: bool,
    /// The client cookie (first 8 octets of a COOKIE option, RFC 7873).
    pub cookie: Option<[u8; 8]>,
}

impl Edns {
    fn from_record(msg: &[u8], r: &RecordPos) -> Result<Edns, WireError> {
        // Owner must be the root name (a single zero octet).
        if msg.get(r.start) != Some(&0) || r.ttl_pos != r.start + 5 {
            return Err(WireError::BadOpt);
        }
        let ttl = r.ttl(msg);
        let mut e = Edns {
            udp_size: r.class,
            ext_rcode: (ttl >> 24) as u8,
            version: (ttl >> 16) as u8,
            flags: ttl as u16,
            has_ecs: false,
            asks_server_data: false,
            cookie: None,
        };
        let rdata = &msg[r.rdata.clone()];
        for opt in options(rdata) {
            let (code, range) = opt?;
            match code {
                OPT_ECS => {
                    e.has_ecs = true;
                    e.asks_server_data = true;
                }
                OPT_NSID | OPT_EXPIRE | OPT_CHAIN | OPT_ZONEVERSION => e.asks_server_data = true,
                OPT_COOKIE => {
                    // RFC 7873 5.2.2: 8 octets, or 16 to 40 with a server cookie; else FORMERR.
                    let data = &rdata[range.start + 4..range.end];
                    if data.len() != 8 && !(16..=40).contains(&data.len()) {
                        return Err(WireError::BadOpt);
                    }
                    let mut c = [0u8; 8];
                    c.copy_from_slice(&data[..8]);
                    e.cookie = Some(c);
                }
                _ => {}
            }
        }
        Ok(e)
    }

    pub fn do_bit(&self) -> bool {
        u32::from(self.flags) & EDNS_DO != 0
    }
}

/// Iterates over OPT rdata as `(code, range of the whole option)`; an error ends it (a cut
/// option). No allocation: this runs for every query with EDNS.
pub fn options(rdata: &[u8]) -> Options<'_> {
    Options { rdata, pos: 0 }
}

pub struct Options<'a> {
    rdata: &'a [u8],
    pos: usize,
}

impl Iterator for Options<'_> {
    type Item = Result<(u16, Range<usize>), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.rdata.len() {
            return None;
        }
        let pos = self.pos;
        let parsed = u16_at(self.rdata, pos).zip(u16_at(self.rdata, pos + 2));
        let Some((code, len)) = parsed else {
            self.pos = self.rdata.len();
            return Some(Err(WireError::BadOpt));
        };
        let end = pos + 4 + len as usize;
        if end > self.rdata.len() {
            self.pos = self.rdata.len();
            return Some(Err(WireError::BadOpt));
        }
        self.pos = end;
        Some(Ok((code, pos..end)))
    }
}

/// The OPT of a message whatever its question count, if there is exactly one and it is well
/// formed; for replies to queries that [`Query::parse`] rejects (they still get an OPT).
pub fn find_opt(msg: &[u8]) -> Option<Edns> {
    let mut found = None;
    let mut count = 0;
    walk_records(msg, |r| {
        if r.rtype == TYPE_OPT {
            count += 1;
            found = Edns::from_record(msg, r).ok();
        }
    })
    .ok()?;
    if count == 1 {
        found
    } else {
        None
    }
}

/// A client query, scanned but not copied.
#[derive(Debug, Clone)]
pub struct Query<'a> {
    pub wire: &'a [u8],
    pub header: Header,
    /// End of the question name; the name is `wire[12..qname_end]`, uncompressed.
    pub qname_end: usize,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

/// A [`Query`]'s scan without its bytes ([`Query::scanned`]).
#[derive(Debug, Clone, Copy)]
pub struct Scanned {
    header: Header,
    qname_end: usize,
    qtype: u16,
    qclass: u16,
    edns: Option<Edns>,
}

impl Scanned {
    /// The query again, over `wire`: the very bytes that were scanned (a copy of them), or
    /// `None` if they cannot be (too short for the scanned question).
    pub fn of(self, wire: &[u8]) -> Option<Query<'_>> {
        (wire.len() >= self.qname_end + 4).then_some(Query {
            wire,
            header: self.header,
            qname_end: self.qname_end,
            qtype: self.qtype,
            qclass: self.qclass,
            edns: self.edns,
        })
    }
}

/// Why a client query is not answered normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryError {
    /// No header, or QR=1: answering could feed a reflection loop, so drop it silently.
    Drop,
    /// Malformed: reply FORMERR. `question_ok` tells whether the question can be echoed.
    FormErr { question_ok: bool },
}

impl<'a> Query<'a> {
    /// Scans a client query: header, exactly one question, and the OPT record if any.
    pub fn parse(wire: &'a [u8]) -> Result<Query<'a>, QueryError> {
        let header = Header::read(wire).ok_or(QueryError::Drop)?;
        if header.has(FLAG_QR) {
            return Err(QueryError::Drop);
        }
        if header.qdcount != 1 {
            return Err(QueryError::FormErr { question_ok: false });
        }
        let bad = QueryError::FormErr { question_ok: false };
        let qname_end = skip_plain_name(wire, HEADER_LEN).map_err(|_| bad)?;
        let qtype = u16_at(wire, qname_end).ok_or(bad)?;
        let qclass = u16_at(wire, qname_end + 2).ok_or(bad)?;
        let mut edns = None;
        let mut opt_err = false;
        let walked = walk_records(wire, |r| {
            if r.rtype == TYPE_OPT {
                if r.section != Section::Additional || edns.is_some() {
                    opt_err = true;
                } else {
                    match Edns::from_record(wire, r) {
                        Ok(e) => edns = Some(e),
                        Err(_) => opt_err = true,
                    }
                }
            }
        });
        if walked.is_err() || opt_err {
            return Err(QueryError::FormErr { question_ok: true });
        }
        Ok(Query {
            wire,
            header,
            qname_end,
            qtype,
            qclass,
            edns,
        })
    }

    /// What the scan found, without the bytes: for a copy of them kept elsewhere, so the
    /// query is not scanned again ([`Scanned::of`]).
    pub fn scanned(&self) -> Scanned {
        Scanned {
            header: self.header,
            qname_end: self.qname_end,
            qtype: self.qtype,
            qclass: self.qclass,
            edns: self.edns,
        }
    }

    pub fn id(&self) -> u16 {
        self.header.id
    }
    pub fn question_end(&self) -> usize {
        self.qname_end + 4
    }
    /// The question section exactly as the client wrote it (name case included).
    pub fn question(&self) -> &'a [u8] {
        &self.wire[HEADER_LEN..self.question_end()]
    }
    pub fn qname(&self) -> &'a [u8] {
        &self.wire[HEADER_LEN..self.qname_end]
    }
    pub fn do_bit(&self) -> bool {
        self.edns.is_some_and(|e| e.do_bit())
    }
    /// Largest UDP reply this client takes: its EDNS size capped at `cap`, or 512 without
    /// EDNS (RFC 1035 4.2.1; RFC 6891 6.2.5 treats sizes under 512 as 512).
    pub fn udp_limit(&self, cap: usize) -> usize {
        match self.edns {
            Some(e) => (e.udp_size as usize).clamp(512, cap.max(512)),
            None => 512,
        }
    }
}

/// Reads the (possibly compressed) name at `pos`, lowercased and uncompressed, into `out`
/// (cleared first). Returns the offset just past the name where it stands.
///
/// Bounded on untrusted data: every compression pointer must point strictly before the
/// label it replaces (so a walk can never revisit a position: no loops, and at most one pass
/// over the message), labels are at most 63 octets and the name at most 255.
pub fn read_name(msg: &[u8], pos: usize, out: &mut Vec<u8>) -> Result<usize, WireError> {
    out.clear();
    NameReader::once().read(msg, pos, out)
}

/// A name may take this many compression pointers before a [`NameReader`] reads the rest of
/// the message through its memo. Real compressors point once or twice per name.
const DIRECT_POINTERS: usize = 8;

/// Compression pointers reach only the first 16 KiB of a message (14-bit offsets).
const POINTABLE: usize = 1 << 14;

/// Reads the names of one message onto one buffer, as [`read_name`] reads each (appending to
/// the buffer; on an error, what it appended so far is left there).
///
/// Why: a name may take a compression pointer to a name that takes one to another, and so
/// on, and a 64 KiB reply holds ~4,000 names; read one by one, such a reply took ~5 ms to
/// walk, where R22 allows 5 ms for the whole of parsing, flattening and encoding. A name
/// that takes more than [`DIRECT_POINTERS`] pointers turns a memo on for the rest of the
/// message: where in the buffer the name from each pointed-to position was read before, so
/// a name that reaches it again copies those octets instead of reading them again. The
/// names read are the same octets either way.
///
/// The buffer must be the same for every name read with one reader, and must keep every
/// octet it reads onto it (it may grow, never shrink).
#[derive(Default)]
pub struct NameReader {
    /// Empty until a name needs it; then one entry per position pointers can reach: where
    /// the name from there stands in the buffer, `start << 32 | end`, 0 while unknown.
    memo: Vec<u64>,
    /// The positions pointed to on the way through the name being read, with where the name
    /// from each begins in the buffer.
    passed: Vec<(usize, usize)>,
    /// For one name only: no memo.
    once: bool,
}

impl NameReader {
    /// A reader for one name, which never turns the memo on.
    fn once() -> NameReader {
        NameReader {
            once: true,
            ..NameReader::default()
        }
    }

    /// Reads the name at `pos` onto `out`, through the memo once one name has needed it.
    pub fn read(&mut self, msg: &[u8], pos: usize, out: &mut Vec<u8>) -> Result<usize, WireError> {
        if self.memo.is_empty() {
            let from = out.len();
            match self.walk::<false>(msg, pos, out) {
                Some(read) => return read,
                // Too many pointers: again, through the memo from now on.
                None => {
                    out.truncate(from);
                    self.memo = vec![0; msg.len().min(POINTABLE)];
                }
            }
        }
        self.walk::<true>(msg, pos, out)
            .unwrap_or(Err(WireError::BadName))
    }

    /// One name, with or without the memo (two copies of one loop: the common case pays
    /// nothing for the memo). `None`: without the memo, more than [`DIRECT_POINTERS`]
    /// pointers (never for a reader of one name).
    #[inline(always)]
    fn walk<const MEMO: bool>(
        &mut self,
        msg: &[u8],
        mut pos: usize,
        out: &mut Vec<u8>,
    ) -> Option<Result<usize, WireError>> {
        let from = out.len();
        if MEMO {
            self.passed.clear();
        }
        let mut end = None;
        let mut pointers = 0;
        loop {
            let Some(&b) = msg.get(pos) else {
                return Some(Err(WireError::Short));
            };
            match b & 0xc0 {
                0x00 if b == 0 => {
                    out.push(0);
                    if out.len() - from > MAX_NAME_LEN {
                        return Some(Err(WireError::BadName));
                    }
                    // Lowercased once, whole: label lengths (at most 63) are below 'A'.
                    out[from..].make_ascii_lowercase();
                    if MEMO {
                        self.remember(out.len());
                    }
                    return Some(Ok(end.unwrap_or(pos + 1)));
                }
                0x00 => {
                    let Some(label) = msg.get(pos..pos + 1 + b as usize) else {
                        return Some(Err(WireError::Short));
                    };
                    if out.len() - from + label.len() + 1 > MAX_NAME_LEN {
                        return Some(Err(WireError::BadName));
                    }
                    out.extend_from_slice(label);
                    pos += label.len();
                }
                0xc0 => {
                    let Some(at) = u16_at(msg, pos) else {
                        return Some(Err(WireError::Short));
                    };
                    let target = usize::from(at & 0x3fff);
                    if target >= pos {
                        return Some(Err(WireError::BadName));
                    }
                    end.get_or_insert(pos + 2);
                    if !MEMO {
                        pointers += 1;
                        if pointers > DIRECT_POINTERS && !self.once {
                            return None;
                        }
                    } else {
                        let known = self.memo.get(target).copied().unwrap_or(0);
                        if known != 0 {
                            // The rest of the name, as read before (lowercased already).
                            let (start, stop) = ((known >> 32) as usize, known as u32 as usize);
                            if out.len() - from + (stop - start) > MAX_NAME_LEN {
                                return Some(Err(WireError::BadName));
                            }
                            let fresh = out.len();
                            out.extend_from_within(start..stop);
                            out[from..fresh].make_ascii_lowercase();
                            self.remember(out.len());
                            return Some(Ok(end.unwrap_or(pos + 2)));
                        }
                        self.passed.push((target, out.len()));
                    }
                    pos = target;
                }
                _ => return Some(Err(WireError::BadName)),
            }
        }
    }

    /// The name just read ends at `stop` in the buffer: so does the name from every position
    /// it pointed to on the way.
    fn remember(&mut self, stop: usize) {
        for &(at, start) in &self.passed {
            if let Some(slot) = self.memo.get_mut(at) {
                *slot = (start as u64) << 32 | stop as u64;
            }
        }
    }
}

/// Bytes from hex digits (whitespace ignored), for tests.
#[cfg(test)]
pub(crate) fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Writes `name` (uncompressed wire form) lowercased into `out`: copied, then lowercased in
/// place.
pub fn push_lower(out: &mut Vec<u8>, name: &[u8]) {
    let from = out.len();
    out.extend_from_slice(name);
    out[from..].make_ascii_lowercase();
}

/// Compares two uncompressed wire names ignoring ASCII case. Label length octets are at most
/// 63, below 'A', so case folding never changes them.
pub fn name_eq(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_name_follows_backward_pointers_only() {
        // Header, then "a.example." at 12, then "www" + pointer to 12 at 23.
        let mut m = vec![0u8; 12];
        m.extend_from_slice(b"\x01A\x07Example\x00");
        m.extend_from_slice(b"\x03WWW\xc0\x0c");
        let mut out = Vec::new();
        assert_eq!(read_name(&m, 23, &mut out), Ok(29));
        assert_eq!(out, b"\x03www\x01a\x07example\x00");
        assert_eq!(read_name(&m, 12, &mut out), Ok(23));
        assert_eq!(out, b"\x01a\x07example\x00");
        // A pointer to itself, or forward: rejected, never followed.
        let mut l = vec![0u8; 12];
        l.extend_from_slice(&[0xc0, 12]);
        assert_eq!(read_name(&l, 12, &mut out), Err(WireError::BadName));
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0xc0, 14, 0]);
        assert_eq!(read_name(&f, 12, &mut out), Err(WireError::BadName));
        // Over 255 octets through pointers: rejected.
        let mut big = vec![0u8; 12];
        for _ in 0..4 {
            big.push(63);
            big.extend_from_slice(&[b'x'; 63]);
        }
        big.push(0);
        assert_eq!(read_name(&big, 12, &mut out), Err(WireError::BadName));
    }

    #[test]
    fn a_name_reader_appends_and_bounds_the_name_alone() {
        let mut m = vec![0u8; 12];
        m.extend_from_slice(b"\x01A\x07Example\x00\x03WWW\xc0\x0c");
        // What the buffer held stays as it was (case included); the name is lowercased.
        let mut out = b"KEEP".to_vec();
        assert_eq!(NameReader::default().read(&m, 23, &mut out), Ok(29));
        assert_eq!(out, b"KEEP\x03www\x01a\x07example\x00");
        // The 255-octet limit is the name's, not the buffer's: a 255-octet name fits behind
        // 300 octets, a 257-octet one does not.
        let mut long = vec![0u8; 12];
        for _ in 0..3 {
            long.push(63);
            long.extend_from_slice(&[b'X'; 63]);
        }
        long.push(61);
        long.extend_from_slice(&[b'X'; 61]);
        long.push(0);
        let mut out = vec![b'P'; 300];
        assert_eq!(
            NameReader::default().read(&long, 12, &mut out),
            Ok(long.len())
        );
        assert_eq!(out.len(), 300 + 255);
        assert!(out[300..].iter().all(|&b| b != b'X'));
        long[12 + 3 * 64] = 63;
        long.insert(12 + 3 * 64 + 1, b'X');
        long.insert(12 + 3 * 64 + 1, b'X');
        let mut out = vec![b'P'; 300];
        assert_eq!(
            NameReader::default().read(&long, 12, &mut out),
            Err(WireError::BadName)
        );
    }

    fn query(name: &[u8], qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(name);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn parses_plain_query() {
        let q = query(b"\x03www\x07Example\x00", TYPE_A);
        let p = Query::parse(&q).unwrap();
        assert_eq!(p.qname(), b"\x03www\x07Example\x00");
        assert_eq!(p.qtype, TYPE_A);
        assert!(p.edns.is_none());
        assert_eq!(p.udp_limit(1232), 512);
    }

    #[test]
    fn a_name_reader_reads_long_pointer_chains_as_read_name_does() {
        // `Www.` at 12, then 40 names that are each a pointer to the one before (the last
        // takes 40 pointers: the memo is on from the ninth), then names with labels in front
        // of a pointer to the last: one letter; 250 octets (255 in all); 251 (one too many).
        let mut m = vec![0u8; 12];
        m.extend_from_slice(b"\x03Www\x00");
        let mut starts = vec![12];
        for _ in 0..40 {
            let prev = *starts.last().unwrap() as u16;
            starts.push(m.len());
            m.extend_from_slice(&(0xc000 | prev).to_be_bytes());
        }
        let last = *starts.last().unwrap() as u16;
        for prefix in [vec![1u8], vec![49; 5], vec![49, 49, 49, 49, 50]] {
            starts.push(m.len());
            for len in prefix {
                m.push(len);
                m.extend(std::iter::repeat_n(b'Q', len.into()));
            }
            m.extend_from_slice(&(0xc000 | last).to_be_bytes());
        }
        let mut reader = NameReader::default();
        let mut out = Vec::new();
        let mut one = Vec::new();
        for &at in &starts {
            let from = out.len();
            let read = reader.read(&m, at, &mut out);
            assert_eq!(read, read_name(&m, at, &mut one), "name at {at}");
            if read.is_ok() {
                assert_eq!(out[from..], one[..], "name at {at}");
            }
        }
        assert!(!reader.memo.is_empty());
        assert_eq!(read_name(&m, starts[43], &mut one), Err(WireError::BadName));
        assert_eq!(read_name(&m, starts[42], &mut one), Ok(starts[43]));
        assert_eq!(one.len(), 255);
    }

    #[test]
    fn a_scanned_query_comes_back_whole_over_a_copy_of_its_bytes() {
        let mut q = query(b"\x03www\x07Example\x00", TYPE_AAAA);
        q[11] = 1; // ARCOUNT: an OPT with DO and a 1232-octet size
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 0, 0x80, 0, 0, 0]);
        let scanned = Query::parse(&q).unwrap().scanned();
        let copy = q.clone();
        let p = scanned.of(&copy).unwrap();
        assert_eq!(p.qname(), b"\x03www\x07Example\x00");
        assert_eq!(p.question(), &q[12..29]);
        assert_eq!((p.id(), p.qtype, p.qclass), (0x1234, TYPE_AAAA, CLASS_IN));
        assert!(p.do_bit());
        assert_eq!(p.udp_limit(4096), 1232);
        // Bytes too short for the question it scanned: no query.
        assert!(scanned.of(&q[..28]).is_none());
    }

    #[test]
    fn short_and_responses_are_dropped() {
        assert_eq!(Query::parse(&[0u8; 11]).unwrap_err(), QueryError::Drop);
        let mut q = query(b"\x00", TYPE_A);
        q[2] |= 0x80;
        assert_eq!(Query::parse(&q).unwrap_err(), QueryError::Drop);
    }

    #[test]
    fn bad_names_are_formerr() {
        // Label longer than 63.
        let mut name = vec![64u8];
        name.extend_from_slice(&[b'a'; 64]);
        name.push(0);
        assert!(matches!(
            Query::parse(&query(&name, 1)),
            Err(QueryError::FormErr { .. })
        ));
        // Name longer than 255.
        let mut name = Vec::new();
        for _ in 0..5 {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        name.push(0);
        assert!(matches!(
            Query::parse(&query(&name, 1)),
            Err(QueryError::FormErr { .. })
        ));
        // Compression pointer in the question (points at itself), and one whose second
        // octet is 0 (found by fuzzing: it ends in a 0 like a root label).
        for pointer in [[0xc0, 12], [0xc0, 0], [0xff, 0]] {
            assert!(matches!(
                Query::parse(&query(&pointer, 1)),
                Err(QueryError::FormErr { .. })
            ));
        }
        // Counts larger than the data.
        let mut q = query(b"\x00", 1);
        q[7] = 5;
        assert_eq!(
            Query::parse(&q).unwrap_err(),
            QueryError::FormErr { question_ok: true }
        );
    }

    #[test]
    fn reads_edns() {
        let mut q = query(b"\x00", 1);
        q[11] = 1;
        // OPT: root, type 41, size 4096, ext 0, version 0, DO, rdlen 12, cookie (8 octets).
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0x80, 0, 0, 12, 0, 10, 0, 8]);
        q.extend_from_slice(b"CLIENTCK");
        let p = Query::parse(&q).unwrap();
        let e = p.edns.unwrap();
        assert!(e.do_bit() && !e.has_ecs);
        assert_eq!(e.cookie, Some(*b"CLIENTCK"));
        assert_eq!(p.udp_limit(1232), 1232);
        // A cookie of 5 octets is malformed (RFC 7873): FORMERR.
        let mut bad = q.clone();
        let n = bad.len();
        bad[n - 9] = 5;
        bad.truncate(n - 3);
        bad[n - 14] = 9;
        assert_eq!(
            Query::parse(&bad).unwrap_err(),
            QueryError::FormErr { question_ok: true }
        );
        // An option cut short.
        let mut cut = q.clone();
        cut[n - 9] = 20;
        assert!(Query::parse(&cut).is_err());
    }

    #[test]
    fn skip_name_never_follows_pointers() {
        let msg = [0xc0, 0x00];
        assert_eq!(skip_name(&msg, 0), Ok(2));
        assert_eq!(skip_name(&[0xc0], 0), Err(WireError::Short));
        assert_eq!(skip_name(&[0x40, 0], 0), Err(WireError::BadName));
    }
}
