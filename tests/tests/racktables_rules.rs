//! Proves the RackTables rule set in `deploy/racktables/` against RackTables' own schema
//! (`tests/fixtures/racktables/racktables-0.22.sql`, every table, key and foreign key as the
//! RackTables installer creates them): the producer's start-up check accepts every rule (table
//! and columns exist, filters fit the column types) and refuses a rule on one of RackTables'
//! views; every table is either ruled or documented as ignored in `deploy/racktables/README.md`;
//! and writes of the kind RackTables makes yield the documented keys (realms from `objtype_id`,
//! IPv4/IPv6 addresses as text), pool resets and cascade flushes.
//! Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test racktables_rules`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;
use rtinval_tests::{
    Stack, TestDb, producer_check, read_events, server_id, start_producer, unique, workspace_root,
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
    let s = Stack::get();
    let mut c: toml::Table = std::fs::read_to_string(rule_set_path())
        .unwrap()
        .parse()
        .expect("deploy/racktables/producer.toml is TOML");
    let source = c["source"].as_table_mut().unwrap();
    source.insert("url".into(), s.mysql_url.clone().into());
    source.insert("database".into(), db.into());
    source.insert("server_id".into(), i64::from(server_id()).into());
    let kafka = c["kafka"].as_table_mut().unwrap();
    kafka.insert("brokers".into(), s.brokers.clone().into());
    kafka.insert("topic_prefix".into(), prefix.into());
    kafka.insert("partitions".into(), 1.into());
    kafka.insert("replication_factor".into(), 1.into());
    c["producer"]
        .as_table_mut()
        .unwrap()
        .insert("heartbeat_ms".into(), 200.into());
    c["http"]
        .as_table_mut()
        .unwrap()
        .insert("listen".into(), "".into());
    // The copy lives elsewhere: name the rule set by its absolute path.
    let rules = workspace_root().join("deploy/racktables/rules.toml");
    c.insert(
        "rules_files".into(),
        toml::Value::Array(vec![rules.display().to_string().into()]),
    );
    edit(&mut c);
    toml::to_string(&c).unwrap()
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
    // goes by cascade (its key derives from the Object row); the rules of other children
    // keyed by columns the Object row does not hold (addresses, ports) make the cascade
    // flush the cache, as deploy/racktables/README.md says.
    db.exec(
        "DELETE FROM IPv4Allocation WHERE object_id = 1002;\n\
         DELETE FROM IPv6Allocation WHERE object_id = 1002;\n\
         DELETE FROM Object WHERE id = 1002",
    )
    .await;
    wait_published(
        &prefix,
        "cascade flush on object delete",
        |_, flushes, _| flushes.contains("cascade_underivable"),
    )
    .await;
}
