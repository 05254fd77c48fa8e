//! Proves `rtinval-consumer replay` against the real broker: time ranges (Kafka timestamps),
//! filters, `--why KEY`, `--apply --dry-run` and a real `--apply` into Redis. The test
//! publishes events with chosen timestamps itself. Needs `scripts/stack up` and the binaries
//! built. Run alone: `cargo test -p rtinval-tests --test replay`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;

use redis::AsyncCommands;
use rtinval_schemas::EventBody;
use rtinval_tests::{Bus, Stack, bin, redis, unique};

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
        format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n[caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{cache_prefix}\"\n",
            s.brokers, s.redis_url
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
