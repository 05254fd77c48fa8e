//! Cache identity: noticing that a cache server's content went back in time behind the node's
//! back, and treating that cache as resynced before anything more is applied to it.
//!
//! A Redis restarted from its RDB or AOF file, a replica promoted in place of the primary this
//! node purged, a memcached warm restart (`-e`): each may hold entries the node already purged,
//! and every purge since the snapshot is lost for this node. The server's identity tells:
//! - Redis: `run_id` (new on every start) from `INFO server`, with the `role` and `master_replid`
//!   from `INFO replication` (a promotion or a full resync from another primary changes those);
//! - memcached: `pid` and `uptime` from `stats` (a new process, or an uptime that went back).
//!
//! [`Watch::settle`] compares what a check saw with what the node knew. On a change it flushes
//! the cache (as configured: by prefix, `FLUSHDB`, `flush_all`) while holding the watch's lock,
//! so every other operation on that cache waits until the flush is done, and `/readyz` names
//! the cache meanwhile. Then it counts `rtinval_consumer_resyncs_total{reason="cache_restarted"}`.
//! The same identity after an outage needs no flush: the failed purges are simply retried.
//!
//! When checks run: on every new connection (Redis: the `CLIENT ID` pipelined with each purge
//! changes; memcached: the client reconnects) and every `identity_check_ms` while idle.

use std::collections::HashMap;
use std::future::Future;
use std::hash::BuildHasher;

use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::error::CacheError;
use crate::metrics::Metrics;

/// Who a cache server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Redis {
        run_id: String,
        role: String,
        replid: String,
    },
    Memcached {
        pid: u64,
        uptime: u64,
    },
}

impl Identity {
    /// From the text of `INFO server replication`.
    pub fn from_redis_info(info: &str) -> Option<Identity> {
        let field = |name: &str| {
            info.lines().find_map(|l| {
                l.trim_end()
                    .strip_prefix(name)
                    .and_then(|r| r.strip_prefix(':'))
                    .map(str::to_owned)
            })
        };
        Some(Identity::Redis {
            run_id: field("run_id")?,
            role: field("role").unwrap_or_default(),
            replid: field("master_replid").unwrap_or_default(),
        })
    }

    /// From the entries of memcached's `stats`.
    pub fn from_memcached_stats<S: BuildHasher>(
        stats: &HashMap<String, String, S>,
    ) -> Option<Identity> {
        let num = |k: &str| stats.get(k).and_then(|v| v.trim().parse::<u64>().ok());
        Some(Identity::Memcached {
            pid: num("pid")?,
            uptime: num("uptime")?,
        })
    }

    /// Why the server seen now (`self`) is not the one seen `before`, or `None` if it is.
    pub fn changed_since(&self, before: &Identity) -> Option<String> {
        match (before, self) {
            (
                Identity::Redis {
                    run_id: r0,
                    role: o0,
                    replid: i0,
                },
                Identity::Redis {
                    run_id: r1,
                    role: o1,
                    replid: i1,
                },
            ) => {
                if r0 != r1 {
                    Some(format!("run_id changed from {r0} to {r1} (restarted)"))
                } else if o0 != o1 {
                    Some(format!("role changed from {o0} to {o1}"))
                } else if i0 != i1 {
                    Some(format!("replication id changed from {i0} to {i1}"))
                } else {
                    None
                }
            }
            (
                Identity::Memcached {
                    pid: p0,
                    uptime: u0,
                },
                Identity::Memcached {
                    pid: p1,
                    uptime: u1,
                },
            ) => {
                if p0 != p1 {
                    Some(format!("pid changed from {p0} to {p1} (restarted)"))
                } else if u1 < u0 {
                    Some(format!(
                        "uptime went back from {u0} s to {u1} s (restarted)"
                    ))
                } else {
                    None
                }
            }
            _ => Some("the server kind changed".into()),
        }
    }
}

/// What a node knows of one cache server's identity.
#[derive(Debug)]
pub struct Watch {
    cache: String,
    known: Mutex<Option<Identity>>,
    metrics: Metrics,
}

impl Watch {
    pub fn new(cache: &str, metrics: &Metrics) -> Watch {
        Watch {
            cache: cache.to_owned(),
            known: Mutex::new(None),
            metrics: metrics.clone(),
        }
    }

    /// Record that the server is `seen`. If that is not the server known so far, `flush` the
    /// cache first — holding the lock, so other operations that check wait for it — and only
    /// then take `seen` as known. A failed flush leaves the old identity, so the next check
    /// flushes again. The first identity seen is taken as is.
    pub async fn settle<F, Fut>(&self, seen: Identity, flush: F) -> Result<(), CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), CacheError>>,
    {
        let mut known = self.known.lock().await;
        let Some(before) = known.as_ref() else {
            *known = Some(seen);
            return Ok(());
        };
        let Some(why) = seen.changed_since(before) else {
            *known = Some(seen);
            return Ok(());
        };
        let cache = self.cache.as_str();
        if self.metrics.set_cache_restarted(cache, Some(&why)) {
            warn!(%cache, reason = %why, "Cache server restarted or replaced: its content may be older than this node's purges; flushing the cache before applying more to it.");
        }
        flush().await?;
        *known = Some(seen);
        self.metrics.set_cache_restarted(cache, None);
        self.metrics.resync("cache_restarted");
        self.metrics.cache_flushed(cache);
        info!(%cache, "Cache flushed after its server restarted; applying again.");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\nrun_id:aaa111\r\ntcp_port:6379\r\n\r\n\
        # Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_replid:r1\r\nmaster_replid2:0000\r\n";

    #[test]
    fn redis_identity_from_info() {
        let id = Identity::from_redis_info(INFO).unwrap();
        assert_eq!(
            id,
            Identity::Redis {
                run_id: "aaa111".into(),
                role: "master".into(),
                replid: "r1".into()
            }
        );
        assert!(Identity::from_redis_info("# Server\r\nredis_version:7\r\n").is_none());
        let restarted = Identity::from_redis_info(&INFO.replace("aaa111", "bbb222")).unwrap();
        assert!(restarted.changed_since(&id).unwrap().contains("run_id"));
        let promoted = Identity::from_redis_info(&INFO.replace(":r1", ":r2")).unwrap();
        assert!(
            promoted
                .changed_since(&id)
                .unwrap()
                .contains("replication id")
        );
        let demoted =
            Identity::from_redis_info(&INFO.replace("role:master", "role:slave")).unwrap();
        assert!(demoted.changed_since(&id).unwrap().contains("role"));
        assert_eq!(id.changed_since(&id), None);
    }

    #[test]
    fn memcached_identity_from_stats() {
        let stats = |pid: &str, uptime: &str| {
            HashMap::from([
                ("pid".to_owned(), pid.to_owned()),
                ("uptime".to_owned(), uptime.to_owned()),
                ("version".to_owned(), "1.6.18".to_owned()),
            ])
        };
        let first = Identity::from_memcached_stats(&stats("42", "100")).unwrap();
        let later = Identity::from_memcached_stats(&stats("42", "160")).unwrap();
        assert_eq!(
            later.changed_since(&first),
            None,
            "time passing is no restart"
        );
        let new_pid = Identity::from_memcached_stats(&stats("43", "1")).unwrap();
        assert!(new_pid.changed_since(&first).unwrap().contains("pid"));
        let back = Identity::from_memcached_stats(&stats("42", "3")).unwrap();
        assert!(back.changed_since(&later).unwrap().contains("uptime"));
        assert!(Identity::from_memcached_stats(&stats("x", "1")).is_none());
    }

    #[tokio::test]
    async fn a_changed_identity_flushes_once_before_it_is_known_and_a_failed_flush_repeats() {
        let metrics = Metrics::new();
        let watch = Watch::new("rt", &metrics);
        let flushes = std::sync::atomic::AtomicUsize::new(0);
        let flush = |ok: bool| {
            let flushes = &flushes;
            move || async move {
                flushes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if ok {
                    Ok(())
                } else {
                    Err(CacheError {
                        cache: "rt".into(),
                        url: "redis://x".into(),
                        error: "down".into(),
                    })
                }
            }
        };
        let id = |run: &str| Identity::Redis {
            run_id: run.into(),
            role: "master".into(),
            replid: "r".into(),
        };
        let count = || flushes.load(std::sync::atomic::Ordering::SeqCst);
        watch.settle(id("a"), flush(true)).await.unwrap();
        watch.settle(id("a"), flush(true)).await.unwrap();
        assert_eq!(count(), 0, "first sight and the same server: no flush");
        assert!(metrics.not_ready_reason_for_caches().is_none());

        assert!(watch.settle(id("b"), flush(false)).await.is_err());
        assert_eq!(count(), 1);
        assert!(
            metrics
                .not_ready_reason_for_caches()
                .unwrap()
                .contains("run_id changed"),
            "not ready while the restarted cache is not flushed"
        );
        watch.settle(id("b"), flush(true)).await.unwrap();
        assert_eq!(count(), 2, "the failed flush is repeated");
        watch.settle(id("b"), flush(true)).await.unwrap();
        assert_eq!(count(), 2);
        assert!(metrics.not_ready_reason_for_caches().is_none());
        assert!(
            metrics
                .encode()
                .contains("rtinval_consumer_resyncs_total{reason=\"cache_restarted\"} 1")
        );
    }
}
