//! The consumer agent reloads pools: by signal, command and HTTP, retrying until a reload
//! succeeds; an offset is committed only after its reload; a burst of resets coalesces into a
//! few reloads; SIGTERM finishes the reload in flight. The test publishes events to the tansu
//! broker itself (playing the producer) and watches a real `rtinval-consumer` and stand-in
//! pools. Needs `scripts/stack up` and the binaries built (`scripts/test` does both).
//! Run alone: `cargo test -p rtinval-tests --test consumer_reloads`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;
use rtinval_tests::{
    Bus, ConsumerProc, StandInPool, assert_no_resync, consumer_kafka_section as kafka_section,
    reload_endpoint, signal_pool, unique, wait_sync,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaders_signal_command_and_http_retry_until_success() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("reloaders");
    let bus = Bus::new(&prefix).await;
    let sig = StandInPool::start(dir.path(), "sig");
    let cmd_log = dir.path().join("cmd.log");
    let once = dir.path().join("cmd.failed-once");
    // Fails the first time (like a busy systemctl), succeeds after.
    let script = format!(
        "if [ -e {o} ]; then echo reloaded >> {l}; else touch {o}; exit 3; fi",
        o = once.display(),
        l = cmd_log.display()
    );
    let (url, hits) = reload_endpoint(1);
    let config = format!(
        "{}{}[pools.cmd]\nreload = \"command\"\ncommand = [\"bash\", \"-c\", {script:?}]\ntimeout_secs = 5\ndebounce_ms = 50\n\n\
         [pools.web]\nreload = \"http\"\nurl = \"{url}\"\ndebounce_ms = 50\n",
        kafka_section(&prefix),
        signal_pool("sig", &sig, 50, 500)
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    // The initial resync (new group) reloaded each pool once; the failures came then.
    wait_sync("initial reloads", Duration::from_secs(20), || {
        (sig.reloads() == 1
            && std::fs::read_to_string(&cmd_log).is_ok_and(|s| s.lines().count() == 1)
            && hits.load(Ordering::SeqCst) == 2)
            .then_some(())
    });
    assert!(c.metric("rtinval_consumer_pool_reload_failures_total{pool=\"cmd\"}") >= 1.0);
    assert!(c.metric("rtinval_consumer_pool_reload_failures_total{pool=\"web\"}") >= 1.0);
    assert!(
        c.proc.log_text().contains("exited with exit status: 3"),
        "the failure is logged with its cause"
    );

    bus.publish(EventBody::PoolReset {
        pools: vec!["sig".into()],
    })
    .await;
    bus.publish(EventBody::PoolReset {
        pools: vec!["cmd".into()],
    })
    .await;
    bus.publish(EventBody::PoolReset {
        pools: vec!["web".into()],
    })
    .await;
    bus.publish(EventBody::PoolReset {
        pools: vec!["not-on-this-node".into()],
    })
    .await;
    wait_sync("one reload per pool", Duration::from_secs(20), || {
        (sig.reloads() == 2
            && std::fs::read_to_string(&cmd_log).is_ok_and(|s| s.lines().count() == 2)
            && hits.load(Ordering::SeqCst) == 3)
            .then_some(())
    });
    c.wait_metric(
        "rtinval_consumer_events_not_here_total",
        1.0,
        Duration::from_secs(10),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_is_committed_only_after_the_reload_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("commit");
    let bus = Bus::new(&prefix).await;
    let log = dir.path().join("reloads.log");
    let pool = |cmd: &str| {
        format!(
            "{}[pools.p]\nreload = \"command\"\ncommand = [\"bash\", \"-c\", {cmd:?}]\ntimeout_secs = 5\ndebounce_ms = 20\nmax_delay_ms = 200\n",
            kafka_section(&prefix)
        )
    };
    let works = format!("echo ok >> {}", log.display());
    // Start once with a working reloader so the group has committed offsets.
    let mut c = ConsumerProc::start(dir.path(), "first", &pool(&works));
    c.wait_consuming();
    wait_sync("initial resync reload", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .is_ok_and(|s| s.lines().count() == 1)
            .then_some(())
    });
    assert_eq!(
        c.proc
            .terminate(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0)
    );

    // Now the reload keeps failing: the event is received but not applied, so not committed.
    let mut c = ConsumerProc::start(dir.path(), "failing", &pool("exit 1"));
    c.wait_consuming();
    bus.publish(EventBody::PoolReset {
        pools: vec!["p".into()],
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_pool_reload_failures_total{pool=\"p\"}",
        2.0,
        Duration::from_secs(20),
    );
    assert_eq!(
        c.proc
            .terminate(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0)
    );
    assert_no_resync(&c);

    // With a working reloader again, the restarted node re-reads the uncommitted event.
    let mut c = ConsumerProc::start(dir.path(), "fixed", &pool(&works));
    c.wait_consuming();
    wait_sync(
        "the uncommitted reset applied after restart",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .is_ok_and(|s| s.lines().count() == 2)
                .then_some(())
        },
    );
    c.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"pool_reset\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert_no_resync(&c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_resets_in_one_second_cause_a_few_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("burst");
    let bus = Bus::new(&prefix).await;
    let pool = StandInPool::start(dir.path(), "pool");
    let config = format!(
        "{}{}",
        kafka_section(&prefix),
        signal_pool("rtapi", &pool, 200, 1000)
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    wait_sync("initial resync reload", Duration::from_secs(10), || {
        (pool.reloads() == 1).then_some(())
    });

    let start = Instant::now();
    for batch in 0..10 {
        for _ in 0..1000 {
            bus.enqueue(EventBody::PoolReset {
                pools: vec!["rtapi".into()],
            });
        }
        let next = start + Duration::from_millis(100 * (batch + 1));
        tokio::time::sleep(next.saturating_duration_since(Instant::now())).await;
    }
    bus.flush();
    let last_event = std::time::SystemTime::now();
    c.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"pool_reset\"}",
        10_000.0,
        Duration::from_secs(60),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reloads = pool.reloads() - 1;
    println!(
        "10,000 pool_reset events over {:?}: {reloads} reloads",
        last_event
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|_| start.elapsed())
    );
    assert!(
        (1..=5).contains(&reloads),
        "{reloads} reloads for a 10,000-event burst"
    );
    // The last reload happened after the last event was published.
    let text = std::fs::read_to_string(&pool.reload_log).unwrap();
    let last_reload: f64 = text
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let last_event_s = last_event
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        last_reload >= last_event_s - 0.05,
        "last reload {last_reload} before last event {last_event_s}"
    );
    assert_eq!(
        c.metric("rtinval_consumer_pool_reload_requests_total{pool=\"rtapi\"}"),
        10_001.0,
        "every request was counted"
    );
}

/// SIGTERM while a reload runs: the reload finishes, its offset is committed, the process
/// exits 0, and the restarted node neither reloads again nor resyncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_reload_in_flight_and_commits_it() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("sigterm");
    let bus = Bus::new(&prefix).await;
    let started = dir.path().join("started");
    let done = dir.path().join("done.log");
    // Each reload: mark the start, take 2 s, then record completion.
    let script = format!(
        "touch {s}; sleep 2; echo done >> {d}",
        s = started.display(),
        d = done.display()
    );
    let config = format!(
        "{}[pools.slow]\nreload = \"command\"\ncommand = [\"bash\", \"-c\", {script:?}]\ntimeout_secs = 10\ndebounce_ms = 10\nmax_delay_ms = 100\n",
        kafka_section(&prefix)
    );
    let lines = || std::fs::read_to_string(&done).map_or(0, |s| s.lines().count());
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    wait_sync(
        "the start-up resync's reload",
        Duration::from_secs(20),
        || (lines() == 1).then_some(()),
    );
    std::fs::remove_file(&started).unwrap();

    bus.publish(EventBody::PoolReset {
        pools: vec!["slow".into()],
    })
    .await;
    wait_sync("the reload started", Duration::from_secs(20), || {
        started.exists().then_some(())
    });
    let t = Instant::now();
    let status = c
        .proc
        .terminate(Duration::from_secs(15))
        .expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", c.proc.log_text());
    assert_eq!(lines(), 2, "the reload in flight finished before the exit");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopped within the bound: {:?}",
        t.elapsed()
    );
    assert!(c.proc.log_text().contains("Offsets committed."));

    // The restarted node starts after the applied event: nothing to reload, nothing to resync.
    let mut again = ConsumerProc::start(dir.path(), "again", &config);
    again.wait_consuming();
    bus.publish(EventBody::Heartbeat { source_time: 1 }).await;
    again.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"heartbeat\"}",
        1.0,
        Duration::from_secs(20),
    );
    assert_eq!(lines(), 2, "the committed reset is not applied again");
    assert_eq!(
        again.metric("rtinval_consumer_events_applied_total{kind=\"pool_reset\"}"),
        0.0
    );
    assert_no_resync(&again);
}
