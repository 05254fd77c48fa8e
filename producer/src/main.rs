//! `rtinval-producer`: command line, config, telemetry and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use rtinval_producer::config::Config;
use rtinval_producer::metrics::Metrics;
use rtinval_schemas::runtime::{LogFormat, init_tracing, long_version};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Tails a MySQL/MariaDB binlog and publishes cache-invalidation events to Kafka.
///
/// Reads the rules in CONFIG (TOML; see deploy/ for examples), checks the source server
/// (binlog_format=ROW, binlog_row_image=FULL, binlog_row_metadata=FULL, no binlog compression)
/// and that every rule's table and columns exist, then streams. SIGTERM/SIGINT stop it after
/// the current transaction, with a final checkpoint. Exit status: 0 on shutdown, 1 on a fatal
/// error (the message says what to fix), 2 on a bad command line.
#[derive(Parser, Debug)]
#[command(name = "rtinval-producer", version = long_version(env!("CARGO_PKG_VERSION")), about, long_about)]
struct Cli {
    /// Path of the TOML configuration.
    #[arg(
        short,
        long,
        env = "RTINVAL_PRODUCER_CONFIG",
        default_value = "/etc/rtinval/producer.toml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, env = "RTINVAL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Validate the config (and, with a reachable source, the server settings and rules), then exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtinval-producer: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line an operator can act on (the pipeline already logged stage failures).
            eprintln!("rtinval-producer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(&cli.config)?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %cli.config.display(),
        source = %config.redacted_source_url(),
        brokers = %config.kafka.brokers,
        topic_prefix = %config.kafka.topic_prefix,
        rules = config.rules.len(),
        "Starting rtinval-producer."
    );
    info!(config = %config.redacted_json(), "Effective configuration.");
    if cli.check {
        let source = rtinval_producer::source::BinlogSource::new(config, Metrics::new())?;
        source.check().await.context("source check failed")?;
        println!("config OK; source server settings and rules OK");
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("Shutdown requested; finishing the current transaction.");
        sd.cancel();
    });
    let path = cli.config.display().to_string();
    rtinval_producer::run(config, Metrics::new(), shutdown)
        .await
        .map_err(|e| match e {
            // A key of the config file: name the file too.
            e @ rtinval_producer::PipelineError::Http { .. } => anyhow::anyhow!("{path}: {e}"),
            e => e.into(),
        })?;
    info!("Stopped.");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
