//! Proves that outages of the source and of the broker lose no invalidation, and that a
//! position purged from the server becomes a `resync`, not a silent gap. These tests restart
//! and purge servers, so each runs its own MariaDB (and broker) from the stack's packages
//! instead of disturbing the shared stack. Needs `scripts/stack up` (for the tansu binary)
//! and the binaries built. Run alone:
//! `cargo test -p rtinval-tests --test producer_outages -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use rtinval_schemas::EventBody;
use rtinval_tests::{
    PrivateBroker, PrivateMariaDb, Proc, Stack, producer_config, read_events_from, start_producer,
    unique, wait_sync,
};

const OBJECTS: u32 = 100;

fn producer(dir: &Path, name: &str, url: &str, brokers: &str, prefix: &str) -> Proc {
    // A MariaDB and a broker of the test's own, in place of the stack's.
    let cfg = producer_config(
        "rt",
        prefix,
        &format!(
            "[source]\nurl = \"{url}\"\nread_timeout_secs = 3\n[kafka]\nbrokers = \"{brokers}\"\n\
             [producer]\nheartbeat_ms = 200\ncheckpoint_ms = 100\n\
             [[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{{id}}:{{label}}\"]\n"
        ),
    );
    start_producer(dir, name, &cfg)
}

fn create_schema(db: &PrivateMariaDb) {
    let rows: Vec<String> = (1..=OBJECTS)
        .map(|i| format!("({i}, 'obj-{i}', 'init')"))
        .collect();
    db.sql(&format!(
        "CREATE DATABASE rt; CREATE TABLE rt.Object (id INT UNSIGNED PRIMARY KEY, name CHAR(255), label CHAR(255)) ENGINE=InnoDB; \
         INSERT INTO rt.Object VALUES {}",
        rows.join(", ")
    ));
}

/// `n` single-row writes; a write that fails (server down) is retried until it succeeds, and
/// only acknowledged writes are expected.
fn writer(url: String, n: u32, pace: Duration) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let pool = mysql_async::Pool::new(url.as_str());
        let mut expected = Vec::new();
        for w in 0..n {
            let id = w % OBJECTS + 1;
            loop {
                let attempt = async {
                    let mut conn = pool.get_conn().await?;
                    conn.exec_drop(
                        "UPDATE rt.Object SET label = ? WHERE id = ?",
                        (format!("w{w}"), id),
                    )
                    .await
                };
                match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(())) => break,
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            expected.push(format!("object:{id}:w{w}"));
            tokio::time::sleep(pace).await;
        }
        expected
    })
}

async fn keys_on(brokers: &str, prefix: &str) -> HashSet<String> {
    let mut keys = HashSet::new();
    for e in read_events_from(brokers, &format!("{prefix}.cache-keys")).await {
        if let EventBody::CacheKeys { keys: ks, .. } = e.body {
            keys.extend(ks);
        }
    }
    keys
}

/// Set object 1's label on `db` and wait until its key `object:1:<label>` is published: the
/// producer streams from that server.
async fn relabel_and_see(db: &PrivateMariaDb, brokers: &str, prefix: &str, label: &str) {
    let mut c = mysql_async::Conn::new(mysql_async::Opts::from_url(&db.admin_url()).unwrap())
        .await
        .unwrap();
    c.exec_drop("UPDATE rt.Object SET label = ? WHERE id = 1", (label,))
        .await
        .unwrap();
    let key = format!("object:1:{label}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !keys_on(brokers, prefix).await.contains(&key) {
        assert!(
            Instant::now() < deadline,
            "no event for {key} from {}",
            db.admin_url()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reasons of the resyncs on the pool-reset topic, once there are `n` (or after 30 s).
async fn wait_resyncs(brokers: &str, prefix: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reasons: Vec<String> = read_events_from(brokers, &format!("{prefix}.pool-reset"))
            .await
            .into_iter()
            .filter_map(|e| match e.body {
                EventBody::Resync { reason } => Some(reason),
                _ => None,
            })
            .collect();
        if reasons.len() >= n || Instant::now() > deadline {
            return reasons;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_restart_and_broker_crash_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = PrivateMariaDb::start(dir.path());
    create_schema(&db);
    let mut broker = PrivateBroker::start(dir.path());
    let prefix = unique("outage");
    let mut p = producer(
        dir.path(),
        "producer",
        &db.producer_url(),
        &broker.brokers(),
        &prefix,
    );

    let writes = writer(db.admin_url(), 1200, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    db.restart();
    println!("source restarted");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rss_before = rss_kb(p.pid());
    broker.crash();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rss_during = rss_kb(p.pid());
    assert!(
        p.try_exit().is_none(),
        "the producer must wait for the broker, not exit:\n{}",
        p.log_text()
    );
    broker.resume();
    println!(
        "broker back; producer RSS {rss_before} kB before the outage, {rss_during} kB after 4 s of it"
    );
    let expected = writes.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let keys = keys_on(&broker.brokers(), &prefix).await;
        let missing: Vec<&String> = expected.iter().filter(|k| !keys.contains(*k)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} changes never invalidated, e.g. {:?}\n{}",
            missing.len(),
            expected.len(),
            &missing[..missing.len().min(5)],
            p.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let reconnects = p.log_text().matches("reconnecting").count();
    println!(
        "outages: {} changes written, all invalidated, {reconnects} source reconnects",
        expected.len()
    );
    assert!(reconnects >= 1, "the source restart was noticed");
    assert!(
        rss_during < rss_before + 64 * 1024,
        "memory stays bounded while Kafka is down"
    );
    assert!(p.try_exit().is_none(), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_position_publishes_a_resync_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = PrivateMariaDb::start(dir.path());
    create_schema(&db);
    let brokers = Stack::get().brokers.clone();
    let prefix = unique("purged");
    let admin = mysql_async::Pool::new(db.admin_url().as_str());
    let write = |label: &'static str| {
        let admin = admin.clone();
        async move {
            let mut c = admin.get_conn().await.unwrap();
            c.exec_drop("UPDATE rt.Object SET label = ? WHERE id = 1", (label,))
                .await
                .unwrap();
        }
    };
    let wait_key = |key: &'static str| {
        let brokers = brokers.clone();
        let prefix = prefix.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !keys_on(&brokers, &prefix).await.contains(key) {
                assert!(
                    Instant::now() < deadline,
                    "{key} never published on {prefix}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    let mut p = producer(dir.path(), "first", &db.producer_url(), &brokers, &prefix);
    write("a").await;
    wait_key("object:1:a").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.terminate(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );

    // While the producer is down, its position is rotated away and purged.
    write("lost").await;
    // MariaDB keeps a binlog until its binlog checkpoint moved on: rotate and purge until the
    // file holding the producer's position is gone.
    let mut purged = false;
    for _ in 0..20 {
        db.sql("FLUSH BINARY LOGS");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let current = db
            .sql("SHOW MASTER STATUS")
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned();
        db.sql(&format!("PURGE BINARY LOGS TO '{current}'"));
        if !db.sql("SHOW BINARY LOGS").contains("mariadb-bin.000001") {
            purged = true;
            break;
        }
    }
    assert!(
        purged,
        "could not purge the first binlog: {}",
        db.sql("SHOW BINARY LOGS")
    );

    let p = producer(dir.path(), "second", &db.producer_url(), &brokers, &prefix);
    wait_sync(
        "the position-lost log line",
        Duration::from_secs(30),
        || {
            p.log_text()
                .contains("Binlog position no longer on the server: publishing resync.")
                .then_some(())
        },
    );
    // The resync is published (and acknowledged) shortly after the log line.
    let resyncs = wait_resyncs(&brokers, &prefix, 2).await;
    assert_eq!(
        resyncs,
        vec!["no_checkpoint".to_string(), "position_lost".to_string()],
        "{}",
        p.log_text()
    );
    write("after").await;
    wait_key("object:1:after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_from_another_server_publishes_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let old = PrivateMariaDb::start_with_id(dir.path(), "old-primary", 17);
    let new = PrivateMariaDb::start_with_id(dir.path(), "new-primary", 18);
    create_schema(&old);
    create_schema(&new);
    let brokers = Stack::get().brokers.clone();
    let prefix = unique("moved");
    let mut p = producer(dir.path(), "on-old", &old.producer_url(), &brokers, &prefix);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.terminate(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );

    // Same producer group, now pointed at another server: the stored file:pos is meaningless.
    let p = producer(dir.path(), "on-new", &new.producer_url(), &brokers, &prefix);
    wait_sync(
        "the server-changed log line",
        Duration::from_secs(30),
        || {
            p.log_text()
                .contains("The checkpoint belongs to another server")
                .then_some(())
        },
    );
    let reasons = wait_resyncs(&brokers, &prefix, 2).await;
    assert_eq!(
        reasons,
        ["no_checkpoint", "server_changed"],
        "{}",
        p.log_text()
    );
    relabel_and_see(&new, &brokers, &prefix, "on-new").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_server_with_the_same_id_publishes_a_resync() {
    let dir = tempfile::tempdir().unwrap();
    let original = PrivateMariaDb::start_with_id(dir.path(), "original", 23);
    create_schema(&original);
    let brokers = Stack::get().brokers.clone();
    let prefix = unique("rebuilt");
    let mut p = producer(
        dir.path(),
        "on-original",
        &original.producer_url(),
        &brokers,
        &prefix,
    );
    writer(original.admin_url(), 5, Duration::from_millis(20))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.terminate(Duration::from_secs(15)).and_then(|s| s.code()),
        Some(0)
    );
    drop(original);

    // The server is rebuilt with the same server id and binlog names and replays the same
    // statements, so the checkpoint's file:pos is an event boundary there too — but in another
    // GTID domain: another history, which resuming there would silently take for the old one.
    let rebuilt = PrivateMariaDb::start_with_id(dir.path(), "rebuilt", 23);
    rebuilt.sql("SET GLOBAL gtid_domain_id = 1");
    create_schema(&rebuilt);
    writer(rebuilt.admin_url(), 5, Duration::from_millis(20))
        .await
        .unwrap();
    writer(rebuilt.admin_url(), 20, Duration::from_millis(1))
        .await
        .unwrap();
    let p = producer(
        dir.path(),
        "on-rebuilt",
        &rebuilt.producer_url(),
        &brokers,
        &prefix,
    );
    wait_sync(
        "the history-changed log line",
        Duration::from_secs(30),
        || {
            p.log_text()
                .contains("holds another transaction than the checkpoint")
                .then_some(())
        },
    );
    let reasons = wait_resyncs(&brokers, &prefix, 2).await;
    assert_eq!(
        reasons,
        ["no_checkpoint", "history_changed"],
        "{}",
        p.log_text()
    );
    // It goes on from the rebuilt server's current position.
    relabel_and_see(&rebuilt, &brokers, &prefix, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_source_is_detected_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = PrivateMariaDb::start(dir.path());
    create_schema(&db);
    let brokers = Stack::get().brokers.clone();
    let prefix = unique("halfopen");
    let p = producer(
        dir.path(),
        "producer",
        &db.producer_url(),
        &brokers,
        &prefix,
    );
    let writes = writer(db.admin_url(), 300, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Frozen: the TCP connection stays up but no byte and no heartbeat arrives.
    db.freeze(true);
    wait_sync("the read timeout", Duration::from_secs(20), || {
        p.log_text()
            .contains("binlog stream idle for 3 s")
            .then_some(())
    });
    db.freeze(false);
    let expected = writes.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let keys = keys_on(&brokers, &prefix).await;
        let missing = expected.iter().filter(|k| !keys.contains(*k)).count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} changes missing\n{}",
            expected.len(),
            p.log_text()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!(
        "half-open source: {} changes written, all invalidated after the read timeout",
        expected.len()
    );
}
