//! Proves the whole path on the real local stack, with both binaries as processes: a RackTables
//! write in MariaDB reaches the node through the binlog, the producer, the tansu broker and the
//! consumer, which purges exactly the affected Redis keys and reloads the (stand-in) worker
//! pool — once per transaction, however many rows it changed.
//!
//! Needs `scripts/stack up` and the binaries built (`scripts/test` does both). Run alone:
//! `cargo test -p rtinval-tests --test walking_skeleton`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use redis::AsyncCommands;
use rtinval_tests::{
    Proc, Stack, StandInPool, TestDb, bin, consumer_config, free_port, http_get, producer_config,
    redis, unique, wait_for, wait_sync,
};

const SCHEMA: &str = include_str!("../fixtures/racktables/schema.sql");
const RULES: &str = include_str!("../fixtures/racktables/rules.toml");

fn config(db: &str, prefix: &str, http: &str) -> String {
    producer_config(
        db,
        prefix,
        &format!(
            "[producer]\nheartbeat_ms = 200\ncheckpoint_ms = 200\n[http]\nlisten = \"{http}\"\n{RULES}"
        ),
    )
}

fn node_config(prefix: &str, http: &str, pidfile: &Path) -> String {
    consumer_config(
        prefix,
        &format!("{prefix}-node1"),
        &format!(
            "[http]\nlisten = \"{http}\"\n\
             [pools.rtapi]\nreload = \"signal\"\npidfile = \"{}\"\nsignal = \"USR2\"\ndebounce_ms = 100\nmax_delay_ms = 1000\n\
             [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}:\"\nflush = \"prefix\"\n",
            pidfile.display(),
            Stack::get().redis_url
        ),
    )
}

async fn exists(r: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    r.exists(key).await.expect("EXISTS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racktables_writes_purge_keys_and_reload_the_pool_once_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("skeleton", SCHEMA).await;
    let values: Vec<String> = (1..=600)
        .map(|i| format!("('srv-{i}', 'label {i}')"))
        .collect();
    db.exec(&format!(
        "INSERT INTO Object (name, label) VALUES {}",
        values.join(", ")
    ))
    .await;

    let prefix = unique("skel");
    let pool = StandInPool::start(dir.path(), "rtapi");
    let http = format!("127.0.0.1:{}", free_port());
    let producer_http = format!("127.0.0.1:{}", free_port());
    std::fs::write(
        dir.path().join("producer.toml"),
        config(&db.name, &prefix, &producer_http),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("consumer.toml"),
        node_config(&prefix, &http, &pool.pidfile),
    )
    .unwrap();

    let mut producer = Proc::spawn(
        "rtinval-producer",
        Command::new(bin("rtinval-producer"))
            .arg("--config")
            .arg(dir.path().join("producer.toml")),
        dir.path().join("producer.log"),
    );
    let mut consumer = Proc::spawn(
        "rtinval-consumer",
        Command::new(bin("rtinval-consumer"))
            .arg("--config")
            .arg(dir.path().join("consumer.toml"))
            .arg("run"),
        dir.path().join("consumer.log"),
    );
    // Ready = consuming (after its initial resync, since the group is new) and heartbeats flow.
    wait_sync("consumer /readyz", Duration::from_secs(60), || {
        assert!(
            producer.try_exit().is_none(),
            "producer exited:\n{}",
            producer.log_text()
        );
        assert!(
            consumer.try_exit().is_none(),
            "consumer exited:\n{}",
            consumer.log_text()
        );
        http_get(&http, "/readyz").filter(|(s, _)| *s == 200)
    });
    assert!(
        consumer.log_text().contains("no_committed_offset"),
        "a new node resyncs first"
    );
    let base = wait_sync("the initial resync reload", Duration::from_secs(10), || {
        let n = pool.reloads();
        (n >= 1).then_some(n)
    });

    // Seed the node's cache.
    let mut r = redis().await;
    let k = |s: &str| format!("{prefix}:{s}");
    let mut seeded = vec![
        k("object:1"),
        k("object_name:srv-1"),
        k("object:2"),
        k("object_name:srv-2"),
        k("rack:9"),
    ];
    seeded.extend((3..=502).map(|i| k(&format!("object:{i}"))));
    for key in &seeded {
        let _: () = r.set(key, "cached").await.unwrap();
    }

    // 1. Renaming object 1 purges its id key and its old name key, nothing else.
    db.exec("UPDATE Object SET name = 'srv-1-renamed' WHERE id = 1")
        .await;
    wait_for(
        "object:1 and object_name:srv-1 purged",
        Duration::from_secs(20),
        || {
            let mut r = r.clone();
            let (a, b) = (k("object:1"), k("object_name:srv-1"));
            async move { (!exists(&mut r, &a).await && !exists(&mut r, &b).await).then_some(()) }
        },
    )
    .await;
    for untouched in [k("object:2"), k("object_name:srv-2"), k("rack:9")] {
        assert!(
            exists(&mut r, &untouched).await,
            "{untouched} must not be purged"
        );
    }
    // The Object rule also resets the pool.
    wait_sync(
        "reload after the Object update",
        Duration::from_secs(10),
        || (pool.reloads() == base + 1).then_some(()),
    );

    // 2. A TagTree insert reloads the pool once.
    db.exec("INSERT INTO TagTree (tag) VALUES ('production')")
        .await;
    wait_sync(
        "reload after the TagTree insert",
        Duration::from_secs(20),
        || (pool.reloads() == base + 2).then_some(()),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pool.reloads(), base + 2, "one TagTree insert, one reload");

    // 3. One transaction of 500 Object updates: one reload, and all 500 keys purged.
    db.exec("START TRANSACTION;\nUPDATE Object SET label = CONCAT(label, ' (moved)') WHERE id BETWEEN 3 AND 502;\nCOMMIT").await;
    wait_for("500 object keys purged", Duration::from_secs(20), || {
        let mut r = r.clone();
        let keys: Vec<String> = (3..=502).map(|i| k(&format!("object:{i}"))).collect();
        async move {
            let n: usize = r.exists(&keys).await.expect("EXISTS");
            (n == 0).then_some(())
        }
    })
    .await;
    wait_sync(
        "reload after the 500-row transaction",
        Duration::from_secs(20),
        || (pool.reloads() >= base + 3).then_some(()),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        pool.reloads(),
        base + 3,
        "a 500-row transaction must cause one reload, not 500"
    );
    assert!(
        exists(&mut r, &k("rack:9")).await,
        "unrelated key survives everything"
    );

    // Both /metrics endpoints carry the series an operator needs, with plausible values.
    let p = scrape(&producer_http);
    let table = format!("{}.Object", db.name);
    assert!(
        p(&format!(
            "rtinval_producer_rows_total{{table=\"{table}\",op=\"update\"}}"
        )) >= 501.0
    );
    assert!(p("rtinval_producer_events_published_total{kind=\"pool_reset\"}") >= 3.0);
    assert!(p("rtinval_producer_events_published_total{kind=\"cache_keys\"}") >= 2.0);
    assert!(p("rtinval_producer_events_published_total{kind=\"heartbeat\"}") >= 1.0);
    assert!(p("rtinval_producer_publish_latency_seconds_count") >= 3.0);
    assert!((0.0..5.0).contains(&p("rtinval_producer_binlog_lag_seconds")));
    assert!(p("rtinval_producer_position_bytes") > 0.0);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now_s - p("rtinval_producer_checkpoint_timestamp_seconds")).abs() < 10.0,
        "checkpoint age"
    );
    assert_eq!(
        p("rtinval_producer_resyncs_total{reason=\"no_checkpoint\"}"),
        1.0
    );
    assert_eq!(
        http_get(&producer_http, "/readyz").map(|(s, _)| s),
        Some(200)
    );
    assert_eq!(
        http_get(&producer_http, "/healthz").map(|(s, _)| s),
        Some(200)
    );
    let c = scrape(&http);
    assert!(c("rtinval_consumer_events_applied_total{kind=\"cache_keys\"}") >= 2.0);
    assert!(c("rtinval_consumer_events_applied_total{kind=\"pool_reset\"}") >= 3.0);
    assert!(c("rtinval_consumer_apply_latency_seconds_count") >= 5.0);
    assert!(c("rtinval_consumer_end_to_end_latency_seconds_count") >= 5.0);
    assert!((0.0..5.0).contains(&c("rtinval_consumer_staleness_seconds")));
    assert_eq!(
        c("rtinval_consumer_pool_reloads_total{pool=\"rtapi\"}"),
        (base + 3) as f64
    );
    assert!(c("rtinval_consumer_pool_reload_requests_total{pool=\"rtapi\"}") >= 4.0);
    assert!(c("rtinval_consumer_keys_purged_total{cache=\"rt\"}") >= 503.0);
    assert_eq!(
        c("rtinval_consumer_resyncs_total{reason=\"no_committed_offset\"}"),
        1.0
    );
    assert_eq!(c("rtinval_consumer_decode_errors_total"), 0.0);

    // Both stop cleanly on SIGTERM.
    assert_eq!(
        consumer
            .terminate(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0),
        "consumer exit"
    );
    assert_eq!(
        producer
            .terminate(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0),
        "producer exit"
    );
}

/// Read a /metrics endpoint once; the returned closure looks up one series (0 if absent).
fn scrape(addr: &str) -> impl Fn(&str) -> f64 {
    let (status, body) = http_get(addr, "/metrics").expect("metrics endpoint answers");
    assert_eq!(status, 200);
    move |series: &str| {
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(name, _)| *name == series)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }
}
