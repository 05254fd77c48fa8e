//! Rules stage (pure): a row change of a watched table → invalidation intents.
//!
//! Rules are compiled against the column list of each TABLE_MAP event ([`TableRules::compile`]),
//! so column lookups are index-based on the hot path and a column that disappeared (schema
//! change) is known before any row arrives: it turns the affected key into a `cache_flush` of
//! that cache (reason `key_underivable`) instead of a silent skip.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rtinval_schemas::Op;

use crate::cascade::CascadeChain;
use crate::decode::{RowChange, TableShape, Value, push_hex};

/// A parsed key template such as `object:{id}` or `{objtype_id|realm}:{id}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Column(String, Option<Filter>),
}

/// Value maps for key templates, by name (`[maps.realm]` in the config).
pub type Maps = BTreeMap<String, BTreeMap<String, String>>;

/// How a placeholder's value is written into the key: `{column|filter}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// An IPv4 address held as an unsigned integer (or 4 bytes): dotted quad.
    Ipv4,
    /// An IPv6 address held as BINARY(16): RFC 5952 text, as `inet_ntop` prints it.
    Ipv6,
    /// Bytes (or text) as lowercase hex.
    Hex,
    /// A named value map: the value's text looked up; `*` is the default entry.
    Map {
        name: String,
        entries: Arc<BTreeMap<String, String>>,
    },
}

impl Filter {
    fn resolve(name: &str, maps: &Maps) -> Result<Filter, String> {
        match name {
            "ipv4" => Ok(Filter::Ipv4),
            "ipv6" => Ok(Filter::Ipv6),
            "hex" => Ok(Filter::Hex),
            _ => match maps.get(name) {
                Some(entries) => Ok(Filter::Map {
                    name: name.to_owned(),
                    entries: Arc::new(entries.clone()),
                }),
                None => Err(format!(
                    "unknown filter {name:?}: use ipv4, ipv6, hex, or define [maps.{name}]"
                )),
            },
        }
    }

    /// Whether a column of SQL type `data_type` (information_schema `DATA_TYPE`) can be
    /// rendered by this filter; `Err` says what would fit.
    pub fn accepts(&self, data_type: &str) -> Result<(), String> {
        let t = data_type.to_ascii_lowercase();
        let ok = match self {
            Filter::Ipv4 => {
                matches!(t.as_str(), "int" | "bigint" | "binary" | "varbinary")
            }
            Filter::Ipv6 => matches!(t.as_str(), "binary" | "varbinary"),
            Filter::Hex | Filter::Map { .. } => true,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "filter {} does not fit a column of type {data_type} ({})",
                self.name(),
                match self {
                    Filter::Ipv4 => "ipv4 takes an INT UNSIGNED or BINARY(4) address",
                    _ => "ipv6 takes a BINARY(16) address",
                }
            ))
        }
    }

    fn name(&self) -> &str {
        match self {
            Filter::Ipv4 => "ipv4",
            Filter::Ipv6 => "ipv6",
            Filter::Hex => "hex",
            Filter::Map { name, .. } => name,
        }
    }

    /// Append the filtered value; false when the value does not fit (the key is underivable).
    fn apply(&self, v: &Value, out: &mut String) -> bool {
        use std::fmt::Write as _;
        use std::net::{Ipv4Addr, Ipv6Addr};
        match (self, v) {
            (Filter::Ipv4, v) => {
                let addr = match v {
                    Value::UInt(u) => u32::try_from(*u).ok().map(Ipv4Addr::from),
                    Value::Int(i) => u32::try_from(*i).ok().map(Ipv4Addr::from),
                    Value::Bytes(b) => <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from),
                    _ => None,
                };
                addr.is_some_and(|a| write!(out, "{a}").is_ok())
            }
            (Filter::Ipv6, Value::Bytes(b)) => <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(Ipv6Addr::from)
                .is_some_and(|a| write!(out, "{a}").is_ok()),
            (Filter::Hex, Value::Bytes(b)) => push_hex(b, out),
            (Filter::Hex, Value::Text(t)) => push_hex(t.as_bytes(), out),
            (Filter::Map { entries, .. }, v) => {
                let mut text = String::new();
                if !v.render(&mut text) {
                    return false;
                }
                match entries.get(&text).or_else(|| entries.get("*")) {
                    Some(mapped) => {
                        out.push_str(mapped);
                        true
                    }
                    None => false,
                }
            }
            _ => false,
        }
    }
}

impl Template {
    /// Parse `literal{column}literal...`; `{{` and `}}` are literal braces. A placeholder may
    /// name a built-in filter: `{ip|ipv4}`, `{ip|ipv6}`, `{hash|hex}`.
    pub fn parse(s: &str) -> Result<Template, String> {
        Template::parse_with(s, &Maps::new())
    }

    /// Like [`Template::parse`], also resolving `{column|map}` against the config's `maps`.
    pub fn parse_with(s: &str, maps: &Maps) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    let mut filter: Option<String> = None;
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some('|') if filter.is_none() => filter = Some(String::new()),
                            Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '$' => {
                                filter.as_mut().unwrap_or(&mut name).push(c)
                            }
                            Some(c) => {
                                return Err(format!("invalid character {c:?} in placeholder"));
                            }
                            None => return Err("unclosed placeholder, missing '}'".into()),
                        }
                    }
                    if name.is_empty() {
                        return Err("empty placeholder {}".into());
                    }
                    let filter = match filter.as_deref() {
                        None => None,
                        Some("") => return Err(format!("empty filter after {{{name}|")),
                        Some(f) => Some(Filter::resolve(f, maps)?),
                    };
                    if !lit.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Column(name, filter));
                }
                '}' => return Err("unmatched '}' (write '}}' for a literal brace)".into()),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Literal(lit));
        }
        if !parts.iter().any(|p| matches!(p, Part::Column(..))) {
            return Err("no placeholder: every row would purge the same key".into());
        }
        Ok(Template { parts })
    }

    /// Compile against a table: `column` gives a placeholder's index in the row, if any.
    fn compile(&self, mut column: impl FnMut(&str) -> Option<usize>) -> CompiledTemplate {
        CompiledTemplate(
            self.parts
                .iter()
                .map(|p| match p {
                    Part::Literal(l) => CompiledPart::Literal(l.clone()),
                    Part::Column(c, filter) => column(c).map_or(CompiledPart::Missing, |i| {
                        CompiledPart::Column(i, filter.clone())
                    }),
                })
                .collect(),
        )
    }

    /// Column names the template reads.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.placeholders().map(|(c, _)| c)
    }

    /// Column names the template reads, each with its filter.
    pub fn placeholders(&self) -> impl Iterator<Item = (&str, Option<&Filter>)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c, f) => Some((c.as_str(), f.as_ref())),
            Part::Literal(_) => None,
        })
    }
}

/// What a row change asks for, before per-transaction batching.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Intent {
    ResetPool(Arc<str>),
    PurgeKey {
        cache: Arc<str>,
        key: String,
    },
    FlushCache {
        cache: Arc<str>,
        reason: &'static str,
    },
}

/// The rules of one table, compiled against one column list.
#[derive(Debug)]
pub struct TableRules {
    /// `database.table`.
    pub table: Arc<str>,
    /// Column names and ENUM values of the table map the rules were compiled against.
    pub shape: TableShape,
    rules: Vec<CompiledRule>,
    /// Rules of tables reached, at any depth, through foreign keys whose actions the engine
    /// applies unlogged.
    cascades: Vec<CompiledCascade>,
    /// Columns rules reference that the table does not have (reported once per compile).
    pub missing_columns: Vec<String>,
}

/// A rule of a table reached through a [`CascadeChain`], compiled against the parent's columns:
/// key columns handed down from the parent through every level's foreign-key columns read the
/// parent's value; any other column makes the key underivable.
#[derive(Debug)]
struct CompiledCascade {
    /// The tables the chain passes through, the reached one last: when the cascade index
    /// covers every one of them, the index's walk yields these keys instead.
    tables: Vec<Arc<str>>,
    on_delete: bool,
    on_update: bool,
    /// Parent indexes of the referenced columns (an update fires if one of them changed).
    referenced: Vec<Option<usize>>,
    pools: Vec<Arc<str>>,
    cache: Option<Arc<str>>,
    keys: Vec<CompiledTemplate>,
}

#[derive(Debug)]
struct CompiledRule {
    ops: BTreeSet<Op>,
    /// Indexes of `when_changed` columns; `None` for a missing column (treated as changed).
    when_changed: Vec<Option<usize>>,
    pools: Vec<Arc<str>>,
    cache: Option<Arc<str>>,
    keys: Vec<CompiledTemplate>,
}

#[derive(Debug)]
enum CompiledPart {
    Literal(String),
    Column(usize, Option<Filter>),
    Missing,
}

#[derive(Debug)]
struct CompiledTemplate(Vec<CompiledPart>);

/// How rendering one template from one row image went.
enum Rendered {
    Key(String),
    /// A NULL placeholder value: the application cannot have a key for it.
    NoKey,
    /// The column is unknown or absent from the image: the key cannot be derived.
    Underivable,
}

impl Rendered {
    /// The intent for this rendering: purge the key, nothing for a NULL, or flush the cache
    /// (with `underivable`) when the key cannot be derived.
    fn push(self, cache: &Arc<str>, underivable: &'static str, out: &mut Vec<Intent>) {
        match self {
            Rendered::Key(key) => out.push(Intent::PurgeKey {
                cache: cache.clone(),
                key,
            }),
            Rendered::NoKey => {}
            Rendered::Underivable => out.push(Intent::FlushCache {
                cache: cache.clone(),
                reason: underivable,
            }),
        }
    }
}

impl CompiledTemplate {
    fn render(&self, row: &[Value]) -> Rendered {
        let mut key = String::new();
        for part in &self.0 {
            match part {
                CompiledPart::Literal(l) => key.push_str(l),
                CompiledPart::Missing => return Rendered::Underivable,
                CompiledPart::Column(i, filter) => match row.get(*i) {
                    None | Some(Value::Absent) => return Rendered::Underivable,
                    Some(Value::Null) => return Rendered::NoKey,
                    Some(v) => match filter {
                        None => {
                            v.render(&mut key);
                        }
                        Some(f) => {
                            if !f.apply(v, &mut key) {
                                return Rendered::Underivable;
                            }
                        }
                    },
                },
            }
        }
        Rendered::Key(key)
    }
}

impl TableRules {
    /// Does a change of `table` (`database.table`) ask for anything: a rule of its own, or a
    /// cascade chain that starts at it?
    pub fn watches(
        table: &str,
        rules: &[Rule],
        chains: &BTreeMap<String, Vec<CascadeChain>>,
    ) -> bool {
        rules.iter().any(|r| r.qualified_table() == table) || chains.contains_key(table)
    }

    /// The rules of `table` (`database.table`) out of the whole rule set, with the cascade
    /// chains that start at it and the rules each reaches, compiled against one table map.
    pub fn for_table(
        table: &str,
        rules: &[Rule],
        chains: &BTreeMap<String, Vec<CascadeChain>>,
        shape: TableShape,
    ) -> TableRules {
        let own: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.qualified_table() == table)
            .collect();
        let cascades: Vec<(CascadeChain, Vec<&Rule>)> = chains
            .get(table)
            .into_iter()
            .flatten()
            .map(|chain| {
                let reached = rules
                    .iter()
                    .filter(|r| r.qualified_table() == chain.child())
                    .collect();
                (chain.clone(), reached)
            })
            .collect();
        TableRules::compile_with_cascades(table, &own, &cascades, shape)
    }

    /// Compile `rules` (all for this table) against the table's current column names.
    pub fn compile(table: &str, rules: &[&Rule], shape: TableShape) -> TableRules {
        TableRules::compile_with_cascades(table, rules, &[], shape)
    }

    /// Like [`TableRules::compile`], plus the rules of tables reached through `chains`
    /// (cascade paths whose first parent is this table), each with the reached table's rules.
    pub fn compile_with_cascades(
        table: &str,
        rules: &[&Rule],
        chains: &[(CascadeChain, Vec<&Rule>)],
        shape: TableShape,
    ) -> TableRules {
        let columns = shape.names.clone();
        let mut missing = BTreeSet::new();
        let mut index = |name: &str| {
            let i = columns.iter().position(|c| c.eq_ignore_ascii_case(name));
            if i.is_none() {
                missing.insert(name.to_owned());
            }
            i
        };
        let compiled = rules
            .iter()
            .map(|r| CompiledRule {
                ops: r.ops.clone(),
                when_changed: r.when_changed.iter().map(|c| index(c)).collect(),
                pools: r
                    .reset_pools
                    .iter()
                    .map(|p| Arc::from(p.as_str()))
                    .collect(),
                cache: r.cache.as_deref().map(Arc::from),
                keys: r.keys.iter().map(|t| t.compile(&mut index)).collect(),
            })
            .collect();
        let position = |name: &str| columns.iter().position(|c| c.eq_ignore_ascii_case(name));
        let mut cascades = Vec::new();
        for (chain, reached_rules) in chains {
            let referenced: Vec<Option<usize>> = chain
                .edges
                .first()
                .map(|e| e.parent_columns.iter().map(|c| position(c)).collect())
                .unwrap_or_default();
            // A column of the reached table handed down from the parent through every level.
            let via_chain = |col: &str| chain.parent_column_of(col).and_then(position);
            for r in reached_rules {
                cascades.push(CompiledCascade {
                    tables: chain
                        .edges
                        .iter()
                        .map(|e| Arc::from(e.child.as_str()))
                        .collect(),
                    on_delete: chain.fires_on_delete(),
                    on_update: chain.fires_on_update(),
                    referenced: referenced.clone(),
                    pools: r
                        .reset_pools
                        .iter()
                        .map(|p| Arc::from(p.as_str()))
                        .collect(),
                    cache: r.cache.as_deref().map(Arc::from),
                    keys: r.keys.iter().map(|t| t.compile(via_chain)).collect(),
                });
            }
        }
        TableRules {
            table: Arc::from(table),
            shape,
            rules: compiled,
            cascades,
            missing_columns: missing.into_iter().collect(),
        }
    }

    /// The intents of one row change, appended to `out`.
    pub fn intents(&self, change: &RowChange, out: &mut Vec<Intent>) {
        self.intents_skipping(change, out, |_| false);
    }

    /// Like [`TableRules::intents`], without rendering keys of caches for which `flushed` says
    /// the transaction already flushes the whole cache (the keys would be dropped anyway).
    pub fn intents_skipping(
        &self,
        change: &RowChange,
        out: &mut Vec<Intent>,
        flushed: impl Fn(&str) -> bool,
    ) {
        self.intents_with(change, out, flushed, |_| false);
    }

    /// Like [`TableRules::intents_skipping`], leaving out the cascades whose every table
    /// `indexed` says the cascade index covers (its walk yields their rows' exact keys).
    pub fn intents_with(
        &self,
        change: &RowChange,
        out: &mut Vec<Intent>,
        flushed: impl Fn(&str) -> bool,
        indexed: impl Fn(&str) -> bool,
    ) {
        for rule in &self.rules {
            if !rule.ops.contains(&change.op) || !rule.fires_on(change) {
                continue;
            }
            out.extend(rule.pools.iter().map(|p| Intent::ResetPool(p.clone())));
            let Some(cache) = &rule.cache else { continue };
            if flushed(cache) {
                continue;
            }
            for template in &rule.keys {
                for image in [&change.before, &change.after].into_iter().flatten() {
                    template.render(image).push(cache, "key_underivable", out);
                }
            }
        }
        for c in &self.cascades {
            if !c.fires_on(change) || c.tables.iter().all(|t| indexed(t)) {
                continue;
            }
            out.extend(c.pools.iter().map(|p| Intent::ResetPool(p.clone())));
            let Some(cache) = &c.cache else { continue };
            // The reached rows held the parent's old values; after an ON UPDATE CASCADE they hold
            // the new ones (after SET NULL they hold NULL, and the extra key is merely redundant).
            for template in &c.keys {
                for image in [&change.before, &change.after].into_iter().flatten() {
                    template
                        .render(image)
                        .push(cache, "cascade_underivable", out);
                }
            }
        }
    }
}

impl CompiledCascade {
    fn fires_on(&self, change: &RowChange) -> bool {
        match change.op {
            Op::Insert => false,
            Op::Delete => self.on_delete,
            Op::Update => {
                self.on_update
                    && match (&change.before, &change.after) {
                        (Some(b), Some(a)) => self.referenced.iter().any(|i| match i {
                            Some(i) => b.get(*i) != a.get(*i),
                            None => true,
                        }),
                        _ => true,
                    }
            }
        }
    }
}

impl CompiledRule {
    /// `when_changed` filter: inserts and deletes always fire; updates fire when one of the
    /// listed columns differs (or cannot be compared).
    fn fires_on(&self, change: &RowChange) -> bool {
        if change.op != Op::Update || self.when_changed.is_empty() {
            return true;
        }
        let (Some(before), Some(after)) = (&change.before, &change.after) else {
            return true;
        };
        self.when_changed.iter().any(|i| match i {
            None => true,
            Some(i) => match (before.get(*i), after.get(*i)) {
                (Some(b), Some(a)) => b != a || matches!(b, Value::Absent),
                _ => true,
            },
        })
    }
}

/// What a DDL statement does to the rows of `database.table` without row events of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DdlEffect {
    /// The rows are gone (`TRUNCATE`, `DROP TABLE`/`DATABASE`, `ALTER … TRUNCATE/DROP
    /// PARTITION`): caches holding them are stale.
    Emptied,
    /// The rows moved (`RENAME`, an `ALTER` that swaps a tablespace or partition).
    Moved,
    /// Nothing, as far as the rows are concerned (`CREATE`, `ALTER … ADD COLUMN`, …).
    Kept,
}

/// A DDL statement as read from the binlog, split into words once: what it does to each
/// table is asked per table ([`Ddl::effect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ddl {
    /// The statement's default database.
    pub schema: String,
    /// The statement as the binlog carries it.
    pub query: String,
    /// Its words, lowercased, identifiers unquoted (`rt`.`Port` is `rt.port`).
    words: Vec<String>,
}

impl Ddl {
    pub fn parse(schema: &str, query: &str) -> Ddl {
        let words = query
            .to_ascii_lowercase()
            .replace('`', "")
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$' || c == '.'))
            .filter(|w| !w.is_empty())
            .map(str::to_owned)
            .collect();
        Ddl {
            schema: schema.to_owned(),
            query: query.to_owned(),
            words,
        }
    }

    /// The effect of the statement on `database.table`. Table names are matched as words of
    /// the statement, case-insensitively; a statement that names the table without its
    /// database counts only in its own default database. Over-matching is safe (a flush or an
    /// index rebuild too many), under-matching is not.
    pub fn effect(&self, database: &str, table: &str) -> DdlEffect {
        let words = &self.words;
        let (db, name) = (database.to_ascii_lowercase(), table.to_ascii_lowercase());
        let qualified = format!("{db}.{name}");
        let in_schema = self.schema.eq_ignore_ascii_case(database);
        let names_table = words
            .iter()
            .any(|w| *w == qualified || (in_schema && *w == name));
        let verb = words.first().map_or("", String::as_str);
        let has = |w: &str| words.iter().any(|x| x == w);
        match verb {
            "drop" if (has("database") || has("schema")) && has(&db) => DdlEffect::Emptied,
            "truncate" | "drop" if names_table => DdlEffect::Emptied,
            "alter" if names_table && has("partition") && (has("truncate") || has("drop")) => {
                DdlEffect::Emptied
            }
            "rename" if names_table => DdlEffect::Moved,
            "alter" if names_table && (has("tablespace") || has("partition") || has("rename")) => {
                DdlEffect::Moved
            }
            _ => DdlEffect::Kept,
        }
    }
}

/// Convenience for tests and pure callers: the intents of one change as a vector.
pub fn intents(rules: &TableRules, change: &RowChange) -> Vec<Intent> {
    let mut out = Vec::new();
    rules.intents(change, &mut out);
    out
}

/// A rule with its table resolved to `database.table` and templates parsed.
#[derive(Debug, Clone)]
pub struct Rule {
    pub database: String,
    pub table: String,
    pub ops: BTreeSet<Op>,
    pub when_changed: Vec<String>,
    pub reset_pools: Vec<String>,
    pub cache: Option<String>,
    pub keys: Vec<Template>,
}

impl Rule {
    /// `database.table`.
    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    /// Every column the rule reads: template placeholders and `when_changed`.
    pub fn columns(&self) -> BTreeSet<&str> {
        self.keys
            .iter()
            .flat_map(Template::columns)
            .chain(self.when_changed.iter().map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cascade::{FkAction, ForeignKey};
    use proptest::prelude::*;

    fn rule(toml_rule: &str) -> Rule {
        let text = format!(
            "[source]\nurl = \"mysql://u:p@h:1\"\ndatabase = \"rt\"\n[kafka]\nbrokers = \"b:1\"\n[[rules]]\n{toml_rule}"
        );
        let c: crate::config::Config = toml::from_str(&text).unwrap();
        c.rules().unwrap().remove(0)
    }

    fn cols(names: &[&str]) -> TableShape {
        TableShape::for_tests(names.iter().map(|s| s.to_string()).collect())
    }

    fn obj(id: i64, name: Option<&str>, label: &str) -> Vec<Value> {
        vec![
            Value::Int(id),
            name.map_or(Value::Null, |n| Value::Bytes(n.as_bytes().to_vec())),
            Value::Bytes(label.as_bytes().to_vec()),
        ]
    }

    fn key(cache: &str, k: &str) -> Intent {
        Intent::PurgeKey {
            cache: cache.into(),
            key: k.into(),
        }
    }

    #[test]
    fn ddl_effects_on_a_table() {
        use DdlEffect::{Emptied, Kept, Moved};
        let e = |schema, q| Ddl::parse(schema, q).effect("rt", "Port");
        assert_eq!(e("rt", "TRUNCATE TABLE Port"), Emptied);
        assert_eq!(e("other", "TRUNCATE `rt`.`Port`"), Emptied);
        assert_eq!(
            e("other", "TRUNCATE TABLE Port"),
            Kept,
            "another database's Port"
        );
        assert_eq!(e("rt", "DROP TABLE IF EXISTS PortLog, Port"), Emptied);
        assert_eq!(
            e("rt", "DROP TABLE PortLog"),
            Kept,
            "a word, not a substring"
        );
        assert_eq!(e("x", "DROP DATABASE rt"), Emptied);
        assert_eq!(e("rt", "ALTER TABLE Port TRUNCATE PARTITION p0"), Emptied);
        assert_eq!(e("rt", "ALTER TABLE Port ADD COLUMN note INT"), Kept);
        assert_eq!(e("rt", "RENAME TABLE Port TO Port_old"), Moved);
        assert_eq!(e("rt", "ALTER TABLE Port DISCARD TABLESPACE"), Moved);
        assert_eq!(e("rt", "CREATE TABLE Port2 LIKE Port"), Kept);
    }

    #[test]
    fn rename_purges_old_and_new_name_keys() {
        let r = rule(
            "table = \"Object\"\nreset_pools = [\"rtapi\"]\ncache = \"rt\"\nkeys = [\"object:{id}\", \"object_name:{name}\"]",
        );
        let t = TableRules::compile("rt.Object", &[&r], cols(&["id", "name", "label"]));
        let change = RowChange {
            op: Op::Update,
            before: Some(obj(42, Some("old"), "l")),
            after: Some(obj(42, Some("new"), "l")),
        };
        let got = intents(&t, &change);
        assert_eq!(
            got,
            vec![
                Intent::ResetPool("rtapi".into()),
                key("rt", "object:42"),
                key("rt", "object:42"),
                key("rt", "object_name:old"),
                key("rt", "object_name:new"),
            ]
        );
    }

    #[test]
    fn when_changed_filters_updates_only() {
        let r = rule("table = \"Object\"\nwhen_changed = [\"name\"]\nreset_pools = [\"p\"]");
        let t = TableRules::compile("rt.Object", &[&r], cols(&["id", "name", "label"]));
        let label_only = RowChange {
            op: Op::Update,
            before: Some(obj(1, Some("a"), "x")),
            after: Some(obj(1, Some("a"), "y")),
        };
        assert!(intents(&t, &label_only).is_empty());
        let renamed = RowChange {
            after: Some(obj(1, Some("b"), "y")),
            ..label_only.clone()
        };
        assert_eq!(intents(&t, &renamed).len(), 1);
        let insert = RowChange {
            op: Op::Insert,
            before: None,
            after: Some(obj(1, Some("a"), "x")),
        };
        assert_eq!(intents(&t, &insert).len(), 1);
    }

    #[test]
    fn ops_filter_and_null_values() {
        let r =
            rule("table = \"Object\"\nops = [\"delete\"]\ncache = \"rt\"\nkeys = [\"n:{name}\"]");
        let t = TableRules::compile("rt.Object", &[&r], cols(&["id", "name", "label"]));
        let insert = RowChange {
            op: Op::Insert,
            before: None,
            after: Some(obj(1, Some("a"), "x")),
        };
        assert!(intents(&t, &insert).is_empty());
        let delete_unnamed = RowChange {
            op: Op::Delete,
            before: Some(obj(1, None, "x")),
            after: None,
        };
        assert!(
            intents(&t, &delete_unnamed).is_empty(),
            "NULL name: no key exists to purge"
        );
    }

    #[test]
    fn a_missing_column_flushes_the_cache_and_is_reported() {
        let r = rule(
            "table = \"Object\"\nreset_pools = [\"p\"]\ncache = \"rt\"\nkeys = [\"object:{id}\", \"asset:{asset_no}\"]",
        );
        let t = TableRules::compile("rt.Object", &[&r], cols(&["id", "name", "label"]));
        assert_eq!(t.missing_columns, vec!["asset_no".to_string()]);
        let del = RowChange {
            op: Op::Delete,
            before: Some(obj(7, Some("a"), "x")),
            after: None,
        };
        assert_eq!(
            intents(&t, &del),
            vec![
                Intent::ResetPool("p".into()),
                key("rt", "object:7"),
                Intent::FlushCache {
                    cache: "rt".into(),
                    reason: "key_underivable"
                },
            ]
        );
    }

    #[test]
    fn cascades_derive_child_keys_from_the_parent_or_flush() {
        let child = rule(
            "table = \"AttributeValue\"\nreset_pools = [\"p\"]\ncache = \"rt\"\nkeys = [\"attrs:{object_id}\", \"attr:{object_id}:{attr_id}\"]",
        );
        let fk = ForeignKey {
            name: "AttributeValue-FK-object".into(),
            child: "rt.AttributeValue".into(),
            child_columns: vec!["object_id".into(), "object_tid".into()],
            parent_columns: vec!["id".into(), "objtype_id".into()],
            on_delete: FkAction::Cascade,
            on_update: FkAction::Cascade,
        };
        let chain = CascadeChain {
            edges: vec![fk],
            repeats: false,
        };
        let t = TableRules::compile_with_cascades(
            "rt.Object",
            &[],
            &[(chain, vec![&child])],
            cols(&["id", "name", "objtype_id"]),
        );
        let row =
            |id: i64, tid: i64| vec![Value::Int(id), Value::Bytes(b"n".to_vec()), Value::Int(tid)];
        let delete = RowChange {
            op: Op::Delete,
            before: Some(row(5, 4)),
            after: None,
        };
        assert_eq!(
            intents(&t, &delete),
            vec![
                Intent::ResetPool("p".into()),
                key("rt", "attrs:5"),
                Intent::FlushCache {
                    cache: "rt".into(),
                    reason: "cascade_underivable"
                },
            ]
        );
        // An update that leaves the referenced columns alone does not touch the children.
        let rename = RowChange {
            op: Op::Update,
            before: Some(row(5, 4)),
            after: Some(vec![
                Value::Int(5),
                Value::Bytes(b"m".to_vec()),
                Value::Int(4),
            ]),
        };
        assert!(intents(&t, &rename).is_empty());
        let retype = RowChange {
            op: Op::Update,
            before: Some(row(5, 4)),
            after: Some(row(5, 9)),
        };
        assert_eq!(intents(&t, &retype)[1], key("rt", "attrs:5"));
        let insert = RowChange {
            op: Op::Insert,
            before: None,
            after: Some(row(6, 4)),
        };
        assert!(intents(&t, &insert).is_empty());
    }

    #[test]
    fn cascades_two_levels_deep_derive_handed_down_keys_and_flush_the_rest() {
        // RackTables: deleting a VS deletes its VSIPs rows, which delete their VSEnabledIPs rows.
        let fks = vec![
            (
                "rt.VS".to_owned(),
                ForeignKey {
                    name: "VSIPs-vs_id".into(),
                    child: "rt.VSIPs".into(),
                    child_columns: vec!["vs_id".into()],
                    parent_columns: vec!["id".into()],
                    on_delete: FkAction::Cascade,
                    on_update: FkAction::None,
                },
            ),
            (
                "rt.VSIPs".to_owned(),
                ForeignKey {
                    name: "VSEnabledIPs-FK-vs_id-vip".into(),
                    child: "rt.VSEnabledIPs".into(),
                    child_columns: vec!["vs_id".into(), "vip".into()],
                    parent_columns: vec!["vs_id".into(), "vip".into()],
                    on_delete: FkAction::Cascade,
                    on_update: FkAction::None,
                },
            ),
        ];
        let vsips = rule("table = \"VSIPs\"\ncache = \"rt\"\nkeys = [\"ipvs:{vs_id}\"]");
        let enabled = rule(
            "table = \"VSEnabledIPs\"\nreset_pools = [\"lb\"]\ncache = \"lbc\"\nkeys = [\"ipvs:{vs_id}\", \"object:{object_id}\"]",
        );
        let chains = crate::cascade::chains(&fks, |_| true);
        let compiled: Vec<(CascadeChain, Vec<&Rule>)> = chains["rt.VS"]
            .iter()
            .map(|c| {
                let reached = if c.child() == "rt.VSIPs" {
                    &vsips
                } else {
                    &enabled
                };
                (c.clone(), vec![reached])
            })
            .collect();
        let t = TableRules::compile_with_cascades("rt.VS", &[], &compiled, cols(&["id", "name"]));
        let delete = RowChange {
            op: Op::Delete,
            before: Some(vec![Value::Int(1), Value::Bytes(b"web-vs".to_vec())]),
            after: None,
        };
        assert_eq!(
            intents(&t, &delete),
            vec![
                key("rt", "ipvs:1"),
                Intent::ResetPool("lb".into()),
                key("lbc", "ipvs:1"),
                Intent::FlushCache {
                    cache: "lbc".into(),
                    reason: "cascade_underivable"
                },
            ]
        );
        // No ON UPDATE action on the way: an update of the VS reaches nothing.
        let rename = RowChange {
            op: Op::Update,
            before: Some(vec![Value::Int(1), Value::Bytes(b"a".to_vec())]),
            after: Some(vec![Value::Int(2), Value::Bytes(b"b".to_vec())]),
        };
        assert!(intents(&t, &rename).is_empty());
    }

    #[test]
    fn keys_of_a_flushed_cache_are_not_rendered() {
        let r = rule(
            "table = \"Object\"\nreset_pools = [\"p\"]\ncache = \"rt\"\nkeys = [\"object:{id}\"]",
        );
        let t = TableRules::compile("rt.Object", &[&r], cols(&["id", "name", "label"]));
        let del = RowChange {
            op: Op::Delete,
            before: Some(obj(7, Some("a"), "x")),
            after: None,
        };
        let mut out = Vec::new();
        t.intents_skipping(&del, &mut out, |c| c == "rt");
        assert_eq!(
            out,
            vec![Intent::ResetPool("p".into())],
            "the pool still resets"
        );
    }

    #[test]
    fn template_syntax() {
        assert!(Template::parse("object:{id}").is_ok());
        assert!(Template::parse("{{literal}}:{id}").is_ok());
        assert!(Template::parse("static").is_err());
        assert!(Template::parse("x:{id").is_err());
        assert!(Template::parse("x:{}").is_err());
        assert!(Template::parse("x:{a b}").is_err());
        assert!(Template::parse("x}").is_err());
    }

    fn rule_with_maps(maps_toml: &str, toml_rule: &str) -> Rule {
        let text = format!(
            "[source]\nurl = \"mysql://u:p@h:1\"\ndatabase = \"rt\"\n[kafka]\nbrokers = \"b:1\"\n{maps_toml}\n[[rules]]\n{toml_rule}"
        );
        let c: crate::config::Config = toml::from_str(&text).unwrap();
        c.rules().unwrap().remove(0)
    }

    fn flush(cache: &str) -> Intent {
        Intent::FlushCache {
            cache: cache.into(),
            reason: "key_underivable",
        }
    }

    #[test]
    fn filters_render_addresses_and_mapped_realms() {
        let r = rule_with_maps(
            "[maps.realm]\n\"1560\" = \"rack\"\n\"1562\" = \"location\"\n\"*\" = \"object\"",
            "table = \"T\"\ncache = \"rt\"\nkeys = [\"{tid|realm}:{id}\", \"ipv4:{v4|ipv4}\", \"ipv6:{v6|ipv6}\", \"h:{v6|hex}\"]",
        );
        let t = TableRules::compile("rt.T", &[&r], cols(&["id", "tid", "v4", "v6"]));
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        v6[15] = 1;
        let row = |tid: u64| {
            vec![
                Value::UInt(7),
                Value::UInt(tid),
                Value::UInt(0x0a00_0001),
                Value::Bytes(v6.to_vec()),
            ]
        };
        let insert = |tid| RowChange {
            op: Op::Insert,
            before: None,
            after: Some(row(tid)),
        };
        assert_eq!(
            intents(&t, &insert(1560)),
            vec![
                key("rt", "rack:7"),
                key("rt", "ipv4:10.0.0.1"),
                key("rt", "ipv6:2001:db8::1"),
                key("rt", "h:20010db8000000000000000000000001"),
            ]
        );
        assert_eq!(
            intents(&t, &insert(4))[0],
            key("rt", "object:7"),
            "the * entry"
        );
    }

    #[test]
    fn a_value_a_filter_cannot_render_flushes_the_cache() {
        let r = rule_with_maps(
            "[maps.realm]\n\"1560\" = \"rack\"",
            "table = \"T\"\ncache = \"rt\"\nkeys = [\"{tid|realm}:{id}\", \"ipv6:{v6|ipv6}\", \"ipv4:{v4|ipv4}\"]",
        );
        let t = TableRules::compile("rt.T", &[&r], cols(&["id", "tid", "v6", "v4"]));
        let change = RowChange {
            op: Op::Delete,
            before: Some(vec![
                Value::UInt(7),
                Value::UInt(4),
                Value::Bytes(vec![1, 2, 3]),
                Value::Int(-1),
            ]),
            after: None,
        };
        assert_eq!(
            intents(&t, &change),
            vec![flush("rt"), flush("rt"), flush("rt")]
        );
    }

    #[test]
    fn filter_syntax_and_column_types() {
        assert!(Template::parse("a:{ip|ipv4}").is_ok());
        let unknown = Template::parse("a:{id|realm}").unwrap_err();
        assert!(unknown.contains("[maps.realm]"), "{unknown}");
        assert!(Template::parse("a:{id|}").is_err());
        assert!(Template::parse("a:{id|hex|hex}").is_err());
        assert!(Template::parse("a:{|hex}").is_err());
        assert!(Filter::Ipv6.accepts("binary").is_ok());
        assert!(
            Filter::Ipv6
                .accepts("int")
                .unwrap_err()
                .contains("BINARY(16)")
        );
        assert!(Filter::Ipv4.accepts("int").is_ok());
        assert!(Filter::Ipv4.accepts("char").is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_failure_persistence(
            prop::test_runner::FileFailurePersistence::WithSource("regressions"),
        ))]
        /// Rendering a template reproduces literal text and values in order, for any literals.
        #[test]
        fn template_renders_literals_and_values(pre in "[a-z:{}/]{0,8}", post in "[a-z:{}/]{0,8}", id in any::<i64>(), name in "[ -~]{1,12}") {
            let esc = |s: &str| s.replace('{', "{{").replace('}', "}}");
            let t = Template::parse(&format!("{}{{id}}-{{name}}{}", esc(&pre), esc(&post))).unwrap();
            let c = CompiledTemplate(t.parts.iter().map(|p| match p {
                Part::Literal(l) => CompiledPart::Literal(l.clone()),
                Part::Column(c, _) if c == "id" => CompiledPart::Column(0, None),
                Part::Column(..) => CompiledPart::Column(1, None),
            }).collect());
            let row = vec![Value::Int(id), Value::Bytes(name.clone().into_bytes())];
            match c.render(&row) {
                Rendered::Key(k) => prop_assert_eq!(k, format!("{pre}{id}-{name}{post}")),
                _ => prop_assert!(false, "must render"),
            }
        }
    }
}
