//! What the producer published for one transaction of a RackTables database, read back from
//! the broker: its keys, flushes and pool resets ([`published_by`]).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;

use crate::{TestDb, read_events, unique};

/// What the producer published for one transaction.
#[derive(Debug, Default)]
pub struct Published {
    /// (cache, key)
    pub keys: BTreeSet<(String, String)>,
    /// (cache, reason)
    pub flushed: BTreeSet<(String, String)>,
    pub pools: BTreeSet<String>,
}

impl Published {
    pub fn has_key(&self, cache: &str, key: &str) -> bool {
        self.keys.contains(&(cache.to_owned(), key.to_owned()))
    }

    pub fn flushed(&self, cache: &str) -> bool {
        self.flushed.iter().any(|(c, _)| c == cache)
    }

    /// The key is purged, or its whole cache flushed.
    pub fn covers(&self, cache: &str, key: &str) -> bool {
        self.has_key(cache, key) || self.flushed(cache)
    }
}

/// Run `sql` (one transaction) and return what the producer published for it. A sentinel
/// transaction that publishes on both topics follows it; once the sentinel is on both topics,
/// everything of `sql`'s transaction is too (one partition each, published in binlog order).
pub async fn published_by(db: &TestDb, prefix: &str, sql: &str) -> Published {
    let gtid = db.exec_gtid(sql).await;
    assert!(!gtid.is_empty(), "{sql}: no transaction written");
    let sentinel = db
        .exec_gtid(&format!(
            "INSERT INTO Object (name, objtype_id) VALUES ('{}', 4)",
            unique("sentinel")
        ))
        .await;
    let topics = [
        format!("{prefix}.cache-keys"),
        format!("{prefix}.pool-reset"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut events = Vec::new();
        for t in &topics {
            events.push(read_events(t).await);
        }
        let of = |g: &str, evs: &Vec<rtinval_schemas::Event>| {
            evs.iter().any(|e| e.source.gtid.as_deref() == Some(g))
        };
        if events.iter().all(|evs| of(&sentinel, evs)) {
            let mut out = Published::default();
            for e in events.into_iter().flatten() {
                if e.source.gtid.as_deref() != Some(gtid.as_str()) {
                    continue;
                }
                match e.body {
                    EventBody::CacheKeys { cache, keys } => {
                        out.keys
                            .extend(keys.into_iter().map(|k| (cache.clone(), k)));
                    }
                    EventBody::CacheFlush { cache, reason } => {
                        out.flushed.insert((cache, reason));
                    }
                    EventBody::PoolReset { pools } => out.pools.extend(pools),
                    _ => {}
                }
            }
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "the sentinel after {sql:?} was not published on both topics within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
