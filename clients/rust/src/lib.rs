//! Worker-side client of rtinval: read through the node-local cache, fill it without ever
//! storing data older than the last purge (the fill protocol, [`protocol`]), and after a write
//! wait until this node has invalidated it ([`Barrier`]).
//!
//! ```text
//! let cache = NodeCache::redis("redis://127.0.0.1:6379", "rt:").await?;
//! let value = cache.read_through("object:42", ttl, || load_object(42)).await?;
//! // after a write: SELECT @@last_gtid, then
//! Barrier::new("http://127.0.0.1:9464").wait(&gtid, Duration::from_secs(2)).await?;
//! ```
//!
//! Modules: [`protocol`] (the stored forms, pure), [`memcached`] (a minimal text-protocol
//! connection), [`key`] (cache keys from the rule set's templates).

pub mod key;
pub mod memcached;
pub mod protocol;

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::memcached::{Memcached, StoreResult};
use crate::protocol::{APPLIED_KEY, Stored};

/// What can go wrong talking to the cache or the node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("memcached: {0}")]
    Memcached(String),
    #[error(
        "key {0:?} cannot be stored in memcached (1-250 bytes, no spaces or control characters)"
    )]
    BadKey(String),
    #[error("barrier: {0}")]
    Barrier(#[from] WaitError),
}

/// How long a lease (the marker a miss leaves) lives by default: a fill more than this long
/// after its read finds the lease gone and stores nothing.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// The result of a read.
#[derive(Debug)]
pub enum Lookup {
    /// The cache holds data for the key.
    Hit(Vec<u8>),
    /// It does not: read the source, then [`NodeCache::fill`] with this token.
    Miss(FillToken),
}

/// What a fill must present: the marker its read saw.
#[derive(Debug, Clone)]
pub struct FillToken {
    key: Vec<u8>,
    basis: String,
    marker: Marker,
}

impl FillToken {
    /// The position the read came after (the marker's), which a fill records with its data.
    pub fn basis(&self) -> &str {
        &self.basis
    }
}

#[derive(Debug, Clone)]
enum Marker {
    /// The marker value itself (compared by the fill script).
    Redis(Vec<u8>),
    /// The marker's CAS id.
    Memcached(u64),
    /// Nothing may be stored (the key cannot be held by this cache).
    None,
}

enum Backend {
    Redis {
        conn: ConnectionManager,
        read: redis::Script,
        fill: redis::Script,
    },
    Memcached(Memcached),
}

/// The node-local cache of one rtinval cache (one `[caches.NAME]` of the consumer's config,
/// with its `fill_protocol = true`), addressed with the same key prefix.
pub struct NodeCache {
    backend: Backend,
    prefix: String,
    lease_ttl: Duration,
}

impl std::fmt::Debug for NodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCache")
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// memcached TTLs are whole seconds; round up so a short TTL never means "forever" (0).
fn secs(d: Duration) -> u32 {
    d.as_millis().div_ceil(1000).clamp(1, 30 * 24 * 3600) as u32
}

impl NodeCache {
    /// A Redis cache (`redis://host:port[/db]`) with key prefix `prefix`.
    pub async fn redis(url: &str, prefix: &str) -> Result<NodeCache, ClientError> {
        let conn = ConnectionManager::new(redis::Client::open(url)?).await?;
        Ok(NodeCache {
            backend: Backend::Redis {
                conn,
                read: redis::Script::new(protocol::READ_SCRIPT),
                fill: redis::Script::new(protocol::FILL_SCRIPT),
            },
            prefix: prefix.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
        })
    }

    /// A memcached cache (`host:port`) with key prefix `prefix`.
    pub fn memcached(addr: &str, prefix: &str) -> NodeCache {
        NodeCache {
            backend: Backend::Memcached(Memcached::new(addr)),
            prefix: prefix.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// How long a miss's lease lives (default [`DEFAULT_LEASE_TTL`]): longer than the slowest
    /// source read between a miss and its fill, or those fills are dropped (never stale).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> NodeCache {
        self.lease_ttl = ttl;
        self
    }

    fn full(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(self.prefix.as_bytes());
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// Read `key` (without the prefix). A miss leaves a lease that the fill must find intact.
    pub async fn get(&self, key: &str) -> Result<Lookup, ClientError> {
        let full = self.full(key);
        match &self.backend {
            Backend::Redis { conn, read, .. } => {
                let mut conn = conn.clone();
                let applied = self.full(APPLIED_KEY);
                let value: Vec<u8> = read
                    .key(&full)
                    .key(applied)
                    .arg(protocol::nonce())
                    .arg(ms(self.lease_ttl))
                    .invoke_async(&mut conn)
                    .await?;
                Ok(match Stored::parse(&value) {
                    Stored::Data { payload, .. } => Lookup::Hit(payload.to_vec()),
                    Stored::Foreign(v) => Lookup::Hit(v.to_vec()),
                    marker => Lookup::Miss(FillToken {
                        basis: marker.basis().to_owned(),
                        key: full,
                        marker: Marker::Redis(value.clone()),
                    }),
                })
            }
            Backend::Memcached(mc) => self.memcached_get(mc, full).await,
        }
    }

    async fn memcached_get(&self, mc: &Memcached, full: Vec<u8>) -> Result<Lookup, ClientError> {
        let applied = self.full(APPLIED_KEY);
        // A miss adds a lease, then reads it back for its CAS id; another reader's lease or a
        // purge's tombstone in between is simply what the next round sees.
        for _ in 0..3 {
            let mut got = mc.gets(&[&full, &applied]).await?;
            let basis_item = got.pop().flatten();
            if let Some(item) = got.pop().flatten() {
                return Ok(match Stored::parse(&item.value) {
                    Stored::Data { payload, .. } => Lookup::Hit(payload.to_vec()),
                    Stored::Foreign(v) => Lookup::Hit(v.to_vec()),
                    marker => Lookup::Miss(FillToken {
                        basis: marker.basis().to_owned(),
                        key: full,
                        marker: Marker::Memcached(item.cas),
                    }),
                });
            }
            let basis = basis_item
                .map(|i| String::from_utf8_lossy(&i.value).into_owned())
                .unwrap_or_default();
            let lease = protocol::lease(&basis, &protocol::nonce());
            mc.add(&full, lease.as_bytes(), secs(self.lease_ttl))
                .await?;
        }
        // The key keeps vanishing (evictions, flushes): read the source, store nothing.
        Ok(Lookup::Miss(FillToken {
            key: full,
            basis: "-".into(),
            marker: Marker::None,
        }))
    }

    /// Store `payload` for the token's key, for `ttl` (zero: no expiry; memcached rounds up to
    /// seconds), only if no purge reached the key since the read that issued the token.
    /// `Ok(false)`: not stored (a purge or another fill came first, or the lease expired).
    pub async fn fill(
        &self,
        token: FillToken,
        payload: &[u8],
        ttl: Duration,
    ) -> Result<bool, ClientError> {
        let value = protocol::data(&token.basis, payload);
        match (&self.backend, token.marker) {
            (Backend::Redis { conn, fill, .. }, Marker::Redis(marker)) => {
                let mut conn = conn.clone();
                let ttl_ms = if ttl.is_zero() { 0 } else { ms(ttl) };
                let stored: i64 = fill
                    .key(&token.key)
                    .arg(marker)
                    .arg(value)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(stored == 1)
            }
            (Backend::Memcached(mc), Marker::Memcached(cas)) => {
                let ttl = if ttl.is_zero() { 0 } else { secs(ttl) };
                Ok(mc.cas(&token.key, &value, ttl, cas).await? == StoreResult::Stored)
            }
            _ => Ok(false),
        }
    }

    /// Read `key` through the cache: a hit returns the cached payload; a miss calls `load` (the
    /// source read, which must start after this call) and fills with its result. A cache that
    /// fails is bypassed (the source's value is returned and nothing is stored).
    pub async fn read_through<E>(
        &self,
        key: &str,
        ttl: Duration,
        load: impl AsyncFnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        match self.get(key).await {
            Ok(Lookup::Hit(v)) => Ok(v),
            Ok(Lookup::Miss(token)) => {
                let v = load().await?;
                let _ = self.fill(token, &v, ttl).await;
                Ok(v)
            }
            Err(_) => load().await,
        }
    }
}

/// Why a wait did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// 504: the node had not applied the position within the timeout.
    #[error("timed out: {0}")]
    Timeout(String),
    /// 503: the node cannot promise (stale, resyncing, stopping); purge-on-read is the
    /// fallback.
    #[error("node unavailable: {0}")]
    Unavailable(String),
    /// 400: the position is malformed.
    #[error("bad position: {0}")]
    BadPosition(String),
    /// No answer, or an unexpected one.
    #[error("{0}")]
    Http(String),
}

/// The node barrier: `GET /wait` on this node's consumer.
#[derive(Debug, Clone)]
pub struct Barrier {
    base: String,
    http: reqwest::Client,
}

impl Barrier {
    /// `base`: the consumer's HTTP listener, e.g. `http://127.0.0.1:9464`.
    pub fn new(base: &str) -> Barrier {
        Barrier {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Wait until this node has applied every invalidation up to `position` (MariaDB
    /// `@@last_gtid` after the commit, a MySQL GTID set, or `file:pos`).
    pub async fn wait(&self, position: &str, timeout: Duration) -> Result<(), WaitError> {
        self.wait_answer(position, timeout).await.map(|_| ())
    }

    /// Like [`Barrier::wait`], returning the node's answer (JSON; `applied` names how far the
    /// node got, e.g. `mariadb-bin.000001:4242 (gtid 0-*-17)`).
    pub async fn wait_answer(
        &self,
        position: &str,
        timeout: Duration,
    ) -> Result<String, WaitError> {
        let resp = self
            .http
            .get(format!(
                "{}/wait?gtid={}&timeout_ms={}",
                self.base,
                encode(position),
                timeout.as_millis()
            ))
            .timeout(timeout + Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| WaitError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default().trim().to_owned();
        match status {
            200 => Ok(body),
            504 => Err(WaitError::Timeout(body)),
            503 => Err(WaitError::Unavailable(body)),
            400 => Err(WaitError::BadPosition(body)),
            s => Err(WaitError::Http(format!("HTTP {s}: {body}"))),
        }
    }
}

/// Percent-encode a query value (positions use only a few safe punctuation marks).
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._:,~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
