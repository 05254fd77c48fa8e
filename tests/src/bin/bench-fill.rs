//! Cost of the fill protocol against plain GET/SET, in one run on the stack's Redis and
//! memcached: a read that hits, and a miss followed by its fill, one request at a time over
//! loopback (latency p50/p99 and operations per second). Prints a table; JSON to
//! `target/bench/fill.json`.
//!
//! `bench-fill [--ops N]` (default 20,000 per row). Needs `scripts/stack up`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step is a failed run

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use rtinval_client::memcached::Memcached;
use rtinval_client::{Lookup, NodeCache};
use rtinval_tests::{Stack, unique, workspace_root};
use serde_json::json;

const TTL: Duration = Duration::from_secs(300);
const PAYLOAD: &[u8] = &[b'x'; 512];

/// The protocol's miss + fill, then its hits, over `ops` keys.
async fn protocol_rows(cache: &NodeCache, ops: usize) -> (Vec<Duration>, Vec<Duration>) {
    let miss = timed(ops, async |i| {
        let Lookup::Miss(t) = cache.get(&format!("p:{i}")).await.unwrap() else {
            panic!("expected a miss")
        };
        assert!(cache.fill(t, PAYLOAD, TTL).await.unwrap());
    })
    .await;
    let hit = timed(ops, async |i| {
        assert!(matches!(
            cache.get(&format!("p:{i}")).await.unwrap(),
            Lookup::Hit(_)
        ));
    })
    .await;
    (miss, hit)
}

struct Row {
    cache: &'static str,
    op: &'static str,
    plain: Vec<Duration>,
    protocol: Vec<Duration>,
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)].as_secs_f64() * 1e6
}

fn rate(samples: &[Duration]) -> f64 {
    samples.len() as f64 / samples.iter().sum::<Duration>().as_secs_f64()
}

async fn timed<F: AsyncFnMut(usize)>(n: usize, mut f: F) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        out.push(t.elapsed());
    }
    out.sort();
    out
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ops: usize = args
        .iter()
        .position(|a| a == "--ops")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let stack = Stack::get();
    let prefix = format!("{}:", unique("bench_fill"));
    let mut rows = Vec::new();

    // Redis.
    let mut plain =
        redis::aio::ConnectionManager::new(redis::Client::open(stack.redis_url.as_str()).unwrap())
            .await
            .unwrap();
    let cache = NodeCache::redis(&stack.redis_url, &prefix).await.unwrap();
    let plain_miss = timed(ops, async |i| {
        let k = format!("{prefix}plain:{i}");
        let v: Option<Vec<u8>> = plain.get(&k).await.unwrap();
        assert!(v.is_none());
        let _: () = plain.pset_ex(&k, PAYLOAD, 300_000).await.unwrap();
    })
    .await;
    let plain_hit = timed(ops, async |i| {
        let v: Option<Vec<u8>> = plain.get(format!("{prefix}plain:{i}")).await.unwrap();
        assert!(v.is_some());
    })
    .await;
    let (proto_miss, proto_hit) = protocol_rows(&cache, ops).await;
    rows.push(Row {
        cache: "redis",
        op: "read (hit)",
        plain: plain_hit,
        protocol: proto_hit,
    });
    rows.push(Row {
        cache: "redis",
        op: "miss + fill",
        plain: plain_miss,
        protocol: proto_miss,
    });

    // memcached.
    let addr = &stack.memcached;
    let mc = Memcached::new(addr);
    let cache = NodeCache::memcached(addr, &prefix);
    let plain_miss = timed(ops, async |i| {
        let k = format!("{prefix}plain:{i}");
        assert!(mc.gets(&[k.as_bytes()]).await.unwrap()[0].is_none());
        mc.set(k.as_bytes(), PAYLOAD, 300).await.unwrap();
    })
    .await;
    let plain_hit = timed(ops, async |i| {
        let k = format!("{prefix}plain:{i}");
        assert!(mc.gets(&[k.as_bytes()]).await.unwrap()[0].is_some());
    })
    .await;
    let (proto_miss, proto_hit) = protocol_rows(&cache, ops).await;
    rows.push(Row {
        cache: "memcached",
        op: "read (hit)",
        plain: plain_hit,
        protocol: proto_hit,
    });
    rows.push(Row {
        cache: "memcached",
        op: "miss + fill",
        plain: plain_miss,
        protocol: proto_miss,
    });

    println!(
        "\nFill protocol against plain GET/SET ({ops} operations per row, 512-byte values, one at a time, loopback)\n"
    );
    println!(
        "| cache | operation | plain p50 / p99 µs | plain ops/s | protocol p50 / p99 µs | protocol ops/s |"
    );
    println!("|---|---|---|---|---|---|");
    let mut out = Vec::new();
    for r in &rows {
        println!(
            "| {} | {} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {:.0} |",
            r.cache,
            r.op,
            pct(&r.plain, 0.5),
            pct(&r.plain, 0.99),
            rate(&r.plain),
            pct(&r.protocol, 0.5),
            pct(&r.protocol, 0.99),
            rate(&r.protocol)
        );
        out.push(json!({
            "cache": r.cache, "operation": r.op,
            "plain": {"p50_us": pct(&r.plain, 0.5), "p99_us": pct(&r.plain, 0.99), "ops_per_s": rate(&r.plain)},
            "protocol": {"p50_us": pct(&r.protocol, 0.5), "p99_us": pct(&r.protocol, 0.99), "ops_per_s": rate(&r.protocol)},
        }));
    }
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("fill.json"),
        serde_json::to_string_pretty(&json!({"ops": ops, "rows": out})).unwrap(),
    )
    .unwrap();
}
