//! `rtinval-consumer replay`: read a range of the event topics back, filter, print as JSON
//! lines or a table, optionally re-apply to this node — and `--why KEY`: which events
//! invalidated a key, from which source transaction, when.
//!
//! Reading never joins or commits to a consumer group: replay cannot disturb the node's agent.
//! Time bounds use Kafka's message timestamps; the broker's time index is used to seek when it
//! has one, and every message is filtered by its timestamp in any case.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use rtinval_schemas::avro::{AvroReader, decode_any};
use rtinval_schemas::{DecodeError, Event, EventBody, EventKind};
use serde::Serialize;

use crate::config::Config;
use crate::plan::{self, Action, Inventory};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Which messages to read and show.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// `pool-reset`, `cache-keys`, or both when empty.
    pub topics: Vec<String>,
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    /// Unix ms, inclusive.
    pub from_time: Option<i64>,
    /// Unix ms, inclusive.
    pub to_time: Option<i64>,
    pub follow: bool,
    /// Kinds to show; empty: every kind except heartbeats.
    pub kinds: BTreeSet<EventKind>,
    pub table: Option<String>,
    pub pool: Option<String>,
    pub cache: Option<String>,
    pub key: Option<String>,
    pub key_prefix: Option<String>,
    pub gtid: Option<String>,
    pub id: Option<String>,
}

/// One message read back.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp, Unix ms.
    pub timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    /// Why the payload could not be decoded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Selection {
    /// Whether any filter on content is set (undecodable messages are shown only without).
    pub fn filters_content(&self) -> bool {
        !self.kinds.is_empty()
            || self.table.is_some()
            || self.pool.is_some()
            || self.cache.is_some()
            || self.key.is_some()
            || self.key_prefix.is_some()
            || self.gtid.is_some()
            || self.id.is_some()
    }

    /// Whether a record passes the filters (undecodable ones pass only without content filters).
    pub fn selects(&self, r: &Record) -> bool {
        match &r.event {
            Some(e) => self.matches(e),
            None => !self.filters_content(),
        }
    }

    /// Whether an event passes the filters.
    pub fn matches(&self, e: &Event) -> bool {
        let kind = e.kind();
        let kind_ok = if self.kinds.is_empty() {
            kind != EventKind::Heartbeat
        } else {
            self.kinds.contains(&kind)
        };
        kind_ok
&& self.table.as_ref().is_none_or(|t| {
                e.source.tables.iter().any(|c| c.table == *t || c.table.rsplit_once('.').is_some_and(|(_, n)| n == t))
            })
            && self.pool.as_ref().is_none_or(|p| matches!(&e.body, EventBody::PoolReset { pools } if pools.contains(p)))
            && self.cache.as_ref().is_none_or(|c| match &e.body {
                EventBody::CacheKeys { cache, .. } | EventBody::CacheFlush { cache, .. } => cache == c,
                _ => false,
            })
            && self.key.as_ref().is_none_or(|k| matches!(&e.body, EventBody::CacheKeys { keys, .. } if keys.contains(k)))
            && self.key_prefix.as_ref().is_none_or(
                |p| matches!(&e.body, EventBody::CacheKeys { keys, .. } if keys.iter().any(|k| k.starts_with(p.as_str()))),
            )
            && self.gtid.as_ref().is_none_or(|g| e.source.gtid.as_ref() == Some(g))
            && self.id.as_ref().is_none_or(|i| &e.id == i)
    }
}

/// Whether an event invalidated `key` (of `cache`, if given): a key list holding it, a flush
/// of its cache, or a resync.
pub fn invalidates(e: &Event, key: &str, cache: Option<&str>) -> bool {
    match &e.body {
        EventBody::CacheKeys { cache: c, keys } => {
            cache.is_none_or(|x| x == c) && keys.iter().any(|k| k == key)
        }
        EventBody::CacheFlush { cache: c, .. } => cache.is_none_or(|x| x == c),
        EventBody::Resync { .. } => true,
        _ => false,
    }
}

/// Read the selected range, calling `each` for every message in offset order per partition.
/// Returns when every partition reached its end (never, with `follow`, until `each` says stop).
pub fn read(
    config: &Config,
    sel: &Selection,
    mut each: impl FnMut(Record) -> bool,
) -> Result<(), String> {
    let consumer: BaseConsumer =
        reader_config(config, &format!("rtinval-replay-{}", std::process::id()))
            .create()
            .map_err(|e| e.to_string())?;
    let decoder = Decoder::new(config)?;
    let prefix = &config.kafka.topic_prefix;
    let topics: Vec<String> = if sel.topics.is_empty() {
        rtinval_schemas::topics::events(prefix)
    } else {
        sel.topics
            .iter()
            .map(|t| rtinval_schemas::topics::name(prefix, t))
            .collect()
    };
    let mut assign = TopicPartitionList::new();
    let mut ends: Vec<(String, i32, i64)> = Vec::new();
    for topic in &topics {
        let md = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .map_err(|e| format!("{topic}: {e}"))?;
        let Some(t) = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
        else {
            return Err(format!("topic {topic} does not exist"));
        };
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), TIMEOUT)
                .map_err(|e| e.to_string())?;
            let mut start = sel.from_offset.unwrap_or(low).clamp(low, high);
            if let (Some(ts), None) = (sel.from_time, sel.from_offset) {
                let mut q = TopicPartitionList::new();
                q.add_partition_offset(topic, p.id(), Offset::Offset(ts))
                    .map_err(|e| e.to_string())?;
                // Not every broker keeps a time index; then we scan and filter by timestamp.
                if let Ok(found) = consumer.offsets_for_times(q, TIMEOUT)
                    && let Some(Offset::Offset(o)) = found.elements().first().map(|e| e.offset())
                {
                    start = o.clamp(low, high);
                }
            }
            let end = sel.to_offset.map_or(high, |o| (o + 1).min(high));
            if sel.follow || start < end {
                assign
                    .add_partition_offset(topic, p.id(), Offset::Offset(start))
                    .map_err(|e| e.to_string())?;
                ends.push((topic.clone(), p.id(), end));
            }
        }
    }
    if assign.count() == 0 {
        return Ok(());
    }
    consumer.assign(&assign).map_err(|e| e.to_string())?;
    let mut done: BTreeSet<(String, i32)> = BTreeSet::new();
    let idle_limit = if sel.follow { None } else { Some(TIMEOUT) };
    let mut idle = Duration::ZERO;
    loop {
        if !sel.follow && done.len() == ends.len() {
            return Ok(());
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            idle += Duration::from_millis(200);
            if idle_limit.is_some_and(|l| idle > l) {
                return Err("timed out reading the range".into());
            }
            continue;
        };
        idle = Duration::ZERO;
        let m = m.map_err(|e| e.to_string())?;
        let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
        let Some((_, _, end)) = ends.iter().find(|(t, p, _)| *t == topic && *p == partition) else {
            continue;
        };
        if !sel.follow && offset >= *end {
            done.insert((topic, partition));
            continue;
        }
        if !sel.follow && offset + 1 >= *end {
            done.insert((topic.clone(), partition));
        }
        let timestamp = m.timestamp().to_millis();
        if sel
            .from_time
            .is_some_and(|f| timestamp.is_some_and(|t| t < f))
        {
            continue;
        }
        if sel
            .to_time
            .is_some_and(|to| timestamp.is_some_and(|t| t > to))
        {
            if sel.follow {
                continue;
            }
            done.insert((topic, partition));
            continue;
        }
        let (event, error) = match decoder.decode(m.payload().unwrap_or_default()) {
            Ok(e) => (Some(e), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let record = Record {
            topic,
            partition,
            offset,
            timestamp,
            event,
            error,
        };
        if !each(record) {
            return Ok(());
        }
    }
}

/// Decodes both wire formats; Avro through the configured registry, on a runtime of its own
/// (replay reads synchronously).
/// A Kafka client that reads topics without joining or committing for `group` (replay, the
/// cluster barrier): the config's brokers and `kafka.options`.
pub(crate) fn reader_config(config: &Config, group: &str) -> ClientConfig {
    rtinval_schemas::kafka::client_config(
        &config.kafka.brokers,
        &config.kafka.options,
        &[
            ("group.id", group),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
        ],
    )
}

/// Decodes JSON and (with a registry) Avro events outside an async context.
pub(crate) struct Decoder {
    avro: Option<(AvroReader, tokio::runtime::Runtime)>,
}

impl Decoder {
    pub(crate) fn new(config: &Config) -> Result<Decoder, String> {
        let avro = match &config.schema_registry {
            Some(registry) => {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                Some((AvroReader::new(registry)?, runtime))
            }
            None => None,
        };
        Ok(Decoder { avro })
    }

    pub(crate) fn decode(&self, payload: &[u8]) -> Result<Event, DecodeError> {
        match &self.avro {
            Some((reader, runtime)) => runtime.block_on(decode_any(payload, Some(reader))),
            None => futures::executor::block_on(decode_any(payload, None)),
        }
    }
}

/// One line of the readable table.
pub fn table_row(r: &Record) -> String {
    let when = r.timestamp.map_or_else(|| "-".to_owned(), format_ms);
    let place = format!(
        "{}[{}]@{}",
        r.topic.rsplit('.').next().unwrap_or(&r.topic),
        r.partition,
        r.offset
    );
    let Some(e) = &r.event else {
        return format!(
            "{when}  {place:<22} UNDECODABLE  {}",
            r.error.as_deref().unwrap_or("")
        );
    };
    let what = match &e.body {
        EventBody::PoolReset { pools } => format!("pools {}", pools.join(",")),
        EventBody::CacheKeys { cache, keys } => {
            let shown: Vec<&str> = keys.iter().take(3).map(String::as_str).collect();
            let more = if keys.len() > 3 {
                format!(" (+{})", keys.len() - 3)
            } else {
                String::new()
            };
            format!("{cache}: {}{more}", shown.join(" "))
        }
        EventBody::CacheFlush { cache, reason } => format!("{cache} ({reason})"),
        EventBody::Resync { reason } => reason.clone(),
        EventBody::Heartbeat { source_time } => {
            format!("source at {}", format_ms(*source_time as i64))
        }
    };
    let src = match &e.source.gtid {
        Some(g) => format!("gtid {g}"),
        None => format!("{}:{}", e.source.file, e.source.pos),
    };
    let committed = format_ms(e.source.committed_at as i64);
    format!(
        "{when}  {place:<22} {:<11} {what}  [{src}, committed {committed}]",
        e.kind().as_str()
    )
}

/// What `--apply --dry-run` prints for one event.
pub fn describe(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::ReloadPool(p) => format!("would reload pool {p}"),
            Action::PurgeKeys { cache, keys, .. } => {
                format!(
                    "would purge {} key(s) from cache {cache}: {}",
                    keys.len(),
                    keys.join(" ")
                )
            }
            Action::FlushCache(c) => format!("would flush cache {c}"),
            Action::Freshness { .. } => "would record freshness".to_owned(),
            Action::NotHere { name } => format!("skip {name} (not on this node)"),
        })
        .collect()
}

/// The actions `--apply` takes for an event on this node.
pub fn actions(e: &Event, node: &Inventory) -> Vec<Action> {
    plan::actions(e, node)
}

/// Parse `2026-11-26T21:00:00Z`, `2026-11-26T21:00:00.5+01:00`, or Unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad = || format!("{s:?} is not RFC 3339 (2026-11-26T21:00:00Z) or Unix milliseconds");
    let (date, time) = s.split_once(['T', ' ']).ok_or_else(bad)?;
    let mut d = date
        .splitn(3, '-')
        .map(|p| p.parse::<i64>().map_err(|_| bad()));
    let (y, mo, day) = (
        d.next().ok_or_else(bad)??,
        d.next().ok_or_else(bad)??,
        d.next().ok_or_else(bad)??,
    );
    let (clock, offset_min) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else if let Some(i) = time.rfind(['+', '-']) {
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':').ok_or_else(bad)?;
        (
            c,
            sign * (oh.parse::<i64>().map_err(|_| bad())? * 60
                + om.parse::<i64>().map_err(|_| bad())?),
        )
    } else {
        return Err(bad());
    };
    let mut t = clock.splitn(3, ':');
    let h: i64 = t.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let mi: i64 = t.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    let sec: f64 = t.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&day) || h > 23 || mi > 59 || sec >= 61.0 {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, day);
    Ok(
        (days * 86_400 + h * 3600 + mi * 60 - offset_min * 60) * 1000
            + (sec * 1000.0).round() as i64,
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix ms → `2026-11-26T21:00:00.123Z`.
pub fn format_ms(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Inverse of days_from_civil.
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtinval_schemas::{SCHEMA_VERSION, Source, TableChange};

    #[test]
    fn times_parse_and_format() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_time("2026-11-26T21:00:00.5Z").unwrap(),
            1_795_726_800_500
        );
        assert_eq!(
            parse_time("2026-11-26T22:00:00+01:00").unwrap(),
            1_795_726_800_000
        );
        assert_eq!(parse_time("1795726800500").unwrap(), 1_795_726_800_500);
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
        assert_eq!(format_ms(1_795_726_800_500), "2026-11-26T21:00:00.500Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    fn ev(body: EventBody) -> Event {
        Event {
            schema_version: SCHEMA_VERSION,
            id: "1:f:9:0".into(),
            source: Source {
                server_id: 1,
                gtid: Some("0-1-9".into()),
                file: "f".into(),
                pos: 9,
                tables: vec![TableChange {
                    table: "rt.Object".into(),
                    ops: vec![],
                }],
                committed_at: 0,
            },
            emitted_at: 0,
            body,
        }
    }

    #[test]
    fn filters() {
        let keys = ev(EventBody::CacheKeys {
            cache: "rt".into(),
            keys: vec!["object:1".into(), "object:2".into()],
        });
        let hb = ev(EventBody::Heartbeat { source_time: 1 });
        let all = Selection::default();
        assert!(all.matches(&keys));
        assert!(!all.matches(&hb), "heartbeats only on request");
        let sel = |f: fn(&mut Selection)| {
            let mut s = Selection::default();
            f(&mut s);
            s
        };
        assert!(sel(|s| s.key = Some("object:2".into())).matches(&keys));
        assert!(!sel(|s| s.key = Some("object:3".into())).matches(&keys));
        assert!(sel(|s| s.key_prefix = Some("obj".into())).matches(&keys));
        assert!(sel(|s| s.table = Some("Object".into())).matches(&keys));
        assert!(sel(|s| s.table = Some("rt.Object".into())).matches(&keys));
        assert!(!sel(|s| s.cache = Some("other".into())).matches(&keys));
        assert!(sel(|s| s.gtid = Some("0-1-9".into())).matches(&keys));
        assert!(!sel(|s| s.pool = Some("rtapi".into())).matches(&keys));
        assert!(
            sel(|s| {
                s.kinds.insert(EventKind::Heartbeat);
            })
            .matches(&hb)
        );
        assert!(invalidates(&keys, "object:1", Some("rt")));
        assert!(!invalidates(&keys, "object:1", Some("x")));
        assert!(invalidates(
            &ev(EventBody::Resync { reason: "r".into() }),
            "object:1",
            None
        ));
    }
}
