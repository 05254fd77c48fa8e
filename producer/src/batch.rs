//! Transaction batcher (pure): collects the intents of one source transaction and turns them
//! into events at its commit — one `pool_reset` per pool, deduplicated keys per cache, and a
//! `cache_flush` instead of keys once a cache collects more than `max_keys` distinct keys.
//!
//! Memory is bounded by `max_keys` keys per cache plus one entry per pool and table, however
//! many rows the transaction changes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use rtinval_schemas::{Event, EventBody, Op, SCHEMA_VERSION, Source, TableChange, event_id};

use crate::rules::Intent;

/// Identity of a commit: where it ends in the binlog and when it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub server_id: u32,
    pub gtid: Option<String>,
    pub file: String,
    /// Position just after the commit event: the resume position.
    pub pos: u64,
    /// Unix ms.
    pub committed_at: u64,
}

impl Commit {
    /// The `source` block of events from this commit.
    pub fn source(&self, tables: Vec<TableChange>) -> Source {
        Source {
            server_id: self.server_id,
            gtid: self.gtid.clone(),
            file: self.file.clone(),
            pos: self.pos,
            tables,
            committed_at: self.committed_at,
        }
    }
}

#[derive(Debug)]
enum CacheState {
    /// Distinct keys (hashed while collecting; sorted once, at the commit).
    Keys(HashSet<String>),
    Flush(&'static str),
}

/// Per-transaction accumulator.
#[derive(Debug)]
pub struct Batcher {
    max_keys: usize,
    keys_per_event: usize,
    pools: BTreeSet<Arc<str>>,
    caches: BTreeMap<Arc<str>, CacheState>,
    tables: BTreeMap<Arc<str>, BTreeSet<Op>>,
}

impl Batcher {
    pub fn new(max_keys: usize, keys_per_event: usize) -> Batcher {
        Batcher {
            max_keys,
            keys_per_event: keys_per_event.max(1),
            pools: BTreeSet::new(),
            caches: BTreeMap::new(),
            tables: BTreeMap::new(),
        }
    }

    /// Record that a watched table saw an operation in this transaction.
    pub fn touch(&mut self, table: &Arc<str>, op: Op) {
        if let Some(ops) = self.tables.get_mut(table) {
            ops.insert(op);
        } else {
            self.tables.insert(table.clone(), BTreeSet::from([op]));
        }
    }

    /// Add one intent.
    pub fn add(&mut self, intent: Intent) {
        match intent {
            Intent::ResetPool(p) => {
                self.pools.insert(p);
            }
            Intent::FlushCache { cache, reason } => {
                self.caches.insert(cache, CacheState::Flush(reason));
            }
            Intent::PurgeKey { cache, key } => {
                let state = self
                    .caches
                    .entry(cache)
                    .or_insert_with(|| CacheState::Keys(HashSet::new()));
                if let CacheState::Keys(keys) = state {
                    keys.insert(key);
                    if keys.len() > self.max_keys {
                        *state = CacheState::Flush("too_many_keys");
                    }
                }
            }
        }
    }

    /// True when the transaction already flushes `cache` (its keys no longer matter).
    pub fn is_flushed(&self, cache: &str) -> bool {
        matches!(self.caches.get(cache), Some(CacheState::Flush(_)))
    }

    /// True when the transaction so far asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.pools.is_empty() && self.caches.is_empty()
    }

    /// Why each cache the transaction flushes is flushed (for metrics): `too_many_keys`,
    /// `key_underivable`, `cascade_underivable`.
    pub fn flush_reasons(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.caches.values().filter_map(|s| match s {
            CacheState::Flush(reason) => Some(*reason),
            CacheState::Keys(_) => None,
        })
    }

    /// Forget the current transaction (rollback, or a reconnect mid-transaction).
    pub fn clear(&mut self) {
        self.pools.clear();
        self.caches.clear();
        self.tables.clear();
    }

    /// The events of the transaction that ends with `commit`; resets the batcher.
    /// Ids are `event_id(commit, seq)` with `seq` in this deterministic order: pools by name,
    /// then caches by name (keys sorted, chunked).
    pub fn finish(&mut self, commit: &Commit, emitted_at: u64) -> Vec<Event> {
        let tables: Vec<TableChange> = std::mem::take(&mut self.tables)
            .into_iter()
            .map(|(table, ops)| TableChange {
                table: table.to_string(),
                ops: ops.into_iter().collect(),
            })
            .collect();
        let mut bodies = Vec::new();
        for pool in std::mem::take(&mut self.pools) {
            bodies.push(EventBody::PoolReset {
                pools: vec![pool.to_string()],
            });
        }
        for (cache, state) in std::mem::take(&mut self.caches) {
            match state {
                CacheState::Flush(reason) => bodies.push(EventBody::CacheFlush {
                    cache: cache.to_string(),
                    reason: reason.to_owned(),
                }),
                CacheState::Keys(keys) => {
                    let mut keys: Vec<String> = keys.into_iter().collect();
                    keys.sort_unstable();
                    let mut keys = keys.into_iter();
                    loop {
                        let chunk: Vec<String> = keys.by_ref().take(self.keys_per_event).collect();
                        if chunk.is_empty() {
                            break;
                        }
                        bodies.push(EventBody::CacheKeys {
                            cache: cache.to_string(),
                            keys: chunk,
                        });
                    }
                }
            }
        }
        let source = commit.source(tables);
        bodies
            .into_iter()
            .enumerate()
            .map(|(seq, body)| Event {
                schema_version: SCHEMA_VERSION,
                id: event_id(commit.server_id, &commit.file, commit.pos, seq),
                source: source.clone(),
                emitted_at,
                body,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit() -> Commit {
        Commit {
            server_id: 1,
            gtid: Some("0-1-9".into()),
            file: "b.000001".into(),
            pos: 900,
            committed_at: 5000,
        }
    }

    fn purge(k: &str) -> Intent {
        Intent::PurgeKey {
            cache: "rt".into(),
            key: k.into(),
        }
    }

    #[test]
    fn one_reset_per_pool_and_deduplicated_keys() {
        let mut b = Batcher::new(100, 500);
        let table: Arc<str> = "rt.Object".into();
        for i in 0..500 {
            b.touch(&table, Op::Update);
            b.add(Intent::ResetPool("rtapi".into()));
            b.add(purge(&format!("object:{}", i % 10)));
        }
        let events = b.finish(&commit(), 1);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0].body,
            EventBody::PoolReset {
                pools: vec!["rtapi".into()]
            }
        );
        match &events[1].body {
            EventBody::CacheKeys { cache, keys } => {
                assert_eq!(cache, "rt");
                assert_eq!(keys.len(), 10);
                assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events[0].id, "1:b.000001:900:0");
        assert_eq!(events[1].id, "1:b.000001:900:1");
        assert_eq!(events[1].source.tables[0].table, "rt.Object");
        assert!(b.is_empty(), "finish resets");
    }

    #[test]
    fn too_many_keys_escalates_to_a_flush_and_stays_bounded() {
        let mut b = Batcher::new(3, 500);
        for i in 0..1000 {
            b.add(purge(&format!("k{i}")));
        }
        assert_eq!(b.flush_reasons().collect::<Vec<_>>(), vec!["too_many_keys"]);
        let events = b.finish(&commit(), 1);
        assert_eq!(
            events.iter().map(|e| e.body.clone()).collect::<Vec<_>>(),
            vec![EventBody::CacheFlush {
                cache: "rt".into(),
                reason: "too_many_keys".into()
            }]
        );
    }

    #[test]
    fn keys_are_chunked_with_stable_ids() {
        let mut b = Batcher::new(100, 4);
        for i in 0..10 {
            b.add(purge(&format!("k{i:02}")));
        }
        let events = b.finish(&commit(), 1);
        let sizes: Vec<usize> = events
            .iter()
            .map(|e| match &e.body {
                EventBody::CacheKeys { keys, .. } => keys.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            ids,
            vec!["1:b.000001:900:0", "1:b.000001:900:1", "1:b.000001:900:2"]
        );
    }

    #[test]
    fn a_flush_wins_over_keys_of_the_same_cache() {
        let mut b = Batcher::new(100, 10);
        b.add(purge("a"));
        b.add(Intent::FlushCache {
            cache: "rt".into(),
            reason: "key_underivable",
        });
        b.add(purge("b"));
        let events = b.finish(&commit(), 1);
        assert_eq!(events.len(), 1);
        assert!(
            matches!(&events[0].body, EventBody::CacheFlush { reason, .. } if reason == "key_underivable")
        );
    }
}
