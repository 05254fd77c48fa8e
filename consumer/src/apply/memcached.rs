//! memcached purger: deletes are pipelined with `noreply` and confirmed by a `version` round
//! trip on the same connection (memcached answers in order, so the reply proves every delete
//! before it was processed); a whole-cache flush is `flush_all`. A missing key counts as
//! purged. Keys memcached cannot hold (over 250 bytes, spaces or control characters) cannot be
//! deleted by name, so such an event flushes the cache instead — never a silent skip.

use std::sync::Arc;

use async_memcached::{AsciiProtocol, Client};
use tokio::sync::Mutex;

use crate::error::CacheError;

/// Longest key memcached accepts.
const MAX_KEY: usize = 250;

/// One memcached-backed cache; one connection, re-opened after an error.
#[derive(Clone)]
pub struct MemcachedCache {
    name: String,
    addr: String,
    prefix: String,
    conn: Arc<Mutex<Option<Client>>>,
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
    ) -> Result<MemcachedCache, CacheError> {
        let cache = MemcachedCache {
            name: name.to_owned(),
            addr: addr.to_owned(),
            prefix: prefix.to_owned(),
            conn: Arc::new(Mutex::new(None)),
        };
        cache
            .with_client(|c| Box::pin(async move { c.version().await.map(|_| ()) }))
            .await?;
        Ok(cache)
    }

    fn err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError {
            cache: self.name.clone(),
            url: self.addr.clone(),
            error: e.to_string(),
        }
    }

    async fn with_client<T>(
        &self,
        op: impl for<'c> FnOnce(
            &'c mut Client,
        )
            -> futures::future::BoxFuture<'c, Result<T, async_memcached::Error>>,
    ) -> Result<T, CacheError> {
        let mut guard = self.conn.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            let connect =
                tokio::time::timeout(std::time::Duration::from_secs(10), Client::new(&self.addr));
            let client = connect
                .await
                .map_err(|_| self.err("connect timed out after 10 s"))?
                .map_err(|e| self.err(e))?;
            *guard = Some(client);
        }
        let Some(client) = guard.as_mut() else {
            return Err(self.err("no connection"));
        };
        let result = op(client).await;
        if result.is_err() {
            *guard = None;
        }
        result.map_err(|e| self.err(e))
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
        self.with_client(move |c| {
            Box::pin(async move {
                c.delete_multi_no_reply(&keys).await?;
                c.version().await.map(|_| ())
            })
        })
        .await
    }

    /// `flush_all`.
    pub async fn flush(&self) -> Result<(), CacheError> {
        self.with_client(|c| Box::pin(async move { c.flush_all().await }))
            .await
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
