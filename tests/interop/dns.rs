//! DNS messages by hand: queries built byte by byte (header, question, optional OPT), a small
//! reader for replies, and UDP/TCP exchanges with bounded waits. Independent of flatdns's own
//! code on purpose: the interop suite must not share a bug with the thing it checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

pub const A: u16 = 1;
pub const NS: u16 = 2;
pub const CNAME: u16 = 5;
pub const SOA: u16 = 6;
pub const MX: u16 = 15;
pub const TXT: u16 = 16;
pub const AAAA: u16 = 28;
pub const SRV: u16 = 33;
pub const OPT: u16 = 41;
pub const ANY: u16 = 255;
pub const CAA: u16 = 257;
pub const TYPE65400: u16 = 65400;

pub const CLASS_IN: u16 = 1;
pub const CLASS_CH: u16 = 3;

pub const OPT_NSID: u16 = 3;
pub const OPT_COOKIE: u16 = 10;

pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_AD: u16 = 0x0020;
pub const FLAG_CD: u16 = 0x0010;

pub const NOERROR: u8 = 0;
pub const REFUSED: u8 = 5;

/// The EDNS part of a query (RFC 6891).
#[derive(Debug, Clone)]
pub struct Edns {
    pub udp_size: u16,
    pub version: u8,
    pub do_bit: bool,
    pub options: Vec<(u16, Vec<u8>)>,
}

impl Edns {
    pub fn new(udp_size: u16) -> Edns {
        Edns {
            udp_size,
            version: 0,
            do_bit: false,
            options: Vec::new(),
        }
    }
    pub fn dnssec(mut self) -> Edns {
        self.do_bit = true;
        self
    }
    pub fn option(mut self, code: u16, data: &[u8]) -> Edns {
        self.options.push((code, data.to_vec()));
        self
    }
}

/// A query, written the way a client puts it on the wire.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    /// Presentation form, case kept ("MiXeD.example.test").
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    pub edns: Option<Edns>,
}

impl Query {
    /// RD=1, class IN, EDNS with a 1232-byte buffer: what a stub resolver sends today.
    pub fn new(name: &str, qtype: u16) -> Query {
        Query {
            id: 0x1234,
            flags: FLAG_RD,
            name: name.to_string(),
            qtype,
            qclass: CLASS_IN,
            edns: Some(Edns::new(1232)),
        }
    }
    pub fn flags(mut self, flags: u16) -> Query {
        self.flags = flags;
        self
    }
    pub fn class(mut self, qclass: u16) -> Query {
        self.qclass = qclass;
        self
    }
    pub fn edns(mut self, edns: Option<Edns>) -> Query {
        self.edns = edns;
        self
    }
    pub fn id(mut self, id: u16) -> Query {
        self.id = id;
        self
    }

    pub fn to_wire(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(64);
        m.extend_from_slice(&self.id.to_be_bytes());
        m.extend_from_slice(&self.flags.to_be_bytes());
        m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, u8::from(self.edns.is_some())]);
        m.extend_from_slice(&name_to_wire(&self.name));
        m.extend_from_slice(&self.qtype.to_be_bytes());
        m.extend_from_slice(&self.qclass.to_be_bytes());
        if let Some(e) = &self.edns {
            m.push(0);
            m.extend_from_slice(&OPT.to_be_bytes());
            m.extend_from_slice(&e.udp_size.to_be_bytes());
            m.push(0); // extended rcode
            m.push(e.version);
            m.extend_from_slice(&(if e.do_bit { 0x8000u16 } else { 0 }).to_be_bytes());
            let rdlen: usize = e.options.iter().map(|(_, d)| 4 + d.len()).sum();
            m.extend_from_slice(&(rdlen as u16).to_be_bytes());
            for (code, data) in &e.options {
                m.extend_from_slice(&code.to_be_bytes());
                m.extend_from_slice(&(data.len() as u16).to_be_bytes());
                m.extend_from_slice(data);
            }
        }
        m
    }

    /// The question section exactly as this query writes it.
    pub fn question_wire(&self) -> Vec<u8> {
        let mut q = name_to_wire(&self.name);
        q.extend_from_slice(&self.qtype.to_be_bytes());
        q.extend_from_slice(&self.qclass.to_be_bytes());
        q
    }
}

/// "www.Example.test." -> wire form, case kept.
pub fn name_to_wire(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in text
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        assert!(label.len() < 64, "label too long: {label}");
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// One resource record of a reply, as read.
#[derive(Debug, Clone)]
pub struct Record {
    /// Owner in presentation form with the case as sent, ending in '.'.
    pub owner: String,
    pub rtype: u16,
    pub class: u16,
    pub ttl: u32,
    /// Offset of the TTL field in the message.
    pub ttl_pos: usize,
    pub rdata: Vec<u8>,
}

/// A reply, read far enough for the checks here.
#[derive(Debug, Clone)]
pub struct Reply {
    pub wire: Vec<u8>,
    pub id: u16,
    pub flags: u16,
    pub question: Vec<u8>,
    pub answer: Vec<Record>,
    pub authority: Vec<Record>,
    pub additional: Vec<Record>,
}

impl Reply {
    pub fn parse(wire: &[u8]) -> Reply {
        assert!(wire.len() >= 12, "reply shorter than a header: {wire:02x?}");
        let u16_at = |p: usize| u16::from_be_bytes([wire[p], wire[p + 1]]);
        let counts = [u16_at(4), u16_at(6), u16_at(8), u16_at(10)];
        assert!(counts[0] <= 1, "QDCOUNT {} in a reply", counts[0]);
        let mut pos = 12;
        let mut question = Vec::new();
        if counts[0] == 1 {
            let (_, end) = read_name(wire, pos);
            question = wire[pos..end + 4].to_vec();
            pos = end + 4;
        }
        let mut sections: [Vec<Record>; 3] = Default::default();
        for (i, section) in sections.iter_mut().enumerate() {
            for _ in 0..counts[i + 1] {
                let (owner, end) = read_name(wire, pos);
                let rtype = u16_at(end);
                let class = u16_at(end + 2);
                let ttl = u32::from_be_bytes([
                    wire[end + 4],
                    wire[end + 5],
                    wire[end + 6],
                    wire[end + 7],
                ]);
                let rdlen = u16_at(end + 8) as usize;
                let rdata = wire[end + 10..end + 10 + rdlen].to_vec();
                section.push(Record {
                    owner,
                    rtype,
                    class,
                    ttl,
                    ttl_pos: end + 4,
                    rdata,
                });
                pos = end + 10 + rdlen;
            }
        }
        assert_eq!(pos, wire.len(), "trailing bytes after the last record");
        let [answer, authority, additional] = sections;
        Reply {
            wire: wire.to_vec(),
            id: u16_at(0),
            flags: u16_at(2),
            question,
            answer,
            authority,
            additional,
        }
    }

    pub fn rcode(&self) -> u8 {
        (self.flags & 0x000f) as u8
    }
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
    pub fn opt(&self) -> Option<&Record> {
        self.additional.iter().find(|r| r.rtype == OPT)
    }
    /// The EDNS options of the reply's OPT record, in order.
    pub fn options(&self) -> Vec<(u16, Vec<u8>)> {
        let Some(opt) = self.opt() else {
            return Vec::new();
        };
        let d = &opt.rdata;
        let mut out = Vec::new();
        let mut p = 0;
        while p + 4 <= d.len() {
            let code = u16::from_be_bytes([d[p], d[p + 1]]);
            let len = u16::from_be_bytes([d[p + 2], d[p + 3]]) as usize;
            out.push((code, d[p + 4..p + 4 + len].to_vec()));
            p += 4 + len;
        }
        out
    }
    /// The answer records of `rtype`, as (owner, ttl, rdata).
    pub fn answers_of(&self, rtype: u16) -> Vec<&Record> {
        self.answer.iter().filter(|r| r.rtype == rtype).collect()
    }
    /// The wire with the ID zeroed, for comparisons "equal but for the ID".
    pub fn without_id(&self) -> Vec<u8> {
        let mut w = self.wire.clone();
        w[0] = 0;
        w[1] = 0;
        w
    }
    /// The wire with the ID and every TTL (not the OPT's) zeroed: a cached answer's TTLs
    /// count down, nothing else may change.
    pub fn without_id_and_ttls(&self) -> Vec<u8> {
        let mut w = self.without_id();
        for r in self
            .answer
            .iter()
            .chain(&self.authority)
            .chain(&self.additional)
        {
            if r.rtype != OPT {
                w[r.ttl_pos..r.ttl_pos + 4].fill(0);
            }
        }
        w
    }
}

/// Reads a possibly compressed name at `pos`: (presentation text, end of the name in place).
pub fn read_name(msg: &[u8], start: usize) -> (String, usize) {
    let mut text = String::new();
    let mut pos = start;
    let mut end = None;
    for _ in 0..128 {
        let len = msg[pos] as usize;
        if len & 0xc0 == 0xc0 {
            end.get_or_insert(pos + 2);
            pos = ((len & 0x3f) << 8) | msg[pos + 1] as usize;
            continue;
        }
        if len == 0 {
            end.get_or_insert(pos + 1);
            if text.is_empty() {
                text.push('.');
            }
            return (text, end.unwrap_or(pos + 1));
        }
        text.push_str(&String::from_utf8_lossy(&msg[pos + 1..pos + 1 + len]));
        text.push('.');
        pos += 1 + len;
    }
    panic!("compression loop in a reply at {start}");
}

/// A hex dump for failure messages: 16 bytes per line with offsets.
pub fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .enumerate()
        .map(|(i, c)| {
            let bytes: Vec<String> = c.iter().map(|x| format!("{x:02x}")).collect();
            format!("{:04x}  {}", i * 16, bytes.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Where two messages first differ, with both dumps, for assertion messages.
pub fn diff(label: &str, expected: &[u8], got: &[u8]) -> String {
    let first = expected
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(got.len()));
    format!(
        "{label}: replies differ (first at byte {first}; lengths {} vs {})\n-- expected (BIND direct) --\n{}\n-- got (through flatdns) --\n{}",
        expected.len(),
        got.len(),
        hex(expected),
        hex(got)
    )
}

/// Sends `msg` over UDP and returns the first datagram carrying the same ID, waiting at most
/// `wait`. Panics on timeout.
pub fn udp(server: SocketAddr, msg: &[u8], wait: Duration) -> Vec<u8> {
    try_udp(server, msg, wait)
        .unwrap_or_else(|| panic!("no UDP reply from {server} within {wait:?}"))
}

/// Like [`udp`], but `None` when nothing arrives in time.
pub fn try_udp(server: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
    sock.connect(server).expect("connect UDP client");
    sock.send(msg).expect("send UDP query");
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 65_535];
    for _ in 0..64 {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left)).expect("set read timeout");
        match sock.recv(&mut buf) {
            Ok(n) if n >= 2 && buf[..2] == msg[..2] => return Some(buf[..n].to_vec()),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Sends `msg` over TCP (two-byte length prefix, RFC 7766) and returns the reply.
pub fn tcp(server: SocketAddr, msg: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect_timeout(&server, wait)
        .unwrap_or_else(|e| panic!("TCP connect to {server}: {e}"));
    s.set_read_timeout(Some(wait)).expect("set read timeout");
    s.set_write_timeout(Some(wait)).expect("set write timeout");
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed).expect("send TCP query");
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .unwrap_or_else(|e| panic!("TCP reply length from {server}: {e}"));
    let mut reply = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("TCP reply from {server}: {e}"));
    reply
}

/// How a query is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

pub fn exchange(server: SocketAddr, msg: &[u8], transport: Transport) -> Vec<u8> {
    let wait = Duration::from_secs(5);
    match transport {
        Transport::Udp => udp(server, msg, wait),
        Transport::Tcp => tcp(server, msg, wait),
    }
}
