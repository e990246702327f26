//! The `flatdns` binary: parse flags, load config, init tracing, run, map errors to exit codes.
//!
//! Exit status: 0 after a clean shutdown (SIGINT/SIGTERM), a valid `--check-config` or a
//! completed `explain`; 2 for a bad command line or configuration; 1 when serving cannot
//! start or fails.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info, warn};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use flatdns::cli::{Cli, Command, ExplainArgs};
use flatdns::config::{Config, QueryLog};

/// Changes the log filter of the running process (SIGHUP with a new `log_level`).
type LogReload = reload::Handle<EnvFilter, Registry>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Explain(args)) = &cli.command {
        return explain(&cli, args);
    }
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
    let (log, _query_log) = init_logging(&cli, &config);

    raise_fd_limit(&config);
    match run(cli, config, log) {
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
    let aliases = format!(
        "{} in the config{}",
        c.aliases.len(),
        if c.alias_from_zone {
            ", and from the zone"
        } else {
            ""
        }
    );
    format!(
        "  listen:    {}\n  upstream:  {}\n  resolver:  {}\n  cache:     {} entries, TTL {}..{} s\n  flatten:   {}\n  aliases:   {}\n  metrics:   {}\n  query log: {}",
        list(&c.listen),
        list(&c.upstreams),
        if c.resolvers.is_empty() { "the upstreams".to_string() } else { list(&c.resolvers) },
        c.cache.size,
        c.cache.min_ttl,
        c.cache.max_ttl,
        if c.flatten.enabled { format!("on, up to {} hops", c.flatten.max_chain) } else { "off".into() },
        aliases,
        c.metrics.map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics")),
        format!("{:?}", c.query_log).to_lowercase(),
    )
}

/// The filter of the main log: --log-level wins, then RUST_LOG, then the config file's
/// `log_level`. The query log has a layer of its own, so its target is off here.
fn log_filter(cli: &Cli, config: &Config) -> EnvFilter {
    let filter = match (&cli.log_level, std::env::var("RUST_LOG")) {
        (Some(l), _) => EnvFilter::new(l),
        (None, Ok(env)) if !env.is_empty() => EnvFilter::new(env),
        _ => EnvFilter::new(&config.log_level),
    };
    match "flatdns::query=off".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    }
}

/// The main log goes to stderr; the query log (`--query-log`), when on, to stdout as text or
/// JSON lines, each a layer with its own filter.
///
/// The query log is written by a thread of its own through a bounded queue that drops lines
/// when full (tracing-appender's lossy non-blocking writer): a stalled reader of stdout (a
/// full pipe, a journald under pressure) must never stop flatdns answering, and the line is
/// written from the hot path. The returned guard flushes the queue at exit.
fn init_logging(
    cli: &Cli,
    config: &Config,
) -> (
    LogReload,
    Option<tracing_appender::non_blocking::WorkerGuard>,
) {
    // Colour only on a terminal: logs read by journald or a test harness stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (filter, handle) = reload::Layer::new(log_filter(cli, config));
    let main = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_filter(filter)
        .boxed();
    let queries = Targets::new().with_target("flatdns::query", LevelFilter::INFO);
    let (stdout, guard) = match config.query_log {
        QueryLog::Off => (None, None),
        _ => {
            let (w, g) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(true)
                .buffered_lines_limit(65_536)
                .thread_name("flatdns-query-log")
                .finish(std::io::stdout());
            (Some(w), Some(g))
        }
    };
    let query_log = match (config.query_log, stdout) {
        (QueryLog::Text, Some(w)) => Some(
            tracing_subscriber::fmt::layer()
                .with_writer(w)
                .with_ansi(false)
                .with_filter(queries)
                .boxed(),
        ),
        (QueryLog::Json, Some(w)) => Some(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(w)
                .with_filter(queries)
                .boxed(),
        ),
        _ => None,
    };
    tracing_subscriber::registry()
        .with(main)
        .with(query_log)
        .init();
    (handle, guard)
}

/// `flatdns explain`: one lookup, printed; exit 0 when it ran, 2 for bad arguments or config.
fn explain(top: &Cli, args: &ExplainArgs) -> ExitCode {
    let cli = args.cli(top);
    let config = match Config::load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flatdns: {e}");
            return ExitCode::from(2);
        }
    };
    let name = match flatdns::config::parse_name(&args.name) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("flatdns: explain: name {:?}: {e}", args.name);
            return ExitCode::from(2);
        }
    };
    let Some(qtype) = flatdns::explain::parse_type(&args.qtype) else {
        eprintln!(
            "flatdns: explain: type {:?}: expected a type such as A, AAAA, MX or TYPE65401",
            args.qtype
        );
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flatdns: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    print!(
        "{}",
        rt.block_on(flatdns::explain::explain(config, &name, qtype))
    );
    ExitCode::SUCCESS
}

fn run(cli: Cli, config: Config, log: LogReload) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
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
        let metrics = running
            .metrics_addr()
            .map_or_else(|| "off".to_string(), |a| format!("http://{a}/metrics"));
        info!(listen = %bound.join(", "), %metrics, "flatdns {} serving\n{sum}", env!("CARGO_PKG_VERSION"));
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => reload(&cli, &running, &log),
            }
        }
        info!("signal received: finishing queries in flight");
        // Every query already accepted gets its answer: its deadline, then the TCP write.
        running.shutdown(grace).await;
        Ok(())
    })
}

/// SIGHUP: reads the config file again (the command-line flags still win) and applies what
/// can change without dropping sockets. A config that does not load is rejected as a whole
/// and the running one stays.
fn reload(cli: &Cli, running: &flatdns::server::Running, log: &LogReload) {
    let handler = running.handler();
    let new = match Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            handler.metrics().reload_failures.inc();
            error!("reload rejected, the running configuration stays: {e}");
            return;
        }
    };
    if let Err(e) = log.reload(log_filter(cli, &new)) {
        warn!(error = %e, "reload: the log level could not be changed");
    }
    let sum = summary(&new);
    let aliases = !new.aliases.is_empty();
    let done = handler.reload(new);
    if aliases {
        // As at start: say so where a config alias hides records of the zone.
        let h = handler.clone();
        tokio::spawn(async move { h.check_aliases().await });
    }
    if !done.need_restart.is_empty() {
        warn!(
            keys = %done.need_restart.join(", "),
            "reload: these settings changed but take effect only after a restart; their running values stay"
        );
    }
    info!(
        cache = if done.flushed { "flushed" } else { "kept" },
        "configuration reloaded\n{sum}"
    );
}
