//! Plan stage (pure): an event → the actions this node takes. Names the node does not have
//! (a pool or cache that lives on other nodes) become [`Action::NotHere`] so they are counted,
//! not silently dropped.

use std::collections::BTreeSet;

use rtinval_schemas::{Event, EventBody};

/// One thing to do on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Gracefully reload a pool (debounced).
    ReloadPool(String),
    /// Delete these keys (without the node's prefix) from a cache; `position` is the purging
    /// transaction's source position (its GTID, else `file:pos`), which a fill-protocol cache
    /// keeps in the tombstone.
    PurgeKeys {
        cache: String,
        keys: Vec<String>,
        position: String,
    },
    /// Delete every key of a cache.
    FlushCache(String),
    /// Record how fresh the source view is (heartbeat).
    Freshness { source_time_ms: u64 },
    /// The event names a pool or cache this node does not have.
    NotHere { name: String },
}

/// What this node has.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub pools: BTreeSet<String>,
    pub caches: BTreeSet<String>,
}

impl Inventory {
    /// Everything, as a local resync needs it: reload every pool, flush every cache.
    pub fn resync(&self) -> Vec<Action> {
        self.pools
            .iter()
            .map(|p| Action::ReloadPool(p.clone()))
            .chain(self.caches.iter().map(|c| Action::FlushCache(c.clone())))
            .collect()
    }
}

/// A source position in the form writers wait for: the GTID, else `file:pos`.
pub fn position(source: &rtinval_schemas::Source) -> String {
    match &source.gtid {
        Some(g) if !g.is_empty() => g.clone(),
        _ => format!("{}:{}", source.file, source.pos),
    }
}

/// The actions for one event.
pub fn actions(event: &Event, node: &Inventory) -> Vec<Action> {
    match &event.body {
        EventBody::PoolReset { pools } => pools
            .iter()
            .map(|p| {
                if node.pools.contains(p) {
                    Action::ReloadPool(p.clone())
                } else {
                    Action::NotHere { name: p.clone() }
                }
            })
            .collect(),
        EventBody::CacheKeys { cache, keys } => {
            if !node.caches.contains(cache) {
                vec![Action::NotHere {
                    name: cache.clone(),
                }]
            } else if keys.is_empty() {
                vec![]
            } else {
                vec![Action::PurgeKeys {
                    cache: cache.clone(),
                    keys: keys.clone(),
                    position: position(&event.source),
                }]
            }
        }
        EventBody::CacheFlush { cache, .. } => {
            if node.caches.contains(cache) {
                vec![Action::FlushCache(cache.clone())]
            } else {
                vec![Action::NotHere {
                    name: cache.clone(),
                }]
            }
        }
        EventBody::Resync { .. } => node.resync(),
        EventBody::Heartbeat { source_time } => vec![Action::Freshness {
            source_time_ms: *source_time,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtinval_schemas::{SCHEMA_VERSION, Source};

    fn ev(body: EventBody) -> Event {
        Event {
            schema_version: SCHEMA_VERSION,
            id: "1:f:1:0".into(),
            source: Source::default(),
            emitted_at: 0,
            body,
        }
    }

    fn node() -> Inventory {
        Inventory {
            pools: ["rtapi".to_string(), "invapi".to_string()].into(),
            caches: ["rt".to_string()].into(),
        }
    }

    #[test]
    fn events_map_to_actions_on_this_node() {
        let n = node();
        assert_eq!(
            actions(
                &ev(EventBody::PoolReset {
                    pools: vec!["rtapi".into(), "other".into()]
                }),
                &n
            ),
            vec![
                Action::ReloadPool("rtapi".into()),
                Action::NotHere {
                    name: "other".into()
                }
            ]
        );
        assert_eq!(
            actions(
                &ev(EventBody::CacheKeys {
                    cache: "rt".into(),
                    keys: vec!["object:1".into()]
                }),
                &n
            ),
            vec![Action::PurgeKeys {
                cache: "rt".into(),
                keys: vec!["object:1".into()],
                position: ":0".into()
            }]
        );
        assert_eq!(
            actions(
                &ev(EventBody::CacheFlush {
                    cache: "rt".into(),
                    reason: "x".into()
                }),
                &n
            ),
            vec![Action::FlushCache("rt".into())]
        );
        assert_eq!(
            actions(&ev(EventBody::Heartbeat { source_time: 5 }), &n),
            vec![Action::Freshness { source_time_ms: 5 }]
        );
    }

    #[test]
    fn resync_reloads_every_pool_and_flushes_every_cache() {
        let got = actions(
            &ev(EventBody::Resync {
                reason: "position_lost".into(),
            }),
            &node(),
        );
        assert_eq!(
            got,
            vec![
                Action::ReloadPool("invapi".into()),
                Action::ReloadPool("rtapi".into()),
                Action::FlushCache("rt".into()),
            ]
        );
    }

    #[test]
    fn a_purge_carries_the_gtid_else_the_file_position() {
        let mut source = Source {
            gtid: Some("0-1-17".into()),
            file: "bin.000002".into(),
            pos: 400,
            ..Source::default()
        };
        assert_eq!(position(&source), "0-1-17");
        source.gtid = None;
        assert_eq!(position(&source), "bin.000002:400");
    }
}
