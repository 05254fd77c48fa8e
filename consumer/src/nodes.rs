//! The node registry: every consumer names its group in the compacted topic `<prefix>.nodes`
//! (key: the group id; value: a [`NodeRecord`]) when it starts and every [`REFRESH`] after,
//! so that `wait --all-nodes --group-prefix P` knows which groups to wait for on any
//! Kafka-protocol broker, also where the broker cannot list consumer groups (ListGroups;
//! tansu lacks it). A cluster wait takes every group registered within [`TTL`]: a node that is
//! stopped, or paused, for longer (or decommissioned) is no longer waited for; `--group` names
//! groups to wait for regardless. `rtinval-consumer deregister` removes a node that left
//! service (a tombstone under its group), so waits stop counting it at once.
//!
//! The registry is advisory: a node that cannot write to it logs a warning and applies events
//! as ever; only cluster waits by prefix miss it (and name the groups they found).

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::replay::reader_config;

/// How often a node renews its registration.
pub const REFRESH: Duration = Duration::from_secs(60);
/// How long a registration counts for a cluster wait after the node last renewed it.
pub const TTL: Duration = Duration::from_secs(600);

const TIMEOUT: Duration = Duration::from_secs(10);

/// What a node writes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's consumer group (the record's key too).
    pub group: String,
    /// The host it runs on.
    pub host: String,
    /// The consumer's version.
    pub version: String,
    /// Unix ms of this registration.
    pub seen_at_ms: u64,
}

/// The registry topic of `config`.
fn topic(config: &Config) -> String {
    rtinval_schemas::topics::name(&config.kafka.topic_prefix, rtinval_schemas::topics::NODES)
}

/// Register this node now and every [`REFRESH`] until `shutdown`, creating the topic if it is
/// missing (compacted, one partition). Failures are logged once per outage, never fatal. The
/// Kafka clients live only for each registration: kept, their threads would cost an idle node
/// a megabyte and a steady share of CPU for one record a minute.
pub fn spawn(config: &Config, shutdown: CancellationToken) {
    let topic = topic(config);
    let group = config.group_id();
    let client = writer_config(config);
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    tokio::spawn(async move {
        let mut failing = false;
        let mut created = false;
        loop {
            let record = NodeRecord {
                group: group.clone(),
                host: host.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                seen_at_ms: rtinval_schemas::runtime::now_ms(),
            };
            let sent = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = register(&client, &topic, &record, !created) => r,
            };
            match sent {
                Ok(()) => {
                    created = true;
                    if failing {
                        failing = false;
                        info!(%topic, %group, "Node registry: registered again.");
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    warn!(%topic, %group, error = %e, "Node registry: cannot register this node; cluster waits by --group-prefix will not see it until it can (retrying).");
                }
                Err(_) => {}
            }
            let wait = if failing {
                Duration::from_secs(5)
            } else {
                REFRESH
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

/// Write `record` to `topic` with a producer of its own (created and dropped here), creating
/// the topic first if `create`.
async fn register(
    client: &rdkafka::ClientConfig,
    topic: &str,
    record: &NodeRecord,
    create: bool,
) -> Result<(), String> {
    use rdkafka::admin::{NewTopic, TopicReplication};
    if create {
        // Replication as the broker's default; a failure shows as the send's below.
        let new =
            NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
        let _ = rtinval_schemas::kafka::create_topic(client, &new, TIMEOUT).await;
    }
    let payload = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    send(client, topic, &record.group, Some(&payload)).await
}

/// The librdkafka settings the registry's writers are created from.
fn writer_config(config: &Config) -> rdkafka::ClientConfig {
    rtinval_schemas::kafka::client_config(&config.kafka.brokers, &config.kafka.options, &[])
}

/// Send one record with a producer of its own (created and dropped here).
async fn send(
    config: &rdkafka::ClientConfig,
    topic: &str,
    key: &str,
    payload: Option<&[u8]>,
) -> Result<(), String> {
    let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
    let mut record = FutureRecord::<str, [u8]>::to(topic).key(key);
    if let Some(p) = payload {
        record = record.payload(p);
    }
    producer
        .send(record, TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|(e, _)| e.to_string())
}

/// Remove `group` from the registry (a tombstone under its key): cluster waits by prefix stop
/// waiting for it at once, not [`TTL`] after its last registration. For a node taken out of
/// service after its consumer stopped; a consumer that starts again registers again.
pub async fn deregister(config: &Config, group: &str) -> Result<(), String> {
    let topic = topic(config);
    send(&writer_config(config), &topic, group, None)
        .await
        .map_err(|e| format!("{topic}: {e}"))
}

/// The groups registered within [`TTL`] of `now_ms` whose names start with `prefix`, sorted.
/// An empty or missing registry is an empty list.
pub fn registered(config: &Config, prefix: &str, now_ms: u64) -> Result<Vec<String>, String> {
    let topic = topic(config);
    let reader: BaseConsumer =
        reader_config(config, &format!("rtinval-nodes-{}", std::process::id()))
            .create()
            .map_err(|e| format!("Kafka client for {}: {e}", config.kafka.brokers))?;
    let md = reader
        .fetch_metadata(Some(&topic), TIMEOUT)
        .map_err(|e| format!("{topic}: {e}"))?;
    if !md
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
    {
        return Ok(Vec::new());
    }
    let (low, high) = reader
        .fetch_watermarks(&topic, 0, TIMEOUT)
        .map_err(|e| format!("{topic}: {e}"))?;
    let mut latest = std::collections::BTreeMap::new();
    rtinval_schemas::kafka::read_partition(&reader, &topic, 0, (low, high), TIMEOUT, |m| {
        fold(&mut latest, m.key(), m.payload());
    })
    .map_err(|e| format!("reading {topic}: {e}"))?;
    Ok(live(&latest, prefix, now_ms))
}

/// Take one registry record into `latest` (group → last registration): a registration sets
/// its group's time, a tombstone (no payload) removes the group of its key; a record that does
/// not parse (another writer) names nothing.
fn fold(
    latest: &mut std::collections::BTreeMap<String, u64>,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
) {
    match payload {
        None => {
            if let Some(group) = key.and_then(|k| std::str::from_utf8(k).ok()) {
                latest.remove(group);
            }
        }
        Some(p) => {
            if let Ok(r) = serde_json::from_slice::<NodeRecord>(p) {
                latest.insert(r.group, r.seen_at_ms);
            }
        }
    }
}

/// The groups of `latest` (group → last registration) that start with `prefix` and registered
/// within [`TTL`] of `now_ms`.
fn live(
    latest: &std::collections::BTreeMap<String, u64>,
    prefix: &str,
    now_ms: u64,
) -> Vec<String> {
    let ttl = TTL.as_millis() as u64;
    latest
        .iter()
        .filter(|(g, seen)| g.starts_with(prefix) && now_ms.saturating_sub(**seen) <= ttl)
        .map(|(g, _)| g.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_wait_takes_the_prefix_s_groups_registered_within_the_ttl() {
        let now = 10_000_000;
        let ttl = TTL.as_millis() as u64;
        let latest: std::collections::BTreeMap<String, u64> = [
            ("rt-node-a", now - 1_000),
            ("rt-node-b", now - ttl),
            ("rt-node-gone", now - ttl - 1),
            ("other-node", now),
        ]
        .into_iter()
        .map(|(g, t)| (g.to_owned(), t))
        .collect();
        assert_eq!(live(&latest, "rt-node-", now), ["rt-node-a", "rt-node-b"]);
        assert_eq!(live(&latest, "", now).len(), 3);
    }

    #[test]
    fn a_tombstone_removes_its_group_and_a_later_registration_brings_it_back() {
        let record = |group: &str, seen_at_ms| {
            serde_json::to_vec(&NodeRecord {
                group: group.to_owned(),
                host: "h".to_owned(),
                version: "v".to_owned(),
                seen_at_ms,
            })
            .unwrap()
        };
        let mut latest = std::collections::BTreeMap::new();
        fold(&mut latest, Some(b"rt-a"), Some(&record("rt-a", 1)));
        fold(&mut latest, Some(b"rt-b"), Some(&record("rt-b", 2)));
        fold(&mut latest, Some(b"rt-a"), Some(&record("rt-a", 3)));
        fold(&mut latest, Some(b"rt-c"), Some(b"not json"));
        assert_eq!(latest.get("rt-a"), Some(&3));
        assert_eq!(latest.len(), 2);
        fold(&mut latest, Some(b"rt-b"), None);
        assert_eq!(latest.keys().collect::<Vec<_>>(), ["rt-a"]);
        fold(&mut latest, Some(b"rt-b"), Some(&record("rt-b", 4)));
        assert_eq!(latest.get("rt-b"), Some(&4));
        // A tombstone without a key (not ours) removes nothing.
        fold(&mut latest, None, None);
        assert_eq!(latest.len(), 2);
    }
}
