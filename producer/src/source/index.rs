//! The cascade index ([`crate::cascade_index`]) as the source stage holds it: built from a
//! snapshot at the first connect and after a schema change that affects it, kept across
//! reconnects (the unfinished transaction undone), and live once the stream reaches the
//! snapshot's position.

use std::collections::BTreeMap;

use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use tracing::{info, warn};

use super::BinlogSource;
use crate::cascade::CascadeChain;
use crate::cascade_index::{self, CascadeIndex};
use crate::error::{SourceError, is_privilege_error};
use crate::metrics::{TableLabel, TableReasonLabels};
use crate::position::binlog_order;
use crate::rules::{Ddl, DdlEffect};

/// The cascade index ([`crate::cascade_index`]) across reconnects, and from where on it is
/// complete.
#[derive(Default)]
pub(crate) struct IndexSlot {
    pub(crate) index: Option<CascadeIndex>,
    /// The snapshot's binlog position (file, offset).
    snapshot: Option<(String, u64)>,
    /// The stream has passed the snapshot position: chains the index covers need no fallback.
    pub(crate) live: bool,
    /// Built (or found unneeded) for the current foreign keys.
    pub(crate) built: bool,
}

impl IndexSlot {
    /// Has the stream reached the snapshot position? `file`/`pos` is where the event being
    /// read starts (or a commit boundary): every event from the snapshot position on changes
    /// rows the snapshot did not hold.
    pub(crate) fn advance(&mut self, file: &str, pos: u64) {
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

    pub(crate) fn covers(&self, table: &str) -> bool {
        self.live && self.index.as_ref().is_some_and(|i| i.covers(table))
    }

    /// Does `ddl` change the rows of an indexed table without row events ([`Ddl::effect`]:
    /// `TRUNCATE`, `DROP`, `RENAME`, a swapped tablespace or partition)? Other schema changes
    /// keep the rows; a changed column set or type changes the plan, which rebuilds anyway.
    pub(crate) fn touched_by(&self, ddl: &Ddl) -> bool {
        self.index.as_ref().is_some_and(|ix| {
            ix.plan().tables.iter().any(|t| {
                let (db, name) = t.table.split_once('.').unwrap_or(("", &t.table));
                ddl.effect(db, name) != DdlEffect::Kept
            })
        })
    }
}

impl BinlogSource {
    /// Build the cascade index for `chains` from a consistent snapshot on `conn`, unless it is
    /// off, unneeded, or (`force` false) already built for the same plan. A snapshot the account
    /// may not read leaves it off, with one warning: cascades then flush as without it.
    pub(super) async fn build_index(
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
            self.count_disabled(table.clone(), "not_indexable");
        }
        *slot = IndexSlot {
            built: true,
            ..IndexSlot::default()
        };
        // A table the new plan does not hold loses its series.
        self.metrics.cascade_index_rows.clear();
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
    pub(super) fn report_notices(&self, slot: &mut IndexSlot) {
        let Some(index) = slot.index.as_mut() else {
            return;
        };
        for n in index.take_notices() {
            warn!(table = %n.table, reason = n.reason, detail = %n.detail, "Cascade index: stopped holding this table; cascades through it flush the caches their keys live in.");
            self.count_disabled(n.table, n.reason);
        }
    }

    /// `rtinval_producer_cascade_index_disabled_total{table,reason}`, one more.
    fn count_disabled(&self, table: String, reason: &'static str) {
        self.metrics
            .cascade_index_disabled
            .get_or_create(&TableReasonLabels { table, reason })
            .inc();
    }

    /// Set the cascade index's gauges; returns the rows it holds.
    pub(super) fn index_gauges(&self, slot: &IndexSlot) -> u64 {
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
}
