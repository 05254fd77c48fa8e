//! Apply stage: carries out planned actions on this node. Pool reloads are debounced
//! ([`pool`]); cache purges are pipelined ([`redis`]). Every action's future resolves only once
//! the action is applied (retrying transient failures with backoff), so the caller can commit
//! the message's offset exactly then — or never, when shutdown interrupts it.

pub mod http;
pub mod identity;
pub mod memcached;
pub mod pool;
pub mod redis;

use rtinval_schemas::runtime::chain;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtinval_client::protocol;
use rtinval_schemas::position::{FilePos, WaitFor};

use futures::future::{BoxFuture, FutureExt, join_all};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::CacheEndpoint;
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
    /// The fill protocol, if this cache uses it: purges leave tombstones.
    pub protocol: Option<Arc<Protocol>>,
}

/// A fill-protocol cache's purge state: how long tombstones live, and the newest position
/// applied to the cache (written beside the tombstones, copied into the leases of later reads).
#[derive(Debug)]
pub struct Protocol {
    pub tombstone_ttl: Duration,
    applied: Mutex<Applied>,
}

/// The newest position applied: per GTID source (MariaDB domain, MySQL uuid) the highest
/// transaction as written, else the highest file:pos.
#[derive(Debug, Default)]
struct Applied {
    gtids: BTreeMap<String, (u64, String)>,
    file_pos: Option<FilePos>,
}

impl Protocol {
    pub fn new(tombstone_ttl: Duration) -> Protocol {
        Protocol {
            tombstone_ttl,
            applied: Mutex::default(),
        }
    }

    /// Take in a purged position; returns the applied position to store (`0-1-17,1-2-5`, or
    /// `file:pos` for servers without GTIDs).
    pub fn note(&self, position: &str) -> String {
        let mut a = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        match WaitFor::parse(position) {
            Ok(WaitFor::Gtids(g)) => {
                for (source, seq) in g {
                    let e = a.gtids.entry(source).or_insert((0, String::new()));
                    if seq >= e.0 {
                        *e = (seq, position.to_owned());
                    }
                }
            }
            Ok(WaitFor::FilePos(p)) => {
                if a.file_pos.as_ref().is_none_or(|old| p > *old) {
                    a.file_pos = Some(p);
                }
            }
            Err(_) => {}
        }
        if a.gtids.is_empty() {
            a.file_pos
                .as_ref()
                .map_or_else(String::new, ToString::to_string)
        } else {
            let parts: Vec<&str> = a.gtids.values().map(|(_, g)| g.as_str()).collect();
            parts.join(",")
        }
    }
}

impl Cache {
    /// Connect to the cache server of `config`.
    pub async fn connect(
        name: &str,
        config: &crate::config::CacheConfig,
        metrics: &Metrics,
    ) -> Result<Cache, crate::error::CacheError> {
        let endpoint = config.endpoint().map_err(|e| crate::error::CacheError {
            cache: name.to_owned(),
            url: rtinval_schemas::config_file::redact_url(&config.url),
            error: e.into(),
        })?;
        let backend = match endpoint {
            CacheEndpoint::Redis { info, shown } => Backend::Redis(
                redis::RedisCache::connect(name, *info, shown, config, metrics).await?,
            ),
            CacheEndpoint::Memcached { addr } => Backend::Memcached(
                memcached::MemcachedCache::connect(name, &addr, &config.prefix, metrics).await?,
            ),
        };
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        Ok(Cache {
            backend,
            second_purge: ms(config.second_purge_ms),
            identity_check: ms(config.identity_check_ms),
            protocol: config.fill_protocol.then(|| {
                Arc::new(Protocol::new(Duration::from_millis(
                    config.tombstone_ttl_ms,
                )))
            }),
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
                    warn!(cache = %name, error = %chain(&e), "Cannot check the cache server's identity; retrying.");
                }
                Err(_) => {}
            }
        }
    }

    /// Delete `keys` (missing keys count as deleted), purged by the transaction at `position`.
    /// With the fill protocol, each key gets a tombstone instead (one per call, with a nonce of
    /// its own), and the applied position is stored beside them, in the same round trip.
    pub async fn purge(
        &self,
        keys: &[String],
        position: &str,
    ) -> Result<Purged, crate::error::CacheError> {
        let Some(p) = &self.protocol else {
            return match &self.backend {
                Backend::Redis(r) => r.purge(keys).await.map(|()| Purged::Keys),
                Backend::Memcached(m) => match m.prefixed(keys) {
                    Some(full) => m.delete(full).await.map(|()| Purged::Keys),
                    None => m.flush().await.map(|()| Purged::FlushedInstead),
                },
            };
        };
        let applied = p.note(position);
        let tombstone = protocol::tombstone(position, &protocol::nonce());
        match &self.backend {
            Backend::Redis(r) => r
                .tombstone(keys, &tombstone, position, &applied, p.tombstone_ttl)
                .await
                .map(|()| Purged::Keys),
            Backend::Memcached(m) => match m.prefixed(keys) {
                Some(full) => m
                    .tombstone(full, tombstone, applied, p.tombstone_ttl)
                    .await
                    .map(|()| Purged::Keys),
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
            Action::PurgeKeys {
                cache,
                keys,
                position,
            } => {
                let Some(c) = self.caches.get(&cache).cloned() else {
                    return async { Ok(()) }.boxed();
                };
                let (metrics, shutdown) = (self.metrics.clone(), self.shutdown.clone());
                async move {
                    let mut round = retry(&shutdown, &metrics, &cache, || c.purge(&keys, &position)).await?;
                    if let Some(delay) = c.second_purge {
                        tokio::select! {
                            _ = shutdown.cancelled() => return Err(Interrupted),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        round = retry(&shutdown, &metrics, &cache, || c.purge(&keys, &position)).await?;
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
                warn!(error = %chain(&e), retry_in_ms = backoff.as_millis() as u64, "Cache operation failed, retrying.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Err(Interrupted),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Protocol;
    use std::time::Duration;

    #[test]
    fn the_applied_position_only_grows_per_gtid_source() {
        let p = Protocol::new(Duration::from_secs(60));
        assert_eq!(p.note("0-1-5"), "0-1-5");
        assert_eq!(p.note("0-1-9"), "0-1-9");
        // A redelivered older purge does not lower it.
        assert_eq!(p.note("0-1-7"), "0-1-9");
        // Another domain is kept beside it; a failover's new server id is taken as written.
        assert_eq!(p.note("1-2-3"), "0-1-9,1-2-3");
        assert_eq!(p.note("0-3-10"), "0-3-10,1-2-3");
        // Garbage changes nothing.
        assert_eq!(p.note("not a position"), "0-3-10,1-2-3");
    }

    #[test]
    fn without_gtids_the_newest_file_position_is_kept() {
        let p = Protocol::new(Duration::from_secs(60));
        assert_eq!(p.note("bin.000002:100"), "bin.000002:100");
        assert_eq!(p.note("bin.000001:900"), "bin.000002:100");
        assert_eq!(p.note("bin.000003:4"), "bin.000003:4");
    }
}
