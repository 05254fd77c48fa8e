//! Producer throughput on the real local stack, beside the ceiling and a common peer, all on the
//! same binlog range in one run:
//! - rtinval-producer (release): binlog → rules → batches → Kafka acknowledged, rows/s from its
//!   first decoded row to the last acknowledged one (and including process start-up), CPU
//!   seconds, peak RSS;
//! - the raw decode rate of the same range with the same library (mysql_async/mysql_common,
//!   every row decoded, no rules, no Kafka) — with the library's row iterator (the ceiling the
//!   issue names), and with the decoder rtinval uses (mysql_common's value parser, column facts
//!   read once per table map), the ceiling of rtinval's own pipeline;
//! - Python's `mysql-replication` package reading the same range (a common peer).
//!
//! The range: `--changes N` row changes in a RackTables-like `Object` table, half as batched
//! inserts (1,000 rows per transaction), half as one large UPDATE. Prints a table and writes
//! `target/bench/producer.json`. Run with `scripts/bench-producer`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed step aborts it

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mysql_async::prelude::Queryable;
use rtinval_tests::{
    PrivateBroker, Proc, Stack, TestDb, free_port, http_get, producer_config, server_id, unique,
};

struct Args {
    changes: u64,
    producer_bin: PathBuf,
    python: String,
}

fn args() -> Args {
    let mut a = Args {
        changes: 1_000_000,
        producer_bin: PathBuf::from("target/release/rtinval-producer"),
        python: "python3".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--changes" => a.changes = it.next().and_then(|v| v.parse().ok()).expect("--changes N"),
            "--producer-bin" => {
                a.producer_bin = it.next().map(PathBuf::from).expect("--producer-bin PATH")
            }
            "--python" => a.python = it.next().expect("--python PATH"),
            other => panic!(
                "unknown argument {other}; use --changes N --producer-bin PATH --python PATH"
            ),
        }
    }
    a
}

async fn master_status(pool: &mysql_async::Pool) -> (String, u64) {
    let mut c = pool.get_conn().await.unwrap();
    let row: mysql_async::Row = c.query_first("SHOW MASTER STATUS").await.unwrap().unwrap();
    (row.get(0).unwrap(), row.get(1).unwrap())
}

fn proc_cpu_and_peak(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, a)| a.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (ticks as f64 / 100.0, hwm)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = args();
    let s = Stack::get();
    let half = a.changes / 2;
    let db = TestDb::create(
        "benchp",
        "CREATE TABLE Object (id INT UNSIGNED PRIMARY KEY, name CHAR(64), label CHAR(64), objtype_id INT UNSIGNED NOT NULL DEFAULT 1) ENGINE=InnoDB",
    )
    .await;
    let (start_file, start_pos) = master_status(&db.pool).await;
    let t = Instant::now();
    let mut conn = db.pool.get_conn().await.unwrap();
    let mut next = 1;
    while next <= half {
        let last = (next + 999).min(half);
        conn.query_drop(format!(
            "INSERT INTO Object SELECT seq, CONCAT('obj-', seq), 'l', 1 FROM seq_{next}_to_{last}"
        ))
        .await
        .unwrap();
        next = last + 1;
    }
    conn.query_drop("UPDATE Object SET label = 'moved'")
        .await
        .unwrap();
    drop(conn);
    let (end_file, end_pos) = master_status(&db.pool).await;
    println!(
        "wrote {} row changes in {:?}: binlog {start_file}:{start_pos} .. {end_file}:{end_pos}",
        half * 2,
        t.elapsed()
    );
    let rows = half * 2;

    // 1. The ceilings: decode every row of the range, nothing else — with the library's row
    // iterator, and with the decoder rtinval uses.
    let (ceiling_rows, ceiling_secs) = raw_decode(
        &s.mysql_url,
        &start_file,
        start_pos,
        &end_file,
        end_pos,
        Decoder::LibraryRows,
    )
    .await;
    let (own_rows, own_secs) = raw_decode(
        &s.mysql_url,
        &start_file,
        start_pos,
        &end_file,
        end_pos,
        Decoder::Rtinval,
    )
    .await;
    assert_eq!(own_rows, ceiling_rows, "both decoders see every row");

    // 2. rtinval-producer from a checkpoint at the start of the range to the end, acknowledged.
    let prefix = unique("benchp");
    let dir = tempfile::tempdir().unwrap();
    // A broker of its own: the shared one carries every test's topics and load.
    let broker = PrivateBroker::start(dir.path());
    let brokers = broker.brokers();
    seed_checkpoint(&brokers, &prefix, &start_file, start_pos).await;
    let http = format!("127.0.0.1:{}", free_port());
    let cfg = producer_config(
        &db.name,
        &prefix,
        &format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[http]\nlisten = \"{http}\"\n\
             [[rules]]\ntable = \"Object\"\nreset_pools = [\"rtapi\"]\ncache = \"rt\"\nkeys = [\"object:{{id}}\", \"object_name:{{name}}\"]\n"
        ),
    );
    std::fs::write(dir.path().join("p.toml"), cfg).unwrap();
    let t = Instant::now();
    let mut p = Proc::spawn(
        "producer",
        Command::new(&a.producer_bin)
            .arg("--config")
            .arg(dir.path().join("p.toml")),
        dir.path().join("p.log"),
    );
    let end_reached = |body: &str| {
        body.lines().any(|l| {
            l.strip_prefix("rtinval_producer_position_bytes ")
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|v| v >= end_pos)
        })
    };
    let rows_seen = |body: &str| {
        body.lines()
            .filter(|l| l.starts_with("rtinval_producer_rows_total"))
            .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
            .sum::<f64>()
    };
    // Polled every few ms: when the first row was decoded (start-up done: checks, leader lock,
    // topics, checkpoint, binlog connection) and when the last was acknowledged.
    let mut first_row: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        assert!(p.try_exit().is_none(), "producer exited:\n{}", p.log_text());
        assert!(
            Instant::now() < deadline,
            "the producer's acknowledged position did not reach the end of the range"
        );
        if let Some((_, body)) = http_get(&http, "/metrics") {
            if first_row.is_none() && rows_seen(&body) > 0.0 {
                first_row = Some(Instant::now());
            }
            if end_reached(&body) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let streaming_secs = first_row.map_or(f64::NAN, |f| f.elapsed().as_secs_f64());
    let rtinval_secs = t.elapsed().as_secs_f64();
    let (cpu, peak_kb) = proc_cpu_and_peak(p.pid());
    drop(p);

    // 3. The peer: Python mysql-replication over the same range.
    let (py_rows, py_secs) = python_peer(
        &a.python,
        &s.mysql_url,
        &start_file,
        start_pos,
        &end_file,
        end_pos,
    );

    let rtinval_rate = rows as f64 / rtinval_secs;
    let streaming_rate = rows as f64 / streaming_secs;
    let ceiling_rate = ceiling_rows as f64 / ceiling_secs;
    let own_rate = own_rows as f64 / own_secs;
    let py_rate = py_rows as f64 / py_secs;
    println!("\nproducer throughput over {rows} row changes (binlog → acknowledged by Kafka)");
    println!("{:<58} {:>12}", "measure", "value");
    let lines = [
        (
            "rtinval-producer, first row to last acknowledged (rows/s)",
            streaming_rate,
        ),
        ("  incl. process start-up (rows/s)", rtinval_rate),
        ("  start-up (s)", rtinval_secs - streaming_secs),
        ("  CPU seconds (whole process)", cpu),
        ("  peak RSS (MB)", peak_kb as f64 / 1024.0),
        (
            "ceiling: mysql_common's row iterator, decode only (rows/s)",
            ceiling_rate,
        ),
        (
            "  rtinval as % of this ceiling",
            streaming_rate / ceiling_rate * 100.0,
        ),
        (
            "ceiling: rtinval's decoder (same value parser), decode only",
            own_rate,
        ),
        (
            "  rtinval as % of this ceiling",
            streaming_rate / own_rate * 100.0,
        ),
        (
            "peer: Python mysql-replication, decode only (rows/s)",
            py_rate,
        ),
        ("  rtinval / Python", streaming_rate / py_rate),
    ];
    for (name, v) in lines {
        println!("{name:<58} {v:>12.1}");
    }
    let json = serde_json::json!({
        "row_changes": rows,
        "rtinval_rows_per_s": streaming_rate,
        "rtinval_streaming_seconds": streaming_secs,
        "rtinval_rows_per_s_incl_startup": rtinval_rate,
        "rtinval_seconds_incl_startup": rtinval_secs,
        "rtinval_cpu_seconds": cpu,
        "rtinval_peak_rss_mb": peak_kb as f64 / 1024.0,
        "decode_ceiling_rows_per_s": ceiling_rate,
        "decode_ceiling_rtinval_decoder_rows_per_s": own_rate,
        "python_mysql_replication_rows_per_s": py_rate,
        "python_rows": py_rows,
    });
    let out = rtinval_tests::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("producer.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    println!("wrote {}", out.join("producer.json").display());
}

/// Write the checkpoint a producer group resumes from (the format of producer/src/checkpoint.rs).
async fn seed_checkpoint(brokers: &str, prefix: &str, file: &str, pos: u64) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = c.create().unwrap();
    let topic = format!("{prefix}.checkpoints");
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let producer: rdkafka::producer::FutureProducer = c.create().unwrap();
    let payload =
        serde_json::json!({"file": file, "pos": pos, "server_id": 1, "updated_at": 0}).to_string();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&topic)
                .key("default")
                .payload(&payload)
                .partition(0),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// Decode every row of the range with mysql_async's binlog stream; (rows, seconds).
/// How the ceiling decodes rows.
#[derive(Clone, Copy)]
enum Decoder {
    /// mysql_common's row iterator (`RowsEvent::rows`): the library as documented.
    LibraryRows,
    /// The decoder rtinval-producer uses (`TableShape::rows`: mysql_common's value parser,
    /// column facts read once per table map).
    Rtinval,
}

async fn raw_decode(
    url: &str,
    file: &str,
    pos: u64,
    end_file: &str,
    end_pos: u64,
    decoder: Decoder,
) -> (u64, f64) {
    use mysql_async::binlog::events::EventData;
    let conn = mysql_async::Conn::new(mysql_async::Opts::from_url(url).unwrap())
        .await
        .unwrap();
    let t = Instant::now();
    let request = mysql_async::BinlogStreamRequest::new(server_id())
        .with_filename(file.as_bytes())
        .with_pos(pos);
    let mut stream = conn.get_binlog_stream(request).await.unwrap();
    let mut rows = 0u64;
    let mut current = file.to_owned();
    let mut shapes: std::collections::HashMap<u64, rtinval_producer::decode::TableShape> =
        std::collections::HashMap::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("binlog read")
    {
        let event = event.unwrap();
        let log_pos = u64::from(event.header().log_pos());
        match event.read_data() {
            Ok(Some(EventData::TableMapEvent(tme))) => {
                if let Decoder::Rtinval = decoder {
                    shapes.entry(tme.table_id()).or_insert_with(|| {
                        rtinval_producer::decode::TableShape::from_table_map(&tme)
                            .expect("column names in the table map")
                    });
                }
            }
            Ok(Some(EventData::RowsEvent(re))) => match decoder {
                Decoder::LibraryRows => {
                    if let Some(tme) = stream.get_tme(re.table_id()) {
                        for row in re.rows(tme) {
                            let (before, after) = row.unwrap();
                            std::hint::black_box((before, after));
                            rows += 1;
                        }
                    }
                }
                Decoder::Rtinval => {
                    if let Some(shape) = shapes.get(&re.table_id()) {
                        for row in shape.rows(&re).expect("the decoder applies") {
                            std::hint::black_box(row.unwrap());
                            rows += 1;
                        }
                    }
                }
            },
            // A rotate event's log_pos is a position in the file it closes.
            Ok(Some(EventData::RotateEvent(r))) if log_pos != 0 => {
                current = r.name().into_owned();
                continue;
            }
            _ => {}
        }
        if current == end_file && log_pos >= end_pos {
            break;
        }
    }
    (rows, t.elapsed().as_secs_f64())
}

/// Python mysql-replication over the range; (rows, seconds).
fn python_peer(
    python: &str,
    url: &str,
    file: &str,
    pos: u64,
    end_file: &str,
    end_pos: u64,
) -> (u64, f64) {
    let opts = mysql_async::Opts::from_url(url).unwrap();
    let script = r#"
import sys, time
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent
host, port, user, pw, sid, f, p, ef, ep = sys.argv[1:]
t = time.time()
# Non-blocking: the stream ends at the end of the binlog (everything written is there already).
# is_mariadb=False: a file:pos dump (with True the package asks for a GTID dump from the start).
s = BinLogStreamReader(connection_settings={"host": host, "port": int(port), "user": user, "passwd": pw},
                       server_id=int(sid), log_file=f, log_pos=int(p), resume_stream=True, blocking=False,
                       is_mariadb=False)
rows = 0
for ev in s:
    if isinstance(ev, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
        rows += len(ev.rows)
    if s.log_file == ef and s.log_pos >= int(ep):
        break
s.close()
print(rows, time.time() - t)
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .args([
            opts.ip_or_hostname().to_string(),
            opts.tcp_port().to_string(),
            opts.user().unwrap_or("root").to_owned(),
            opts.pass().unwrap_or("").to_owned(),
            server_id().to_string(),
            file.to_owned(),
            pos.to_string(),
            end_file.to_owned(),
            end_pos.to_string(),
        ])
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python peer: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    (
        f.next().unwrap().parse().unwrap(),
        f.next().unwrap().parse().unwrap(),
    )
}
