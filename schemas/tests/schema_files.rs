//! Proves that every event kind this crate can produce validates against the shipped JSON
//! Schema (`schemas/event.schema.json`), round-trips through the JSON wire format and through
//! the Avro datum of `schemas/event.avsc`, and that the schema really rejects malformed events. Run alone: `cargo test -p rtinval-schemas`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use proptest::prelude::*;
use rtinval_schemas::{
    AVRO_SCHEMA, DecodeError, Event, EventBody, EventKind, JSON_SCHEMA, Op, SCHEMA_VERSION, Source,
    TableChange, avro, event_id,
};

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(JSON_SCHEMA).expect("schema file is JSON");
    jsonschema::validator_for(&schema).expect("schema file is a valid JSON Schema")
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.-]{1,12}"
}

fn reason() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_]{0,15}"
}

fn sorted_unique(v: Vec<String>) -> Vec<String> {
    let mut v = v;
    v.sort();
    v.dedup();
    v
}

fn body() -> impl Strategy<Value = EventBody> {
    prop_oneof![
        prop::collection::vec(name(), 1..4).prop_map(|p| EventBody::PoolReset {
            pools: sorted_unique(p)
        }),
        (name(), prop::collection::vec(any::<String>(), 0..6)).prop_map(|(cache, keys)| {
            EventBody::CacheKeys {
                cache,
                keys: sorted_unique(keys),
            }
        }),
        (name(), reason()).prop_map(|(cache, reason)| EventBody::CacheFlush { cache, reason }),
        reason().prop_map(|reason| EventBody::Resync { reason }),
        (0u64..1 << 50).prop_map(|source_time| EventBody::Heartbeat { source_time }),
    ]
}

fn source() -> impl Strategy<Value = Source> {
    let ops = prop::sample::subsequence(vec![Op::Insert, Op::Update, Op::Delete], 1..=3);
    (
        any::<u32>(),
        proptest::option::of("[0-9]{1,3}-[0-9]{1,5}-[0-9]{1,9}"),
        "[a-z-]{1,10}\\.[0-9]{6}",
        any::<u32>(),
        prop::collection::vec(("[a-z]{1,8}\\.[A-Za-z]{1,12}", ops), 0..3),
        0u64..1 << 50,
    )
        .prop_map(
            |(server_id, gtid, file, pos, tables, committed_at)| Source {
                server_id,
                gtid,
                file,
                pos: u64::from(pos),
                tables: tables
                    .into_iter()
                    .map(|(table, ops)| TableChange { table, ops })
                    .collect(),
                committed_at,
            },
        )
}

fn event() -> impl Strategy<Value = Event> {
    (source(), body(), 0usize..10, 0u64..1 << 50).prop_map(|(source, body, seq, emitted_at)| {
        Event {
            schema_version: SCHEMA_VERSION,
            id: event_id(source.server_id, &source.file, source.pos, seq),
            source,
            emitted_at,
            body,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_failure_persistence(
        prop::test_runner::FileFailurePersistence::WithSource("regressions"),
    ))]
    #[test]
    fn every_event_validates_and_round_trips(ev in event()) {
        let bytes = ev.to_json();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let v = validator();
        if let Err(e) = v.validate(&json) {
            panic!("{json} does not validate: {e}");
        }
        let back = Event::from_json(&bytes).unwrap();
        prop_assert_eq!(&back, &ev);
        // The Avro form: valid for event.avsc (to_datum validates) and back to the same event.
        let datum = avro::to_datum(&ev).unwrap();
        let back = avro::from_datum(&datum, avro::schema()).unwrap();
        prop_assert_eq!(back, ev);
    }
}

fn sample(body: EventBody) -> Event {
    Event {
        schema_version: SCHEMA_VERSION,
        id: event_id(1, "mariadb-bin.000001", 4, 0),
        source: Source {
            server_id: 1,
            gtid: Some("0-1-7".into()),
            file: "mariadb-bin.000001".into(),
            pos: 4,
            tables: vec![TableChange {
                table: "racktables.Object".into(),
                ops: vec![Op::Update],
            }],
            committed_at: 1_700_000_000_000,
        },
        emitted_at: 1_700_000_000_123,
        body,
    }
}

#[test]
fn every_kind_is_covered_by_the_sample_set() {
    let bodies = [
        EventBody::PoolReset {
            pools: vec!["rtapi".into()],
        },
        EventBody::CacheKeys {
            cache: "rt".into(),
            keys: vec!["object:42".into()],
        },
        EventBody::CacheFlush {
            cache: "rt".into(),
            reason: "too_many_keys".into(),
        },
        EventBody::Resync {
            reason: "position_lost".into(),
        },
        EventBody::Heartbeat { source_time: 1 },
    ];
    let kinds: Vec<EventKind> = bodies.iter().map(EventBody::kind).collect();
    assert_eq!(kinds, EventKind::ALL);
    let v = validator();
    for b in bodies {
        let ev = sample(b);
        let json: serde_json::Value = serde_json::from_slice(&ev.to_json()).unwrap();
        assert!(v.is_valid(&json), "{json}");
        assert_eq!(json["kind"], ev.kind().as_str());
    }
}

#[test]
fn schema_rejects_malformed_events() {
    let v = validator();
    let good: serde_json::Value = serde_json::from_slice(
        &sample(EventBody::PoolReset {
            pools: vec!["rtapi".into()],
        })
        .to_json(),
    )
    .unwrap();
    assert!(v.is_valid(&good));

    let mut unknown_kind = good.clone();
    unknown_kind["kind"] = "explode".into();
    assert!(!v.is_valid(&unknown_kind));

    let mut missing_pools = good.clone();
    missing_pools.as_object_mut().unwrap().remove("pools");
    assert!(!v.is_valid(&missing_pools));

    let mut foreign_field = good.clone();
    foreign_field["keys"] = serde_json::json!(["x"]);
    assert!(
        !v.is_valid(&foreign_field),
        "a pool_reset must not carry keys"
    );

    let mut bad_version = good;
    bad_version["schema_version"] = 2.into();
    assert!(!v.is_valid(&bad_version));
}

#[test]
fn decoding_reports_version_and_garbage_distinctly() {
    let mut json: serde_json::Value =
        serde_json::from_slice(&sample(EventBody::Resync { reason: "x".into() }).to_json())
            .unwrap();
    json["schema_version"] = 9.into();
    let err = Event::from_json(json.to_string().as_bytes()).unwrap_err();
    assert!(matches!(err, DecodeError::UnsupportedVersion(9)), "{err}");
    let err = Event::from_json(b"\x00\x01garbage").unwrap_err();
    assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
}

#[test]
fn fields_a_later_version_adds_are_ignored_by_this_reader() {
    let event = sample(EventBody::CacheKeys {
        cache: "rt".into(),
        keys: vec!["object:1".into()],
    });
    let mut json: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
    json["trace_id"] = "abc".into();
    json["source"]["server_uuid"] = "3e11fa47-71ca-11e1-9e33-c80aa9429562".into();
    json["source"]["tables"][0]["rows"] = 3.into();
    let back = Event::from_json(json.to_string().as_bytes()).unwrap();
    assert_eq!(back, event);
}

#[test]
fn avro_schema_has_a_branch_per_kind() {
    let avsc: serde_json::Value = serde_json::from_str(AVRO_SCHEMA).expect("event.avsc is JSON");
    let body = avsc["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "body")
        .expect("body field");
    let names: Vec<&str> = body["type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = EventKind::ALL
        .iter()
        .map(|k| {
            k.as_str()
                .split('_')
                .map(|w| w[..1].to_uppercase() + &w[1..])
                .collect()
        })
        .collect();
    assert_eq!(names, expected);
}
