//! Test harness: a scripted mock upstream that serves zone-file text over UDP and TCP, the
//! proxy started in-process on port 0, and small DNS client helpers.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

use flatdns::config::Config;
use flatdns::server::{self, Running};

pub const A: u16 = 1;
pub const NS: u16 = 2;
pub const CNAME: u16 = 5;
pub const SOA: u16 = 6;
pub const MX: u16 = 15;
pub const TXT: u16 = 16;
pub const AAAA: u16 = 28;
pub const OPT: u16 = 41;
pub const RRSIG: u16 = 46;
pub const ANY: u16 = 255;

// ------------------------------------------------------------------------------------------
// Names and records

/// "www.Example." -> wire form, case kept.
pub fn name(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in text
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// Reads a possibly compressed name at `pos`; returns text ("www.example.") and the end.
pub fn read_name(msg: &[u8], mut pos: usize) -> (String, usize) {
    let mut text = String::new();
    let mut end = None;
    for _ in 0..128 {
        let len = msg[pos] as usize;
        if len & 0xc0 == 0xc0 {
            if end.is_none() {
                end = Some(pos + 2);
            }
            pos = ((len & 0x3f) << 8) | msg[pos + 1] as usize;
            continue;
        }
        if len == 0 {
            if end.is_none() {
                end = Some(pos + 1);
            }
            break;
        }
        text.push_str(&String::from_utf8_lossy(&msg[pos + 1..pos + 1 + len]));
        text.push('.');
        pos += len + 1;
    }
    if text.is_empty() {
        text.push('.');
    }
    (text, end.unwrap())
}

fn type_code(t: &str) -> u16 {
    match t {
        "A" => A,
        "NS" => NS,
        "CNAME" => CNAME,
        "SOA" => SOA,
        "MX" => MX,
        "TXT" => TXT,
        "AAAA" => AAAA,
        "RRSIG" => RRSIG,
        other => other
            .strip_prefix("TYPE")
            .and_then(|n| n.parse().ok())
            .expect("known type"),
    }
}

fn type_name(t: u16) -> String {
    match t {
        A => "A".into(),
        NS => "NS".into(),
        CNAME => "CNAME".into(),
        SOA => "SOA".into(),
        MX => "MX".into(),
        TXT => "TXT".into(),
        AAAA => "AAAA".into(),
        RRSIG => "RRSIG".into(),
        other => format!("TYPE{other}"),
    }
}

#[derive(Debug, Clone)]
pub struct Rec {
    pub owner: Vec<u8>,
    pub ttl: u32,
    pub rtype: u16,
    pub rdata: Vec<u8>,
}

impl Rec {
    fn push(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.owner);
        out.extend_from_slice(&self.rtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&self.ttl.to_be_bytes());
        out.extend_from_slice(&(self.rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.rdata);
    }
}

/// Parses zone-file lines `owner ttl IN type rdata` (absolute names, no $ORIGIN).
pub fn zone(text: &str) -> Vec<Rec> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (owner, ttl, rtype) = (
            name(f[0]).to_ascii_lowercase(),
            f[1].parse().unwrap(),
            type_code(f[3]),
        );
        let rd = &f[4..];
        let rdata = match rtype {
            A => rd[0].parse::<Ipv4Addr>().unwrap().octets().to_vec(),
            AAAA => rd[0].parse::<Ipv6Addr>().unwrap().octets().to_vec(),
            CNAME | NS => name(rd[0]),
            MX => {
                let mut v = rd[0].parse::<u16>().unwrap().to_be_bytes().to_vec();
                v.extend(name(rd[1]));
                v
            }
            TXT => {
                let s = rd.join(" ");
                let s = s.trim_matches('"');
                let mut v = vec![s.len() as u8];
                v.extend_from_slice(s.as_bytes());
                v
            }
            SOA => {
                let mut v = name(rd[0]);
                v.extend(name(rd[1]));
                for n in &rd[2..7] {
                    v.extend(n.parse::<u32>().unwrap().to_be_bytes());
                }
                v
            }
            _ => {
                // \# LEN HEX
                assert_eq!(rd[0], "\\#");
                let hex: String = rd[2..].concat();
                (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect()
            }
        };
        out.push(Rec {
            owner,
            ttl,
            rtype,
            rdata,
        });
    }
    out
}

// ------------------------------------------------------------------------------------------
// Messages

/// A query: `name` as written (case kept), `qtype`, RD=1, optional EDNS (size, DO, options).
#[derive(Debug, Clone)]
pub struct Q {
    pub name: String,
    pub qtype: u16,
    pub id: u16,
    pub edns: Option<(u16, bool)>,
    pub options: Vec<(u16, Vec<u8>)>,
    pub cd: bool,
    pub ad: bool,
}

impl Q {
    pub fn new(name: &str, qtype: u16) -> Q {
        Q {
            name: name.into(),
            qtype,
            id: 0x4242,
            edns: None,
            options: vec![],
            cd: false,
            ad: false,
        }
    }
    pub fn edns(mut self, size: u16, do_bit: bool) -> Q {
        self.edns = Some((size, do_bit));
        self
    }
    pub fn option(mut self, code: u16, data: &[u8]) -> Q {
        self.options.push((code, data.to_vec()));
        self
    }
    pub fn id(mut self, id: u16) -> Q {
        self.id = id;
        self
    }
    pub fn cd(mut self) -> Q {
        self.cd = true;
        self
    }
    pub fn ad(mut self) -> Q {
        self.ad = true;
        self
    }
    pub fn wire(&self) -> Vec<u8> {
        let mut m = self.id.to_be_bytes().to_vec();
        m.extend_from_slice(&[
            0x01,
            (if self.cd { 0x10 } else { 0 }) | (if self.ad { 0x20 } else { 0 }),
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(self.edns.is_some()),
        ]);
        m.extend(name(&self.name));
        m.extend_from_slice(&self.qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        if let Some((size, do_bit)) = self.edns {
            let mut rdata = Vec::new();
            for (code, data) in &self.options {
                rdata.extend_from_slice(&code.to_be_bytes());
                rdata.extend_from_slice(&(data.len() as u16).to_be_bytes());
                rdata.extend_from_slice(data);
            }
            m.extend_from_slice(&[0, 0, 41]);
            m.extend_from_slice(&size.to_be_bytes());
            m.extend_from_slice(&[0, 0, if do_bit { 0x80 } else { 0 }, 0]);
            m.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            m.extend(rdata);
        }
        m
    }
}

/// A parsed reply, for assertions.
#[derive(Debug, Clone)]
pub struct R {
    pub wire: Vec<u8>,
    pub id: u16,
    pub flags: u16,
    pub question: String,
    pub answer: Vec<String>,
    pub authority: Vec<String>,
    pub additional: Vec<String>,
    pub opt: Option<(u16, u32, Vec<u8>)>,
}

impl R {
    pub fn parse(wire: &[u8]) -> R {
        let u16_at = |p: usize| u16::from_be_bytes([wire[p], wire[p + 1]]);
        let counts = [u16_at(4), u16_at(6), u16_at(8), u16_at(10)];
        let mut pos = 12;
        let mut question = String::new();
        for _ in 0..counts[0] {
            let (n, end) = read_name(wire, pos);
            question = format!("{n} {}", type_name(u16_at(end)));
            pos = end + 4;
        }
        let mut sections = [vec![], vec![], vec![]];
        let mut opt = None;
        for (i, &count) in counts[1..].iter().enumerate() {
            for _ in 0..count {
                let (owner, end) = read_name(wire, pos);
                let rtype = u16_at(end);
                let ttl = u32::from_be_bytes(wire[end + 4..end + 8].try_into().unwrap());
                let rdlen = u16_at(end + 8) as usize;
                let rd = end + 10;
                let rdata = &wire[rd..rd + rdlen];
                pos = rd + rdlen;
                if rtype == OPT {
                    opt = Some((u16_at(end + 2), ttl, rdata.to_vec()));
                    continue;
                }
                let text = match rtype {
                    A => Ipv4Addr::from(<[u8; 4]>::try_from(rdata).unwrap()).to_string(),
                    AAAA => Ipv6Addr::from(<[u8; 16]>::try_from(rdata).unwrap()).to_string(),
                    CNAME | NS => read_name(wire, rd).0,
                    _ => format!("\\# {rdlen}"),
                };
                sections[i].push(format!("{owner} {ttl} {} {text}", type_name(rtype)));
            }
        }
        let [answer, authority, additional] = sections;
        R {
            wire: wire.to_vec(),
            id: u16_at(0),
            flags: u16_at(2),
            question,
            answer,
            authority,
            additional,
            opt,
        }
    }
    pub fn rcode(&self) -> u8 {
        (self.flags & 0x0f) as u8
    }
    pub fn tc(&self) -> bool {
        self.flags & 0x0200 != 0
    }
    pub fn ad(&self) -> bool {
        self.flags & 0x0020 != 0
    }
    /// The answer section without TTLs.
    pub fn answer_no_ttl(&self) -> Vec<String> {
        self.answer
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                format!("{} {}", f[0], f[2..].join(" "))
            })
            .collect()
    }
    /// Everything but the ID.
    pub fn body(&self) -> &[u8] {
        &self.wire[2..]
    }
}

// ------------------------------------------------------------------------------------------
// Mock upstream

/// What the mock does with queries for one name.
#[derive(Debug, Clone, PartialEq)]
pub enum Behavior {
    Answer,
    /// Never answer.
    Drop,
    Servfail,
    Refused,
    Delay(Duration),
    /// TC=1 (question only) over UDP; the full answer over TCP.
    TruncateUdp,
    /// TC=1 over UDP carrying only the first two answer records (a cut chain).
    TruncateUdpPartial,
    /// Send forged replies (wrong ID, wrong question, from another port) before the real one.
    Spoof,
    /// Before the real reply, a forged one with this ID (the right question, A 6.6.6.6):
    /// a test gives it the client's own ID, which is not the one flatdns sent upstream.
    /// Left out in the rare case the ID sent is this one.
    ForgeId(u16),
    /// Set AD=1 on the answer.
    Ad,
    /// Reply with the right ID and question but a malformed body: a compression-pointer loop
    /// in the answer, and RDLENGTH past the end of the message.
    Malformed,
}

#[derive(Debug, Clone)]
pub struct Logged {
    pub name: String,
    pub qtype: u16,
    pub tcp: bool,
    pub id: u16,
    pub src: SocketAddr,
    pub wire: Vec<u8>,
}

#[derive(Default)]
struct MockState {
    records: Vec<Rec>,
    behavior: HashMap<String, Behavior>,
    default: Option<Behavior>,
    log: Vec<Logged>,
    /// TCP connections whose client closed them (EOF).
    tcp_closed: usize,
}

pub struct Mock {
    pub addr: SocketAddr,
    state: Arc<Mutex<MockState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Mock {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Mock {
    /// Starts a mock authoritative server for `zone_text` on 127.0.0.1 (UDP and TCP, one port).
    pub async fn start(zone_text: &str) -> Mock {
        Self::start_with(zone_text, true).await
    }

    /// Like [`Mock::start`]; with `tcp` false nothing listens on TCP (connections refused).
    pub async fn start_with(zone_text: &str, tcp_on: bool) -> Mock {
        let state = Arc::new(Mutex::new(MockState {
            records: zone(zone_text),
            ..Default::default()
        }));
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        let udp = Arc::new(udp);
        let mut tasks = Vec::new();
        let st = state.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let Ok((n, src)) = udp.recv_from(&mut buf).await else {
                    continue;
                };
                let (q, st, udp) = (buf[..n].to_vec(), st.clone(), udp.clone());
                tokio::spawn(async move {
                    for reply in respond(&st, &q, src, false).await {
                        let _ = udp.send_to(&reply, src).await;
                    }
                });
            }
        }));
        if !tcp_on {
            drop(tcp);
            return Mock { addr, state, tasks };
        }
        let st = state.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((stream, src)) = tcp.accept().await else {
                    continue;
                };
                let st = st.clone();
                tokio::spawn(async move {
                    let (mut rd, wr) = stream.into_split();
                    let wr = Arc::new(tokio::sync::Mutex::new(wr));
                    while let Ok(len) = rd.read_u16().await {
                        let mut q = vec![0u8; len as usize];
                        if rd.read_exact(&mut q).await.is_err() {
                            break;
                        }
                        let (st, wr) = (st.clone(), wr.clone());
                        tokio::spawn(async move {
                            for reply in respond(&st, &q, src, true).await {
                                let mut w = wr.lock().await;
                                let _ = w.write_all(&(reply.len() as u16).to_be_bytes()).await;
                                let _ = w.write_all(&reply).await;
                            }
                        });
                    }
                    st.lock().unwrap().tcp_closed += 1;
                });
            }
        }));
        Mock { addr, state, tasks }
    }

    /// Sets the behaviour for one name ("www.example.").
    pub fn set(&self, name: &str, b: Behavior) {
        self.state
            .lock()
            .unwrap()
            .behavior
            .insert(name.to_ascii_lowercase(), b);
    }
    /// Sets the behaviour for every name without its own.
    pub fn set_default(&self, b: Behavior) {
        self.state.lock().unwrap().default = Some(b);
    }
    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }
    /// Queries seen for `name` (any case) and `qtype`.
    pub fn count(&self, name: &str, qtype: u16) -> usize {
        let n = name.to_ascii_lowercase();
        self.log()
            .iter()
            .filter(|l| l.name == n && l.qtype == qtype)
            .count()
    }
    /// TCP connections the client (flatdns) has closed.
    pub fn tcp_closed(&self) -> usize {
        self.state.lock().unwrap().tcp_closed
    }

    pub fn total(&self) -> usize {
        self.log().len()
    }
    /// The reply the mock gives to `q` itself (for byte comparisons).
    pub async fn direct(&self, q: &Q, tcp: bool) -> R {
        if tcp {
            tcp_query(self.addr, &q.wire()).await
        } else {
            udp_query(self.addr, &q.wire()).await
        }
    }
}

/// Builds the mock's replies to one query (more than one when spoofing).
async fn respond(st: &Mutex<MockState>, q: &[u8], src: SocketAddr, tcp: bool) -> Vec<Vec<u8>> {
    if q.len() < 12 {
        return vec![];
    }
    let (qname, qend) = read_name(q, 12);
    let qname_l = qname.to_ascii_lowercase();
    let qtype = u16::from_be_bytes([q[qend], q[qend + 1]]);
    let id = u16::from_be_bytes([q[0], q[1]]);
    let behavior = {
        let mut s = st.lock().unwrap();
        s.log.push(Logged {
            name: qname_l.clone(),
            qtype,
            tcp,
            id,
            src,
            wire: q.to_vec(),
        });
        s.behavior
            .get(&qname_l)
            .or(s.default.as_ref())
            .cloned()
            .unwrap_or(Behavior::Answer)
    };
    let question = &q[12..qend + 4];
    let edns = u16::from_be_bytes([q[10], q[11]]) > 0;
    let do_bit = edns && q.len() >= qend + 4 + 11 && q[qend + 4 + 7] & 0x80 != 0;
    let header = |rcode: u8, an: usize, ns: usize, tc: bool, ad: bool| {
        let mut h = id.to_be_bytes().to_vec();
        h.push(0x84 | (q[2] & 0x79) | if tc { 0x02 } else { 0 });
        h.push(rcode | if ad { 0x20 } else { 0 } | (q[3] & 0x10));
        h.extend_from_slice(&[0, 1]);
        h.extend_from_slice(&(an as u16).to_be_bytes());
        h.extend_from_slice(&(ns as u16).to_be_bytes());
        h.extend_from_slice(&[0, u8::from(edns)]);
        h.extend_from_slice(question);
        h
    };
    let opt = |m: &mut Vec<u8>| {
        if edns {
            m.extend_from_slice(&[
                0,
                0,
                41,
                0x04,
                0xd0,
                0,
                0,
                if do_bit { 0x80 } else { 0 },
                0,
                0,
                0,
            ]);
        }
    };
    match behavior {
        Behavior::Drop => return vec![],
        Behavior::Malformed => {
            // Pointer loop as the owner of the answer record.
            let mut looped = header(0, 1, 0, false, false);
            looped[11] = 0;
            let at = looped.len();
            looped.extend_from_slice(&[
                0xc0 | (at >> 8) as u8,
                at as u8,
                0,
                1,
                0,
                1,
                0,
                0,
                0,
                60,
                0,
                4,
                1,
                2,
                3,
                4,
            ]);
            // RDLENGTH beyond the data.
            let mut cut = header(0, 1, 0, false, false);
            cut[11] = 0;
            cut.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 200, 1, 2, 3, 4]);
            // Counts larger than the data.
            let mut counts = header(0, 5, 0, false, false);
            counts[11] = 0;
            return vec![looped, cut, counts];
        }
        Behavior::Delay(d) => tokio::time::sleep(d).await,
        Behavior::Servfail | Behavior::Refused => {
            let mut m = header(
                if behavior == Behavior::Servfail { 2 } else { 5 },
                0,
                0,
                false,
                false,
            );
            opt(&mut m);
            return vec![m];
        }
        _ => {}
    }
    // Answer from the zone, following CNAMEs it holds (as an authoritative server does in-zone).
    let (records, soa) = {
        let s = st.lock().unwrap();
        (
            s.records.clone(),
            s.records.iter().find(|r| r.rtype == SOA).cloned(),
        )
    };
    let mut answer = Vec::new();
    let mut cur = name(&qname_l);
    let exists = |n: &[u8]| records.iter().any(|r| r.owner == n);
    let mut nxdomain = false;
    for _ in 0..20 {
        let cname = records.iter().find(|r| r.owner == cur && r.rtype == CNAME);
        match cname {
            Some(c) if qtype != CNAME && qtype != ANY => {
                answer.push(c.clone());
                if answer.iter().filter(|r| r.owner == c.rdata).count() > 0 {
                    break;
                }
                cur = c.rdata.to_ascii_lowercase();
            }
            _ => {
                answer.extend(
                    records
                        .iter()
                        .filter(|r| r.owner == cur && (r.rtype == qtype || qtype == ANY))
                        .cloned(),
                );
                nxdomain = answer.is_empty() && !exists(&cur);
                break;
            }
        }
    }
    // Only an NXDOMAIN at the question name counts; a dangling CNAME target out of the zone is
    // a NOERROR answer holding the CNAME (what a legacy authoritative server returns).
    let rcode = if nxdomain && answer.is_empty() { 3 } else { 0 };
    // As BIND does (RFC 2308 section 3): the SOA of a negative answer carries
    // min(SOA TTL, MINIMUM).
    let authority: Vec<Rec> = if answer.is_empty() {
        soa.into_iter()
            .map(|mut r| {
                let n = r.rdata.len();
                let minimum = u32::from_be_bytes(r.rdata[n - 4..].try_into().unwrap());
                r.ttl = r.ttl.min(minimum);
                r
            })
            .collect()
    } else {
        vec![]
    };
    let partial = !tcp && behavior == Behavior::TruncateUdpPartial;
    if partial {
        answer.truncate(2);
    }
    let truncate = !tcp && behavior == Behavior::TruncateUdp;
    let mut m = header(
        rcode,
        if truncate { 0 } else { answer.len() },
        if truncate { 0 } else { authority.len() },
        truncate || partial,
        behavior == Behavior::Ad,
    );
    if !truncate {
        for r in answer.iter().chain(&authority) {
            r.push(&mut m);
        }
    }
    opt(&mut m);
    let mut out = Vec::new();
    if let Behavior::ForgeId(forged_id) = behavior {
        if forged_id != id {
            let mut forged = header(0, 1, 0, false, false);
            forged[..2].copy_from_slice(&forged_id.to_be_bytes());
            forged[11] = 0;
            forged.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 6, 6, 6, 6]);
            out.push(forged);
        }
    }
    if behavior == Behavior::Spoof {
        let mut wrong_id = m.clone();
        wrong_id[0] ^= 0xff;
        out.push(wrong_id);
        let mut wrong_q = header(0, 1, 0, false, false);
        let qlen = question.len();
        wrong_q.truncate(12);
        let mut evil = name("evil.example.");
        evil.extend_from_slice(&question[qlen - 4..]);
        wrong_q.extend_from_slice(&evil);
        Rec {
            owner: evil[..evil.len() - 4].to_vec(),
            ttl: 300,
            rtype: A,
            rdata: vec![6, 6, 6, 6],
        }
        .push(&mut wrong_q);
        wrong_q[11] = 0;
        out.push(wrong_q);
        if !tcp {
            // From another port: the proxy's connected socket must never see it.
            let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let mut forged = m.clone();
            forged.truncate(12 + question.len());
            let _ = other.send_to(&forged, src).await;
        }
    }
    if tcp && behavior == Behavior::Spoof {
        // Over TCP only the real reply: a mismatch there is a connection error.
        out.clear();
    }
    out.push(m);
    out
}

// ------------------------------------------------------------------------------------------
// The proxy and clients

pub struct Proxy {
    pub addr: SocketAddr,
    pub running: Option<Running>,
}

impl Proxy {
    /// Starts flatdns on 127.0.0.1:0 forwarding to `upstreams`; `tweak` edits the config.
    pub async fn start(upstreams: &[SocketAddr], tweak: impl FnOnce(&mut Config)) -> Proxy {
        let mut config = Config::for_test("127.0.0.1:0".parse().unwrap(), upstreams.to_vec());
        config.timeout = Duration::from_millis(300);
        config.limits.client_deadline = Duration::from_millis(1500);
        tweak(&mut config);
        let running = server::start(config).await.unwrap();
        Proxy {
            addr: running.local_addrs()[0],
            running: Some(running),
        }
    }
    pub fn handler(&self) -> &flatdns::handler::Handler {
        self.running.as_ref().unwrap().handler()
    }
    pub async fn udp(&self, q: &Q) -> R {
        udp_query(self.addr, &q.wire()).await
    }
    pub async fn tcp(&self, q: &Q) -> R {
        tcp_query(self.addr, &q.wire()).await
    }
}

pub async fn udp_exchange(addr: SocketAddr, msg: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(msg, addr).await.unwrap();
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

pub async fn udp_query(addr: SocketAddr, msg: &[u8]) -> R {
    let reply = udp_exchange(addr, msg, Duration::from_secs(6))
        .await
        .expect("a UDP reply");
    R::parse(&reply)
}

pub async fn tcp_send(s: &mut TcpStream, msg: &[u8]) {
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(msg);
    s.write_all(&framed).await.unwrap();
}

pub async fn tcp_recv(s: &mut TcpStream) -> Vec<u8> {
    let len = tokio::time::timeout(Duration::from_secs(6), s.read_u16())
        .await
        .unwrap()
        .unwrap();
    let mut m = vec![0u8; len as usize];
    s.read_exact(&mut m).await.unwrap();
    m
}

pub async fn tcp_query(addr: SocketAddr, msg: &[u8]) -> R {
    let mut s = TcpStream::connect(addr).await.unwrap();
    tcp_send(&mut s, msg).await;
    R::parse(&tcp_recv(&mut s).await)
}
