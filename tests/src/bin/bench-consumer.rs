//! Consumer footprint and purge throughput, measured on the real local stack against a release
//! `rtinval-consumer` process, next to the ceiling of the same Redis/memcached driven directly
//! (pipelined UNLINK / noreply deletes from this process) in the same run.
//!
//! Prints a table and writes `target/bench/consumer.json`. Run with `scripts/bench-consumer`
//! (builds in release first). `--keys N` sets the purge size (default 200,000), `--idle-secs S`
//! the idle window (default 10).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step aborts it

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rtinval_schemas::EventBody;
use rtinval_tests::{
    Bus, ConsumerProc, PrivateBroker, Stack, StandInPool, clk_tck, consumer_config, proc_stats,
    redis, unique, wait_sync,
};

struct Args {
    keys: usize,
    idle_secs: u64,
    consumer_bin: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        keys: 200_000,
        idle_secs: 10,
        consumer_bin: PathBuf::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--keys" => a.keys = it.next().and_then(|v| v.parse().ok()).expect("--keys N"),
            "--idle-secs" => {
                a.idle_secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--idle-secs S")
            }
            "--consumer-bin" => {
                a.consumer_bin = it.next().map(PathBuf::from).expect("--consumer-bin PATH")
            }
            other => {
                panic!("unknown argument {other}; use --keys N --idle-secs S --consumer-bin PATH")
            }
        }
    }
    a
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let dir = tempfile::tempdir().unwrap();
    // A broker of its own: the shared one carries every test's topics and load.
    let broker = PrivateBroker::start(dir.path());
    let brokers = broker.brokers();
    let prefix = unique("bench");
    let bus = Bus::new_on(&brokers, &prefix).await;
    let pool = StandInPool::start(dir.path(), "pool");
    let s = Stack::get();
    let (rp, mp) = (format!("{prefix}:r:"), format!("{prefix}:m:"));
    let config = consumer_config(
        &prefix,
        &format!("{prefix}-node"),
        &format!(
            "[kafka]\nbrokers = \"{}\"\n\
         [pools.rtapi]\nreload = \"signal\"\npidfile = \"{}\"\ndebounce_ms = 200\nmax_delay_ms = 1000\n\
         [caches.r]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{rp}\"\n\
         [caches.m]\nkind = \"memcached\"\nurl = \"{}\"\nprefix = \"{mp}\"\n",
            brokers,
            pool.pidfile.display(),
            s.redis_url,
            s.memcached
        ),
    );
    let mut c = if args.consumer_bin.as_os_str().is_empty() {
        ConsumerProc::start(dir.path(), "consumer", &config)
    } else {
        ConsumerProc::start_with(dir.path(), "consumer", &config, &args.consumer_bin)
    };
    c.wait_consuming();
    bus.publish(EventBody::Heartbeat { source_time: 1 }).await;
    c.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"heartbeat\"}",
        1.0,
        Duration::from_secs(10),
    );
    let pid = c.proc.pid();

    // 1. Idle: no events for idle_secs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (t0, _, _) = proc_stats(pid);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let (t1, idle_rss, _) = proc_stats(pid);
    let idle_cpu = (t1 - t0) as f64 / clk_tck() / args.idle_secs as f64 * 100.0;

    // 2. Redis purge throughput through the whole path (Kafka → consumer → Redis).
    let n = args.keys;
    let keys: Vec<String> = (0..n).map(|i| format!("object:{i}")).collect();
    let mut r = redis().await;
    seed_redis(&mut r, &rp, &keys).await;
    let start = Instant::now();
    for chunk in keys.chunks(500) {
        bus.enqueue(EventBody::CacheKeys {
            cache: "r".into(),
            keys: chunk.to_vec(),
        });
    }
    bus.flush();
    c.wait_metric(
        "rtinval_consumer_keys_purged_total{cache=\"r\"}",
        n as f64,
        Duration::from_secs(300),
    );
    let consumer_redis = n as f64 / start.elapsed().as_secs_f64();
    let left: usize = redis::cmd("EXISTS")
        .arg(format!("{rp}object:0"))
        .arg(format!("{rp}object:{}", n - 1))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(left, 0, "keys purged");

    // Ceiling: the same UNLINKs, pipelined from here, 500 keys per command.
    seed_redis(&mut r, &rp, &keys).await;
    let start = Instant::now();
    for batch in keys.chunks(50_000) {
        let mut pipe = redis::pipe();
        for chunk in batch.chunks(500) {
            pipe.cmd("UNLINK")
                .arg(chunk.iter().map(|k| format!("{rp}{k}")).collect::<Vec<_>>())
                .ignore();
        }
        pipe.query_async::<()>(&mut r).await.unwrap();
    }
    let direct_redis = n as f64 / start.elapsed().as_secs_f64();

    // 3. memcached, same path.
    let mut mc = async_memcached::Client::new(format!("tcp://{}", s.memcached))
        .await
        .unwrap();
    // As many keys as for Redis, so the fixed first-fetch delay weighs the same in both.
    let m = n;
    seed_memcached(&mut mc, &mp, &keys[..m]).await;
    let start = Instant::now();
    for chunk in keys[..m].chunks(500) {
        bus.enqueue(EventBody::CacheKeys {
            cache: "m".into(),
            keys: chunk.to_vec(),
        });
    }
    bus.flush();
    c.wait_metric(
        "rtinval_consumer_keys_purged_total{cache=\"m\"}",
        m as f64,
        Duration::from_secs(300),
    );
    let consumer_memcached = m as f64 / start.elapsed().as_secs_f64();
    seed_memcached(&mut mc, &mp, &keys[..m]).await;
    let start = Instant::now();
    {
        use async_memcached::AsciiProtocol;
        let full: Vec<String> = keys[..m].iter().map(|k| format!("{mp}{k}")).collect();
        for chunk in full.chunks(500) {
            mc.delete_multi_no_reply(chunk).await.unwrap();
        }
        mc.version().await.unwrap();
    }
    let direct_memcached = m as f64 / start.elapsed().as_secs_f64();

    // 4. A burst of 10,000 resets in about one second.
    let before = pool.reloads();
    let start = Instant::now();
    for b in 0..10u32 {
        for _ in 0..1000 {
            bus.enqueue(EventBody::PoolReset {
                pools: vec!["rtapi".into()],
            });
        }
        tokio::time::sleep(
            (start + Duration::from_millis(100) * (b + 1))
                .saturating_duration_since(Instant::now()),
        )
        .await;
    }
    bus.flush();
    c.wait_metric(
        "rtinval_consumer_events_applied_total{kind=\"pool_reset\"}",
        10_000.0,
        Duration::from_secs(120),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let burst_reloads = pool.reloads() - before;
    let (_, rss_after, hwm) = proc_stats(pid);
    wait_sync("still alive", Duration::from_secs(1), || {
        c.proc.try_exit().is_none().then_some(())
    });

    let rows = [
        ("idle RSS (MB)", idle_rss as f64 / 1024.0, "≤ 15"),
        ("idle CPU (% of one core)", idle_cpu, "≈ 0"),
        (
            "purge Redis via rtinval (keys/s)",
            consumer_redis,
            "≥ 50,000",
        ),
        (
            "  peer: Redis pipelined UNLINK direct (keys/s)",
            direct_redis,
            "ceiling",
        ),
        (
            "purge memcached via rtinval (keys/s)",
            consumer_memcached,
            "",
        ),
        (
            "  peer: memcached noreply deletes direct (keys/s)",
            direct_memcached,
            "ceiling",
        ),
        (
            "reloads for 10,000 resets in 1 s",
            burst_reloads as f64,
            "a few",
        ),
        ("RSS after the run (MB)", rss_after as f64 / 1024.0, ""),
        ("peak RSS (MB)", hwm as f64 / 1024.0, ""),
    ];
    println!(
        "\nrtinval-consumer footprint and purge throughput ({} keys, idle window {} s)",
        n, args.idle_secs
    );
    println!("{:<52} {:>14}  target", "measure", "value");
    for (name, v, target) in &rows {
        println!("{name:<52} {v:>14.1}  {target}");
    }
    let json = serde_json::json!({
        "keys": n,
        "idle_secs": args.idle_secs,
        "idle_rss_mb": idle_rss as f64 / 1024.0,
        "idle_cpu_percent": idle_cpu,
        "redis_keys_per_s": consumer_redis,
        "redis_direct_keys_per_s": direct_redis,
        "memcached_keys_per_s": consumer_memcached,
        "memcached_direct_keys_per_s": direct_memcached,
        "burst_10000_resets_reloads": burst_reloads,
        "rss_after_mb": rss_after as f64 / 1024.0,
        "peak_rss_mb": hwm as f64 / 1024.0,
    });
    let out = rtinval_tests::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("consumer.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("consumer.json").display());
}

async fn seed_redis(r: &mut redis::aio::MultiplexedConnection, prefix: &str, keys: &[String]) {
    for batch in keys.chunks(10_000) {
        let mut pipe = redis::pipe();
        for k in batch {
            pipe.cmd("SET")
                .arg(format!("{prefix}{k}"))
                .arg("cached")
                .ignore();
        }
        pipe.query_async::<()>(r).await.unwrap();
    }
}

async fn seed_memcached(c: &mut async_memcached::Client, prefix: &str, keys: &[String]) {
    use async_memcached::AsciiProtocol;
    let kv: Vec<(String, &str)> = keys
        .iter()
        .map(|k| (format!("{prefix}{k}"), "cached"))
        .collect();
    for chunk in kv.chunks(1000) {
        let refs: Vec<(&str, &str)> = chunk.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let results = c.set_multi(&refs, None, None).await.unwrap();
        assert!(results.values().all(Result::is_ok), "memcached set failed");
    }
}
