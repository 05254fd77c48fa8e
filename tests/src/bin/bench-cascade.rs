//! The cascade index's cost, beside the same producer with it switched off, in one run on the
//! real local stack (RackTables' schema, the shipped rule set, release builds):
//! - start-up: process start to "Streaming binlog." with `--child-rows` indexed rows
//!   (default 1,000,000: 90% `Port` rows of servers with ten ports each, 10% `Link` rows);
//! - RSS after start-up, and the index's own estimate (`rtinval_producer_cascade_index_bytes`);
//! - throughput over the same binlog range: `--ops` servers created (one object, ten ports,
//!   five links each) and then decommissioned (one logged `DELETE` each, which InnoDB cascades
//!   to the ports and links), read by both producers after their start-up (each is paused with
//!   SIGSTOP while the range is written, then resumed alone), in binlog rows per second to
//!   Kafka acknowledgment; and what each published for the deletes (keys or flushes).
//!
//! Prints a table and writes `target/bench/cascade.json`. Run with `scripts/bench-cascade`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step aborts it

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use rtinval_tests::{
    PrivateBroker, Proc, TestDb, clk_tck, free_port, http_get, proc_stats,
    racktables_producer_config,
};

struct Args {
    child_rows: u64,
    ops: u64,
    producer_bin: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        child_rows: 1_000_000,
        ops: 10_000,
        producer_bin: PathBuf::from("target/release/rtinval-producer"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} N"))
        };
        match arg.as_str() {
            "--child-rows" => a.child_rows = num("--child-rows"),
            "--ops" => a.ops = num("--ops"),
            "--producer-bin" => {
                a.producer_bin = it.next().map(PathBuf::from).expect("--producer-bin PATH")
            }
            other => {
                panic!("unknown argument {other}; use --child-rows N --ops N --producer-bin PATH")
            }
        }
    }
    a
}

const SCHEMA: &str = include_str!("../../fixtures/racktables/racktables-0.22.sql");

async fn master_status(pool: &mysql_async::Pool) -> (String, u64) {
    let mut c = pool.get_conn().await.unwrap();
    let row: mysql_async::Row = c.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
    (row.get(0).unwrap(), row.get(1).unwrap())
}

/// One producer under measurement.
struct Run {
    name: &'static str,
    proc: Proc,
    http: String,
    startup_secs: f64,
    rss_kb: u64,
    index_bytes: f64,
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn start(dir: &Path, name: &'static str, config: String, bin: &Path, http: String) -> Run {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let t = Instant::now();
    let mut proc = Proc::spawn(
        name,
        Command::new(bin).arg("--config").arg(&path),
        dir.join(format!("{name}.log")),
    );
    proc.wait_log("Streaming binlog.", Duration::from_secs(600));
    let startup_secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let (_, rss_kb, _) = proc_stats(proc.pid());
    let (_, body) = http_get(&http, "/metrics").unwrap_or_default();
    Run {
        name,
        proc,
        http,
        startup_secs,
        rss_kb,
        index_bytes: metric(&body, "rtinval_producer_cascade_index_bytes"),
    }
}

fn signal(p: &Proc, sig: &str) {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(p.pid().to_string())
        .status()
        .unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let ports = a.child_rows * 9 / 10;
    let links = a.child_rows - ports;
    let objects = ports.div_ceil(10);
    assert!(
        links * 2 <= ports,
        "--child-rows too small for the link share"
    );
    let db = TestDb::create("benchcasc", SCHEMA).await;
    let t = Instant::now();
    let mut c = db.pool.get_conn().await.unwrap();
    c.query_drop("SET foreign_key_checks = 0").await.unwrap();
    let chunk = 100_000;
    let fill = |table: &str, total: u64, select: &str| {
        let mut stmts = Vec::new();
        let mut next = 1;
        while next <= total {
            let last = (next + chunk - 1).min(total);
            stmts.push(format!(
                "INSERT INTO {table} {} FROM seq_{next}_to_{last}",
                select
            ));
            next = last + 1;
        }
        stmts
    };
    let mut stmts = fill(
        "Object (id, name, objtype_id)",
        objects,
        "SELECT seq, CONCAT('srv-', seq), 4",
    );
    stmts.extend(fill(
        "Port (id, object_id, name, iif_id, type)",
        ports,
        "SELECT seq, 1 + (seq - 1) DIV 10, CONCAT('eth', seq), 1, 24",
    ));
    // Port 2k-1 linked to port 2k.
    stmts.extend(fill(
        "Link (porta, portb)",
        links,
        "SELECT 2 * seq - 1, 2 * seq",
    ));
    for s in stmts {
        c.query_drop(s).await.unwrap();
    }
    c.query_drop("ALTER TABLE Object AUTO_INCREMENT = 100000000")
        .await
        .unwrap();
    println!(
        "loaded {objects} objects, {ports} ports, {links} links in {:.1?}",
        t.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let broker = PrivateBroker::start(dir.path());
    let brokers = broker.brokers();
    let config = |prefix: &str, index: bool, http: &str| {
        racktables_producer_config(&db.name, prefix, |c| {
            c["kafka"]
                .as_table_mut()
                .unwrap()
                .insert("brokers".into(), brokers.clone().into());
            let p = c["producer"].as_table_mut().unwrap();
            p.insert("cascade_index".into(), index.into());
            p.insert("progress_log_secs".into(), 0.into());
            // Paused with SIGSTOP while the range is written: no read timeout on resume.
            c["source"]
                .as_table_mut()
                .unwrap()
                .insert("read_timeout_secs".into(), 3600.into());
            c["http"]
                .as_table_mut()
                .unwrap()
                .insert("listen".into(), http.into());
        })
    };
    let mut runs = Vec::new();
    for (name, index) in [("index-on", true), ("index-off", false)] {
        let http = format!("127.0.0.1:{}", free_port());
        let prefix = rtinval_tests::unique(name);
        let run = start(
            dir.path(),
            name,
            config(&prefix, index, &http),
            &a.producer_bin,
            http,
        );
        println!("{name}: streaming after {:.2} s", run.startup_secs);
        signal(&run.proc, "STOP");
        runs.push((run, prefix));
    }

    // The range: servers created, then decommissioned (100 per transaction).
    let (_, start_pos) = master_status(&db.pool).await;
    let base = objects * 10 + 1;
    let t = Instant::now();
    let mut created = 0;
    while created < a.ops {
        let n = (a.ops - created).min(100);
        let first = 50_000_000 + created;
        let last = first + n - 1;
        let pfirst = base + created * 10;
        c.query_drop("BEGIN").await.unwrap();
        c.query_drop(format!(
            "INSERT INTO Object (id, name, objtype_id) SELECT seq, CONCAT('new-', seq), 4 FROM seq_{first}_to_{last}"
        ))
        .await
        .unwrap();
        c.query_drop(format!(
            "INSERT INTO Port (id, object_id, name, iif_id, type) SELECT {pfirst} + seq, {first} + seq DIV 10, CONCAT('n', seq), 1, 24 FROM seq_0_to_{}",
            n * 10 - 1
        ))
        .await
        .unwrap();
        c.query_drop(format!(
            "INSERT INTO Link (porta, portb) SELECT {pfirst} + 2 * seq, {pfirst} + 2 * seq + 1 FROM seq_0_to_{}",
            n * 5 - 1
        ))
        .await
        .unwrap();
        c.query_drop("COMMIT").await.unwrap();
        created += n;
    }
    let mut deleted = 0;
    while deleted < a.ops {
        let n = (a.ops - deleted).min(100);
        let first = 50_000_000 + deleted;
        c.query_drop(format!(
            "DELETE FROM Object WHERE id BETWEEN {first} AND {}",
            first + n - 1
        ))
        .await
        .unwrap();
        deleted += n;
    }
    drop(c);
    let (_, end_pos) = master_status(&db.pool).await;
    let logged = a.ops * 17;
    let cascaded = a.ops * 15;
    println!(
        "wrote the range in {:.1?}: {logged} logged row changes, {cascaded} rows cascaded by InnoDB",
        t.elapsed()
    );

    let mut results = Vec::new();
    for (run, prefix) in &mut runs {
        let t = Instant::now();
        signal(&run.proc, "CONT");
        let deadline = Instant::now() + Duration::from_secs(900);
        loop {
            assert!(run.proc.try_exit().is_none(), "{} exited", run.name);
            assert!(
                Instant::now() < deadline,
                "{} did not reach the end",
                run.name
            );
            let (_, body) = http_get(&run.http, "/metrics").unwrap_or_default();
            if metric(&body, "rtinval_producer_position_bytes ") >= end_pos as f64 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let secs = t.elapsed().as_secs_f64();
        let (ticks, _, hwm_kb) = proc_stats(run.proc.pid());
        let cpu = ticks as f64 / clk_tck();
        let events =
            rtinval_tests::read_events_from(&brokers, &format!("{prefix}.cache-keys")).await;
        let mut keys = 0usize;
        let mut flushes = 0usize;
        for e in events.iter().filter(|e| e.source.pos > start_pos) {
            match &e.body {
                rtinval_schemas::EventBody::CacheKeys { keys: k, .. } => keys += k.len(),
                rtinval_schemas::EventBody::CacheFlush { .. } => flushes += 1,
                _ => {}
            }
        }
        results.push((
            run.name,
            run.startup_secs,
            run.rss_kb,
            run.index_bytes,
            logged as f64 / secs,
            secs,
            cpu,
            hwm_kb,
            keys,
            flushes,
        ));
        signal(&run.proc, "STOP");
    }
    for (run, _) in &mut runs {
        signal(&run.proc, "CONT");
        run.proc.terminate(Duration::from_secs(30));
    }

    println!(
        "\ncascade index: {} indexed child rows ({ports} ports, {links} links); range: {} servers created and decommissioned",
        a.child_rows, a.ops
    );
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>9} {:>9} {:>10} {:>8}",
        "producer",
        "start s",
        "RSS MB",
        "index MB",
        "rows/s",
        "range s",
        "CPU s",
        "peak MB",
        "keys",
        "flushes"
    );
    for (name, startup, rss, ix, rate, secs, cpu, hwm, keys, flushes) in &results {
        println!(
            "{name:<10} {startup:>10.2} {:>10.1} {:>12.1} {rate:>12.0} {secs:>10.2} {cpu:>9.2} {:>9.1} {keys:>10} {flushes:>8}",
            *rss as f64 / 1024.0,
            ix / 1e6,
            *hwm as f64 / 1024.0,
        );
    }
    let (on, off) = (&results[0], &results[1]);
    let per_row = (on.2 as f64 - off.2 as f64) * 1024.0 / a.child_rows as f64;
    println!(
        "RSS per indexed row: {per_row:.0} bytes (index estimate {:.0} bytes)",
        on.3 / a.child_rows as f64
    );
    let json = serde_json::json!({
        "child_rows": a.child_rows,
        "ops": a.ops,
        "logged_rows": logged,
        "cascaded_rows": cascaded,
        "rss_bytes_per_indexed_row": per_row,
        "runs": results.iter().map(|(name, startup, rss, ix, rate, secs, cpu, hwm, keys, flushes)| serde_json::json!({
            "producer": name, "startup_seconds": startup, "rss_mb_after_startup": *rss as f64 / 1024.0,
            "index_bytes_estimate": ix, "rows_per_s": rate, "range_seconds": secs, "cpu_seconds": cpu,
            "peak_rss_mb": *hwm as f64 / 1024.0, "keys": keys, "flushes": flushes,
        })).collect::<Vec<_>>(),
    });
    let out = rtinval_tests::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("cascade.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("cascade.json").display());
}
