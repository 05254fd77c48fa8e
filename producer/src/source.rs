//! Source stage: connects to MySQL/MariaDB as a replica, checks the server settings, validates
//! the rules against the live schema, and streams the binlog. Row events of watched tables are
//! decoded ([`crate::decode`]), turned into intents ([`crate::rules`]) and batched per
//! transaction ([`crate::batch`]); each commit's events leave as one [`Batch`] whose position is
//! the end of the commit event.
//!
//! Resumption: the stream always restarts at the last commit boundary handed downstream, so a
//! reconnect mid-transaction re-reads that transaction whole. The stream ending, an error or
//! `read_timeout_secs` without traffic (the server sends heartbeats every
//! `binlog_heartbeat_secs` while idle) is a reconnect with backoff, never success.
//!
//! MariaDB specifics covered here: GTID events arrive as raw bytes (parsed below); the first
//! ROTATE after connect precedes the format description and carries the checksum glued to the
//! file name (it is ignored: we know the file we asked for).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{Event as BinlogEvent, EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn};
use rtinval_schemas::{Event, EventBody, Op, SCHEMA_VERSION, event_id};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::batch::{Batcher, Commit};
use crate::cascade::CascadeChain;
use crate::cascade_index::{self, Binding, CascadeIndex};
use crate::config::{Config, Rule};
use crate::decode::{self, RowChange, Value};
use crate::error::{SourceError, is_privilege_error};
use crate::metrics::{Metrics, ReasonLabel, TableLabel, TableOpLabels, TableReasonLabels};
use crate::position::{Position, binlog_order};
use crate::publish::Batch;
use crate::rules::{DdlEffect, Intent, TableRules, ddl_effect};
pub use crate::server::{
    ServerInfo, check_server, connect, current_position, load_cascades, validate_rules,
};
use crate::server::{is_mariadb_gtid, privilege_error};

/// MariaDB event types that mysql_common does not decode.
const MARIADB_ANNOTATE_ROWS: u8 = 160;
const MARIADB_BINLOG_CHECKPOINT: u8 = 161;
const MARIADB_GTID: u8 = 162;
const MARIADB_GTID_LIST: u8 = 163;
/// MariaDB GTID event flag: a standalone statement (DDL) with no BEGIN/COMMIT around it.
const MARIADB_FL_STANDALONE: u8 = 1;
/// Server error "could not find first log file name in binary log index file" and relatives.
const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;

/// Where to start streaming.
#[derive(Debug, Clone)]
pub enum Start {
    /// Resume from a stored checkpoint.
    Checkpoint(Position),
    /// No checkpoint: start at the server's current position and publish a `resync`, since
    /// changes before now were never published.
    Current,
}

/// The source stage.
pub struct BinlogSource {
    config: Config,
    rules: Vec<Rule>,
    metrics: Metrics,
}

/// A table map's compiled rules, and how its columns line up with the cascade index.
struct Watched {
    rules: TableRules,
    index: Option<Binding>,
}

/// The cascade index ([`crate::cascade_index`]) across reconnects, and from where on it is
/// complete.
#[derive(Default)]
struct IndexSlot {
    index: Option<CascadeIndex>,
    /// The snapshot's binlog position (file, offset).
    snapshot: Option<(String, u64)>,
    /// The stream has passed the snapshot position: chains the index covers need no fallback.
    live: bool,
    /// Built (or found unneeded) for the current foreign keys.
    built: bool,
}

impl IndexSlot {
    /// Has the stream reached the snapshot position? `file`/`pos` is where the event being
    /// read starts (or a commit boundary): every event from the snapshot position on changes
    /// rows the snapshot did not hold.
    fn advance(&mut self, file: &str, pos: u64) {
        if self.live || self.index.is_none() {
            return;
        }
        if let Some((snap_file, snap_pos)) = &self.snapshot
            && binlog_order((file, pos), (snap_file, *snap_pos)) != std::cmp::Ordering::Less
        {
            self.live = true;
            info!(position = %format!("{file}:{pos}"), "Cascade index complete: the stream reached its snapshot position; cascaded keys are exact from here on.");
        }
    }

    fn covers(&self, table: &str) -> bool {
        self.live && self.index.as_ref().is_some_and(|i| i.covers(table))
    }

    /// Does DDL `query` (default database `schema`) change the rows of an indexed table without
    /// row events ([`ddl_effect`]: `TRUNCATE`, `DROP`, `RENAME`, a swapped tablespace or
    /// partition)? Other schema changes keep the rows; a changed column set or type changes
    /// the plan, which rebuilds anyway.
    fn touched_by(&self, schema: &str, query: &str) -> bool {
        self.index.as_ref().is_some_and(|ix| {
            ix.plan().tables.iter().any(|t| {
                let (db, name) = t.table.split_once('.').unwrap_or(("", &t.table));
                ddl_effect(schema, query, db, name) != DdlEffect::Kept
            })
        })
    }
}

/// Per-stream state (reset on reconnect, except `position`).
struct StreamState {
    /// Last commit boundary handed downstream (or passed without events).
    position: Position,
    /// Binlog file of the events being read.
    file: String,
    seen_fde: bool,
    tables: HashMap<u64, Option<Arc<Watched>>>,
    batcher: Batcher,
    gtid: Option<String>,
    standalone: bool,
    /// True after a server heartbeat with nothing read since: we are caught up as of now.
    caught_up: bool,
    last_commit_ms: u64,
    intents: Vec<Intent>,
    /// Cascade paths by parent `database.table`, each ending at a table with rules.
    fks: BTreeMap<String, Vec<CascadeChain>>,
    /// A DDL statement passed: foreign keys must be read again before the next table map.
    fks_stale: bool,
    /// The last DDL statement: (default database, query).
    last_ddl: Option<(String, String)>,
    /// Since the last progress line: rows of watched tables, batches sent.
    rows_seen: u64,
    batches_sent: u64,
}

impl BinlogSource {
    pub fn new(config: Config, metrics: Metrics) -> Result<BinlogSource, SourceError> {
        let rules = config
            .rules()
            .map_err(|e| SourceError::RuleDoesNotMatchSchema {
                table: "?".into(),
                msg: e.to_string(),
            })?;
        Ok(BinlogSource {
            config,
            rules,
            metrics,
        })
    }

    async fn connect(&self) -> Result<Conn, SourceError> {
        connect(&self.config.source.url).await
    }

    /// The server's current position, on a connection of its own.
    async fn current_position(&self, server_id: u32) -> Result<Position, SourceError> {
        let mut conn = self.connect().await?;
        let position = current_position(&mut conn, server_id).await?;
        let _ = conn.disconnect().await;
        Ok(position)
    }

    /// Connect once and run the start-up checks: server settings, rules against the schema, and
    /// a short binlog read that proves the account may replicate.
    pub async fn check(&self) -> Result<ServerInfo, SourceError> {
        let mut conn = self.connect().await?;
        let info = check_server(&mut conn).await?;
        validate_rules(&mut conn, &self.rules).await?;
        let position = current_position(&mut conn, info.server_id).await?;
        // A replica id of its own: reusing the producer's would disconnect a running leader.
        let probe_id = self.config.source.server_id.wrapping_add(0x4000_0000);
        let request = BinlogStreamRequest::new(probe_id)
            .with_filename(position.file.as_bytes())
            .with_pos(position.pos)
            .with_non_blocking();
        let mut stream = conn
            .get_binlog_stream(request)
            .await
            .map_err(privilege_error)?;
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Err(e))) => return Err(privilege_error(e)),
            Ok(_) => {}
            Err(_) => {
                return Err(SourceError::Stream {
                    position: position.to_string(),
                    error: "no answer to a binlog request within 10 s".into(),
                });
            }
        }
        let _ = stream.close().await;
        Ok(info)
    }

    /// Stream until `shutdown`, reconnecting on transient errors. `info` is what
    /// [`BinlogSource::check`] returned.
    pub async fn run(
        self,
        info: ServerInfo,
        start: Start,
        output: mpsc::Sender<Batch>,
        shutdown: CancellationToken,
    ) -> Result<(), SourceError> {
        info!(server_id = info.server_id, version = %info.version, "Source server checks passed.");
        let mut position = match start {
            Start::Checkpoint(p) if p.server_id != info.server_id => {
                // The checkpoint names a position in another server's binlog (failover to a new
                // primary, a restored server): its file:pos means nothing here.
                let current = self.current_position(info.server_id).await?;
                warn!(
                    checkpoint = %p,
                    checkpoint_server_id = p.server_id,
                    server_id = info.server_id,
                    resume = %current,
                    "The checkpoint belongs to another server: publishing resync and starting at the current position."
                );
                self.send_resync(&current, "server_changed", &output)
                    .await?;
                current
            }
            Start::Checkpoint(p) => match self.history_at(&p).await? {
                Some(server_state) => {
                    // Same server id, another history (a server rebuilt or restored with the
                    // same id): the file:pos names a different place in a different binlog.
                    let current = self.current_position(info.server_id).await?;
                    warn!(
                        checkpoint = %p,
                        server_gtid_at_position = %server_state,
                        resume = %current,
                        "The server's binlog at the checkpoint holds another transaction than the checkpoint's: publishing resync and starting at the current position."
                    );
                    self.send_resync(&current, "history_changed", &output)
                        .await?;
                    current
                }
                None => {
                    info!(position = %p, "Resuming from checkpoint.");
                    p
                }
            },
            Start::Current => {
                let p = self.current_position(info.server_id).await?;
                warn!(position = %p, "No checkpoint found: starting at the current position and publishing a resync.");
                self.send_resync(&p, "no_checkpoint", &output).await?;
                p
            }
        };
        let mut backoff = Duration::from_millis(200);
        let mut slot = IndexSlot::default();
        loop {
            let result = self
                .stream(&mut position, &mut slot, &output, &shutdown)
                .await;
            self.metrics.set_ready(false);
            match result {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() => {
                    self.metrics.reconnects.inc();
                    warn!(position = %position, error = %e, retry_in_ms = backoff.as_millis() as u64, "Binlog stream interrupted, reconnecting.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
                Err(SourceError::PositionLost { error, .. }) => {
                    // The position is gone (binlogs purged, or another server): say so, publish
                    // a resync and continue from the server's current position.
                    let current = self.current_position(info.server_id).await?;
                    warn!(lost = %position, resume = %current, server_error = %error, "Binlog position no longer on the server: publishing resync.");
                    self.send_resync(&current, "position_lost", &output).await?;
                    position = current;
                    // The skipped changes never reached the cascade index: build it again.
                    slot = IndexSlot::default();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// MariaDB: `Some(the server's GTID state at the checkpoint position)` when it does not hold
    /// the checkpoint's GTID — the binlog at that file:pos is another history. `None` when it
    /// matches, or when it cannot be told (no GTID in the checkpoint, a MySQL GTID, or the
    /// position is gone: streaming reports that as a lost position).
    async fn history_at(&self, p: &Position) -> Result<Option<String>, SourceError> {
        let Some(gtid) = p.gtid.as_deref().filter(|g| is_mariadb_gtid(g)) else {
            return Ok(None);
        };
        let mut conn = self.connect().await?;
        let state: Option<Option<String>> = conn
            .exec_first("SELECT BINLOG_GTID_POS(?, ?)", (&p.file, p.pos))
            .await?;
        let _ = conn.disconnect().await;
        let Some(state) = state.flatten() else {
            return Ok(None);
        };
        let domain = gtid.split('-').next().unwrap_or_default();
        let held = state
            .split(',')
            .map(str::trim)
            .find(|g| g.split('-').next() == Some(domain));
        Ok((held != Some(gtid)).then(|| {
            if state.is_empty() {
                "(none)".to_owned()
            } else {
                state
            }
        }))
    }

    async fn send_resync(
        &self,
        p: &Position,
        reason: &'static str,
        output: &mpsc::Sender<Batch>,
    ) -> Result<(), SourceError> {
        self.metrics
            .resyncs
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let now = crate::now_ms();
        let event = Event {
            schema_version: SCHEMA_VERSION,
            id: event_id(p.server_id, &p.file, p.pos, 0),
            source: p.source(now),
            emitted_at: now,
            body: EventBody::Resync {
                reason: reason.to_owned(),
            },
        };
        output
            .send(Batch {
                position: p.clone(),
                events: vec![event],
            })
            .await
            .map_err(|_| SourceError::OutputClosed)
    }

    /// One connection's worth of streaming. Returns `Ok` only on shutdown.
    async fn stream(
        &self,
        position: &mut Position,
        slot: &mut IndexSlot,
        output: &mpsc::Sender<Batch>,
        shutdown: &CancellationToken,
    ) -> Result<(), SourceError> {
        let mut conn = self.connect().await?;
        let fks = load_cascades(&mut conn, &self.rules).await?;
        match slot.index.as_mut() {
            // A reconnect: the stream re-reads the unfinished transaction from its start.
            Some(index) if slot.built => index.rollback(),
            _ if slot.built => {}
            _ => self.build_index(&mut conn, &fks, slot, true).await?,
        }
        let hb_ns = self.config.source.binlog_heartbeat_secs.max(1) * 1_000_000_000;
        conn.query_drop(format!("SET @master_heartbeat_period = {hb_ns}"))
            .await?;
        // GTID events instead of fake BEGIN queries, so events carry their GTID.
        conn.query_drop("SET @mariadb_slave_capability = 4").await?;
        let request = BinlogStreamRequest::new(self.config.source.server_id)
            .with_filename(position.file.as_bytes())
            .with_pos(position.pos);
        let mut stream = conn.get_binlog_stream(request).await?;
        info!(position = %position, "Streaming binlog.");
        self.metrics.set_ready(true);

        let settings = &self.config.producer;
        let mut st = StreamState {
            position: position.clone(),
            file: position.file.clone(),
            seen_fde: false,
            tables: HashMap::new(),
            batcher: Batcher::new(settings.max_keys_per_transaction, settings.keys_per_event),
            gtid: None,
            standalone: false,
            caught_up: false,
            last_commit_ms: 0,
            intents: Vec::new(),
            fks,
            fks_stale: false,
            last_ddl: None,
            rows_seen: 0,
            batches_sent: 0,
        };
        let progress_every = Duration::from_secs(self.config.producer.progress_log_secs.max(1));
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let read_timeout = Duration::from_secs(self.config.source.read_timeout_secs.max(1));
        let mut last_received = tokio::time::Instant::now();
        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A heartbeat soon after published events: the barrier's proof for other partitions.
        let progress_after = Duration::from_millis(self.config.producer.progress_heartbeat_ms);
        let mut progress_due: Option<tokio::time::Instant> = None;
        let mut progress_sent: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    *position = st.position.clone();
                    return Ok(());
                }
                _ = progress.tick(), if self.config.producer.progress_log_secs > 0 => {
                    let indexed = self.index_gauges(slot);
                    info!(
                        position = %st.position,
                        rows = st.rows_seen,
                        batches = st.batches_sent,
                        lag_seconds = self.metrics.binlog_lag_seconds.get(),
                        cascade_index_rows = indexed,
                        "Progress."
                    );
                    st.rows_seen = 0;
                    st.batches_sent = 0;
                }
                _ = heartbeat.tick() => {
                    let batch = self.heartbeat(&st);
                    let sending = tokio::time::Instant::now();
                    output.send(batch).await.map_err(|_| SourceError::OutputClosed)?;
                    // Time spent waiting on a full channel (Kafka slow) is not the source's silence.
                    last_received += sending.elapsed();
                    progress_due = None;
                }
                _ = tokio::time::sleep_until(progress_due.unwrap_or_else(tokio::time::Instant::now)), if progress_due.is_some() => {
                    progress_due = None;
                    let batch = self.heartbeat(&st);
                    let sending = tokio::time::Instant::now();
                    output.send(batch).await.map_err(|_| SourceError::OutputClosed)?;
                    last_received += sending.elapsed();
                    progress_sent = Some(sending);
                }
                // Its own deadline, not a timeout around `next()`: the heartbeat branch above
                // would otherwise restart that timeout every tick and a half-open link would
                // never be noticed.
                _ = tokio::time::sleep_until(last_received + read_timeout) => {
                    return Err(SourceError::ReadTimeout {
                        position: st.position.to_string(),
                        secs: read_timeout.as_secs(),
                    });
                }
                next = stream.next() => {
                    last_received = tokio::time::Instant::now();
                    let event = match next {
                        None => return Err(SourceError::Stream {
                            position: st.position.to_string(),
                            error: "the server closed the binlog stream".into(),
                        }),
                        Some(Err(mysql_async::Error::Server(e)))
                            if e.code == ER_MASTER_FATAL_ERROR_READING_BINLOG =>
                        {
                            return Err(SourceError::PositionLost {
                                position: st.position.to_string(),
                                error: e.message,
                            });
                        }
                        Some(Err(mysql_async::Error::Server(e))) if is_privilege_error(e.code) => {
                            return Err(SourceError::MissingPrivilege { msg: e.message });
                        }
                        Some(Err(e)) => {
                            return Err(SourceError::Stream {
                                position: st.position.to_string(),
                                error: e.to_string(),
                            });
                        }
                        Some(Ok(event)) => event,
                    };
                    let batch = self.handle(&mut st, slot, &stream, event)?;
                    *position = st.position.clone();
                    self.report_notices(slot);
                    if st.fks_stale {
                        // After DDL: constraints may have changed. Read them on a side connection;
                        // the cascade index is built again if its plan changed (tables, columns,
                        // column types) or the statement changed an indexed table's rows
                        // unlogged (TRUNCATE, DROP, RENAME).
                        let mut side = self.connect().await?;
                        st.fks = load_cascades(&mut side, &self.rules).await?;
                        let touched = st
                            .last_ddl
                            .take()
                            .is_some_and(|(schema, q)| slot.touched_by(&schema, &q));
                        self.build_index(&mut side, &st.fks, slot, touched).await?;
                        let _ = side.disconnect().await;
                        st.fks_stale = false;
                    }
                    if let Some(batch) = batch {
                        st.batches_sent += 1;
                        output.send(batch).await.map_err(|_| SourceError::OutputClosed)?;
                        last_received = tokio::time::Instant::now();
                        // Right behind the events if none went out within the window (so both
                        // reach a node in one fetch), else once at the window's end.
                        if progress_due.is_none() && !progress_after.is_zero() {
                            match progress_sent {
                                Some(t) if last_received < t + progress_after => {
                                    progress_due = Some(t + progress_after);
                                }
                                _ => {
                                    output
                                        .send(self.heartbeat(&st))
                                        .await
                                        .map_err(|_| SourceError::OutputClosed)?;
                                    progress_sent = Some(last_received);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn heartbeat(&self, st: &StreamState) -> Batch {
        let now = crate::now_ms();
        let source_time = if st.caught_up { now } else { st.last_commit_ms };
        let p = &st.position;
        Batch {
            position: p.clone(),
            events: vec![Event {
                schema_version: SCHEMA_VERSION,
                // Heartbeats derive from no change; the emission time makes the id unique.
                id: event_id(p.server_id, &p.file, p.pos, now as usize),
                source: p.source(st.last_commit_ms),
                emitted_at: now,
                body: EventBody::Heartbeat { source_time },
            }],
        }
    }

    /// Build the cascade index for `chains` from a consistent snapshot on `conn`, unless it is
    /// off, unneeded, or (`force` false) already built for the same plan. A snapshot the account
    /// may not read leaves it off, with one warning: cascades then flush as without it.
    async fn build_index(
        &self,
        conn: &mut Conn,
        chains: &BTreeMap<String, Vec<CascadeChain>>,
        slot: &mut IndexSlot,
        force: bool,
    ) -> Result<(), SourceError> {
        let settings = &self.config.producer;
        if !settings.cascade_index {
            slot.built = true;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let needed = cascade_index::needed_tables(chains, &self.rules);
        let facts = cascade_index::table_facts(conn, &needed).await?;
        let (plan, excluded) = cascade_index::plan(chains, &self.rules, &needed, &facts);
        let same = slot.built
            && match &slot.index {
                Some(ix) => *ix.plan() == plan,
                None => plan.tables.is_empty(),
            };
        if same && !force {
            return Ok(());
        }
        for (table, why) in &excluded {
            warn!(table = %table, reason = %why, "Cascade index: not holding this table; cascades through it flush the caches their keys live in.");
            self.metrics
                .cascade_index_disabled
                .get_or_create(&TableReasonLabels {
                    table: table.clone(),
                    reason: "not_indexable",
                })
                .inc();
        }
        *slot = IndexSlot {
            built: true,
            ..IndexSlot::default()
        };
        if plan.tables.is_empty() {
            self.index_gauges(slot);
            return Ok(());
        }
        let mut index = CascadeIndex::new(plan, &self.rules, settings.cascade_index_max_rows);
        let snapshot = match cascade_index::load(conn, &mut index).await {
            Ok(p) => p,
            Err(SourceError::Query(mysql_async::Error::Server(e)))
                if is_privilege_error(e.code) =>
            {
                let _ = conn.query_drop("ROLLBACK").await;
                warn!(error = %e.message, "Cascade index: the account may not read the child tables (GRANT SELECT ON the watched schemas); cascades flush the caches their keys live in.");
                return Ok(());
            }
            Err(e) => {
                slot.built = false;
                return Err(e);
            }
        };
        let tables: Vec<String> = index
            .row_counts()
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        slot.index = Some(index);
        slot.snapshot = Some(snapshot.clone());
        self.report_notices(slot);
        let rows = self.index_gauges(slot);
        info!(
            tables = %tables.join(" "),
            rows,
            bytes = self.metrics.cascade_index_bytes.get(),
            snapshot = %format!("{}:{}", snapshot.0, snapshot.1),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "Cascade index built from a consistent snapshot."
        );
        Ok(())
    }

    /// Log and count the cascade index's decisions (tables it stopped holding).
    fn report_notices(&self, slot: &mut IndexSlot) {
        let Some(index) = slot.index.as_mut() else {
            return;
        };
        for n in index.take_notices() {
            warn!(table = %n.table, reason = n.reason, detail = %n.detail, "Cascade index: stopped holding this table; cascades through it flush the caches their keys live in.");
            self.metrics
                .cascade_index_disabled
                .get_or_create(&TableReasonLabels {
                    table: n.table,
                    reason: n.reason,
                })
                .inc();
        }
    }

    /// Set the cascade index's gauges; returns the rows it holds.
    fn index_gauges(&self, slot: &IndexSlot) -> u64 {
        let Some(index) = &slot.index else {
            self.metrics.cascade_index_bytes.set(0);
            return 0;
        };
        let mut total = 0;
        for (table, n) in index.row_counts() {
            total += n as u64;
            self.metrics
                .cascade_index_rows
                .get_or_create(&TableLabel {
                    table: table.to_owned(),
                })
                .set(n as i64);
        }
        self.metrics
            .cascade_index_bytes
            .set(index.bytes_estimate() as i64);
        total
    }

    /// Handle one binlog event; returns a batch at a commit that produced events.
    fn handle(
        &self,
        st: &mut StreamState,
        slot: &mut IndexSlot,
        stream: &mysql_async::BinlogStream,
        event: BinlogEvent,
    ) -> Result<Option<Batch>, SourceError> {
        let header = event.header();
        let raw_type = header.event_type_raw();
        if raw_type == EventType::HEARTBEAT_EVENT as u8 {
            st.caught_up = true;
            self.metrics.binlog_lag_seconds.set(0.0);
            return Ok(None);
        }
        st.caught_up = false;
        if !slot.live && header.log_pos() != 0 {
            let start = header.log_pos().saturating_sub(header.event_size());
            slot.advance(&st.file, u64::from(start));
        }
        if header.timestamp() != 0 {
            let lag = crate::now_ms().saturating_sub(u64::from(header.timestamp()) * 1000);
            self.metrics.binlog_lag_seconds.set(lag as f64 / 1000.0);
        }
        match raw_type {
            MARIADB_GTID => {
                let d = event.data();
                if d.len() >= 13 {
                    let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
                    let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
                    st.gtid = Some(format!("{domain}-{}-{seq}", header.server_id()));
                    st.standalone = d[12] & MARIADB_FL_STANDALONE != 0;
                }
                return Ok(None);
            }
            MARIADB_ANNOTATE_ROWS | MARIADB_BINLOG_CHECKPOINT | MARIADB_GTID_LIST => {
                return Ok(None);
            }
            _ => {}
        }
        let pos_err = |e: std::io::Error, table: &str| SourceError::Decode {
            position: format!("{}:{}", st.file, header.log_pos()),
            table: table.to_owned(),
            error: e.to_string(),
        };
        let Some(data) = event.read_data().map_err(|e| pos_err(e, "-"))? else {
            return Ok(None);
        };
        match data {
            EventData::FormatDescriptionEvent(_) => st.seen_fde = true,
            // Before the format description the name has the checksum glued on: ignore it.
            EventData::RotateEvent(r) if st.seen_fde => {
                st.file = r.name().into_owned();
                debug!(file = %st.file, "Binlog rotated.");
            }
            EventData::TableMapEvent(tme) => {
                let table_id = tme.table_id();
                if let std::collections::hash_map::Entry::Vacant(entry) = st.tables.entry(table_id)
                {
                    let db = tme.database_name();
                    let name = tme.table_name();
                    let rules: Vec<&Rule> = self
                        .rules
                        .iter()
                        .filter(|r| r.database == db && r.table == name)
                        .collect();
                    let qualified = format!("{db}.{name}");
                    let cascades: Vec<(CascadeChain, Vec<&Rule>)> = st
                        .fks
                        .get(&qualified)
                        .into_iter()
                        .flatten()
                        .map(|chain| {
                            let reached: Vec<&Rule> = self
                                .rules
                                .iter()
                                .filter(|r| r.qualified_table() == chain.child())
                                .collect();
                            (chain.clone(), reached)
                        })
                        .collect();
                    let involved = slot
                        .index
                        .as_ref()
                        .is_some_and(|ix| ix.involves(&qualified));
                    let compiled = if rules.is_empty() && cascades.is_empty() && !involved {
                        None
                    } else {
                        let shape = decode::TableShape::from_table_map(&tme).ok_or_else(|| {
                            SourceError::InvalidServerSetting {
                                setting: "binlog_row_metadata",
                                expected: "FULL",
                                actual: format!(
                                    "(no column names in the table map of {qualified})"
                                ),
                            }
                        })?;
                        let index = slot
                            .index
                            .as_ref()
                            .and_then(|ix| ix.bind(&qualified, &shape.names));
                        let t =
                            TableRules::compile_with_cascades(&qualified, &rules, &cascades, shape);
                        if !t.missing_columns.is_empty() {
                            warn!(table = %qualified, missing = ?t.missing_columns, "Rules reference columns the table no longer has: their keys become cache flushes.");
                        }
                        Some(Arc::new(Watched { rules: t, index }))
                    };
                    entry.insert(compiled);
                }
            }
            EventData::RowsEvent(rows) => {
                let op = match &rows {
                    RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                        Op::Insert
                    }
                    RowsEventData::UpdateRowsEventV1(_)
                    | RowsEventData::UpdateRowsEvent(_)
                    | RowsEventData::PartialUpdateRowsEvent(_) => Op::Update,
                    RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => {
                        Op::Delete
                    }
                };
                let table_id = rows.table_id();
                let Some(Some(watched)) = st.tables.get(&table_id).cloned() else {
                    return Ok(None);
                };
                let rules = &watched.rules;
                let Some(tme) = stream.get_tme(table_id) else {
                    return Err(pos_err(
                        std::io::Error::other("rows event without a table map"),
                        &rules.table,
                    ));
                };
                let counter = self.metrics.rows.get_or_create(&TableOpLabels {
                    table: rules.table.to_string(),
                    op: op.as_str(),
                });
                st.batcher.touch(&rules.table, op);
                let mut apply = |before: Option<Vec<Value>>, after: Option<Vec<Value>>| {
                    let change = RowChange { op, before, after };
                    let batcher = &st.batcher;
                    rules.intents_with(
                        &change,
                        &mut st.intents,
                        |c| batcher.is_flushed(c),
                        |t| slot.covers(t),
                    );
                    if let (Some(index), Some(b)) = (slot.index.as_mut(), &watched.index) {
                        index.logged(
                            b,
                            op,
                            change.before.as_deref(),
                            change.after.as_deref(),
                            &mut st.intents,
                        );
                    }
                    for intent in st.intents.drain(..) {
                        st.batcher.add(intent);
                    }
                    st.rows_seen += 1;
                };
                let mut n = 0u64;
                // The shape's own decoder (column facts read once per table map); mysql_common's
                // row iterator where it does not apply (MySQL partial JSON updates).
                if let Some(decoded) = rules.shape.rows(&rows) {
                    for row in decoded {
                        let (before, after) = row.map_err(|e| pos_err(e, &rules.table))?;
                        apply(before, after);
                        n += 1;
                    }
                } else {
                    for row in rows.rows(tme) {
                        let (before, after) = row.map_err(|e| pos_err(e, &rules.table))?;
                        apply(
                            before.map(|r| rules.shape.values(r)),
                            after.map(|r| rules.shape.values(r)),
                        );
                        n += 1;
                    }
                }
                counter.inc_by(n);
            }
            EventData::XidEvent(_) => {
                return Ok(self.commit(st, slot, header.log_pos(), header.timestamp()));
            }
            EventData::QueryEvent(q) => {
                let query = q.query();
                let trimmed = query.trim();
                if trimmed.eq_ignore_ascii_case("BEGIN") {
                    st.batcher.clear();
                } else if trimmed.eq_ignore_ascii_case("COMMIT") {
                    return Ok(self.commit(st, slot, header.log_pos(), header.timestamp()));
                } else if trimmed.eq_ignore_ascii_case("ROLLBACK") {
                    st.batcher.clear();
                    if let Some(index) = slot.index.as_mut() {
                        index.rollback();
                    }
                } else {
                    // DDL (or a statement on a non-transactional table): a boundary. Table ids
                    // of altered tables change, so cached compilations are dropped too.
                    debug!(query = %trimmed.chars().take(200).collect::<String>(), "DDL in binlog.");
                    st.tables.clear();
                    st.fks_stale = true;
                    let schema = q.schema().into_owned();
                    let was_empty = st.batcher.is_empty();
                    self.emptied_by_ddl(st, &schema, trimmed);
                    st.last_ddl = Some((schema, trimmed.to_owned()));
                    if st.standalone || was_empty {
                        return Ok(self.commit(st, slot, header.log_pos(), header.timestamp()));
                    }
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// DDL that removes a watched table's rows without row events (`TRUNCATE`, `DROP`): the
    /// widest safe action for each of its rules — flush the cache (reason `table_emptied`),
    /// reset the pools — in the statement's own transaction, with one log line.
    fn emptied_by_ddl(&self, st: &mut StreamState, schema: &str, query: &str) {
        let mut emptied = BTreeSet::new();
        for rule in &self.rules {
            if ddl_effect(schema, query, &rule.database, &rule.table) != DdlEffect::Emptied {
                continue;
            }
            let table: Arc<str> = Arc::from(rule.qualified_table());
            st.batcher.touch(&table, Op::Delete);
            for pool in &rule.reset_pools {
                st.batcher.add(Intent::ResetPool(Arc::from(pool.as_str())));
            }
            if let Some(cache) = &rule.cache {
                st.batcher.add(Intent::FlushCache {
                    cache: Arc::from(cache.as_str()),
                    reason: "table_emptied",
                });
            }
            emptied.insert(table);
        }
        if !emptied.is_empty() {
            let tables: Vec<&str> = emptied.iter().map(|t| &**t).collect();
            warn!(tables = %tables.join(", "), query = %query.chars().take(200).collect::<String>(), "DDL removed the rows of watched tables without row events: flushing their caches and resetting their pools.");
        }
    }

    /// A commit boundary: move the position, and emit the transaction's events if any.
    fn commit(
        &self,
        st: &mut StreamState,
        slot: &mut IndexSlot,
        log_pos: u32,
        timestamp: u32,
    ) -> Option<Batch> {
        st.position = Position {
            file: st.file.clone(),
            pos: u64::from(log_pos),
            gtid: st.gtid.take().or_else(|| st.position.gtid.clone()),
            server_id: st.position.server_id,
        };
        if let Some(index) = slot.index.as_mut() {
            index.commit();
        }
        slot.advance(&st.position.file, st.position.pos);
        st.standalone = false;
        st.last_commit_ms = u64::from(timestamp) * 1000;
        for reason in st.batcher.flush_reasons() {
            self.metrics
                .cache_flushes
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        if st.batcher.is_empty() {
            st.batcher.clear();
            return None;
        }
        let commit = Commit {
            server_id: st.position.server_id,
            gtid: st.position.gtid.clone(),
            file: st.position.file.clone(),
            pos: st.position.pos,
            committed_at: st.last_commit_ms,
        };
        let events = st.batcher.finish(&commit, crate::now_ms());
        Some(Batch {
            position: st.position.clone(),
            events,
        })
    }
}
