//! `rtinval-consumer`: command line, config, telemetry and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rtinval_consumer::config::Config;
use rtinval_consumer::metrics::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Per-node agent of rtinval: applies cache-invalidation events from Kafka to this node's
/// worker pools (graceful reloads, debounced) and caches (Redis key purges).
///
/// Offsets are committed only after an event's actions were applied. A node without a committed
/// offset, or that receives an undecodable message or a `resync`, reloads every pool and flushes
/// every cache. SIGTERM/SIGINT: finish the current actions, commit, exit 0. SIGHUP: re-validate
/// the config file and log the result (the running config is unchanged; restart to apply).
#[derive(Parser, Debug)]
#[command(name = "rtinval-consumer", version = concat!(env!("CARGO_PKG_VERSION"), " (event schema_version 1)"), about, long_about)]
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
    #[arg(long, global = true, env = "RTINVAL_LOG_FORMAT", value_enum, default_value = "text")]
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
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RTINVAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
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
    if matches!(cli.command, Some(Command::CheckConfig)) {
        println!(
            "config OK: {} pool(s), {} cache(s), group {}",
            config.pools.len(),
            config.caches.len(),
            config.group_id()
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtinval-consumer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        info!(version = env!("CARGO_PKG_VERSION"), config = %cli.config.display(), brokers = %config.kafka.brokers, topic_prefix = %config.kafka.topic_prefix, "Starting rtinval-consumer.");
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone(), cli.config.clone()));
        match rtinval_consumer::run(config, Metrics::new(), shutdown).await {
            Ok(()) => {
                info!("Stopped.");
                ExitCode::SUCCESS
            }
            Err(e) => {
                error!(error = %e, "Consumer failed.");
                eprintln!("rtinval-consumer: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn signals(shutdown: CancellationToken, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
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
