//! The cascade index on RackTables' schema with the shipped rule set: a parent's delete carries,
//! in its own transaction, the exact keys of every row InnoDB cascaded to — ports, the far end
//! of their links, addresses, rack space — and no `cache_flush`; and it stays exact across what
//! production does to it: rows written while the snapshot is read, a producer restart with
//! changes made while it was down, a failover to a standby, an `ALTER`/`TRUNCATE` of a child
//! table. Over `producer.cascade_index_max_rows` the fallback flush returns, with a metric and
//! one log line.
//! Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test cascade_index`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rtinval_tests::published::{Published, published_by};
use rtinval_tests::{
    Proc, TestDb, bin, free_port, http_get, racktables_producer_config, start_producer, unique,
    wait_sync,
};

const SCHEMA: &str = include_str!("../fixtures/racktables/racktables-0.22.sql");

/// The shipped RackTables config for a test database, with `[producer]` settings changed.
fn config(db: &TestDb, prefix: &str, producer: &[(&str, toml::Value)], listen: &str) -> String {
    racktables_producer_config(&db.name, prefix, |c| {
        let p = c["producer"].as_table_mut().unwrap();
        p.insert("checkpoint_ms".into(), 100.into());
        for (k, v) in producer {
            p.insert((*k).into(), v.clone());
        }
        c["http"]
            .as_table_mut()
            .unwrap()
            .insert("listen".into(), listen.into());
    })
}

/// A RackTables database whose `Object` ids the tests pick below 1,000,000 (the sentinel rows
/// of [`published_by`] take auto-increment ids above).
async fn database(base: &str) -> TestDb {
    let db = TestDb::create(base, SCHEMA).await;
    db.exec("ALTER TABLE Object AUTO_INCREMENT = 1000000").await;
    db
}

/// Write (a harmless update) until the producer says its index is complete for the `n`th time:
/// after a (re)build, deletes replayed from before the snapshot keep the fallback flush.
async fn until_complete(db: &TestDb, p: &Proc, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.log_text().matches("Cascade index complete").count() < n {
        assert!(
            Instant::now() < deadline,
            "index not complete:\n{}",
            p.log_text()
        );
        db.exec("UPDATE Object SET label = 'tick' WHERE id = 1")
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn streaming(p: &mut Proc) {
    p.wait_log("Streaming binlog", Duration::from_secs(60));
}

/// A server with `ports` ports (ids `id*100 + n`), as RackTables creates them (Port's interface
/// types are reference data these tests do not need: checks off for the set-up only).
fn server_sql(id: u32, ports: u32) -> String {
    let mut sql = format!(
        "SET foreign_key_checks = 0;\nINSERT INTO Object (id, name, objtype_id) VALUES ({id}, 'srv-{id}', 4);\n"
    );
    for n in 1..=ports {
        sql += &format!(
            "INSERT INTO Port (id, object_id, name, iif_id, type) VALUES ({}, {id}, 'eth{n}', 1, 24);\n",
            id * 100 + n
        );
    }
    sql + "SET foreign_key_checks = 1"
}

fn link_sql(a: u32, b: u32) -> String {
    format!("INSERT INTO Link (porta, portb) VALUES ({a}, {b})")
}

fn set(keys: &[String]) -> BTreeSet<(String, String)> {
    keys.iter().map(|k| ("rt".to_owned(), k.clone())).collect()
}

/// `tx` purged every one of `want` in cache `rt`, and flushed nothing.
fn exact(tx: &Published, want: &[String], what: &str) {
    let missing: Vec<(String, String)> = set(want).difference(&tx.keys).cloned().collect();
    assert!(
        missing.is_empty(),
        "{what}: keys missing {missing:?}; published {tx:?}"
    );
    assert!(tx.flushed.is_empty(), "{what}: flushed a cache: {tx:?}");
}

fn keys(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// The ports of server `id` (created by [`server_sql`]) as keys.
fn port_keys(id: u32, ports: u32) -> Vec<String> {
    (1..=ports)
        .map(|n| format!("port:{}", id * 100 + n))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racktables_deletes_publish_every_cascaded_key_and_no_flush() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("cixrt").await;
    let prefix = unique("cixrt");
    let mut p = start_producer(dir.path(), "producer", &config(&db, &prefix, &[], ""));
    streaming(&mut p);

    // A rack, three servers with ports; server 11 mounted in the rack, linked to 12 and 13,
    // with an attribute, a tag and IPv4/IPv6 addresses; server 13 mounted too.
    db.exec(
        "INSERT INTO Chapter (id, name) VALUES (1, 'ObjectType');\n\
         INSERT INTO Attribute (id, type, name) VALUES (3, 'string', 'FQDN');\n\
         INSERT INTO AttributeMap (objtype_id, attr_id) VALUES (4, 3);\n\
         INSERT INTO TagTree (id, tag) VALUES (1, 'prod');\n\
         INSERT INTO Object (id, name, objtype_id) VALUES (10, 'R-10', 1560)",
    )
    .await;
    for (id, ports) in [(11, 3), (12, 1), (13, 2)] {
        db.exec(&server_sql(id, ports)).await;
    }
    db.exec(&format!(
        "{};\n{};\n\
         INSERT INTO AttributeValue (object_id, object_tid, attr_id, string_value) VALUES (11, 4, 3, 'srv-11.example');\n\
         INSERT INTO TagStorage (entity_realm, entity_id, tag_id) VALUES ('object', 11, 1);\n\
         INSERT INTO IPv4Allocation (object_id, ip, name) VALUES (11, INET_ATON('10.1.1.11'), 'eth1');\n\
         INSERT INTO IPv6Allocation (object_id, ip, name) VALUES (11, INET6_ATON('2001:db8::11'), 'eth1');\n\
         INSERT INTO RackSpace (rack_id, unit_no, atom, state, object_id) VALUES \
           (10, 1, 'front', 'T', 11), (10, 1, 'rear', 'T', 11), (10, 5, 'front', 'T', 13);\n\
         INSERT INTO EntityLink (parent_entity_type, parent_entity_id, child_entity_type, child_entity_id) \
           VALUES ('rack', 10, 'object', 11), ('rack', 10, 'object', 13)",
        link_sql(1101, 1201),
        link_sql(1102, 1301)
    ))
    .await;

    // Decommissioning server 11 as RackTables does (tags, entity links by hand; the rest by
    // cascade): every cascaded row's key in the one transaction, nothing flushed.
    let tx = published_by(
        &db,
        &prefix,
        "BEGIN;\n\
         DELETE FROM TagStorage WHERE entity_realm = 'object' AND entity_id = 11;\n\
         DELETE FROM EntityLink WHERE child_entity_type = 'object' AND child_entity_id = 11;\n\
         DELETE FROM Object WHERE id = 11;\n\
         COMMIT",
    )
    .await;
    let mut want = keys(&[
        "object:11",
        "object_name:srv-11",
        "rack:10",
        "ipv4:10.1.1.11",
        "ipv6:2001:db8::11",
        // The far ends of the two links.
        "port:1201",
        "port:1301",
    ]);
    want.extend(port_keys(11, 3));
    exact(
        &tx,
        &want,
        "object with linked ports, addresses and rack space",
    );

    // A port deleted on its own: its link's far end.
    db.exec(&link_sql(1302, 1201)).await;
    let tx = published_by(&db, &prefix, "DELETE FROM Port WHERE id = 1201").await;
    exact(
        &tx,
        &keys(&["port:1201", "object:12", "port:1302"]),
        "port with a link",
    );

    // The rack with an object still mounted: RackTables unmounts, then deletes the rack.
    let tx = published_by(
        &db,
        &prefix,
        "BEGIN;\n\
         DELETE FROM EntityLink WHERE parent_entity_type = 'rack' AND parent_entity_id = 10;\n\
         DELETE FROM RackSpace WHERE rack_id = 10;\n\
         DELETE FROM Object WHERE id = 10;\n\
         COMMIT",
    )
    .await;
    exact(
        &tx,
        &keys(&["rack:10", "object:13", "object_name:R-10"]),
        "rack with a mounted object",
    );

    // And a mounted server deleted while mounted: its rack's view by cascade.
    db.exec(
        "INSERT INTO Object (id, name, objtype_id) VALUES (20, 'R-20', 1560);\n\
         INSERT INTO RackSpace (rack_id, unit_no, atom, state, object_id) VALUES (20, 7, 'front', 'T', 13)",
    )
    .await;
    let mut want = keys(&["object:13", "rack:20", "port:1302"]);
    want.extend(port_keys(13, 2));
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 13").await;
    exact(&tx, &want, "mounted server");

    let log = p.log_text();
    assert!(log.contains("Cascade index built"), "{log}");
}

/// Rows inserted, linked and deleted while the producer reads its snapshot (a large Port
/// table makes that take a while) are neither lost nor doubled: deleting them later yields
/// their exact keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_changed_while_the_snapshot_is_read_are_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("cixsnap").await;
    let prefix = unique("cixsnap");
    // 200,000 ports of one object.
    db.exec(
        "SET foreign_key_checks = 0;\n\
         INSERT INTO Object (id, name, objtype_id) VALUES (1, 'big', 4);\n\
         INSERT INTO Port (id, object_id, name, iif_id, type) \
           SELECT 1000000 + seq, 1, CONCAT('p', seq), 1, 24 FROM seq_1_to_200000;\n\
         SET foreign_key_checks = 1",
    )
    .await;
    // Write before the producer starts, while it reads its snapshot, and after.
    let pool = db.pool.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let writer = tokio::spawn(async move {
        use mysql_async::prelude::Queryable;
        let mut c = pool.get_conn().await.unwrap();
        let mut made = Vec::new();
        let mut id = 100;
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) && made.len() < 2000 {
            id += 1;
            for stmt in rtinval_tests::split_sql(&server_sql(id, 2)) {
                c.query_drop(stmt).await.unwrap();
            }
            if id % 2 == 0 {
                c.query_drop(link_sql(id * 100 + 1, (id - 1) * 100 + 2))
                    .await
                    .unwrap();
            }
            made.push((id, Instant::now()));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        made
    });
    while writer_count(&db).await < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let spawned = Instant::now();
    let mut p = start_producer(dir.path(), "producer", &config(&db, &prefix, &[], ""));
    p.wait_log("Cascade index built", Duration::from_secs(120));
    let built = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = writer.await.unwrap();
    streaming(&mut p);
    let during = made
        .iter()
        .filter(|(_, t)| *t > spawned && *t < built)
        .count();
    println!(
        "{} servers written, {during} while the producer started and read its snapshot",
        made.len()
    );
    assert!(during > 0, "no write overlapped the start-up");
    assert!(
        made.iter().any(|(_, t)| *t > built),
        "no write after the build"
    );
    // Every server written before, during and after the snapshot: exact keys on delete.
    for (id, _) in made.iter().step_by(37) {
        let id = *id;
        let mut want = port_keys(id, 2);
        want.push(format!("object:{id}"));
        if id % 2 == 0 {
            want.push(format!("port:{}", (id - 1) * 100 + 2));
        }
        if made.iter().any(|(o, _)| *o == id + 1) && (id + 1) % 2 == 0 {
            want.push(format!("port:{}", (id + 1) * 100 + 1));
        }
        let tx = published_by(&db, &prefix, &format!("DELETE FROM Object WHERE id = {id}")).await;
        exact(&tx, &want, &format!("server {id}"));
    }
}

/// Servers the snapshot test's writer made so far (objects with ids from 101).
async fn writer_count(db: &TestDb) -> u64 {
    use mysql_async::prelude::Queryable;
    let mut c = db.pool.get_conn().await.unwrap();
    c.query_first("SELECT COUNT(*) FROM Object WHERE id > 100 AND id < 1000000")
        .await
        .unwrap()
        .unwrap()
}

/// A restart and a failover build the index again from a snapshot: changes made while no
/// producer ran are in it, and a delete replayed from before the snapshot is covered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_and_a_failover_rebuild_the_index_and_miss_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("cixrestart").await;
    let prefix = unique("cixrestart");
    let cfg = config(&db, &prefix, &[], "");
    let mut p = start_producer(dir.path(), "first", &cfg);
    streaming(&mut p);
    for id in [31, 32, 33] {
        db.exec(&server_sql(id, 2)).await;
    }
    db.exec(&link_sql(3101, 3201)).await;
    // Published (and checkpointed) before the stop.
    published_by(&db, &prefix, "UPDATE Object SET label = 'x' WHERE id = 31").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.terminate(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );

    // While no producer runs: new ports and a link for 33, and server 32 deleted.
    db.exec(&link_sql(3301, 3102)).await;
    let gone = db.exec_gtid("DELETE FROM Object WHERE id = 32").await;
    let mut p = start_producer(dir.path(), "second", &cfg);
    streaming(&mut p);
    // The delete made while down: replayed before the snapshot position, so either exact or
    // flushed — never missing.
    let tx = published_by(&db, &prefix, "UPDATE Object SET label = 'y' WHERE id = 31").await;
    drop(tx);
    let events = rtinval_tests::read_events(&format!("{prefix}.cache-keys")).await;
    let of_gone: Vec<_> = events
        .iter()
        .filter(|e| e.source.gtid.as_deref() == Some(gone.as_str()))
        .collect();
    let covered = |key: &str| {
        of_gone.iter().any(|e| match &e.body {
            rtinval_schemas::EventBody::CacheKeys { keys, .. } => keys.iter().any(|k| k == key),
            rtinval_schemas::EventBody::CacheFlush { .. } => true,
            _ => false,
        })
    };
    for k in ["object:32", "port:3201", "port:3202", "port:3101"] {
        assert!(covered(k), "{k} of the delete made while down: {of_gone:?}");
    }
    // Changes made while down are in the rebuilt index.
    let mut want = port_keys(33, 2);
    want.extend(keys(&["object:33", "port:3102"]));
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 33").await;
    exact(&tx, &want, "server 33 after the restart");

    // Failover: a standby (same config) takes over from a killed leader and builds its own.
    let standby_cfg = dir.path().join("standby.toml");
    std::fs::write(&standby_cfg, &cfg).unwrap();
    let mut standby = Proc::spawn(
        "standby",
        std::process::Command::new(bin("rtinval-producer"))
            .arg("--config")
            .arg(&standby_cfg),
        dir.path().join("standby.log"),
    );
    wait_sync("standby standing by", Duration::from_secs(30), || {
        standby.log_text().contains("standing by").then_some(())
    });
    db.exec(&server_sql(34, 1)).await;
    db.exec(&link_sql(3401, 3101)).await;
    p.kill9();
    streaming(&mut standby);
    let mut want = port_keys(31, 2);
    want.extend(keys(&["object:31", "port:3401"]));
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 31").await;
    exact(&tx, &want, "server 31 after the failover");
    assert!(standby.log_text().contains("Cascade index built"));
}

/// Above `producer.cascade_index_max_rows` a table leaves the index: one log line, a metric,
/// and its cascades flush (reason `cascade_underivable`) instead of being missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_cap_cascades_flush_with_a_metric_and_a_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("cixcap").await;
    let prefix = unique("cixcap");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut p = start_producer(
        dir.path(),
        "producer",
        &config(
            &db,
            &prefix,
            &[("cascade_index_max_rows", 5.into())],
            &listen,
        ),
    );
    streaming(&mut p);
    db.exec(&server_sql(41, 2)).await;
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 41").await;
    let mut want = port_keys(41, 2);
    want.push("object:41".into());
    exact(&tx, &want, "under the cap");

    db.exec(&server_sql(42, 6)).await;
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 42").await;
    assert!(
        tx.flushed
            .contains(&("rt".into(), "cascade_underivable".into())),
        "over the cap the cascade flushes: {tx:?}"
    );
    let log = p.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Cascade index: stopped holding this table"))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("table={}.Port ", db.name)) && l.contains("max_rows")),
        "{log}"
    );
    let (_, metrics) = http_get(&listen, "/metrics").unwrap();
    let series = format!(
        "rtinval_producer_cascade_index_disabled_total{{table=\"{}.Port\",reason=\"max_rows\"}} 1",
        db.name
    );
    assert!(metrics.contains(&series), "{series} not in:\n{metrics}");
    // Said once, not per row.
    db.exec(&server_sql(43, 6)).await;
    published_by(&db, &prefix, "DELETE FROM Object WHERE id = 43").await;
    let again = p
        .log_text()
        .lines()
        .filter(|l| {
            l.contains("Cascade index: stopped holding this table")
                && l.contains(&format!("table={}.Port ", db.name))
        })
        .count();
    assert_eq!(again, 1);
}

/// `ALTER TABLE` and `TRUNCATE` of child tables: the index follows (built again when the
/// statement names one of its tables) and cascades stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_or_truncated_child_table_keeps_cascades_exact() {
    let dir = tempfile::tempdir().unwrap();
    let db = database("cixalter").await;
    let prefix = unique("cixalter");
    let mut p = start_producer(dir.path(), "producer", &config(&db, &prefix, &[], ""));
    streaming(&mut p);
    for id in [51, 52, 53] {
        db.exec(&server_sql(id, 2)).await;
    }
    db.exec(&link_sql(5101, 5201)).await;
    // A column added before Port's stored ones move the positions the binlog carries.
    db.exec("ALTER TABLE Port ADD COLUMN note VARCHAR(20) DEFAULT NULL FIRST")
        .await;
    db.exec(&link_sql(5301, 5102)).await;
    db.exec(
        "SET foreign_key_checks = 0;\n\
         INSERT INTO Port (id, object_id, name, iif_id, type, note) VALUES (5103, 51, 'eth3', 1, 24, 'new');\n\
         SET foreign_key_checks = 1",
    )
    .await;
    let mut want = port_keys(51, 3);
    want.extend(keys(&["object:51", "port:5201", "port:5301"]));
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 51").await;
    exact(&tx, &want, "after ALTER TABLE Port");

    // TRUNCATE Link: its rows are gone without row events; a later delete must not name them,
    // and new links are indexed.
    db.exec(&link_sql(5202, 5301)).await;
    let before = p.log_text().matches("Cascade index complete").count();
    db.exec("TRUNCATE TABLE Link").await;
    db.exec(&link_sql(5201, 5302)).await;
    until_complete(&db, &p, before + 1).await;
    let tx = published_by(&db, &prefix, "DELETE FROM Object WHERE id = 52").await;
    let mut want = port_keys(52, 2);
    want.extend(keys(&["object:52", "port:5302"]));
    exact(&tx, &want, "after TRUNCATE Link");
    assert!(
        !tx.has_key("rt", "port:5301"),
        "a truncated link's far end is not a cascade: {tx:?}"
    );
    let built = p.log_text().matches("Cascade index built").count();
    assert_eq!(
        built, 2,
        "built at start and after TRUNCATE, not after ALTER ADD COLUMN"
    );
}
