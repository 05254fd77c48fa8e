//! Redis purger: pipelined UNLINK of keys (chunks of 1,000 per command, one round trip per
//! call); whole-cache flush by `SCAN MATCH prefix*` + UNLINK, or FLUSHDB when the cache owns
//! its database. A missing key counts as purged.
//!
//! With the fill protocol (`fill_protocol = true`), a purge sets each key to a tombstone with a
//! time to live instead ([`RedisCache::tombstone`]), and every identity check also loads the
//! protocol's scripts.
//!
//! Each purge's pipeline starts with `CLIENT ID`: a new id means the connection manager
//! reconnected, and the server's identity is checked ([`super::identity`]) before the purge
//! counts as applied.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use redis::aio::ConnectionManager;
use rtinval_client::protocol;

use super::identity::{Identity, Watch};
use crate::config::{CacheConfig, FlushMode};
use crate::error::CacheError;
use crate::metrics::Metrics;

const CHUNK: usize = 1000;

/// One Redis-backed cache.
#[derive(Clone)]
pub struct RedisCache {
    name: String,
    url: String,
    prefix: String,
    flush: FlushMode,
    conn: ConnectionManager,
    watch: Arc<Watch>,
    /// `CLIENT ID` of the connection whose server identity was last checked (-1: none).
    checked: Arc<AtomicI64>,
    /// Load the fill protocol's scripts with each identity check (so workers' EVALSHA finds
    /// them, also on a server that restarted).
    scripts: bool,
    /// SHA1 of the purge script (loaded with the identity check, which precedes any purge on
    /// a new connection or server).
    purge_sha: String,
}

impl RedisCache {
    /// Connect (fails fast with a clear error when Redis is unreachable at start).
    pub async fn connect(
        name: &str,
        info: redis::ConnectionInfo,
        url: String,
        config: &CacheConfig,
        metrics: &Metrics,
    ) -> Result<RedisCache, CacheError> {
        let err = |e: redis::RedisError| CacheError {
            cache: name.to_owned(),
            url: url.clone(),
            error: Box::new(e),
        };
        let client = redis::Client::open(info).map_err(err)?;
        let conn = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            ConnectionManager::new(client),
        )
        .await
        .map_err(|_| CacheError {
            cache: name.to_owned(),
            url: url.clone(),
            error: "connect timed out after 10 s".into(),
        })?
        .map_err(err)?;
        let cache = RedisCache {
            name: name.to_owned(),
            url,
            prefix: config.prefix.clone(),
            flush: config.flush_mode(),
            conn,
            watch: Arc::new(Watch::new(name, metrics)),
            checked: Arc::new(AtomicI64::new(-1)),
            scripts: config.fill_protocol,
            purge_sha: redis::Script::new(protocol::PURGE_SCRIPT)
                .get_hash()
                .to_owned(),
        };
        cache.check_identity().await?;
        Ok(cache)
    }

    /// Read the server's identity (`INFO`, with the connection's `CLIENT ID` in the same round
    /// trip) and settle it: a changed server is flushed before this returns.
    pub async fn check_identity(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("ID").cmd("INFO");
        if self.scripts {
            for script in [
                protocol::READ_SCRIPT,
                protocol::FILL_SCRIPT,
                protocol::PURGE_SCRIPT,
            ] {
                pipe.cmd("SCRIPT").arg("LOAD").arg(script).ignore();
            }
        }
        let (id, info): (i64, String) =
            pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
        let seen = Identity::from_redis_info(&info)
            .ok_or_else(|| self.err_text("INFO has no run_id (not a Redis server?)"))?;
        self.watch.settle(seen, || self.flush()).await?;
        self.checked.store(id, Ordering::Relaxed);
        Ok(())
    }

    /// After an operation on connection `id`: check the identity if that connection is new.
    async fn checked_connection(&self, id: i64) -> Result<(), CacheError> {
        if self.checked.load(Ordering::Relaxed) != id {
            self.check_identity().await?;
        }
        Ok(())
    }

    fn err_text(&self, e: &str) -> CacheError {
        CacheError {
            cache: self.name.clone(),
            url: self.url.clone(),
            error: e.into(),
        }
    }

    fn err(&self, e: redis::RedisError) -> CacheError {
        CacheError {
            cache: self.name.clone(),
            url: self.url.clone(),
            error: Box::new(e),
        }
    }

    /// UNLINK `keys` (prefixed) in one pipelined round trip.
    pub async fn purge(&self, keys: &[String]) -> Result<(), CacheError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("ID");
        for chunk in keys.chunks(CHUNK) {
            let cmd = pipe.cmd("UNLINK");
            for k in chunk {
                if self.prefix.is_empty() {
                    cmd.arg(k.as_str());
                } else {
                    cmd.arg(format!("{}{k}", self.prefix));
                }
            }
            cmd.ignore();
        }
        let mut conn = self.conn.clone();
        let (id,): (i64,) = pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?;
        self.checked_connection(id).await
    }

    /// Fill protocol: replace `keys` (prefixed here) by `tombstone` for `ttl` — except where
    /// a key holds a marker or data of a newer position (the purge script) — and store the
    /// applied position first, all in one pipelined round trip.
    pub async fn tombstone(
        &self,
        keys: &[String],
        tombstone: &str,
        position: &str,
        applied: &str,
        ttl: std::time::Duration,
    ) -> Result<(), CacheError> {
        if keys.is_empty() {
            return Ok(());
        }
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("CLIENT").arg("ID");
        if !applied.is_empty() {
            pipe.cmd("SET")
                .arg(format!("{}{}", self.prefix, protocol::APPLIED_KEY))
                .arg(applied)
                .ignore();
        }
        // One script call per chunk: a late purge never replaces a newer position's marker.
        let (domain, seq) = match protocol::gtid_parts(position) {
            Some((d, n)) => (d.to_owned(), n.to_string()),
            None => (String::new(), String::new()),
        };
        for chunk in keys.chunks(CHUNK) {
            let cmd = pipe.cmd("EVALSHA").arg(&self.purge_sha).arg(chunk.len());
            for k in chunk {
                cmd.arg(format!("{}{k}", self.prefix));
            }
            cmd.arg(tombstone)
                .arg(ttl_ms)
                .arg(&domain)
                .arg(&seq)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let (id,): (i64,) = match pipe.query_async(&mut conn).await {
            Ok(v) => v,
            // A server that lost its scripts (restart, SCRIPT FLUSH): load, send again.
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(protocol::PURGE_SCRIPT)
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| self.err(e))?;
                pipe.query_async(&mut conn).await.map_err(|e| self.err(e))?
            }
            Err(e) => return Err(self.err(e)),
        };
        self.checked_connection(id).await
    }

    /// Delete every key of the cache.
    pub async fn flush(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        match self.flush {
            FlushMode::Flushdb => redis::cmd("FLUSHDB")
                .arg("ASYNC")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.err(e)),
            FlushMode::Prefix | FlushMode::FlushAll => {
                let pattern = format!("{}*", glob_escape(&self.prefix));
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(CHUNK)
                        .query_async(&mut conn)
                        .await
                        .map_err(|e| self.err(e))?;
                    if !keys.is_empty() {
                        redis::cmd("UNLINK")
                            .arg(keys)
                            .query_async::<()>(&mut conn)
                            .await
                            .map_err(|e| self.err(e))?;
                    }
                    if next == 0 {
                        return Ok(());
                    }
                    cursor = next;
                }
            }
        }
    }
}

/// Escape Redis glob metacharacters so a prefix matches literally.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::glob_escape;

    #[test]
    fn prefixes_match_literally() {
        assert_eq!(glob_escape("rt:"), "rt:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
