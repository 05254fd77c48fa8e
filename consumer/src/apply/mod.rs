//! Apply stage: carries out planned actions on this node. Pool reloads are debounced
//! ([`pool`]); cache purges are pipelined ([`redis`]). Every action's future resolves only once
//! the action is applied (retrying transient failures with backoff), so the caller can commit
//! the message's offset exactly then — or never, when shutdown interrupts it.

pub mod pool;
pub mod redis;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, join_all};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;
use crate::plan::{Action, Inventory};

/// The action was interrupted by shutdown before it was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

/// Everything this node can act on.
#[derive(Clone)]
pub struct Applier {
    pub pools: BTreeMap<String, pool::Debouncer>,
    pub caches: BTreeMap<String, redis::RedisCache>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

impl Applier {
    pub fn inventory(&self) -> Inventory {
        Inventory {
            pools: self.pools.keys().cloned().collect(),
            caches: self.caches.keys().cloned().collect(),
        }
    }

    /// A future that applies `actions` and resolves when all are applied.
    pub fn apply(&self, actions: Vec<Action>) -> BoxFuture<'static, Result<(), Interrupted>> {
        let futures: Vec<BoxFuture<'static, Result<(), Interrupted>>> =
            actions.into_iter().map(|a| self.apply_one(a)).collect();
        async move {
            for r in join_all(futures).await {
                r?;
            }
            Ok(())
        }
        .boxed()
    }

    fn apply_one(&self, action: Action) -> BoxFuture<'static, Result<(), Interrupted>> {
        match action {
            Action::ReloadPool(name) => match self.pools.get(&name) {
                Some(pool) => pool.request().boxed(),
                None => async { Ok(()) }.boxed(),
            },
            Action::PurgeKeys { cache, keys } => {
                let Some(c) = self.caches.get(&cache).cloned() else {
                    return async { Ok(()) }.boxed();
                };
                let (metrics, shutdown) = (self.metrics.clone(), self.shutdown.clone());
                async move {
                    retry(&shutdown, || c.purge(&keys)).await?;
                    metrics.keys_purged(&cache, keys.len());
                    Ok(())
                }
                .boxed()
            }
            Action::FlushCache(cache) => {
                let Some(c) = self.caches.get(&cache).cloned() else {
                    return async { Ok(()) }.boxed();
                };
                let (metrics, shutdown) = (self.metrics.clone(), self.shutdown.clone());
                async move {
                    retry(&shutdown, || c.flush()).await?;
                    metrics.cache_flushed(&cache);
                    Ok(())
                }
                .boxed()
            }
            Action::Freshness { source_time_ms } => {
                self.metrics.observe_source_time(source_time_ms);
                async { Ok(()) }.boxed()
            }
            Action::NotHere { name } => {
                self.metrics.not_here.inc();
                tracing::trace!(%name, "Event names a pool or cache this node does not have.");
                async { Ok(()) }.boxed()
            }
        }
    }
}

/// Retry a cache operation with exponential backoff until it succeeds or shutdown.
async fn retry<F, Fut, T>(shutdown: &CancellationToken, mut op: F) -> Result<T, Interrupted>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::error::CacheError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Cache operation failed, retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(Interrupted),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
