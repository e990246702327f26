//! The real servers: BIND 9 (`named`), Unbound and the `flatdns` binary, each started in the
//! foreground in its own temporary directory and killed when its guard is dropped, so nothing
//! outlives a test, even one that panics.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::dns::{self, Query};
use super::tools;

/// How long a server gets to start answering.
const START_WAIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------
// Temporary directories and ports

/// A directory under the system temp dir, removed on drop unless the test failed (then it
/// is kept, and its path printed, for the logs inside).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "flatdns-interop-{}-{}-{label}-{nanos}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.file(name);
        fs::write(&p, text).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("interop: keeping {} for inspection", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A loopback port that is free for both UDP and TCP right now: bind both to it, then let
/// go. Another process may take it before the server binds it, so servers retry on failure.
/// A port is never handed out twice in one test process, so two servers started at the same
/// time by parallel tests cannot be given the same one.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP port 0");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && GIVEN.lock().map(|mut g| g.insert(port)).unwrap_or(true)
        {
            return port;
        }
    }
    panic!("no loopback port free for both UDP and TCP after 100 tries");
}

// ------------------------------------------------------------------------------------------
// Child processes

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    fn new(child: Child, name: &str) -> Proc {
        Proc {
            child: Some(child),
            name: name.to_string(),
        }
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
    /// `Some(status)` once the process has exited.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn terminate(&mut self, wait: Duration) -> Option<ExitStatus> {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "could not send SIGTERM to {} (pid {pid})", self.name);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                self.child = None;
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Why a start attempt failed.
enum StartError {
    /// Worth another attempt on another port.
    Retry(String),
    /// The configuration or a zone is broken: another attempt would fail the same way.
    Fatal(String),
}

/// Waits until `server` answers every probe over UDP with a reply that satisfies `good`, and
/// accepts TCP connections; fails when `proc` exits, `broken` reports an error in the
/// server's log, or time is up.
fn wait_until_answering(
    proc: &mut Proc,
    server: SocketAddr,
    probes: &[Query],
    good: fn(&dns::Reply) -> bool,
    broken: &dyn Fn() -> bool,
) -> Result<(), StartError> {
    use StartError::{Fatal, Retry};
    let deadline = Instant::now() + START_WAIT;
    let mut last = None;
    for _ in 0..1000 {
        if broken() {
            return Err(Fatal(format!(
                "{} reports a configuration error",
                proc.name
            )));
        }
        if let Some(status) = proc.exited() {
            return Err(Retry(format!(
                "{} exited during startup: {status}",
                proc.name
            )));
        }
        if Instant::now() > deadline {
            return Err(Retry(format!(
                "{} did not answer as expected within {START_WAIT:?}; last reply: {last:?}",
                proc.name
            )));
        }
        let mut all = true;
        for probe in probes {
            let reply = dns::try_udp(server, &probe.to_wire(), Duration::from_millis(200))
                .map(|w| dns::Reply::parse(&w));
            all &= reply.as_ref().is_some_and(good);
            if !all {
                last = reply.map(|r| (probe.name.clone(), r.flags, r.answer.len()));
                break;
            }
        }
        if all && std::net::TcpStream::connect_timeout(&server, Duration::from_millis(200)).is_ok()
        {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(Retry(format!("{} never answered", proc.name)))
}

// ------------------------------------------------------------------------------------------
// BIND 9

/// Zone-file text for `origin` with the boilerplate every zone needs (SOA, NS and the NS
/// address) put in front of `body`. `body` is ordinary zone-file text relative to `origin`.
pub fn zone(origin: &str, body: &str) -> String {
    format!(
        "$ORIGIN {origin}.\n$TTL 300\n\
         @ 3600 IN SOA ns1.{origin}. hostmaster.{origin}. 1 3600 600 86400 300\n\
         @ 3600 IN NS ns1.{origin}.\n\
         ns1 3600 IN A 127.0.0.1\n\
         {body}\n"
    )
}

/// A running `named`: authoritative only, on 127.0.0.1, every query logged to a file.
pub struct Named {
    pub addr: SocketAddr,
    querylog: PathBuf,
    first_zone: String,
    _proc: Proc,
    _dir: TempDir,
    seq: AtomicU32,
}

impl Named {
    /// Starts `named` serving `zones` (origin, zone-file text), retrying on another port if
    /// it fails to start (the port may have been taken since we picked it).
    pub fn start(zones: &[(&str, String)]) -> Named {
        let named = tools::path_of("named").expect("named not installed");
        let mut errors = Vec::new();
        for attempt in 0..5 {
            let dir = TempDir::new("named");
            let port = free_port();
            let conf = named_conf(&dir, port, zones);
            let conf_path = dir.write("named.conf", &conf);
            let stderr = fs::File::create(dir.file("named.log")).expect("create named log");
            // -g: foreground, everything logged to stderr (here a file), the query log and
            // zone errors included (with -f, errors before the logging statement is read go
            // to syslog). -n 1: one worker thread; the machine is shared.
            let child = Command::new(&named)
                .arg("-g")
                .args(["-n", "1"])
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .expect("spawn named");
            let mut proc = Proc::new(child, "named");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // Every zone loaded: its SOA comes back authoritative.
            let probes: Vec<Query> = zones
                .iter()
                .map(|(origin, _)| Query::new(origin, dns::SOA).flags(0))
                .collect();
            // named keeps running when it cannot bind its port (someone else took it
            // since we picked it); then what answers may be another server. Ours answers
            // id.server (CH TXT) with its own server-id.
            let id = server_id(port);
            let loaded = |r: &dns::Reply| r.rcode() == dns::NOERROR && r.has(dns::FLAG_AA);
            let log_path = dir.file("named.log");
            let broken = || {
                let log = read_lossy(&log_path);
                log.contains("not loaded due to errors") || log.contains("loading configuration: ")
            };
            let started =
                wait_until_answering(&mut proc, addr, &probes, loaded, &broken).and_then(|()| {
                    let q = Query::new("id.server", dns::TXT)
                        .class(dns::CLASS_CH)
                        .flags(0);
                    let r = dns::try_udp(addr, &q.to_wire(), Duration::from_secs(2))
                        .map(|w| dns::Reply::parse(&w));
                    let ours = r.as_ref().is_some_and(|r| {
                        r.answer
                            .iter()
                            .any(|a| a.rdata.windows(id.len()).any(|w| w == id.as_bytes()))
                    });
                    if ours {
                        Ok(())
                    } else {
                        Err(StartError::Retry(format!(
                            "the server on port {port} is not ours: {r:?}"
                        )))
                    }
                });
            match started {
                Ok(()) => {
                    return Named {
                        addr,
                        querylog: dir.file("named.log"),
                        first_zone: zones[0].0.to_string(),
                        _proc: proc,
                        _dir: dir,
                        seq: AtomicU32::new(0),
                    }
                }
                Err(StartError::Retry(e)) => {
                    drop(proc);
                    errors.push(format!(
                        "attempt {attempt} on port {port}: {e}\n--- named.log ---\n{}",
                        read_lossy(&dir.file("named.log"))
                    ));
                }
                Err(StartError::Fatal(e)) => {
                    drop(proc);
                    panic!(
                        "{e}\n--- named.log ---\n{}",
                        read_lossy(&dir.file("named.log"))
                    );
                }
            }
        }
        panic!("named failed to start:\n{}", errors.join("\n"));
    }

    /// The query log as written so far.
    pub fn query_log(&self) -> String {
        read_lossy(&self.querylog)
    }

    /// Makes sure every query BIND received before this call is in the query log: sends a
    /// unique sentinel query and waits (bounded) until its line appears.
    pub fn sync_query_log(&self) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("sentinel-{n}.{}", self.first_zone);
        let q = Query::new(&name, dns::TXT).flags(0).id(0x5e00 + n as u16);
        dns::udp(self.addr, &q.to_wire(), Duration::from_secs(5));
        let needle = format!("query: {name} IN TXT");
        let deadline = Instant::now() + Duration::from_secs(5);
        for _ in 0..500 {
            if self.query_log().contains(&needle) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sentinel {name} never reached BIND's query log:\n{}",
                self.query_log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        panic!("sentinel {name} never reached BIND's query log");
    }

    /// How many queries for `name` (any case) and `qtype` ("A", "MX" ...) BIND has logged.
    /// Call [`Named::sync_query_log`] first.
    pub fn queries_for(&self, name: &str, qtype: &str) -> usize {
        let needle = format!(
            "query: {} in {} ",
            name.to_ascii_lowercase(),
            qtype.to_ascii_lowercase()
        );
        self.query_log()
            .lines()
            .filter(|l| l.to_ascii_lowercase().contains(&needle))
            .count()
    }
}

/// The server-id (NSID, id.server) of our named on `port`.
fn server_id(port: u16) -> String {
    format!("interop-{}-{port}", std::process::id())
}

fn named_conf(dir: &TempDir, port: u16, zones: &[(&str, String)]) -> String {
    let d = dir.path().display();
    let id = server_id(port);
    let mut conf = format!(
        r#"options {{
    directory "{d}";
    pid-file "{d}/named.pid";
    session-keyfile "{d}/session.key";
    managed-keys-directory "{d}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    recursion no;
    dnssec-validation no;
    notify no;
    allow-transfer {{ none; }};
    querylog yes;
    server-id "{id}";
    // Records in the order of the zone file on every answer (the default, cyclic, rotates
    // them, and then two identical queries would get different bytes).
    rrset-order {{ order none; }};
}};
controls {{ }};
"#
    );
    for (origin, text) in zones {
        let file = dir.write(&format!("{origin}.zone"), text);
        conf.push_str(&format!(
            "zone \"{origin}\" {{ type primary; file \"{}\"; }};\n",
            file.display()
        ));
    }
    conf
}

// ------------------------------------------------------------------------------------------
// Unbound

/// A running `unbound`: a recursive resolver on 127.0.0.1 whose only sources are stub zones.
pub struct Unbound {
    pub addr: SocketAddr,
    _proc: Proc,
    _dir: TempDir,
}

impl Unbound {
    /// Starts Unbound with a stub zone per (zone, server) pair.
    pub fn start(stubs: &[(&str, SocketAddr)]) -> Unbound {
        let unbound = tools::path_of("unbound").expect("unbound not installed");
        let mut errors = Vec::new();
        for attempt in 0..5 {
            let dir = TempDir::new("unbound");
            let port = free_port();
            let conf = unbound_conf(&dir, port, stubs);
            let conf_path = dir.write("unbound.conf", &conf);
            let log = fs::File::create(dir.file("unbound.log")).expect("create unbound log");
            let child = Command::new(&unbound)
                .arg("-d")
                .arg("-c")
                .arg(&conf_path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn unbound");
            let mut proc = Proc::new(child, "unbound");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // Every stub reachable: the zone's SOA resolves.
            let probes: Vec<Query> = stubs
                .iter()
                .map(|(zone, _)| Query::new(zone, dns::SOA))
                .collect();
            let resolved = |r: &dns::Reply| r.rcode() == dns::NOERROR && !r.answer.is_empty();
            // Unbound exits on any startup error (a port taken included): retry.
            match wait_until_answering(&mut proc, addr, &probes, resolved, &|| false) {
                Ok(()) => {
                    return Unbound {
                        addr,
                        _proc: proc,
                        _dir: dir,
                    }
                }
                Err(StartError::Retry(e)) => {
                    drop(proc);
                    errors.push(format!(
                        "attempt {attempt} on port {port}: {e}\n--- unbound.log ---\n{}",
                        read_lossy(&dir.file("unbound.log"))
                    ));
                }
                Err(StartError::Fatal(e)) => {
                    drop(proc);
                    panic!(
                        "{e}\n--- unbound.log ---\n{}",
                        read_lossy(&dir.file("unbound.log"))
                    );
                }
            }
        }
        panic!("unbound failed to start:\n{}", errors.join("\n"));
    }
}

fn unbound_conf(dir: &TempDir, port: u16, stubs: &[(&str, SocketAddr)]) -> String {
    let d = dir.path().display();
    let mut conf = format!(
        r#"server:
    interface: 127.0.0.1@{port}
    port: {port}
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    do-daemonize: no
    chroot: ""
    username: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    logfile: ""
    use-syslog: no
    log-time-ascii: yes
    verbosity: 1
    num-threads: 1
    access-control: 127.0.0.0/8 allow
    # The stub servers are on 127.0.0.1.
    do-not-query-localhost: no
    # Plain recursion: no validator, so no trust anchor or root key file is needed.
    module-config: "iterator"
    trust-anchor-signaling: no
    root-key-sentinel: no
    qname-minimisation: no
    rrset-roundrobin: no
    minimal-responses: yes
    # test. is one of Unbound's built-in empty local zones (RFC 6761): switch it off.
    local-zone: "test." nodefault
remote-control:
    control-enable: no
"#
    );
    for (zone, server) in stubs {
        conf.push_str(&format!(
            "stub-zone:\n    name: \"{zone}\"\n    stub-addr: {}@{}\n",
            server.ip(),
            server.port()
        ));
    }
    conf
}

// ------------------------------------------------------------------------------------------
// flatdns

/// The `flatdns` binary, started with `--listen 127.0.0.1:0` unless `args` names a listen
/// address; the bound address is read from its startup log line (`listen=IP:PORT`).
pub struct Flatdns {
    pub addr: SocketAddr,
    proc: Proc,
    log: Arc<Mutex<Vec<String>>>,
}

impl Flatdns {
    pub fn start(args: &[&str]) -> Flatdns {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flatdns"));
        if !args.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--log-level") {
            cmd.args(["--log-level", "info"]);
        }
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn flatdns");
        let stderr = child.stderr.take().expect("flatdns stderr");
        let mut proc = Proc::new(child, "flatdns");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        // Keeps draining stderr for the process's whole life, so it never blocks on a full
        // pipe, and keeps the lines for failure messages.
        thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let line = strip_ansi(&line);
                if !sent {
                    if let Some(addr) = listen_addr(&line) {
                        let _ = tx.send(addr);
                        sent = true;
                    }
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let deadline = Instant::now() + START_WAIT;
        let mut addr = None;
        for _ in 0..1000 {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(a) => {
                    addr = Some(a);
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() > deadline || proc.exited().is_some() {
                break;
            }
        }
        let Some(addr) = addr else {
            thread::sleep(Duration::from_millis(100));
            let status = proc.exited();
            let lines = log.lock().map(|l| l.join("\n")).unwrap_or_default();
            panic!(
                "flatdns {args:?} did not log its listen address within {START_WAIT:?} (exit: {status:?}); stderr:\n{lines}"
            );
        };
        Flatdns { addr, proc, log }
    }

    /// Everything flatdns has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// SIGTERM, then the exit status (bounded wait).
    pub fn stop(mut self) -> ExitStatus {
        match self.proc.terminate(Duration::from_secs(10)) {
            Some(s) => s,
            None => panic!(
                "flatdns did not exit within 10 s of SIGTERM; stderr:\n{}",
                self.log()
            ),
        }
    }
}

/// The first address after `listen=` in a log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("listen=")? + "listen=".len()..];
    let end = rest
        .find(|c: char| c == ',' || c == '"' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Removes ANSI escape sequences (CSI ... letter), in case the log is coloured anyway.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}
