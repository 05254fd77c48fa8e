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

/// Producer configs whose rules file is mounted beside them only when deployed (a ConfigMap,
/// a compose volume); deploy_manifests.rs loads them in that layout.
const MOUNTED: [&str; 2] = ["compose/producer.toml", "kubernetes/producer.toml"];

fn mounted_elsewhere(path: &std::path::Path) -> bool {
    MOUNTED
        .iter()
        .any(|m| path == workspace_root().join("deploy").join(m))
}

#[test]
fn every_producer_example_loads() {
    let files = examples("producer");
    assert!(!files.is_empty(), "no producer example in deploy/");
    for f in files {
        if mounted_elsewhere(&f) {
            continue;
        }
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
fn every_rules_file_in_deploy_is_read_by_a_producer_example() {
    let files = examples("rules");
    assert!(!files.is_empty(), "no rules file in deploy/");
    let included: Vec<PathBuf> = examples("producer")
        .iter()
        .filter(|p| !mounted_elsewhere(p))
        .flat_map(|p| {
            let c = rtinval_producer::config::Config::load(p).unwrap();
            let dir = p.parent().unwrap().to_path_buf();
            c.rules_files
                .iter()
                .map(|f| dir.join(f).canonicalize().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    for f in files {
        assert!(
            included.contains(&f.canonicalize().unwrap()),
            "{} is read by no producer example",
            f.display()
        );
    }
}

#[test]
fn every_toml_in_deploy_is_an_example_of_a_known_kind() {
    let all: Vec<PathBuf> = examples("");
    let known = examples("producer").len() + examples("consumer").len() + examples("rules").len();
    assert_eq!(
        all.len(),
        known,
        "deploy/ has TOML files that no test loads: {all:?}"
    );
}

fn promtool(args: &[&str]) -> std::process::Output {
    std::process::Command::new("promtool")
        .args(args)
        .current_dir(workspace_root().join("deploy/prometheus"))
        .output()
        .expect("promtool (Debian package prometheus; scripts/test installs it)")
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let out = promtool(&["check", "rules", "rtinval-alerts.yml"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = promtool(&["test", "rules", "rtinval-alerts.test.yml"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every series name the binaries can expose (from their registries' TYPE lines; a labelled
/// family shows its TYPE only once it has a series, so each gets one).
fn exposed_series() -> std::collections::BTreeSet<String> {
    use rtinval_consumer::metrics as c;
    use rtinval_producer::metrics as p;
    let pm = p::Metrics::new();
    let _ = pm
        .events_published
        .get_or_create(&p::KindLabel { kind: "x" });
    let _ = pm.rows.get_or_create(&p::TableOpLabels {
        table: "x".into(),
        op: "x",
    });
    let _ = pm.resyncs.get_or_create(&p::ReasonLabel { reason: "x" });
    let _ = pm
        .cache_flushes
        .get_or_create(&p::ReasonLabel { reason: "x" });
    let cm = c::Metrics::new();
    let _ = cm.events_applied.get_or_create(&c::KindLabel { kind: "x" });
    cm.resync("x");
    cm.pool_reloaded("x", 1, std::time::Duration::ZERO);
    cm.pool_reload_failed("x");
    cm.keys_purged("x", 1);
    cm.cache_flushed("x");
    cm.cache_failed("x");
    let text = pm.encode() + &cm.encode();
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        if f.next() != Some("#") || f.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (f.next(), f.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn dashboard_and_alerts_use_only_series_the_binaries_expose() {
    let exposed = exposed_series();
    assert!(
        exposed.contains("rtinval_consumer_staleness_seconds"),
        "{exposed:?}"
    );
    let dashboard =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/rtinval-dashboard.json"))
            .unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(json["panels"].as_array().is_some_and(|p| p.len() >= 10));
    let alerts =
        std::fs::read_to_string(workspace_root().join("deploy/prometheus/rtinval-alerts.yml"))
            .unwrap();
    let mut used = 0;
    for text in [&dashboard, &alerts] {
        for (i, _) in text.match_indices("rtinval_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exposed.contains(&name),
                "{name} is not exposed by either binary: {exposed:?}"
            );
            used += 1;
        }
    }
    assert!(used > 20);
}
