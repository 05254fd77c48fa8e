//! # Layout
//!
//! `rtinval-producer` tails a MySQL/MariaDB binlog and publishes cache-invalidation events.
//! One module per pipeline stage, wired by [`run`]:
//!
//! ```text
//! source (binlog, reconnects) → decode (typed rows) → rules (pure: row → intents)
//!     → batch (pure: per commit) ──mpsc──► publish (Kafka) ──mpsc──► checkpoint (acks → position)
//! ```
//!
//! [`source`] is three rooms: streaming and reconnects (its `mod.rs`), what each binlog event
//! does (`events`, plain methods unit-tested without a server) and the cascade index slot
//! (`index`). What the producer asks the server outside the stream — connect (shared with
//! [`leader`]), start-up checks, the current position, foreign keys — is [`server`].
//!
//! Plus [`cascade`] (pure: foreign keys → the chains of rows InnoDB changes unlogged, which
//! [`rules`] compiles against each parent table), [`cascade_index`] (the child rows those
//! chains reach, from a consistent snapshot and the binlog, so a parent change yields their
//! exact keys; the source stage owns it), [`config`] (TOML), [`error`](mod@error) (one enum per
//! boundary), [`metrics`] (Prometheus, probes) and [`position`] (the source position the
//! stages hand on).
//!
//! Guarantees:
//! - **Order and completeness.** Every commit of a watched table that produces intents becomes
//!   one batch, handed downstream in binlog order; channels are bounded, so a slow or absent
//!   Kafka stops the binlog reader (back-pressure) instead of buffering or dropping.
//! - **Checkpoint after acknowledgment.** The stored position moves only past batches whose
//!   every message Kafka acknowledged (`acks=all`, idempotent producer). Positions are commit
//!   boundaries; a restart re-reads from there, so a crash yields duplicates, never gaps.
//! - **Idempotent ids.** Event ids derive from the source position, so re-published events
//!   are recognisable as duplicates.
//! - **Never silent.** No checkpoint → `resync`; position gone from the server → `resync`;
//!   a key that cannot be derived or too many keys → `cache_flush`. Each is logged and counted.
//! - **Cascades at every depth.** A parent row's change stands in for every row its cascading
//!   foreign keys reach, transitively: their rules' exact keys (derived from the parent row or
//!   found in the cascade index), or — where the index is off, capped or not yet complete — a
//!   flush of their caches.

pub mod batch;
pub mod cascade;
pub mod cascade_index;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod position;
pub mod publish;
pub mod rules;
pub mod server;
pub mod source;

use std::collections::BTreeMap;
use std::time::Duration;

use rtinval_schemas::runtime::chain;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::checkpoint::Checkpointer;
use crate::config::Config;
use crate::error::{KafkaError, SourceError};
use crate::metrics::Metrics;
use crate::publish::{Publisher, Topics};
use crate::source::{BinlogSource, Start};

/// Why the pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(
        "http.listen {listen}: {error}; choose a free address (another process may hold it), or \"\" to disable the endpoint"
    )]
    Http {
        listen: String,
        error: std::io::Error,
    },
    #[error("a pipeline stage panicked: {0}")]
    Panic(String),
}

impl PipelineError {
    fn is_lost_leadership(&self) -> bool {
        matches!(
            self,
            PipelineError::Source(SourceError::LostLeadership { .. })
        )
    }

    /// Worth retrying once the producer has run: the source or Kafka may come back.
    fn is_transient(&self) -> bool {
        match self {
            PipelineError::Source(e) => e.is_transient(),
            PipelineError::Kafka(_) => true,
            PipelineError::Http { .. } | PipelineError::Panic(_) => false,
        }
    }
}

/// Run the producer until `shutdown` or the first fatal error. Losing the leader lock (e.g. the
/// source restarted) is not fatal: the pipeline stops, and the producer stands by for the lock
/// again and resumes from the checkpoint once it leads.
pub async fn run(
    config: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let http = if config.http.listen.is_empty() {
        None
    } else {
        // Bound now: an address in use stops the producer at once, with the key to fix.
        let listen = config.http.listen.clone();
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|error| PipelineError::Http {
                listen: listen.clone(),
                error,
            })?;
        let (m, sd) = (metrics.clone(), shutdown.clone());
        Some(tokio::spawn(async move {
            metrics::serve(listener, m, sd)
                .await
                .map_err(|error| PipelineError::Http { listen, error })
        }))
    };
    // After a lost leadership the source may be restarting, and Kafka may be away too: transient
    // errors are retried then (at first start they are reported, so a wrong address fails fast).
    let mut recovering = false;
    let result = loop {
        match run_once(&config, &metrics, shutdown.child_token()).await {
            Err(e)
                if !shutdown.is_cancelled()
                    && (e.is_lost_leadership() || (recovering && e.is_transient())) =>
            {
                recovering = true;
                warn!(error = %chain(&e), "Not leading; standing by for the lock again.");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            other => break other,
        }
    };
    shutdown.cancel();
    if let Some(h) = http
        && let Ok(Err(e)) = h.await
    {
        return result.and(Err(e));
    }
    result
}

/// One term as leader: wait for the lock, then stream until `shutdown` or an error.
async fn run_once(
    config: &Config,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Result<(), PipelineError> {
    let config = config.clone();
    let metrics = metrics.clone();
    let topics = Topics::new(&config.kafka.topic_prefix);
    let source = BinlogSource::new(config.clone(), metrics.clone())?;
    // Fail fast on server settings and rules, on standbys too.
    let info = source.check().await?;
    let mut stages: JoinSet<(&'static str, Result<(), PipelineError>)> = JoinSet::new();
    // Only the leader streams, and it reads the checkpoint only once it holds the lock.
    let lock_name = leader::lock_name(&config.kafka.checkpoint_key, &config.kafka.topic_prefix);
    let Some(lock) = leader::LeaderLock::acquire(&config.source.url, &lock_name, &shutdown).await?
    else {
        return Ok(());
    };
    let sd = shutdown.clone();
    stages.spawn(async move { ("leader", lock.hold(sd).await.map_err(Into::into)) });
    if !publish::ensure_topics(&config.kafka, &topics, &metrics, &shutdown).await? {
        return Ok(());
    }
    let wire = publish::Wire::new(&config)?;
    wire.register(&topics).await?;
    let producer = publish::producer(&config.kafka)?;
    let mut partitions = BTreeMap::new();
    for t in [&topics.pool_reset, &topics.cache_keys] {
        partitions.insert(t.clone(), publish::partition_count(&producer, t)?);
    }
    let kafka = config.kafka.clone();
    let (ck_topic, ck_key) = (topics.checkpoints.clone(), kafka.checkpoint_key.clone());
    let stored = tokio::task::spawn_blocking(move || checkpoint::load(&kafka, &ck_topic, &ck_key))
        .await
        .map_err(|e| PipelineError::Panic(e.to_string()))??;
    let start = match stored {
        Some(p) => Start::Checkpoint(p),
        None => Start::Current,
    };

    let (batch_tx, batch_rx) = mpsc::channel(256);
    let (inflight_tx, inflight_rx) = mpsc::channel(1024);
    let publisher = Publisher {
        producer: producer.clone(),
        wire,
        topics: topics.clone(),
        partitions,
        metrics: metrics.clone(),
    };
    let checkpointer = Checkpointer {
        producer,
        topic: topics.checkpoints.clone(),
        key: config.kafka.checkpoint_key.clone(),
        interval: Duration::from_millis(config.producer.checkpoint_ms),
        metrics: metrics.clone(),
    };
    let sd = shutdown.clone();
    stages.spawn(async move {
        (
            "source",
            source
                .run(info, start, batch_tx, sd)
                .await
                .map_err(Into::into),
        )
    });
    let sd = shutdown.clone();
    stages.spawn(async move {
        (
            "publish",
            publisher
                .run(batch_rx, inflight_tx, sd)
                .await
                .map_err(Into::into),
        )
    });
    stages.spawn(async move {
        (
            "checkpoint",
            checkpointer.run(inflight_rx).await.map_err(Into::into),
        )
    });
    info!(topics = ?topics, "Producer running.");

    let mut first_error = None;
    while let Some(joined) = stages.join_next().await {
        let (stage, result) = match joined {
            Ok(r) => r,
            Err(e) => ("?", Err(PipelineError::Panic(e.to_string()))),
        };
        if let Err(e) = result {
            error!(stage, error = %chain(&e), "Stage failed; stopping the pipeline.");
            shutdown.cancel();
            first_error.get_or_insert(e);
        } else if stage == "source" {
            // The source ended (shutdown): the others drain and finish on their own.
            shutdown.cancel();
        }
    }
    first_error.map_or(Ok(()), Err)
}
