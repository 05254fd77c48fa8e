//! # Layout
//!
//! `rtinval-consumer` is the per-node agent: it applies invalidation events to this node's
//! worker pools and caches. One module per pipeline stage, wired by [`run`]:
//!
//! ```text
//! subscribe (Kafka, this node's group) → decode → plan (pure: event → actions)
//!     → apply (pool: debounced reloads; redis: pipelined UNLINK) → offset stored → committed
//! ```
//!
//! Completed messages feed [`barrier`] (the node's applied source position, and `/wait`);
//! [`cluster`] answers the same for every node from Kafka's committed offsets; [`replay`] reads
//! the topics back. Plus [`config`] (TOML), [`error`] and [`metrics`] (Prometheus, probes).
//!
//! Guarantees:
//! - **Commit after apply.** A message's offset is stored only when all its actions succeeded
//!   (reloads and purges are retried until they do); on shutdown, unfinished actions leave their
//!   offsets uncommitted, so the next start re-applies them. Actions are idempotent.
//! - **Fail safe.** No committed offset at start, an undecodable message, or a `resync` event
//!   reloads every pool and flushes every cache of this node, counted by reason.
//! - **Coalesced reloads.** Reset requests for a pool within `debounce_ms` become one reload,
//!   never later than `max_delay_ms` after the first.
//! - **A cache that goes back in time is flushed.** A cache server whose identity changed
//!   (restart from a snapshot, promoted replica) is flushed before anything more is applied
//!   to it ([`apply::identity`]).
//! - **Read-your-writes.** `/wait` answers 200 only once every event up to the position is
//!   applied on this node; every other outcome is an answer too (504, 503, 400), never a hang.

pub mod apply;
pub mod barrier;
pub mod cluster;
pub mod config;
pub mod error;
pub mod metrics;
pub mod plan;
pub mod replay;
pub mod subscribe;

use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::apply::pool::{Debouncer, Timing};
use crate::apply::{Applier, Cache};
use crate::barrier::Barrier;
use crate::config::Config;
use crate::error::{ConfigError, ConsumerError};
use crate::metrics::Metrics;
use crate::subscribe::Subscriber;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Connect to every cache and start every pool's debouncer.
pub async fn applier(
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Applier, ConsumerError> {
    let mut pools = BTreeMap::new();
    for (name, p) in &config.pools {
        let reload = apply::pool::reloader(name, p)
            .map_err(|e| ConfigError::Invalid(format!("pools.{name}: {e}")))?;
        pools.insert(
            name.clone(),
            Debouncer::spawn(
                name,
                Timing::from_config(p),
                reload,
                metrics.clone(),
                shutdown.clone(),
            ),
        );
    }
    let mut caches = BTreeMap::new();
    for (name, c) in &config.caches {
        caches.insert(name.clone(), Cache::connect(name, c, metrics).await?);
    }
    Ok(Applier {
        pools,
        caches,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    })
}

/// Run the consumer until `shutdown` or a fatal error.
pub async fn run(
    config: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    metrics.set_max_staleness(config.max_staleness());
    // Actions get their own token: they are cancelled only after the loop stopped reading,
    // so the action in progress at SIGTERM can finish and be committed.
    let actions_shutdown = CancellationToken::new();
    let applier = applier(&config, &metrics, &actions_shutdown).await?;
    for (name, cache) in &applier.caches {
        tokio::spawn(
            cache
                .clone()
                .watch_identity(name.clone(), actions_shutdown.clone()),
        );
    }
    let consumer = subscribe::consumer(&config)?;
    let barrier = Barrier::new(&metrics);
    let http = if config.http.listen.is_empty() {
        None
    } else {
        let listener_sd = CancellationToken::new();
        let (listen, m, b, sd) = (
            config.http.listen.clone(),
            metrics.clone(),
            barrier.clone(),
            listener_sd.clone(),
        );
        let handle = tokio::spawn(async move {
            metrics::serve(&listen, m, Some(b), sd)
                .await
                .map_err(|error| ConsumerError::Http { listen, error })
        });
        Some((handle, listener_sd))
    };
    info!(group = %config.group_id(), pools = config.pools.len(), caches = config.caches.len(), "Consumer running.");
    let dead_letter = match &config.kafka.dead_letter_topic {
        Some(topic) => Some(subscribe::dead_letter(&config, topic, &actions_shutdown).await?),
        None => None,
    };
    let avro = match &config.schema_registry {
        Some(registry) => Some(
            rtinval_schemas::avro::AvroReader::new(registry)
                .map_err(|e| ConsumerError::Config(ConfigError::Invalid(e)))?,
        ),
        None => None,
    };
    let result = Subscriber::new(
        config,
        consumer,
        applier,
        metrics,
        dead_letter,
        avro,
        barrier,
    )
    .run(shutdown)
    .await;
    actions_shutdown.cancel();
    if let Some((handle, sd)) = http {
        sd.cancel();
        if let Ok(Err(e)) = handle.await {
            return Err(e);
        }
    }
    result
}
