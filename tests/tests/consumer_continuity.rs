//! The consumer agent never skips: every loss of continuity (no committed offset, a gap, a
//! poison message, an offset out of range, a `resync`) resyncs the node; a restarted node
//! resumes right after the last applied message; kill -9 under load loses no purge. The test
//! plays the producer on the tansu broker and watches a real `rtinval-consumer`. Needs
//! `scripts/stack up` and the binaries built (`scripts/test` does both).
//! Run alone: `cargo test -p rtinval-tests --test consumer_continuity`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use rtinval_schemas::EventBody;
use rtinval_tests::{
    Bus, ConsumerProc, Stack, StandInPool, assert_no_resync,
    consumer_kafka_section as kafka_section, redis, redis_cache, signal_pool, unique, wait_for,
    wait_sync,
};

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
