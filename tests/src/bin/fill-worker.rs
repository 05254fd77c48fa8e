//! A load worker for the fill-race test (`tests/tests/fill_race.rs`), the Rust twin of
//! `clients/php/tests/fill_worker.php`: writes rows and waits on the node barrier, reads
//! through every configured cache (filling with the protocol's check, or with a plain SET of
//! what was read), and counts reads
//! that return a version older than one this worker already committed and waited for.
//!
//! Usage: `fill-worker '<json spec>'` (the spec's fields: see [`Spec`]); prints one JSON report.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test tool: a failed step is a failed run

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use redis::AsyncCommands;
use rtinval_client::key::{Column, render};
use rtinval_client::{Barrier, Lookup, NodeCache};
use serde_json::{Value, json};
use tokio::sync::Mutex;

/// The worker's settings, from the JSON argument.
struct Spec {
    name: String,
    mysql_url: String,
    node: String,
    caches: Vec<CacheSpec>,
    seconds: u64,
    rows: u64,
    write_rate: f64,
    read_rate: f64,
    writers: usize,
    readers: usize,
    think_ms: u64,
    /// Read the written row again this long after the first read (a user's reload); 0: no.
    reread_ms: u64,
    ttl_ms: u64,
    template: String,
}

#[derive(Clone)]
struct CacheSpec {
    name: String,
    kind: String,
    addr: String,
    prefix: String,
    protocol: bool,
}

/// One cache as this worker reads it.
enum Reader {
    Protocol(NodeCache),
    /// Reads through the client, fills with a plain SET on the raw connection.
    Plain(NodeCache, Raw),
}

enum Raw {
    Redis(redis::aio::ConnectionManager),
    Memcached(rtinval_client::memcached::Memcached),
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    stale: AtomicU64,
    fills: AtomicU64,
    fills_rejected: AtomicU64,
}

struct Shared {
    spec: Spec,
    pool: mysql_async::Pool,
    barrier: Barrier,
    caches: Vec<(CacheSpec, Reader, Counts)>,
    /// Per row, the newest version this worker committed and waited for.
    own: Mutex<BTreeMap<u64, u64>>,
    /// Per row, the GTID of that write (for reports).
    own_gtid: Mutex<BTreeMap<u64, String>>,
    writes: AtomicU64,
    wait_failures: AtomicU64,
    errors: AtomicU64,
    examples: Mutex<Vec<String>>,
    /// Keys read stale, per cache (for comparing with the inspector's findings).
    stale_keys: Mutex<BTreeMap<String, std::collections::BTreeSet<String>>>,
}

fn spec(v: &Value) -> Spec {
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("spec: {k}"))
            .to_owned()
    };
    let n = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("spec: {k}"));
    Spec {
        name: s("name"),
        mysql_url: s("mysql_url"),
        node: s("node"),
        caches: v["caches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| CacheSpec {
                name: c["name"].as_str().unwrap().into(),
                kind: c["kind"].as_str().unwrap().into(),
                addr: c["addr"].as_str().unwrap().into(),
                prefix: c["prefix"].as_str().unwrap().into(),
                protocol: c["protocol"].as_bool().unwrap(),
            })
            .collect(),
        seconds: n("seconds") as u64,
        rows: n("rows") as u64,
        write_rate: n("write_rate"),
        read_rate: n("read_rate"),
        writers: n("writers") as usize,
        readers: n("readers") as usize,
        think_ms: n("think_ms") as u64,
        reread_ms: v["reread_ms"].as_u64().unwrap_or(0),
        ttl_ms: n("ttl_ms") as u64,
        template: s("template"),
    }
}

/// xorshift64*: reproducible enough, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn version_of(payload: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(payload);
    text.rsplit(':')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl Shared {
    fn key(&self, id: u64) -> String {
        render(&self.spec.template, &[("id", Column::Int(id as i64))]).unwrap()
    }

    async fn load(&self, id: u64) -> Result<Vec<u8>, mysql_async::Error> {
        let mut conn = self.pool.get_conn().await?;
        let v: Option<u64> = conn
            .exec_first("SELECT version FROM Object WHERE id = ?", (id,))
            .await?;
        Ok(format!("{id}:{}", v.unwrap_or(0)).into_bytes())
    }

    async fn think(&self, rng: &mut Rng, slow: bool) {
        if slow && self.spec.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(self.spec.think_ms + 1))).await;
        }
    }

    /// Read row `id` through cache `i`; returns the version seen. A `slow` reader thinks
    /// between its source read and its fill.
    async fn read(&self, i: usize, id: u64, rng: &mut Rng, slow: bool) -> Option<u64> {
        let (_, reader, counts) = &self.caches[i];
        let key = self.key(id);
        // What this worker had committed and waited for when the read started: the read must
        // return at least that (a read that began before the wait may return older data).
        let own = self.own.lock().await.get(&id).copied().unwrap_or(0);
        let ttl = Duration::from_millis(self.spec.ttl_ms);
        let payload = match reader {
            Reader::Protocol(cache) => match cache.get(&key).await {
                Ok(Lookup::Hit(v)) => v,
                Ok(Lookup::Miss(token)) => {
                    let v = self.load(id).await.ok()?;
                    self.think(rng, slow).await;
                    match cache.fill(token, &v, ttl).await {
                        Ok(true) => counts.fills.fetch_add(1, Ordering::Relaxed),
                        Ok(false) => counts.fills_rejected.fetch_add(1, Ordering::Relaxed),
                        Err(_) => self.errors.fetch_add(1, Ordering::Relaxed),
                    };
                    v
                }
                Err(_) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
            // Plain fills: the same reads, but the fill is stored without the marker check (a
            // SET), in the protocol's data form so the inspector can judge it too.
            Reader::Plain(cache, raw) => match cache.get(&key).await {
                Ok(Lookup::Hit(v)) => v,
                Ok(Lookup::Miss(token)) => {
                    let v = self.load(id).await.ok()?;
                    self.think(rng, slow).await;
                    let full = format!("{}{key}", self.caches[i].0.prefix);
                    let value = rtinval_client::protocol::data(token.basis(), &v);
                    let stored = match raw {
                        Raw::Redis(conn) => conn
                            .clone()
                            .pset_ex::<_, _, ()>(&full, value, self.spec.ttl_ms)
                            .await
                            .is_ok(),
                        Raw::Memcached(mc) => mc
                            .set(
                                full.as_bytes(),
                                &value,
                                self.spec.ttl_ms.div_ceil(1000) as u32,
                            )
                            .await
                            .is_ok(),
                    };
                    if !stored {
                        self.errors.fetch_add(1, Ordering::Relaxed);
                    }
                    counts.fills.fetch_add(1, Ordering::Relaxed);
                    v
                }
                Err(_) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            },
        };
        let seen = version_of(&payload);
        counts.reads.fetch_add(1, Ordering::Relaxed);
        if seen < own {
            counts.stale.fetch_add(1, Ordering::Relaxed);
            self.stale_keys
                .lock()
                .await
                .entry(self.caches[i].0.name.clone())
                .or_default()
                .insert(key.clone());
            // What the cache holds now: for a fill, the basis says which purge it passed.
            let stored = match &self.caches[i].0 {
                c if c.kind == "redis" => {
                    let client = redis::Client::open(c.addr.as_str()).unwrap();
                    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                    let v: Option<Vec<u8>> = conn.get(format!("{}{key}", c.prefix)).await.unwrap();
                    v.map(|v| String::from_utf8_lossy(&v).replace('\n', " | "))
                }
                c => {
                    let mc = rtinval_client::memcached::Memcached::new(&c.addr);
                    let full = format!("{}{key}", c.prefix);
                    mc.gets(&[full.as_bytes()])
                        .await
                        .unwrap()
                        .pop()
                        .flatten()
                        .map(|i| {
                            format!(
                                "{} (cas {})",
                                String::from_utf8_lossy(&i.value).replace('\n', " | "),
                                i.cas
                            )
                        })
                }
            };
            let gtid = self.own_gtid.lock().await.get(&id).cloned();
            let name = &self.caches[i].0.name;
            let mut ex = self.examples.lock().await;
            if ex
                .iter()
                .filter(|e| e.starts_with(&format!("{name}:")))
                .count()
                < 3
            {
                ex.push(format!(
                    "{}: {key} read version {seen} after this worker committed {own} (gtid {gtid:?}); the cache holds {stored:?}",
                    self.caches[i].0.name
                ));
            }
        }
        Some(seen)
    }

    /// Bump row `id`'s version, wait on the node barrier, remember the version.
    async fn write(&self, conn: &mut mysql_async::Conn, id: u64) -> Result<(), mysql_async::Error> {
        let mut tx = conn
            .start_transaction(mysql_async::TxOpts::default())
            .await?;
        tx.exec_drop(
            "UPDATE Object SET version = version + 1 WHERE id = ?",
            (id,),
        )
        .await?;
        let v: Option<u64> = tx
            .exec_first("SELECT version FROM Object WHERE id = ?", (id,))
            .await?;
        tx.commit().await?;
        let gtid: Option<String> = conn.query_first("SELECT @@last_gtid").await?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        let gtid = gtid.unwrap_or_default();
        match self.barrier.wait(&gtid, Duration::from_secs(10)).await {
            Ok(()) => {
                self.own_gtid.lock().await.insert(id, gtid);
                let mut own = self.own.lock().await;
                let e = own.entry(id).or_insert(0);
                *e = (*e).max(v.unwrap_or(0));
            }
            Err(e) => {
                self.wait_failures.fetch_add(1, Ordering::Relaxed);
                let mut ex = self.examples.lock().await;
                if ex.len() < 5 {
                    ex.push(format!("wait: {e}"));
                }
            }
        }
        Ok(())
    }
}

fn pace(rate_per_task: f64) -> tokio::time::Interval {
    let mut i = tokio::time::interval(Duration::from_secs_f64(1.0 / rate_per_task.max(0.001)));
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    i
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = std::env::args()
        .nth(1)
        .expect("usage: fill-worker '<json spec>'");
    let spec = spec(&serde_json::from_str(&arg).expect("spec is JSON"));
    let mut caches = Vec::new();
    for c in &spec.caches {
        let reader = match (c.kind.as_str(), c.protocol) {
            ("redis", true) => {
                Reader::Protocol(NodeCache::redis(&c.addr, &c.prefix).await.unwrap())
            }
            ("memcached", true) => Reader::Protocol(NodeCache::memcached(&c.addr, &c.prefix)),
            ("redis", false) => Reader::Plain(
                NodeCache::redis(&c.addr, &c.prefix).await.unwrap(),
                Raw::Redis(
                    redis::aio::ConnectionManager::new(
                        redis::Client::open(c.addr.as_str()).unwrap(),
                    )
                    .await
                    .unwrap(),
                ),
            ),
            _ => Reader::Plain(
                NodeCache::memcached(&c.addr, &c.prefix),
                Raw::Memcached(rtinval_client::memcached::Memcached::new(&c.addr)),
            ),
        };
        caches.push((c.clone(), reader, Counts::default()));
    }
    let pool = mysql_async::Pool::new(spec.mysql_url.as_str());
    let shared = Arc::new(Shared {
        barrier: Barrier::new(&spec.node),
        pool,
        caches,
        own: Mutex::default(),
        own_gtid: Mutex::default(),
        writes: AtomicU64::new(0),
        wait_failures: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        examples: Mutex::default(),
        stale_keys: Mutex::default(),
        spec,
    });
    let deadline = Instant::now() + Duration::from_secs(shared.spec.seconds);
    let seed = u64::from(std::process::id()) << 20;
    let mut tasks = Vec::new();
    for w in 0..shared.spec.writers {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ ((w as u64 + 1) * 0x9e37_79b9));
            let mut conn = s.pool.get_conn().await.unwrap();
            let mut tick = pace(s.spec.write_rate / s.spec.writers as f64);
            while Instant::now() < deadline {
                tick.tick().await;
                let id = rng.below(s.spec.rows) + 1;
                if s.write(&mut conn, id).await.is_err() {
                    s.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Read-your-writes: the row just written, through every cache, at once (the
                // background readers are the slow ones).
                for i in 0..s.caches.len() {
                    s.read(i, id, &mut rng, false).await;
                }
                // And again a moment later, as a user reloading the page would.
                if s.spec.reread_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(s.spec.reread_ms)).await;
                    for i in 0..s.caches.len() {
                        s.read(i, id, &mut rng, false).await;
                    }
                }
            }
        }));
    }
    for r in 0..shared.spec.readers {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ ((r as u64 + 1001) * 0x85eb_ca6b));
            let mut tick = pace(s.spec.read_rate / s.spec.readers as f64);
            let mut n = r;
            while Instant::now() < deadline {
                tick.tick().await;
                let id = rng.below(s.spec.rows) + 1;
                n += 1;
                s.read(n % s.caches.len(), id, &mut rng, true).await;
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    let per = |f: fn(&Counts) -> &AtomicU64| -> Value {
        shared
            .caches
            .iter()
            .map(|(c, _, n)| (c.name.clone(), json!(f(n).load(Ordering::Relaxed))))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let report = json!({
        "worker": shared.spec.name,
        "seconds": secs,
        "writes": shared.writes.load(Ordering::Relaxed),
        "wait_failures": shared.wait_failures.load(Ordering::Relaxed),
        "errors": shared.errors.load(Ordering::Relaxed),
        "reads": per(|c| &c.reads),
        "stale": per(|c| &c.stale),
        "fills": per(|c| &c.fills),
        "fills_rejected": per(|c| &c.fills_rejected),
        "examples": *shared.examples.lock().await,
        "stale_keys": *shared.stale_keys.lock().await,
    });
    println!("{report}");
}
