//! Proves the consumer agent's behaviour against real services and real child processes: the
//! test publishes events to the tansu broker itself (playing the producer) and watches a real
//! `rtinval-consumer` process reload stand-in pools (signal, command, HTTP), purge Redis and
//! memcached, coalesce bursts, resync on every kind of lost continuity, report freshness and
//! stop cleanly. Needs `scripts/stack up` and the binaries built (`scripts/test` does both).
//! Run alone: `cargo test -p rtinval-tests --test consumer_agent`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use rtinval_schemas::EventBody;
use rtinval_tests::{
    Bus, ConsumerProc, Stack, StandInPool, http_get, redis, unique, wait_for, wait_sync,
};

fn kafka_section(prefix: &str) -> String {
    rtinval_tests::consumer_kafka_section(prefix)
}

fn signal_pool(name: &str, pool: &StandInPool, debounce_ms: u64, max_delay_ms: u64) -> String {
    format!(
        "[pools.{name}]\nreload = \"signal\"\npidfile = \"{}\"\ndebounce_ms = {debounce_ms}\nmax_delay_ms = {max_delay_ms}\n",
        pool.pidfile.display()
    )
}

fn redis_cache(name: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[caches.{name}]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}\"\n{extra}\n",
        Stack::get().redis_url
    )
}

/// A tiny HTTP server that answers the first `fail_first` requests with 500, then 204.
fn reload_endpoint(fail_first: usize) -> (String, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/reload", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let n = h.fetch_add(1, Ordering::SeqCst);
            let status = if n < fail_first {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
    });
    (url, hits)
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purgers_redis_memcached_flushes_and_the_second_purge() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("purge");
    let bus = Bus::new(&prefix).await;
    let (rp, rs, mp) = (
        format!("{prefix}:rp:"),
        format!("{prefix}:rs:"),
        format!("{prefix}:mc:"),
    );
    // A cache that owns Redis database 7 (only this test uses it) flushes with FLUSHDB.
    let db7 = format!("{}/7", Stack::get().redis_url);
    let config = format!(
        "{}{}{}[caches.mc]\nkind = \"memcached\"\nurl = \"memcached://{}\"\nprefix = \"{mp}\"\n\n\
         [caches.own]\nkind = \"redis\"\nurl = \"{db7}\"\nflush = \"flushdb\"\n",
        kafka_section(&prefix),
        redis_cache("rp", &rp, ""),
        redis_cache("rs", &rs, "second_purge_ms = 700"),
        Stack::get().memcached
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();

    let mut r = redis().await;
    let mut mc = async_memcached_client().await;
    for k in ["a", "b", "keep"] {
        let _: () = r.set(format!("{rp}{k}"), "v").await.unwrap();
        mc_set(&mut mc, &format!("{mp}{k}")).await;
    }
    let unrelated = format!("{prefix}:unrelated");
    let _: () = r.set(&unrelated, "v").await.unwrap();

    // Keys: deleted; a missing key counts as purged.
    bus.publish(EventBody::CacheKeys {
        cache: "rp".into(),
        keys: vec!["a".into(), "b".into(), "never-set".into()],
    })
    .await;
    bus.publish(EventBody::CacheKeys {
        cache: "mc".into(),
        keys: vec!["a".into(), "b".into()],
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_keys_purged_total{cache=\"rp\"}",
        3.0,
        Duration::from_secs(20),
    );
    c.wait_metric(
        "rtinval_consumer_keys_purged_total{cache=\"mc\"}",
        2.0,
        Duration::from_secs(20),
    );
    let left: usize = r
        .exists(&[format!("{rp}a"), format!("{rp}b")])
        .await
        .unwrap();
    assert_eq!(left, 0);
    assert!(r.exists::<_, bool>(format!("{rp}keep")).await.unwrap());
    assert!(mc_get(&mut mc, &format!("{mp}a")).await.is_none());
    assert!(mc_get(&mut mc, &format!("{mp}keep")).await.is_some());

    // The second purge removes a value written back after the first purge (the race).
    let raced = format!("{rs}object:1");
    let _: () = r.set(&raced, "old").await.unwrap();
    bus.publish(EventBody::CacheKeys {
        cache: "rs".into(),
        keys: vec!["object:1".into()],
    })
    .await;
    wait_for("first purge", Duration::from_secs(20), || {
        let mut r = r.clone();
        let k = raced.clone();
        async move { (!r.exists::<_, bool>(&k).await.unwrap()).then_some(()) }
    })
    .await;
    let _: () = r.set(&raced, "stale write-back").await.unwrap();
    c.wait_metric(
        "rtinval_consumer_second_purges_total",
        1.0,
        Duration::from_secs(10),
    );
    assert!(
        !r.exists::<_, bool>(&raced).await.unwrap(),
        "the second purge removed the write-back"
    );

    // A flush clears the cache's keys only (Redis: by prefix), memcached flushes everything.
    bus.publish(EventBody::CacheFlush {
        cache: "rp".into(),
        reason: "too_many_keys".into(),
    })
    .await;
    bus.publish(EventBody::CacheFlush {
        cache: "mc".into(),
        reason: "key_underivable".into(),
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_cache_flushes_total{cache=\"rp\"}",
        2.0,
        Duration::from_secs(20),
    );
    c.wait_metric(
        "rtinval_consumer_cache_flushes_total{cache=\"mc\"}",
        2.0,
        Duration::from_secs(20),
    );
    assert!(!r.exists::<_, bool>(format!("{rp}keep")).await.unwrap());
    assert!(
        r.exists::<_, bool>(&unrelated).await.unwrap(),
        "a prefix flush leaves other keys alone"
    );
    assert!(mc_get(&mut mc, &format!("{mp}keep")).await.is_none());

    // FLUSHDB empties the cache's own database and nothing else.
    let mut own = redis::Client::open(db7.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = own.set("object:1", "v").await.unwrap();
    bus.publish(EventBody::CacheFlush {
        cache: "own".into(),
        reason: "too_many_keys".into(),
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_cache_flushes_total{cache=\"own\"}",
        2.0,
        Duration::from_secs(20),
    );
    let size: usize = redis::cmd("DBSIZE").query_async(&mut own).await.unwrap();
    assert_eq!(size, 0);
    assert!(
        r.exists::<_, bool>(&unrelated).await.unwrap(),
        "database 0 untouched by FLUSHDB on 7"
    );

    // A key memcached cannot address (a space) flushes the cache instead of being skipped.
    mc_set(&mut mc, &format!("{mp}x")).await;
    bus.publish(EventBody::CacheKeys {
        cache: "mc".into(),
        keys: vec!["has space".into()],
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_cache_flushes_total{cache=\"mc\"}",
        3.0,
        Duration::from_secs(20),
    );
    assert!(mc_get(&mut mc, &format!("{mp}x")).await.is_none());
}

async fn async_memcached_client() -> async_memcached::Client {
    async_memcached::Client::new(format!("tcp://{}", Stack::get().memcached))
        .await
        .expect("memcached")
}

async fn mc_set(c: &mut async_memcached::Client, key: &str) {
    use async_memcached::AsciiProtocol;
    c.set(key, "v", None, None).await.expect("memcached set");
}

async fn mc_get(c: &mut async_memcached::Client, key: &str) -> Option<Vec<u8>> {
    use async_memcached::AsciiProtocol;
    c.get(key)
        .await
        .expect("memcached get")
        .and_then(|v| v.data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_loss_of_continuity_resyncs_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("resync");
    let bus = Bus::new(&prefix).await;
    let pool = StandInPool::start(dir.path(), "pool");
    let dlq = format!("{prefix}.dead-letter");
    let cache_prefix = format!("{prefix}:c:");
    let config = format!(
        "{}dead_letter_topic = \"{dlq}\"\n{}{}",
        kafka_section(&prefix),
        signal_pool("rtapi", &pool, 20, 200),
        redis_cache("rt", &cache_prefix, "")
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    c.wait_metric(
        "rtinval_consumer_resyncs_total{reason=\"no_committed_offset\"}",
        1.0,
        Duration::from_secs(10),
    );
    wait_sync("initial reload", Duration::from_secs(10), || {
        (pool.reloads() == 1).then_some(())
    });
    let mut r = redis().await;
    let seed = |n: usize| format!("{cache_prefix}seed{n}");

    // Garbage, an unknown schema version, and the producer's resync: each resyncs.
    let cases: [(&str, Vec<u8>, &str); 3] = [
        ("garbage", b"\x00\x01 not json".to_vec(), "undecodable"),
        (
            "future version",
            serde_json::to_vec(
                &serde_json::json!({"schema_version": 99, "id": "x", "kind": "pool_reset"}),
            )
            .unwrap(),
            "undecodable",
        ),
        (
            "producer resync",
            Bus::event(EventBody::Resync {
                reason: "position_lost".into(),
            })
            .to_json(),
            "producer",
        ),
    ];
    let mut undecodable = 0.0;
    for (n, (what, payload, reason)) in cases.into_iter().enumerate() {
        let _: () = r.set(seed(n), "v").await.unwrap();
        let before = pool.reloads();
        bus.raw(&format!("{prefix}.pool-reset"), &payload).await;
        wait_sync(
            &format!("reload after {what}"),
            Duration::from_secs(20),
            || (pool.reloads() > before).then_some(()),
        );
        wait_for(
            &format!("cache flushed after {what}"),
            Duration::from_secs(20),
            || {
                let mut r = r.clone();
                let k = seed(n);
                async move { (!r.exists::<_, bool>(&k).await.unwrap()).then_some(()) }
            },
        )
        .await;
        if reason == "undecodable" {
            undecodable += 1.0;
        }
        c.wait_metric(
            &format!("rtinval_consumer_resyncs_total{{reason=\"{reason}\"}}"),
            if reason == "undecodable" {
                undecodable
            } else {
                1.0
            },
            Duration::from_secs(10),
        );
    }
    assert_eq!(c.metric("rtinval_consumer_decode_errors_total"), 2.0);

    // The poison messages are in the dead-letter topic, with where they came from.
    let dead = read_topic(&dlq, 2).await;
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].0, b"\x00\x01 not json");
    assert!(
        dead[0]
            .1
            .iter()
            .any(|(k, v)| k == "rtinval-origin-topic" && v == &format!("{prefix}.pool-reset"))
    );
    assert!(
        dead[1]
            .1
            .iter()
            .any(|(k, v)| k == "rtinval-error" && v.contains("unsupported schema_version 99"))
    );
}

/// Read `n` messages (payload, headers) from the start of partition 0 of `topic`.
async fn read_topic(topic: &str, n: usize) -> Vec<(Vec<u8>, Vec<(String, String)>)> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &Stack::get().brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
            .await
            .expect("message in time")
            .unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((m.payload().unwrap_or_default().to_vec(), headers));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_out_of_range_resyncs_instead_of_skipping() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("range");
    let bus = Bus::new(&prefix).await;
    bus.publish(EventBody::PoolReset {
        pools: vec!["rtapi".into()],
    })
    .await;
    // The group's committed offsets point far beyond the data (as after a topic was recreated).
    let group: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &Stack::get().brokers)
        .set("group.id", format!("{prefix}-node"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for t in ["pool-reset", "cache-keys"] {
        tpl.add_partition_offset(
            &format!("{prefix}.{t}"),
            0,
            rdkafka::Offset::Offset(1_000_000),
        )
        .unwrap();
    }
    group.commit(&tpl, CommitMode::Sync).unwrap();
    drop(group);

    let pool = StandInPool::start(dir.path(), "pool");
    let config = format!(
        "{}{}",
        kafka_section(&prefix),
        signal_pool("rtapi", &pool, 20, 200)
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_up();
    c.wait_metric(
        "rtinval_consumer_resyncs_total{reason=\"offset_out_of_range\"}",
        1.0,
        Duration::from_secs(30),
    );
    assert_eq!(
        c.metric("rtinval_consumer_resyncs_total{reason=\"no_committed_offset\"}"),
        0.0
    );
    wait_sync("resync reload", Duration::from_secs(10), || {
        (pool.reloads() >= 1).then_some(())
    });
    // And it goes on consuming from the current end.
    let before = pool.reloads();
    bus.publish(EventBody::PoolReset {
        pools: vec!["rtapi".into()],
    })
    .await;
    wait_sync("reload after a new event", Duration::from_secs(20), || {
        (pool.reloads() > before).then_some(())
    });
}

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
        source_time: rtinval_consumer::now_ms(),
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

/// A restarted node resumes right after the last message it applied: what was published while
/// it was down is applied, none of it skipped, and no resync hides a skip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_resumes_right_after_the_last_applied_message() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("resume");
    let bus = Bus::new(&prefix).await;
    let cache_prefix = format!("{prefix}:");
    let config = format!(
        "{}{}",
        kafka_section(&prefix),
        redis_cache("rt", &cache_prefix, "")
    );
    let mut r = redis().await;
    let key = |k: &str| format!("{cache_prefix}{k}");
    let keys = |names: &[&str]| EventBody::CacheKeys {
        cache: "rt".into(),
        keys: names.iter().map(|k| (*k).to_owned()).collect(),
    };

    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    let _: () = r.set(key("a"), "v").await.unwrap();
    bus.publish(keys(&["a"])).await;
    wait_for("a purged", Duration::from_secs(20), || {
        let mut r = r.clone();
        let k = key("a");
        async move { (!r.exists::<_, bool>(k).await.unwrap()).then_some(()) }
    })
    .await;
    c.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"cache_keys\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert_eq!(
        c.proc
            .terminate(Duration::from_secs(15))
            .and_then(|s| s.code()),
        Some(0)
    );

    // While the node is down: three more messages, one key each, and a key no event names.
    for k in ["b", "c", "d", "untouched"] {
        let _: () = r.set(key(k), "v").await.unwrap();
    }
    for k in ["b", "c", "d"] {
        bus.publish(keys(&[k])).await;
    }

    let mut again = ConsumerProc::start(dir.path(), "again", &config);
    again.wait_consuming();
    again.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"cache_keys\"}",
        3.0,
        Duration::from_secs(20),
    );
    for k in ["b", "c", "d"] {
        assert!(
            !r.exists::<_, bool>(key(k)).await.unwrap(),
            "{k} was published while the node was down and must be purged"
        );
    }
    assert!(
        r.exists::<_, bool>(key("untouched")).await.unwrap(),
        "no flush: the node resumed, it did not resync"
    );
    assert_no_resync(&again);
    assert_eq!(
        again.metric("rtinval_consumer_events_applied_total{kind=\"cache_keys\"}"),
        3.0,
        "a is not applied again, b, c and d once each"
    );
}

/// The node started from its committed offsets: no resync of any reason.
fn assert_no_resync(c: &ConsumerProc) {
    let log = c.proc.log_text();
    assert!(
        !log.contains("Resyncing this node"),
        "the restarted node resynced instead of resuming:\n{log}"
    );
}

/// `kill -9` of the node twice while purges flow: every key is purged in the end, by purges
/// (at least once), not by a resync that would hide a skipped message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_purge() {
    const N: usize = 3000;
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("kill9");
    let bus = Arc::new(Bus::new(&prefix).await);
    let cache_prefix = format!("{prefix}:");
    let config = format!(
        "{}{}",
        kafka_section(&prefix),
        redis_cache("rt", &cache_prefix, "")
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer-0", &config);
    c.wait_consuming();

    // Seed the keys after the new node's start-up resync, so only purges can remove them.
    let mut r = redis().await;
    let mut seed = redis::pipe();
    for i in 0..N {
        seed.set(format!("{cache_prefix}k{i}"), "v").ignore();
    }
    let _: () = seed.query_async(&mut r).await.unwrap();

    // One key per message, about 1,000 messages a second, while the node is killed twice.
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            for i in 0..N {
                bus.enqueue(EventBody::CacheKeys {
                    cache: "rt".into(),
                    keys: vec![format!("k{i}")],
                });
                if i % 20 == 19 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            bus.flush();
        })
    };
    let mut restarted = Vec::new();
    for round in 1..=2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        c.proc.kill9();
        c = ConsumerProc::start(dir.path(), &format!("consumer-{round}"), &config);
        c.wait_consuming();
        restarted.push(c.proc.log.clone());
    }
    publisher.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: Vec<String> = r.keys(format!("{cache_prefix}k*")).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} key(s) never purged, e.g. {:?}",
            left.len(),
            &left[..left.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for log in restarted {
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            !text.contains("Resyncing this node"),
            "a node killed with -9 resumes from its committed offsets:\n{text}"
        );
    }
    let applied = c.metric("rtinval_consumer_events_applied_total{kind=\"cache_keys\"}");
    println!("the last node applied {applied} of {N} messages (the rest before the kills)");
    assert!(applied >= 1.0);
}

/// A node whose cache is down keeps receiving heartbeats but cannot apply the purge before
/// them: it turns not ready (stale) instead of reporting a fresh view it does not have, counts
/// the failures, and recovers on its own when the cache is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_purge_turns_stale_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("stuck");
    let bus = Bus::new(&prefix).await;
    let port = rtinval_tests::free_port();
    let start_redis = |name: &str| {
        rtinval_tests::redis_server(
            dir.path(),
            name,
            port,
            &["--save", "", "--appendonly", "no"],
        )
    };
    let mut cache = start_redis("redis");
    let config = format!(
        "{}[node]\nmax_staleness_secs = 2\n[caches.rt]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\nprefix = \"{prefix}:\"\n",
        kafka_section(&prefix)
    );
    let mut c = ConsumerProc::start(dir.path(), "consumer", &config);
    c.wait_consuming();
    let ready = |c: &ConsumerProc| http_get(&c.http, "/readyz");
    bus.publish(EventBody::Heartbeat {
        source_time: rtinval_consumer::now_ms(),
    })
    .await;
    wait_sync("ready", Duration::from_secs(10), || {
        ready(&c).filter(|(s, _)| *s == 200).map(|_| ())
    });

    cache.kill9();
    bus.publish(EventBody::CacheKeys {
        cache: "rt".into(),
        keys: vec!["object:1".into()],
    })
    .await;
    // Heartbeats keep coming; the purge before them cannot be applied.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stale = loop {
        bus.publish(EventBody::Heartbeat {
            source_time: rtinval_consumer::now_ms(),
        })
        .await;
        if let Some((503, body)) = ready(&c) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "still ready while the purge fails: {:?}",
            ready(&c)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(stale.contains("stale"), "{stale}");
    assert!(c.metric("rtinval_consumer_cache_failures_total{cache=\"rt\"}") >= 1.0);
    assert_eq!(
        c.metric("rtinval_consumer_events_applied_total{kind=\"cache_keys\"}"),
        0.0
    );

    // The cache is back: the retried purge succeeds and the heartbeats after it count again.
    let _cache = start_redis("redis-again");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        bus.publish(EventBody::Heartbeat {
            source_time: rtinval_consumer::now_ms(),
        })
        .await;
        if ready(&c).is_some_and(|(s, _)| s == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready again after the cache came back: {:?}",
            ready(&c)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        c.metric("rtinval_consumer_events_applied_total{kind=\"cache_keys\"}"),
        1.0
    );
    assert!(c.proc.try_exit().is_none());
}
