//! The `flatdns` binary: parse flags, load config, init tracing, run, map errors to exit codes.
//!
//! Exit status: 0 after a clean shutdown (SIGINT/SIGTERM) or a valid `--check-config`;
//! 2 for a bad command line or configuration; 1 when serving cannot start or fails.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::info;
use tracing_subscriber::EnvFilter;

use flatdns::cli::Cli;
use flatdns::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flatdns: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        println!("configuration OK\n{}", summary(&config));
        return ExitCode::SUCCESS;
    }
    // --log-level wins, then RUST_LOG, then the config file's log_level.
    let filter = match (&cli.log_level, std::env::var("RUST_LOG")) {
        (Some(l), _) => EnvFilter::new(l),
        (None, Ok(env)) if !env.is_empty() => EnvFilter::new(env),
        _ => EnvFilter::new(&config.log_level),
    };
    // Colour only on a terminal: logs read by journald or a test harness stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();

    raise_fd_limit(&config);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flatdns: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Each upstream query in flight holds a socket, each TCP client a connection (and each TCP
/// query maybe one upstream): with the usual soft limit of 1,024 descriptors the R11 figure of
/// 4,096 in flight could never be reached. Raise the soft limit toward the hard one, as
/// dnsdist does, and say so when even the hard limit is too low.
fn raise_fd_limit(config: &Config) {
    let want = (config.limits.max_inflight + 2 * config.limits.tcp_connections + 256) as u64;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got < want => tracing::warn!(
            got,
            want,
            "open-file limit below what limits.max_inflight needs; raise it (LimitNOFILE= in systemd)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

fn summary(c: &Config) -> String {
    let list = |v: &[std::net::SocketAddr]| {
        v.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "  listen:    {}\n  upstream:  {}\n  resolver:  {}\n  cache:     {} entries, TTL {}..{} s\n  flatten:   {}",
        list(&c.listen),
        list(&c.upstreams),
        if c.resolvers.is_empty() { "the upstreams".to_string() } else { list(&c.resolvers) },
        c.cache.size,
        c.cache.min_ttl,
        c.cache.max_ttl,
        if c.flatten.enabled { format!("on, up to {} hops", c.flatten.max_chain) } else { "off".into() },
    )
}

fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let sum = summary(&config);
        let grace = config.limits.client_deadline
            + config.limits.tcp_write_timeout
            + Duration::from_secs(1);
        let running = flatdns::server::start(config).await?;
        let bound: Vec<String> = running
            .local_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect();
        info!(listen = %bound.join(", "), "flatdns {} serving\n{sum}", env!("CARGO_PKG_VERSION"));
        wait_for_signal().await?;
        info!("signal received: finishing queries in flight");
        // Every query already accepted gets its answer: its deadline, then the TCP write.
        running.shutdown(grace).await;
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
