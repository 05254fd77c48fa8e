//! Event handling: what each binlog event does to the stream's state, as plain methods that
//! take decoded values ([`Events::gtid`], [`Events::table_map`], [`Events::rows`],
//! [`Events::commit`], [`Events::query`]) so they are unit-tested without a server, and the
//! adapter that turns mysql_common's raw events into those calls ([`Events::dispatch`]).
//!
//! Per table map the table's rules (and the cascades that start at it) are compiled once
//! ([`TableRules::for_table`]); rows of tables nobody watches are never decoded. Each commit
//! boundary moves the position and turns the transaction's intents into one [`Batch`].
//!
//! MariaDB specifics: GTID events arrive as raw bytes (parsed in the adapter); the first ROTATE
//! after connecting precedes the format description and carries the checksum glued to the file
//! name (ignored: the stream knows the file it asked for).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use mysql_async::binlog::EventType;
use mysql_async::binlog::events::{Event as BinlogEvent, EventData, RowsEventData};
use rtinval_schemas::Op;
use tracing::{debug, warn};

use super::index::IndexSlot;
use crate::batch::{Batcher, Commit};
use crate::cascade::CascadeChain;
use crate::cascade_index::Binding;
use crate::config::ProducerSettings;
use crate::decode::{RowChange, RowImages, TableShape};
use crate::error::SourceError;
use crate::metrics::{Metrics, ReasonLabel, TableOpLabels};
use crate::position::Position;
use crate::publish::Batch;
use crate::rules::{Ddl, DdlEffect, Intent, Rule, TableRules};

/// MariaDB event types that mysql_common does not decode.
const MARIADB_ANNOTATE_ROWS: u8 = 160;
const MARIADB_BINLOG_CHECKPOINT: u8 = 161;
const MARIADB_GTID: u8 = 162;
const MARIADB_GTID_LIST: u8 = 163;
/// MariaDB GTID event flag: a standalone statement (DDL) with no BEGIN/COMMIT around it.
const MARIADB_FL_STANDALONE: u8 = 1;

/// A table map's compiled rules, and how its columns line up with the cascade index.
pub(crate) struct Watched {
    pub(crate) rules: TableRules,
    index: Option<Binding>,
}

/// One connection's worth of stream state (made anew on reconnect, from the last commit
/// boundary), and what each event does to it.
pub(crate) struct Events<'a> {
    rules: &'a [Rule],
    metrics: &'a Metrics,
    /// Last commit boundary handed downstream (or passed without events).
    pub(crate) position: Position,
    /// Binlog file of the events being read.
    file: String,
    seen_fde: bool,
    tables: HashMap<u64, Option<Arc<Watched>>>,
    batcher: Batcher,
    gtid: Option<String>,
    standalone: bool,
    /// True after a server heartbeat with nothing read since: we are caught up as of now.
    pub(crate) caught_up: bool,
    pub(crate) last_commit_ms: u64,
    intents: Vec<Intent>,
    /// Cascade paths by parent `database.table`, each ending at a table with rules.
    pub(crate) fks: BTreeMap<String, Vec<CascadeChain>>,
    /// A DDL statement passed: foreign keys must be read again before the next table map.
    pub(crate) fks_stale: bool,
    /// The last DDL statement.
    pub(crate) last_ddl: Option<Ddl>,
    /// Since the last progress line: rows of watched tables, batches sent.
    pub(crate) rows_seen: u64,
    pub(crate) batches_sent: u64,
}

impl<'a> Events<'a> {
    pub(crate) fn new(
        rules: &'a [Rule],
        metrics: &'a Metrics,
        settings: &ProducerSettings,
        position: Position,
        fks: BTreeMap<String, Vec<CascadeChain>>,
    ) -> Events<'a> {
        Events {
            rules,
            metrics,
            file: position.file.clone(),
            position,
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
        }
    }

    /// The server's heartbeat: nothing more to read for now.
    pub(crate) fn heartbeat(&mut self) {
        self.caught_up = true;
        self.metrics.binlog_lag_seconds.set(0.0);
    }

    /// Any other event, before its own handling: `start` is where it begins in the current
    /// file (0 for artificial events), `timestamp` its source time (0 if none).
    pub(crate) fn seen(&mut self, slot: &mut IndexSlot, start: Option<u64>, timestamp: u32) {
        self.caught_up = false;
        if let Some(start) = start {
            slot.advance(&self.file, start);
        }
        if timestamp != 0 {
            let lag =
                rtinval_schemas::runtime::now_ms().saturating_sub(u64::from(timestamp) * 1000);
            self.metrics.binlog_lag_seconds.set(lag as f64 / 1000.0);
        }
    }

    /// A transaction's GTID (MariaDB: `domain-server-sequence`); `standalone` for DDL.
    pub(crate) fn gtid(&mut self, gtid: String, standalone: bool) {
        self.gtid = Some(gtid);
        self.standalone = standalone;
    }

    /// The format description: rotates from here on name the next file.
    pub(crate) fn format_description(&mut self) {
        self.seen_fde = true;
    }

    /// A rotate to `file`. The first one after connecting precedes the format description and
    /// carries the checksum glued to the name: ignored (we know the file we asked for).
    pub(crate) fn rotate(&mut self, file: String) {
        if self.seen_fde {
            debug!(file = %file, "Binlog rotated.");
            self.file = file;
        }
    }

    /// A table map: compile the table's rules (and the cascades starting at it) once per
    /// table id, against the column names `shape` gives — asked only for watched tables.
    pub(crate) fn table_map(
        &mut self,
        slot: &IndexSlot,
        table_id: u64,
        database: &str,
        table: &str,
        shape: impl FnOnce() -> Option<TableShape>,
    ) -> Result<(), SourceError> {
        if self.tables.contains_key(&table_id) {
            return Ok(());
        }
        let qualified = format!("{database}.{table}");
        let involved = slot
            .index
            .as_ref()
            .is_some_and(|ix| ix.involves(&qualified));
        if !involved && !TableRules::watches(&qualified, self.rules, &self.fks) {
            self.tables.insert(table_id, None);
            return Ok(());
        }
        let shape = shape().ok_or_else(|| SourceError::InvalidServerSetting {
            setting: "binlog_row_metadata",
            expected: "FULL",
            actual: format!("(no column names in the table map of {qualified})"),
        })?;
        let index = slot
            .index
            .as_ref()
            .and_then(|ix| ix.bind(&qualified, &shape.names));
        let rules = TableRules::for_table(&qualified, self.rules, &self.fks, shape);
        if !rules.missing_columns.is_empty() {
            warn!(table = %qualified, missing = ?rules.missing_columns, "Rules reference columns the table no longer has: their keys become cache flushes.");
        }
        self.tables
            .insert(table_id, Some(Arc::new(Watched { rules, index })));
        Ok(())
    }

    /// The compiled rules of a watched table id (`None`: not watched, or no table map yet).
    pub(crate) fn watched(&self, table_id: u64) -> Option<Arc<Watched>> {
        self.tables.get(&table_id).cloned().flatten()
    }

    /// The rows of one rows event of a watched table, decoded: their intents join the
    /// transaction; the cascade index follows them. `log_pos` names the event in errors.
    pub(crate) fn rows(
        &mut self,
        slot: &mut IndexSlot,
        watched: &Watched,
        op: Op,
        rows: impl Iterator<Item = std::io::Result<RowImages>>,
        log_pos: u32,
    ) -> Result<(), SourceError> {
        let table = &watched.rules.table;
        let counter = self.metrics.rows.get_or_create(&TableOpLabels {
            table: table.to_string(),
            op: op.as_str(),
        });
        self.batcher.touch(table, op);
        let mut n = 0u64;
        for row in rows {
            let (before, after) = row.map_err(|e| SourceError::Decode {
                position: format!("{}:{log_pos}", self.file),
                table: table.to_string(),
                error: e,
            })?;
            let change = RowChange { op, before, after };
            let batcher = &self.batcher;
            watched.rules.intents_with(
                &change,
                &mut self.intents,
                |c| batcher.is_flushed(c),
                |t| slot.covers(t),
            );
            if let (Some(index), Some(b)) = (slot.index.as_mut(), &watched.index) {
                index.logged(
                    b,
                    op,
                    change.before.as_deref(),
                    change.after.as_deref(),
                    &mut self.intents,
                );
            }
            for intent in self.intents.drain(..) {
                self.batcher.add(intent);
            }
            n += 1;
        }
        self.rows_seen += n;
        counter.inc_by(n);
        Ok(())
    }

    /// A query event: `BEGIN`, `COMMIT`, `ROLLBACK`, or DDL (a boundary of its own). Returns a
    /// batch when it commits a transaction that produced events.
    pub(crate) fn query(
        &mut self,
        slot: &mut IndexSlot,
        schema: &str,
        query: &str,
        log_pos: u32,
        timestamp: u32,
    ) -> Option<Batch> {
        let trimmed = query.trim();
        if trimmed.eq_ignore_ascii_case("BEGIN") {
            self.batcher.clear();
        } else if trimmed.eq_ignore_ascii_case("COMMIT") {
            return self.commit(slot, log_pos, timestamp);
        } else if trimmed.eq_ignore_ascii_case("ROLLBACK") {
            self.batcher.clear();
            if let Some(index) = slot.index.as_mut() {
                index.rollback();
            }
        } else {
            // DDL (or a statement on a non-transactional table): a boundary. Table ids of
            // altered tables change, so cached compilations are dropped too.
            debug!(query = %trimmed.chars().take(200).collect::<String>(), "DDL in binlog.");
            self.tables.clear();
            self.fks_stale = true;
            let was_empty = self.batcher.is_empty();
            let ddl = Ddl::parse(schema, trimmed);
            self.emptied_by_ddl(&ddl);
            self.last_ddl = Some(ddl);
            if self.standalone || was_empty {
                return self.commit(slot, log_pos, timestamp);
            }
        }
        None
    }

    /// DDL that removes a watched table's rows without row events (`TRUNCATE`, `DROP`): the
    /// widest safe action for each of its rules — flush the cache (reason `table_emptied`),
    /// reset the pools — in the statement's own transaction, with one log line.
    fn emptied_by_ddl(&mut self, ddl: &Ddl) {
        let mut emptied = BTreeSet::new();
        for rule in self.rules {
            if ddl.effect(&rule.database, &rule.table) != DdlEffect::Emptied {
                continue;
            }
            let table: Arc<str> = Arc::from(rule.qualified_table());
            self.batcher.touch(&table, Op::Delete);
            for pool in &rule.reset_pools {
                self.batcher
                    .add(Intent::ResetPool(Arc::from(pool.as_str())));
            }
            if let Some(cache) = &rule.cache {
                self.batcher.add(Intent::FlushCache {
                    cache: Arc::from(cache.as_str()),
                    reason: "table_emptied",
                });
            }
            emptied.insert(table);
        }
        if !emptied.is_empty() {
            let tables: Vec<&str> = emptied.iter().map(|t| &**t).collect();
            warn!(tables = %tables.join(", "), query = %ddl.query.chars().take(200).collect::<String>(), "DDL removed the rows of watched tables without row events: flushing their caches and resetting their pools.");
        }
    }

    /// A commit boundary (XID, `COMMIT`, standalone DDL) ending at `log_pos`: move the
    /// position, and emit the transaction's events if any.
    pub(crate) fn commit(
        &mut self,
        slot: &mut IndexSlot,
        log_pos: u32,
        timestamp: u32,
    ) -> Option<Batch> {
        self.position = Position {
            file: self.file.clone(),
            pos: u64::from(log_pos),
            gtid: self.gtid.take().or_else(|| self.position.gtid.clone()),
            server_id: self.position.server_id,
        };
        if let Some(index) = slot.index.as_mut() {
            index.commit();
        }
        slot.advance(&self.position.file, self.position.pos);
        self.standalone = false;
        self.last_commit_ms = u64::from(timestamp) * 1000;
        for reason in self.batcher.flush_reasons() {
            self.metrics
                .cache_flushes
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        if self.batcher.is_empty() {
            self.batcher.clear();
            return None;
        }
        let commit = Commit {
            server_id: self.position.server_id,
            gtid: self.position.gtid.clone(),
            file: self.position.file.clone(),
            pos: self.position.pos,
            committed_at: self.last_commit_ms,
        };
        let events = self
            .batcher
            .finish(&commit, rtinval_schemas::runtime::now_ms());
        Some(Batch {
            position: self.position.clone(),
            events,
        })
    }

    /// The adapter: one raw binlog event as the calls above. Returns a batch at a commit that
    /// produced events.
    pub(crate) fn dispatch(
        &mut self,
        slot: &mut IndexSlot,
        stream: &mysql_async::BinlogStream,
        event: BinlogEvent,
    ) -> Result<Option<Batch>, SourceError> {
        let header = event.header();
        let raw_type = header.event_type_raw();
        if raw_type == EventType::HEARTBEAT_EVENT as u8 {
            self.heartbeat();
            return Ok(None);
        }
        let log_pos = header.log_pos();
        let start = (log_pos != 0 && !slot.live)
            .then(|| u64::from(log_pos.saturating_sub(header.event_size())));
        self.seen(slot, start, header.timestamp());
        match raw_type {
            MARIADB_GTID => {
                let d = event.data();
                if d.len() >= 13 {
                    let seq = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
                    let domain = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
                    self.gtid(
                        format!("{domain}-{}-{seq}", header.server_id()),
                        d[12] & MARIADB_FL_STANDALONE != 0,
                    );
                }
                return Ok(None);
            }
            MARIADB_ANNOTATE_ROWS | MARIADB_BINLOG_CHECKPOINT | MARIADB_GTID_LIST => {
                return Ok(None);
            }
            _ => {}
        }
        let data = event.read_data().map_err(|error| SourceError::Decode {
            position: format!("{}:{log_pos}", self.file),
            table: "-".into(),
            error,
        })?;
        let Some(data) = data else { return Ok(None) };
        match data {
            EventData::FormatDescriptionEvent(_) => self.format_description(),
            EventData::RotateEvent(r) => self.rotate(r.name().into_owned()),
            EventData::TableMapEvent(tme) => {
                let (db, name) = (tme.database_name(), tme.table_name());
                self.table_map(slot, tme.table_id(), &db, &name, || {
                    TableShape::from_table_map(&tme)
                })?;
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
                let Some(watched) = self.watched(rows.table_id()) else {
                    return Ok(None);
                };
                let shape = &watched.rules.shape;
                // The shape's own decoder (column facts read once per table map);
                // mysql_common's row iterator where it does not apply (MySQL partial JSON
                // updates).
                if let Some(decoded) = shape.rows(&rows) {
                    self.rows(slot, &watched, op, decoded, log_pos)?;
                } else {
                    let tme =
                        stream
                            .get_tme(rows.table_id())
                            .ok_or_else(|| SourceError::Decode {
                                position: format!("{}:{log_pos}", self.file),
                                table: watched.rules.table.to_string(),
                                error: std::io::Error::other("rows event without a table map"),
                            })?;
                    let decoded = rows.rows(tme).map(|row| {
                        row.map(|(b, a)| (b.map(|r| shape.values(r)), a.map(|r| shape.values(r))))
                    });
                    self.rows(slot, &watched, op, decoded, log_pos)?;
                }
            }
            EventData::XidEvent(_) => {
                return Ok(self.commit(slot, log_pos, header.timestamp()));
            }
            EventData::QueryEvent(q) => {
                let (schema, query) = (q.schema(), q.query());
                return Ok(self.query(slot, &schema, &query, log_pos, header.timestamp()));
            }
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Value;
    use rtinval_schemas::EventBody;

    const RULES: &str = r#"
        [[rules]]
        table = "Object"
        reset_pools = ["rtapi"]
        cache = "rt"
        keys = ["object:{id}"]

        [[rules]]
        table = "Port"
        cache = "rt"
        keys = ["port:{id}"]
    "#;

    fn rules() -> Vec<Rule> {
        let text = format!(
            "[source]\nurl = \"mysql://u:p@h:1\"\ndatabase = \"rt\"\n[kafka]\nbrokers = \"b:1\"\n{RULES}"
        );
        let c: crate::config::Config = toml::from_str(&text).unwrap();
        c.rules().unwrap()
    }

    fn start() -> Position {
        Position {
            file: "bin.000001".into(),
            pos: 4,
            gtid: None,
            server_id: 1,
        }
    }

    /// A fresh stream's state at [`start`], without a cascade index.
    fn events<'a>(rules: &'a [Rule], metrics: &'a Metrics) -> (Events<'a>, IndexSlot) {
        let settings = ProducerSettings::default();
        let ev = Events::new(rules, metrics, &settings, start(), BTreeMap::new());
        (ev, IndexSlot::default())
    }

    fn shape(cols: &[&str]) -> Option<TableShape> {
        Some(TableShape::named(
            cols.iter().map(|c| c.to_string()).collect(),
        ))
    }

    fn keys(batch: &Batch) -> Vec<String> {
        batch
            .events
            .iter()
            .filter_map(|e| match &e.body {
                EventBody::CacheKeys { keys, .. } => Some(keys.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn row(id: i64) -> std::io::Result<RowImages> {
        Ok((
            Some(vec![Value::Int(id), Value::Bytes(b"x".to_vec())]),
            None,
        ))
    }

    #[test]
    fn a_transaction_becomes_one_batch_at_its_commit() {
        let (rules, metrics) = (rules(), Metrics::new());
        let (mut ev, mut slot) = events(&rules, &metrics);
        ev.gtid("0-1-7".into(), false);
        assert!(ev.query(&mut slot, "rt", "BEGIN", 100, 0).is_none());
        ev.table_map(&slot, 11, "rt", "Object", || shape(&["id", "name"]))
            .unwrap();
        let object = ev.watched(11).expect("Object is watched");
        ev.rows(
            &mut slot,
            &object,
            Op::Delete,
            [row(5), row(6)].into_iter(),
            200,
        )
        .unwrap();
        // A table nobody watches is never asked for its shape.
        ev.table_map(&slot, 12, "rt", "Chapter", || panic!("not decoded"))
            .unwrap();
        assert!(ev.watched(12).is_none());
        let batch = ev.commit(&mut slot, 300, 1_700_000_000).expect("a batch");
        assert_eq!(keys(&batch), vec!["object:5", "object:6"]);
        assert_eq!(batch.position.pos, 300);
        assert_eq!(batch.position.gtid.as_deref(), Some("0-1-7"));
        assert!(
            batch
                .events
                .iter()
                .any(|e| matches!(&e.body, EventBody::PoolReset { pools } if pools == &["rtapi"]))
        );
        assert_eq!(ev.rows_seen, 2);
        // The next transaction starts empty; a commit without intents moves only the position.
        assert!(ev.commit(&mut slot, 400, 0).is_none());
        assert_eq!(ev.position.pos, 400);
        assert_eq!(
            ev.position.gtid.as_deref(),
            Some("0-1-7"),
            "kept until the next GTID"
        );
    }

    #[test]
    fn rollback_and_begin_drop_what_was_collected() {
        let (rules, metrics) = (rules(), Metrics::new());
        let (mut ev, mut slot) = events(&rules, &metrics);
        ev.table_map(&slot, 11, "rt", "Object", || shape(&["id", "name"]))
            .unwrap();
        let object = ev.watched(11).unwrap();
        ev.rows(&mut slot, &object, Op::Insert, [row(1)].into_iter(), 10)
            .unwrap();
        assert!(ev.query(&mut slot, "rt", "ROLLBACK", 20, 0).is_none());
        assert!(ev.query(&mut slot, "rt", "COMMIT", 30, 0).is_none());
        assert_eq!(ev.position.pos, 30);
    }

    #[test]
    fn ddl_is_a_boundary_and_truncate_flushes_the_tables_caches() {
        let (rules, metrics) = (rules(), Metrics::new());
        let (mut ev, mut slot) = events(&rules, &metrics);
        ev.table_map(&slot, 11, "rt", "Object", || shape(&["id"]))
            .unwrap();
        ev.gtid("0-1-9".into(), true);
        let batch = ev
            .query(&mut slot, "rt", "TRUNCATE TABLE Port", 500, 0)
            .expect("a flush");
        assert!(
            batch.events.iter().any(|e| matches!(&e.body,
            EventBody::CacheFlush { cache, reason } if cache == "rt" && reason == "table_emptied"))
        );
        assert!(ev.fks_stale, "foreign keys are read again after DDL");
        assert!(
            ev.watched(11).is_none(),
            "table ids may change: compiled again"
        );
        assert_eq!(
            ev.last_ddl
                .as_ref()
                .map(|d| (d.schema.as_str(), d.query.as_str())),
            Some(("rt", "TRUNCATE TABLE Port"))
        );
        // DDL that keeps the rows is only a boundary.
        ev.gtid("0-1-10".into(), true);
        assert!(
            ev.query(&mut slot, "rt", "ALTER TABLE Port ADD COLUMN x INT", 600, 0)
                .is_none()
        );
        assert_eq!(ev.position.pos, 600);
    }

    #[test]
    fn a_row_that_does_not_decode_names_the_table_and_position() {
        let (rules, metrics) = (rules(), Metrics::new());
        let (mut ev, mut slot) = events(&rules, &metrics);
        ev.table_map(&slot, 11, "rt", "Object", || shape(&["id"]))
            .unwrap();
        let object = ev.watched(11).unwrap();
        let bad = std::iter::once(Err(std::io::Error::other("truncated")));
        let err = ev
            .rows(&mut slot, &object, Op::Insert, bad, 77)
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("bin.000001:77") && text.contains("rt.Object"),
            "{text}"
        );
        // A watched table whose table map lacks column names is a server setting to fix.
        let err = ev.table_map(&slot, 13, "rt", "Port", || None).unwrap_err();
        assert!(err.to_string().contains("binlog_row_metadata"), "{err}");
    }

    #[test]
    fn rotates_count_only_after_the_format_description() {
        let (rules, metrics) = (rules(), Metrics::new());
        let (mut ev, mut slot) = events(&rules, &metrics);
        ev.rotate("bin.000001\u{0}crc".into());
        ev.format_description();
        ev.rotate("bin.000002".into());
        ev.commit(&mut slot, 4, 0);
        assert_eq!(ev.position.file, "bin.000002");
    }
}
