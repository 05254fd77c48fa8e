//! End-to-end latency on the real local stack: single-row `Object` updates at a steady rate,
//! each timed from the moment its COMMIT returned to the client until Redis reports the key's
//! deletion (keyspace notification) — binlog → producer → Kafka → consumer → UNLINK.
//!
//! `--rates 200,2000` (tx/s), `--samples N` per rate (default 10,000), `--fetch-wait-ms 50,10`
//! (the consumer's `fetch.wait.max.ms`: every rate runs once per setting, each with a node of its
//! own; 50 is the consumer's default). Prints p50, p99 and max per setting and rate and writes
//! `target/bench/latency.json`. Run with `scripts/bench`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step aborts it

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use redis::AsyncCommands;
use rtinval_tests::{
    ConsumerProc, PrivateBroker, Proc, Stack, TestDb, server_id, unique, wait_sync,
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
            other => panic!("unknown argument {other}"),
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
    let total = a.samples * (a.rates.len() * a.fetch_waits.len()) as u64;
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
    let pcfg = format!(
        "[source]\nurl = \"{}\"\ndatabase = \"{}\"\nserver_id = {}\n[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n\
         {}[http]\nlisten = \"\"\n[[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{{id}}\"]\n",
        s.mysql_url,
        db.name,
        server_id(),
        brokers,
        options_toml(&a.producer_options)
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
    let mut next_id = 1u64;
    for &wait in &a.fetch_waits {
        // A node per setting: its own group, started after everything before it was applied.
        let mut options = vec![("fetch.wait.max.ms".to_owned(), wait.to_string())];
        options.extend(a.consumer_options.iter().cloned());
        let ccfg = format!(
            "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\ngroup_id = \"{prefix}-node-{wait}\"\n\
         {}[caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{key_prefix}\"\n",
            brokers,
            options_toml(&options),
            s.redis_url
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
    assert!(
        results.iter().all(|r| r.4 == 0),
        "some invalidations never arrived"
    );
}
