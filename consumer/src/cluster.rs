//! Cluster barrier (`rtinval-consumer wait --all-nodes`): returns once every node's consumer
//! group has committed past a source position, read from Kafka's committed offsets.
//!
//! How a position maps to offsets: the producer publishes in binlog order, so on each partition
//! the events of a transaction come before the first message *beyond* it — an event of a later
//! transaction, or a heartbeat sent at or after it (heartbeats follow every transaction that
//! published within `producer.progress_heartbeat_ms`, and every `heartbeat_ms` anyway). That
//! message's offset is found by binary search over the partition (positions grow with offsets;
//! where a producer restart re-published a stretch, the search may settle on a later beyond
//! message, which only asks for more). A group whose committed offset (the next to read) is at
//! least that offset on every partition has applied every event up to the position.
//!
//! What a wait costs the brokers: per partition about log2(its length) one-message fetches to
//! find the offset, then one committed-offsets request per group every 200 ms until done.
//! Nodes commit applied offsets every second, so a cluster wait takes about a second longer
//! than the slowest node's apply. GTID waits compare per domain (MariaDB) or source uuid (MySQL);
//! with several MariaDB domains in use, wait on file:pos instead: heartbeats carry the last
//! transaction's GTID only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rtinval_schemas::position::{FilePos, GtidState, Reached, WaitFor};
use rtinval_schemas::{Event, EventBody};

use crate::config::Config;
use crate::replay::{Decoder, reader_config};
use crate::subscribe::topics;

const TIMEOUT: Duration = Duration::from_secs(10);

/// How a cluster wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterAnswer {
    /// Every group committed past the position.
    Applied { groups: Vec<String> },
    /// The timeout passed: the groups still behind, each with one partition it lags on.
    Timeout { lagging: Vec<String> },
}

/// Is `e` beyond `want`: published after every event of the transactions up to it?
fn beyond(e: &Event, want: &WaitFor) -> bool {
    let heartbeat = matches!(e.body, EventBody::Heartbeat { .. });
    match want {
        WaitFor::FilePos(w) => {
            let at = FilePos {
                file: e.source.file.clone(),
                pos: e.source.pos,
            };
            if heartbeat { at >= *w } else { at > *w }
        }
        WaitFor::Gtids(g) => {
            let mut r = Reached::default();
            if let Some(gtid) = &e.source.gtid {
                r.add_gtid(gtid);
            }
            g.iter().all(|(source, n)| {
                r.gtids
                    .get(source)
                    .is_some_and(|s| s > n || (heartbeat && s >= n))
            })
        }
    }
}

struct Reader {
    consumer: BaseConsumer,
    decoder: Decoder,
}

impl Reader {
    /// The event at `offset` of `topic`/`partition` (`None` if it cannot be read or decoded).
    fn at(&self, topic: &str, partition: i32, offset: i64) -> Option<Event> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .ok()?;
        self.consumer.assign(&tpl).ok()?;
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    if m.offset() < offset {
                        continue;
                    }
                    return self.decoder.decode(m.payload().unwrap_or_default()).ok();
                }
                _ => {}
            }
        }
        None
    }

    /// The first offset in `[lo, hi)` whose event is beyond `want`, by binary search.
    fn first_beyond(
        &self,
        topic: &str,
        partition: i32,
        want: &WaitFor,
        lo: i64,
        hi: i64,
    ) -> Option<i64> {
        let (mut lo, mut hi) = (lo, hi);
        let end = hi;
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.at(topic, partition, mid) {
                Some(e) if beyond(&e, want) => hi = mid,
                _ => lo = mid + 1,
            }
        }
        (lo < end).then_some(lo)
    }
}

/// Wait until every consumer group named in `groups`, or (if empty) every group whose name
/// starts with `group_prefix`, has committed past `want` on every partition of both event
/// topics, for at most `timeout`.
pub fn wait_all_nodes(
    config: &Config,
    want: &WaitFor,
    group_prefix: &str,
    groups: &[String],
    timeout: Duration,
) -> Result<ClusterAnswer, String> {
    let deadline = Instant::now() + timeout;
    let reader = Reader {
        consumer: reader_config(config, &format!("rtinval-wait-{}", std::process::id()))
            .set("fetch.wait.max.ms", "10")
            .create()
            .map_err(|e| format!("Kafka client for {}: {e}", config.kafka.brokers))?,
        decoder: Decoder::new(config)?,
    };
    let mut partitions = Vec::new();
    for topic in topics(&config.kafka.topic_prefix) {
        let md = reader
            .consumer
            .fetch_metadata(Some(&topic), TIMEOUT)
            .map_err(|e| format!("{topic}: {e}"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .ok_or_else(|| {
                format!("topic {topic} does not exist (is kafka.topic_prefix right?)")
            })?;
        partitions.extend(t.partitions().iter().map(|p| (topic.clone(), p.id())));
    }
    let groups: Vec<String> = if groups.is_empty() {
        let list = reader
            .consumer
            .fetch_group_list(None, TIMEOUT)
            .map_err(|e| {
                format!(
                    "cannot list consumer groups ({e}; some Kafka-protocol brokers, tansu among them, lack ListGroups): name the groups with --group"
                )
            })?;
        let mut found: Vec<String> = list
            .groups()
            .iter()
            .map(|g| g.name().to_owned())
            .filter(|n| n.starts_with(group_prefix))
            .collect();
        found.sort();
        found
    } else {
        groups.to_vec()
    };
    if groups.is_empty() {
        return Err(format!(
            "no consumer group starts with {group_prefix:?}; set --group-prefix (nodes' kafka.group_id) or name them with --group"
        ));
    }
    // Per single source of the position, the first offset beyond it, per partition.
    let wants: Vec<WaitFor> = match want {
        WaitFor::Gtids(g) => g
            .iter()
            .map(|(s, n)| WaitFor::Gtids(GtidState::from([(s.clone(), *n)])))
            .collect(),
        other => vec![other.clone()],
    };
    let mut needed: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut searched_from: BTreeMap<(String, i32, usize), i64> = BTreeMap::new();
    let committers: Vec<(String, BaseConsumer)> = groups
        .iter()
        .map(|g| {
            reader_config(config, g)
                .create()
                .map(|c| (g.clone(), c))
                .map_err(|e| format!("Kafka client for group {g}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    loop {
        // Find (or keep looking for) each partition's offset beyond the position.
        for (topic, partition) in &partitions {
            if needed.contains_key(&(topic.clone(), *partition)) {
                continue;
            }
            let (low, high) = reader
                .consumer
                .fetch_watermarks(topic, *partition, TIMEOUT)
                .map_err(|e| format!("{topic}/{partition}: {e}"))?;
            let mut worst = Some(0i64);
            for (i, w) in wants.iter().enumerate() {
                let from = searched_from
                    .get(&(topic.clone(), *partition, i))
                    .copied()
                    .unwrap_or(low)
                    .max(low);
                match reader.first_beyond(topic, *partition, w, from, high) {
                    Some(o) => worst = worst.map(|x| x.max(o)),
                    None => {
                        searched_from.insert((topic.clone(), *partition, i), high);
                        worst = None;
                    }
                }
            }
            if let Some(o) = worst {
                needed.insert((topic.clone(), *partition), o);
            }
        }
        let mut lagging = Vec::new();
        if needed.len() == partitions.len() {
            let mut tpl = TopicPartitionList::new();
            for (topic, partition) in &partitions {
                tpl.add_partition(topic, *partition);
            }
            for (group, c) in &committers {
                let committed = c
                    .committed_offsets(tpl.clone(), TIMEOUT)
                    .map_err(|e| format!("committed offsets of group {group}: {e}"))?;
                let behind = committed.elements().into_iter().find_map(|e| {
                    let need = needed.get(&(e.topic().to_owned(), e.partition()))?;
                    let have = match e.offset() {
                        Offset::Offset(o) => o,
                        _ => -1,
                    };
                    (have < *need).then(|| {
                        format!(
                            "{group} ({}/{}: committed {have}, needs {need})",
                            e.topic(),
                            e.partition()
                        )
                    })
                });
                lagging.extend(behind);
            }
            if lagging.is_empty() {
                return Ok(ClusterAnswer::Applied { groups });
            }
        } else {
            lagging.push("no message beyond the position yet on every partition".to_owned());
        }
        if Instant::now() >= deadline {
            return Ok(ClusterAnswer::Timeout { lagging });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtinval_schemas::{SCHEMA_VERSION, Source};

    fn event(gtid: &str, pos: u64, heartbeat: bool) -> Event {
        Event {
            schema_version: SCHEMA_VERSION,
            id: "x".into(),
            source: Source {
                server_id: 1,
                gtid: Some(gtid.into()),
                file: "bin.000001".into(),
                pos,
                tables: vec![],
                committed_at: 0,
            },
            emitted_at: 0,
            body: if heartbeat {
                EventBody::Heartbeat { source_time: 0 }
            } else {
                EventBody::PoolReset {
                    pools: vec!["p".into()],
                }
            },
        }
    }

    #[test]
    fn beyond_a_position_means_published_after_all_of_its_events() {
        let w = WaitFor::parse("0-1-17").unwrap();
        assert!(!beyond(&event("0-1-17", 500, false), &w), "its own event");
        assert!(
            beyond(&event("0-1-17", 500, true), &w),
            "a heartbeat after it"
        );
        assert!(
            beyond(&event("0-1-18", 600, false), &w),
            "a later transaction"
        );
        assert!(!beyond(&event("0-1-16", 400, true), &w));
        assert!(!beyond(&event("1-1-99", 900, true), &w), "another domain");
        let p = WaitFor::parse("bin.000001:500").unwrap();
        assert!(!beyond(&event("0-1-17", 500, false), &p));
        assert!(beyond(&event("0-1-17", 500, true), &p));
        assert!(beyond(&event("0-1-18", 501, false), &p));
    }
}
