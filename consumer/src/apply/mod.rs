//! Apply stage: carries out planned actions on this node. Pool reloads are debounced
//! ([`pool`]); cache purges are pipelined ([`redis`]). Every action's future resolves only once
//! the action is applied (retrying transient failures with backoff), so the caller can commit
//! the message's offset exactly then — or never, when shutdown interrupts it.

pub mod http;
pub mod identity;
pub mod memcached;
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

/// A cache server behind a named cache.
#[derive(Clone)]
pub enum Backend {
    Redis(redis::RedisCache),
    Memcached(memcached::MemcachedCache),
}

/// How a purge went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purged {
    /// Every key was deleted (or was already absent).
    Keys,
    /// A key could not be addressed in this cache, so the whole cache was flushed instead.
    FlushedInstead,
}

/// A named node-local cache.
#[derive(Clone)]
pub struct Cache {
    pub backend: Backend,
    /// Delay of the optional second purge.
    pub second_purge: Option<Duration>,
    /// How often the server's identity is checked while idle (`None`: only on new connections).
    pub identity_check: Option<Duration>,
}

impl Cache {
    /// Connect to the cache server of `config`.
    pub async fn connect(
        name: &str,
        config: &crate::config::CacheConfig,
        metrics: &Metrics,
    ) -> Result<Cache, crate::error::CacheError> {
        let backend = match config.kind {
            crate::config::CacheKind::Redis => {
                Backend::Redis(redis::RedisCache::connect(name, config, metrics).await?)
            }
            crate::config::CacheKind::Memcached => Backend::Memcached(
                memcached::MemcachedCache::connect(
                    name,
                    &config.memcached_addr(),
                    &config.prefix,
                    metrics,
                )
                .await?,
            ),
        };
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        Ok(Cache {
            backend,
            second_purge: ms(config.second_purge_ms),
            identity_check: ms(config.identity_check_ms),
        })
    }

    /// Check the server's identity ([`identity`]): a restarted or replaced server is flushed.
    pub async fn check_identity(&self) -> Result<(), crate::error::CacheError> {
        match &self.backend {
            Backend::Redis(r) => r.check_identity().await,
            Backend::Memcached(m) => m.check_identity().await,
        }
    }

    /// Check the identity every `identity_check` until `shutdown`, so a cache that restarts
    /// while no event arrives is flushed within that bound. Failures are logged once per
    /// outage (the purges that fail meanwhile are retried and counted as always).
    pub async fn watch_identity(self, name: String, shutdown: CancellationToken) {
        let Some(every) = self.identity_check else {
            return;
        };
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.check_identity().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!(cache = %name, "Cache reachable again.");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    warn!(cache = %name, error = %e, "Cannot check the cache server's identity; retrying.");
                }
                Err(_) => {}
            }
        }
    }

    /// Delete `keys` (missing keys count as deleted).
    pub async fn purge(&self, keys: &[String]) -> Result<Purged, crate::error::CacheError> {
        match &self.backend {
            Backend::Redis(r) => r.purge(keys).await.map(|()| Purged::Keys),
            Backend::Memcached(m) => match m.prefixed(keys) {
                Some(full) => m.delete(full).await.map(|()| Purged::Keys),
                None => m.flush().await.map(|()| Purged::FlushedInstead),
            },
        }
    }

    /// Delete every key of the cache.
    pub async fn flush(&self) -> Result<(), crate::error::CacheError> {
        match &self.backend {
            Backend::Redis(r) => r.flush().await,
            Backend::Memcached(m) => m.flush().await,
        }
    }
}

/// Everything this node can act on.
#[derive(Clone)]
pub struct Applier {
    pub pools: BTreeMap<String, pool::Debouncer>,
    pub caches: BTreeMap<String, Cache>,
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
                    let mut round = retry(&shutdown, &metrics, &cache, || c.purge(&keys)).await?;
                    if let Some(delay) = c.second_purge {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Err(Interrupted),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        round = retry(&shutdown, &metrics, &cache, || c.purge(&keys)).await?;
                        metrics.second_purges.inc();
                    }
                    match round {
                        Purged::Keys => metrics.keys_purged(&cache, keys.len()),
                        Purged::FlushedInstead => {
                            warn!(%cache, "A key cannot be addressed in this cache (too long or has spaces): flushed the cache instead.");
                            metrics.cache_flushed(&cache);
                        }
                    }
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
                    retry(&shutdown, &metrics, &cache, || c.flush()).await?;
                    metrics.cache_flushed(&cache);
                    Ok(())
                }
                .boxed()
            }
            // Nothing to do here: the subscriber records a heartbeat's source time when the
            // heartbeat completes in message order, i.e. once everything received before it
            // is applied. Recording it here would keep a node "fresh" while its purges fail.
            Action::Freshness { .. } => async { Ok(()) }.boxed(),
            Action::NotHere { name } => {
                self.metrics.not_here.inc();
                tracing::trace!(%name, "Event names a pool or cache this node does not have.");
                async { Ok(()) }.boxed()
            }
        }
    }
}

/// Retry a cache operation with exponential backoff until it succeeds or shutdown; each
/// failure is logged and counted.
async fn retry<F, Fut, T>(
    shutdown: &CancellationToken,
    metrics: &Metrics,
    cache: &str,
    mut op: F,
) -> Result<T, Interrupted>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::error::CacheError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                metrics.cache_failed(cache);
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
