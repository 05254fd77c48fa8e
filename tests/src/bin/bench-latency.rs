//! End-to-end latency on the real local stack: single-row `Object` updates at a steady rate,
//! each timed from the moment its COMMIT returned to the client until Redis reports the key's
//! deletion (keyspace notification) — binlog → producer → Kafka → consumer → UNLINK.
//!
//! `--rates 200,2000` (tx/s), `--samples N` per rate (default 10,000), `--fetch-wait-ms 50,10`
//! (the consumer's `fetch.wait.max.ms`: every rate runs once per setting, each with a node of its
//! own; 50 is the consumer's default). Prints p50, p99 and max per setting and rate and writes
//! `target/bench/latency.json`. Run with `scripts/bench`.
//!
//! Read-your-writes barrier, on the same node and in the same run: at each rate, every write is
//! followed by its writer's `GET /wait?gtid=<@@last_gtid>` (one task per write), timed from
//! COMMIT returned to the 200, beside the same writes' purge latency (the barrier cannot beat
//! the purge). Then 10,000 concurrent waiters on the first setting's node: the consumer's CPU
//! and RSS while they wait, against the same node idle, and how long one commit takes to
//! release them all. Written to `target/bench/barrier.json`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step aborts it

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use redis::AsyncCommands;
use rtinval_consumer::apply::http::HttpTarget;
use rtinval_tests::{
    ConsumerProc, PrivateBroker, Proc, Stack, TestDb, clk_tck, consumer_config, proc_stats,
    producer_config, unique, wait_sync,
};

struct Args {
    rates: Vec<u64>,
    samples: u64,
    producer_bin: PathBuf,
    consumer_bin: PathBuf,
    /// Extra librdkafka settings (`kafka.options`) for the producer and the consumer, for tuning.
    producer_options: Vec<(String, String)>,
    consumer_options: Vec<(String, String)>,
    /// The consumer's `fetch.wait.max.ms` settings to run every rate with.
    fetch_waits: Vec<u64>,
}

fn args() -> Args {
    let mut a = Args {
        rates: vec![200, 2000],
        samples: 10_000,
        producer_bin: "target/release/rtinval-producer".into(),
        consumer_bin: "target/release/rtinval-consumer".into(),
        producer_options: Vec::new(),
        consumer_options: Vec::new(),
        fetch_waits: vec![50, 10],
    };
    let option = |v: Option<String>| {
        let v = v.expect("KEY=VALUE");
        let (k, v) = v.split_once('=').expect("KEY=VALUE");
        (k.to_owned(), v.to_owned())
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rates" => {
                a.rates = it
                    .next()
                    .expect("--rates R,R")
                    .split(',')
                    .map(|r| r.parse().expect("rate"))
                    .collect()
            }
            "--samples" => a.samples = it.next().and_then(|v| v.parse().ok()).expect("--samples N"),
            "--producer-bin" => a.producer_bin = it.next().map(PathBuf::from).expect("path"),
            "--consumer-bin" => a.consumer_bin = it.next().map(PathBuf::from).expect("path"),
            "--producer-option" => a.producer_options.push(option(it.next())),
            "--consumer-option" => a.consumer_options.push(option(it.next())),
            "--fetch-wait-ms" => {
                a.fetch_waits = it
                    .next()
                    .expect("--fetch-wait-ms MS,MS")
                    .split(',')
                    .map(|r| r.parse().expect("milliseconds"))
                    .collect()
            }
            "--help" | "-h" => {
                println!(
                    "bench-latency [--rates R,R] [--samples N] [--fetch-wait-ms MS,MS] \
                     [--producer-bin P] [--consumer-bin P] [--producer-option K=V] [--consumer-option K=V]\n\
                     End-to-end latency and the read-your-writes barrier on the local stack \
                     (scripts/stack up first); see the header of tests/src/bin/bench-latency.rs."
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other} (--help lists them)"),
        }
    }
    a
}

/// `[kafka.options]` lines for a config.
fn options_toml(options: &[(String, String)]) -> String {
    if options.is_empty() {
        return String::new();
    }
    let lines: Vec<String> = options
        .iter()
        .map(|(k, v)| format!("\"{k}\" = \"{v}\""))
        .collect();
    format!("[kafka.options]\n{}\n", lines.join("\n"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let s = Stack::get();
    // Each rate runs twice per setting: purge latency, then the barrier.
    let total = 2 * a.samples * (a.rates.len() * a.fetch_waits.len()) as u64 + 2;
    let db = TestDb::create(
        "latency",
        "CREATE TABLE Object (id INT UNSIGNED PRIMARY KEY, name CHAR(64), label CHAR(64)) ENGINE=InnoDB",
    )
    .await;
    db.exec(&format!(
        "INSERT INTO Object SELECT seq, CONCAT('o', seq), 'l' FROM seq_1_to_{total}"
    ))
    .await;
    let prefix = unique("latency");
    let key_prefix = format!("{prefix}:");
    let dir = tempfile::tempdir().unwrap();
    // A broker of its own: the shared one carries every test's topics and load.
    let broker = PrivateBroker::start(dir.path());
    let brokers = broker.brokers();
    let pcfg = producer_config(
        &db.name,
        &prefix,
        &format!(
            "[kafka]\nbrokers = \"{brokers}\"\n{}\
             [[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{{id}}\"]\n",
            options_toml(&a.producer_options)
        ),
    );
    std::fs::write(dir.path().join("p.toml"), pcfg).unwrap();
    let mut producer = Proc::spawn(
        "producer",
        Command::new(&a.producer_bin)
            .arg("--config")
            .arg(dir.path().join("p.toml")),
        dir.path().join("p.log"),
    );
    wait_sync("producer streaming", Duration::from_secs(60), || {
        producer
            .log_text()
            .contains("Streaming binlog.")
            .then_some(())
    });
    assert!(producer.try_exit().is_none());

    // Deletions of this run's keys, timestamped as Redis announces them.
    let client = redis::Client::open(s.redis_url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("Kg")
        .query_async(&mut admin)
        .await
        .unwrap();
    let deleted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .psubscribe(format!("__keyspace@0__:{key_prefix}object:*"))
        .await
        .unwrap();
    let d = deleted.clone();
    tokio::spawn(async move {
        let mut messages = pubsub.into_on_message();
        while let Some(m) = messages.next().await {
            let now = Instant::now();
            let channel = m.get_channel_name().to_owned();
            if let Some(key) = channel.split_once(':').map(|(_, k)| k.to_owned()) {
                d.lock().unwrap().entry(key).or_insert(now);
            }
        }
    });

    let mut results = Vec::new();
    let mut barrier_rows = Vec::new();
    let mut waiters_row = None;
    let mut next_id = 1u64;
    for &wait in &a.fetch_waits {
        // A node per setting: its own group, started after everything before it was applied.
        let mut options = vec![("fetch.wait.max.ms".to_owned(), wait.to_string())];
        options.extend(a.consumer_options.iter().cloned());
        let ccfg = consumer_config(
            &prefix,
            &format!("{prefix}-node-{wait}"),
            &format!(
                "[kafka]\nbrokers = \"{brokers}\"\n{}\
                 [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{key_prefix}\"\n",
                options_toml(&options),
                s.redis_url
            ),
        );
        let mut consumer = ConsumerProc::start_with(
            dir.path(),
            &format!("consumer-{wait}"),
            &ccfg,
            &a.consumer_bin,
        );
        consumer.wait_consuming();
        // The new node's first resync flushed the cache: seed it again, and forget those
        // deletions.
        tokio::time::sleep(Duration::from_millis(500)).await;
        deleted.lock().unwrap().clear();
        let mut pipe = redis::pipe();
        for id in next_id..=total {
            pipe.cmd("SET")
                .arg(format!("{key_prefix}object:{id}"))
                .arg("cached")
                .ignore();
        }
        pipe.query_async::<()>(&mut admin).await.unwrap();
        for &rate in &a.rates {
            let mut conn = db.pool.get_conn().await.unwrap();
            let interval = Duration::from_secs_f64(1.0 / rate as f64);
            let start = Instant::now();
            let mut committed: Vec<(String, Instant)> = Vec::with_capacity(a.samples as usize);
            for i in 0..a.samples {
                let due = start + interval * i as u32;
                tokio::time::sleep_until(due.into()).await;
                let id = next_id;
                next_id += 1;
                conn.exec_drop("UPDATE Object SET label = 'x' WHERE id = ?", (id,))
                    .await
                    .unwrap();
                committed.push((format!("{key_prefix}object:{id}"), Instant::now()));
            }
            let achieved = a.samples as f64 / start.elapsed().as_secs_f64();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let done = committed
                    .iter()
                    .filter(|(k, _)| deleted.lock().unwrap().contains_key(k))
                    .count();
                if done == committed.len() || Instant::now() > deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let seen = deleted.lock().unwrap().clone();
            let mut lat: Vec<f64> = committed
                .iter()
                .filter_map(|(k, t)| {
                    seen.get(k)
                        .map(|d| d.saturating_duration_since(*t).as_secs_f64() * 1000.0)
                })
                .collect();
            lat.sort_by(f64::total_cmp);
            let missing = committed.len() - lat.len();
            results.push((
                wait,
                rate,
                achieved,
                lat.len(),
                missing,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat.last().copied().unwrap_or(f64::NAN),
            ));
        }
        for &rate in &a.rates {
            barrier_rows.push(
                barrier_rate(
                    &db,
                    &consumer,
                    &deleted,
                    &key_prefix,
                    wait,
                    rate,
                    a.samples,
                    &mut next_id,
                )
                .await,
            );
        }
        if waiters_row.is_none() {
            waiters_row = Some(many_waiters(&db, &consumer, 10_000, &mut next_id).await);
        }
        drop(consumer);
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("notify-keyspace-events")
        .arg("")
        .query_async(&mut admin)
        .await
        .unwrap();
    let _: usize = admin.del(&[format!("{key_prefix}object:0")]).await.unwrap();
    drop(producer);

    println!("\nend-to-end latency: COMMIT returned → key deleted in the node's Redis");
    println!(
        "(on tansu the latency follows the consumer's fetch.wait.max.ms: it answers a fetch only \
         after the wait; Apache Kafka answers as soon as data arrives)"
    );
    println!(
        "{:>14} {:>8} {:>10} {:>8} {:>8} {:>9} {:>9} {:>9}",
        "fetch wait ms", "tx/s", "achieved", "samples", "missing", "p50 ms", "p99 ms", "max ms"
    );
    let mut json = Vec::new();
    for (wait, rate, achieved, n, missing, p50, p99, max) in &results {
        println!(
            "{wait:>14} {rate:>8} {achieved:>10.0} {n:>8} {missing:>8} {p50:>9.2} {p99:>9.2} {max:>9.2}"
        );
        json.push(serde_json::json!({"fetch_wait_max_ms": wait, "rate": rate, "achieved_tx_per_s": achieved,
            "samples": n, "missing": missing, "p50_ms": p50, "p99_ms": p99, "max_ms": max}));
    }
    let out = rtinval_tests::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("latency.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("latency.json").display());

    println!(
        "\nread-your-writes barrier: COMMIT returned → /wait answered 200, beside the same writes' purge"
    );
    println!(
        "{:>14} {:>8} {:>10} {:>8} {:>8} {:>12} {:>12} {:>12} {:>12}",
        "fetch wait ms",
        "tx/s",
        "achieved",
        "samples",
        "not 200",
        "wait p50 ms",
        "wait p99 ms",
        "purge p50",
        "purge p99"
    );
    let mut bjson = Vec::new();
    for r in &barrier_rows {
        println!(
            "{:>14} {:>8} {:>10.0} {:>8} {:>8} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
            r.fetch_wait,
            r.rate,
            r.achieved,
            r.samples,
            r.not_ok,
            r.wait_p50,
            r.wait_p99,
            r.purge_p50,
            r.purge_p99
        );
        bjson.push(serde_json::json!({"fetch_wait_max_ms": r.fetch_wait, "rate": r.rate, "achieved_tx_per_s": r.achieved,
            "samples": r.samples, "not_200": r.not_ok, "wait_p50_ms": r.wait_p50, "wait_p99_ms": r.wait_p99,
            "wait_max_ms": r.wait_max, "purge_p50_ms": r.purge_p50, "purge_p99_ms": r.purge_p99}));
    }
    let w = waiters_row.expect("the waiters phase ran");
    println!(
        "\n{} concurrent waiters on one node (fetch wait {} ms)",
        w.waiters, a.fetch_waits[0]
    );
    println!("{:>22} {:>14} {:>14}", "", "idle", "with waiters");
    println!(
        "{:>22} {:>14.1} {:>14.1}",
        "consumer CPU %", w.idle_cpu, w.waiting_cpu
    );
    println!(
        "{:>22} {:>14.1} {:>14.1}",
        "consumer RSS MB", w.idle_rss_mb, w.waiting_rss_mb
    );
    println!(
        "one commit released all {} in {:.0} ms ({} answered 200)",
        w.waiters, w.release_ms, w.released_ok
    );
    std::fs::write(
        out.join("barrier.json"),
        serde_json::to_string_pretty(&serde_json::json!({"rates": bjson, "waiters": {
            "waiters": w.waiters, "idle_cpu_percent": w.idle_cpu, "waiting_cpu_percent": w.waiting_cpu,
            "idle_rss_mb": w.idle_rss_mb, "waiting_rss_mb": w.waiting_rss_mb,
            "release_ms": w.release_ms, "released_200": w.released_ok}}))
        .unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("barrier.json").display());
    assert!(
        barrier_rows.iter().all(|r| r.not_ok == 0) && w.released_ok == w.waiters,
        "some waits did not answer 200"
    );
    assert!(
        results.iter().all(|r| r.4 == 0),
        "some invalidations never arrived"
    );
}

struct BarrierRow {
    fetch_wait: u64,
    rate: u64,
    achieved: f64,
    samples: usize,
    not_ok: usize,
    wait_p50: f64,
    wait_p99: f64,
    wait_max: f64,
    purge_p50: f64,
    purge_p99: f64,
}

/// `GET /wait` on the node; the status.
async fn wait_on(node: &str, gtid: &str, timeout_ms: u64) -> u16 {
    let url = format!("http://{node}/wait?gtid={gtid}&timeout_ms={timeout_ms}");
    match HttpTarget::parse(&url)
        .unwrap()
        .request("GET", Duration::from_millis(timeout_ms + 10_000))
        .await
    {
        Ok((status, _)) => status,
        Err(_) => 0,
    }
}

/// Connections the barrier's writers share (a worker pool's).
const WRITERS: usize = 64;

/// Writes at `rate`, each followed by its writer's wait (a task per write, so a slow wait does
/// not slow the writes): commit-to-200 times beside the same writes' purge times.
#[allow(clippy::too_many_arguments)]
async fn barrier_rate(
    db: &TestDb,
    node: &ConsumerProc,
    deleted: &Arc<Mutex<HashMap<String, Instant>>>,
    key_prefix: &str,
    fetch_wait: u64,
    rate: u64,
    samples: u64,
    next_id: &mut u64,
) -> BarrierRow {
    // Writers as an API worker pool holds them: connections kept open and not reset between
    // writes (the harness pool's COM_RESET_CONNECTION per write tripled MariaDB's CPU at
    // 2,000 tx/s, on the two cores rtinval shares with the load it is measured under).
    let writers = mysql_async::Pool::new(
        mysql_async::OptsBuilder::from_opts(mysql_async::Opts::from_url(&db.url()).unwrap())
            .pool_opts(
                mysql_async::PoolOpts::default()
                    .with_reset_connection(false)
                    .with_constraints(mysql_async::PoolConstraints::new(WRITERS, WRITERS).unwrap()),
            ),
    );
    // Opened before the clock starts, as a running worker pool's are.
    let warm = futures::future::join_all((0..WRITERS).map(|_| writers.get_conn())).await;
    drop(warm);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(samples as usize);
    for i in 0..samples {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        let id = *next_id;
        *next_id += 1;
        let (pool, http, key) = (
            writers.clone(),
            node.http.clone(),
            format!("{key_prefix}object:{id}"),
        );
        tasks.push(tokio::spawn(async move {
            let gtid: String = {
                let mut c = pool.get_conn().await.unwrap();
                c.exec_drop("UPDATE Object SET label = 'y' WHERE id = ?", (id,))
                    .await
                    .unwrap();
                c.query_first("SELECT @@last_gtid").await.unwrap().unwrap()
            };
            let committed = Instant::now();
            let status = wait_on(&http, &gtid, 10_000).await;
            (key, committed, status, committed.elapsed())
        }));
    }
    let achieved = samples as f64 / start.elapsed().as_secs_f64();
    let done: Vec<_> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    writers.disconnect().await.ok();
    let seen = deleted.lock().unwrap().clone();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut waits: Vec<f64> = done
        .iter()
        .filter(|r| r.2 == 200)
        .map(|r| ms(r.3))
        .collect();
    let mut purges: Vec<f64> = done
        .iter()
        .filter_map(|(k, t, _, _)| seen.get(k).map(|d| ms(d.saturating_duration_since(*t))))
        .collect();
    waits.sort_by(f64::total_cmp);
    purges.sort_by(f64::total_cmp);
    BarrierRow {
        fetch_wait,
        rate,
        achieved,
        samples: done.len(),
        not_ok: done.len() - waits.len(),
        wait_p50: percentile(&waits, 0.5),
        wait_p99: percentile(&waits, 0.99),
        wait_max: waits.last().copied().unwrap_or(f64::NAN),
        purge_p50: percentile(&purges, 0.5),
        purge_p99: percentile(&purges, 0.99),
    }
}

struct WaitersRow {
    waiters: usize,
    idle_cpu: f64,
    waiting_cpu: f64,
    idle_rss_mb: f64,
    waiting_rss_mb: f64,
    release_ms: f64,
    released_ok: usize,
}

/// `n` concurrent waiters for the next transaction: the node's CPU and RSS while they wait,
/// against the node idle, and the time one commit takes to release them all.
async fn many_waiters(db: &TestDb, node: &ConsumerProc, n: usize, next_id: &mut u64) -> WaitersRow {
    let pid = node.proc.pid();
    let tck = clk_tck();
    let measure = |secs: u64| async move {
        let (t0, _, _) = proc_stats(pid);
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let (t1, rss, _) = proc_stats(pid);
        (
            (t1 - t0) as f64 / tck / secs as f64 * 100.0,
            rss as f64 / 1024.0,
        )
    };
    let (idle_cpu, idle_rss_mb) = measure(3).await;
    let mut conn = db.pool.get_conn().await.unwrap();
    let write = |id: u64| format!("UPDATE Object SET label = 'w' WHERE id = {id}");
    conn.query_drop(write(*next_id)).await.unwrap();
    *next_id += 1;
    let last: String = conn
        .query_first("SELECT @@last_gtid")
        .await
        .unwrap()
        .unwrap();
    let (head, seq) = last.rsplit_once('-').unwrap();
    let target = format!("{head}-{}", seq.parse::<u64>().unwrap() + 1);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (http, target) = (node.http.clone(), target.clone());
            tokio::spawn(async move { wait_on(&http, &target, 120_000).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.metric("rtinval_consumer_barrier_waiters") < n as f64 {
        assert!(
            Instant::now() < deadline,
            "the waiters did not all register"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (waiting_cpu, waiting_rss_mb) = measure(3).await;
    let released = Instant::now();
    conn.query_drop(write(*next_id)).await.unwrap();
    *next_id += 1;
    let statuses = futures::future::join_all(tasks).await;
    let release_ms = released.elapsed().as_secs_f64() * 1000.0;
    WaitersRow {
        waiters: n,
        idle_cpu,
        waiting_cpu,
        idle_rss_mb,
        waiting_rss_mb,
        release_ms,
        released_ok: statuses
            .into_iter()
            .filter(|s| matches!(s, Ok(200)))
            .count(),
    }
}
