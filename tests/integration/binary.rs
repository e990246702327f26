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

#[tokio::test]
async fn serves_and_exits_0_on_sigterm() {
    let mock = Mock::start("www.example. 300 IN A 192.0.2.1").await;
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &mock.addr.to_string(),
            "--log-level",
            "info",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = child.stderr.take().unwrap();
    let mut child = Kill(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("startup line");
        if let Some(rest) = line.split("listen=").nth(1) {
            break rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_matches('"')
                .parse::<std::net::SocketAddr>()
                .unwrap();
        }
    };
    let r = udp_query(addr, &Q::new("www.example.", A).wire()).await;
    assert_eq!(r.answer_no_ttl(), vec!["www.example. A 192.0.2.1"]);
    let r = tcp_query(addr, &Q::new("www.example.", A).wire()).await;
    assert_eq!(r.answer.len(), 1);
    let status = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut code = None;
    for _ in 0..100 {
        if let Some(s) = child.0.try_wait().unwrap() {
            code = s.code();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(code, Some(0));
}
