//! The ISC DNS compliance probes (genreport / ednscomp, R17), run with dig as genreport's
//! report lists them, and each reply reduced to the verdict genreport would draw from it:
//! status, header flags, OPT and its version, which EDNS options came back, whether an
//! unknown option, EDNS flag or the header Z bit was echoed, the answer's record types and,
//! for the opcode probes, whether the question was echoed.
//!
//! Also the raw-byte checks for the replies flatdns writes itself (cache hits, flattened
//! answers, BADVERS, NOTIMP, REFUSED, TC=1, FORMERR): OPT present exactly when the query had
//! one (RFC 6891 7), version 0, unknown options and flags not echoed (RFC 6891 6.1.4,
//! RFC 8906 3.2).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::dns::{self, Edns, Query, Reply};
use super::procs::{zone, Named, TempDir};
use super::tools;

/// Parent of every probe zone.
pub const PARENT: &str = "probe.test";
/// The DNSSEC-signed zone: the `signed` and `edns@512` probes, and the one-zone pass.
pub const SIGNED: &str = "signed.probe.test";
/// The zone of the raw-byte checks.
pub const RAW: &str = "raw.probe.test";

/// Which zone a probe asks about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A zone of its own, so that its first query through flatdns is a real cache miss.
    Own,
    /// The signed zone.
    Signed,
    /// No question at all (`+header-only`).
    None,
}

/// One genreport probe.
pub struct Probe {
    pub name: &'static str,
    /// dig options as genreport prints them, the query type included; the zone is
    /// appended.
    pub args: &'static str,
    pub target: Target,
    /// The type BIND logs for it ("SOA", "DNSKEY" ...), to count upstream queries.
    pub qtype: &'static str,
    /// What BIND's own reply must show for the probe to test what its name says (a check of
    /// the test setup, not of flatdns), and that requirement in words.
    pub setup: fn(&Verdict) -> bool,
    pub setup_text: &'static str,
}

impl Probe {
    /// The zone this probe asks about in the per-probe pass, if any.
    pub fn zone(&self) -> Option<String> {
        match self.target {
            Target::Own => Some(format!("{}.{PARENT}", self.label())),
            Target::Signed => Some(SIGNED.to_string()),
            Target::None => None,
        }
    }
    /// The name as a DNS label ("edns@512" -> "edns512").
    fn label(&self) -> String {
        self.name
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect()
    }
}

/// The probes, with genreport's dig options (`+norec +noad` everywhere, as genreport sends
/// them), in the order genreport's EDNS report runs them. Beyond the list in issue 5:
/// `opcode/hdr`, which is genreport's own form of the opcode test (`+header-only`, no
/// question).
#[rustfmt::skip]
pub fn probes() -> Vec<Probe> {
    use Target::{None, Own, Signed};
    fn p(
        name: &'static str,
        args: &'static str,
        target: Target,
        qtype: &'static str,
        setup_text: &'static str,
        setup: fn(&Verdict) -> bool,
    ) -> Probe {
        Probe {
            name,
            args,
            target,
            qtype,
            setup,
            setup_text,
        }
    }
    fn soa_aa(v: &Verdict) -> bool {
        v.status == "NOERROR"
            && v.flags.contains("aa")
            && v.answer.first().is_some_and(|t| t == "SOA")
    }
    fn edns0(v: &Verdict) -> bool {
        v.edns.as_ref().is_some_and(|e| e.version == 0 && !e.mbz)
    }
    fn badvers(v: &Verdict) -> bool {
        v.status == "BADVERS" && edns0(v) && v.answer.is_empty()
    }
    vec![
        p("dns", "+norec +noad +noedns soa", Own, "SOA",
            "NOERROR aa SOA, no OPT", |v| soa_aa(v) && v.edns.is_none()),
        p("edns", "+norec +noad +edns=0 +nocookie soa", Own, "SOA",
            "NOERROR aa SOA, EDNS 0, no options",
            |v| soa_aa(v) && edns0(v) && v.options.is_empty()),
        p("edns1", "+norec +noad +edns=1 +noednsneg +nocookie soa", Own, "SOA",
            "BADVERS, EDNS 0", badvers),
        p("ednsopt", "+norec +noad +edns=0 +ednsopt=100 +nocookie soa", Own, "SOA",
            "NOERROR aa SOA, option 100 not echoed",
            |v| soa_aa(v) && edns0(v) && v.options.is_empty()),
        p("edns1opt", "+norec +noad +edns=1 +noednsneg +ednsopt=100 +nocookie soa", Own, "SOA",
            "BADVERS, option 100 not echoed", |v| badvers(v) && v.options.is_empty()),
        p("do", "+norec +noad +edns=0 +dnssec +nocookie soa", Own, "SOA",
            "NOERROR aa SOA, DO echoed",
            |v| soa_aa(v) && v.edns.as_ref().is_some_and(|e| e.do_bit)),
        p("edns1do", "+norec +noad +edns=1 +noednsneg +dnssec +nocookie soa", Own, "SOA",
            "BADVERS", badvers),
        p("ednsflags", "+norec +noad +edns=0 +ednsflags=0x80 +nocookie soa", Own, "SOA",
            "NOERROR aa SOA, flag 0x80 not echoed", |v| soa_aa(v) && edns0(v)),
        p("optlist", "+norec +noad +edns=0 +nsid +subnet=0.0.0.0/0 +expire +cookie soa", Own,
            "SOA", "NSID, EXPIRE and a good COOKIE",
            |v| soa_aa(v) && ["NSID", "EXPIRE", "COOKIE(good)"].iter().all(|o| v.options.contains(*o))),
        p("signed", "+norec +noad +edns=0 +dnssec +nocookie soa", Signed, "SOA",
            "SOA and its RRSIG", |v| soa_aa(v) && v.answer.iter().any(|t| t == "RRSIG")),
        p("ednstcp", "+norec +noad +edns=0 +nocookie +tcp soa", Own, "SOA",
            "NOERROR aa SOA over TCP, EDNS 0", |v| soa_aa(v) && edns0(v)),
        p("zflag", "+norec +noad +edns=0 +nocookie +zflag soa", Own, "SOA",
            "NOERROR aa SOA, Z not echoed", |v| soa_aa(v) && !v.flags.contains("z")),
        p("opcode", "+norec +noad +noedns +opcode=15 soa", Own, "SOA",
            "NOTIMP", |v| v.status == "NOTIMP"),
        p("opcode/hdr", "+norec +noad +noedns +header-only +opcode=15", None, "SOA",
            "NOTIMP", |v| v.status == "NOTIMP"),
        p("type666", "+norec +noad +edns=0 +nocookie type666", Own, "TYPE666",
            "NOERROR aa, no answer",
            |v| v.status == "NOERROR" && v.flags.contains("aa") && v.answer.is_empty()),
        p("cd", "+norec +noad +cdflag +nocookie soa", Own, "SOA",
            "NOERROR aa cd SOA", |v| soa_aa(v) && v.flags.contains("cd")),
        p("edns@512", "+norec +noad +edns=0 +dnssec +bufsize=512 +ignore +nocookie dnskey", Signed,
            "DNSKEY", "TC=1 (the DNSKEY RRset is larger than 512 bytes)",
            |v| v.flags.contains("tc") && edns0(v)),
        p("cookie", "+norec +noad +edns=0 +cookie soa", Own, "SOA",
            "a good COOKIE", |v| soa_aa(v) && v.options.contains("COOKIE(good)")),
        p("subnet", "+norec +noad +edns=0 +subnet=0.0.0.0/0 +nocookie soa", Own, "SOA",
            "NOERROR aa SOA", soa_aa),
        p("nsid", "+norec +noad +edns=0 +nsid +nocookie soa", Own, "SOA",
            "NSID", |v| soa_aa(v) && v.options.contains("NSID")),
        p("expire", "+norec +noad +edns=0 +expire +nocookie soa", Own, "SOA",
            "EXPIRE", |v| soa_aa(v) && v.options.contains("EXPIRE")),
    ]
}

// ------------------------------------------------------------------------------------------
// Zones

/// The zones BIND serves for the probes: one per probe, and the signed zone.
/// `dir` holds the DNSSEC keys and the signer's files.
pub fn zones(dir: &TempDir) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = probes()
        .iter()
        .filter(|p| p.target == Target::Own)
        .filter_map(Probe::zone)
        .map(|z| {
            let text = zone(&z, "www A 192.0.2.1\n");
            (z, text)
        })
        .collect();
    out.push((SIGNED.to_string(), signed_zone(dir, SIGNED)));
    out
}

/// The zone of the raw-byte checks: a TXT (passed through, then cached) and a CNAME to an
/// address in the same zone (flattened by flatdns).
pub fn raw_zone() -> String {
    zone(
        RAW,
        "www   A     192.0.2.1\n\
         txt   TXT   \"raw\"\n\
         primed TXT  \"primed\"\n\
         alias CNAME www\n",
    )
}

/// `origin` signed with dnssec-signzone: a KSK and two ZSKs, RSASHA256 1024 bits (quick to
/// make), so the DNSKEY RRset with its signatures is far over 512 bytes (edns@512 needs TC).
fn signed_zone(dir: &TempDir, origin: &str) -> String {
    let unsigned = dir.write(
        &format!("{origin}.unsigned"),
        &zone(origin, "www A 192.0.2.1\ntxt TXT \"signed\"\n"),
    );
    let run = |program: &str, args: &[&str]| {
        let mut cmd = Command::new(tools::path_of(program).expect(program));
        cmd.current_dir(dir.path()).args(args);
        let out = tools::run_bounded(cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let keys = dir.path().display().to_string();
    for ksk in [true, false, false] {
        let mut args = vec!["-q", "-K", &keys, "-a", "RSASHA256", "-b", "1024"];
        if ksk {
            args.extend(["-f", "KSK"]);
        }
        args.push(origin);
        run("dnssec-keygen", &args);
    }
    let signed = dir.file(&format!("{origin}.signed"));
    let signed_s = signed.display().to_string();
    let unsigned_s = unsigned.display().to_string();
    run(
        "dnssec-signzone",
        &[
            "-q",
            "-S",
            "-K",
            &keys,
            "-d",
            &keys,
            "-o",
            origin,
            "-f",
            &signed_s,
            &unsigned_s,
        ],
    );
    std::fs::read_to_string(&signed).expect("read the signed zone")
}

// ------------------------------------------------------------------------------------------
// Verdicts

/// The OPT of a reply as genreport judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdnsVerdict {
    pub version: u8,
    pub do_bit: bool,
    /// An unknown EDNS flag (the MBZ bits) set in the reply: echoed.
    pub mbz: bool,
}

/// One reply reduced to what genreport judges. Values that legitimately differ between
/// servers (ID, TTLs, NSID text, cookie bytes, EXPIRE value, UDP size) are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Empty when no reply was read (dig failed); `notes` says why.
    pub status: String,
    pub opcode: String,
    /// Header flags as dig prints them (qr aa tc rd ra ad cd), and "z" when the reserved
    /// bit is set (dig's "MBZ: 0x4").
    pub flags: BTreeSet<String>,
    /// QUERY count: 1 when the question was echoed.
    pub question: usize,
    pub edns: Option<EdnsVerdict>,
    /// The EDNS options of the reply by name (NSID, EXPIRE, CLIENT-SUBNET, OPT=100 for the
    /// unknown one); a COOKIE with dig's judgement of it, e.g. "COOKIE(good)".
    pub options: BTreeSet<String>,
    /// Types of the answer-section records, in order.
    pub answer: Vec<String>,
    /// dig fell back to TCP after TC=1 (hides a TC that genreport would see).
    pub retried_tcp: bool,
    /// Anything else dig said about the exchange (warnings, errors, timeouts).
    pub notes: BTreeSet<String>,
}

impl Verdict {
    pub fn parse(out: &str) -> Verdict {
        let mut v = Verdict::default();
        let mut section = "";
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix(";; ->>HEADER<<- ") {
                for part in rest.split(", ") {
                    if let Some(x) = part.strip_prefix("opcode: ") {
                        v.opcode = x.to_string();
                    } else if let Some(x) = part.strip_prefix("status: ") {
                        v.status = x.to_string();
                    }
                }
            } else if let Some(rest) = line.strip_prefix(";; flags:") {
                // " qr aa; MBZ: 0x4; QUERY: 1, ANSWER: 1, AUTHORITY: 1, ADDITIONAL: 2"
                let mut parts = rest.split(';');
                v.flags = parts
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .map(String::from)
                    .collect();
                for part in parts.map(str::trim) {
                    if part.starts_with("MBZ") {
                        v.flags.insert("z".to_string());
                    }
                    for count in part.split(", ") {
                        if let Some(n) = count.strip_prefix("QUERY: ") {
                            v.question = n.trim().parse().unwrap_or(usize::MAX);
                        }
                    }
                }
            } else if line == ";; OPT PSEUDOSECTION:" {
                section = "OPT";
            } else if let Some(rest) = line.strip_prefix("; EDNS: version: ") {
                // "0, flags: do; MBZ: 0x0080, udp: 1232"
                let version = rest.split(',').next().unwrap_or("").trim();
                v.edns = Some(EdnsVerdict {
                    version: version.parse().unwrap_or(u8::MAX),
                    do_bit: rest.contains("flags: do"),
                    mbz: rest.contains("MBZ"),
                });
            } else if section == "OPT" && line.starts_with("; ") {
                let body = &line[2..];
                let name = body.split(':').next().unwrap_or(body).trim();
                let name = if name == "COOKIE" {
                    let judged = body
                        .rsplit_once('(')
                        .map_or("", |(_, j)| j.trim_end_matches(')'));
                    format!("COOKIE({judged})")
                } else {
                    name.to_string()
                };
                v.options.insert(name);
            } else if let Some(rest) = line.strip_prefix(";; ") {
                if rest.ends_with(" SECTION:") {
                    section = rest.split(' ').next().unwrap_or("");
                } else if rest.starts_with("Truncated, retrying in TCP mode") {
                    v.retried_tcp = true;
                } else if ![
                    "Got answer",
                    "global options",
                    "Query time",
                    "SERVER",
                    "WHEN",
                    "MSG SIZE",
                ]
                .iter()
                .any(|k| rest.starts_with(k))
                {
                    v.notes.insert(rest.trim().to_string());
                }
            } else if line.trim().is_empty() {
                section = "";
            } else if section == "ANSWER" && !line.starts_with(';') {
                if let Some(t) = line.split_whitespace().nth(3) {
                    v.answer.push(t.to_string());
                }
            }
        }
        if v.status.is_empty() {
            let said: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
            v.notes.insert(format!("no reply: {}", said.join(" / ")));
        }
        v
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.status.is_empty() {
            return write!(f, "NO REPLY");
        }
        let flags: Vec<&str> = self.flags.iter().map(String::as_str).collect();
        write!(f, "{}", self.status)?;
        if self.opcode != "QUERY" {
            write!(f, "/{}", self.opcode)?;
        }
        write!(f, " [{}] q{}", flags.join(" "), self.question)?;
        match &self.edns {
            None => write!(f, " noopt")?,
            Some(e) => {
                write!(f, " edns{}", e.version)?;
                if e.do_bit {
                    write!(f, "+do")?;
                }
                if e.mbz {
                    write!(f, "+MBZ")?;
                }
            }
        }
        if !self.options.is_empty() {
            let o: Vec<&str> = self.options.iter().map(String::as_str).collect();
            write!(f, " {{{}}}", o.join(","))?;
        }
        write!(f, " an={}", self.answer.len())?;
        if !self.answer.is_empty() {
            write!(f, "({})", self.answer.join(","))?;
        }
        if self.retried_tcp {
            write!(f, " tc->tcp")?;
        }
        for n in &self.notes {
            write!(f, " !{n}")?;
        }
        Ok(())
    }
}

/// Runs `dig @server -p port <probe args> [zone]` and returns what it printed (stdout, then
/// stderr), whatever its exit status: a failure is part of the verdict.
pub fn dig(server: SocketAddr, args: &[&str], zone: Option<&str>) -> String {
    let mut cmd = Command::new(tools::path_of("dig").expect("dig not installed"));
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["+time=2", "+tries=2"])
        .args(args)
        .args(zone);
    let out = tools::run_bounded(cmd, Duration::from_secs(20));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        text.push_str(&format!("\n;; dig exited with {}\n", out.status));
    }
    text
}

/// One probe's exchange: the verdict and dig's output.
#[derive(Debug, Clone)]
pub struct Seen {
    pub verdict: Verdict,
    pub raw: String,
}

pub fn probe(server: SocketAddr, p: &Probe, zone: Option<&str>) -> Seen {
    let args: Vec<&str> = p.args.split_whitespace().collect();
    let raw = dig(server, &args, zone);
    Seen {
        verdict: Verdict::parse(&raw),
        raw,
    }
}

// ------------------------------------------------------------------------------------------
// The verdict table

/// A probe's row: BIND's verdict and flatdns's, in as many columns as there are passes.
pub struct Row {
    pub probe: &'static str,
    pub bind: Seen,
    pub flatdns: Vec<Seen>,
    /// Queries flatdns sent BIND for each flatdns column, when counted.
    pub upstream: Vec<Option<usize>>,
}

/// The table as text: BIND's verdict in full, each flatdns column "= BIND" or its own
/// verdict, marked with "**" when it differs.
pub fn table(title: &str, columns: &[&str], rows: &[Row]) -> String {
    let mut out = format!("\n{title}\n");
    let width = rows.iter().map(|r| r.probe.len()).max().unwrap_or(5).max(5);
    let bind_w = rows
        .iter()
        .map(|r| r.bind.verdict.to_string().len())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!("{:width$} | {:bind_w$}", "probe", "BIND"));
    for c in columns {
        out.push_str(&format!(" | {c}"));
    }
    out.push('\n');
    out.push_str(&format!(
        "{}\n",
        "-".repeat(width + bind_w + 3 + 30 * columns.len())
    ));
    for r in rows {
        out.push_str(&format!(
            "{:width$} | {:bind_w$}",
            r.probe,
            r.bind.verdict.to_string()
        ));
        for (i, s) in r.flatdns.iter().enumerate() {
            let cell = if s.verdict == r.bind.verdict {
                "= BIND".to_string()
            } else {
                format!("** {}", s.verdict)
            };
            let up = match r.upstream.get(i).copied().flatten() {
                Some(n) => format!(" (up {n})"),
                None => String::new(),
            };
            out.push_str(&format!(" | {cell}{up}"));
        }
        out.push('\n');
    }
    out
}

/// Every difference in `rows`, each with both verdicts and dig's raw output.
pub fn differences(pass: &str, columns: &[&str], rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rows {
        for (c, s) in columns.iter().zip(&r.flatdns) {
            if s.verdict != r.bind.verdict {
                out.push(format!(
                    "[{pass}] {}: {c} differs from BIND\n  BIND:    {}\n  flatdns: {}\n  verdicts: {:?}\n         vs {:?}\n--- dig, BIND ---\n{}\n--- dig, flatdns ({c}) ---\n{}",
                    r.probe,
                    r.bind.verdict,
                    s.verdict,
                    r.bind.verdict,
                    s.verdict,
                    r.bind.raw.trim(),
                    s.raw.trim()
                ));
            }
        }
    }
    out
}

// ------------------------------------------------------------------------------------------
// Raw bytes of the replies flatdns writes itself

/// The OPT flag bit that no RFC defines (genreport's ednsflags probe).
const UNKNOWN_EDNS_FLAG: u16 = 0x0080;
/// The option code no RFC defines (genreport's ednsopt probe).
const UNKNOWN_OPTION: u16 = 100;
/// The last reserved header bit.
const FLAG_Z: u16 = 0x0040;
const HEADER_LEN: usize = 12;
const OPT_NSID: u16 = dns::OPT_NSID;
const OPT_ECS: u16 = 8;
const OPT_EXPIRE: u16 = 9;

/// A query with every "must not be echoed" bit set: the header Z bit and, when it has EDNS,
/// an unknown EDNS flag and an unknown option. `opcode` goes into the header; `question`
/// false leaves the question out (QDCOUNT 0, as `dig +header-only`).
fn hostile(
    name: &str,
    qtype: u16,
    opcode: u16,
    edns: Option<Edns>,
    question: bool,
    id: u16,
) -> Vec<u8> {
    let edns = edns.map(|e| e.option(UNKNOWN_OPTION, &[]));
    let q = Query::new(name, qtype)
        .flags((opcode << 11) | FLAG_Z)
        .edns(edns.clone())
        .id(id);
    let mut wire = q.to_wire();
    let qlen = q.question_wire().len();
    if edns.is_some() {
        // OPT: root name (1), TYPE (2), CLASS (2), ext rcode (1), version (1), flags (2).
        let at = HEADER_LEN + qlen + 7;
        let flags = u16::from_be_bytes([wire[at], wire[at + 1]]) | UNKNOWN_EDNS_FLAG;
        wire[at..at + 2].copy_from_slice(&flags.to_be_bytes());
    }
    if !question {
        wire.drain(HEADER_LEN..HEADER_LEN + qlen);
        wire[4..6].copy_from_slice(&[0, 0]);
    }
    wire
}

/// The extended rcode of a reply (RFC 6891 6.1.3).
pub fn ext_rcode(r: &Reply) -> u16 {
    let high = r.opt().map_or(0, |o| u16::from(o.ttl.to_be_bytes()[0]));
    (high << 4) | u16::from(r.rcode())
}

/// What must hold for any reply to `query` (which had an OPT when `had_opt`); `None` when
/// it holds.
fn check_reply(label: &str, query: &[u8], had_opt: bool, reply: &[u8]) -> Vec<String> {
    let mut bad = Vec::new();
    if reply.len() < 12 {
        return vec![format!(
            "{label}: reply shorter than a header: {reply:02x?}"
        )];
    }
    let r = Reply::parse(reply);
    if reply[..2] != query[..2] {
        bad.push("ID not echoed".to_string());
    }
    if !r.has(dns::FLAG_QR) {
        bad.push("QR not set".to_string());
    }
    if r.has(FLAG_Z) {
        bad.push("header Z bit echoed".to_string());
    }
    let opts: Vec<&dns::Record> = r
        .additional
        .iter()
        .filter(|a| a.rtype == dns::OPT)
        .collect();
    if opts.len() > 1 {
        bad.push(format!("{} OPT records", opts.len()));
    }
    match (had_opt, r.opt()) {
        (true, None) => bad.push("no OPT, but the query had one".to_string()),
        (false, Some(_)) => bad.push("OPT, but the query had none".to_string()),
        (_, Some(opt)) => {
            let [_, version, f1, f2] = opt.ttl.to_be_bytes();
            if version != 0 {
                bad.push(format!("OPT version {version}"));
            }
            let flags = u16::from_be_bytes([f1, f2]);
            if flags & !0x8000 != 0 {
                bad.push(format!("OPT flags {flags:#06x}: unknown flags echoed"));
            }
            if opt.owner != "." {
                bad.push(format!("OPT owner {}", opt.owner));
            }
            // The query carried no option but the unknown one: anything in the reply is
            // either that one echoed or an option nobody asked for (RFC 5001 2.2: never an
            // NSID to a client that did not ask; RFC 7314, RFC 7873 likewise).
            for (code, _) in r.options() {
                if code == UNKNOWN_OPTION {
                    bad.push("unknown option 100 echoed".to_string());
                } else {
                    bad.push(format!(
                        "option {code} ({}) not asked for",
                        option_name(code)
                    ));
                }
            }
        }
        (false, None) => {}
    }
    if bad.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{label}: {}\n-- query --\n{}\n-- reply --\n{}",
            bad.join("; "),
            dns::hex(query),
            dns::hex(reply)
        )]
    }
}

fn option_name(code: u16) -> &'static str {
    match code {
        OPT_NSID => "NSID",
        OPT_ECS => "ECS",
        OPT_EXPIRE => "EXPIRE",
        dns::OPT_COOKIE => "COOKIE",
        _ => "?",
    }
}

/// One raw exchange's outcome, for the report.
pub struct RawLine {
    pub text: String,
}

/// Sends each kind of query flatdns answers itself, with and without EDNS, and checks the
/// bytes of the replies. Returns the report lines and the failures.
pub fn self_written(bind: &Named, flatdns: SocketAddr) -> (Vec<RawLine>, Vec<String>) {
    let wait = Duration::from_secs(5);
    let mut lines = Vec::new();
    let mut failures = Vec::new();
    let mut id = 0x3100u16;
    let variants: [(&str, Option<Edns>); 3] = [
        ("no EDNS", None),
        ("EDNS", Some(Edns::new(1232))),
        ("EDNS+DO", Some(Edns::new(1232).dnssec())),
    ];
    struct Case {
        label: &'static str,
        name: String,
        qtype: u16,
        opcode: u16,
        question: bool,
        sends: usize,
        /// The rcode flatdns must give; `None`: BIND's for the same bytes.
        rcode: Option<u16>,
        /// TC=1 required.
        tc: bool,
    }
    let case = |label, name: &str, qtype, opcode, question, sends, rcode, tc| Case {
        label,
        name: format!("{name}.{RAW}"),
        qtype,
        opcode,
        question,
        sends,
        rcode,
        tc,
    };
    let cases = [
        // A miss passes BIND's reply through; the repeat is a cache hit flatdns writes.
        case(
            "TXT, miss then cache hit",
            "txt",
            dns::TXT,
            0,
            true,
            2,
            Some(0),
            false,
        ),
        // A CNAME chain flattened into an address (DO=0): written by flatdns, then cached.
        case(
            "A via CNAME (flattened unless DO), then hit",
            "alias",
            dns::A,
            0,
            true,
            2,
            Some(0),
            false,
        ),
        case("opcode 15", "notimp", dns::SOA, 15, true, 1, None, false),
        // genreport's own opcode probe has no question (dig +header-only).
        case(
            "opcode 15, no question",
            "x",
            dns::SOA,
            15,
            false,
            1,
            None,
            false,
        ),
        // FORMERR: a QUERY without a question.
        case(
            "QUERY, no question",
            "x",
            dns::SOA,
            0,
            false,
            1,
            None,
            false,
        ),
        case(
            "NOTIFY (documented: REFUSED)",
            "notify",
            dns::SOA,
            4,
            true,
            1,
            Some(5),
            false,
        ),
        case(
            "UPDATE (documented: REFUSED)",
            "update",
            dns::SOA,
            5,
            true,
            1,
            Some(5),
            false,
        ),
        case(
            "ANY over UDP (documented: TC=1)",
            "www",
            dns::ANY,
            0,
            true,
            1,
            Some(0),
            true,
        ),
    ];
    for c in &cases {
        for (vlabel, edns) in &variants {
            let label = format!("{} [{vlabel}]", c.label);
            for n in 0..c.sends {
                id = id.wrapping_add(1);
                let q = hostile(&c.name, c.qtype, c.opcode, edns.clone(), c.question, id);
                let Some(reply) = dns::try_udp(flatdns, &q, wait) else {
                    failures.push(format!(
                        "{label} #{n}: no reply from flatdns\n{}",
                        dns::hex(&q)
                    ));
                    continue;
                };
                let mut bad = check_reply(&format!("{label} #{n}"), &q, edns.is_some(), &reply);
                let r = Reply::parse(&reply);
                let expected = match c.rcode {
                    Some(rc) => Some(rc),
                    None => dns::try_udp(bind.addr, &q, wait).map(|b| ext_rcode(&Reply::parse(&b))),
                };
                if expected.is_some_and(|e| e != ext_rcode(&r)) {
                    bad.push(format!(
                        "{label} #{n}: rcode {}, expected {expected:?} (BIND's for the same bytes where not documented)\n{}",
                        ext_rcode(&r),
                        dns::hex(&reply)
                    ));
                }
                if c.tc && !r.has(dns::FLAG_TC) {
                    bad.push(format!("{label} #{n}: TC=1 expected\n{}", dns::hex(&reply)));
                }
                lines.push(RawLine {
                    text: format!(
                        "{label} #{n}: rcode {} opt={} q{} an={} {}",
                        ext_rcode(&r),
                        r.opt().is_some(),
                        u8::from(!r.question.is_empty()),
                        r.answer.len(),
                        if bad.is_empty() { "ok" } else { "FAIL" }
                    ),
                });
                failures.extend(bad);
            }
        }
    }
    // A query that asks for NSID and EXPIRE (server data: it bypasses the cache), then one
    // that does not: BIND's NSID and EXPIRE must never be replayed to the second.
    for (vlabel, edns) in &variants[1..] {
        let label = format!("TXT cached for an NSID+EXPIRE query, then hit [{vlabel}]");
        let name = format!("primed.{RAW}");
        id = id.wrapping_add(1);
        let primer = Query::new(&name, dns::TXT).flags(0).id(id).edns(
            edns.clone()
                .map(|e| e.option(OPT_NSID, &[]).option(OPT_EXPIRE, &[])),
        );
        let Some(first) = dns::try_udp(flatdns, &primer.to_wire(), wait) else {
            failures.push(format!("{label}: no reply to the primer"));
            continue;
        };
        let primed = Reply::parse(&first).options();
        if !primed.iter().any(|(c, _)| *c == OPT_NSID) {
            failures.push(format!(
                "{label}: test setup: BIND's reply to the primer has no NSID: {primed:?}"
            ));
        }
        id = id.wrapping_add(1);
        let q = hostile(&name, dns::TXT, 0, edns.clone(), true, id);
        let Some(reply) = dns::try_udp(flatdns, &q, wait) else {
            failures.push(format!("{label}: no reply from flatdns"));
            continue;
        };
        let bad = check_reply(&label, &q, true, &reply);
        let r = Reply::parse(&reply);
        let codes: Vec<u16> = primed.iter().map(|(c, _)| *c).collect();
        lines.push(RawLine {
            text: format!(
                "{label}: primer got options {codes:?}; hit: rcode {} opt={} options {:?} {}",
                ext_rcode(&r),
                r.opt().is_some(),
                r.options().iter().map(|(c, _)| *c).collect::<Vec<_>>(),
                if bad.is_empty() { "ok" } else { "FAIL" }
            ),
        });
        failures.extend(bad);
    }
    // EDNS version 1: BADVERS, written by flatdns; only exists with an OPT.
    for (vlabel, edns) in &variants[1..] {
        let label = format!("EDNS version 1 [{vlabel}]");
        id = id.wrapping_add(1);
        let e = edns.clone().map(|e| Edns { version: 1, ..e });
        let q = hostile(&format!("badvers.{RAW}"), dns::SOA, 0, e, true, id);
        let Some(reply) = dns::try_udp(flatdns, &q, wait) else {
            failures.push(format!("{label}: no reply from flatdns"));
            continue;
        };
        let mut bad = check_reply(&label, &q, true, &reply);
        let r = Reply::parse(&reply);
        if ext_rcode(&r) != 16 {
            bad.push(format!(
                "{label}: rcode {}, expected BADVERS (16)",
                ext_rcode(&r)
            ));
        }
        if !r.answer.is_empty() || !r.authority.is_empty() {
            bad.push(format!("{label}: records in a BADVERS reply"));
        }
        lines.push(RawLine {
            text: format!(
                "{label}: rcode {} opt={} {}",
                ext_rcode(&r),
                r.opt().is_some(),
                if bad.is_empty() { "ok" } else { "FAIL" }
            ),
        });
        failures.extend(bad);
    }
    // The repeats were cache hits: BIND saw each TXT/A question once per cache key (EDNS
    // or not, DO or not); the locally answered ones never reached it.
    bind.sync_query_log();
    for (name, qtype, want) in [
        ("txt", "TXT", 3),
        ("alias", "A", 3),
        // Per EDNS variant: the NSID+EXPIRE primer bypasses the cache, the plain query is a
        // miss of its own.
        ("primed", "TXT", 4),
        ("badvers", "SOA", 0),
        ("notify", "SOA", 0),
        ("update", "SOA", 0),
        ("www", "ANY", 0),
    ] {
        let fqdn = format!("{name}.{RAW}");
        let got = bind.queries_for(&fqdn, qtype);
        // The rcode comparison for opcode 15 asked BIND directly: those are not counted here.
        if got != want {
            failures.push(format!(
                "{fqdn} {qtype}: BIND saw {got} queries, expected {want} (repeats must be cache hits; local answers must not go upstream)"
            ));
        }
    }
    (lines, failures)
}

// ------------------------------------------------------------------------------------------
// A server that echoes every query back, to prove the verdict sees echoes

/// A UDP server on a free loopback port that sends every datagram back with QR set: the
/// worst non-compliant server genreport knows. Stops when dropped.
pub struct Echo {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Echo {
    pub fn start() -> Echo {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind echo server");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set read timeout");
        let addr = sock.local_addr().expect("echo address");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    if n >= 12 {
                        buf[2] |= 0x80;
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            }
        });
        Echo {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
