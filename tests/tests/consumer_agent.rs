//! The consumer agent's life as an operator sees it: freshness from heartbeats, `/readyz`,
//! SIGHUP re-validating the config, SIGTERM stopping cleanly. Reloads, purges and continuity
//! have files of their own (`consumer_reloads.rs`, `consumer_purges.rs`,
//! `consumer_continuity.rs`). Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test consumer_agent`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;
use rtinval_tests::{
    Bus, ConsumerProc, StandInPool, assert_no_resync, consumer_kafka_section as kafka_section,
    http_get, signal_pool, unique, wait_sync,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freshness_readiness_sighup_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("fresh");
    let bus = Bus::new(&prefix).await;
    let pool = StandInPool::start(dir.path(), "pool");
    let config = format!(
        "{}[node]\nmax_staleness_secs = 2\n{}",
        kafka_section(&prefix),
        signal_pool("rtapi", &pool, 20, 200)
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    let (status, body) = http_get(&c.http, "/readyz").unwrap();
    assert_eq!(
        (status, body.trim()),
        (503, "not ready: no heartbeat from the producer yet")
    );

    bus.publish(EventBody::Heartbeat {
        source_time: rtinval_schemas::runtime::now_ms(),
    })
    .await;
    wait_sync("ready after a heartbeat", Duration::from_secs(10), || {
        http_get(&c.http, "/readyz")
            .filter(|(s, _)| *s == 200)
            .map(|_| ())
    });
    let staleness = c.metric("rtinval_consumer_staleness_seconds");
    assert!((0.0..2.0).contains(&staleness), "{staleness}");
    // No heartbeat for longer than the bound: not ready, saying why.
    wait_sync("not ready when stale", Duration::from_secs(10), || {
        http_get(&c.http, "/readyz")
            .filter(|(s, b)| *s == 503 && b.contains("stale"))
            .map(|_| ())
    });

    // SIGHUP re-validates the config file and keeps running.
    std::process::Command::new("kill")
        .arg("-HUP")
        .arg(c.proc.pid().to_string())
        .status()
        .unwrap();
    wait_sync("SIGHUP logged", Duration::from_secs(10), || {
        c.proc
            .log_text()
            .contains("SIGHUP: config is valid")
            .then_some(())
    });
    assert!(c.proc.try_exit().is_none());
    // A broken file: SIGHUP names the problem, and the node keeps running on what it loaded.
    let path = dir.path().join("consumer.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{good}\n[pools.broken]\nreload = \"signal\"\n"),
    )
    .unwrap();
    std::process::Command::new("kill")
        .arg("-HUP")
        .arg(c.proc.pid().to_string())
        .status()
        .unwrap();
    let line = wait_sync(
        "SIGHUP on a broken file logged",
        Duration::from_secs(10),
        || {
            c.proc
                .log_text()
                .lines()
                .find(|l| l.contains("SIGHUP: config is NOT valid"))
                .map(str::to_owned)
        },
    );
    assert!(
        line.contains("broken") && line.contains("pidfile"),
        "{line}"
    );
    assert!(c.proc.try_exit().is_none());
    std::fs::write(&path, good).unwrap();

    // SIGTERM: exits 0 promptly, offsets committed: a restart does not resync again.
    bus.publish(EventBody::PoolReset {
        pools: vec!["rtapi".into()],
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"pool_reset\"}",
        1.0,
        Duration::from_secs(20),
    );
    let t = Instant::now();
    let status = c
        .proc
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    println!("consumer stopped {:?} after SIGTERM", t.elapsed());
    assert!(c.proc.log_text().contains("Offsets committed."));
    let mut again = ConsumerProc::start(dir.path(), "consumer-again", &config);
    again.wait_consuming();
    assert_no_resync(&again);
}
