//! Consumer metrics, each declared once with its help text, and the node's readiness (served by
//! the endpoint module). Names are `rtinval_consumer_<what>_<unit>`; labels are bounded
//! (`kind`, `pool`, `cache`, `reason`, `code`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    pub cache: String,
}

/// A librdkafka error code (a bounded set of names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// A key the inspector checked: its cache and the verdict (`consistent`, `violation`,
/// `unverifiable`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InspectLabel {
    pub cache: String,
    pub verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ]
    .into_iter()
}

/// All consumer metrics; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub events_applied: Family<KindLabel, Counter>,
    pub apply_latency_seconds: Histogram,
    pub end_to_end_latency_seconds: Histogram,
    pub staleness_seconds: Gauge<f64, AtomicU64>,
    pub pool_reloads: Family<PoolLabel, Counter>,
    pub pool_reload_requests: Family<PoolLabel, Counter>,
    pub pool_reload_failures: Family<PoolLabel, Counter>,
    pub pool_reload_duration_seconds: Histogram,
    pub keys_purged: Family<CacheLabel, Counter>,
    pub cache_flushes: Family<CacheLabel, Counter>,
    pub resyncs: Family<ReasonLabel, Counter>,
    pub decode_errors: Counter,
    pub not_here: Counter,
    pub second_purges: Counter,
    pub cache_failures: Family<CacheLabel, Counter>,
    /// Requests waiting on `/wait` now.
    pub barrier_waiters: Gauge,
    /// Keys checked by `rtinval-consumer inspect`, by cache and verdict.
    pub inspected_keys: Family<InspectLabel, Counter>,
    /// Errors librdkafka reported (connection refused, DNS, TLS, auth), by error code.
    pub kafka_errors: Family<CodeLabel, Counter>,
    source_time_ms: Arc<AtomicU64>,
    assigned: Arc<AtomicBool>,
    max_staleness_ms: Arc<AtomicU64>,
    /// Why the node cannot start consuming yet (a cache or Kafka unreachable), if it cannot.
    problem: Arc<Mutex<Option<String>>>,
    /// Caches whose server restarted and that are not flushed yet, with why.
    restarted_caches: Arc<Mutex<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                r.register($name, $help, m.clone());
                m
            }};
        }
        let events_applied = reg!(
            "rtinval_consumer_events_applied",
            "Events applied on this node, by kind",
            Family::<KindLabel, Counter>::default()
        );
        let apply_latency_seconds = reg!(
            "rtinval_consumer_apply_latency_seconds",
            "Message received to its actions applied (includes debounce wait)",
            Histogram::new(latency_buckets())
        );
        let end_to_end_latency_seconds = reg!(
            "rtinval_consumer_end_to_end_latency_seconds",
            "Source commit to applied on this node (binlog timestamps have second resolution)",
            Histogram::new(latency_buckets())
        );
        let staleness_seconds = reg!(
            "rtinval_consumer_staleness_seconds",
            "Age of this node's view of the source: the newest heartbeat applied after every message received before it",
            Gauge::<f64, AtomicU64>::default()
        );
        let pool_reloads = reg!(
            "rtinval_consumer_pool_reloads",
            "Successful pool reloads",
            Family::<PoolLabel, Counter>::default()
        );
        let pool_reload_requests = reg!(
            "rtinval_consumer_pool_reload_requests",
            "Reload requests, coalesced into the reloads",
            Family::<PoolLabel, Counter>::default()
        );
        let pool_reload_failures = reg!(
            "rtinval_consumer_pool_reload_failures",
            "Failed pool reload attempts (retried)",
            Family::<PoolLabel, Counter>::default()
        );
        let pool_reload_duration_seconds = reg!(
            "rtinval_consumer_pool_reload_duration_seconds",
            "Time one successful reload took",
            Histogram::new(latency_buckets())
        );
        let keys_purged = reg!(
            "rtinval_consumer_keys_purged",
            "Keys deleted from caches (missing keys count)",
            Family::<CacheLabel, Counter>::default()
        );
        let cache_flushes = reg!(
            "rtinval_consumer_cache_flushes",
            "Whole-cache flushes",
            Family::<CacheLabel, Counter>::default()
        );
        let resyncs = reg!(
            "rtinval_consumer_resyncs",
            "Local resyncs (every pool reloaded, every cache flushed), by reason",
            Family::<ReasonLabel, Counter>::default()
        );
        let decode_errors = reg!(
            "rtinval_consumer_decode_errors",
            "Messages that could not be decoded (each caused a resync)",
            Counter::default()
        );
        let not_here = reg!(
            "rtinval_consumer_events_not_here",
            "Actions naming a pool or cache this node does not have",
            Counter::default()
        );
        let cache_failures = reg!(
            "rtinval_consumer_cache_failures",
            "Failed cache operations (purge or flush; retried until they succeed)",
            Family::<CacheLabel, Counter>::default()
        );
        let second_purges = reg!(
            "rtinval_consumer_second_purges",
            "Delayed second purges performed",
            Counter::default()
        );
        let kafka_errors = reg!(
            "rtinval_consumer_kafka_errors",
            "Errors the Kafka client reported (broker unreachable, TLS, authentication), by librdkafka error code",
            Family::<CodeLabel, Counter>::default()
        );
        let barrier_waiters = reg!(
            "rtinval_consumer_barrier_waiters",
            "Requests waiting on /wait for a source position now",
            Gauge::default()
        );
        let inspected_keys = reg!(
            "rtinval_consumer_inspected_keys",
            "Keys `rtinval-consumer inspect` checked a delay after their invalidation, by cache and verdict (consistent, violation: a cached value older than the invalidation, unverifiable: no position to compare)",
            Family::<InspectLabel, Counter>::default()
        );
        Metrics {
            registry: Arc::new(r),
            inspected_keys,
            second_purges,
            cache_failures,
            barrier_waiters,
            kafka_errors,
            problem: Arc::default(),
            events_applied,
            apply_latency_seconds,
            end_to_end_latency_seconds,
            staleness_seconds,
            pool_reloads,
            pool_reload_requests,
            pool_reload_failures,
            pool_reload_duration_seconds,
            keys_purged,
            cache_flushes,
            resyncs,
            decode_errors,
            not_here,
            source_time_ms: Arc::new(AtomicU64::new(0)),
            assigned: Arc::new(AtomicBool::new(false)),
            max_staleness_ms: Arc::new(AtomicU64::new(30_000)),
            restarted_caches: Arc::default(),
        }
    }

    pub fn pool_reloaded(&self, pool: &str, requests: u64, took: Duration) {
        let l = PoolLabel {
            pool: pool.to_owned(),
        };
        self.pool_reloads.get_or_create(&l).inc();
        self.pool_reload_requests.get_or_create(&l).inc_by(requests);
        self.pool_reload_duration_seconds
            .observe(took.as_secs_f64());
    }

    pub fn pool_reload_failed(&self, pool: &str) {
        self.pool_reload_failures
            .get_or_create(&PoolLabel {
                pool: pool.to_owned(),
            })
            .inc();
    }

    pub fn keys_purged(&self, cache: &str, n: usize) {
        self.keys_purged
            .get_or_create(&CacheLabel {
                cache: cache.to_owned(),
            })
            .inc_by(n as u64);
    }

    pub fn cache_failed(&self, cache: &str) {
        self.cache_failures
            .get_or_create(&CacheLabel {
                cache: cache.to_owned(),
            })
            .inc();
    }

    pub fn cache_flushed(&self, cache: &str) {
        self.cache_flushes
            .get_or_create(&CacheLabel {
                cache: cache.to_owned(),
            })
            .inc();
    }

    pub fn resync(&self, reason: &'static str) {
        self.resyncs.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// A heartbeat said the source is published up to `ms`.
    pub fn observe_source_time(&self, ms: u64) {
        self.source_time_ms.fetch_max(ms, Ordering::Relaxed);
        self.refresh_staleness();
    }

    /// Recompute the staleness gauge from the newest heartbeat.
    pub fn refresh_staleness(&self) -> Option<Duration> {
        let t = self.source_time_ms.load(Ordering::Relaxed);
        if t == 0 {
            return None;
        }
        let age = rtinval_schemas::runtime::now_ms().saturating_sub(t);
        self.staleness_seconds.set(age as f64 / 1000.0);
        Some(Duration::from_millis(age))
    }

    pub fn set_assigned(&self, v: bool) {
        self.assigned.store(v, Ordering::Relaxed);
    }

    pub fn set_max_staleness(&self, d: Duration) {
        self.max_staleness_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// `None` when ready, else the reason.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.assigned.load(Ordering::Relaxed) {
            let problem = self
                .problem
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            return Some(match problem {
                Some(p) => format!("not consuming yet: {p}"),
                None => "not consuming yet".into(),
            });
        }
        if let Some(reason) = self.not_ready_reason_for_caches() {
            return Some(reason);
        }
        let max = Duration::from_millis(self.max_staleness_ms.load(Ordering::Relaxed));
        match self.refresh_staleness() {
            None => Some("no heartbeat from the producer yet".into()),
            Some(age) if age > max => Some(format!(
                "stale: source view is {} s old (bound {} s)",
                age.as_secs(),
                max.as_secs()
            )),
            Some(_) => None,
        }
    }

    /// What keeps the node from consuming (shown by `/readyz`), or `None` once it is solved.
    pub fn set_problem(&self, problem: Option<String>) {
        *self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    pub fn kafka_error(&self, code: &str) {
        self.kafka_errors
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// Mark `cache` as restarted and not flushed yet (`Some(why)`), or flushed again (`None`).
    /// Returns true when the mark is new.
    pub fn set_cache_restarted(&self, cache: &str, why: Option<&str>) -> bool {
        let mut m = self
            .restarted_caches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match why {
            Some(why) => m.insert(cache.to_owned(), why.to_owned()).is_none(),
            None => m.remove(cache).is_some(),
        }
    }

    /// The caches a restart left unflushed, if any, as a not-ready reason.
    pub fn not_ready_reason_for_caches(&self) -> Option<String> {
        let m = self
            .restarted_caches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (cache, why) = m.iter().next()?;
        Some(format!(
            "cache {cache} restarted ({why}): flushing it before applying more"
        ))
    }

    pub fn encode(&self) -> String {
        self.refresh_staleness();
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl rtinval_schemas::http::Probes for Metrics {
    fn encode(&self) -> String {
        Metrics::encode(self)
    }

    fn not_ready_reason(&self) -> Option<String> {
        Metrics::not_ready_reason(self)
    }
}
