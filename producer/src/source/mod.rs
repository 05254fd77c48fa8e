//! Source stage: streams the binlog as a replica and hands each commit that produced intents
//! downstream as one [`Batch`] whose position is the end of the commit event. Three rooms:
//! - here, streaming: where to start (checkpoint, another server's checkpoint, none), one
//!   connection's read loop with heartbeats and progress lines, reconnects with backoff, and
//!   `resync` where continuity is lost;
//! - `events`: what each event does (table maps compile the rules, rows become intents,
//!   commits become batches), as plain methods unit-tested without a server, behind an adapter
//!   for mysql_common's raw events;
//! - `index`: the cascade index across reconnects and schema changes.
//!
//! What the producer asks the server outside the stream (connect, start-up checks, position,
//! foreign keys) is [`crate::server`].
//!
//! Resumption: the stream always restarts at the last commit boundary handed downstream, so a
//! reconnect mid-transaction re-reads that transaction whole. The stream ending, an error or
//! `read_timeout_secs` without traffic (the server sends heartbeats every
//! `binlog_heartbeat_secs` while idle) is a reconnect with backoff, never success.

mod events;
mod index;

use std::time::Duration;

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStreamRequest, Conn};
use rtinval_schemas::runtime::chain;
use rtinval_schemas::{Event, EventBody, SCHEMA_VERSION, event_id};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::events::Events;
use self::index::IndexSlot;
use crate::config::{Config, Rule};
use crate::error::{SourceError, is_privilege_error};
use crate::metrics::{Metrics, ReasonLabel};
use crate::position::Position;
use crate::publish::Batch;
pub use crate::server::{
    ServerInfo, check_server, connect, current_position, load_cascades, validate_rules,
};
use crate::server::{is_mariadb_gtid, privilege_error};

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

impl BinlogSource {
    pub fn new(config: Config, metrics: Metrics) -> Result<BinlogSource, SourceError> {
        let rules = config
            .compiled_rules()
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
                return Err(SourceError::NoBinlogAnswer {
                    position: position.to_string(),
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
                    warn!(position = %position, error = %chain(&e), retry_in_ms = backoff.as_millis() as u64, "Binlog stream interrupted, reconnecting.");
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
        let now = rtinval_schemas::runtime::now_ms();
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
        if !slot.built {
            self.build_index(&mut conn, &fks, slot, true).await?;
        } else if let Some(index) = slot.index.as_mut() {
            // A reconnect: the stream re-reads the unfinished transaction from its start.
            index.rollback();
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

        let mut st = Events::new(
            &self.rules,
            &self.metrics,
            &self.config.producer,
            position.clone(),
            fks,
        );
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
                        None => return Err(SourceError::StreamClosed {
                            position: st.position.to_string(),
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
                                error: e,
                            });
                        }
                        Some(Ok(event)) => event,
                    };
                    let batch = st.dispatch(slot, &stream, event)?;
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
                            .is_some_and(|ddl| slot.touched_by(&ddl));
                        self.build_index(&mut side, &st.fks, slot, touched).await?;
                        let _ = side.disconnect().await;
                        st.fks_stale = false;
                        // Time spent reading foreign keys or a snapshot is not the source's
                        // silence: the read timeout counts from here.
                        last_received = tokio::time::Instant::now();
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

    fn heartbeat(&self, st: &Events<'_>) -> Batch {
        let now = rtinval_schemas::runtime::now_ms();
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
}
