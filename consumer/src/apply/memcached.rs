//! memcached purger: deletes are pipelined with `noreply` and confirmed by a `version` round
//! trip on the same connection (memcached answers in order, so the reply proves every delete
//! before it was processed); a whole-cache flush is `flush_all`. A missing key counts as
//! purged. Keys memcached cannot hold (over 250 bytes, spaces or control characters) cannot be
//! deleted by name, so such an event flushes the cache instead — never a silent skip.
//!
//! After an operation on a new connection, the server's identity (`stats`: pid, uptime) is
//! checked ([`super::identity`]) before the operation counts as applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_memcached::{AsciiProtocol, Client};
use tokio::sync::Mutex;

use super::identity::{Identity, Watch};
use crate::error::CacheError;
use crate::metrics::Metrics;

/// Longest key memcached accepts.
const MAX_KEY: usize = 250;

/// One memcached-backed cache; one connection, re-opened after an error.
#[derive(Clone)]
pub struct MemcachedCache {
    name: String,
    addr: String,
    prefix: String,
    conn: Arc<Mutex<Connection>>,
    watch: Arc<Watch>,
    /// Generation of the connection whose server identity was last checked (0: none).
    checked: Arc<AtomicU64>,
}

/// The client, and how many connections were opened so far (this one's generation).
#[derive(Default)]
struct Connection {
    client: Option<Client>,
    generation: u64,
}

/// Whether memcached can store this key.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY
        && key.iter().all(|b| b.is_ascii_graphic() || *b >= 0x80)
}

impl MemcachedCache {
    /// Connect (fails fast with a clear error when memcached is unreachable at start).
    pub async fn connect(
        name: &str,
        addr: &str,
        prefix: &str,
        metrics: &Metrics,
    ) -> Result<MemcachedCache, CacheError> {
        let cache = MemcachedCache {
            name: name.to_owned(),
            addr: addr.to_owned(),
            prefix: prefix.to_owned(),
            conn: Arc::default(),
            watch: Arc::new(Watch::new(name, metrics)),
            checked: Arc::new(AtomicU64::new(0)),
        };
        cache.check_identity().await?;
        Ok(cache)
    }

    /// Read the server's identity (`stats`) and settle it: a changed server is flushed before
    /// this returns.
    pub async fn check_identity(&self) -> Result<(), CacheError> {
        let (stats, generation) = self
            .with_client(|c| Box::pin(async move { c.stats().await }))
            .await?;
        let seen = Identity::from_memcached_stats(&stats)
            .ok_or_else(|| self.err("stats has no pid or uptime (not a memcached server?)"))?;
        self.watch.settle(seen, || self.flush()).await?;
        self.checked.store(generation, Ordering::Relaxed);
        Ok(())
    }

    /// After an operation on connection `generation`: check the identity if it is new.
    async fn checked_connection(&self, generation: u64) -> Result<(), CacheError> {
        if self.checked.load(Ordering::Relaxed) != generation {
            self.check_identity().await?;
        }
        Ok(())
    }

    fn err(&self, e: impl Into<crate::error::Cause>) -> CacheError {
        CacheError {
            cache: self.name.clone(),
            url: self.addr.clone(),
            error: e.into(),
        }
    }

    /// Run `op` on the connection (opened first if there is none); returns its result and the
    /// connection's generation. An error drops the connection.
    async fn with_client<T>(
        &self,
        op: impl for<'c> FnOnce(
            &'c mut Client,
        )
            -> futures::future::BoxFuture<'c, Result<T, async_memcached::Error>>,
    ) -> Result<(T, u64), CacheError> {
        let mut guard = self.conn.lock().await;
        if guard.client.as_ref().is_none_or(Client::is_closed) {
            let connect =
                tokio::time::timeout(std::time::Duration::from_secs(10), Client::new(&self.addr));
            let client = connect
                .await
                .map_err(|_| self.err("connect timed out after 10 s"))?
                .map_err(|e| self.err(e))?;
            guard.client = Some(client);
            guard.generation += 1;
        }
        let generation = guard.generation;
        let Some(client) = guard.client.as_mut() else {
            return Err(self.err("no connection"));
        };
        let result = op(client).await;
        if result.is_err() {
            guard.client = None;
        }
        result.map(|v| (v, generation)).map_err(|e| self.err(e))
    }

    /// The prefixed keys, or `None` if one of them is not a valid memcached key.
    pub fn prefixed(&self, keys: &[String]) -> Option<Vec<Vec<u8>>> {
        keys.iter()
            .map(|k| {
                let mut full = Vec::with_capacity(self.prefix.len() + k.len());
                full.extend_from_slice(self.prefix.as_bytes());
                full.extend_from_slice(k.as_bytes());
                valid_key(&full).then_some(full)
            })
            .collect()
    }

    /// Delete `keys` (already prefixed and valid), confirmed by a round trip.
    pub async fn delete(&self, keys: Vec<Vec<u8>>) -> Result<(), CacheError> {
        let ((), generation) = self
            .with_client(move |c| {
                Box::pin(async move {
                    c.delete_multi_no_reply(&keys).await?;
                    c.version().await.map(|_| ())
                })
            })
            .await?;
        self.checked_connection(generation).await
    }

    /// Fill protocol: set `keys` (already prefixed and valid) to `tombstone`, and the applied
    /// position beside them, for `ttl` (whole seconds, rounded up), pipelined in one round trip.
    pub async fn tombstone(
        &self,
        mut keys: Vec<Vec<u8>>,
        tombstone: String,
        applied: String,
        ttl: std::time::Duration,
    ) -> Result<(), CacheError> {
        let ttl = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let mut values = vec![tombstone; keys.len()];
        if !applied.is_empty() {
            let mut key = self.prefix.as_bytes().to_vec();
            key.extend_from_slice(rtinval_client::protocol::APPLIED_KEY.as_bytes());
            keys.push(key);
            values.push(applied);
        }
        let ((), generation) = self
            .with_client(move |c| {
                Box::pin(async move {
                    let kv: Vec<(&Vec<u8>, &String)> = keys.iter().zip(values.iter()).collect();
                    let results = c.set_multi(&kv, Some(ttl), None).await?;
                    match results.into_values().find_map(Result::err) {
                        Some(e) => Err(e),
                        None => Ok(()),
                    }
                })
            })
            .await?;
        self.checked_connection(generation).await
    }

    /// `flush_all`.
    pub async fn flush(&self) -> Result<(), CacheError> {
        self.with_client(|c| Box::pin(async move { c.flush_all().await }))
            .await
            .map(|((), _)| ())
    }
}

#[cfg(test)]
mod tests {
    use super::valid_key;

    #[test]
    fn memcached_key_rules() {
        assert!(valid_key(b"rt:object:42"));
        assert!(valid_key("rt:objekt:ä".as_bytes()));
        assert!(!valid_key(b"has space"));
        assert!(!valid_key(b"ctl\x01"));
        assert!(!valid_key(b""));
        assert!(!valid_key(&[b'a'; 251]));
        assert!(valid_key(&[b'a'; 250]));
    }
}
