//! Proves the Avro wire format end to end, through the real broker: a producer with
//! `kafka.format = "avro"` registers `schemas/event.avsc` under each topic's value subject
//! (with basic authentication) and publishes Confluent-framed events; the consumer decodes them
//! by schema id and purges the keys; `replay` reads them back; JSON and Avro events mix on one
//! topic; a wrong registry password stops the producer with one line; and an Avro message the
//! node cannot decode (unknown schema id, no registry configured, registry unreachable) takes
//! the fail-safe path: a resync, counted, and a dead-letter copy.
//!
//! The registry is `rtinval_tests::registry::RegistryStandIn`, an in-repo **stand-in** for a
//! Confluent-compatible Schema Registry (none can be installed here).
//! Needs `scripts/stack up` and the binaries built.
//! Run alone: `cargo test -p rtinval-tests --test avro_format`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::Duration;

use redis::AsyncCommands;
use rtinval_schemas::EventBody;
use rtinval_schemas::avro::{AvroWriter, RegistryConfig};
use rtinval_tests::registry::RegistryStandIn;
use rtinval_tests::{
    Bus, ConsumerProc, Proc, Stack, StandInPool, TestDb, bin, consumer_config, free_port,
    producer_config, read_raw, redis, unique, wait_for, wait_sync,
};

const SCHEMA: &str = include_str!("../fixtures/racktables/schema.sql");
const RULES: &str = include_str!("../fixtures/racktables/rules.toml");

fn avro_producer_config(db: &str, prefix: &str, registry: &str) -> String {
    producer_config(
        db,
        prefix,
        &format!(
            "[kafka]\nformat = \"avro\"\n[schema_registry]\nurl = \"{registry}\"\nusername = \"rtinval\"\n\
             [producer]\nheartbeat_ms = 200\ncheckpoint_ms = 200\n{RULES}"
        ),
    )
}

fn start_producer(dir: &std::path::Path, config: &str, password: &str) -> Proc {
    let path = dir.join("producer.toml");
    std::fs::write(&path, config).unwrap();
    Proc::spawn(
        "rtinval-producer",
        Command::new(bin("rtinval-producer"))
            .arg("--config")
            .arg(&path)
            .env("RTINVAL_SCHEMA_REGISTRY_PASSWORD", password),
        dir.join("producer.log"),
    )
}

/// The 4-byte big-endian schema id after the magic byte.
fn schema_id(payload: &[u8]) -> u32 {
    assert_eq!(
        payload.first(),
        Some(&0),
        "not Confluent-framed: {payload:?}"
    );
    u32::from_be_bytes(payload[1..5].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_events_flow_from_binlog_to_node_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryStandIn::start_with_basic_auth("rtinval", "s3cret");
    let db = TestDb::create("avro", SCHEMA).await;
    db.exec("INSERT INTO Object (id, name) VALUES (1, 'srv-1'), (2, 'srv-2')")
        .await;
    let prefix = unique("avro");
    let pool = StandInPool::start(dir.path(), "rtapi");

    let mut producer = start_producer(
        dir.path(),
        &avro_producer_config(&db.name, &prefix, &registry.url),
        "s3cret",
    );
    let consumer_config = consumer_config(
        &prefix,
        &format!("{prefix}-node"),
        &format!(
            "[schema_registry]\nurl = \"{}\"\nusername = \"rtinval\"\npassword = \"s3cret\"\n\
             [pools.rtapi]\nreload = \"signal\"\npidfile = \"{}\"\nsignal = \"USR2\"\ndebounce_ms = 50\n\
             [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}:\"\nflush = \"prefix\"\n",
            registry.url,
            pool.pidfile.display(),
            Stack::get().redis_url
        ),
    );
    producer.wait_log("Streaming binlog.", Duration::from_secs(60));
    // The node starts after the producer's first-start resync is in Kafka, so nothing flushes
    // what the test seeds below.
    let resets = format!("{prefix}.pool-reset");
    wait_for("the first-start resync", Duration::from_secs(30), || {
        let resets = resets.clone();
        async move { (!read_raw(&resets).await.is_empty()).then_some(()) }
    })
    .await;
    let mut consumer = ConsumerProc::start(dir.path(), "consumer", &consumer_config);
    consumer.wait_consuming();

    // The schema is registered once per topic subject, as event.avsc.
    let subjects = registry.subjects();
    let cache_subject = format!("{prefix}.cache-keys-value");
    let reset_subject = format!("{prefix}.pool-reset-value");
    assert!(
        subjects.contains_key(&cache_subject) && subjects.contains_key(&reset_subject),
        "{subjects:?}"
    );
    let id = subjects[&cache_subject][0];
    let registered = apache_avro::Schema::parse_str(&registry.schema(id).unwrap()).unwrap();
    assert_eq!(
        registered.canonical_form(),
        rtinval_schemas::avro::schema().canonical_form()
    );
    assert_eq!(
        registry.refused(),
        0,
        "the producer and consumer authenticate"
    );

    // A rename: purged from the node's Redis through Avro events.
    let mut r = redis().await;
    let k = |s: &str| format!("{prefix}:{s}");
    for key in [k("object:1"), k("object_name:srv-1"), k("object:2")] {
        let _: () = r.set(&key, "cached").await.unwrap();
    }
    db.exec("UPDATE Object SET name = 'srv-1b' WHERE id = 1")
        .await;
    wait_for("object:1 purged", Duration::from_secs(30), || {
        let mut r = r.clone();
        let (a, b) = (k("object:1"), k("object_name:srv-1"));
        async move {
            let gone: bool =
                !r.exists::<_, bool>(&a).await.unwrap() && !r.exists::<_, bool>(&b).await.unwrap();
            gone.then_some(())
        }
    })
    .await;
    assert!(
        r.exists::<_, bool>(&k("object:2")).await.unwrap(),
        "untouched keys stay"
    );
    assert_eq!(
        consumer.metric("rtinval_consumer_resyncs_total{reason=\"undecodable\"}"),
        0.0
    );

    // Every message on the event topics is Avro, framed with the registered id.
    let raw = read_raw(&format!("{prefix}.cache-keys")).await;
    assert!(!raw.is_empty());
    for p in &raw {
        assert_eq!(schema_id(p), id);
    }
    for p in read_raw(&format!("{prefix}.pool-reset")).await {
        assert_eq!(schema_id(&p), subjects[&reset_subject][0]);
    }

    // replay decodes them too.
    let out = Command::new(bin("rtinval-consumer"))
        .arg("--config")
        .arg(dir.path().join("consumer.toml"))
        .args(["replay", "--why", "object_name:srv-1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"object_name:srv-1\""),
        "replay --why: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_registry_password_stops_the_producer_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryStandIn::start_with_basic_auth("rtinval", "s3cret");
    let db = TestDb::create("avrobad", SCHEMA).await;
    let prefix = unique("avrobad");
    let mut producer = start_producer(
        dir.path(),
        &avro_producer_config(&db.name, &prefix, &registry.url),
        "wrong",
    );
    let status = wait_sync("producer exit", Duration::from_secs(60), || {
        producer.try_exit()
    });
    assert!(!status.success());
    let log = producer.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("schema registry"))
        .unwrap_or_else(|| panic!("no line names the registry:\n{log}"));
    assert!(
        line.contains("401") || line.contains("Unauthorized"),
        "{line}"
    );
    assert!(registry.refused() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_the_node_cannot_decode_resyncs_it_and_json_still_flows() {
    let dir = tempfile::tempdir().unwrap();
    let registry = RegistryStandIn::start();
    let prefix = unique("avrodec");
    let bus = Bus::new(&prefix).await;
    let s = Stack::get();
    let node = |name: &str, registry_section: &str, extra_kafka: &str| {
        consumer_config(
            &prefix,
            &format!("{prefix}-{name}"),
            &format!(
                "[kafka]\n{extra_kafka}\n{registry_section}\n\
                 [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}:{name}:\"\nflush = \"prefix\"\n",
                s.redis_url
            ),
        )
    };
    let dead_letter = format!("{prefix}.dead-letter");
    // a: reads Avro; b: has no registry; c: its registry is unreachable.
    let mut a = ConsumerProc::start(
        dir.path(),
        "a",
        &node(
            "a",
            &format!("[schema_registry]\nurl = \"{}\"\n", registry.url),
            &format!("dead_letter_topic = \"{dead_letter}\""),
        ),
    );
    let mut b = ConsumerProc::start(dir.path(), "b", &node("b", "", ""));
    let mut c = ConsumerProc::start(
        dir.path(),
        "c",
        &node(
            "c",
            &format!(
                "[schema_registry]\nurl = \"http://127.0.0.1:{}\"\ntimeout_secs = 2\n",
                free_port()
            ),
            "",
        ),
    );
    for n in [&mut a, &mut b, &mut c] {
        n.wait_consuming();
    }
    let undecodable = "rtinval_consumer_resyncs_total{reason=\"undecodable\"}";
    let applied = "rtinval_consumer_events_applied_total{kind=\"cache_keys\"}";

    // A valid Avro event, written as the producer writes it.
    let writer = AvroWriter::new(&RegistryConfig {
        url: registry.url.clone(),
        username: None,
        password: None,
        ca_file: None,
        timeout_secs: 5,
    })
    .unwrap();
    let topic = format!("{prefix}.cache-keys");
    let event = Bus::event(EventBody::CacheKeys {
        cache: "rt".into(),
        keys: vec!["object:7".into()],
    });
    let mut r = redis().await;
    let key_a = format!("{prefix}:a:object:7");
    let _: () = r.set(&key_a, "cached").await.unwrap();
    bus.raw(&topic, &writer.encode(&topic, &event).await.unwrap())
        .await;
    a.wait_metric(applied, 1.0, Duration::from_secs(30));
    assert!(
        !r.exists::<_, bool>(&key_a).await.unwrap(),
        "a purged the key"
    );
    b.wait_metric(undecodable, 1.0, Duration::from_secs(30));
    c.wait_metric(undecodable, 1.0, Duration::from_secs(30));
    assert_eq!(a.metric(undecodable), 0.0);
    assert!(
        b.proc
            .log_text()
            .contains("no [schema_registry] is configured"),
        "b says why"
    );

    // JSON events on the same topic still decode everywhere.
    bus.publish(EventBody::CacheKeys {
        cache: "rt".into(),
        keys: vec!["object:8".into()],
    })
    .await;
    a.wait_metric(applied, 2.0, Duration::from_secs(30));
    b.wait_metric(applied, 1.0, Duration::from_secs(30));

    // An Avro frame naming a schema id the registry does not have: resync and dead-letter.
    let mut unknown = vec![0, 0, 0, 0x03, 0xe7];
    unknown.extend_from_slice(b"\x02\x00");
    bus.raw(&topic, &unknown).await;
    a.wait_metric(undecodable, 1.0, Duration::from_secs(30));
    let dead = wait_for("the dead-letter copy", Duration::from_secs(30), || {
        let dead_letter = dead_letter.clone();
        async move {
            let raw = read_raw(&dead_letter).await;
            (!raw.is_empty()).then_some(raw)
        }
    })
    .await;
    assert_eq!(dead[0], unknown);
}
