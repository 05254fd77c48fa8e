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
//! [`cluster`] answers the same for every node from Kafka's committed offsets, finding the
//! nodes in the [`nodes`] registry (where each node registers its group); [`replay`] reads
//! the topics back; [`endpoint`] serves `/metrics`, `/healthz`, `/readyz` and `/wait`. Plus
//! [`config`] (TOML), [`error`] and [`metrics`] (Prometheus, readiness).
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
pub mod endpoint;
pub mod error;
pub mod inspect;
pub mod metrics;
pub mod nodes;
pub mod plan;
pub mod replay;
pub mod subscribe;

use rtinval_schemas::runtime::chain;
use std::collections::BTreeMap;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apply::pool::{Debouncer, Timing};
use crate::apply::{Applier, Cache};
use crate::barrier::Barrier;
use crate::config::Config;
use crate::error::{ConfigError, ConsumerError};
use crate::metrics::Metrics;
use crate::subscribe::Subscriber;

/// Connect to every cache (failing at the first that cannot be reached: `replay --apply`) and
/// start every pool's debouncer.
pub async fn applier(
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<Applier, ConsumerError> {
    let pools = pools(config, metrics, shutdown)?;
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

/// Every pool's debouncer.
fn pools(
    config: &Config,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<BTreeMap<String, Debouncer>, ConsumerError> {
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
    Ok(pools)
}

/// Run the consumer until `shutdown` or a fatal error.
///
/// The HTTP endpoint comes up first, on a thread of its own, so `/healthz` and `/metrics`
/// answer from the first moment and `/readyz` says why the node is not ready yet. A cache or
/// the brokers unreachable at start are retried with backoff (the node stays not ready); a
/// cache that was unreachable is flushed once reachable, before anything is applied to it.
pub async fn run(
    config: Config,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    metrics.set_max_staleness(config.max_staleness());
    let barrier = Barrier::new(&metrics);
    let http = if config.http.listen.is_empty() {
        None
    } else {
        Some(endpoint::serve_on_thread(
            &config.http.listen,
            metrics.clone(),
            barrier.clone(),
        )?)
    };
    // Actions get their own token: they are cancelled only after the loop stopped reading,
    // so the action in progress at SIGTERM can finish and be committed.
    let actions_shutdown = CancellationToken::new();
    let result = consume(config, metrics, barrier, &actions_shutdown, shutdown).await;
    actions_shutdown.cancel();
    if let Some(http) = http
        && let Err(e) = http.stop()
    {
        return result.and(Err(e));
    }
    result
}

async fn consume(
    config: Config,
    metrics: Metrics,
    barrier: Barrier,
    actions_shutdown: &CancellationToken,
    shutdown: CancellationToken,
) -> Result<(), ConsumerError> {
    let Some(applier) = applier_retrying(&config, &metrics, actions_shutdown, &shutdown).await?
    else {
        return Ok(());
    };
    for (name, cache) in &applier.caches {
        tokio::spawn(
            cache
                .clone()
                .watch_identity(name.clone(), actions_shutdown.clone()),
        );
    }
    let consumer = subscribe::consumer(&config, &metrics)?;
    nodes::spawn(&config, shutdown.clone());
    info!(group = %config.group_id(), pools = config.pools.len(), caches = config.caches.len(), "Consumer running.");
    let dead_letter = match &config.kafka.dead_letter_topic {
        Some(topic) => Some(subscribe::dead_letter(&config, topic, actions_shutdown).await?),
        None => None,
    };
    let avro = match &config.schema_registry {
        Some(registry) => Some(
            rtinval_schemas::avro::AvroReader::new(registry)
                .map_err(|e| ConsumerError::Config(ConfigError::Invalid(e)))?,
        ),
        None => None,
    };
    Subscriber::new(
        config,
        consumer,
        applier,
        metrics,
        dead_letter,
        avro,
        barrier,
    )
    .run(shutdown)
    .await
}

/// Like [`applier`], but a cache that cannot be reached is retried with backoff until it can
/// (or `shutdown`: `None`), and then flushed: while it was away it may have restarted or lost
/// purges, and this node has no record of its identity from before.
async fn applier_retrying(
    config: &Config,
    metrics: &Metrics,
    actions_shutdown: &CancellationToken,
    shutdown: &CancellationToken,
) -> Result<Option<Applier>, ConsumerError> {
    let pools = pools(config, metrics, actions_shutdown)?;
    let connects = config
        .caches
        .iter()
        .map(|(name, c)| connect_retrying(name, c, metrics, shutdown));
    let mut caches = BTreeMap::new();
    for (name, cache) in config
        .caches
        .keys()
        .zip(futures::future::join_all(connects).await)
    {
        let Some(cache) = cache else { return Ok(None) };
        caches.insert(name.clone(), cache);
    }
    metrics.set_problem(None);
    Ok(Some(Applier {
        pools,
        caches,
        metrics: metrics.clone(),
        shutdown: actions_shutdown.clone(),
    }))
}

async fn connect_retrying(
    name: &str,
    config: &crate::config::CacheConfig,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Option<Cache> {
    let mut backoff = std::time::Duration::from_secs(1);
    let mut failed = false;
    let cache = loop {
        match Cache::connect(name, config, metrics).await {
            Ok(cache) => break cache,
            Err(e) => {
                failed = true;
                metrics.cache_failed(name);
                metrics.set_problem(Some(format!("{}; retrying", chain(&e))));
                warn!(cache = %name, error = %chain(&e), retry_in_secs = backoff.as_secs(), "Cache unreachable at start; retrying (the node stays not ready).");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
            }
        }
    };
    if failed {
        loop {
            match cache.flush().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(cache = %name, error = %chain(&e), "Cannot flush the cache that was unreachable at start; retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
        metrics.resync("cache_unreachable_at_start");
        metrics.cache_flushed(name);
        info!(cache = %name, "Cache reachable: flushed it (it was unreachable at start) before applying anything.");
    }
    Some(cache)
}
