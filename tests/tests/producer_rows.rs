//! Proves how the producer turns real binlog rows into keys and what it does when the schema
//! moves under it: column types render as an application would print them (unsigned and
//! signed integers, BINARY(16) with trailing zero bytes, ENUM, DATETIME, NULL, a multi-MB
//! TEXT row); `ALTER TABLE` mid-stream (drop, rename, add a column) never stops the producer
//! and a key that can no longer be derived becomes a `cache_flush`; and the documented grants
//! are exactly enough, while a missing one stops the producer with one line naming it.
//! Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test producer_rows`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use rtinval_schemas::EventBody;
use rtinval_tests::{Proc, Stack, TestDb, producer_config, read_events, start_producer, unique};

fn producer(dir: &Path, url: &str, db: &str, prefix: &str, rules: &str) -> Proc {
    let cfg = producer_config(
        db,
        prefix,
        &format!("[source]\nurl = \"{url}\"\n[producer]\nheartbeat_ms = 200\n{rules}"),
    );
    start_producer(dir, "producer", &cfg)
}

/// Wait until the cache-keys topic holds an event matching `pred`; returns all bodies so far.
async fn wait_event(prefix: &str, what: &str, pred: impl Fn(&EventBody) -> bool) -> Vec<EventBody> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bodies: Vec<EventBody> = read_events(&format!("{prefix}.cache-keys"))
            .await
            .into_iter()
            .map(|e| e.body)
            .collect();
        if bodies.iter().any(&pred) {
            return bodies;
        }
        assert!(Instant::now() < deadline, "no {what} event; got {bodies:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn has_key(key: &str) -> impl Fn(&EventBody) -> bool + '_ {
    move |b| matches!(b, EventBody::CacheKeys { keys, .. } if keys.iter().any(|k| k == key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn column_types_render_as_the_application_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(
        "types",
        "CREATE TABLE T (id INT UNSIGNED NOT NULL PRIMARY KEY, big BIGINT UNSIGNED, neg INT, \
         ip BINARY(16), realm ENUM('object','rack'), at DATETIME, body MEDIUMTEXT, nick VARCHAR(20) NULL) ENGINE=InnoDB",
    )
    .await;
    let prefix = unique("types");
    let rules = "[[rules]]\ntable = \"T\"\ncache = \"c\"\nkeys = [\"t:{id}:{big}:{neg}:{ip}:{realm}:{at}\", \"nick:{nick}\"]\n";
    let _p = producer(
        dir.path(),
        &Stack::get().mysql_url,
        &db.name,
        &prefix,
        rules,
    );
    db.exec(
        "INSERT INTO T VALUES (4294967295, 18446744073709551615, -5, UNHEX('20010db8000000000000000000000000'), \
         'rack', '2026-01-02 03:04:05', REPEAT('x', 5000000), NULL)",
    )
    .await;
    let expected = "t:4294967295:18446744073709551615:-5:20010db8000000000000000000000000:rack:2026-01-02 03:04:05";
    // What the application reads for the same row, through SQL:
    let mut conn = db.pool.get_conn().await.unwrap();
    let app: Option<String> = conn
        .query_first("SELECT CONCAT('t:', id, ':', big, ':', neg, ':', LOWER(HEX(ip)), ':', realm, ':', at) FROM T")
        .await
        .unwrap();
    assert_eq!(app.as_deref(), Some(expected));
    let bodies = wait_event(&prefix, "typed key", has_key(expected)).await;
    assert!(!bodies.iter().any(|b| matches!(b, EventBody::CacheKeys { keys, .. } if keys.iter().any(|k| k.starts_with("nick:")))), "NULL yields no key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alter_table_mid_stream_flushes_instead_of_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("alter", include_str!("../fixtures/racktables/schema.sql")).await;
    db.exec("INSERT INTO Object (id, name, asset_no) VALUES (1, 'a', 'A-1')")
        .await;
    let prefix = unique("alter");
    let rules = "[[rules]]\ntable = \"Object\"\nreset_pools = [\"rtapi\"]\ncache = \"rt\"\nkeys = [\"object:{id}\", \"asset:{asset_no}\"]\n";
    let mut p = producer(
        dir.path(),
        &Stack::get().mysql_url,
        &db.name,
        &prefix,
        rules,
    );

    db.exec("UPDATE Object SET label = 'x' WHERE id = 1").await;
    wait_event(&prefix, "asset key", has_key("asset:A-1")).await;

    // The column a template needs disappears: the key cannot be derived, the cache is flushed.
    db.exec("ALTER TABLE Object DROP COLUMN asset_no").await;
    db.exec("UPDATE Object SET label = 'y' WHERE id = 1").await;
    let flush = |b: &EventBody| matches!(b, EventBody::CacheFlush { reason, .. } if reason == "key_underivable");
    let bodies = wait_event(&prefix, "cache_flush", flush).await;
    assert_eq!(bodies.iter().filter(|b| flush(b)).count(), 1);
    assert!(
        p.log_text()
            .contains("Rules reference columns the table no longer has"),
        "reported in the log"
    );

    // Renamed back in under another name, then the original name returns: keys again.
    db.exec("ALTER TABLE Object ADD COLUMN asset_tag char(64) DEFAULT 'T'")
        .await;
    db.exec("ALTER TABLE Object RENAME COLUMN asset_tag TO asset_no")
        .await;
    db.exec("UPDATE Object SET label = 'z', asset_no = 'A-2' WHERE id = 1")
        .await;
    wait_event(
        &prefix,
        "asset key after the column returned",
        has_key("asset:A-2"),
    )
    .await;
    assert!(p.try_exit().is_none(), "the producer survived every ALTER");
    assert_eq!(
        p.terminate(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );
}

/// `TRUNCATE` (and `DROP`) remove a watched table's rows without row events: the producer
/// flushes the caches of its rules and resets their pools, in the statement's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncating_a_watched_table_flushes_its_caches() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(
        "truncate",
        include_str!("../fixtures/racktables/schema.sql"),
    )
    .await;
    db.exec(
        "INSERT INTO Object (id, name) VALUES (1, 'a');\n\
         INSERT INTO AttributeValue (object_id, object_tid, attr_id, uint_value) VALUES (1, 1, 2, 1)",
    )
    .await;
    let prefix = unique("truncate");
    let rules = "[[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{id}\"]\n\n\
                 [[rules]]\ntable = \"AttributeValue\"\nreset_pools = [\"rtapi\"]\ncache = \"attrs\"\nkeys = [\"attrs:{object_id}\"]\n";
    let p = producer(
        dir.path(),
        &Stack::get().mysql_url,
        &db.name,
        &prefix,
        rules,
    );
    db.exec("TRUNCATE TABLE AttributeValue").await;
    let flushed = |b: &EventBody| matches!(b, EventBody::CacheFlush { cache, reason } if cache == "attrs" && reason == "table_emptied");
    let bodies = wait_event(&prefix, "cache_flush after TRUNCATE", flushed).await;
    assert!(
        !bodies
            .iter()
            .any(|b| matches!(b, EventBody::CacheFlush { cache, .. } if cache == "rt")),
        "only the truncated table's caches: {bodies:?}"
    );
    let resets = read_events(&format!("{prefix}.pool-reset")).await;
    assert!(resets.iter().any(
        |e| matches!(&e.body, EventBody::PoolReset { pools } if pools == &["rtapi".to_string()])
    ));
    assert!(
        p.log_text()
            .contains("DDL removed the rows of watched tables"),
        "{}",
        p.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_grants_suffice_and_a_missing_one_is_named() {
    let db = TestDb::create(
        "grants",
        "CREATE TABLE Object (id INT PRIMARY KEY, name CHAR(255)) ENGINE=InnoDB",
    )
    .await;
    let s = Stack::get();
    let admin = mysql_async::Pool::new(s.mysql_admin_url.as_str());
    let mut conn = admin.get_conn().await.unwrap();
    let cases = [
        ("REPLICATION SLAVE, BINLOG MONITOR", true, ""),
        ("BINLOG MONITOR", false, "REPLICATION SLAVE"),
        ("REPLICATION SLAVE", false, "BINLOG MONITOR"),
    ];
    for (i, (grants, ok, missing)) in cases.into_iter().enumerate() {
        let user = format!("rtt_g{i}_{}", std::process::id());
        let url = db.user(&user, "pw", grants).await;
        let dir = tempfile::tempdir().unwrap();
        let (code, text) = rtinval_tests::producer_check(
            dir.path(),
            &producer_config(
                &db.name,
                &unique("grants"),
                &format!(
                    "[source]\nurl = \"{url}\"\n[[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{{id}}\"]\n"
                ),
            ),
        );
        conn.query_drop(format!("DROP USER '{user}'@'127.0.0.1'"))
            .await
            .unwrap();
        if ok {
            assert_eq!(code, Some(0), "{grants}: {text}");
        } else {
            assert_eq!(code, Some(1), "{grants}: {text}");
            assert!(
                text.contains("lacks a privilege") && text.contains(missing),
                "{grants}: {text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_key_cascades_invalidate_the_children() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("cascade", include_str!("../fixtures/racktables/schema.sql")).await;
    db.exec(
        "INSERT INTO Object (id, name, objtype_id) VALUES (5, 'a', 4), (6, 'b', 4);\n\
         INSERT INTO AttributeValue (object_id, object_tid, attr_id, uint_value) VALUES (5, 4, 2, 1), (5, 4, 3, 1), (6, 4, 2, 1)",
    )
    .await;
    let prefix = unique("cascade");
    // attrs: derivable from the parent's key; attr_detail: needs attr_id, which only the child has.
    let rules = "[[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{id}\"]\n\n\
                 [[rules]]\ntable = \"AttributeValue\"\nreset_pools = [\"rtapi\"]\ncache = \"attrs\"\nkeys = [\"attrs:{object_id}\"]\n\n\
                 [[rules]]\ntable = \"AttributeValue\"\ncache = \"attr_detail\"\nkeys = [\"attr:{object_id}:{attr_id}\"]\n";
    let _p = producer(
        dir.path(),
        &Stack::get().mysql_url,
        &db.name,
        &prefix,
        rules,
    );

    // ON DELETE CASCADE: InnoDB deletes the AttributeValue rows without binlog rows of their own.
    db.exec("DELETE FROM Object WHERE id = 5").await;
    wait_event(&prefix, "cascaded child key", has_key("attrs:5")).await;
    wait_event(&prefix, "cascaded child key", has_key("attr:5:2")).await;
    let bodies = wait_event(&prefix, "cascaded child key", has_key("attr:5:3")).await;
    assert!(bodies.iter().any(has_key("object:5")));
    // attr_id is the child's own column: the cascade index (built from a snapshot at start)
    // holds it, so each deleted row's exact key, and no flush.
    assert!(
        bodies.iter().any(has_key("attr:5:2")) && bodies.iter().any(has_key("attr:5:3")),
        "a child key that needs child-only columns comes from the cascade index: {bodies:?}"
    );
    assert!(
        !bodies
            .iter()
            .any(|b| matches!(b, EventBody::CacheFlush { .. })),
        "{bodies:?}"
    );
    let resets = read_events(&format!("{prefix}.pool-reset")).await;
    assert!(resets.iter().any(
        |e| matches!(&e.body, EventBody::PoolReset { pools } if pools == &["rtapi".to_string()])
    ));

    // ON UPDATE CASCADE on (id, objtype_id): retyping object 6 rewrites its attribute rows.
    db.exec("UPDATE Object SET objtype_id = 9 WHERE id = 6")
        .await;
    wait_event(
        &prefix,
        "child key after ON UPDATE CASCADE",
        has_key("attrs:6"),
    )
    .await;
    wait_event(
        &prefix,
        "child-only key after ON UPDATE CASCADE",
        has_key("attr:6:2"),
    )
    .await;
}

fn hwm_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_row_transaction_stays_bounded_and_escalates_to_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(
        "bigtx",
        "CREATE TABLE T (id INT UNSIGNED PRIMARY KEY, v INT NOT NULL) ENGINE=InnoDB",
    )
    .await;
    // MariaDB's sequence engine fills a million rows without a million round trips.
    db.exec("INSERT INTO T SELECT seq, 0 FROM seq_1_to_1000000")
        .await;
    let prefix = unique("bigtx");
    let rules =
        "[[rules]]\ntable = \"T\"\nreset_pools = [\"p\"]\ncache = \"c\"\nkeys = [\"t:{id}\"]\n";
    let p = producer(
        dir.path(),
        &Stack::get().mysql_url,
        &db.name,
        &prefix,
        rules,
    );
    let before = hwm_kb(p.pid());
    let t = Instant::now();
    db.exec("UPDATE T SET v = v + 1").await;
    let flush = |b: &EventBody| matches!(b, EventBody::CacheFlush { cache, reason } if cache == "c" && reason == "too_many_keys");
    let deadline = Instant::now() + Duration::from_secs(240);
    let bodies = loop {
        let bodies: Vec<EventBody> = read_events(&format!("{prefix}.cache-keys"))
            .await
            .into_iter()
            .map(|e| e.body)
            .collect();
        if bodies.iter().any(flush) {
            break bodies;
        }
        assert!(
            Instant::now() < deadline,
            "no too_many_keys flush within 240 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let peak = hwm_kb(p.pid());
    println!(
        "1,000,000-row transaction: flushed {:?} after the UPDATE began; producer peak RSS {} MB (before: {} MB)",
        t.elapsed(),
        peak / 1024,
        before / 1024
    );
    assert!(
        !bodies
            .iter()
            .any(|b| matches!(b, EventBody::CacheKeys { cache, .. } if cache == "c")),
        "no key list for the escalated transaction"
    );
    // The bound: max_keys_per_transaction keys (10,000 here) plus one binlog event at a time.
    assert!(
        peak < 150 * 1024,
        "producer peak RSS {peak} kB for a 1M-row transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_the_checkpoint_past_unwatched_changes() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create(
        "hbck",
        "CREATE TABLE Watched (id INT PRIMARY KEY) ENGINE=InnoDB;\nCREATE TABLE Noise (id INT PRIMARY KEY, v INT) ENGINE=InnoDB",
    )
    .await;
    let prefix = unique("hbck");
    let rules = "[[rules]]\ntable = \"Watched\"\ncache = \"c\"\nkeys = [\"w:{id}\"]\n";
    let _p = producer(
        dir.path(),
        &Stack::get().mysql_url,
        &db.name,
        &prefix,
        rules,
    );
    let checkpoint = || async {
        let events = rtinval_tests::read_raw(&format!("{prefix}.checkpoints")).await;
        let last = events.last().cloned().unwrap_or_default();
        serde_json::from_slice::<serde_json::Value>(&last).ok()
    };
    let first = wait_for_checkpoint(&checkpoint, None).await;
    for i in 0..50 {
        db.exec(&format!("INSERT INTO Noise VALUES ({i}, {i})"))
            .await;
    }
    let later = wait_for_checkpoint(&checkpoint, Some(&first)).await;
    println!("checkpoint moved from {first} to {later} with only unwatched changes");
    assert!(later["pos"].as_u64() > first["pos"].as_u64() || later["file"] != first["file"]);
}

async fn wait_for_checkpoint<F, Fut>(
    read: &F,
    newer_than: Option<&serde_json::Value>,
) -> serde_json::Value
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<serde_json::Value>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = read().await
            && newer_than.is_none_or(|old| c["pos"] != old["pos"] || c["file"] != old["file"])
        {
            return c;
        }
        assert!(Instant::now() < deadline, "checkpoint did not move");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
