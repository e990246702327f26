//! The `flatdns` binary itself: exit codes, config errors, serving, and SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_flatdns");

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    f
}

#[test]
fn bad_config_exits_2_naming_file_line_key_and_value() {
    let f = write_config("upstream = [\"192.0.2.1\"]\n\n[cache]\nmax_ttl = \"forever\"\n");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(f.path())
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{}:4", f.path().display())), "{err}");
    assert!(
        err.contains("cache.max_ttl") && err.contains("forever"),
        "{err}"
    );

    let f = write_config("upstream = [\"192.0.2.1\"]\nlisten_on = 1\n");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(f.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_on") && err.contains("line 2"), "{err}");

    let out = Command::new(BIN)
        .args(["--upstream", "192.0.2.1", "--allow", "not-a-net"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow"));
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/flatdns.toml");
    let out = Command::new(BIN)
        .args([
            "--config",
            path,
            "--upstream",
            "192.0.2.1",
            "--check-config",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("192.0.2.1:53"));
}

/// The flatdns binary, killed on drop so a failing test leaves nothing behind.
struct Running {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    /// Its stderr, line by line.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Running {
    /// Waits (at most 10 s) for a stderr line containing `text`; returns it.
    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("no log line with {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (the binary, or a wrapper that execs it) listening on 127.0.0.1:0 and
/// forwarding to `upstream`; waits for its start-up line and reads the bound address there.
fn start(mut cmd: Command, upstream: std::net::SocketAddr) -> Running {
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream.to_string(),
    ])
    .args(["--log-level", "info"]);
    spawn(cmd)
}

/// The lines of a child's output stream, read on a thread of their own.
fn lines_of(r: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Starts `cmd` as it is (its flags or config file say where to listen, on port 0) and
/// reads the bound address from the start-up line.
fn spawn(mut cmd: Command) -> Running {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let rx = lines_of(child.stderr.take().unwrap());
    let mut running = Running {
        child,
        addr: ([0, 0, 0, 0], 0).into(),
        lines: rx,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    running.addr = loop {
        let line = running
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("startup line");
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_matches('"')
                .parse()
                .unwrap();
        }
    };
    running
}

#[tokio::test]
async fn serves_and_exits_0_on_sigterm() {
    let mock = Mock::start("www.example. 300 IN A 192.0.2.1").await;
    // Started with a soft open-file limit of 1,024, as many systems default to: flatdns must
    // raise it to fit limits.max_inflight (R11). prlimit execs it: same pid.
    let mut cmd = Command::new("prlimit");
    cmd.arg("--nofile=1024:20000").arg(BIN);
    let mut child = start(cmd, mock.addr);
    let addr = child.addr;
    let r = udp_query(addr, &Q::new("www.example.", A).wire()).await;
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.child.id())).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap()
        .parse()
        .unwrap();
    assert!(soft >= 4096 + 512, "open-file soft limit {soft}");
    let r = tcp_query(addr, &Q::new("www.example.", A).wire()).await;
    assert_eq!(r.answer.len(), 1);
    let status = Command::new("kill")
        .args(["-TERM", &child.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut code = None;
    for _ in 0..100 {
        if let Some(s) = child.child.try_wait().unwrap() {
            code = s.code();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, Some(0));
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// R15: a million queries on one TCP connection, pipelined: every one answered, and the
/// process grows by less than 10 MB once warm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_queries_on_one_tcp_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mock = Mock::start("www.example. 300 IN A 192.0.2.1").await;
    let child = start(Command::new(BIN), mock.addr);
    let addr = child.addr;
    let pid = child.child.id();
    // Warm the cache first: a cold flood of one name would (rightly) get SERVFAIL past the
    // 100 waiters allowed on one in-flight query (R4).
    assert_eq!(
        udp_query(addr, &Q::new("www.example.", A).wire())
            .await
            .rcode(),
        0
    );
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let q = Q::new("www.example.", A).wire();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    const TOTAL: usize = 1_000_000;
    const CHUNK: usize = 1000;
    let chunk: Vec<u8> = framed
        .iter()
        .copied()
        .cycle()
        .take(framed.len() * CHUNK)
        .collect();
    let writer = tokio::spawn(async move {
        for _ in 0..TOTAL / CHUNK {
            wr.write_all(&chunk).await.unwrap();
        }
        wr
    });
    let mut buf = vec![0u8; 1 << 16];
    let mut pending: Vec<u8> = Vec::new();
    let (mut answered, mut warm_rss) = (0usize, 0u64);
    let deadline = Instant::now() + Duration::from_secs(400);
    while answered < TOTAL {
        assert!(Instant::now() < deadline, "only {answered} answers");
        let n = tokio::time::timeout(Duration::from_secs(30), rd.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed after {answered} answers");
        pending.extend_from_slice(&buf[..n]);
        let mut pos = 0;
        while pending.len() >= pos + 2 {
            let len = u16::from_be_bytes([pending[pos], pending[pos + 1]]) as usize;
            if pending.len() < pos + 2 + len {
                break;
            }
            // The answer, not an error: the cached A record.
            assert_eq!(pending[pos + 2 + 3] & 0x0f, 0);
            answered += 1;
            pos += 2 + len;
            if answered == 50_000 {
                warm_rss = rss_kib(pid);
            }
        }
        pending.drain(..pos);
    }
    let end_rss = rss_kib(pid);
    writer.await.unwrap();
    eprintln!("1,000,000 queries on one connection: RSS {warm_rss} KiB after 50,000, {end_rss} KiB at the end");
    assert!(
        end_rss < warm_rss + 10 * 1024,
        "grew from {warm_rss} KiB to {end_rss} KiB"
    );
    assert_eq!(mock.count("www.example.", A), 1);
}

/// The shipped systemd unit: hardened as documented, and valid for systemd-analyze where it is
/// installed (pointed at the binary under test, since verify checks ExecStart exists).
#[test]
fn systemd_unit_is_hardened_and_verifies() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/flatdns.service");
    let unit = std::fs::read_to_string(path).unwrap();
    for line in [
        "DynamicUser=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "Restart=on-failure",
        "ProtectSystem=strict",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "{line} missing from the unit"
        );
    }
    let Ok(analyze) = which("systemd-analyze") else {
        eprintln!("systemd-analyze not installed: unit not verified");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("flatdns.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/flatdns", BIN)).unwrap();
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(cmd: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .ok_or(())
}

/// The Kubernetes manifest's embedded config is one flatdns accepts.
#[test]
fn kubernetes_configmap_config_is_valid() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/kubernetes/flatdns-daemonset.yaml"
    );
    let yaml = std::fs::read_to_string(path).unwrap();
    let start =
        yaml.find("flatdns.toml: |\n").expect("the ConfigMap key") + "flatdns.toml: |\n".len();
    let toml: String = yaml[start..]
        .lines()
        .take_while(|l| l.starts_with("    ") || l.is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("listen"), "{toml}");
    let f = write_config(&toml);
    let out = Command::new(BIN)
        .arg("--config")
        .arg(f.path())
        .arg("--check-config")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("169.254.20.10:53"));
}

fn signal(child: &Running, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Issue 6: SIGHUP reloads the config file. A good one swaps the upstream, the log level and
/// the ACL and keeps the cache (unless flush_on_reload); a bad one is rejected with a log
/// line naming the problem and the running configuration stays.
#[tokio::test]
async fn sighup_reloads_the_config_file_and_rejects_a_bad_one() {
    let one = Mock::start("www.example. 300 IN A 192.0.2.1\nnew.example. 300 IN A 192.0.2.1").await;
    let two = Mock::start(
        "www.example. 300 IN A 192.0.2.2\nnew.example. 300 IN A 192.0.2.2\nlater.example. 300 IN A 192.0.2.2",
    )
    .await;
    let conf = |up: std::net::SocketAddr, extra: &str| {
        format!("listen = [\"127.0.0.1:0\"]\nupstream = [\"{up}\"]\nlog_level = \"info\"\n{extra}")
    };
    let f = write_config(&conf(one.addr, ""));
    let mut cmd = Command::new(BIN);
    cmd.arg("--config").arg(f.path());
    let child = spawn(cmd);
    let addr = child.addr;
    let www = || Q::new("www.example.", A).wire();
    assert_eq!(
        udp_query(addr, &www()).await.answer_no_ttl(),
        vec!["www.example. A 192.0.2.1"]
    );

    // A good config: new upstream; the cache is kept.
    std::fs::write(f.path(), conf(two.addr, "")).unwrap();
    signal(&child, "-HUP");
    child.wait_for("configuration reloaded");
    assert_eq!(
        udp_query(addr, &www()).await.answer_no_ttl(),
        vec!["www.example. A 192.0.2.1"]
    );
    let r = udp_query(addr, &Q::new("new.example.", A).wire()).await;
    assert_eq!(r.answer_no_ttl(), vec!["new.example. A 192.0.2.2"]);
    assert_eq!(one.count("new.example.", A), 0);

    // A bad config: rejected, named, and the running one stays.
    std::fs::write(f.path(), conf(one.addr, "[cache]\nmax_ttl = \"forever\"\n")).unwrap();
    signal(&child, "-HUP");
    let line = child.wait_for("reload rejected");
    assert!(
        line.contains("cache.max_ttl") && line.contains("forever"),
        "{line}"
    );
    let r = udp_query(addr, &Q::new("later.example.", A).wire()).await;
    assert_eq!(r.answer_no_ttl(), vec!["later.example. A 192.0.2.2"]);
    assert_eq!(one.count("later.example.", A), 0);

    // Flush on reload and a new log level: the cache is emptied, debug lines appear.
    std::fs::write(
        f.path(),
        conf(
            two.addr,
            "log_level = \"debug\"\n[cache]\nflush_on_reload = true\n",
        )
        .replace("log_level = \"info\"\n", ""),
    )
    .unwrap();
    signal(&child, "-HUP");
    child.wait_for("configuration reloaded");
    assert_eq!(
        udp_query(addr, &www()).await.answer_no_ttl(),
        vec!["www.example. A 192.0.2.2"]
    );
    child.wait_for("DEBUG");

    // An ACL that leaves loopback out: REFUSED from now on.
    std::fs::write(f.path(), conf(two.addr, "allow = [\"192.0.2.0/24\"]\n")).unwrap();
    signal(&child, "-HUP");
    child.wait_for("configuration reloaded");
    assert_eq!(udp_query(addr, &www()).await.rcode(), 5);
}

/// Issue 6: `--query-log json` writes one JSON object per answered query on stdout.
#[tokio::test]
async fn query_log_writes_json_lines() {
    let mock =
        Mock::start("www.example. 300 IN CNAME a.example.\na.example. 60 IN A 192.0.2.1").await;
    mock.set("quiet.example.", Behavior::Drop);
    mock.set("broken.example.", Behavior::Servfail);
    let mut cmd = Command::new(BIN);
    cmd.args(["--query-log", "json", "--timeout", "50ms"])
        .stdout(Stdio::piped());
    let mut child = start(cmd, mock.addr);
    let rx = lines_of(child.child.stdout.take().unwrap());
    let q = Q::new("WWW.example.", A).wire();
    assert_eq!(udp_query(child.addr, &q).await.answer.len(), 1);
    assert_eq!(udp_query(child.addr, &q).await.answer.len(), 1);
    assert_eq!(
        tcp_query(child.addr, &Q::new("nx.example.", AAAA).wire())
            .await
            .rcode(),
        3
    );
    // No answer from the upstream: flatdns's own SERVFAIL. The upstream's SERVFAIL: its.
    for name in ["quiet.example.", "broken.example."] {
        assert_eq!(
            udp_query(child.addr, &Q::new(name, A).wire()).await.rcode(),
            2
        );
    }
    // The same through the path of queries that are never shared (client subnet, RFC 7871).
    let ecs = Q::new("quiet.example.", A)
        .edns(1232, false)
        .option(8, &[0, 1, 24, 0, 192, 0, 2]);
    assert_eq!(udp_query(child.addr, &ecs.wire()).await.rcode(), 2);
    let mut lines = Vec::new();
    for _ in 0..6 {
        let line = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("a query log line");
        lines.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    let field = |i: usize, k: &str| lines[i][k].clone();
    assert_eq!(field(0, "name"), "WWW.example.");
    assert_eq!(field(0, "qtype"), "A");
    assert_eq!(field(0, "rcode"), "NOERROR");
    assert_eq!(field(0, "client"), "127.0.0.1");
    assert_eq!(field(0, "transport"), "udp");
    assert_eq!(field(0, "flattened"), true);
    assert_eq!(field(0, "source"), "upstream");
    assert!(field(0, "latency_us").as_u64().is_some());
    assert_eq!(field(1, "source"), "cache");
    assert_eq!(field(1, "flattened"), true);
    assert_eq!(field(2, "transport"), "tcp");
    assert_eq!(field(2, "qtype"), "AAAA");
    assert_eq!(field(2, "rcode"), "NXDOMAIN");
    assert_eq!(field(2, "flattened"), false);
    assert_eq!(field(2, "source"), "upstream");
    assert_eq!(field(3, "rcode"), "SERVFAIL");
    assert_eq!(field(3, "source"), "local");
    assert_eq!(field(4, "rcode"), "SERVFAIL");
    assert_eq!(field(4, "source"), "upstream");
    assert_eq!(field(5, "rcode"), "SERVFAIL");
    assert_eq!(field(5, "source"), "local");
}

/// `--query-log text`: the same fields as plain tracing lines, on stdout, not stderr.
#[tokio::test]
async fn query_log_writes_text_lines() {
    let mock = Mock::start("www.example. 300 IN A 192.0.2.1").await;
    let mut cmd = Command::new(BIN);
    cmd.args(["--query-log", "text"]).stdout(Stdio::piped());
    let mut child = start(cmd, mock.addr);
    let rx = lines_of(child.child.stdout.take().unwrap());
    let r = udp_query(child.addr, &Q::new("www.example.", A).wire()).await;
    assert_eq!(r.answer.len(), 1);
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a query log line");
    for field in [
        "client=127.0.0.1",
        "transport=\"udp\"",
        "name=www.example.",
        "qtype=A",
        "rcode=\"NOERROR\"",
        "flattened=false",
        "source=\"upstream\"",
        "latency_us=",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

/// `flatdns explain` on the command line: the report on stdout, exit 0; bad input exit 2.
#[tokio::test]
async fn explain_subcommand_prints_the_report() {
    let mock =
        Mock::start("www.example. 300 IN CNAME a.example.\na.example. 60 IN A 192.0.2.1").await;
    let up = mock.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args([
                "explain",
                "www.example",
                "A",
                "--upstream",
                &up,
                "--timeout",
                "1s",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("1. www.example. -> a.example.  CNAME, TTL 300"),
        "{text}"
    );
    assert!(text.contains("www.example. 60 IN A 192.0.2.1"), "{text}");

    for bad in [
        ["explain", "www..example", "A"],
        ["explain", "www.example", "NOPE"],
    ] {
        let out = Command::new(BIN)
            .args(bad)
            .args(["--upstream", "192.0.2.1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("explain"));
    }
}

/// A query log nobody reads (a full pipe) must not stop flatdns answering: lines are
/// dropped, queries are not.
#[tokio::test]
async fn an_unread_query_log_does_not_stall_answers() {
    let mock = Mock::start("www.example. 300 IN A 192.0.2.1").await;
    let mut cmd = Command::new(BIN);
    // stdout is a pipe that this test never reads: 64 KiB fill it after ~300 lines.
    cmd.args(["--query-log", "json"]).stdout(Stdio::piped());
    let child = start(cmd, mock.addr);
    let q = Q::new("www.example.", A).wire();
    for i in 0..3000 {
        let r = udp_exchange(child.addr, &q, Duration::from_secs(2)).await;
        assert!(r.is_some(), "query {i} unanswered");
    }
}
