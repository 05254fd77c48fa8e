//! `rtinval-consumer inspect`: measure consistency instead of trusting it. Follows the
//! cache-keys topic a configurable delay behind and checks, for every key a purge named in a
//! cache with the fill protocol, that the node's cache holds no value older than that purge:
//! the fill protocol stores with every value the position of the purge (or lease) its read
//! came after (`rtv1 D <basis>`), so the check needs no source read. Verdicts:
//!
//! - **consistent**: nothing, a marker (tombstone, lease), or data whose basis is at or past
//!   the purge's position;
//! - **violation**: data whose basis is before the purge — it was read before the invalidation
//!   and outlived it (logged with key and both positions);
//! - **unverifiable**: data without a comparable position (a value not written by the clients,
//!   or a basis of `-`).
//!
//! A purge is judged only once the node has applied it (the node's `/wait` on `http.listen`
//! answers 200): a node running behind is stale — `rtinval_consumer_staleness_seconds` says so
//! — not inconsistent.
//!
//! A line every `--report-secs` says "N of M checked keys consistent after D s" per cache; the
//! counts are the metric `rtinval_consumer_inspected_keys_total{cache,verdict}` (with
//! `--listen`). Reading never joins or commits to a consumer group.

use std::collections::BTreeMap;
use std::time::Duration;

use rtinval_client::protocol::Stored;
use rtinval_schemas::EventBody;
use rtinval_schemas::position::{Reached, WaitFor};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{CacheEndpoint, Config};
use crate::metrics::{InspectLabel, Metrics};
use crate::replay::{self, Selection};

/// How a checked key stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Consistent,
    /// Data read before the purge at `position` outlived it; `basis` is what it was read after.
    Violation {
        basis: String,
    },
    Unverifiable,
}

impl Verdict {
    fn label(&self) -> &'static str {
        match self {
            Verdict::Consistent => "consistent",
            Verdict::Violation { .. } => "violation",
            Verdict::Unverifiable => "unverifiable",
        }
    }
}

/// Judge what a cache holds for a key that the purge at `position` invalidated (pure).
pub fn verdict(stored: Option<&[u8]>, position: &str) -> Verdict {
    let Some(value) = stored else {
        return Verdict::Consistent;
    };
    let basis = match Stored::parse(value) {
        Stored::Tombstone { .. } | Stored::Lease { .. } => return Verdict::Consistent,
        Stored::Foreign(_) => return Verdict::Unverifiable,
        Stored::Data { basis, .. } => basis,
    };
    let (Ok(purge), Ok(read_after)) = (WaitFor::parse(position), WaitFor::parse(basis)) else {
        return Verdict::Unverifiable;
    };
    let reached = match read_after {
        WaitFor::Gtids(gtids) => Reached {
            gtids,
            file_pos: None,
        },
        WaitFor::FilePos(p) => Reached {
            file_pos: Some(p),
            gtids: BTreeMap::new(),
        },
    };
    if purge.reached_by(&reached) {
        Verdict::Consistent
    } else {
        Verdict::Violation {
            basis: basis.to_owned(),
        }
    }
}

/// The inspector's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long after a purge its keys are checked.
    pub delay: Duration,
    /// Stop reading after this long (then finish the checks due), or run until stopped.
    pub duration: Option<Duration>,
    /// How often the report line is logged.
    pub report_every: Duration,
}

/// Counts of one cache.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Tally {
    pub checked: u64,
    pub consistent: u64,
    pub violations: u64,
    pub unverifiable: u64,
}

/// What a run found, per cache.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub delay_secs: f64,
    pub caches: BTreeMap<String, Tally>,
    /// Violations as `cache key purged-at basis` (the first 1,000).
    pub violations: Vec<String>,
}

impl Report {
    /// Count `n` keys of `cache` with verdict `v`, in the report and the metric.
    fn count(&mut self, metrics: &Metrics, cache: &str, v: &Verdict, n: u64) {
        let tally = self.caches.entry(cache.to_owned()).or_default();
        tally.checked += n;
        match v {
            Verdict::Consistent => tally.consistent += n,
            Verdict::Violation { .. } => tally.violations += n,
            Verdict::Unverifiable => tally.unverifiable += n,
        }
        metrics
            .inspected_keys
            .get_or_create(&InspectLabel {
                cache: cache.to_owned(),
                verdict: v.label(),
            })
            .inc_by(n);
    }
}

/// A cache's values, read as they are (no protocol logic).
enum Reader {
    Redis(redis::aio::MultiplexedConnection, String),
    Memcached(rtinval_client::memcached::Memcached, String),
}

impl Reader {
    async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        match self {
            Reader::Redis(conn, prefix) => redis::cmd("GET")
                .arg(format!("{prefix}{key}"))
                .query_async(conn)
                .await
                .map_err(|e| e.to_string()),
            Reader::Memcached(mc, prefix) => {
                let full = format!("{prefix}{key}");
                mc.gets(&[full.as_bytes()])
                    .await
                    .map(|mut v| v.pop().flatten().map(|i| i.value))
                    .map_err(|e| e.to_string())
            }
        }
    }
}

/// One purge to check once it is `delay` old.
struct Due {
    at_ms: i64,
    cache: String,
    keys: Vec<String>,
    position: String,
}

/// Run until `shutdown` (or the duration passes and the last checks are done).
pub async fn run(
    config: &Config,
    settings: &Settings,
    metrics: &Metrics,
    shutdown: CancellationToken,
) -> Result<Report, String> {
    let mut readers = BTreeMap::new();
    for (name, c) in &config.caches {
        if !c.fill_protocol {
            info!(cache = %name, "Not inspected: the cache does not use the fill protocol (fill_protocol = true), so its values carry no positions.");
            continue;
        }
        let reader = match c.endpoint().map_err(|e| format!("cache {name}: {e}"))? {
            CacheEndpoint::Redis { info, .. } => {
                let client = redis::Client::open(*info).map_err(|e| e.to_string())?;
                let conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("cache {name}: {e}"))?;
                Reader::Redis(conn, c.prefix.clone())
            }
            CacheEndpoint::Memcached { addr } => Reader::Memcached(
                rtinval_client::memcached::Memcached::new(&addr),
                c.prefix.clone(),
            ),
        };
        readers.insert(name.clone(), reader);
    }
    if readers.is_empty() {
        return Err("no cache with fill_protocol = true: nothing to inspect".into());
    }

    // Read the topic from now on, on a thread of its own (the reader is synchronous).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Due>(100_000);
    let sel = Selection {
        topics: vec![rtinval_schemas::topics::CACHE_KEYS.into()],
        from_time: Some(rtinval_schemas::runtime::now_ms() as i64),
        follow: true,
        ..Selection::default()
    };
    let reading = shutdown.child_token();
    let (reader_config, stop_reading) = (config.clone(), reading.clone());
    let deadline = settings.duration.map(|d| std::time::Instant::now() + d);
    let thread = std::thread::spawn(move || {
        replay::read(&reader_config, &sel, |record| {
            if stop_reading.is_cancelled()
                || deadline.is_some_and(|d| std::time::Instant::now() > d)
            {
                return false;
            }
            if let Some(event) = record.event
                && let EventBody::CacheKeys { cache, keys } = event.body
            {
                let due = Due {
                    at_ms: record.timestamp.unwrap_or(event.emitted_at as i64),
                    cache,
                    keys,
                    position: crate::plan::position(&event.source),
                };
                return tx.blocking_send(due).is_ok();
            }
            true
        })
    });

    let mut report = Report {
        delay_secs: settings.delay.as_secs_f64(),
        ..Report::default()
    };
    // The node's barrier (http.listen of the config), to check only purges the node applied.
    let node = (!config.http.listen.is_empty())
        .then(|| rtinval_client::Barrier::new(&format!("http://{}", config.http.listen)));
    let mut confirmed: BTreeMap<String, u64> = BTreeMap::new();
    if node.is_none() {
        warn!(
            "http.listen is empty: the inspector cannot ask the node what it has applied, so a node running behind by more than the delay shows as violations."
        );
    }
    let mut next_report = tokio::time::Instant::now() + settings.report_every;
    loop {
        let due = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(next_report) => {
                log_report(&report);
                next_report += settings.report_every;
                continue;
            }
            due = rx.recv() => match due {
                Some(d) => d,
                None => break, // the reader stopped (duration over, or an error below)
            },
        };
        let Some(reader) = readers.get_mut(&due.cache) else {
            continue;
        };
        let wait_ms = (due.at_ms + settings.delay.as_millis() as i64)
            - rtinval_schemas::runtime::now_ms() as i64;
        if wait_ms > 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(wait_ms as u64)) => {}
            }
        }
        // Judge the node only for what it has applied: a node running behind is stale, not
        // inconsistent (its barrier says when it has applied the purge; one answer covers
        // every purge up to the position it names).
        let covered = rtinval_client::protocol::gtid_parts(&due.position)
            .is_some_and(|(d, n)| confirmed.get(d).is_some_and(|c| *c >= n));
        let answer = match &node {
            Some(node) if !covered => Some(
                node.wait_answer(&due.position, Duration::from_secs(10))
                    .await,
            ),
            _ => None,
        };
        if let Some(Ok(body)) = &answer {
            for (d, n) in applied_gtids(body) {
                let c = confirmed.entry(d).or_insert(0);
                *c = (*c).max(n);
            }
        }
        if let Some(Err(e)) = answer {
            warn!(cache = %due.cache, position = %due.position, error = %e, "Inspector: the node has not applied this purge; its keys are counted unverifiable.");
            report.count(
                metrics,
                &due.cache,
                &Verdict::Unverifiable,
                due.keys.len() as u64,
            );
            continue;
        }
        for key in &due.keys {
            let stored = match reader.get(key).await {
                Ok(v) => v,
                Err(e) => {
                    warn!(cache = %due.cache, error = %e, "Inspector: cannot read the cache; this key is not counted.");
                    continue;
                }
            };
            let v = verdict(stored.as_deref(), &due.position);
            if let Verdict::Violation { basis } = &v {
                warn!(cache = %due.cache, key = %key, purged_at = %due.position, read_after = %basis,
                    "Inspector: a cached value is older than an invalidation it outlived.");
                if report.violations.len() < 1000 {
                    report
                        .violations
                        .push(format!("{} {key} {} {basis}", due.cache, due.position));
                }
            }
            report.count(metrics, &due.cache, &v, 1);
        }
    }
    reading.cancel();
    drop(rx);
    match tokio::task::spawn_blocking(move || thread.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(format!("reading the cache-keys topic: {e}")),
        _ => return Err("the topic reader panicked".into()),
    }
    log_report(&report);
    Ok(report)
}

/// The GTIDs a `/wait` answer says the node applied: `"applied":"file:pos (gtid 0-*-17,1-*-5)"`
/// → `[("0", 17), ("1", 5)]`.
fn applied_gtids(answer: &str) -> Vec<(String, u64)> {
    let applied = serde_json::from_str::<serde_json::Value>(answer)
        .ok()
        .and_then(|v| v["applied"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let Some(list) = applied
        .split_once("(gtid ")
        .and_then(|(_, rest)| rest.strip_suffix(')'))
    else {
        return Vec::new();
    };
    list.split(',')
        .filter_map(|g| {
            let mut it = g.trim().split('-');
            let (d, _, n) = (it.next()?, it.next()?, it.next()?);
            Some((d.to_owned(), n.parse().ok()?))
        })
        .collect()
}

fn log_report(report: &Report) {
    for (cache, t) in &report.caches {
        info!(
            %cache,
            checked = t.checked,
            consistent = t.consistent,
            violations = t.violations,
            unverifiable = t.unverifiable,
            "Inspected: {} of {} checked keys consistent after {} s.",
            t.consistent,
            t.checked,
            report.delay_secs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtinval_client::protocol::{data, lease, tombstone};

    #[test]
    fn a_wait_answer_names_the_gtids_applied() {
        assert_eq!(
            applied_gtids(r#"{"status":"applied","applied":"bin.000001:5 (gtid 0-*-17,1-*-5)"}"#),
            vec![("0".to_owned(), 17), ("1".to_owned(), 5)]
        );
        assert!(applied_gtids(r#"{"applied":"bin.000001:5"}"#).is_empty());
        assert!(applied_gtids("not json").is_empty());
    }

    #[test]
    fn values_are_judged_by_the_position_they_were_read_after() {
        let purge = "0-1-17";
        assert_eq!(verdict(None, purge), Verdict::Consistent);
        assert_eq!(
            verdict(Some(tombstone("0-1-17", "n").as_bytes()), purge),
            Verdict::Consistent
        );
        assert_eq!(
            verdict(Some(lease("0-1-3", "n").as_bytes()), purge),
            Verdict::Consistent
        );
        assert_eq!(
            verdict(Some(&data("0-1-17", b"v")), purge),
            Verdict::Consistent
        );
        assert_eq!(
            verdict(Some(&data("0-2-20", b"v")), purge),
            Verdict::Consistent
        );
        assert_eq!(
            verdict(Some(&data("0-1-16", b"v")), purge),
            Verdict::Violation {
                basis: "0-1-16".into()
            }
        );
        // An applied position with several domains: the purge's domain decides.
        assert_eq!(
            verdict(Some(&data("0-1-30,1-1-2", b"v")), purge),
            Verdict::Consistent
        );
        assert_eq!(
            verdict(Some(&data("1-1-90", b"v")), purge),
            Verdict::Violation {
                basis: "1-1-90".into()
            }
        );
        assert_eq!(
            verdict(Some(&data("bin.000002:10", b"v")), "bin.000001:900"),
            Verdict::Consistent
        );
        assert_eq!(
            verdict(Some(&data("-", b"v")), purge),
            Verdict::Unverifiable
        );
        assert_eq!(verdict(Some(b"plain value"), purge), Verdict::Unverifiable);
    }
}
