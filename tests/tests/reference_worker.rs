//! The reference API worker (`examples/rtapi`, PHP) on RackTables' own schema with the shipped
//! rule set: objects, ports and IPv4 allocations read through the node's Redis with the fill
//! protocol; a write through the worker returns once this node purged it, and the read right
//! after it is fresh; writes from elsewhere (SQL) are fresh after the node barrier too. The pool
//! runs as the consumer's `rtapi` pool (reload by USR2).
//!
//! Needs `scripts/stack up`, PHP with its redis and mysqli extensions, and the binaries built
//! (`scripts/test` does all).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use rtinval_tests::{
    ConsumerProc, Proc, Stack, TestDb, consumer_kafka_section, free_port, http_get, http_request,
    racktables_producer_config, start_producer, unique, wait_sync, workspace_root,
};
use serde_json::Value;

const SCHEMA: &str = include_str!("../fixtures/racktables/racktables-0.22.sql");

/// One request to the worker; a failure shows the worker's log.
fn api(addr: &str, log: &std::path::Path, method: &str, path: &str) -> Value {
    let (status, body) = http_request(addr, method, path).unwrap_or_else(|| {
        panic!(
            "rtapi did not answer {method} {path}; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    });
    assert_eq!(status, 200, "{method} {path}: {body}");
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_right_after_a_write_through_the_reference_worker_is_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::create("rtapi", SCHEMA).await;
    // Port's interface types are reference data the test does not need: checks off for the
    // set-up only.
    db.exec(
        "SET foreign_key_checks = 0;
         INSERT INTO Object (id, name, label, objtype_id) VALUES (7001, 'web-01', 'front', 4);
         INSERT INTO Port (id, object_id, name, iif_id, type, label) VALUES (9001, 7001, 'eth0', 1, 24, 'uplink');
         INSERT INTO IPv4Allocation (object_id, ip, name, type) VALUES (7001, 167772161, 'web-01 eth0', 'regular')",
    )
    .await;
    let prefix = unique("rtapi");
    let _producer = start_producer(
        dir.path(),
        "producer",
        &racktables_producer_config(&db.name, &prefix, |_| {}),
    );
    let stack = Stack::get();
    let cache_prefix = format!("{prefix}:rt:");
    let pidfile = dir.path().join("rtapi.pid");
    let config = format!(
        "{}\n[pools.rtapi]\nreload = \"signal\"\npidfile = \"{}\"\nsignal = \"USR2\"\ndebounce_ms = 50\nmax_delay_ms = 200\n\n\
         [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{cache_prefix}\"\nfill_protocol = true\n",
        consumer_kafka_section(&prefix),
        pidfile.display(),
        stack.redis_url
    );
    // The pool starts beside the consumer: the consumer's start-up resync reloads it.
    let mut node = ConsumerProc::start(dir.path(), "consumer", &config);

    let port = free_port();
    let rtapi = format!("127.0.0.1:{port}");
    let (user, rest) = stack
        .mysql_admin_url
        .trim_start_matches("mysql://")
        .split_once('@')
        .unwrap();
    let (user, password) = user.split_once(':').unwrap();
    let log = dir.path().join("rtapi.log");
    let _pool = Proc::spawn(
        "rtapi",
        Command::new(workspace_root().join("examples/rtapi/pool.sh"))
            .args([&rtapi, pidfile.to_str().unwrap(), "3"])
            .env(
                "RTAPI_DB",
                format!(
                    "{}:{user}:{password}:{}",
                    rest.split('/').next().unwrap(),
                    db.name
                ),
            )
            .env(
                "RTAPI_REDIS",
                stack
                    .redis_url
                    .trim_start_matches("redis://")
                    .trim_end_matches('/'),
            )
            .env("RTAPI_PREFIX", &cache_prefix)
            .env("RTAPI_NODE", format!("http://{}", node.http))
            .env("RTAPI_LOG", &log),
        dir.path().join("rtapi.out"),
    );
    node.wait_consuming();
    wait_sync("rtapi listening", Duration::from_secs(30), || {
        http_get(&rtapi, "/").map(|_| ())
    });
    wait_sync("node ready", Duration::from_secs(30), || {
        http_get(&node.http, "/readyz")
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    });

    // Reads through the node cache: a miss fills, the next read hits.
    let first = api(&rtapi, &log, "GET", "/object/7001");
    assert_eq!(first["cache"], "miss");
    assert_eq!(first["data"]["name"], "web-01");
    assert_eq!(api(&rtapi, &log, "GET", "/object/7001")["cache"], "hit");
    assert_eq!(
        api(&rtapi, &log, "GET", "/port/9001")["data"]["label"],
        "uplink"
    );
    assert_eq!(api(&rtapi, &log, "GET", "/port/9001")["cache"], "hit");
    let ip = api(&rtapi, &log, "GET", "/ipv4/10.0.0.1");
    assert_eq!(ip["data"][0]["name"], "web-01 eth0");
    assert_eq!(api(&rtapi, &log, "GET", "/ipv4/10.0.0.1")["cache"], "hit");

    // A write through the worker, then the read at once: the new name, every time.
    for n in 0..20 {
        let name = format!("web-01-r{n}");
        let w = api(&rtapi, &log, "POST", &format!("/object/7001?name={name}"));
        assert_eq!(w["invalidated"], true, "{w}");
        let r = api(&rtapi, &log, "GET", "/object/7001");
        assert_eq!(
            r["data"]["name"],
            name.as_str(),
            "stale read after write {n}: {r}"
        );
    }

    // Writes from elsewhere (a script, RackTables' UI): fresh once the node barrier passed.
    let mut conn = db.pool.get_conn().await.unwrap();
    for (sql, path, field, want) in [
        (
            "UPDATE Port SET label = 'core uplink' WHERE id = 9001",
            "/port/9001",
            "label",
            "core uplink",
        ),
        (
            "UPDATE IPv4Allocation SET name = 'web-01 vip' WHERE object_id = 7001 AND ip = 167772161",
            "/ipv4/10.0.0.1",
            "name",
            "web-01 vip",
        ),
    ] {
        conn.query_drop(sql).await.unwrap();
        let gtid: String = conn
            .query_first("SELECT @@last_gtid")
            .await
            .unwrap()
            .unwrap();
        let (status, body) =
            http_get(&node.http, &format!("/wait?gtid={gtid}&timeout_ms=10000")).unwrap();
        assert_eq!(status, 200, "{body}");
        let r = api(&rtapi, &log, "GET", path);
        let got = if r["data"].is_array() {
            &r["data"][0][field]
        } else {
            &r["data"][field]
        };
        assert_eq!(got, want, "{path} after {sql}: {r}");
    }

    // The consumer reloads the pool (USR2) on the Object rule's pool resets.
    let reloads = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        reloads.matches("rtapi: reload").count() >= 2,
        "the pool was not reloaded:\n{reloads}"
    );
}
