//! The consumer agent purges Redis and memcached: keys, whole-cache flushes, the second
//! purge; a node that cannot purge turns stale and recovers. The test plays the producer on
//! the tansu broker and watches a real `rtinval-consumer`. Needs `scripts/stack up` and the
//! binaries built (`scripts/test` does both).
//! Run alone: `cargo test -p rtinval-tests --test consumer_purges`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use rtinval_schemas::EventBody;
use rtinval_tests::{
    Bus, ConsumerProc, Stack, consumer_kafka_section as kafka_section, http_get, redis,
    redis_cache, unique, wait_for, wait_sync,
};

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
        source_time: rtinval_schemas::runtime::now_ms(),
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
            source_time: rtinval_schemas::runtime::now_ms(),
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
            source_time: rtinval_schemas::runtime::now_ms(),
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
