//! Proves that the producer loses no invalidation when it is killed with SIGKILL under a steady
//! write load and restarted again and again, and when a standby takes over from a killed
//! leader. Each write gives a unique key (`object:{id}:{label}` with a fresh label), and an
//! observer reads the whole cache-keys topic: every written key must be there; duplicates are
//! allowed and reported. Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test producer_resilience -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;
use rtinval_tests::{Proc, TestDb, bin, producer_config, read_events, unique, wait_sync};

const SCHEMA: &str = include_str!("../fixtures/racktables/schema.sql");
const OBJECTS: u32 = 200;

fn config(db: &str, prefix: &str) -> String {
    producer_config(
        db,
        prefix,
        r#"
[producer]
heartbeat_ms = 200
checkpoint_ms = 100
[[rules]]
table = "Object"
cache = "rt"
keys = ["object:{id}:{label}"]
"#,
    )
}

fn start(dir: &Path, name: &str, cfg: &str) -> Proc {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, cfg).unwrap();
    Proc::spawn(
        name,
        Command::new(bin("rtinval-producer"))
            .arg("--config")
            .arg(&path),
        dir.join(format!("{name}.log")),
    )
}

fn wait_streaming(p: &mut Proc, timeout: Duration) {
    p.wait_log("Streaming binlog.", timeout);
}

async fn seed(base: &str) -> TestDb {
    let db = TestDb::create(base, SCHEMA).await;
    let rows: Vec<String> = (1..=OBJECTS)
        .map(|i| format!("('obj-{i}', 'init')"))
        .collect();
    db.exec(&format!(
        "INSERT INTO Object (name, label) VALUES {}",
        rows.join(", ")
    ))
    .await;
    db
}

/// `n` single-row transactions, each giving object `n % OBJECTS + 1` the label `w<n>`.
fn writer(db: &TestDb, n: u32, pace: Duration) -> tokio::task::JoinHandle<Vec<String>> {
    let pool = db.pool.clone();
    tokio::spawn(async move {
        use mysql_async::prelude::Queryable;
        let mut conn = pool.get_conn().await.unwrap();
        let mut expected = Vec::new();
        for w in 0..n {
            let id = w % OBJECTS + 1;
            conn.exec_drop(
                "UPDATE Object SET label = ? WHERE id = ?",
                (format!("w{w}"), id),
            )
            .await
            .unwrap();
            expected.push(format!("object:{id}:w{w}"));
            tokio::time::sleep(pace).await;
        }
        expected
    })
}

/// Every key published on the cache-keys topic; how many events were published again (same
/// deterministic id: a re-publication after a restart); how many resyncs were published.
async fn observed(prefix: &str) -> (HashSet<String>, usize, usize) {
    let mut keys = HashSet::new();
    let mut ids = HashSet::new();
    let mut republished = 0;
    for e in read_events(&format!("{prefix}.cache-keys")).await {
        if !ids.insert(e.id.clone()) {
            republished += 1;
        }
        if let EventBody::CacheKeys { keys: ks, .. } = e.body {
            keys.extend(ks);
        }
    }
    let resyncs = read_events(&format!("{prefix}.pool-reset"))
        .await
        .iter()
        .filter(|e| matches!(e.body, EventBody::Resync { .. }))
        .count();
    (keys, republished, resyncs)
}

async fn assert_all_observed(prefix: &str, expected: &[String], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (keys, republished, resyncs) = observed(prefix).await;
        let missing: Vec<&String> = expected.iter().filter(|k| !keys.contains(*k)).collect();
        if missing.is_empty() {
            println!(
                "{what}: {} changes written, {} invalidated, {republished} events published twice (same id), 0 missing, {resyncs} resync(s)",
                expected.len(),
                expected.len(),
            );
            assert_eq!(
                resyncs, 1,
                "only the very first start (no checkpoint) may resync"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {} changes never invalidated, e.g. {:?}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_invalidation() {
    let dir = tempfile::tempdir().unwrap();
    let db = seed("crash").await;
    let prefix = unique("crash");
    let cfg = config(&db.name, &prefix);
    let mut p = start(dir.path(), "producer-0", &cfg);
    wait_streaming(&mut p, Duration::from_secs(30));

    let writes = writer(&db, 1500, Duration::from_millis(4));
    let mut restarts = 0;
    while !writes.is_finished() && restarts < 6 {
        tokio::time::sleep(Duration::from_millis(700 + 200 * (restarts % 3))).await;
        p.kill9();
        restarts += 1;
        p = start(dir.path(), &format!("producer-{restarts}"), &cfg);
        wait_streaming(&mut p, Duration::from_secs(30));
    }
    let expected = writes.await.unwrap();
    assert!(
        restarts >= 3,
        "the load ended before enough kills ({restarts})"
    );
    assert_all_observed(&prefix, &expected, &format!("kill -9 x{restarts}")).await;
    assert_eq!(
        p.terminate(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_from_a_killed_leader() {
    let dir = tempfile::tempdir().unwrap();
    let db = seed("failover").await;
    let prefix = unique("failover");
    let mut leader = start(dir.path(), "leader", &config(&db.name, &prefix));
    wait_streaming(&mut leader, Duration::from_secs(30));
    let mut standby = start(dir.path(), "standby", &config(&db.name, &prefix));
    wait_sync("standby standing by", Duration::from_secs(30), || {
        standby.log_text().contains("standing by").then_some(())
    });

    let writes = writer(&db, 1000, Duration::from_millis(4));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    leader.kill9();
    let killed = Instant::now();
    wait_streaming(&mut standby, Duration::from_secs(20));
    println!(
        "standby streaming {:?} after the leader was killed",
        killed.elapsed()
    );
    assert!(killed.elapsed() < Duration::from_secs(10));
    let expected = writes.await.unwrap();
    assert_all_observed(&prefix, &expected, "failover").await;
    assert_eq!(
        standby
            .terminate(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0)
    );
}
