//! Proves what an operator sees when rtinval starts against something broken, with the real
//! binaries: a wrong source password reads as a failed login (startup_checks); Kafka
//! unreachable at start is a warning naming the brokers and the cause, repeated with backoff,
//! counted, with `/healthz` up and `/readyz` saying why — for the producer and the consumer;
//! the consumer's endpoint answers from the first moment; a cache unreachable at start is
//! retried, keeps the node not ready, and is flushed once reachable; a listen address in use
//! and every kind of wrong config key stop the binary with one line naming the file, the key
//! and the fix.
//!
//! Needs `scripts/stack up` and the binaries built. Run alone:
//! `cargo test -p rtinval-tests --test operator_errors`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use rtinval_tests::proxy::TcpProxy;
use rtinval_tests::{
    Bus, Proc, Stack, TestDb, bin, consumer_kafka_section, free_port, http_get, redis_server,
    server_id, unique, wait_ready, wait_sync,
};

/// A closed port on loopback: connections to it are refused.
fn closed_port() -> u16 {
    free_port()
}

fn count(log: &str, text: &str) -> usize {
    log.matches(text).count()
}

/// Start `binary` with `args` and a config, without waiting for anything.
fn spawn(dir: &std::path::Path, name: &str, binary: &str, config: &str, args: &[&str]) -> Proc {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    Proc::spawn(
        name,
        Command::new(bin(binary))
            .arg("--config")
            .arg(&path)
            .args(args),
        dir.join(format!("{name}.log")),
    )
}

/// SIGTERM; the process must exit 0 within 15 s.
fn stops_cleanly(p: &mut Proc) {
    let status = p.terminate(Duration::from_secs(15));
    let log = p.log_text();
    assert!(
        status.is_some_and(|s| s.success()),
        "did not exit 0 on SIGTERM ({status:?}):\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unreachable_at_start_is_a_repeated_warning_with_the_cause_not_silence() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = format!("127.0.0.1:{}", closed_port());
    let db = TestDb::create(
        "nokafka",
        "CREATE TABLE T (id INT PRIMARY KEY) ENGINE=InnoDB",
    )
    .await;
    let phttp = format!("127.0.0.1:{}", free_port());
    let producer_config = format!(
        "[source]\nurl = \"{}\"\ndatabase = \"{}\"\nserver_id = {}\n[kafka]\nbrokers = \"{brokers}\"\ntopic_prefix = \"{}\"\n\
         [http]\nlisten = \"{phttp}\"\n[[rules]]\ntable = \"T\"\nreset_pools = [\"p\"]\n",
        Stack::get().mysql_url,
        db.name,
        server_id(),
        unique("nokafka")
    );
    let chttp = format!("127.0.0.1:{}", free_port());
    let consumer_config = format!(
        "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{}\"\n[http]\nlisten = \"{chttp}\"\n\
         [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{}:\"\n",
        unique("nokafka"),
        Stack::get().redis_url,
        unique("nokafka")
    );
    let started = Instant::now();
    let mut producer = spawn(
        dir.path(),
        "producer",
        "rtinval-producer",
        &producer_config,
        &[],
    );
    let mut consumer = spawn(
        dir.path(),
        "consumer",
        "rtinval-consumer",
        &consumer_config,
        &["run"],
    );
    for (p, http, warning, metric) in [
        (
            &mut producer,
            &phttp,
            "Cannot create the topics: Kafka unreachable",
            "rtinval_producer_kafka_errors_total{code=\"BrokerTransportFailure\"}",
        ),
        (
            &mut consumer,
            &chttp,
            "Cannot start consuming: Kafka unreachable",
            "rtinval_consumer_kafka_errors_total{code=\"BrokerTransportFailure\"}",
        ),
    ] {
        // The endpoint is up while Kafka is not.
        wait_sync("/healthz", Duration::from_secs(10), || {
            http_get(http, "/healthz").filter(|(s, _)| *s == 200)
        });
        // Within seconds: a warning that names the brokers and the cause.
        let log = wait_sync("the warning", Duration::from_secs(20), || {
            let log = p.log_text();
            (log.contains(warning)
                && log.contains(&format!("brokers={brokers}"))
                && log.contains("Connection refused"))
            .then_some(log)
        });
        assert!(p.try_exit().is_none(), "exited instead of retrying:\n{log}");
        let (status, body) = http_get(http, "/readyz").unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains(&format!("Kafka at {brokers} unreachable"))
                && body.contains("Connection refused"),
            "{body}"
        );
        let (_, metrics) = http_get(http, "/metrics").unwrap();
        let counted = metrics
            .lines()
            .find_map(|l| l.strip_prefix(metric))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(counted >= 1.0, "{metric} not counted:\n{metrics}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    // Repeated, with backoff, while it retries.
    for (p, warning) in [
        (&mut producer, "Cannot create the topics: Kafka unreachable"),
        (&mut consumer, "Cannot start consuming: Kafka unreachable"),
    ] {
        wait_sync("a second warning", Duration::from_secs(30), || {
            (count(&p.log_text(), warning) >= 2).then_some(())
        });
        let log = p.log_text();
        assert!(log.contains("retry_in_secs=2"), "backoff grows:\n{log}");
        stops_cleanly(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_unreachable_at_start_keeps_the_node_not_ready_then_is_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("nocache");
    let bus = Bus::new(&prefix).await;
    let port = free_port();
    let _redis = redis_server(
        dir.path(),
        "redis",
        port,
        &["--save", "", "--appendonly", "no"],
    );
    // The cache holds an entry from before: the node cannot know what it missed meanwhile.
    let mut r = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    r.set::<_, _, ()>("c:object:1", "from before")
        .await
        .unwrap();
    // The node reaches its cache through an address that refuses for now.
    let proxy = TcpProxy::start(port);
    proxy.set_target(None);
    let http = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "{}[http]\nlisten = \"{http}\"\n[caches.rt]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{}\"\nprefix = \"c:\"\n",
        consumer_kafka_section(&prefix),
        proxy.port
    );
    let mut c = spawn(
        dir.path(),
        "consumer",
        "rtinval-consumer",
        &config,
        &["run"],
    );
    // Served from the first moment; not ready, naming the cache.
    wait_sync("/healthz", Duration::from_secs(5), || {
        http_get(&http, "/healthz").filter(|(s, _)| *s == 200)
    });
    assert!(http_get(&http, "/metrics").is_some_and(|(s, _)| s == 200));
    let body = wait_sync("/readyz names the cache", Duration::from_secs(20), || {
        http_get(&http, "/readyz")
            .and_then(|(s, b)| (s == 503 && b.contains("cache rt")).then_some(b))
    });
    assert!(body.contains("retrying"), "{body}");
    wait_sync("retried with backoff", Duration::from_secs(20), || {
        (count(&c.log_text(), "Cache unreachable at start; retrying") >= 2).then_some(())
    });
    assert!(c.try_exit().is_none(), "{}", c.log_text());
    assert!(r.exists::<_, bool>("c:object:1").await.unwrap());

    // The cache comes back: flushed before anything, then ready.
    proxy.set_target(Some(port));
    let node = rtinval_tests::ConsumerProc {
        proc: c,
        http: http.clone(),
    };
    node.wait_metric(
        "rtinval_consumer_resyncs_total{reason=\"cache_unreachable_at_start\"}",
        1.0,
        Duration::from_secs(60),
    );
    assert!(
        !r.exists::<_, bool>("c:object:1").await.unwrap(),
        "not flushed"
    );
    wait_ready(&bus, &node, Duration::from_secs(30)).await;
    let mut c = node.proc;
    stops_cleanly(&mut c);
}

#[test]
fn a_listen_address_in_use_names_the_key_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let consumer = format!(
        "[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"{listen}\"\n[caches.rt]\nkind = \"redis\"\nurl = \"{}\"\n",
        Stack::get().brokers,
        Stack::get().redis_url
    );
    let producer = format!(
        "[source]\nurl = \"{}\"\ndatabase = \"d\"\n[kafka]\nbrokers = \"{}\"\n[http]\nlisten = \"{listen}\"\n[[rules]]\ntable = \"T\"\nreset_pools = [\"p\"]\n",
        Stack::get().mysql_url,
        Stack::get().brokers
    );
    for (binary, config, args) in [
        ("rtinval-consumer", consumer, vec!["run"]),
        ("rtinval-producer", producer, vec![]),
    ] {
        let path = dir.path().join(format!("{binary}.toml"));
        std::fs::write(&path, config).unwrap();
        let out = Command::new(bin(binary))
            .arg("--config")
            .arg(&path)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.trim().lines().last().unwrap_or("");
        assert_eq!(out.status.code(), Some(1), "{binary}: {err}");
        assert!(
            last.contains(&path.display().to_string())
                && last.contains(&format!("http.listen {listen}"))
                && last.contains("in use")
                && last.contains("choose a free address"),
            "{binary}: {last}"
        );
    }
}

#[test]
fn every_kind_of_wrong_config_key_is_one_line_naming_file_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let consumer_base =
        "[kafka]\nbrokers = \"b:1\"\n[caches.rt]\nkind = \"redis\"\nurl = \"redis://h:1\"\n";
    let consumer_cases: Vec<(&str, String, &[&str])> = vec![
        (
            "type",
            format!("{consumer_base}[node]\nmax_staleness_secs = \"ten\"\n"),
            &["line 7", "node.max_staleness_secs", "expected u64"],
        ),
        (
            "range",
            format!("{consumer_base}[node]\nmax_staleness_secs = 0\n"),
            &["node.max_staleness_secs", "use at least 1"],
        ),
        (
            "unknown key",
            format!("{consumer_base}[node]\nmax_stale = 3\n"),
            &[
                "node.max_stale",
                "unknown field",
                "expected `max_staleness_secs`",
            ],
        ),
        (
            "unknown kind",
            "[kafka]\nbrokers = \"b:1\"\n[caches.rt]\nkind = \"redi\"\nurl = \"x\"\n".into(),
            &["caches.rt.kind", "expected `redis` or `memcached`"],
        ),
        (
            "empty brokers",
            consumer_base.replace("b:1", ""),
            &["kafka.brokers is empty", "set it to the bootstrap servers"],
        ),
        (
            "listen",
            format!("{consumer_base}[http]\nlisten = \"9465\"\n"),
            &["http.listen", "not host:port", "use e.g."],
        ),
        (
            "pool without pidfile",
            "[kafka]\nbrokers = \"b:1\"\n[pools.rtapi]\nreload = \"signal\"\n".into(),
            &["pools.rtapi", "needs pidfile"],
        ),
        (
            "flush mode of another kind",
            format!("{consumer_base}flush = \"flush_all\"\n"),
            &["caches.rt", "flush_all", "Redis uses"],
        ),
    ];
    let producer_base = "[source]\nurl = \"mysql://u:p@127.0.0.1:1\"\ndatabase = \"d\"\n[kafka]\nbrokers = \"b:1\"\n";
    let rule = "[[rules]]\ntable = \"T\"\nreset_pools = [\"p\"]\n";
    let producer_cases: Vec<(&str, String, &[&str])> = vec![
        (
            "type",
            format!("{producer_base}[producer]\nheartbeat_ms = \"x\"\n{rule}"),
            &["line 7", "producer.heartbeat_ms", "expected u64"],
        ),
        (
            "range",
            format!("{producer_base}[producer]\nkeys_per_event = 0\n{rule}"),
            &["producer.keys_per_event", "must be positive"],
        ),
        (
            "empty brokers",
            format!("{}{rule}", producer_base.replace("b:1", " ")),
            &["kafka.brokers is empty", "set it to the bootstrap servers"],
        ),
        (
            "listen",
            format!("{producer_base}[http]\nlisten = \"9464\"\n{rule}"),
            &["http.listen", "not host:port", "use e.g."],
        ),
        (
            "source url",
            format!("{}{rule}", producer_base.replace("mysql://", "postgres://")),
            &["source.url", "write mysql://user:password@host:port"],
        ),
        (
            "keys without a cache",
            format!("{producer_base}[[rules]]\ntable = \"T\"\nkeys = [\"t:{{id}}\"]\n"),
            &["rule #1", "keys name no cache", "add cache"],
        ),
        (
            "unknown rule key",
            format!("{producer_base}{rule}typo = 1\n"),
            &["rules.typo", "unknown field"],
        ),
    ];
    for (binary, cases, args) in [
        ("rtinval-consumer", consumer_cases, vec!["check-config"]),
        ("rtinval-producer", producer_cases, vec!["--check"]),
    ] {
        for (what, text, wanted) in cases {
            let path = dir.path().join(format!("{}.toml", what.replace(' ', "-")));
            std::fs::write(&path, &text).unwrap();
            let out = Command::new(bin(binary))
                .arg("--config")
                .arg(&path)
                .args(&args)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            assert_eq!(out.status.code(), Some(1), "{binary} {what}: {err}");
            let line = err.lines().last().unwrap_or("");
            assert_eq!(
                err.lines().count(),
                1,
                "{binary} {what}: one line, got:\n{err}"
            );
            assert!(
                line.contains(&path.display().to_string()),
                "{binary} {what}: names the file: {line}"
            );
            for w in wanted {
                assert!(
                    line.contains(w),
                    "{binary} {what}: {w:?} missing in: {line}"
                );
            }
        }
    }
}
