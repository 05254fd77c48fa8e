//! Cascade index: the child rows InnoDB changes unlogged, kept so that a parent row's change
//! yields exactly the cascaded rows' keys instead of a flush of their caches.
//!
//! [`crate::cascade`] finds every path of cascading foreign keys from a parent table to a table
//! with rules. Where a reached rule's key reads a column that the chain's foreign-key columns do
//! not hand down from the parent (RackTables: `Object` → `Port` → `Link` needs the *other*
//! port's id), the parent's row cannot derive it. This module keeps, for each table on such a
//! path ([`needed_tables`]), the columns it needs of every row ([`TablePlan::columns`]: the row's
//! identity, its foreign-key columns, the columns its own children's keys reference and its
//! rules' template columns), indexed by each cascading foreign key's column values. A parent
//! change then walks the index edge by edge, as the engine does: a `CASCADE` delete removes the
//! child rows and fires their own foreign keys; `SET NULL` and `ON UPDATE CASCADE` rewrite the
//! child's foreign-key columns and fire the next level's `ON UPDATE`. Each reached row's change
//! goes through its table's rules exactly as a logged row would, so the parent's transaction
//! carries the children's keys and pool resets.
//!
//! **Consistency.** The index starts from a snapshot ([`load`]): one `START TRANSACTION WITH
//! CONSISTENT SNAPSHOT`, the binlog position that snapshot corresponds to (MariaDB:
//! `binlog_snapshot_file`/`binlog_snapshot_position`; elsewhere the position read right after,
//! which is at or past it), then one `SELECT` of the needed columns per table. Streaming resumes
//! at the checkpoint, which is at or before the snapshot: every binlog row change of an indexed
//! table is applied by identity (primary key, else a unique key over NOT NULL columns), so a
//! change the snapshot already holds is applied again harmlessly. Until the stream has passed the
//! snapshot position, the index may lack rows a replayed parent change cascaded to (the snapshot
//! was taken after the engine deleted them), so the parent's rules also keep the fallback flush
//! for underivable keys ([`CascadeIndex::covers`] is false): nothing is missed, and from the
//! snapshot position on, the keys are exact.
//!
//! **Transactions.** Changes are applied as the binlog is read; an undo log per transaction lets
//! a reconnect that re-reads an unfinished transaction ([`CascadeIndex::rollback`]) start from
//! the index as of the last commit boundary.
//!
//! **Fallbacks.** A table without a usable identity, a table above `cascade_index_max_rows`, or
//! one whose columns a schema change removed is not indexed (and neither is anything below it):
//! its chains keep today's `cache_flush` (`cascade_underivable`). [`CascadeIndex::take_notices`]
//! hands each such decision to the caller, which logs it once and counts it.
//!
//! **Memory.** A row costs its stored cells (24 bytes each, plus the heap bytes of strings) in
//! a slab, a 4-byte slot in the table that finds it by identity (hashed in place, not copied),
//! and a slot number under its value in each foreign key's map; `bytes_estimate` reports the
//! total, logged after each build.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;
use smallvec::SmallVec;

use rtinval_schemas::Op;

use crate::cascade::{CascadeChain, FkAction, ForeignKey};
use crate::decode::{TableShape, Value};
use crate::rules::{Intent, Rule, TableRules};

/// A column value as the index keeps it: integers in one form whatever their signedness (the
/// binlog and the snapshot's protocol may disagree), strings as their bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cell {
    Null,
    Int(i64),
    /// Only values above `i64::MAX`; smaller unsigned values are [`Cell::Int`].
    UInt(u64),
    /// An `f64`'s bits.
    Float(u64),
    Bytes(Box<[u8]>),
    Text(Box<str>),
}

impl Cell {
    /// `None` for a value absent from the row image.
    pub fn from_value(v: &Value) -> Option<Cell> {
        Some(match v {
            Value::Null => Cell::Null,
            Value::Int(i) => Cell::Int(*i),
            Value::UInt(u) => match i64::try_from(*u) {
                Ok(i) => Cell::Int(i),
                Err(_) => Cell::UInt(*u),
            },
            Value::Float(f) => Cell::Float(f.to_bits()),
            Value::Bytes(b) => Cell::Bytes(b.as_slice().into()),
            Value::Text(t) => Cell::Text(t.as_str().into()),
            Value::Absent => return None,
        })
    }

    pub fn to_value(&self) -> Value {
        match self {
            Cell::Null => Value::Null,
            Cell::Int(i) => Value::Int(*i),
            Cell::UInt(u) => Value::UInt(*u),
            Cell::Float(f) => Value::Float(f64::from_bits(*f)),
            Cell::Bytes(b) => Value::Bytes(b.to_vec()),
            Cell::Text(t) => Value::Text(t.to_string()),
        }
    }

    /// As a case-insensitive, PAD SPACE collation compares it: lowercase, trailing spaces off.
    fn folded(&self) -> Cell {
        let fold = |s: &str| s.trim_end_matches(' ').to_lowercase();
        match self {
            Cell::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => Cell::Bytes(fold(s).into_bytes().into()),
                Err(_) => self.clone(),
            },
            Cell::Text(t) => Cell::Text(fold(t).into()),
            c => c.clone(),
        }
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Cell::Bytes(b) => b.len(),
            Cell::Text(t) => t.len(),
            _ => 0,
        }
    }
}

type Row = Box<[Cell]>;

/// A foreign key's value as its maps hold it: each cell folded where `fold` says the column
/// compares case-insensitively; `None` when a cell is NULL (NULL references no parent row) or
/// missing.
fn fk_value<'c>(cells: impl IntoIterator<Item = Option<&'c Cell>>, fold: &[bool]) -> Option<Row> {
    cells
        .into_iter()
        .zip(fold)
        .map(|(c, &f)| match c? {
            Cell::Null => None,
            c if f => Some(c.folded()),
            c => Some(c.clone()),
        })
        .collect()
}

/// What the database says about a table the index would hold.
#[derive(Debug, Clone, Default)]
pub struct TableFacts {
    /// Column names in table order.
    pub columns: Vec<String>,
    /// The primary key's columns, else a unique key's over NOT NULL columns.
    pub identity: Option<Vec<String>>,
    /// Columns (lowercased names) compared case-insensitively (a `_ci` collation).
    pub folded: BTreeSet<String>,
    /// Each column's type and collation (lowercased name → `int(10) unsigned`, ...): a change
    /// of a stored column's type changes the plan, so the index is built again.
    pub types: BTreeMap<String, String>,
}

/// Which tables are indexed, which columns of them, and the foreign keys between them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IndexPlan {
    pub tables: Vec<TablePlan>,
    pub edges: Vec<EdgePlan>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePlan {
    /// `database.table`.
    pub table: String,
    /// Stored columns: the identity's first.
    pub columns: Vec<String>,
    /// How many of `columns` form the row's identity.
    pub identity: usize,
    /// Each stored column's type and collation ([`TableFacts::types`]).
    pub types: Vec<String>,
    /// Edges (indexes into [`IndexPlan::edges`]) whose child is this table, in slot order.
    pub into: Vec<usize>,
}

/// A cascading foreign key whose child table is indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgePlan {
    pub fk: ForeignKey,
    /// `database.table` of the parent.
    pub parent: String,
    /// The child's index in [`IndexPlan::tables`].
    pub child: usize,
    /// Position of this edge in the child's [`TablePlan::into`].
    pub slot: usize,
    /// The foreign-key columns' positions in the child's stored columns.
    pub child_pos: Vec<usize>,
    /// The referenced columns' positions in the parent's stored columns, if it is indexed.
    pub parent_pos: Option<Vec<usize>>,
    /// Per foreign-key column: compared case-insensitively.
    pub fold: Vec<bool>,
}

/// Does some rule reached by `chain` key a column the chain does not hand down from the parent?
fn underivable(chain: &CascadeChain, rules: &[Rule]) -> bool {
    rules
        .iter()
        .filter(|r| r.qualified_table() == chain.child() && r.cache.is_some())
        .flat_map(|r| r.keys.iter().flat_map(|t| t.columns()))
        .any(|c| chain.parent_column_of(c).is_none())
}

/// The tables the index must hold: every table on a chain with an underivable key, and every
/// table on a path into one of those (their rows change unlogged too, so they are walked).
pub fn needed_tables(
    chains: &BTreeMap<String, Vec<CascadeChain>>,
    rules: &[Rule],
) -> BTreeSet<String> {
    let all: Vec<&CascadeChain> = chains.values().flatten().collect();
    let mut needed: BTreeSet<String> = all
        .iter()
        .filter(|c| underivable(c, rules))
        .flat_map(|c| c.edges.iter().map(|e| e.child.clone()))
        .collect();
    loop {
        let before = needed.len();
        for c in &all {
            if let Some(k) = c.edges.iter().rposition(|e| needed.contains(&e.child)) {
                needed.extend(c.edges[..k].iter().map(|e| e.child.clone()));
            }
        }
        if needed.len() == before {
            return needed;
        }
    }
}

/// Why a table is not indexed.
pub type Excluded = Vec<(String, String)>;

/// The plan for the `needed` tables given what the database says about them. Tables that cannot
/// be indexed, and every table below them on a chain, are returned with the reason instead.
pub fn plan(
    chains: &BTreeMap<String, Vec<CascadeChain>>,
    rules: &[Rule],
    needed: &BTreeSet<String>,
    facts: &BTreeMap<String, TableFacts>,
) -> (IndexPlan, Excluded) {
    let all: Vec<&CascadeChain> = chains.values().flatten().collect();
    let mut excluded: BTreeMap<String, String> = BTreeMap::new();
    for t in needed {
        match facts.get(t) {
            None => {
                excluded.insert(t.clone(), "the table's columns could not be read".into());
            }
            Some(f) if f.identity.is_none() => {
                excluded.insert(
                    t.clone(),
                    "no primary key or unique key over NOT NULL columns to tell its rows apart"
                        .into(),
                );
            }
            Some(_) => {}
        }
    }
    // Every distinct edge (by child and constraint name) into a needed table, with its parent.
    let mut edges: Vec<(String, ForeignKey)> = Vec::new();
    for (root, c) in chains
        .iter()
        .flat_map(|(r, cs)| cs.iter().map(move |c| (r, c)))
    {
        let mut parent = root.clone();
        for e in &c.edges {
            if needed.contains(&e.child)
                && !edges
                    .iter()
                    .any(|(_, x)| x.child == e.child && x.name == e.name)
            {
                edges.push((parent.clone(), e.clone()));
            }
            parent = e.child.clone();
        }
    }
    // Columns each table must store; a column the table lacks excludes it.
    let mut wanted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut want = |t: &str, col: &str| {
        let cols = wanted.entry(t.to_owned()).or_default();
        if !cols.iter().any(|c| c.eq_ignore_ascii_case(col)) {
            cols.push(col.to_owned());
        }
    };
    for t in needed {
        if let Some(id) = facts.get(t).and_then(|f| f.identity.as_ref()) {
            for c in id {
                want(t, c);
            }
        }
        for r in rules.iter().filter(|r| &r.qualified_table() == t) {
            for c in r.keys.iter().flat_map(|k| k.columns()) {
                want(t, c);
            }
        }
    }
    for (parent, e) in &edges {
        for c in &e.child_columns {
            want(&e.child, c);
        }
        if needed.contains(parent) {
            for c in &e.parent_columns {
                want(parent, c);
            }
        }
    }
    for (t, cols) in &wanted {
        if let Some(f) = facts.get(t)
            && let Some(c) = cols
                .iter()
                .find(|c| !f.columns.iter().any(|x| x.eq_ignore_ascii_case(c)))
        {
            excluded
                .entry(t.clone())
                .or_insert_with(|| format!("it has no column {c:?}"));
        }
    }
    // Below an excluded table, rows change unseen: exclude them too.
    loop {
        let before = excluded.len();
        for c in &all {
            if let Some(k) = c.edges.iter().position(|e| excluded.contains_key(&e.child)) {
                let why = format!(
                    "rows of it change through {}, which is not indexed",
                    c.edges[k].child
                );
                for e in &c.edges[k + 1..] {
                    if needed.contains(&e.child) {
                        excluded.entry(e.child.clone()).or_insert(why.clone());
                    }
                }
            }
        }
        if excluded.len() == before {
            break;
        }
    }
    let mut out = IndexPlan::default();
    let kept: Vec<&String> = needed
        .iter()
        .filter(|t| !excluded.contains_key(*t))
        .collect();
    for t in &kept {
        let f = &facts[*t];
        let identity = f.identity.as_ref().map_or(0, Vec::len);
        let columns = wanted.remove(*t).unwrap_or_default();
        let types = columns
            .iter()
            .map(|c| {
                f.types
                    .get(&c.to_ascii_lowercase())
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        out.tables.push(TablePlan {
            table: (*t).clone(),
            columns,
            identity,
            types,
            into: Vec::new(),
        });
    }
    let index_of = |tables: &[TablePlan], t: &str| tables.iter().position(|p| p.table == t);
    let pos_in = |p: &TablePlan, cols: &[String]| -> Vec<usize> {
        cols.iter()
            .filter_map(|c| p.columns.iter().position(|x| x.eq_ignore_ascii_case(c)))
            .collect()
    };
    for (parent, fk) in edges {
        let Some(child) = index_of(&out.tables, &fk.child) else {
            continue;
        };
        let child_pos = pos_in(&out.tables[child], &fk.child_columns);
        let parent_pos =
            index_of(&out.tables, &parent).map(|p| pos_in(&out.tables[p], &fk.parent_columns));
        let folded = &facts[&fk.child].folded;
        let fold = fk
            .child_columns
            .iter()
            .map(|c| folded.contains(&c.to_ascii_lowercase()))
            .collect();
        let slot = out.tables[child].into.len();
        out.tables[child].into.push(out.edges.len());
        out.edges.push(EdgePlan {
            fk,
            parent,
            child,
            slot,
            child_pos,
            parent_pos,
            fold,
        });
    }
    (out, excluded.into_iter().collect())
}

/// One table's rows: a slab, the slots hashed by the row's identity in place (so the identity
/// is stored once, in the row), and per foreign key into the table the slots by key value.
#[derive(Debug)]
struct RowStore {
    /// How many leading cells are the identity.
    identity: usize,
    /// Per foreign key into the table: its columns' positions, and which are folded.
    keys: Vec<(Vec<usize>, Vec<bool>)>,
    slots: Vec<Option<Row>>,
    free: Vec<u32>,
    by_id: HashTable<u32>,
    by_edge: Vec<hashbrown::HashMap<Row, SmallVec<[u32; 2]>>>,
    hasher: hashbrown::DefaultHashBuilder,
    disabled: bool,
}

impl RowStore {
    fn new(identity: usize, keys: Vec<(Vec<usize>, Vec<bool>)>) -> RowStore {
        RowStore {
            identity,
            by_edge: keys.iter().map(|_| hashbrown::HashMap::new()).collect(),
            keys,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: HashTable::new(),
            hasher: hashbrown::DefaultHashBuilder::default(),
            disabled: false,
        }
    }

    fn id_of(slots: &[Option<Row>], identity: usize, slot: u32) -> &[Cell] {
        slots
            .get(slot as usize)
            .and_then(Option::as_deref)
            .map_or(&[][..], |r| &r[..identity.min(r.len())])
    }

    fn row(&self, slot: u32) -> Option<&Row> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// The foreign key `edge`'s value in `row`; `None` when a column is NULL (it matches no
    /// parent).
    fn key(&self, edge: usize, row: &[Cell]) -> Option<Row> {
        let (pos, fold) = &self.keys[edge];
        fk_value(pos.iter().map(|&p| row.get(p)), fold)
    }

    /// Insert `row`, replacing the row of the same identity (returned).
    fn insert(&mut self, row: Row) -> Option<Row> {
        let before = self.remove(&row[..self.identity.min(row.len())]);
        let keys: Vec<Option<Row>> = (0..self.keys.len()).map(|e| self.key(e, &row)).collect();
        let hash = self.hasher.hash_one(&row[..self.identity.min(row.len())]);
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(row);
                s
            }
            None => {
                self.slots.push(Some(row));
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        let RowStore {
            slots,
            by_id,
            hasher,
            identity,
            ..
        } = self;
        by_id.insert_unique(hash, slot, |&s| {
            hasher.hash_one(Self::id_of(slots, *identity, s))
        });
        for (e, key) in keys.into_iter().enumerate() {
            if let Some(k) = key {
                self.by_edge[e].entry(k).or_default().push(slot);
            }
        }
        before
    }

    /// Remove the row with identity `id`.
    fn remove(&mut self, id: &[Cell]) -> Option<Row> {
        let hash = self.hasher.hash_one(id);
        let RowStore {
            slots,
            by_id,
            identity,
            ..
        } = self;
        let entry = by_id
            .find_entry(hash, |&s| Self::id_of(slots, *identity, s) == id)
            .ok()?;
        let (slot, _) = entry.remove();
        let row = self.slots.get_mut(slot as usize)?.take()?;
        self.free.push(slot);
        for e in 0..self.keys.len() {
            if let Some(k) = self.key(e, &row) {
                let map = &mut self.by_edge[e];
                if let Some(slots) = map.get_mut(&k) {
                    slots.retain(|s| *s != slot);
                    if slots.is_empty() {
                        map.remove(&k);
                    }
                }
            }
        }
        Some(row)
    }

    /// Slots of the rows whose foreign key `edge` holds `key` (already folded).
    fn lookup(&self, edge: usize, key: &[Cell]) -> SmallVec<[u32; 2]> {
        self.by_edge[edge].get(key).cloned().unwrap_or_default()
    }

    /// Drop every row (the table leaves the index).
    fn clear(&mut self) {
        self.slots = Vec::new();
        self.free = Vec::new();
        self.by_id = HashTable::new();
        self.by_edge
            .iter_mut()
            .for_each(|m| *m = hashbrown::HashMap::new());
    }

    /// Rows held.
    fn len(&self) -> usize {
        self.by_id.len()
    }

    fn bytes_estimate(&self) -> usize {
        const CELL: usize = std::mem::size_of::<Cell>();
        // Allocator overhead per heap block.
        const BLOCK: usize = 16;
        let row_bytes =
            |r: &Row| BLOCK + r.len() * CELL + r.iter().map(Cell::heap_bytes).sum::<usize>();
        let slab = self.slots.capacity() * std::mem::size_of::<Option<Row>>()
            + self.slots.iter().flatten().map(row_bytes).sum::<usize>()
            + self.free.capacity() * 4;
        let ids = self.by_id.capacity() * (4 + 1);
        let edges: usize = self
            .by_edge
            .iter()
            .map(|m| {
                m.capacity() * (16 + std::mem::size_of::<SmallVec<[u32; 2]>>() + 1)
                    + m.iter()
                        .map(|(k, v)| {
                            row_bytes(k)
                                + if v.spilled() {
                                    BLOCK + v.capacity() * 4
                                } else {
                                    0
                                }
                        })
                        .sum::<usize>()
            })
            .sum();
        slab + ids + edges
    }
}

#[derive(Debug)]
struct Undo {
    table: usize,
    identity: Row,
    before: Option<Row>,
}

/// How a table map's columns line up with the index. Built once per table map.
#[derive(Debug, Clone)]
pub struct Binding {
    /// The indexed table and, per stored column, its position in the table map.
    stored: Option<(usize, Vec<Option<usize>>)>,
    /// Edges out of this table: per edge, its referenced columns' positions.
    out: Vec<(usize, Vec<Option<usize>>)>,
}

/// A decision the caller logs and counts: a table no longer indexed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub table: String,
    pub reason: &'static str,
    pub detail: String,
}

/// Foreign-key depth beyond which a walk stops and flushes (a data cycle: InnoDB itself stops
/// at 15 levels).
const MAX_DEPTH: usize = 64;

/// The index itself: see the module documentation.
#[derive(Debug)]
pub struct CascadeIndex {
    plan: IndexPlan,
    tables: Vec<RowStore>,
    /// Table indexes by `database.table`.
    by_name: HashMap<String, usize>,
    /// Each indexed table's rules, compiled against its stored columns.
    rules: Vec<Option<Arc<TableRules>>>,
    /// Caches any indexed table's rules write to (flushed when a walk cannot finish).
    caches: BTreeSet<Arc<str>>,
    undo: Vec<Undo>,
    max_rows: usize,
    notices: Vec<Notice>,
    /// Edge ids by parent table.
    from: HashMap<String, Vec<usize>>,
    /// Edge ids by parent, for indexed parents (by table index).
    out: Vec<Vec<usize>>,
}

impl CascadeIndex {
    /// An empty index for `plan`; `rules` is the whole rule set.
    pub fn new(plan: IndexPlan, rules: &[Rule], max_rows: usize) -> CascadeIndex {
        let mut caches = BTreeSet::new();
        let compiled = plan
            .tables
            .iter()
            .map(|t| {
                let own: Vec<&Rule> = rules
                    .iter()
                    .filter(|r| r.qualified_table() == t.table)
                    .collect();
                caches.extend(own.iter().filter_map(|r| r.cache.as_deref().map(Arc::from)));
                (!own.is_empty()).then(|| {
                    Arc::new(TableRules::compile(
                        &t.table,
                        &own,
                        TableShape::named(t.columns.clone()),
                    ))
                })
            })
            .collect();
        let tables = plan
            .tables
            .iter()
            .map(|t| {
                let keys = t
                    .into
                    .iter()
                    .map(|&e| (plan.edges[e].child_pos.clone(), plan.edges[e].fold.clone()))
                    .collect();
                RowStore::new(t.identity, keys)
            })
            .collect();
        let by_name: HashMap<String, usize> = plan
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| (t.table.clone(), i))
            .collect();
        let mut from: HashMap<String, Vec<usize>> = HashMap::new();
        let mut out = vec![Vec::new(); plan.tables.len()];
        for (i, e) in plan.edges.iter().enumerate() {
            from.entry(e.parent.clone()).or_default().push(i);
            if let Some(&p) = by_name.get(&e.parent) {
                out[p].push(i);
            }
        }
        CascadeIndex {
            plan,
            tables,
            by_name,
            rules: compiled,
            caches,
            undo: Vec::new(),
            max_rows,
            notices: Vec::new(),
            from,
            out,
        }
    }

    pub fn plan(&self) -> &IndexPlan {
        &self.plan
    }

    fn table_index(&self, table: &str) -> Option<usize> {
        self.by_name.get(table).copied()
    }

    /// Is `table` indexed, or the parent of an indexed table's foreign key?
    pub fn involves(&self, table: &str) -> bool {
        self.table_index(table).is_some() || self.from.contains_key(table)
    }

    /// True when `table`'s rows are indexed and complete: a chain whose every table this holds
    /// for needs no fallback flush.
    pub fn covers(&self, table: &str) -> bool {
        self.table_index(table)
            .is_some_and(|i| !self.tables[i].disabled)
    }

    /// Rows held, per table (disabled tables hold none).
    pub fn row_counts(&self) -> Vec<(&str, usize)> {
        self.plan
            .tables
            .iter()
            .zip(&self.tables)
            .map(|(p, t)| (p.table.as_str(), t.len()))
            .collect()
    }

    /// Approximate heap bytes held by the rows and the indexes over them.
    pub fn bytes_estimate(&self) -> usize {
        self.tables.iter().map(RowStore::bytes_estimate).sum()
    }

    /// Decisions since the last call (tables disabled), for the caller to log and count.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// How a table map with these column names lines up with the index; `None` when the
    /// table is neither indexed nor the parent of an indexed foreign key.
    pub fn bind(&self, table: &str, names: &[String]) -> Option<Binding> {
        let position = |c: &str| names.iter().position(|n| n.eq_ignore_ascii_case(c));
        let stored = self.table_index(table).map(|i| {
            let cols = self.plan.tables[i]
                .columns
                .iter()
                .map(|c| position(c))
                .collect();
            (i, cols)
        });
        let out: Vec<(usize, Vec<Option<usize>>)> = self
            .from
            .get(table)
            .into_iter()
            .flatten()
            .map(|&e| {
                let cols = self.plan.edges[e]
                    .fk
                    .parent_columns
                    .iter()
                    .map(|c| position(c))
                    .collect();
                (e, cols)
            })
            .collect();
        (stored.is_some() || !out.is_empty()).then_some(Binding { stored, out })
    }

    /// A logged row change of a bound table: the rows its foreign keys cascade to (their rules'
    /// intents into `out`, the index updated as the engine changed them), then the table's own
    /// row in the index.
    pub fn logged(
        &mut self,
        b: &Binding,
        op: Op,
        before: Option<&[Value]>,
        after: Option<&[Value]>,
        out: &mut Vec<Intent>,
    ) {
        // An insert cascades nothing.
        if op != Op::Insert {
            for (e, cols) in &b.out {
                let key = |image: Option<&[Value]>| -> Result<Option<Row>, ()> {
                    let Some(image) = image else { return Ok(None) };
                    cols.iter()
                        .map(|i| {
                            i.and_then(|i| image.get(i))
                                .and_then(Cell::from_value)
                                .ok_or(())
                        })
                        .collect::<Result<Row, ()>>()
                        .map(Some)
                };
                match (key(before), key(after)) {
                    (Ok(old), Ok(new)) => self.cascade(*e, op, old, new, out, 0),
                    // A column the binlog did not carry, or the table lost it: the walk cannot
                    // look children up.
                    _ => self.give_up(out),
                }
            }
        }
        let Some((t, cols)) = &b.stored else { return };
        if self.tables[*t].disabled {
            return;
        }
        let row = |image: &[Value]| -> Option<Row> {
            cols.iter()
                .map(|i| i.and_then(|i| image.get(i)).and_then(Cell::from_value))
                .collect()
        };
        let images = [before, after];
        let rows: Vec<Option<Row>> = images.iter().flatten().map(|i| row(i)).collect();
        if rows.iter().any(Option::is_none) {
            self.disable(
                *t,
                "columns_missing",
                "a row image lacks a stored column (the table changed); rebuilt at the next schema change".into(),
            );
            return;
        }
        let mut rows = rows.into_iter().flatten();
        match op {
            Op::Insert => {
                if let Some(a) = rows.next() {
                    self.upsert(*t, a);
                }
            }
            Op::Delete => {
                if let Some(b) = rows.next() {
                    let id = self.identity(*t, &b);
                    self.remove(*t, &id);
                }
            }
            Op::Update => {
                if let (Some(b), Some(a)) = (rows.next(), rows.next()) {
                    let id = self.identity(*t, &b);
                    self.remove(*t, &id);
                    self.upsert(*t, a);
                }
            }
        }
    }

    /// A row loaded by the snapshot (no undo: the load is not a transaction of the stream).
    pub fn load_row(&mut self, table: usize, row: Row) {
        if !self.tables[table].disabled {
            self.tables[table].insert(row);
            self.check_cap(table);
        }
    }

    /// The transaction committed: its changes stay.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// The stream restarts at the last commit boundary: undo the unfinished transaction.
    pub fn rollback(&mut self) {
        while let Some(u) = self.undo.pop() {
            let table = &mut self.tables[u.table];
            if table.disabled {
                continue;
            }
            table.remove(&u.identity);
            if let Some(row) = u.before {
                table.insert(row);
            }
        }
    }

    fn identity(&self, t: usize, row: &[Cell]) -> Row {
        row[..self.plan.tables[t].identity.min(row.len())].into()
    }

    /// Insert or replace by identity, with undo.
    fn upsert(&mut self, t: usize, row: Row) {
        let id = self.identity(t, &row);
        let before = self.tables[t].insert(row);
        self.undo.push(Undo {
            table: t,
            identity: id,
            before,
        });
        self.check_cap(t);
    }

    fn check_cap(&mut self, t: usize) {
        if self.tables[t].len() > self.max_rows {
            let detail = format!(
                "more than producer.cascade_index_max_rows = {} rows",
                self.max_rows
            );
            self.disable(t, "max_rows", detail);
        }
    }

    /// Remove by identity, with undo.
    fn remove(&mut self, t: usize, id: &Row) {
        if let Some(before) = self.tables[t].remove(id) {
            self.undo.push(Undo {
                table: t,
                identity: id.clone(),
                before: Some(before),
            });
        }
    }

    /// Stop indexing `t` and every table below it; their chains fall back to flushes.
    fn disable(&mut self, t: usize, reason: &'static str, detail: String) {
        let mut todo = vec![(t, reason, detail)];
        while let Some((t, reason, detail)) = todo.pop() {
            if self.tables[t].disabled {
                continue;
            }
            self.tables[t].disabled = true;
            self.tables[t].clear();
            let name = self.plan.tables[t].table.clone();
            for e in &self.out[t] {
                todo.push((
                    self.plan.edges[*e].child,
                    "parent_not_indexed",
                    format!("rows of it change through {name}, which is no longer indexed"),
                ));
            }
            self.notices.push(Notice {
                table: name,
                reason,
                detail,
            });
        }
    }

    /// The walk cannot finish: flush every cache the indexed tables' rules write to.
    fn give_up(&self, out: &mut Vec<Intent>) {
        out.extend(self.caches.iter().map(|c| Intent::FlushCache {
            cache: c.clone(),
            reason: "cascade_underivable",
        }));
    }

    /// A parent row changed (`op`; `old`/`new` are its referenced columns' values before and
    /// after): apply edge `e`'s action to the child rows, recursively.
    fn cascade(
        &mut self,
        e: usize,
        op: Op,
        old: Option<Row>,
        new: Option<Row>,
        out: &mut Vec<Intent>,
        depth: usize,
    ) {
        let edge = &self.plan.edges[e];
        let (child, slot) = (edge.child, edge.slot);
        if self.tables[child].disabled {
            return;
        }
        let action = match op {
            Op::Insert => return,
            Op::Delete => edge.fk.on_delete,
            Op::Update => {
                if old == new {
                    return;
                }
                edge.fk.on_update
            }
        };
        if action == FkAction::None {
            return;
        }
        let Some(lookup) = old.and_then(|old| fk_value(old.iter().map(Some), &edge.fold)) else {
            return;
        };
        if depth >= MAX_DEPTH {
            self.give_up(out);
            return;
        }
        let slots = self.tables[child].lookup(slot, &lookup);
        for s in slots {
            let store = &self.tables[child];
            // A slot freed and reused while walking (a cycle through this table) holds another
            // row: only rows still under this key are this parent's children.
            let Some(row) = store
                .row(s)
                .filter(|r| store.key(slot, r).as_deref() == Some(&lookup[..]))
                .cloned()
            else {
                continue;
            };
            let edge = &self.plan.edges[e];
            let after: Option<Row> = match (action, op) {
                (FkAction::Cascade, Op::Delete) => None,
                (FkAction::SetNull, _) => {
                    let mut a = row.clone();
                    edge.child_pos.iter().for_each(|&p| a[p] = Cell::Null);
                    Some(a)
                }
                _ => {
                    let mut a = row.clone();
                    if let Some(new) = &new {
                        edge.child_pos
                            .iter()
                            .zip(new.iter())
                            .for_each(|(&p, v)| a[p] = v.clone());
                    }
                    Some(a)
                }
            };
            let id = self.identity(child, &row);
            self.remove(child, &id);
            if let Some(a) = &after {
                self.upsert(child, a.clone());
            }
            let child_op = if after.is_some() {
                Op::Update
            } else {
                Op::Delete
            };
            if let Some(rules) = &self.rules[child] {
                let values = |r: &Row| r.iter().map(Cell::to_value).collect::<Vec<_>>();
                let change = crate::decode::RowChange {
                    op: child_op,
                    before: Some(values(&row)),
                    after: after.as_ref().map(values),
                };
                rules.intents(&change, out);
            }
            // The child row's own foreign keys, as its change fires them.
            for i in 0..self.out[child].len() {
                let next = self.out[child][i];
                let Some(pos) = &self.plan.edges[next].parent_pos else {
                    continue;
                };
                let pick = |r: &Row| -> Row { pos.iter().map(|&p| r[p].clone()).collect() };
                let (old, new) = (Some(pick(&row)), after.as_ref().map(pick));
                self.cascade(next, child_op, old, new, out, depth + 1);
            }
            if self.tables[child].disabled {
                return;
            }
        }
    }
}

/// What the database says about `tables`: columns (with case-insensitive ones) and identity.
pub async fn table_facts(
    conn: &mut mysql_async::Conn,
    tables: &BTreeSet<String>,
) -> Result<BTreeMap<String, TableFacts>, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    let mut out = BTreeMap::new();
    for t in tables {
        let Some((db, name)) = t.split_once('.') else {
            continue;
        };
        let columns: Vec<(String, Option<String>, String, String)> = conn
            .exec(
                "SELECT COLUMN_NAME, COLLATION_NAME, IS_NULLABLE, COLUMN_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (db, name),
            )
            .await?;
        if columns.is_empty() {
            continue;
        }
        // (index name, non-unique, column, position)
        let keys: Vec<(String, i64, String, i64)> = conn
            .exec(
                "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME, SEQ_IN_INDEX FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY INDEX_NAME = 'PRIMARY' DESC, INDEX_NAME, SEQ_IN_INDEX",
                (db, name),
            )
            .await?;
        let not_null = |c: &str| {
            columns
                .iter()
                .any(|(n, _, nullable, _)| n.eq_ignore_ascii_case(c) && nullable == "NO")
        };
        let mut unique: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut order: Vec<&str> = Vec::new();
        for (index, non_unique, column, _) in &keys {
            if *non_unique == 0 {
                if !unique.contains_key(index.as_str()) {
                    order.push(index);
                }
                unique.entry(index).or_default().push(column.clone());
            }
        }
        let identity = order
            .iter()
            .map(|i| &unique[i])
            .find(|cols| cols.iter().all(|c| not_null(c)))
            .cloned();
        let folded = columns
            .iter()
            .filter(|(_, collation, _, _)| {
                collation
                    .as_deref()
                    .is_some_and(|c| c.contains("_ci") || c.ends_with("_ai"))
            })
            .map(|(n, _, _, _)| n.to_ascii_lowercase())
            .collect();
        let types = columns
            .iter()
            .map(|(n, collation, _, ty)| {
                (
                    n.to_ascii_lowercase(),
                    format!("{ty} {}", collation.as_deref().unwrap_or_default()),
                )
            })
            .collect();
        out.insert(
            t.clone(),
            TableFacts {
                columns: columns.into_iter().map(|(n, _, _, _)| n).collect(),
                identity,
                folded,
                types,
            },
        );
    }
    Ok(out)
}

/// The binlog position a consistent snapshot started on `conn` corresponds to: MariaDB's
/// `binlog_snapshot_file`/`binlog_snapshot_position` (exact), else `None` (the caller reads the
/// current position right after the snapshot started, which is at or past it).
async fn snapshot_position(
    conn: &mut mysql_async::Conn,
) -> Result<Option<(String, u64)>, mysql_async::Error> {
    use mysql_async::prelude::Queryable;
    let rows: Vec<(String, String)> = conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
    let get = |k: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
    };
    Ok(
        match (get("binlog_snapshot_file"), get("binlog_snapshot_position")) {
            (Some(f), Some(p)) if !f.is_empty() => p.parse().ok().map(|p| (f, p)),
            _ => None,
        },
    )
}

/// Fill `index` from one consistent snapshot on `conn`; returns the binlog position the
/// snapshot corresponds to (file, pos), at or past which the index is complete.
pub async fn load(
    conn: &mut mysql_async::Conn,
    index: &mut CascadeIndex,
) -> Result<(String, u64), crate::error::SourceError> {
    use mysql_async::prelude::Queryable;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await?;
    let position = match snapshot_position(conn).await? {
        Some(p) => p,
        None => {
            let p = crate::server::current_position(conn, 0).await?;
            (p.file, p.pos)
        }
    };
    let plans: Vec<TablePlan> = index.plan().tables.clone();
    for (t, plan) in plans.iter().enumerate() {
        let Some((db, name)) = plan.table.split_once('.') else {
            continue;
        };
        let quote = crate::server::quote_ident;
        let cols: Vec<String> = plan.columns.iter().map(|c| quote(c)).collect();
        let sql = format!(
            "SELECT {} FROM {}.{}",
            cols.join(", "),
            quote(db),
            quote(name)
        );
        let mut result = conn.exec_iter(sql, ()).await?;
        let mut read = 0u64;
        while let Some(row) = result.next().await? {
            read += 1;
            if index.tables[t].disabled {
                // Over the cap: the rest is read and dropped (the result must be drained).
                continue;
            }
            let cells: Option<Row> = row
                .unwrap()
                .into_iter()
                .map(|v| Cell::from_value(&crate::decode::from_query(v)))
                .collect();
            if let Some(cells) = cells {
                index.load_row(t, cells);
            }
        }
        tracing::debug!(table = %plan.table, rows = read, "Cascade index: snapshot of a table read.");
    }
    conn.query_drop("COMMIT").await?;
    index.commit();
    Ok(position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::chains;

    fn rules(toml_rules: &str) -> Vec<Rule> {
        let text = format!(
            "[source]\nurl = \"mysql://u:p@h:1\"\ndatabase = \"rt\"\n[kafka]\nbrokers = \"b:1\"\n{toml_rules}"
        );
        let c: crate::config::Config = toml::from_str(&text).unwrap();
        c.rules().unwrap()
    }

    fn fk(
        name: &str,
        child: &str,
        cols: &[&str],
        parent_cols: &[&str],
        on_delete: FkAction,
        on_update: FkAction,
    ) -> ForeignKey {
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect();
        ForeignKey {
            name: name.into(),
            child: format!("rt.{child}"),
            child_columns: s(cols),
            parent_columns: s(parent_cols),
            on_delete,
            on_update,
        }
    }

    fn facts(table: &str, columns: &[&str], identity: &[&str]) -> (String, TableFacts) {
        let s = |v: &[&str]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
        (
            format!("rt.{table}"),
            TableFacts {
                columns: s(columns),
                identity: Some(s(identity)),
                folded: BTreeSet::new(),
                types: BTreeMap::new(),
            },
        )
    }

    const RT_RULES: &str = r#"
        [[rules]]
        table = "Object"
        cache = "rt"
        keys = ["object:{id}"]

        [[rules]]
        table = "Port"
        cache = "rt"
        keys = ["port:{id}", "object:{object_id}"]

        [[rules]]
        table = "Link"
        cache = "rt"
        keys = ["port:{porta}", "port:{portb}"]

        [[rules]]
        table = "AttributeValue"
        cache = "rt"
        keys = ["object:{object_id}"]
    "#;

    /// RackTables' Object → Port → Link (both ends), and Object → AttributeValue.
    fn racktables() -> (Vec<Rule>, BTreeMap<String, Vec<CascadeChain>>, CascadeIndex) {
        use FkAction::{Cascade, None as NoAction};
        let rules = rules(RT_RULES);
        let fks = vec![
            (
                "rt.Object".to_owned(),
                fk(
                    "Port-FK-object_id",
                    "Port",
                    &["object_id"],
                    &["id"],
                    Cascade,
                    NoAction,
                ),
            ),
            (
                "rt.Port".to_owned(),
                fk("Link-FK-a", "Link", &["porta"], &["id"], Cascade, NoAction),
            ),
            (
                "rt.Port".to_owned(),
                fk("Link-FK-b", "Link", &["portb"], &["id"], Cascade, NoAction),
            ),
            (
                "rt.Object".to_owned(),
                fk(
                    "AttributeValue-FK-object",
                    "AttributeValue",
                    &["object_id"],
                    &["id"],
                    Cascade,
                    Cascade,
                ),
            ),
        ];
        let chains = chains(&fks, |t| rules.iter().any(|r| r.qualified_table() == t));
        let needed = needed_tables(&chains, &rules);
        let facts = BTreeMap::from([
            facts("Port", &["id", "object_id", "name"], &["id"]),
            facts("Link", &["porta", "portb", "cable"], &["porta", "portb"]),
        ]);
        let (plan, excluded) = plan(&chains, &rules, &needed, &facts);
        assert!(excluded.is_empty(), "{excluded:?}");
        let index = CascadeIndex::new(plan, &rules, 100);
        (rules, chains, index)
    }

    fn keys(out: &[Intent]) -> BTreeSet<String> {
        out.iter()
            .filter_map(|i| match i {
                Intent::PurgeKey { key, .. } => Some(key.clone()),
                _ => None,
            })
            .collect()
    }

    fn want(keys: &[&str]) -> BTreeSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    fn flushes(out: &[Intent]) -> usize {
        out.iter()
            .filter(|i| matches!(i, Intent::FlushCache { .. }))
            .count()
    }

    fn ints(v: &[i64]) -> Vec<Value> {
        v.iter().map(|i| Value::Int(*i)).collect()
    }

    /// Insert logged rows: ports (id, object_id) and links (porta, portb).
    fn fill(ix: &mut CascadeIndex, ports: &[(i64, i64)], links: &[(i64, i64)]) {
        let port = ix
            .bind("rt.Port", &["id".into(), "object_id".into(), "name".into()])
            .unwrap();
        let link = ix
            .bind("rt.Link", &["porta".into(), "portb".into(), "cable".into()])
            .unwrap();
        let mut out = Vec::new();
        for (id, obj) in ports {
            let row = vec![Value::Int(*id), Value::UInt(*obj as u64), Value::Null];
            ix.logged(&port, Op::Insert, None, Some(&row), &mut out);
        }
        for (a, b) in links {
            let row = vec![Value::Int(*a), Value::Int(*b), Value::Null];
            ix.logged(&link, Op::Insert, None, Some(&row), &mut out);
        }
        assert!(out.is_empty(), "inserts cascade nothing: {out:?}");
        ix.commit();
    }

    #[test]
    fn only_tables_with_underivable_keys_are_indexed() {
        let (_, _, ix) = racktables();
        let tables: Vec<&str> = ix.plan().tables.iter().map(|t| t.table.as_str()).collect();
        // AttributeValue's key derives from the Object row: no index needed.
        assert_eq!(tables, vec!["rt.Link", "rt.Port"]);
        let port = &ix.plan().tables[1];
        assert_eq!(
            port.columns,
            vec!["id", "object_id"],
            "identity first, no extra columns"
        );
        assert_eq!(port.identity, 1);
    }

    #[test]
    fn deleting_an_object_yields_its_ports_and_the_far_ends_of_their_links() {
        let (_, _, mut ix) = racktables();
        fill(&mut ix, &[(1, 10), (2, 20), (3, 10)], &[(1, 2), (4, 3)]);
        let object = ix.bind("rt.Object", &["id".into(), "name".into()]).unwrap();
        let mut out = Vec::new();
        let row = vec![Value::UInt(10), Value::Bytes(b"srv".to_vec())];
        ix.logged(&object, Op::Delete, Some(&row), None, &mut out);
        assert_eq!(
            keys(&out),
            want(&["object:10", "port:1", "port:2", "port:3", "port:4"])
        );
        assert_eq!(flushes(&out), 0);
        // The engine deleted the ports and links: the index did too.
        assert_eq!(ix.row_counts(), vec![("rt.Link", 0), ("rt.Port", 1)]);
        // An update that changes nothing referenced cascades nothing.
        let mut out = Vec::new();
        let b = vec![Value::UInt(20), Value::Bytes(b"a".to_vec())];
        let a = vec![Value::UInt(20), Value::Bytes(b"b".to_vec())];
        ix.logged(&object, Op::Update, Some(&b), Some(&a), &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_logged_port_delete_reaches_its_link_and_the_port_leaves_the_index() {
        let (_, _, mut ix) = racktables();
        fill(&mut ix, &[(1, 10), (2, 20)], &[(1, 2)]);
        let port = ix
            .bind("rt.Port", &["id".into(), "object_id".into(), "name".into()])
            .unwrap();
        let mut out = Vec::new();
        let row = vec![Value::Int(2), Value::Int(20), Value::Null];
        ix.logged(&port, Op::Delete, Some(&row), None, &mut out);
        assert_eq!(keys(&out), want(&["port:1", "port:2"]));
        assert_eq!(ix.row_counts(), vec![("rt.Link", 0), ("rt.Port", 1)]);
    }

    #[test]
    fn rollback_restores_the_index_as_of_the_last_commit() {
        let (_, _, mut ix) = racktables();
        fill(&mut ix, &[(1, 10), (2, 20)], &[(1, 2)]);
        let object = ix.bind("rt.Object", &["id".into()]).unwrap();
        let mut out = Vec::new();
        ix.logged(&object, Op::Delete, Some(&ints(&[10])), None, &mut out);
        assert_eq!(ix.row_counts(), vec![("rt.Link", 0), ("rt.Port", 1)]);
        // The stream broke before the commit: the transaction is read again, whole.
        ix.rollback();
        assert_eq!(ix.row_counts(), vec![("rt.Link", 1), ("rt.Port", 2)]);
        let mut again = Vec::new();
        ix.logged(&object, Op::Delete, Some(&ints(&[10])), None, &mut again);
        assert_eq!(keys(&again), keys(&out));
    }

    #[test]
    fn replaying_changes_the_snapshot_holds_is_harmless() {
        let (_, _, mut ix) = racktables();
        fill(&mut ix, &[(1, 10)], &[]);
        // The same insert again (the stream resumed before the snapshot), then an update.
        fill(&mut ix, &[(1, 10)], &[]);
        assert_eq!(ix.row_counts(), vec![("rt.Link", 0), ("rt.Port", 1)]);
        let port = ix
            .bind("rt.Port", &["id".into(), "object_id".into()])
            .unwrap();
        let mut out = Vec::new();
        ix.logged(
            &port,
            Op::Update,
            Some(&ints(&[1, 10])),
            Some(&ints(&[1, 11])),
            &mut out,
        );
        let object = ix.bind("rt.Object", &["id".into()]).unwrap();
        ix.logged(&object, Op::Delete, Some(&ints(&[10])), None, &mut out);
        assert!(!keys(&out).contains("port:1"), "port 1 moved to object 11");
        ix.logged(&object, Op::Delete, Some(&ints(&[11])), None, &mut out);
        assert!(keys(&out).contains("port:1"));
    }

    #[test]
    fn over_the_cap_a_table_and_those_below_it_are_dropped_with_a_notice() {
        let (rules, _, ix) = racktables();
        let mut ix = CascadeIndex::new(ix.plan().clone(), &rules, 2);
        fill(&mut ix, &[(1, 10), (2, 10)], &[(1, 2)]);
        assert!(ix.covers("rt.Port") && ix.covers("rt.Link"));
        assert!(ix.take_notices().is_empty());
        fill(&mut ix, &[(3, 10)], &[]);
        assert!(!ix.covers("rt.Port") && !ix.covers("rt.Link"));
        let notices = ix.take_notices();
        assert_eq!(notices.len(), 2, "{notices:?}");
        assert_eq!(notices[0].reason, "max_rows");
        assert_eq!(notices[0].table, "rt.Port");
        assert_eq!(notices[1].reason, "parent_not_indexed");
        assert_eq!(ix.row_counts(), vec![("rt.Link", 0), ("rt.Port", 0)]);
        assert!(ix.take_notices().is_empty(), "said once");
    }

    #[test]
    fn set_null_and_update_cascade_rewrite_children_and_fire_the_next_level() {
        use FkAction::{Cascade, None as NoAction, SetNull};
        let rules = rules(
            r#"
            [[rules]]
            table = "Domain"
            cache = "c"
            keys = ["domain:{id}", "group:{group_id}"]

            [[rules]]
            table = "Vlan"
            cache = "c"
            keys = ["vlan:{vlan_id}:{domain_name}"]
            "#,
        );
        // Domain.group_id → Domain.id ON DELETE SET NULL (self-reference);
        // Vlan.domain_name → Domain.name ON UPDATE CASCADE ON DELETE CASCADE (a string key,
        // compared case-insensitively).
        let fks = vec![
            (
                "rt.Domain".to_owned(),
                fk(
                    "Domain-group",
                    "Domain",
                    &["group_id"],
                    &["id"],
                    SetNull,
                    NoAction,
                ),
            ),
            (
                "rt.Domain".to_owned(),
                fk(
                    "Vlan-domain",
                    "Vlan",
                    &["domain_name"],
                    &["name"],
                    Cascade,
                    Cascade,
                ),
            ),
        ];
        let chains = chains(&fks, |t| rules.iter().any(|r| r.qualified_table() == t));
        let needed = needed_tables(&chains, &rules);
        let mut f = BTreeMap::from([
            facts("Domain", &["id", "name", "group_id"], &["id"]),
            facts(
                "Vlan",
                &["vlan_id", "domain_name"],
                &["vlan_id", "domain_name"],
            ),
        ]);
        f.get_mut("rt.Vlan")
            .unwrap()
            .folded
            .insert("domain_name".into());
        let (plan, excluded) = plan(&chains, &rules, &needed, &f);
        assert!(excluded.is_empty(), "{excluded:?}");
        let mut ix = CascadeIndex::new(plan, &rules, 100);
        let cols = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let domain = ix
            .bind("rt.Domain", &cols(&["id", "name", "group_id"]))
            .unwrap();
        let vlan = ix
            .bind("rt.Vlan", &cols(&["vlan_id", "domain_name"]))
            .unwrap();
        let d = |id: i64, name: &str, group: Option<i64>| {
            vec![
                Value::Int(id),
                Value::Bytes(name.as_bytes().to_vec()),
                group.map_or(Value::Null, Value::Int),
            ]
        };
        let v = |id: i64, name: &str| vec![Value::Int(id), Value::Bytes(name.as_bytes().to_vec())];
        let mut out = Vec::new();
        ix.logged(
            &domain,
            Op::Insert,
            None,
            Some(&d(1, "grp", None)),
            &mut out,
        );
        ix.logged(
            &domain,
            Op::Insert,
            None,
            Some(&d(2, "dc1", Some(1))),
            &mut out,
        );
        ix.logged(&vlan, Op::Insert, None, Some(&v(10, "DC1 ")), &mut out);
        ix.commit();
        // Renaming dc1 rewrites its VLAN rows (matched case-insensitively).
        let mut out = Vec::new();
        ix.logged(
            &domain,
            Op::Update,
            Some(&d(2, "dc1", Some(1))),
            Some(&d(2, "dc-one", Some(1))),
            &mut out,
        );
        assert_eq!(keys(&out), want(&["vlan:10:DC1 ", "vlan:10:dc-one"]));
        // Deleting the group sets dc-one's group_id to NULL: its old and new keys.
        let mut out = Vec::new();
        ix.logged(
            &domain,
            Op::Delete,
            Some(&d(1, "grp", None)),
            None,
            &mut out,
        );
        assert_eq!(keys(&out), want(&["domain:2", "group:1"]));
        // The rewritten rows are indexed under their new values.
        let mut out = Vec::new();
        ix.logged(
            &domain,
            Op::Delete,
            Some(&d(2, "DC-ONE", None)),
            None,
            &mut out,
        );
        assert_eq!(keys(&out), want(&["vlan:10:dc-one"]));
    }

    #[test]
    fn a_self_referencing_cascade_reaches_every_level() {
        use FkAction::{Cascade, None as NoAction};
        let rules = rules(
            r#"
            [[rules]]
            table = "Tree"
            cache = "c"
            keys = ["node:{id}"]
            "#,
        );
        let fks = vec![(
            "rt.Tree".to_owned(),
            fk(
                "Tree-parent",
                "Tree",
                &["parent_id"],
                &["id"],
                Cascade,
                NoAction,
            ),
        )];
        let chains = chains(&fks, |_| true);
        let needed = needed_tables(&chains, &rules);
        assert_eq!(
            needed,
            BTreeSet::from(["rt.Tree".to_owned()]),
            "a cycle is underivable"
        );
        let f = BTreeMap::from([facts("Tree", &["id", "parent_id"], &["id"])]);
        let (plan, _) = plan(&chains, &rules, &needed, &f);
        let mut ix = CascadeIndex::new(plan, &rules, 100);
        let tree = ix
            .bind("rt.Tree", &["id".into(), "parent_id".into()])
            .unwrap();
        let mut out = Vec::new();
        let node = |id: i64, parent: Option<i64>| {
            vec![Value::Int(id), parent.map_or(Value::Null, Value::Int)]
        };
        ix.logged(&tree, Op::Insert, None, Some(&node(1, None)), &mut out);
        for id in 2..=20 {
            ix.logged(
                &tree,
                Op::Insert,
                None,
                Some(&node(id, Some(id - 1))),
                &mut out,
            );
        }
        ix.logged(&tree, Op::Insert, None, Some(&node(30, None)), &mut out);
        ix.commit();
        ix.logged(&tree, Op::Delete, Some(&node(1, None)), None, &mut out);
        let want: BTreeSet<String> = (2..=20).map(|i| format!("node:{i}")).collect();
        assert_eq!(
            keys(&out),
            want,
            "the logged row's own key comes from its rules, not here"
        );
        assert_eq!(ix.row_counts(), vec![("rt.Tree", 1)]);
    }

    #[test]
    fn a_table_without_identity_is_left_out_with_everything_below_it() {
        let (rules, chains, _) = racktables();
        let needed = needed_tables(&chains, &rules);
        let mut f = BTreeMap::from([
            facts("Port", &["id", "object_id"], &["id"]),
            facts("Link", &["porta", "portb"], &["porta", "portb"]),
        ]);
        f.get_mut("rt.Port").unwrap().identity = None;
        let (plan, excluded) = plan(&chains, &rules, &needed, &f);
        assert!(plan.tables.is_empty(), "{plan:?}");
        let tables: Vec<&str> = excluded.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tables, vec!["rt.Link", "rt.Port"]);
    }
}
