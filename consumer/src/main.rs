//! `rtinval-consumer`: command line, config, telemetry and wiring only.

use rtinval_schemas::runtime::chain;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rtinval_consumer::config::Config;
use rtinval_consumer::metrics::Metrics;
use rtinval_schemas::runtime::{LogFormat, init_tracing, long_version};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Per-node agent of rtinval: applies cache-invalidation events from Kafka to this node's
/// worker pools (graceful reloads, debounced) and caches (Redis and memcached key purges).
///
/// Offsets are committed only after an event's actions were applied. A node without a committed
/// offset, or that receives an undecodable message or a `resync`, reloads every pool and flushes
/// every cache. SIGTERM/SIGINT: finish the current actions, commit, exit 0. SIGHUP: re-validate
/// the config file and log the result (the running config is unchanged; restart to apply).
#[derive(Parser, Debug)]
#[command(name = "rtinval-consumer", version = long_version(env!("CARGO_PKG_VERSION")), about, long_about)]
struct Cli {
    /// Path of the TOML configuration.
    #[arg(
        short,
        long,
        global = true,
        env = "RTINVAL_CONSUMER_CONFIG",
        default_value = "/etc/rtinval/consumer.toml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "RTINVAL_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply events until stopped (the default).
    Run,
    /// Validate the config file and exit (0 = valid).
    CheckConfig,
    /// Read the event topics back: print (JSON lines or a table), filter, re-apply, or answer
    /// "was KEY invalidated, when, by which transaction?" (--why). Uses the config's kafka
    /// section; never joins the node's consumer group.
    Replay(Box<ReplayArgs>),
    /// Wait until this node has applied a source position (read-your-writes): the writer's
    /// barrier after COMMIT. Asks the running consumer's /wait (http.listen of the config, or
    /// --node). With --all-nodes, waits instead until every node's consumer group has committed
    /// past the position (from Kafka's committed offsets; about a second slower).
    ///
    /// Exit status: 0 applied, 3 timeout, 4 not ready (stopping, resyncing, stale), 2 bad
    /// position or arguments, 1 other errors (no consumer answering, Kafka unreachable).
    Wait(WaitArgs),
    /// Measure this node's cache consistency: follow the cache-keys topic a delay behind and
    /// check that no key a purge named still holds a value read before that purge (caches with
    /// fill_protocol = true; values carry the position they were read after). Logs "N of M
    /// checked keys consistent after D s" every --report-secs and each violation with key and
    /// positions; prints a JSON summary at the end.
    ///
    /// Exit status: 0 no violation, 3 violations found, 1 errors.
    Inspect(InspectArgs),
    /// Take a node out of the node registry (<topic_prefix>.nodes) when it leaves service, so
    /// that `wait --all-nodes --group-prefix` stops waiting for it at once instead of 10
    /// minutes after its last registration. Stop its consumer first: a running (or restarted)
    /// consumer registers again within a minute.
    Deregister(DeregisterArgs),
}

#[derive(clap::Args, Debug)]
struct DeregisterArgs {
    /// The node's consumer group; default: kafka.group_id of the config (this node).
    #[arg(long)]
    group: Option<String>,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// Check a purge's keys this long after it (Kafka timestamp): fills in flight settle.
    #[arg(long, default_value_t = 5000)]
    delay_ms: u64,
    /// Stop after reading for this long (then finish the checks due); default: until SIGTERM.
    #[arg(long)]
    duration_secs: Option<u64>,
    /// Log the report line this often.
    #[arg(long, default_value_t = 60)]
    report_secs: u64,
    /// Serve /metrics (rtinval_consumer_inspected_keys_total) on this host:port.
    #[arg(long)]
    listen: Option<String>,
}

#[derive(clap::Args, Debug)]
struct WaitArgs {
    /// The position: MariaDB GTID(s) as `SELECT @@last_gtid` returns them after COMMIT
    /// (0-1-17, or 0-1-17,1-2-5), a MySQL GTID set (uuid:1-100, from
    /// session_track_gtids=OWN_GTID) or a binlog file:pos.
    #[arg(long, value_name = "POSITION")]
    gtid: String,
    /// How long to wait at most.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// The node's HTTP address (host:port); default: http.listen of the config.
    #[arg(long, conflicts_with = "all_nodes")]
    node: Option<String>,
    /// Wait for every node (consumer group) instead of this one.
    #[arg(long)]
    all_nodes: bool,
    /// With --all-nodes: the groups are those whose name starts with this (kafka.group_id of
    /// the nodes; the default group is rtinval-consumer-<hostname>), as the broker lists them
    /// and as the nodes registered themselves in <topic_prefix>.nodes within 10 minutes.
    #[arg(long, default_value = "rtinval-consumer-", requires = "all_nodes")]
    group_prefix: String,
    /// With --all-nodes: these groups (repeatable) instead of listing by prefix.
    #[arg(long, requires = "all_nodes")]
    group: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// Topic to read: pool-reset or cache-keys (default: both).
    #[arg(long, value_parser = rtinval_schemas::topics::EVENTS)]
    topic: Vec<String>,
    /// First offset to read (per partition).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Last offset to read (per partition, inclusive).
    #[arg(long)]
    to_offset: Option<i64>,
    /// Earliest Kafka timestamp: RFC 3339 (2026-11-26T21:00:00Z) or Unix ms.
    #[arg(long, value_parser = rtinval_consumer::replay::parse_time)]
    from_time: Option<i64>,
    /// Latest Kafka timestamp (inclusive): RFC 3339 or Unix ms.
    #[arg(long, value_parser = rtinval_consumer::replay::parse_time)]
    to_time: Option<i64>,
    /// Keep reading new events as they arrive.
    #[arg(long)]
    follow: bool,
    /// Only these kinds (repeatable): pool_reset, cache_keys, cache_flush, resync, heartbeat.
    /// Default: all but heartbeats.
    #[arg(long, value_parser = ["pool_reset", "cache_keys", "cache_flush", "resync", "heartbeat"])]
    kind: Vec<String>,
    /// Only events of transactions that changed this table (`db.table` or `table`).
    #[arg(long)]
    table: Option<String>,
    /// Only pool resets of this pool.
    #[arg(long)]
    pool: Option<String>,
    /// Only events of this cache.
    #[arg(long)]
    cache: Option<String>,
    /// Only key lists containing this key.
    #[arg(long)]
    key: Option<String>,
    /// Only key lists with a key starting with this.
    #[arg(long)]
    key_prefix: Option<String>,
    /// Only events of this source GTID.
    #[arg(long)]
    gtid: Option<String>,
    /// Only the event with this id.
    #[arg(long)]
    id: Option<String>,
    /// Output: json (one object per line: topic, partition, offset, timestamp, event) or table.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// The last events that invalidated KEY (key lists holding it, flushes of its cache —
    /// narrowed by --cache — and resyncs), with their source transaction and time.
    #[arg(long, value_name = "KEY")]
    why: Option<String>,
    /// How many events --why shows.
    #[arg(long, default_value_t = 10)]
    last: usize,
    /// Re-apply the selected events to this node's pools and caches.
    #[arg(long)]
    apply: bool,
    /// With --apply: print what would be done, do nothing.
    #[arg(long, requires = "apply")]
    dry_run: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Json,
    Table,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rtinval-consumer: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Replay(args)) = &cli.command {
        return match replay(&config, args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rtinval-consumer replay: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Wait(args)) = &cli.command {
        return wait(&config, args);
    }
    if let Some(Command::Inspect(args)) = &cli.command {
        return inspect(&config, args);
    }
    if let Some(Command::Deregister(args)) = &cli.command {
        return deregister(&config, args);
    }
    if matches!(cli.command, Some(Command::CheckConfig)) {
        println!(
            "config OK: {} pool(s), {} cache(s), group {}",
            config.pools.len(),
            config.caches.len(),
            config.group_id()
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtinval-consumer: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        info!(version = env!("CARGO_PKG_VERSION"), config = %cli.config.display(), brokers = %config.kafka.brokers, topic_prefix = %config.kafka.topic_prefix, "Starting rtinval-consumer.");
        info!(config = %config.redacted_json(), "Effective configuration.");
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone(), cli.config.clone()));
        match rtinval_consumer::run(config, Metrics::new(), shutdown).await {
            Ok(()) => {
                info!("Stopped.");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(error = %chain(&e), "Consumer failed.");
                match e {
                    // A key of the config file: name the file too.
                    rtinval_consumer::error::ConsumerError::Http { .. } => {
                        eprintln!("rtinval-consumer: {}: {}", cli.config.display(), chain(&e));
                    }
                    _ => eprintln!("rtinval-consumer: {}", chain(&e)),
                }
                ExitCode::FAILURE
            }
        }
    })
}

/// The single-threaded runtime each command runs on.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

async fn signals(shutdown: CancellationToken, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match Config::load(&path) {
                Ok(_) => info!(config = %path.display(), "SIGHUP: config is valid (restart to apply changes)."),
                Err(e) => warn!(config = %path.display(), error = %e, "SIGHUP: config is NOT valid."),
            },
        }
    }
    info!("Shutdown requested; finishing current actions.");
    shutdown.cancel();
}

/// `rtinval-consumer deregister`: a tombstone for the node's group in the node registry.
fn deregister(config: &Config, a: &DeregisterArgs) -> ExitCode {
    let group = a.group.clone().unwrap_or_else(|| config.group_id());
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtinval-consumer deregister: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(rtinval_consumer::nodes::deregister(config, &group)) {
        Ok(()) => {
            println!(
                "{}",
                serde_json::json!({"status": "deregistered", "group": group})
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "rtinval-consumer deregister: cannot remove {group} from the node registry: {e}"
            );
            ExitCode::FAILURE
        }
    }
}

/// `rtinval-consumer inspect`: run the inspector, print its JSON summary.
fn inspect(config: &Config, a: &InspectArgs) -> ExitCode {
    use rtinval_consumer::inspect::{Settings, run};
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtinval-consumer inspect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = Settings {
        delay: std::time::Duration::from_millis(a.delay_ms),
        duration: a.duration_secs.map(std::time::Duration::from_secs),
        report_every: std::time::Duration::from_secs(a.report_secs.max(1)),
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let metrics = Metrics::new();
        if let Some(listen) = &a.listen {
            let listener = match tokio::net::TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("rtinval-consumer inspect: --listen {listen}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            tokio::spawn(rtinval_consumer::endpoint::serve(
                listener,
                metrics.clone(),
                None,
                shutdown.clone(),
            ));
        }
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            sd.cancel();
        });
        let sd = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                sd.cancel();
            }
        });
        info!(delay_ms = a.delay_ms, topic_prefix = %config.kafka.topic_prefix, "Inspecting: every purged key of the fill-protocol caches, the delay after its purge.");
        match run(config, &settings, &metrics, shutdown).await {
            Ok(report) => {
                println!(
                    "{}",
                    serde_json::to_string(&report).unwrap_or_else(|e| e.to_string())
                );
                if report.caches.values().any(|t| t.violations > 0) {
                    ExitCode::from(3)
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("rtinval-consumer inspect: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `rtinval-consumer wait`: print the answer (one JSON line) and exit with its status.
fn wait(config: &Config, a: &WaitArgs) -> ExitCode {
    use rtinval_schemas::position::WaitFor;
    let fail = |code: u8, msg: String| {
        eprintln!("rtinval-consumer wait: {msg}");
        ExitCode::from(code)
    };
    let want = match WaitFor::parse(&a.gtid) {
        Ok(w) => w,
        Err(e) => return fail(2, e.to_string()),
    };
    let timeout = std::time::Duration::from_millis(a.timeout_ms);
    if a.all_nodes {
        use rtinval_consumer::cluster::{ClusterAnswer, wait_all_nodes};
        return match wait_all_nodes(config, &want, &a.group_prefix, &a.group, timeout) {
            Ok(ClusterAnswer::Applied { groups }) => {
                println!(
                    "{}",
                    serde_json::json!({"status": "applied", "position": a.gtid, "groups": groups})
                );
                ExitCode::SUCCESS
            }
            Ok(ClusterAnswer::Timeout { lagging }) => {
                println!(
                    "{}",
                    serde_json::json!({"status": "timeout", "position": a.gtid, "lagging": lagging})
                );
                ExitCode::from(3)
            }
            Err(e) => fail(1, e),
        };
    }
    let node = a.node.clone().unwrap_or_else(|| config.http.listen.clone());
    if node.is_empty() {
        return fail(
            2,
            "http.listen is empty in the config: name the node with --node host:port".into(),
        );
    }
    let encoded: String = a
        .gtid
        .bytes()
        .map(|b| match b {
            b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let url = format!(
        "http://{node}/wait?gtid={encoded}&timeout_ms={}",
        a.timeout_ms
    );
    let target = match rtinval_consumer::apply::http::HttpTarget::parse(&url) {
        Ok(t) => t,
        Err(e) => return fail(2, e),
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(e) => return fail(1, e),
    };
    let answer =
        runtime.block_on(target.request("GET", timeout + std::time::Duration::from_secs(5)));
    match answer {
        Ok((status, body)) => {
            println!("{}", body.trim_end());
            match status {
                200 => ExitCode::SUCCESS,
                504 => ExitCode::from(3),
                503 => ExitCode::from(4),
                400 => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
        Err(e) => fail(
            1,
            format!(
                "no answer from the consumer at {node}: {e} (is it running? is http.listen right?)"
            ),
        ),
    }
}

fn replay(config: &Config, a: &ReplayArgs) -> Result<(), String> {
    use rtinval_consumer::replay::{self, Record, Selection};
    use rtinval_schemas::EventKind;
    let kinds = a
        .kind
        .iter()
        .filter_map(|k| EventKind::ALL.into_iter().find(|x| x.as_str() == k))
        .collect();
    let sel = Selection {
        topics: a.topic.clone(),
        from_offset: a.from_offset,
        to_offset: a.to_offset,
        from_time: a.from_time,
        to_time: a.to_time,
        follow: a.follow,
        kinds,
        table: a.table.clone(),
        pool: a.pool.clone(),
        cache: a.cache.clone(),
        key: a.key.clone(),
        key_prefix: a.key_prefix.clone(),
        gtid: a.gtid.clone(),
        id: a.id.clone(),
    };
    let print = |r: &Record| match a.format {
        Format::Json => println!("{}", serde_json::to_string(r).unwrap_or_default()),
        Format::Table => println!("{}", replay::table_row(r)),
    };
    if let Some(key) = &a.why {
        let mut last: Vec<Record> = Vec::new();
        let cache = a.cache.as_deref();
        let why_sel = Selection {
            kinds: Default::default(),
            cache: None,
            key: None,
            ..sel.clone()
        };
        replay::read(config, &why_sel, |r| {
            if r.event
                .as_ref()
                .is_some_and(|e| replay::invalidates(e, key, cache))
            {
                last.push(r);
            }
            true
        })?;
        // Topics interleave arbitrarily: order by time, keep the newest.
        last.sort_by_key(|r| (r.timestamp, r.topic.clone(), r.offset));
        let last = &last[last.len().saturating_sub(a.last)..];
        if last.is_empty() {
            println!("no event in the range invalidated {key}");
        }
        for r in last {
            print(r);
        }
        return Ok(());
    }
    if !a.apply {
        return replay::read(config, &sel, |r| {
            if sel.selects(&r) {
                print(&r);
            }
            true
        });
    }
    let runtime = runtime()?;
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let applier = runtime
        .block_on(rtinval_consumer::applier(config, &metrics, &shutdown))
        .map_err(|e| e.to_string())?;
    let node = applier.inventory();
    let mut failed = None;
    replay::read(config, &sel, |r| {
        let Some(e) = r.event.as_ref().filter(|e| sel.matches(e)) else {
            return true;
        };
        let actions = replay::actions(e, &node);
        if a.dry_run {
            for line in replay::describe(&actions) {
                println!("{}@{} {}: {line}", r.topic, r.offset, e.id);
            }
            return true;
        }
        match runtime.block_on(applier.apply(actions)) {
            Ok(()) => {
                println!("{}@{} {}: applied", r.topic, r.offset, e.id);
                true
            }
            Err(_) => {
                failed = Some(format!("interrupted at {}@{}", r.topic, r.offset));
                false
            }
        }
    })?;
    shutdown.cancel();
    failed.map_or(Ok(()), Err)
}
