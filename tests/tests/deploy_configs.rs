//! Proves that every example config shipped in `deploy/` loads and validates with the same code
//! the binaries use, so the examples cannot rot. Run alone:
//! `cargo test -p rtinval-tests --test deploy_configs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::path::PathBuf;

use rtinval_tests::workspace_root;

fn examples(kind: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![workspace_root().join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("deploy/ exists") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(kind) && n.ends_with(".toml"))
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[test]
fn every_producer_example_loads() {
    let files = examples("producer");
    assert!(!files.is_empty(), "no producer example in deploy/");
    for f in files {
        let c = rtinval_producer::config::Config::load(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            !c.rules.is_empty(),
            "{}: an example without rules",
            f.display()
        );
    }
}

#[test]
fn every_consumer_example_loads() {
    let files = examples("consumer");
    assert!(!files.is_empty(), "no consumer example in deploy/");
    for f in files {
        let c = rtinval_consumer::config::Config::load(&f)
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            !c.pools.is_empty() || !c.caches.is_empty(),
            "{}",
            f.display()
        );
    }
}

#[test]
fn every_toml_in_deploy_is_an_example_of_a_known_kind() {
    let all: Vec<PathBuf> = examples("");
    let known = examples("producer").len() + examples("consumer").len();
    assert_eq!(
        all.len(),
        known,
        "deploy/ has TOML files that no test loads: {all:?}"
    );
}
