//! Proves `rtinval-consumer replay` against the real broker: time ranges (Kafka timestamps),
//! filters, `--why KEY`, `--apply --dry-run` and a real `--apply` into Redis. The test
//! publishes events with chosen timestamps itself. Needs `scripts/stack up` and the binaries
//! built. Run alone: `cargo test -p rtinval-tests --test replay`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;

use redis::AsyncCommands;
use rtinval_schemas::EventBody;
use rtinval_tests::{Bus, Stack, bin, consumer_config, producer_config, redis, unique};

fn replay(config: &std::path::Path, args: &[&str]) -> Vec<String> {
    let out = Command::new(bin("rtinval-consumer"))
        .arg("--config")
        .arg(config)
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn json(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_ranges_filters_why_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("replay");
    let bus = Bus::new(&prefix).await;
    let s = Stack::get();
    let cache_prefix = format!("{prefix}:");
    let config = dir.path().join("consumer.toml");
    std::fs::write(
        &config,
        consumer_config(
            &prefix,
            &format!("{prefix}-node"),
            &format!(
                "[caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{cache_prefix}\"\n",
                s.redis_url
            ),
        ),
    )
    .unwrap();

    let t0: i64 = 1_795_000_000_000;
    let min = 60_000;
    bus.publish_at(
        EventBody::CacheKeys {
            cache: "rt".into(),
            keys: vec!["object:1".into(), "object:2".into()],
        },
        t0,
    )
    .await;
    bus.publish_at(
        EventBody::PoolReset {
            pools: vec!["rtapi".into()],
        },
        t0 + min,
    )
    .await;
    bus.publish_at(
        EventBody::CacheFlush {
            cache: "rt".into(),
            reason: "too_many_keys".into(),
        },
        t0 + 2 * min,
    )
    .await;
    bus.publish_at(
        EventBody::CacheKeys {
            cache: "rt".into(),
            keys: vec!["object:3".into()],
        },
        t0 + 3 * min,
    )
    .await;
    bus.publish_at(
        EventBody::Resync {
            reason: "position_lost".into(),
        },
        t0 + 4 * min,
    )
    .await;
    bus.publish_at(EventBody::Heartbeat { source_time: 1 }, t0 + 5 * min)
        .await;
    bus.raw(&format!("{prefix}.pool-reset"), b"garbage").await;

    // Everything but heartbeats, with partition, offset and timestamp; garbage shows its error.
    let all = json(&replay(&config, &[]));
    assert_eq!(all.len(), 6, "{all:?}");
    assert!(
        all.iter()
            .all(|r| r["partition"] == 0 && r["offset"].is_i64() && r["timestamp"].is_i64())
    );
    assert_eq!(all.iter().filter(|r| r["error"].is_string()).count(), 1);

    // A time range, in RFC 3339.
    let from = rtinval_consumer::replay::format_ms(t0 + 90_000);
    let to = rtinval_consumer::replay::format_ms(t0 + 200_000);
    let ranged = json(&replay(&config, &["--from-time", &from, "--to-time", &to]));
    let kinds: Vec<&str> = ranged
        .iter()
        .map(|r| r["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, vec!["cache_flush", "cache_keys"], "{ranged:?}");

    // Filters.
    let by_key = json(&replay(
        &config,
        &["--kind", "cache_keys", "--key", "object:2"],
    ));
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0]["event"]["keys"][1], "object:2");
    assert_eq!(json(&replay(&config, &["--pool", "rtapi"])).len(), 1);
    assert_eq!(json(&replay(&config, &["--kind", "heartbeat"])).len(), 1);
    assert_eq!(
        json(&replay(
            &config,
            &["--topic", "cache-keys", "--from-offset", "1"]
        ))
        .len(),
        2
    );

    // Why was object:1 invalidated? Its key list, the flush of its cache, the resync.
    let why = replay(&config, &["--why", "object:1", "--format", "table"]);
    assert_eq!(why.len(), 3, "{why:?}");
    assert!(
        why[0].contains("cache_keys")
            && why[0].contains("object:1")
            && why[0].starts_with(&rtinval_consumer::replay::format_ms(t0)),
        "{why:?}"
    );
    assert!(
        why[1].contains("cache_flush") && why[2].contains("resync"),
        "{why:?}"
    );
    // A resync invalidates every key; before it, nothing touched object:9 of cache "other".
    assert_eq!(
        replay(
            &config,
            &[
                "--why",
                "object:9",
                "--cache",
                "other",
                "--to-time",
                &(t0 + 3 * min).to_string()
            ]
        ),
        vec!["no event in the range invalidated object:9"]
    );

    // --apply --dry-run says what it would do; --apply does it.
    let dry = replay(&config, &["--kind", "cache_keys", "--apply", "--dry-run"]);
    assert!(
        dry[0].ends_with("would purge 2 key(s) from cache rt: object:1 object:2"),
        "{dry:?}"
    );
    let mut r = redis().await;
    let _: () = r.set(format!("{cache_prefix}object:3"), "v").await.unwrap();
    let applied = replay(&config, &["--key", "object:3", "--apply"]);
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert!(
        !r.exists::<_, bool>(format!("{cache_prefix}object:3"))
            .await
            .unwrap()
    );
}

/// Replay of what the real producer published: `--table`, `--gtid` (the transaction MariaDB
/// reports as `@@last_gtid`), `--key-prefix`, `--why` naming the transaction, and `--follow`
/// printing a change made after it started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_follows_and_filters_the_producers_events_by_table_and_transaction() {
    use mysql_async::prelude::Queryable;
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let db = rtinval_tests::TestDb::create(
        "replayp",
        "CREATE TABLE Object (id INT UNSIGNED NOT NULL PRIMARY KEY, name CHAR(255));\n\
         CREATE TABLE TagTree (id INT UNSIGNED NOT NULL PRIMARY KEY, tag CHAR(255))",
    )
    .await;
    let prefix = unique("replayp");
    let producer = rtinval_tests::start_producer(
        dir.path(),
        "producer",
        &producer_config(
            &db.name,
            &prefix,
            r#"
[producer]
heartbeat_ms = 200
[[rules]]
table = "Object"
cache = "rt"
keys = ["object:{id}", "object_name:{name}"]
[[rules]]
table = "TagTree"
reset_pools = ["rtapi"]
"#,
        ),
    );
    let config = dir.path().join("consumer.toml");
    std::fs::write(
        &config,
        consumer_config(
            &prefix,
            &format!("{prefix}-node"),
            "[pools.rtapi]\nreload = \"command\"\ncommand = [\"true\"]\n",
        ),
    )
    .unwrap();

    // Two transactions; the second one's GTID is read back from the server.
    let mut conn = db.pool.get_conn().await.unwrap();
    conn.query_drop("INSERT INTO Object VALUES (1, 'web-01'), (2, 'db-01')")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO TagTree VALUES (1, 'prod')")
        .await
        .unwrap();
    for stmt in [
        "BEGIN",
        "UPDATE Object SET name = 'web-02' WHERE id = 1",
        "INSERT INTO TagTree VALUES (2, 'dev')",
        "COMMIT",
    ] {
        conn.query_drop(stmt).await.unwrap();
    }
    let gtid: String = conn
        .query_first("SELECT @@last_gtid")
        .await
        .unwrap()
        .unwrap();
    assert!(!gtid.is_empty());

    // Wait until the producer published the last transaction (both of its events).
    let by_gtid = rtinval_tests::wait_sync(
        "the transaction's events",
        std::time::Duration::from_secs(30),
        || {
            let rows = json(&replay(&config, &["--gtid", &gtid]));
            (rows.len() == 2).then_some(rows)
        },
    );
    let kinds: std::collections::BTreeSet<&str> = by_gtid
        .iter()
        .map(|r| r["event"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["cache_keys", "pool_reset"].into(),
        "one transaction, both effects: {by_gtid:?}"
    );
    for r in &by_gtid {
        assert_eq!(r["event"]["source"]["gtid"], gtid.as_str());
    }

    // --table: the TagTree transactions' resets, and the second transaction touched both tables.
    let tagtree = json(&replay(&config, &["--table", "TagTree"]));
    assert_eq!(
        tagtree
            .iter()
            .filter(|r| r["event"]["kind"] == "pool_reset")
            .count(),
        2,
        "{tagtree:?}"
    );
    let objects = json(&replay(
        &config,
        &["--table", &format!("{}.Object", db.name)],
    ));
    assert_eq!(
        objects.len(),
        3,
        "two Object transactions, one mixed: {objects:?}"
    );

    // --key-prefix: the name keys of both Object transactions, old and new names.
    let names = json(&replay(&config, &["--key-prefix", "object_name:"]));
    let mut seen: Vec<String> = names
        .iter()
        .flat_map(|r| r["event"]["keys"].as_array().unwrap().clone())
        .filter_map(|k| k.as_str().map(str::to_owned))
        .filter(|k| k.starts_with("object_name:"))
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(
        seen,
        [
            "object_name:db-01",
            "object_name:web-01",
            "object_name:web-02"
        ]
    );

    // --why names the transaction that invalidated the key, oldest first: the producer's
    // start-up resync (a new checkpoint key), then the rename.
    let why = replay(
        &config,
        &["--why", "object_name:web-02", "--format", "table"],
    );
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why[0].contains("no_checkpoint"), "{why:?}");
    assert!(
        why[1].contains("cache_keys") && why[1].contains(&format!("gtid {gtid}")),
        "{why:?}"
    );

    // --follow prints what is published after it started, and keeps running.
    let mut follow = std::process::Command::new(rtinval_tests::bin("rtinval-consumer"))
        .arg("--config")
        .arg(&config)
        .arg("replay")
        .args([
            "--follow",
            "--table",
            "TagTree",
            "--kind",
            "pool_reset",
            "--format",
            "table",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The two existing TagTree resets first.
    for _ in 0..2 {
        let line = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
        assert!(line.contains("pool_reset"), "{line}");
    }
    conn.query_drop("INSERT INTO TagTree VALUES (3, 'new')")
        .await
        .unwrap();
    let new_gtid: String = conn
        .query_first("SELECT @@last_gtid")
        .await
        .unwrap()
        .unwrap();
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("--follow prints the new change");
    assert!(
        line.contains("pool_reset") && line.contains(&format!("gtid {new_gtid}")),
        "{line}"
    );
    assert!(
        follow.try_wait().unwrap().is_none(),
        "--follow keeps running"
    );
    follow.kill().unwrap();
    follow.wait().unwrap();
    drop(producer);
}
