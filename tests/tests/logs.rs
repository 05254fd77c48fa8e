//! Proves what both binaries log for an operator, against the real stack: with
//! `--log-format json` every line on stderr is one JSON object; the effective configuration is
//! logged at start with every secret replaced by `***` (and no secret appears anywhere in the
//! log); progress lines carry the position (binlog file:pos for the producer, applied offsets
//! for the consumer). Needs `scripts/stack up` and the binaries built (`scripts/test` does
//! both). Run alone: `cargo test -p rtinval-tests --test logs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::Duration;

use rtinval_tests::{
    Proc, Stack, TestDb, bin, consumer_config, producer_config, unique, wait_sync,
};

const SCHEMA: &str =
    "CREATE TABLE Object (id INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY, name CHAR(255))";

/// Every line of the log as JSON; fails on a line that is not.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"))
        })
        .collect()
}

/// The `fields` of the lines whose message is `message`.
fn with_message(lines: &[serde_json::Value], message: &str) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter(|l| l["fields"]["message"] == message)
        .map(|l| l["fields"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_redact_secrets_and_report_progress_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let s = Stack::get();
    let db = TestDb::create("logs", SCHEMA).await;
    let prefix = unique("logs");
    // A user of its own, with a password that cannot appear in a log by chance.
    let source_password = format!("pw-{}", unique("secret"));
    let source_url = db
        .user(
            &format!("rtl_{}", std::process::id()),
            &source_password,
            "REPLICATION SLAVE, BINLOG MONITOR",
        )
        .await;
    let registry_password = "registry-secret-4711";
    let kafka_secret = "kafka-secret-0815";

    let producer_cfg = dir.path().join("producer.toml");
    std::fs::write(
        &producer_cfg,
        producer_config(
            &db.name,
            &prefix,
            &format!(
                "[source]\nurl = \"{source_url}\"\n\
                 [producer]\nheartbeat_ms = 200\ncheckpoint_ms = 200\nprogress_log_secs = 1\n\
                 [[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{{id}}\"]\n"
            ),
        ),
    )
    .unwrap();
    let mut producer = Proc::spawn(
        "producer",
        Command::new(bin("rtinval-producer"))
            .arg("--config")
            .arg(&producer_cfg)
            .arg("--log-format")
            .arg("json"),
        dir.path().join("producer.log"),
    );
    producer.wait_log("Streaming binlog.", Duration::from_secs(60));

    let consumer_cfg = dir.path().join("consumer.toml");
    std::fs::write(
        &consumer_cfg,
        consumer_config(
            &prefix,
            &format!("{prefix}-node"),
            &format!(
                "[kafka.options]\n\"sasl.password\" = \"{kafka_secret}\"\n\
                 [schema_registry]\nurl = \"http://127.0.0.1:9\"\nusername = \"rtinval\"\npassword = \"{registry_password}\"\n\
                 [node]\nprogress_log_secs = 1\n[http]\nlisten = \"\"\n\
                 [caches.rt]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}:\"\n",
                s.redis_url
            ),
        ),
    )
    .unwrap();
    let mut consumer = Proc::spawn(
        "consumer",
        Command::new(bin("rtinval-consumer"))
            .arg("--config")
            .arg(&consumer_cfg)
            .arg("run")
            .env("RTINVAL_LOG_FORMAT", "json"),
        dir.path().join("consumer.log"),
    );
    consumer.wait_log("Consuming.", Duration::from_secs(60));

    db.exec(
        "INSERT INTO Object (name) VALUES ('a'), ('b'); UPDATE Object SET name = 'c' WHERE id = 1",
    )
    .await;

    // The producer's progress line names a binlog position, and the rows it saw.
    let progress = wait_sync(
        "producer progress with rows",
        Duration::from_secs(30),
        || {
            let lines = json_lines(&producer.log_text());
            with_message(&lines, "Progress.")
                .into_iter()
                .find(|f| f["rows"].as_u64().is_some_and(|r| r >= 3))
        },
    );
    let position = progress["position"].as_str().unwrap();
    let (file, pos) = position
        .split_whitespace()
        .next()
        .unwrap()
        .rsplit_once(':')
        .unwrap();
    assert!(
        file.contains("bin") && pos.parse::<u64>().unwrap() > 4,
        "{position}"
    );

    // The consumer's progress line names the offset it applied up to on the cache-keys topic.
    let offsets = wait_sync(
        "consumer progress with offsets",
        Duration::from_secs(30),
        || {
            let lines = json_lines(&consumer.log_text());
            with_message(&lines, "Progress.").into_iter().find_map(|f| {
                let o = f["offsets"].as_str()?.to_owned();
                o.contains(&format!("{prefix}.cache-keys:0@")).then_some(o)
            })
        },
    );
    let next: i64 = offsets
        .split_whitespace()
        .find_map(|p| p.strip_prefix(&format!("{prefix}.cache-keys:0@")))
        .unwrap()
        .parse()
        .unwrap();
    assert!(next >= 1, "{offsets}");

    for (name, proc, secrets) in [
        ("producer", &producer, vec![source_password.as_str()]),
        ("consumer", &consumer, vec![registry_password, kafka_secret]),
    ] {
        let text = proc.log_text();
        let lines = json_lines(&text);
        let effective = with_message(&lines, "Effective configuration.");
        assert_eq!(effective.len(), 1, "{name}: one effective-config line");
        let config = effective[0]["config"].as_str().unwrap();
        assert!(
            config.contains("***"),
            "{name}: secrets are shown redacted: {config}"
        );
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "{name}: a secret appears in the log"
            );
        }
    }
    assert!(producer.terminate(Duration::from_secs(15)).is_some());
    assert!(consumer.terminate(Duration::from_secs(15)).is_some());
}
