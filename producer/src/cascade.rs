//! Foreign-key cascades (pure): which tables' rows InnoDB changes, unlogged, when a parent row
//! changes, followed transitively.
//!
//! InnoDB applies `ON DELETE` / `ON UPDATE` `CASCADE` and `SET NULL` inside the engine; the
//! binlog carries only the parent's row. So the parent's row event must stand in for every row
//! the engine changed below it — not only its direct children: a child row deleted by cascade
//! cascades in turn to its own children (RackTables: `VS` → `VSIPs` → `VSEnabledIPs`), through
//! tables without rules too. [`chains`] turns the foreign keys into, per parent table, every
//! path ([`CascadeChain`]) that ends at a table with rules; the rules stage compiles each
//! chain's rules against the parent's columns (a key column that maps back through the chain's
//! foreign-key columns to a parent column is derivable; any other makes the cascade flush the
//! cache).
//!
//! What a chain does to the rows it reaches follows the actions edge by edge: a `CASCADE` delete
//! deletes the child rows (which fires the next edge's `ON DELETE`); `SET NULL`, or an `ON
//! UPDATE` action, updates the child's foreign-key columns (which fires the next edge's `ON
//! UPDATE` only if that edge references one of those columns).
//!
//! Cycles (a self-referencing foreign key, or a loop through several tables) make the depth of a
//! cascade depend on the data. A path is followed exactly up to the first table it revisits;
//! what lies beyond — rows any number of levels further down — is marked [`CascadeChain::repeats`]
//! and its keys count as underivable (the cache is flushed), so no depth is silently dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What a foreign key's `ON DELETE` or `ON UPDATE` clause does to the child rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FkAction {
    /// `RESTRICT`, `NO ACTION` (the default) or `SET DEFAULT`: the engine changes no child row.
    None,
    /// `CASCADE`: the child rows are deleted (or their columns updated along).
    Cascade,
    /// `SET NULL`: the child rows' foreign-key columns become NULL (an update of the child).
    SetNull,
}

impl FkAction {
    /// True when the engine changes child rows without logging them.
    pub fn changes_children(self) -> bool {
        self != FkAction::None
    }
}

/// A foreign key whose `ON DELETE` / `ON UPDATE` action may change child rows inside InnoDB,
/// where the binlog never sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignKey {
    pub name: String,
    /// `database.table` of the child.
    pub child: String,
    pub child_columns: Vec<String>,
    /// Referenced columns of the parent, in the same order.
    pub parent_columns: Vec<String>,
    pub on_delete: FkAction,
    pub on_update: FkAction,
}

impl ForeignKey {
    /// True when some parent change makes the engine change child rows.
    pub fn cascades(&self) -> bool {
        self.on_delete.changes_children() || self.on_update.changes_children()
    }

    /// The parent column a child column holds the value of, if it is one of this key's columns.
    pub fn parent_column_of(&self, child_column: &str) -> Option<&str> {
        self.child_columns
            .iter()
            .position(|c| c.eq_ignore_ascii_case(child_column))
            .and_then(|i| self.parent_columns.get(i))
            .map(String::as_str)
    }
}

/// A path of cascading foreign keys from a parent table down to a table with rules
/// ([`CascadeChain::child`]). `edges[0]`'s parent is the table whose row events stand in for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CascadeChain {
    pub edges: Vec<ForeignKey>,
    /// The path went round a cycle: it stands for rows at this depth and any depth below, so no
    /// key of it is derivable from the parent row.
    pub repeats: bool,
}

/// What a parent change does to the rows at the end of a path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    Deleted,
    /// These columns of the rows changed.
    Updated(Vec<String>),
}

impl CascadeChain {
    /// `database.table` whose rules the chain reaches.
    pub fn child(&self) -> &str {
        self.edges.last().map_or("", |e| e.child.as_str())
    }

    /// Does deleting a parent row change rows at the end of the chain?
    pub fn fires_on_delete(&self) -> bool {
        self.effect(Effect::Deleted).is_some()
    }

    /// Does updating the referenced columns of a parent row (`edges[0].parent_columns`) change
    /// rows at the end of the chain?
    pub fn fires_on_update(&self) -> bool {
        let Some(first) = self.edges.first() else {
            return false;
        };
        self.effect(Effect::Updated(first.parent_columns.clone()))
            .is_some()
    }

    fn effect(&self, start: Effect) -> Option<Effect> {
        self.edges
            .iter()
            .try_fold(start, |effect, e| step(&effect, e))
    }

    /// The parent column whose value the end table's `column` holds, following the chain's
    /// foreign-key columns back up; `None` when some level does not hand it down.
    pub fn parent_column_of<'a>(&'a self, column: &'a str) -> Option<&'a str> {
        if self.repeats {
            return None;
        }
        let mut col = column;
        for e in self.edges.iter().rev() {
            col = e.parent_column_of(col)?;
        }
        Some(col)
    }
}

/// The effect on an edge's child rows of `effect` on its parent rows.
fn step(effect: &Effect, e: &ForeignKey) -> Option<Effect> {
    let action = match effect {
        Effect::Deleted => e.on_delete,
        Effect::Updated(cols) => {
            let referenced = e
                .parent_columns
                .iter()
                .any(|p| cols.iter().any(|c| c.eq_ignore_ascii_case(p)));
            if referenced {
                e.on_update
            } else {
                FkAction::None
            }
        }
    };
    match (action, effect) {
        (FkAction::None, _) => None,
        (FkAction::Cascade, Effect::Deleted) => Some(Effect::Deleted),
        _ => Some(Effect::Updated(e.child_columns.clone())),
    }
}

impl fmt::Display for CascadeChain {
    /// `→ VSIPs (VSIPs-vs_id) → VSEnabledIPs (VSEnabledIPs-FK-vs_id-vip)`: each level's table,
    /// unqualified, with the foreign key that reaches it (the parent is named by the caller).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.edges.iter().enumerate() {
            let table = e
                .child
                .rsplit_once('.')
                .map_or(e.child.as_str(), |(_, t)| t);
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}→ {table} ({})", e.name)?;
        }
        if self.repeats {
            f.write_str(" and deeper (cycle: keys underivable)")?;
        }
        Ok(())
    }
}

/// Longest path followed; a deeper one is cut and treated like a cycle (keys underivable).
const MAX_DEPTH: usize = 32;

/// Every cascade path, by parent `database.table`, that ends at a table for which `has_rules`
/// is true and that some parent change can fire. `fks` are `(parent, foreign key)` pairs; those
/// that change no child row are ignored.
pub fn chains(
    fks: &[(String, ForeignKey)],
    has_rules: impl Fn(&str) -> bool,
) -> BTreeMap<String, Vec<CascadeChain>> {
    let mut by_parent: BTreeMap<&str, Vec<&ForeignKey>> = BTreeMap::new();
    for (parent, fk) in fks.iter().filter(|(_, fk)| fk.cascades()) {
        by_parent.entry(parent.as_str()).or_default().push(fk);
    }
    let mut out = BTreeMap::new();
    for parent in by_parent.keys() {
        let mut walk = Walk {
            by_parent: &by_parent,
            has_rules: &has_rules,
            path: Vec::new(),
            found: Vec::new(),
        };
        let on_path = BTreeSet::from([parent.to_string()]);
        walk.from(parent, &on_path, None);
        if !walk.found.is_empty() {
            out.insert(parent.to_string(), walk.found);
        }
    }
    out
}

struct Walk<'a, F> {
    by_parent: &'a BTreeMap<&'a str, Vec<&'a ForeignKey>>,
    has_rules: &'a F,
    path: Vec<ForeignKey>,
    found: Vec<CascadeChain>,
}

impl<F: Fn(&str) -> bool> Walk<'_, F> {
    /// Follow every edge out of `table`. `on_path` holds the tables of the exact part of the
    /// path; `beyond_cycle`, once a cycle was passed, the tables seen since (each followed once).
    fn from(
        &mut self,
        table: &str,
        on_path: &BTreeSet<String>,
        beyond_cycle: Option<&mut BTreeSet<String>>,
    ) {
        let Some(edges) = self.by_parent.get(table) else {
            return;
        };
        let mut beyond_cycle = beyond_cycle;
        for e in edges {
            self.path.push((*e).clone());
            let chain = CascadeChain {
                edges: self.path.clone(),
                repeats: beyond_cycle.is_some(),
            };
            let fires = chain.fires_on_delete() || chain.fires_on_update();
            if fires && (self.has_rules)(&e.child) {
                self.found.push(chain);
            }
            if fires {
                let child = e.child.clone();
                match beyond_cycle.as_deref_mut() {
                    Some(seen) => {
                        if seen.insert(child.clone()) && self.path.len() < MAX_DEPTH {
                            self.from(&child, on_path, Some(seen));
                        }
                    }
                    None if on_path.contains(&child) || self.path.len() >= MAX_DEPTH => {
                        // Deeper rows exist for as long as the data says: beyond here, no key
                        // is derivable.
                        let mut seen = BTreeSet::from([child.clone()]);
                        self.from(&child, on_path, Some(&mut seen));
                    }
                    None => {
                        let mut next = on_path.clone();
                        next.insert(child.clone());
                        self.from(&child, &next, None);
                    }
                }
            }
            self.path.pop();
        }
    }
}

/// The foreign keys in a `SHOW CREATE TABLE` statement, with their parent `database.table`.
pub fn parse_foreign_keys(db: &str, table: &str, ddl: &str) -> Vec<(String, ForeignKey)> {
    fn idents(s: &str) -> Vec<String> {
        s.split(',')
            .map(|c| c.trim().trim_matches('`').replace("``", "`"))
            .filter(|c| !c.is_empty())
            .collect()
    }
    fn parens(s: &str) -> Option<(&str, &str)> {
        let open = s.find('(')?;
        let close = open + s[open..].find(')')?;
        Some((&s[open + 1..close], &s[close + 1..]))
    }
    let action = |line: &str, on: &str| {
        line.find(on).map_or(FkAction::None, |i| {
            let rest = line[i + on.len()..].trim_start();
            if rest.starts_with("CASCADE") {
                FkAction::Cascade
            } else if rest.starts_with("SET NULL") {
                FkAction::SetNull
            } else {
                FkAction::None
            }
        })
    };
    let mut out = Vec::new();
    for line in ddl.lines().map(str::trim) {
        let Some(fk_at) = line.find("FOREIGN KEY") else {
            continue;
        };
        let name = line
            .strip_prefix("CONSTRAINT ")
            .and_then(|r| r.split('`').nth(1))
            .unwrap_or("")
            .to_owned();
        let Some((child_cols, rest)) = parens(&line[fk_at..]) else {
            continue;
        };
        let Some(refs_at) = rest.find("REFERENCES ") else {
            continue;
        };
        let rest = &rest[refs_at + "REFERENCES ".len()..];
        let Some(open) = rest.find('(') else { continue };
        let target: Vec<String> = rest[..open]
            .trim()
            .split("`.`")
            .map(|p| p.trim_matches('`').to_owned())
            .collect();
        let parent = match target.as_slice() {
            [t] => format!("{db}.{t}"),
            [d, t] => format!("{d}.{t}"),
            _ => continue,
        };
        let Some((parent_cols, _)) = parens(rest) else {
            continue;
        };
        out.push((
            parent,
            ForeignKey {
                name,
                child: format!("{db}.{table}"),
                child_columns: idents(child_cols),
                parent_columns: idents(parent_cols),
                on_delete: action(line, "ON DELETE "),
                on_update: action(line, "ON UPDATE "),
            },
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fk(
        name: &str,
        child: &str,
        cols: &[(&str, &str)],
        del: FkAction,
        upd: FkAction,
    ) -> ForeignKey {
        ForeignKey {
            name: name.into(),
            child: format!("rt.{child}"),
            child_columns: cols.iter().map(|(c, _)| c.to_string()).collect(),
            parent_columns: cols.iter().map(|(_, p)| p.to_string()).collect(),
            on_delete: del,
            on_update: upd,
        }
    }

    fn names(c: &CascadeChain) -> Vec<&str> {
        c.edges.iter().map(|e| e.name.as_str()).collect()
    }

    use FkAction::{Cascade, None as Restrict, SetNull};

    /// RackTables' virtual services: VS → VSIPs → VSEnabledIPs, VS → VSPorts → VSEnabledPorts.
    fn vs_schema() -> Vec<(String, ForeignKey)> {
        vec![
            (
                "rt.VS".into(),
                fk(
                    "VSIPs-vs_id",
                    "VSIPs",
                    &[("vs_id", "id")],
                    Cascade,
                    Restrict,
                ),
            ),
            (
                "rt.VS".into(),
                fk("VS-vs_id", "VSPorts", &[("vs_id", "id")], Cascade, Restrict),
            ),
            (
                "rt.VSIPs".into(),
                fk(
                    "EIP",
                    "VSEnabledIPs",
                    &[("vs_id", "vs_id"), ("vip", "vip")],
                    Cascade,
                    Restrict,
                ),
            ),
            (
                "rt.VSPorts".into(),
                fk(
                    "EP",
                    "VSEnabledPorts",
                    &[("vs_id", "vs_id"), ("vport", "vport")],
                    Cascade,
                    Restrict,
                ),
            ),
            (
                "rt.Object".into(),
                fk(
                    "EIP-obj",
                    "VSEnabledIPs",
                    &[("object_id", "id")],
                    Cascade,
                    Restrict,
                ),
            ),
        ]
    }

    #[test]
    fn chains_reach_grandchildren_and_map_key_columns_back_to_the_parent() {
        let all = chains(&vs_schema(), |_| true);
        let vs = &all["rt.VS"];
        let paths: Vec<Vec<&str>> = vs.iter().map(names).collect();
        assert_eq!(
            paths,
            vec![
                vec!["VSIPs-vs_id"],
                vec!["VSIPs-vs_id", "EIP"],
                vec!["VS-vs_id"],
                vec!["VS-vs_id", "EP"],
            ]
        );
        let deep = &vs[1];
        assert_eq!(deep.child(), "rt.VSEnabledIPs");
        assert!(deep.fires_on_delete() && !deep.fires_on_update());
        // vs_id is handed down both levels; vip stops at VSIPs (not a VS column); object_id is
        // not a column of this chain at all.
        assert_eq!(deep.parent_column_of("vs_id"), Some("id"));
        assert_eq!(deep.parent_column_of("VS_ID"), Some("id"));
        assert_eq!(deep.parent_column_of("vip"), None);
        assert_eq!(deep.parent_column_of("object_id"), None);
        assert_eq!(all["rt.VSIPs"].len(), 1);
        assert_eq!(all["rt.Object"].len(), 1);
    }

    #[test]
    fn a_chain_through_a_table_without_rules_is_followed() {
        // Object → CachedPVM → CachedPAV → CachedPNV, with rules only on the last.
        let fks = vec![
            (
                "rt.Object".into(),
                fk(
                    "pvm",
                    "CachedPVM",
                    &[("object_id", "id")],
                    Cascade,
                    Restrict,
                ),
            ),
            (
                "rt.CachedPVM".into(),
                fk(
                    "pav",
                    "CachedPAV",
                    &[("object_id", "object_id"), ("port_name", "port_name")],
                    Cascade,
                    Restrict,
                ),
            ),
            (
                "rt.CachedPAV".into(),
                fk(
                    "pnv",
                    "CachedPNV",
                    &[
                        ("object_id", "object_id"),
                        ("port_name", "port_name"),
                        ("vlan_id", "vlan_id"),
                    ],
                    Cascade,
                    Restrict,
                ),
            ),
        ];
        let all = chains(&fks, |t| t == "rt.CachedPNV");
        let object = &all["rt.Object"];
        assert_eq!(object.len(), 1, "only the path ending at a ruled table");
        assert_eq!(names(&object[0]), vec!["pvm", "pav", "pnv"]);
        assert_eq!(object[0].parent_column_of("object_id"), Some("id"));
        assert_eq!(object[0].parent_column_of("port_name"), None);
        assert_eq!(all["rt.CachedPVM"].len(), 1);
        assert_eq!(all["rt.CachedPAV"].len(), 1);
        // Nothing ruled below: no chains at all.
        assert!(chains(&fks, |_| false).is_empty());
    }

    #[test]
    fn a_cycle_is_followed_once_exactly_and_beyond_it_keys_are_underivable() {
        // A tag tree whose children go with their parent, and a two-table loop.
        let fks = vec![
            (
                "rt.Tag".into(),
                fk("parent", "Tag", &[("parent_id", "id")], Cascade, Restrict),
            ),
            (
                "rt.A".into(),
                fk("ab", "B", &[("a_id", "id")], Cascade, Cascade),
            ),
            (
                "rt.B".into(),
                fk("ba", "A", &[("b_id", "id")], Cascade, Cascade),
            ),
        ];
        let all = chains(&fks, |_| true);
        let tag = &all["rt.Tag"];
        assert_eq!(tag.len(), 2);
        // Direct children: parent_id is the deleted row's id.
        assert!(!tag[0].repeats);
        assert_eq!(tag[0].parent_column_of("parent_id"), Some("id"));
        // Grandchildren and below: as deep as the data goes, nothing derivable.
        assert!(tag[1].repeats);
        assert_eq!(names(&tag[1]), vec!["parent", "parent"]);
        assert_eq!(tag[1].parent_column_of("parent_id"), None);
        assert!(tag[1].fires_on_delete());

        let a = &all["rt.A"];
        let paths: Vec<(Vec<&str>, bool)> = a.iter().map(|c| (names(c), c.repeats)).collect();
        assert_eq!(
            paths,
            vec![
                (vec!["ab"], false),
                (vec!["ab", "ba"], false),
                (vec!["ab", "ba", "ab"], true),
                (vec!["ab", "ba", "ab", "ba"], true),
            ],
            "the loop is entered once more beyond the cycle, then cut"
        );
    }

    #[test]
    fn set_null_and_update_actions_fire_the_next_level_only_through_referenced_columns() {
        // VLANDomain's group_id points at its own table ON DELETE SET NULL; VLANDescription
        // cascades on delete only. Deleting a group updates its member domains (group_id), which
        // no ON UPDATE action follows: the members' descriptions are untouched.
        let fks = vec![
            (
                "rt.VLANDomain".into(),
                fk(
                    "group",
                    "VLANDomain",
                    &[("group_id", "id")],
                    SetNull,
                    Restrict,
                ),
            ),
            (
                "rt.VLANDomain".into(),
                fk(
                    "desc",
                    "VLANDescription",
                    &[("domain_id", "id")],
                    Cascade,
                    Restrict,
                ),
            ),
        ];
        let all = chains(&fks, |_| true);
        let paths: Vec<Vec<&str>> = all["rt.VLANDomain"].iter().map(names).collect();
        assert_eq!(paths, vec![vec!["group"], vec!["desc"]]);

        // An ON UPDATE CASCADE below a SET NULL fires only if it references the nulled column.
        let fks = vec![
            (
                "rt.P".into(),
                fk("pc", "C", &[("p_id", "id")], SetNull, Restrict),
            ),
            (
                "rt.C".into(),
                fk("cg", "G", &[("p_ref", "p_id")], Restrict, Cascade),
            ),
            (
                "rt.C".into(),
                fk("cx", "X", &[("c_id", "id")], Restrict, Cascade),
            ),
        ];
        let all = chains(&fks, |_| true);
        let p = &all["rt.P"];
        let paths: Vec<Vec<&str>> = p.iter().map(names).collect();
        assert_eq!(paths, vec![vec!["pc"], vec!["pc", "cg"]]);
        assert!(p[1].fires_on_delete() && !p[1].fires_on_update());
        assert_eq!(p[1].parent_column_of("p_ref"), Some("id"));
    }

    #[test]
    fn foreign_keys_from_show_create_table() {
        let ddl = "CREATE TABLE `AttributeValue` (\n  `object_id` int(10) unsigned NOT NULL,\n  \
            KEY `id-tid` (`object_id`,`object_tid`),\n  \
            CONSTRAINT `AttributeValue-FK-object` FOREIGN KEY (`object_id`, `object_tid`) REFERENCES `Object` (`id`, `objtype_id`) ON DELETE CASCADE ON UPDATE CASCADE,\n  \
            CONSTRAINT `AttributeValue-FK-map` FOREIGN KEY (`attr_id`) REFERENCES `AttributeMap` (`attr_id`),\n  \
            CONSTRAINT `x` FOREIGN KEY (`owner`) REFERENCES `other`.`Owner` (`id`) ON DELETE SET NULL\n) ENGINE=InnoDB";
        let fks = parse_foreign_keys("rt", "AttributeValue", ddl);
        assert_eq!(fks.len(), 3);
        assert_eq!(fks[0].0, "rt.Object");
        assert_eq!(fks[0].1.child_columns, vec!["object_id", "object_tid"]);
        assert_eq!(fks[0].1.parent_columns, vec!["id", "objtype_id"]);
        assert_eq!((fks[0].1.on_delete, fks[0].1.on_update), (Cascade, Cascade));
        assert_eq!(fks[0].1.name, "AttributeValue-FK-object");
        assert!(!fks[1].1.cascades(), "RESTRICT by default");
        assert_eq!(fks[2].0, "other.Owner");
        assert_eq!(
            (fks[2].1.on_delete, fks[2].1.on_update),
            (SetNull, Restrict)
        );
    }
}
