//! Proves the RackTables rule set in `deploy/racktables/` against RackTables' own schema
//! (`tests/fixtures/racktables/racktables-0.22.sql`, every table, key and foreign key as the
//! RackTables installer creates them): the producer's start-up check accepts every rule (table
//! and columns exist, filters fit the column types) and refuses a rule on one of RackTables'
//! views; every table is either ruled or documented as ignored in `deploy/racktables/README.md`;
//! and writes of the kind RackTables makes yield the documented keys (realms from `objtype_id`,
//! IPv4/IPv6 addresses as text), pool resets and cascade flushes; and that a parent's delete
//! carries, in its own transaction, the keys (or a flush) of every rule its cascades reach at
//! any depth, through tables without rules too.
//! Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test racktables_rules`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;
use rtinval_tests::published::published_by;
use rtinval_tests::{
    TestDb, producer_check, racktables_producer_config, read_events, start_producer, unique,
    workspace_root,
};

const SCHEMA: &str = include_str!("../fixtures/racktables/racktables-0.22.sql");

/// The RackTables producer config (its rules come from `rules.toml` beside it).
fn rule_set_path() -> PathBuf {
    workspace_root().join("deploy/racktables/producer.toml")
}

/// Tables and views the RackTables schema file creates.
fn schema_tables() -> (BTreeSet<String>, BTreeSet<String>) {
    let name_after = |marker: &str| -> BTreeSet<String> {
        SCHEMA
            .match_indices(marker)
            .map(|(i, _)| {
                SCHEMA[i + marker.len()..]
                    .chars()
                    .take_while(|c| *c != '`')
                    .collect()
            })
            .collect()
    };
    (name_after("CREATE TABLE `"), name_after("CREATE VIEW `"))
}

/// The deploy rule set, pointed at a test database, broker and topic prefix.
fn config_for(db: &str, prefix: &str, edit: impl FnOnce(&mut toml::Table)) -> String {
    racktables_producer_config(db, prefix, edit)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_matches_the_racktables_schema_and_views_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("rtschema", SCHEMA).await;
    let (tables, views) = schema_tables();
    assert_eq!(tables.len(), 70, "RackTables 0.22 creates 70 tables");
    assert_eq!(views.len(), 4);

    let config = rtinval_producer::config::Config::load(&rule_set_path()).unwrap();
    let rules = config.rules().unwrap();
    assert!(rules.len() >= 50, "{} rules", rules.len());
    for r in &rules {
        assert!(
            tables.contains(&r.table),
            "rule on {} which RackTables does not create",
            r.table
        );
    }

    let (code, out) = producer_check(
        dir.path(),
        &config_for(&db.name, &unique("rtschema"), |_| {}),
    );
    assert_eq!(
        code,
        Some(0),
        "--check refused the RackTables rule set:\n{out}"
    );

    // The check is not vacuous: a column RackTables does not have, a filter that does not fit
    // the column, and a rule on a view are each refused with the reason.
    let with_rule = |rule: &str| {
        let rule: toml::Table = rule.parse().unwrap();
        config_for(&db.name, &unique("rtschema"), |c| {
            c.insert(
                "rules".into(),
                toml::Value::Array(vec![toml::Value::Table(rule)]),
            );
        })
    };
    for (rule, expected) in [
        (
            "table = \"Port\"\ncache = \"rt\"\nkeys = [\"port:{port_id}\"]",
            "column \"port_id\" does not exist",
        ),
        (
            "table = \"IPv4Allocation\"\ncache = \"rt\"\nkeys = [\"ipv6:{ip|ipv6}\"]",
            "BINARY(16)",
        ),
        (
            "table = \"Rack\"\ncache = \"rt\"\nkeys = [\"rack:{id}\"]",
            "is a VIEW",
        ),
    ] {
        let (code, text) = producer_check(dir.path(), &with_rule(rule));
        assert_ne!(code, Some(0), "accepted {rule}");
        assert!(text.contains(expected), "{rule}: {text}");
    }
}

/// Rows of the table-by-table list in deploy/racktables/README.md: (table, action).
fn documented_tables() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(workspace_root().join("deploy/racktables/README.md"))
        .expect("deploy/racktables/README.md");
    let section = text
        .split("## Table by table")
        .nth(1)
        .expect("a 'Table by table' section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<String> = l
                .replace("\\|", "/")
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_owned())
                .collect();
            (cells[1].clone(), cells[2].clone())
        })
        .collect()
}

#[test]
fn every_racktables_table_is_ruled_or_documented_as_ignored() {
    let (tables, _) = schema_tables();
    let documented = documented_tables();
    let names: BTreeSet<String> = documented.iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(names.len(), documented.len(), "a table is listed twice");
    assert_eq!(
        names, tables,
        "deploy/racktables/README.md must list every RackTables table"
    );
    let config = rtinval_producer::config::Config::load(&rule_set_path()).unwrap();
    let rules = config.rules().unwrap();
    for (table, action) in documented {
        let ruled: Vec<_> = rules.iter().filter(|r| r.table == table).collect();
        let resets = ruled.iter().any(|r| !r.reset_pools.is_empty());
        let keys = ruled.iter().any(|r| r.cache.is_some());
        let expected = match (keys, resets) {
            (false, false) => "ignored",
            (true, false) => "keys",
            (false, true) => "reset",
            (true, true) => "keys, reset",
        };
        assert_eq!(
            action, expected,
            "{table}: the README says {action:?}, the rules do {expected:?}"
        );
    }
}

/// Keys, flush reasons and reset pools published so far under `prefix`.
async fn published(prefix: &str) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let (mut keys, mut flushes, mut pools) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for topic in ["cache-keys", "pool-reset"] {
        for e in read_events(&format!("{prefix}.{topic}")).await {
            match e.body {
                EventBody::CacheKeys { keys: k, .. } => keys.extend(k),
                EventBody::CacheFlush { reason, .. } => {
                    flushes.insert(reason);
                }
                EventBody::PoolReset { pools: p } => pools.extend(p),
                _ => {}
            }
        }
    }
    (keys, flushes, pools)
}

async fn wait_published(
    prefix: &str,
    what: &str,
    done: impl Fn(&BTreeSet<String>, &BTreeSet<String>, &BTreeSet<String>) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (keys, flushes, pools) = published(prefix).await;
        if done(&keys, &flushes, &pools) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: keys {keys:?}, flushes {flushes:?}, pools {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racktables_writes_yield_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("rtwrites", SCHEMA).await;
    db.exec(
        "INSERT INTO Chapter (id, name) VALUES (1, 'ObjectType');\n\
         INSERT INTO Attribute (id, type, name) VALUES (3, 'string', 'FQDN'), (27, 'uint', 'Height, units');\n\
         INSERT INTO AttributeMap (objtype_id, attr_id) VALUES (4, 3), (1560, 27)",
    )
    .await;
    let prefix = unique("rtwrites");
    let _p = start_producer(
        dir.path(),
        "producer",
        &config_for(&db.name, &prefix, |_| {}),
    );

    // A rack and a server, as RackTables creates them, with attributes.
    db.exec(
        "INSERT INTO Object (id, name, objtype_id) VALUES (1001, 'R-01', 1560), (1002, 'srv-01', 4);\n\
         INSERT INTO AttributeValue (object_id, object_tid, attr_id, uint_value) VALUES (1001, 1560, 27, 42);\n\
         INSERT INTO AttributeValue (object_id, object_tid, attr_id, string_value) VALUES (1002, 4, 3, 'srv-01.example')",
    )
    .await;
    // Renaming the rack: its realm key, old and new name, and the pools (object lists).
    db.exec("UPDATE Object SET name = 'R-01a' WHERE id = 1001")
        .await;
    // Addresses: IPv4 as dotted quad, IPv6 as RFC 5952 text (one with trailing zero bytes,
    // which MariaDB strips from BINARY(16) in the binlog).
    db.exec(
        "INSERT INTO IPv4Allocation (object_id, ip, name) VALUES (1002, INET_ATON('10.1.2.3'), 'eth0');\n\
         INSERT INTO IPv6Allocation (object_id, ip, name) VALUES (1002, INET6_ATON('2001:db8::1'), 'eth0');\n\
         INSERT INTO IPv6Address (ip, name) VALUES (INET6_ATON('2001:db8:1::'), 'gw')",
    )
    .await;
    // A tag on a location (the realm is TagStorage's ENUM, by name), and the tag tree
    // (reference data). rack:1001 comes only through [maps.realm].
    db.exec(
        "INSERT INTO TagTree (id, tag) VALUES (1, 'prod');\n\
         INSERT INTO TagStorage (entity_realm, entity_id, tag_id) VALUES ('location', 7, 1)",
    )
    .await;
    let want: BTreeSet<String> = [
        "rack:1001",
        "location:7",
        "object:1002",
        "object_name:R-01",
        "object_name:R-01a",
        "object_name:srv-01",
        "ipv4:10.1.2.3",
        "ipv6:2001:db8::1",
        "ipv6:2001:db8:1::",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    wait_published(&prefix, "documented keys and resets", |keys, _, pools| {
        want.is_subset(keys) && pools.contains("rtapi") && pools.contains("invapi")
    })
    .await;
    let (keys, flushes, _) = published(&prefix).await;
    assert!(
        flushes.is_empty(),
        "no write so far needs a flush: {flushes:?}"
    );
    assert!(
        !keys.iter().any(|k| k.starts_with("object:1001")),
        "the rack is keyed by its realm: {keys:?}"
    );

    // Deleting the server as RackTables does: children first, then the row. AttributeValue
    // goes by cascade (its key derives from the Object row); the children keyed by columns the
    // Object row does not hold (addresses, ports) come from the cascade index, so nothing is
    // flushed (deploy/racktables/README.md, "Foreign-key cascades").
    let tx = published_by(
        &db,
        &prefix,
        "DELETE FROM IPv4Allocation WHERE object_id = 1002;\n\
         DELETE FROM IPv6Allocation WHERE object_id = 1002;\n\
         DELETE FROM Object WHERE id = 1002",
    )
    .await;
    assert!(tx.has_key("rt", "object:1002"), "{tx:?}");
    assert!(tx.has_key("rt", "object_name:srv-01"), "{tx:?}");
    assert!(tx.flushed.is_empty(), "{tx:?}");
}

// ---------------------------------------------------------------------------------------------
// Cascades more than one level deep. InnoDB deletes the rows a parent's delete reaches, at every
// level, without logging them: the parent's transaction must carry the keys of every rule
// reached, or a flush of that rule's cache. Extra rules in caches of their own (beside the
// shipped set, which keeps everything in `rt`) tell a derived key from a flush.
// ---------------------------------------------------------------------------------------------

/// A RackTables database and a producer on the shipped rule set plus `extra_rules` (TOML of
/// `[[rules]]` tables), running.
async fn cascade_setup(
    base: &str,
    extra_rules: &str,
) -> (TestDb, String, rtinval_tests::Proc, tempfile::TempDir) {
    cascade_setup_indexed(base, extra_rules, true).await
}

/// [`cascade_setup`] with the cascade index on or off (`producer.cascade_index`).
async fn cascade_setup_indexed(
    base: &str,
    extra_rules: &str,
    index: bool,
) -> (TestDb, String, rtinval_tests::Proc, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(base, SCHEMA).await;
    let prefix = unique(base);
    let extra: toml::Table = extra_rules.parse().expect("extra rules are TOML");
    let config = config_for(&db.name, &prefix, |c| {
        c.insert("rules".into(), extra["rules"].clone());
        c["producer"]
            .as_table_mut()
            .unwrap()
            .insert("cascade_index".into(), index.into());
    });
    let mut p = start_producer(dir.path(), "producer", &config);
    p.wait_log("Streaming binlog", Duration::from_secs(30));
    (db, prefix, p, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_virtual_service_reaches_its_enabled_servers_two_levels_down() {
    let (db, prefix, producer, _dir) = cascade_setup(
        "rtcascvs",
        r#"
        [[rules]]
        table = "VSEnabledIPs"
        cache = "lb"
        keys = ["ipvs:{vs_id}"]

        [[rules]]
        table = "VSEnabledPorts"
        cache = "lbports"
        keys = ["ipvs:{vs_id}", "rspool:{rspool_id}"]
        "#,
    )
    .await;
    // The issue's scenario: a VS with one VIP and port, two servers enabled in it.
    db.exec(
        "INSERT INTO Object (id, name, objtype_id) VALUES (5, 'srv-05', 4), (6, 'srv-06', 4);\n\
         INSERT INTO VS SET id = 1, name = 'web-vs';\n\
         INSERT INTO VSIPs SET vs_id = 1, vip = INET6_ATON('192.0.2.8');\n\
         INSERT INTO VSPorts SET vs_id = 1, proto = 'TCP', vport = 443;\n\
         INSERT INTO IPv4RSPool SET id = 1, name = 'web-pool';\n\
         INSERT INTO VSEnabledIPs (object_id, vs_id, vip, rspool_id) VALUES (5, 1, INET6_ATON('192.0.2.8'), 1), (6, 1, INET6_ATON('192.0.2.8'), 1);\n\
         INSERT INTO VSEnabledPorts (object_id, vs_id, proto, vport, rspool_id) VALUES (5, 1, 'TCP', 443, 1), (6, 1, 'TCP', 443, 1)",
    )
    .await;
    let tx = published_by(&db, &prefix, "DELETE FROM VS WHERE id = 1").await;
    // The VS itself and its first level (VSIPs, VSPorts: ipvs:{vs_id}).
    assert!(tx.has_key("rt", "ipvs:1"), "{tx:?}");
    // Second level, shipped rules: object:5, object:6, ipv4rspool:1 cannot be derived from
    // the VS row; the cascade index holds the enabled rows, so the keys are exact.
    for k in ["object:5", "object:6", "ipv4rspool:1"] {
        assert!(tx.has_key("rt", k), "{k} not purged: {tx:?}");
    }
    // VS → VSIPs → VSEnabledIPs: vs_id is handed down both levels, so the key is exact.
    assert!(tx.has_key("lb", "ipvs:1"), "{tx:?}");
    // VS → VSPorts → VSEnabledPorts: rspool_id is not handed down; the index has it.
    assert!(tx.has_key("lbports", "rspool:1"), "{tx:?}");
    assert!(tx.flushed.is_empty(), "no cache is flushed: {tx:?}");
    // The start-up log names what a VS delete reaches.
    let log = strip_ansi(&producer.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("Cascades:") && l.contains(&format!("table={}.VS chains=", db.name)))
        .unwrap_or_else(|| panic!("no cascade line for VS in the log:\n{log}"));
    assert!(
        line.contains("→ VSIPs (VSIPs-vs_id) → VSEnabledIPs (VSEnabledIPs-FK-vs_id-vip)")
            && line.contains("→ VSPorts (VS-vs_id) → VSEnabledPorts"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_vlan_domain_reaches_the_networks_of_its_vlans() {
    let (db, prefix, _producer, _dir) = cascade_setup(
        "rtcascvlan",
        r#"
        [[rules]]
        table = "VLANIPv4"
        cache = "vlanmap"
        keys = ["vlandomain:{domain_id}"]

        [[rules]]
        table = "VLANIPv4"
        cache = "nets"
        keys = ["ipv4net:{ipv4net_id}"]
        "#,
    )
    .await;
    db.exec(
        "INSERT INTO VLANValidID (vlan_id) VALUES (10);\n\
         INSERT INTO VLANDomain (id, description) VALUES (3, 'dc1');\n\
         INSERT INTO VLANDescription (domain_id, vlan_id, vlan_descr) VALUES (3, 10, 'servers');\n\
         INSERT INTO IPv4Network (id, ip, mask, name) VALUES (7, INET_ATON('10.0.0.0'), 24, 'srv');\n\
         INSERT INTO VLANIPv4 (domain_id, vlan_id, ipv4net_id) VALUES (3, 10, 7)",
    )
    .await;
    let tx = published_by(&db, &prefix, "DELETE FROM VLANDomain WHERE id = 3").await;
    // The domain, and VLANDescription (vlan:{domain_id}:{vlan_id}: vlan_id is not the domain's,
    // the cascade index holds it).
    assert!(tx.has_key("rt", "vlandomain:3"), "{tx:?}");
    assert!(tx.has_key("rt", "vlan:3:10"), "{tx:?}");
    assert!(
        tx.pools.contains("rtapi") && tx.pools.contains("invapi"),
        "{tx:?}"
    );
    // VLANDomain → VLANDescription → VLANIPv4: domain_id handed down both levels.
    assert!(tx.has_key("vlanmap", "vlandomain:3"), "{tx:?}");
    assert!(!tx.flushed("vlanmap"), "{tx:?}");
    // ipv4net_id is not handed down; the index has it.
    assert!(tx.has_key("nets", "ipv4net:7"), "{tx:?}");
    assert!(tx.flushed.is_empty(), "no cache is flushed: {tx:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_object_reaches_the_links_of_its_ports_and_tables_without_rules() {
    deleting_an_object(true).await;
}

/// Without the cascade index (`producer.cascade_index = false`), keys the parent row cannot
/// derive flush their cache: the fallback, still exact where the chain hands the key down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_cascade_index_underivable_cascades_flush() {
    deleting_an_object(false).await;
}

async fn deleting_an_object(index: bool) {
    let (db, prefix, _producer, _dir) = cascade_setup_indexed(
        if index { "rtcascobj" } else { "rtcascnoix" },
        r#"
        [[rules]]
        table = "Link"
        cache = "links"
        keys = ["port:{porta}", "port:{portb}"]

        # Reached through two tables without rules: Object → CachedPVM → CachedPAV → CachedPNV.
        [[rules]]
        table = "CachedPNV"
        cache = "pnv"
        keys = ["object:{object_id}"]
        "#,
        index,
    )
    .await;
    // Two servers, one port each, linked; a cached VLAN config of the first's port. Port's
    // interface types are reference data the test does not need: checks off for the set-up only.
    db.exec(
        "SET foreign_key_checks = 0;\n\
         INSERT INTO Object (id, name, objtype_id) VALUES (21, 'srv-21', 4), (22, 'srv-22', 4);\n\
         INSERT INTO Port (id, object_id, name, iif_id, type) VALUES (210, 21, 'eth0', 1, 24), (220, 22, 'eth0', 1, 24);\n\
         INSERT INTO Link (porta, portb) VALUES (210, 220);\n\
         INSERT INTO VLANValidID (vlan_id) VALUES (10);\n\
         INSERT INTO CachedPVM (object_id, port_name, vlan_mode) VALUES (21, 'eth0', 'trunk');\n\
         INSERT INTO CachedPAV (object_id, port_name, vlan_id) VALUES (21, 'eth0', 10);\n\
         INSERT INTO CachedPNV (object_id, port_name, vlan_id) VALUES (21, 'eth0', 10);\n\
         SET foreign_key_checks = 1",
    )
    .await;
    let remaining = |sql: &'static str| {
        let pool = db.pool.clone();
        async move {
            use mysql_async::prelude::Queryable;
            let mut c = pool.get_conn().await.unwrap();
            c.query_first::<u64, _>(sql).await.unwrap().unwrap()
        }
    };
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 21").await;
    // InnoDB did cascade all three levels (so the keys below are owed).
    assert_eq!(remaining("SELECT COUNT(*) FROM Link").await, 0);
    assert_eq!(remaining("SELECT COUNT(*) FROM CachedPNV").await, 0);
    // Without the index `rt` is flushed in the same transaction, which covers its keys.
    assert!(tx.covers("rt", "object:21"), "{tx:?}");
    if index {
        assert!(tx.has_key("rt", "object:21"), "{tx:?}");
        // Object → Port: port:{id} is not the object's; the index holds it. Object → Port →
        // Link: both ends' port ids, the far end's too.
        assert!(tx.has_key("rt", "port:210"), "{tx:?}");
        assert!(tx.has_key("links", "port:210"), "{tx:?}");
        assert!(tx.has_key("links", "port:220"), "{tx:?}");
        assert!(tx.flushed.is_empty(), "no cache is flushed: {tx:?}");
    } else {
        assert!(tx.covers("rt", "port:210"), "{tx:?}");
        // Object → Port → Link: both ends' port ids are underivable from the object row.
        assert!(tx.flushed("links"), "{tx:?}");
        assert!(
            tx.flushed
                .contains(&("rt".into(), "cascade_underivable".into())),
            "{tx:?}"
        );
    }
    // Object → CachedPVM → CachedPAV → CachedPNV: object_id handed down three levels.
    assert!(tx.has_key("pnv", "object:21"), "{tx:?}");
    assert!(!tx.flushed("pnv"), "{tx:?}");
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
