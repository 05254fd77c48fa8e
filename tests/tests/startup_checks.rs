//! Proves that bad input stops the binaries with one clear line naming the problem and the
//! fix, before anything is streamed or applied: a rule naming a missing column or table
//! (checked against the live schema), and malformed configs. Needs `scripts/stack up` and the
//! binaries built. Run alone: `cargo test -p rtinval-tests --test startup_checks`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;

use rtinval_tests::{Stack, TestDb, bin};

const SCHEMA: &str = include_str!("../fixtures/racktables/schema.sql");

fn producer_check(db: &str, rule: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let s = Stack::get();
    rtinval_tests::producer_check(
        dir.path(),
        &format!(
            "[source]\nurl = \"{}\"\ndatabase = \"{db}\"\n[kafka]\nbrokers = \"{}\"\n[[rules]]\n{rule}\n",
            s.mysql_url, s.brokers
        ),
    )
}

#[tokio::test]
async fn rules_are_checked_against_the_live_schema() {
    let db = TestDb::create("checks", SCHEMA).await;

    let (code, out) = producer_check(
        &db.name,
        "table = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{id}\"]",
    );
    assert_eq!(code, Some(0), "{out}");

    let (code, out) = producer_check(
        &db.name,
        "table = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{serial}\"]",
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!("{}.Object", db.name))
            && out.contains("column \"serial\" does not exist"),
        "{out}"
    );

    let (code, out) = producer_check(&db.name, "table = \"Objects\"\nreset_pools = [\"rtapi\"]");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("table does not exist"), "{out}");
}

#[tokio::test]
async fn a_wrong_password_is_named_as_a_failed_login_not_a_missing_grant() {
    let db = TestDb::create("authcheck", SCHEMA).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Stack::get();
    let (user_pass, host) = s.mysql_url.rsplit_once('@').unwrap();
    let user = user_pass
        .trim_start_matches("mysql://")
        .split(':')
        .next()
        .unwrap();
    let (code, out) = rtinval_tests::producer_check(
        dir.path(),
        &format!(
            "[source]\nurl = \"mysql://{user}:not-the-password@{host}\"\ndatabase = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[[rules]]\ntable = \"Object\"\nreset_pools = [\"rtapi\"]\n",
            db.name, s.brokers
        ),
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("refused the login")
            && out.contains("user or password in source.url is wrong"),
        "{out}"
    );
    assert!(
        !out.to_lowercase().contains("grant"),
        "no grant advice for a failed login: {out}"
    );
    assert!(
        !out.contains("not-the-password"),
        "the password is not echoed: {out}"
    );
}

#[test]
fn malformed_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("consumer.toml");
    std::fs::write(
        &p,
        "[kafka]\nbrokers = \"127.0.0.1:1\"\n[pools.rtapi]\nreload = \"signal\"\n",
    )
    .unwrap();
    let out = Command::new(bin("rtinval-consumer"))
        .arg("--config")
        .arg(&p)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pools.rtapi") && err.contains("pidfile"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    std::fs::write(
        &p,
        "[kafka]\nbrokers = \"x\"\n[caches.rt]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n",
    )
    .unwrap();
    let out = Command::new(bin("rtinval-consumer"))
        .arg("--config")
        .arg(&p)
        .arg("check-config")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let p = dir.path().join("producer.toml");
    std::fs::write(&p, "[source]\nurl = \"mysql://u:p@h:1\"\n[kafka]\nbrokers = \"b:1\"\n[[rules]]\ntable = \"Object\"\nreset_pools = [\"p\"]\n").unwrap();
    let out = Command::new(bin("rtinval-producer"))
        .arg("--config")
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("source.database"), "{err}");
}

/// `--version` names the crate version and the event schema version the binary speaks, and
/// the latter is the one the schemas crate defines (both binaries spell it out by hand).
#[test]
fn version_names_the_event_schema_version_in_use() {
    for name in ["rtinval-producer", "rtinval-consumer"] {
        let out = Command::new(bin(name)).arg("--version").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.trim(),
            format!(
                "{name} {} (event schema_version {})",
                env!("CARGO_PKG_VERSION"),
                rtinval_schemas::SCHEMA_VERSION
            ),
            "{name} --version"
        );
    }
}
