//! Cluster barrier (`rtinval-consumer wait --all-nodes`): returns once every node's consumer
//! group has committed past a source position, read from Kafka's committed offsets.
//!
//! How a position maps to offsets: the producer publishes in binlog order, so on each partition
//! the events of a transaction come before the first message *beyond* it — an event of a later
//! transaction, or a heartbeat sent at or after it (heartbeats follow every transaction that
//! published within `producer.progress_heartbeat_ms`, and every `heartbeat_ms` anyway). A group
//! whose committed offset (the next to read) has reached that message's offset on every
//! partition has applied every event up to the position.
//!
//! A [`ClusterWatch`] follows both topics from their end as it starts (one reader for any number
//! of waits) and polls every group's committed offsets every 200 ms. A wait takes the first
//! message beyond its position that the watch has seen: if a message beyond it was published
//! before the watch started, a later one is taken, which only asks for more, never less.
//!
//! Which groups: those named with `--group`, or every group whose name starts with
//! `--group-prefix`, as the broker lists them (ListGroups) and as the nodes registered
//! themselves in the node registry ([`crate::nodes`], for brokers without ListGroups).
//!
//! What it costs the brokers: one consumer reading the event topics, and one committed-offsets
//! request per group every 200 ms, however many waits. Nodes commit applied offsets every
//! second, so a cluster wait takes about a second longer than the slowest node's apply. GTID
//! waits compare per domain (MariaDB) or source uuid (MySQL); with several MariaDB domains in
//! use, wait on file:pos instead: heartbeats carry the last transaction's GTID only.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use rtinval_schemas::EventBody;
use rtinval_schemas::position::{FilePos, GtidState, Reached, WaitFor};

use crate::config::Config;
use crate::replay::{Decoder, reader_config};

const TIMEOUT: Duration = Duration::from_secs(10);

/// How a cluster wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterAnswer {
    /// Every group committed past the position.
    Applied { groups: Vec<String> },
    /// The timeout passed: the groups still behind, each with one partition it lags on.
    Timeout { lagging: Vec<String> },
}

/// What the watch keeps of a message: where it came from, and whether it is a heartbeat.
struct Seen {
    offset: i64,
    file_pos: FilePos,
    gtid: Option<String>,
    heartbeat: bool,
}

impl Seen {
    /// Is this message beyond `want`: published after every event of the transactions up to it?
    fn beyond(&self, want: &WaitFor) -> bool {
        match want {
            WaitFor::FilePos(w) => {
                if self.heartbeat {
                    self.file_pos >= *w
                } else {
                    self.file_pos > *w
                }
            }
            WaitFor::Gtids(g) => {
                let mut r = Reached::default();
                if let Some(gtid) = &self.gtid {
                    r.add_gtid(gtid);
                }
                g.iter().all(|(source, n)| {
                    r.gtids
                        .get(source)
                        .is_some_and(|s| s > n || (self.heartbeat && s >= n))
                })
            }
        }
    }
}

#[derive(Default)]
struct State {
    partitions: Vec<(String, i32)>,
    /// Messages seen since the watch started, per partition, in offset order.
    seen: BTreeMap<(String, i32), Vec<Seen>>,
    /// Committed offsets (next to read) per group and partition.
    committed: BTreeMap<String, BTreeMap<(String, i32), i64>>,
    /// Why the watch stopped, if it did.
    failed: Option<String>,
}

/// Follows the event topics and the groups' committed offsets for any number of waits.
pub struct ClusterWatch {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Receiver<u64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The groups waited for.
    pub groups: Vec<String>,
}

impl ClusterWatch {
    /// Start following the topics of `config` from their end, and the committed offsets of
    /// `groups` (or, if empty, of every group whose name starts with `group_prefix`).
    pub fn start(
        config: &Config,
        group_prefix: &str,
        groups: &[String],
    ) -> Result<ClusterWatch, String> {
        let reader: BaseConsumer =
            reader_config(config, &format!("rtinval-wait-{}", std::process::id()))
                .set("fetch.wait.max.ms", "10")
                .create()
                .map_err(|e| format!("Kafka client for {}: {e}", config.kafka.brokers))?;
        let decoder = Decoder::new(config)?;
        let mut partitions = Vec::new();
        let mut assign = TopicPartitionList::new();
        for topic in rtinval_schemas::topics::events(&config.kafka.topic_prefix) {
            let md = reader
                .fetch_metadata(Some(&topic), TIMEOUT)
                .map_err(|e| format!("{topic}: {e}"))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .ok_or_else(|| {
                    format!("topic {topic} does not exist (is kafka.topic_prefix right?)")
                })?;
            for p in t.partitions() {
                let (_, high) = reader
                    .fetch_watermarks(&topic, p.id(), TIMEOUT)
                    .map_err(|e| format!("{topic}/{}: {e}", p.id()))?;
                assign
                    .add_partition_offset(&topic, p.id(), Offset::Offset(high))
                    .map_err(|e| e.to_string())?;
                partitions.push((topic.clone(), p.id()));
            }
        }
        reader.assign(&assign).map_err(|e| e.to_string())?;
        let groups: Vec<String> = if groups.is_empty() {
            discover(config, group_prefix)?
        } else {
            groups.to_vec()
        };
        let committers: Vec<(String, BaseConsumer)> = groups
            .iter()
            .map(|g| {
                reader_config(config, g)
                    .create()
                    .map(|c| (g.clone(), c))
                    .map_err(|e| format!("Kafka client for group {g}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let state = Arc::new(Mutex::new(State {
            partitions: partitions.clone(),
            ..State::default()
        }));
        let (tx, changed) = tokio::sync::watch::channel(0u64);
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("cluster-watch".into())
            .spawn(move || follow(&reader, &decoder, &committers, &partitions, &st, &tx, &sp))
            .map_err(|e| e.to_string())?;
        Ok(ClusterWatch {
            state,
            changed,
            stop,
            thread: Some(thread),
            groups,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wait until every group committed past `want`, for at most `timeout`.
    pub async fn wait(&self, want: &WaitFor, timeout: Duration) -> Result<ClusterAnswer, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        // One source per part: a message carries one transaction's GTID.
        let parts: Vec<WaitFor> = match want {
            WaitFor::Gtids(g) => g
                .iter()
                .map(|(s, n)| WaitFor::Gtids(GtidState::from([(s.clone(), *n)])))
                .collect(),
            other => vec![other.clone()],
        };
        let mut found: BTreeMap<((String, i32), usize), i64> = BTreeMap::new();
        let mut scanned: BTreeMap<((String, i32), usize), usize> = BTreeMap::new();
        let mut changed = self.changed.clone();
        loop {
            let lagging = {
                let st = self.lock();
                if let Some(why) = &st.failed {
                    return Err(why.clone());
                }
                // The first message beyond each part, per partition, scanning only what is new.
                for p in &st.partitions {
                    let seen = st.seen.get(p).map_or(&[][..], Vec::as_slice);
                    for (i, part) in parts.iter().enumerate() {
                        let key = (p.clone(), i);
                        if found.contains_key(&key) {
                            continue;
                        }
                        let from = scanned.get(&key).copied().unwrap_or(0);
                        if let Some(s) = seen[from..].iter().find(|s| s.beyond(part)) {
                            found.insert(key, s.offset);
                        } else {
                            scanned.insert(key, seen.len());
                        }
                    }
                }
                let needed: Option<BTreeMap<&(String, i32), i64>> = st
                    .partitions
                    .iter()
                    .map(|p| {
                        (0..parts.len())
                            .map(|i| found.get(&(p.clone(), i)).copied())
                            .try_fold(0i64, |m, o| o.map(|o| m.max(o)))
                            .map(|o| (p, o))
                    })
                    .collect();
                match needed {
                    None => {
                        vec!["no message beyond the position yet on every partition".to_owned()]
                    }
                    Some(needed) => {
                        let lagging: Vec<String> = self
                            .groups
                            .iter()
                            .filter_map(|g| {
                                let have = st.committed.get(g);
                                needed.iter().find_map(|((topic, partition), need)| {
                                    let c = have
                                        .and_then(|h| h.get(&(topic.clone(), *partition)))
                                        .copied()
                                        .unwrap_or(-1);
                                    (c < *need).then(|| {
                                        format!(
                                            "{g} ({topic}/{partition}: committed {c}, needs {need})"
                                        )
                                    })
                                })
                            })
                            .collect();
                        if lagging.is_empty() {
                            return Ok(ClusterAnswer::Applied {
                                groups: self.groups.clone(),
                            });
                        }
                        lagging
                    }
                }
            };
            tokio::select! {
                r = changed.changed() => {
                    if r.is_err() {
                        return Err("the cluster watch stopped".into());
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(ClusterAnswer::Timeout { lagging });
                }
            }
        }
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The watch's thread: read new messages, poll committed offsets every 200 ms, tell waiters.
fn follow(
    reader: &BaseConsumer,
    decoder: &Decoder,
    committers: &[(String, BaseConsumer)],
    partitions: &[(String, i32)],
    state: &Mutex<State>,
    tx: &tokio::sync::watch::Sender<u64>,
    stop: &AtomicBool,
) {
    let lock = || {
        state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let mut tpl = TopicPartitionList::new();
    for (topic, partition) in partitions {
        tpl.add_partition(topic, *partition);
    }
    let mut next_poll = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(20))
            && let Ok(e) = decoder.decode(m.payload().unwrap_or_default())
        {
            lock()
                .seen
                .entry((m.topic().to_owned(), m.partition()))
                .or_default()
                .push(Seen {
                    offset: m.offset(),
                    file_pos: FilePos {
                        file: e.source.file,
                        pos: e.source.pos,
                    },
                    gtid: e.source.gtid,
                    heartbeat: matches!(e.body, EventBody::Heartbeat { .. }),
                });
            // No wake-up here: a wait can only end after a committed-offsets poll.
        }
        if Instant::now() < next_poll {
            continue;
        }
        next_poll = Instant::now() + Duration::from_millis(200);
        for (group, c) in committers {
            match c.committed_offsets(tpl.clone(), TIMEOUT) {
                Ok(committed) => {
                    let offsets = committed
                        .elements()
                        .into_iter()
                        .filter_map(|e| match e.offset() {
                            Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                            _ => None,
                        })
                        .collect();
                    lock().committed.insert(group.clone(), offsets);
                }
                Err(e) => {
                    lock().failed = Some(format!("committed offsets of group {group}: {e}"));
                    tx.send_modify(|n| *n += 1);
                    return;
                }
            }
        }
        tx.send_modify(|n| *n += 1);
    }
}

/// A Kafka client context that logs at debug only.
struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(fac, message, "librdkafka (group listing)");
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka error (group listing)");
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// The groups whose names start with `prefix`: those the broker lists (ListGroups) with
/// members, and those registered in the node registry ([`crate::nodes`]) within its TTL. A
/// group the broker lists without members (Kafka keeps a stopped node's group, with its
/// offsets, for days) counts only while registered, as on a broker that lists nothing: a
/// node stopped for longer than the TTL, or deregistered, stops holding waits. A broker without
/// ListGroups (tansu) leaves the registry alone; an error only if neither names a group.
fn discover(config: &Config, prefix: &str) -> Result<Vec<String>, String> {
    // A client of its own that keeps librdkafka's complaints at debug: the listing is a probe
    // (tansu drops the connection on ListGroups), and its failure is in the answer if it
    // matters.
    let lister: BaseConsumer<Quiet> =
        reader_config(config, &format!("rtinval-groups-{}", std::process::id()))
            .create_with_context(Quiet)
            .map_err(|e| format!("Kafka client for {}: {e}", config.kafka.brokers))?;
    let listed = lister.fetch_group_list(None, TIMEOUT).map(|list| {
        list.groups()
            .iter()
            .filter(|g| g.name().starts_with(prefix) && has_members(g.state()))
            .map(|g| g.name().to_owned())
            .collect::<Vec<_>>()
    });
    drop(lister);
    let registered = crate::nodes::registered(config, prefix, rtinval_schemas::runtime::now_ms());
    let mut found: Vec<String> = listed
        .iter()
        .chain(registered.iter())
        .flatten()
        .cloned()
        .collect();
    found.sort();
    found.dedup();
    if found.is_empty() {
        let why = |r: &Result<Vec<String>, _>, what: &str| match r {
            Ok(_) => format!("{what}: none"),
            Err(e) => format!("{what}: {e}"),
        };
        return Err(format!(
            "no consumer group starts with {prefix:?} ({}; {}); set --group-prefix to the nodes' kafka.group_id prefix, or name the groups with --group",
            why(&listed.map_err(|e| e.to_string()), "listed by the broker"),
            why(
                &registered,
                "registered in the node registry within 10 minutes"
            ),
        ));
    }
    Ok(found)
}

/// Whether a group in this state (as DescribeGroups names it) has members: not `Empty` (no
/// member left, offsets kept) nor `Dead` (being removed).
fn has_members(state: &str) -> bool {
    !matches!(state, "Empty" | "Dead")
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
    let watch = ClusterWatch::start(config, group_prefix, groups)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(watch.wait(want, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(gtid: &str, pos: u64, heartbeat: bool) -> Seen {
        Seen {
            offset: 0,
            file_pos: FilePos {
                file: "bin.000001".into(),
                pos,
            },
            gtid: Some(gtid.into()),
            heartbeat,
        }
    }

    #[test]
    fn a_listed_group_counts_by_itself_only_with_members() {
        for state in [
            "Stable",
            "PreparingRebalance",
            "CompletingRebalance",
            "Unknown",
        ] {
            assert!(has_members(state), "{state}");
        }
        assert!(!has_members("Empty"));
        assert!(!has_members("Dead"));
    }

    #[test]
    fn beyond_a_position_means_published_after_all_of_its_events() {
        let w = WaitFor::parse("0-1-17").unwrap();
        assert!(!seen("0-1-17", 500, false).beyond(&w), "its own event");
        assert!(seen("0-1-17", 500, true).beyond(&w), "a heartbeat after it");
        assert!(seen("0-1-18", 600, false).beyond(&w), "a later transaction");
        assert!(!seen("0-1-16", 400, true).beyond(&w));
        assert!(!seen("1-1-99", 900, true).beyond(&w), "another domain");
        let p = WaitFor::parse("bin.000001:500").unwrap();
        assert!(!seen("0-1-17", 500, false).beyond(&p));
        assert!(seen("0-1-17", 500, true).beyond(&p));
        assert!(seen("0-1-18", 501, false).beyond(&p));
    }
}
