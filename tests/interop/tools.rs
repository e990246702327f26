//! The external programs: finding them, and running them with a bound on time.

use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Full path of `program`, looked up in PATH and the sbin directories (named lives in
/// /usr/sbin, which is not on every user's PATH).
pub fn path_of(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether every program in `needed` is installed. When one is missing: in CI (env `CI`
/// set) the test fails; elsewhere it prints why and the caller returns early.
pub fn available(test: &str, needed: &[&str]) -> bool {
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|p| path_of(p).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: needs {missing:?} (apt-get install bind9 bind9-dnsutils unbound; see .ci/run)"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}: missing in CI");
    }
    eprintln!("SKIPPED {msg}");
    false
}

/// Runs `cmd`, killing it if it has not finished within `limit`. Panics on timeout.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {shown}: {e}"));
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{shown} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs `dig @server -p port <args>` (2 s per try, 2 tries at most) and returns stdout.
pub fn dig(server: SocketAddr, args: &[&str]) -> String {
    let mut cmd = Command::new(path_of("dig").expect("dig not installed"));
    cmd.arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["+time=2", "+tries=2"])
        .args(args);
    let out = run_bounded(cmd, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "dig {args:?} @{server} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// What dig printed about one exchange, reduced to what must match between BIND and
/// flatdns: status, header flags, and the record lines (answer, authority, additional, as
/// asked), without the parts that legitimately differ (ID, timing, server, cookie).
#[derive(Debug, PartialEq, Eq)]
pub struct DigView {
    pub status: String,
    pub flags: String,
    pub records: Vec<String>,
    pub retried_tcp: bool,
}

impl DigView {
    pub fn parse(out: &str) -> DigView {
        let mut status = String::new();
        let mut flags = String::new();
        let mut records = Vec::new();
        for line in out.lines() {
            if let Some(rest) = line.split("status: ").nth(1) {
                status = rest.split(',').next().unwrap_or("").to_string();
            } else if let Some(rest) = line.strip_prefix(";; flags: ") {
                flags = rest.to_string();
            } else if !line.starts_with(';') && !line.trim().is_empty() {
                records.push(line.split_whitespace().collect::<Vec<_>>().join(" "));
            }
        }
        DigView {
            status,
            flags,
            records,
            retried_tcp: out.contains("Truncated, retrying in TCP mode"),
        }
    }
    /// The records of `rtype` ("A", "CNAME" ...) as (owner, ttl, rdata).
    pub fn of_type(&self, rtype: &str) -> Vec<(String, u32, String)> {
        self.records
            .iter()
            .filter_map(|r| {
                let f: Vec<&str> = r.splitn(5, ' ').collect();
                (f.len() == 5 && f[3] == rtype).then(|| {
                    (
                        f[0].to_string(),
                        f[1].parse().unwrap_or(u32::MAX),
                        f[4].to_string(),
                    )
                })
            })
            .collect()
    }
}
