//! Producer metrics, each declared once with its help text, and the HTTP endpoint that serves
//! them (`/metrics`, `/healthz`, `/readyz`). Names are `rtinval_producer_<what>_<unit>`; labels
//! are bounded (`kind`, `table`, `op`, `reason`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rtinval_schemas::EventKind;

use crate::position::Position;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableOpLabels {
    pub table: String,
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableReasonLabels {
    pub table: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// All producer metrics; cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub events_published: Family<KindLabel, Counter>,
    pub rows: Family<TableOpLabels, Counter>,
    pub binlog_lag_seconds: Gauge<f64, AtomicU64>,
    pub publish_latency_seconds: Histogram,
    pub position_pos: Gauge,
    pub checkpoint_writes: Counter,
    pub checkpoint_timestamp_seconds: Gauge<f64, AtomicU64>,
    pub resyncs: Family<ReasonLabel, Counter>,
    pub cache_flushes: Family<ReasonLabel, Counter>,
    pub publish_backpressure: Counter,
    pub reconnects: Counter,
    /// Errors librdkafka reported (connection refused, DNS, TLS, auth), by error code.
    pub kafka_errors: Family<CodeLabel, Counter>,
    /// Rows the cascade index holds, by table.
    pub cascade_index_rows: Family<TableLabel, Gauge>,
    /// Approximate bytes the cascade index holds.
    pub cascade_index_bytes: Gauge,
    /// Tables the cascade index stopped holding (their cascades flush), by reason.
    pub cascade_index_disabled: Family<TableReasonLabels, Counter>,
    ready: Arc<AtomicBool>,
    /// Why the producer cannot stream yet (Kafka unreachable), for `/readyz`.
    problem: Arc<std::sync::Mutex<Option<String>>>,
}

/// A librdkafka error code (a bounded set of names).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
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
        let events_published = Family::<KindLabel, Counter>::default();
        r.register(
            "rtinval_producer_events_published",
            "Events acknowledged by Kafka, by kind (heartbeats count once per partition)",
            events_published.clone(),
        );
        let rows = Family::<TableOpLabels, Counter>::default();
        r.register(
            "rtinval_producer_rows",
            "Row changes seen on watched tables",
            rows.clone(),
        );
        let binlog_lag_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "rtinval_producer_binlog_lag_seconds",
            "Now minus the source timestamp of the last binlog event read (0 when caught up)",
            binlog_lag_seconds.clone(),
        );
        let publish_latency_seconds = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ]);
        r.register(
            "rtinval_producer_publish_latency_seconds",
            "Source commit time to Kafka acknowledgment (second resolution of binlog timestamps)",
            publish_latency_seconds.clone(),
        );
        let position_pos = Gauge::default();
        r.register(
            "rtinval_producer_position_bytes",
            "Binlog offset (within the current file) of the last acknowledged commit",
            position_pos.clone(),
        );
        let checkpoint_writes = Counter::default();
        r.register(
            "rtinval_producer_checkpoint_writes",
            "Checkpoints written to Kafka",
            checkpoint_writes.clone(),
        );
        let checkpoint_timestamp_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "rtinval_producer_checkpoint_timestamp_seconds",
            "Unix time of the last checkpoint write (checkpoint age = time() - this)",
            checkpoint_timestamp_seconds.clone(),
        );
        let resyncs = Family::<ReasonLabel, Counter>::default();
        r.register(
            "rtinval_producer_resyncs",
            "resync events emitted, by reason",
            resyncs.clone(),
        );
        let cache_flushes = Family::<ReasonLabel, Counter>::default();
        r.register(
            "rtinval_producer_cache_flush_escalations",
            "Caches flushed instead of purged by key, once per transaction and cache, by reason (too_many_keys, key_underivable, cascade_underivable)",
            cache_flushes.clone(),
        );
        let publish_backpressure = Counter::default();
        r.register(
            "rtinval_producer_publish_backpressure",
            "Times the Kafka client queue was full and publishing waited",
            publish_backpressure.clone(),
        );
        let reconnects = Counter::default();
        r.register(
            "rtinval_producer_source_reconnects",
            "Binlog stream reconnects after a transient error",
            reconnects.clone(),
        );
        let kafka_errors = Family::<CodeLabel, Counter>::default();
        r.register(
            "rtinval_producer_kafka_errors",
            "Errors the Kafka client reported (broker unreachable, TLS, authentication), by librdkafka error code",
            kafka_errors.clone(),
        );
        let cascade_index_rows = Family::<TableLabel, Gauge>::default();
        r.register(
            "rtinval_producer_cascade_index_rows",
            "Child rows the cascade index holds, by table (set after each build and progress line)",
            cascade_index_rows.clone(),
        );
        let cascade_index_bytes = Gauge::default();
        r.register(
            "rtinval_producer_cascade_index_bytes",
            "Approximate heap bytes of the cascade index",
            cascade_index_bytes.clone(),
        );
        let cascade_index_disabled = Family::<TableReasonLabels, Counter>::default();
        r.register(
            "rtinval_producer_cascade_index_disabled",
            "Tables the cascade index stopped holding (max_rows, no identity, schema change): their cascades flush",
            cascade_index_disabled.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            cascade_index_rows,
            cascade_index_bytes,
            cascade_index_disabled,
            events_published,
            rows,
            binlog_lag_seconds,
            publish_latency_seconds,
            position_pos,
            checkpoint_writes,
            checkpoint_timestamp_seconds,
            resyncs,
            cache_flushes,
            publish_backpressure,
            reconnects,
            kafka_errors,
            ready: Arc::new(AtomicBool::new(false)),
            problem: Arc::default(),
        }
    }

    pub fn published(&self, kind: EventKind, committed_at_ms: u64) {
        self.events_published
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
        if kind != EventKind::Heartbeat && committed_at_ms > 0 {
            let now = rtinval_schemas::runtime::now_ms();
            self.publish_latency_seconds
                .observe(now.saturating_sub(committed_at_ms) as f64 / 1000.0);
        }
    }

    pub fn set_position(&self, p: &Position) {
        self.position_pos
            .set(i64::try_from(p.pos).unwrap_or(i64::MAX));
    }

    pub fn checkpoint_written(&self) {
        self.checkpoint_writes.inc();
        self.checkpoint_timestamp_seconds
            .set(rtinval_schemas::runtime::now_ms() as f64 / 1000.0);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// What keeps the producer from streaming (shown by `/readyz`), or `None` once solved.
    pub fn set_problem(&self, problem: Option<String>) {
        *self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
    }

    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.is_ready() {
            return None;
        }
        let problem = self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Some(problem.unwrap_or_else(|| "not streaming the binlog".into()))
    }

    pub fn kafka_error(&self, code: &str) {
        self.kafka_errors
            .get_or_create(&CodeLabel {
                code: code.to_owned(),
            })
            .inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
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

/// Serve `/metrics`, `/healthz` (alive) and `/readyz` (streaming) on `listener` until
/// `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, rtinval_schemas::http::router(metrics))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
