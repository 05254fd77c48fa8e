//! The fill race, measured on the real stack (MariaDB, producer, tansu, consumer, Redis,
//! memcached): worker processes — two in Rust (`fill-worker`), two in PHP
//! (`clients/php/tests/fill_worker.php`) — write rows, wait on the node barrier, and read
//! through four caches at once: Redis and memcached, each once with the fill protocol and once
//! with plain fills (the same reads, stored with a SET instead of the marker check). A read
//! that returns a version older than one the same worker already committed and waited for is
//! stale. With the protocol: 0. With plain fills the same run shows the race (a reader that
//! loaded the row before the commit stores it after the purge), so the difference is
//! measured, not assumed. The inspector (`rtinval-consumer inspect`) runs beside: 0 violations
//! in the protocol caches, and it finds the plain caches' stale entries. At the end every
//! cache entry is compared with its row in MariaDB.
//!
//! Needs `scripts/stack up`, PHP with its redis, memcached and mysqli extensions, and release
//! builds of the producer, the consumer and `fill-worker` (`scripts/test` does all; the
//! rates are the product's, measured on release builds as they ship). Run alone:
//! `cargo test -p rtinval-tests --test fill_race -- --nocapture`. Its length:
//! `RTINVAL_FILL_RACE_SECS` (default 60).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use rtinval_client::protocol::Stored;
use rtinval_tests::{
    ConsumerProc, OwnedChild, Stack, TestDb, consumer_kafka_section, http_get, producer_config,
    release_bin, start_producer_with, unique, wait_sync, workspace_root,
};
use serde_json::{Value, json};

const ROWS: u64 = 200;
const SCHEMA: &str = "CREATE TABLE Object (id INT UNSIGNED NOT NULL PRIMARY KEY, name VARCHAR(64) NOT NULL, version INT UNSIGNED NOT NULL DEFAULT 0) ENGINE=InnoDB";

/// The four caches: (name, kind, fill protocol).
const CACHES: [(&str, &str, bool); 4] = [
    ("redis_protocol", "redis", true),
    ("redis_plain", "redis", false),
    ("memcached_protocol", "memcached", true),
    ("memcached_plain", "memcached", false),
];

fn config(db: &str, prefix: &str) -> String {
    let mut rules = String::new();
    for (name, _, _) in CACHES {
        rules.push_str(&format!(
            "\n[[rules]]\ntable = \"Object\"\ncache = \"{name}\"\nkeys = [\"object:{{id}}\"]\n"
        ));
    }
    producer_config(db, prefix, &rules)
}

fn cache_prefix(prefix: &str, name: &str) -> String {
    format!("{prefix}-{name}:")
}

fn cache_addr(kind: &str) -> String {
    let s = Stack::get();
    match kind {
        "redis" => s.redis_url.clone(),
        _ => s.memcached.clone(),
    }
}

/// Every cache purges with tombstones (`fill_protocol = true`): the "plain" caches differ only
/// in how the workers fill them (a SET without the marker check), so the comparison isolates
/// the check, and the inspector can judge both.
fn consumer_config(prefix: &str) -> String {
    let mut c = consumer_kafka_section(prefix);
    for (name, kind, _) in CACHES {
        c.push_str(&format!(
            "\n[caches.{name}]\nkind = \"{kind}\"\nurl = \"{}\"\nprefix = \"{}\"\nfill_protocol = true\n",
            cache_addr(kind),
            cache_prefix(prefix, name)
        ));
    }
    c
}

/// `mysql://user:password@host:port` → its parts (the PHP worker connects with mysqli).
fn mysql_parts(url: &str) -> (String, String, String, String) {
    let rest = url.trim_start_matches("mysql://");
    let (auth, host) = rest.split_once('@').unwrap();
    let (user, password) = auth.split_once(':').unwrap_or((auth, ""));
    let host = host.split('/').next().unwrap();
    let (h, p) = host.rsplit_once(':').unwrap_or((host, "3306"));
    (user.into(), password.into(), h.into(), p.into())
}

struct Load {
    writes: f64,
    reads: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_fill_protocol_no_worker_reads_data_older_than_its_own_waited_write() {
    let secs: u64 = std::env::var("RTINVAL_FILL_RACE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("fill_race", SCHEMA).await;
    let values: Vec<String> = (1..=ROWS).map(|i| format!("({i}, 'o{i}', 0)")).collect();
    db.exec(&format!(
        "INSERT INTO Object (id, name, version) VALUES {}",
        values.join(",")
    ))
    .await;
    let prefix = unique("fill");
    // Release builds: the rates are the product's, not a debug build's.
    let _producer = start_producer_with(
        dir.path(),
        "producer",
        &config(&db.name, &prefix),
        &release_bin("rtinval-producer"),
    );
    let mut node = ConsumerProc::start_logging(
        dir.path(),
        "consumer",
        &consumer_config(&prefix),
        &release_bin("rtinval-consumer"),
        "info",
    );
    node.wait_consuming();
    wait_sync("node ready", Duration::from_secs(30), || {
        http_get(&node.http, "/readyz")
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    });

    let stack = Stack::get();
    let (user, password, host, port) = mysql_parts(&stack.mysql_admin_url);
    let caches: Vec<Value> = CACHES
        .iter()
        .map(|(name, kind, protocol)| {
            json!({"name": name, "kind": kind, "addr": cache_addr(kind),
                   "prefix": cache_prefix(&prefix, name), "protocol": protocol})
        })
        .collect();
    // Rust workers: many concurrent requests; PHP workers: one at a time, as PHP-FPM runs.
    // Between the source read and the fill a background reader "thinks" (renders, runs other
    // queries): Rust readers up to 150 ms, longer than the purge takes to arrive, so plain
    // fills do land after purges, as slow requests do in production; PHP readers up to 20 ms.
    // A writer's own reads after its wait (at once, and Rust writers again 200 ms later, as a
    // user reloading the page) do not think.
    let spec = |name: &str,
                write_rate: f64,
                read_rate: f64,
                writers: u64,
                readers: u64,
                think_ms: u64,
                reread_ms: u64| {
        json!({
            "name": name,
            // Connections: each writer task holds one; the stack allows 1,000 in all.
            "mysql_url": format!("{}?pool_min=10&pool_max=180", db.url()),
            "mysql": {"host": host, "port": port, "user": user, "password": password, "db": db.name},
            "node": format!("http://{}", node.http),
            "caches": caches,
            "seconds": secs, "rows": ROWS, "write_rate": write_rate, "read_rate": read_rate,
            "writers": writers, "readers": readers, "think_ms": think_ms, "reread_ms": reread_ms, "ttl_ms": 300_000,
            "template": "object:{id}",
        })
        .to_string()
    };
    // The inspector, beside the load: checks every purged key 1 s after its purge.
    let inspector = OwnedChild::spawn(
        "the inspector",
        Command::new(release_bin("rtinval-consumer"))
            .arg("--config")
            .arg(dir.path().join("consumer.toml"))
            .args(["inspect", "--delay-ms", "1000", "--report-secs", "10"])
            .args(["--duration-secs", &(secs + 2).to_string()]),
    );
    let php = workspace_root().join("clients/php/tests/fill_worker.php");
    let mut children = Vec::new();
    for n in 0..2 {
        let s = spec(&format!("rust-{n}"), 180.0, 500.0, 150, 96, 150, 200);
        children.push(OwnedChild::spawn(
            "fill-worker",
            Command::new(release_bin("fill-worker")).arg(s),
        ));
    }
    for n in 0..2 {
        let s = spec(&format!("php-{n}"), 5.0, 100.0, 1, 1, 20, 0);
        children.push(OwnedChild::spawn(
            "php (scripts/test installs php-cli, php-redis, php-memcached, php-mysql)",
            Command::new("php").arg(&php).arg(s),
        ));
    }
    let mut reports = Vec::new();
    for c in children {
        let out = c.output().await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "a worker failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("worker report is not JSON ({e}): {stdout}"));
        println!("{report}");
        reports.push(report);
    }

    let out = inspector.output().await;
    let inspected_text = String::from_utf8_lossy(&out.stdout).into_owned();
    let inspected: Value = serde_json::from_str(inspected_text.trim()).unwrap_or_else(|e| {
        panic!(
            "inspector printed no report ({e}; exit {}): {inspected_text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    });

    // Totals per cache, and the load the run achieved.
    let sum = |field: &str, cache: &str| -> u64 {
        reports
            .iter()
            .map(|r| r[field][cache].as_u64().unwrap_or(0))
            .sum()
    };
    let total = |field: &str| -> u64 { reports.iter().map(|r| r[field].as_u64().unwrap()).sum() };
    let load = Load {
        writes: total("writes") as f64 / secs as f64,
        reads: CACHES.iter().map(|(c, _, _)| sum("reads", c)).sum::<u64>() as f64 / secs as f64,
    };
    let mut stale = BTreeMap::new();
    for (name, _, _) in CACHES {
        stale.insert(name, sum("stale", name));
        let t = &inspected["caches"][name];
        println!(
            "{name:<20} reads {:>7}  stale {:>5}  fills {:>6}  fills refused {:>5}  | inspector: {} of {} consistent, {} violations, {} unverifiable",
            sum("reads", name),
            sum("stale", name),
            sum("fills", name),
            sum("fills_rejected", name),
            t["consistent"],
            t["checked"],
            t["violations"],
            t["unverifiable"],
        );
    }
    println!(
        "load: {:.0} writes/s, {:.0} reads/s over {secs} s, {} workers (2 PHP); wait failures {}, errors {}",
        load.writes,
        load.reads,
        reports.len(),
        total("wait_failures"),
        total("errors")
    );

    // The end state: every protocol cache entry against its row.
    let mut conn = db.pool.get_conn().await.unwrap();
    let gtid: String = conn
        .query_first("SELECT @@gtid_binlog_pos")
        .await
        .unwrap()
        .unwrap();
    let (status, body) =
        http_get(&node.http, &format!("/wait?gtid={gtid}&timeout_ms=30000")).unwrap();
    assert_eq!(status, 200, "the node never reached the last write: {body}");
    let rows: Vec<(u64, u64)> = conn.query("SELECT id, version FROM Object").await.unwrap();
    let mut older = BTreeMap::new();
    for (name, kind, _) in CACHES {
        let mut n = 0;
        for (id, version) in &rows {
            let key = format!("{}object:{id}", cache_prefix(&prefix, name));
            let value = rtinval_tests::cache_value(kind, &key).await;
            let payload = match value.as_deref().map(Stored::parse) {
                Some(Stored::Data { payload, .. }) | Some(Stored::Foreign(payload)) => payload,
                _ => continue, // nothing, a tombstone or a lease: the next read goes to MariaDB
            };
            let cached: u64 = String::from_utf8_lossy(payload)
                .rsplit(':')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap();
            if cached < *version {
                n += 1;
            }
        }
        println!("{name:<20} entries older than their row at the end: {n}");
        older.insert(name, n);
    }

    let mut overlap = 0;
    for (name, _, protocol) in CACHES {
        let t = &inspected["caches"][name];
        let (checked, violations) = (
            t["checked"].as_u64().unwrap_or(0),
            t["violations"].as_u64().unwrap_or(0),
        );
        assert!(checked > 0, "the inspector checked no key of {name}");
        if protocol {
            let listed: Vec<&str> = inspected["violations"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .filter(|v| v.starts_with(&format!("{name} ")))
                .collect();
            assert_eq!(violations, 0, "inspector violations in {name}: {listed:?}");
        } else if stale[name] > 0 {
            // The same entries: keys the workers read stale that the inspector reported. Not
            // every one: an entry overwritten by the key's next purge within the inspector's
            // delay is gone before it looks, and the inspector also sees stale entries that no
            // worker happened to read.
            let read_stale: std::collections::BTreeSet<String> = reports
                .iter()
                .filter_map(|r| r["stale_keys"][name].as_array())
                .flatten()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect();
            let found: std::collections::BTreeSet<String> = inspected["violations"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|v| v.as_str())
                .filter_map(|v| v.strip_prefix(&format!("{name} ")))
                .filter_map(|v| v.split(' ').next().map(str::to_owned))
                .collect();
            let both = read_stale.intersection(&found).count();
            println!(
                "{name:<20} keys read stale: {}, reported by the inspector: {}, both: {both}",
                read_stale.len(),
                found.len()
            );
            overlap += both;
            assert!(
                violations > 0,
                "the workers read stale data from {name} but the inspector found no violation there"
            );
        }
    }
    assert!(
        overlap > 0,
        "the inspector reported none of the entries the workers read stale"
    );
    assert_eq!(total("wait_failures"), 0, "every wait must succeed");
    assert_eq!(total("errors"), 0, "no worker may see errors");
    assert_eq!(
        stale["redis_protocol"], 0,
        "stale reads through the Redis fill protocol"
    );
    assert_eq!(
        stale["memcached_protocol"], 0,
        "stale reads through the memcached fill protocol"
    );
    assert_eq!(
        older["redis_protocol"], 0,
        "Redis protocol entries older than their row"
    );
    assert_eq!(
        older["memcached_protocol"], 0,
        "memcached protocol entries older than their row"
    );
    // Without the protocol the race must show, or this run proves nothing about it.
    assert!(
        stale["redis_plain"] + stale["memcached_plain"] > 0,
        "plain fills produced no stale read: the run did not exercise the race"
    );
    assert!(
        load.writes >= 200.0,
        "write rate {:.0}/s below 200/s",
        load.writes
    );
    assert!(
        load.reads >= 2000.0,
        "read rate {:.0}/s below 2,000/s",
        load.reads
    );
}
