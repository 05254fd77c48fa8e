//! Proves the deployment files in `deploy/` are consistent with the binaries and with each
//! other, as far as this machine can check them (no Docker engine, no Kubernetes):
//! - systemd units pass `systemd-analyze verify` (against a scratch root holding the built
//!   binaries), and every command line in them is one the binaries accept;
//! - Kubernetes manifests parse, the producer runs two replicas, probes hit `/healthz` and
//!   `/readyz` on the ports the configs listen on, and the ConfigMaps the kustomization
//!   generates hold configs that load (rules file included) as mounted;
//! - the compose file parses, every file it mounts exists, MySQL runs with the binlog settings
//!   the producer checks, the configs it mounts load, and its Prometheus config passes promtool.
//!
//! Run alone: `cargo test -p rtinval-tests --test deploy_manifests`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use rtinval_tests::{bin, workspace_root};
use yaml_rust2::{Yaml, YamlLoader};

fn deploy(rel: &str) -> PathBuf {
    workspace_root().join("deploy").join(rel)
}

fn yaml_docs(path: &Path) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn s(y: &Yaml) -> &str {
    y.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {y:?}"))
}

/// A command line given as a YAML list.
fn argv(command: &Yaml) -> Vec<String> {
    command
        .as_vec()
        .unwrap_or_else(|| panic!("a command list, got {command:?}"))
        .iter()
        .map(|a| s(a).to_owned())
        .collect()
}

/// The argv is one the binary accepts: it gets past argument parsing (clap exits 2 on a bad
/// command line) and fails only on the config file, which does not exist here.
fn assert_argv_accepted(argv: &[String]) {
    let (program, args) = argv.split_first().unwrap();
    let name = Path::new(program).file_name().unwrap().to_str().unwrap();
    let mut args: Vec<String> = args.to_vec();
    let missing = std::env::temp_dir().join("rtinval-no-such-dir/config.toml");
    if let Some(i) = args.iter().position(|a| a == "--config") {
        args[i + 1] = missing.display().to_string();
    }
    let out = Command::new(bin(name)).args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "{argv:?} is refused: {stderr}");
    assert!(
        stderr.contains("rtinval-no-such-dir"),
        "{argv:?} should fail on the missing config only: {stderr}"
    );
}

fn unit_commands(unit: &str) -> Vec<Vec<String>> {
    unit.lines()
        .filter_map(|l| {
            l.strip_prefix("ExecStart=")
                .or_else(|| l.strip_prefix("ExecStartPre="))
        })
        .map(|cmd| cmd.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn systemd_units_verify_and_run_commands_the_binaries_accept() {
    let units = ["rtinval-producer.service", "rtinval-consumer.service"];
    // A scratch root: the system's unit library, the binaries where the units expect them.
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in [
        "usr/local/bin",
        "bin",
        "etc/systemd/system",
        "usr/lib/systemd",
    ] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let lib = Path::new("/usr/lib/systemd/system");
    assert!(
        lib.is_dir(),
        "systemd's unit library is missing (Debian package systemd)"
    );
    let status = Command::new("cp")
        .arg("-r")
        .arg(lib)
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::copy("/bin/kill", r.join("bin/kill")).unwrap();
    for b in ["rtinval-producer", "rtinval-consumer"] {
        std::fs::copy(bin(b), r.join("usr/local/bin").join(b)).unwrap();
    }
    for u in units {
        std::fs::copy(
            deploy("systemd").join(u),
            r.join("etc/systemd/system").join(u),
        )
        .unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .args(units)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // verify warns about unknown keys without failing: any output is a finding.
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );

    for u in units {
        let unit = std::fs::read_to_string(deploy("systemd").join(u)).unwrap();
        let commands = unit_commands(&unit);
        assert_eq!(commands.len(), 2, "{u}: ExecStartPre (check) and ExecStart");
        for argv in commands {
            assert_argv_accepted(&argv);
        }
        for needed in [
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "DynamicUser=yes",
        ] {
            assert!(unit.contains(needed), "{u} lacks {needed}");
        }
    }
    let consumer = std::fs::read_to_string(deploy("systemd/rtinval-consumer.service")).unwrap();
    assert!(
        consumer.contains("CapabilityBoundingSet=CAP_KILL\n"),
        "the consumer may signal pool masters and nothing more"
    );
    let producer = std::fs::read_to_string(deploy("systemd/rtinval-producer.service")).unwrap();
    assert!(
        producer.contains("CapabilityBoundingSet=\n"),
        "no capabilities"
    );
}

/// The port of an `http.listen` address in a TOML config.
fn listen_port(config: &Path) -> i64 {
    let t: toml::Table = std::fs::read_to_string(config).unwrap().parse().unwrap();
    let listen = t["http"]["listen"].as_str().unwrap();
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// Copy ConfigMap files into one directory as Kubernetes mounts them; returns the directory.
fn mount(files: &[(String, PathBuf)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (key, source) in files {
        std::fs::copy(source, dir.path().join(key))
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    }
    dir
}

#[test]
fn kubernetes_manifests_parse_and_agree_with_the_configs() {
    let k = deploy("kubernetes");
    let kustomization = &yaml_docs(&k.join("kustomization.yaml"))[0];
    // ConfigMaps the kustomization generates: name → [(key, file)].
    let mut generated = std::collections::BTreeMap::new();
    for g in kustomization["configMapGenerator"].as_vec().unwrap() {
        let files: Vec<(String, PathBuf)> = g["files"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|f| {
                let (key, path) = s(f).split_once('=').unwrap();
                let path = k.join(path);
                assert!(path.exists(), "{} is missing", path.display());
                (key.to_owned(), path)
            })
            .collect();
        generated.insert(s(&g["name"]).to_owned(), files);
    }

    let mut kinds = Vec::new();
    for resource in kustomization["resources"].as_vec().unwrap() {
        for doc in yaml_docs(&k.join(s(resource))) {
            let kind = s(&doc["kind"]).to_owned();
            assert!(!s(&doc["metadata"]["name"]).is_empty());
            assert!(doc["apiVersion"].as_str().is_some());
            kinds.push(kind.clone());
            if kind != "Deployment" && kind != "DaemonSet" {
                continue;
            }
            let pod = &doc["spec"]["template"]["spec"];
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"].as_bool(),
                Some(true),
                "{kind} runs as root"
            );
            // The config volume names a generated ConfigMap; the configs load as mounted.
            let volume = pod["volumes"]
                .as_vec()
                .unwrap()
                .iter()
                .find(|v| s(&v["name"]) == "config")
                .unwrap();
            let map = s(&volume["configMap"]["name"]);
            let files = generated
                .get(map)
                .unwrap_or_else(|| panic!("ConfigMap {map} is not generated"));
            let mounted = mount(files);
            let containers = pod["containers"].as_vec().unwrap();
            let app = containers
                .iter()
                .find(|c| s(&c["image"]).contains("rtinval"))
                .unwrap();
            let init = pod["initContainers"]
                .as_vec()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            for c in init.iter().chain([app]) {
                assert_argv_accepted(&argv(&c["command"]));
            }
            let (config_file, port) = if kind == "Deployment" {
                assert_eq!(
                    doc["spec"]["replicas"].as_i64(),
                    Some(2),
                    "one leads, one waits"
                );
                let path = mounted.path().join("producer.toml");
                let c = rtinval_producer::config::Config::load(&path).unwrap();
                assert!(c.rules.len() >= 50, "the RackTables rule set is mounted");
                (path.clone(), listen_port(&path))
            } else {
                let path = mounted.path().join("consumer.toml");
                rtinval_consumer::config::Config::load(&path).unwrap();
                let ready = &app["readinessProbe"]["httpGet"];
                assert_eq!(s(&ready["path"]), "/readyz");
                (path.clone(), listen_port(&path))
            };
            assert_eq!(s(&app["livenessProbe"]["httpGet"]["path"]), "/healthz");
            let ports = app["ports"].as_vec().unwrap();
            assert!(
                ports
                    .iter()
                    .any(|p| p["containerPort"].as_i64() == Some(port)),
                "{kind}: the container port is not the one {} listens on ({port})",
                config_file.display()
            );
        }
    }
    for kind in ["Deployment", "DaemonSet", "Service", "PodDisruptionBudget"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
}

#[test]
fn compose_file_mounts_what_exists_and_configures_what_the_producer_checks() {
    let dir = deploy("compose");
    let compose = &yaml_docs(&dir.join("compose.yaml"))[0];
    let services = compose["services"].as_hash().unwrap();
    let names: Vec<&str> = services.keys().map(s).collect();
    for needed in [
        "kafka",
        "mysql",
        "redis",
        "producer",
        "consumer",
        "prometheus",
        "grafana",
    ] {
        assert!(names.contains(&needed), "no {needed} service: {names:?}");
    }
    // Every bind mount's source exists; remember where each container path comes from.
    let mut mounts = std::collections::BTreeMap::new();
    for (name, svc) in services {
        for v in svc["volumes"].as_vec().map(Vec::as_slice).unwrap_or(&[]) {
            let mut parts = s(v).split(':');
            let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
            let path = dir.join(source);
            assert!(path.exists(), "{}: {} is missing", s(name), path.display());
            mounts.insert((s(name).to_owned(), target.to_owned()), path);
        }
    }
    let mysql: Vec<&str> = compose["services"]["mysql"]["command"]
        .as_vec()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    for flag in [
        "--binlog-format=ROW",
        "--binlog-row-image=FULL",
        "--binlog-row-metadata=FULL",
        "--gtid-mode=ON",
    ] {
        assert!(mysql.contains(&flag), "MySQL lacks {flag}: {mysql:?}");
    }
    assert!(s(&compose["services"]["mysql"]["image"]).starts_with("mysql:8.4"));
    assert!(s(&compose["services"]["kafka"]["image"]).starts_with("apache/kafka:"));

    // The configs load as the containers see them (producer.toml with rules.toml beside it).
    let etc = |svc: &str| -> tempfile::TempDir {
        let files: Vec<(String, PathBuf)> = mounts
            .iter()
            .filter(|((name, target), _)| name == svc && target.starts_with("/etc/rtinval/"))
            .map(|((_, target), source)| {
                (
                    target.trim_start_matches("/etc/rtinval/").to_owned(),
                    source.clone(),
                )
            })
            .collect();
        mount(&files)
    };
    let producer_etc = etc("producer");
    let p =
        rtinval_producer::config::Config::load(&producer_etc.path().join("producer.toml")).unwrap();
    assert!(p.rules.len() >= 50);
    assert_eq!(p.kafka.brokers, "kafka:9092");
    let consumer_etc = etc("consumer");
    let c =
        rtinval_consumer::config::Config::load(&consumer_etc.path().join("consumer.toml")).unwrap();
    assert_eq!(c.kafka.brokers, "kafka:9092");
    for svc in ["producer", "consumer"] {
        assert_argv_accepted(&argv(&compose["services"][svc]["command"]));
    }

    // Prometheus scrapes the ports the configs listen on, and its config passes promtool.
    let prom = std::fs::read_to_string(dir.join("prometheus.yml")).unwrap();
    for (svc, file) in [("producer", &producer_etc), ("consumer", &consumer_etc)] {
        let port = listen_port(&file.path().join(format!("{svc}.toml")));
        assert!(
            prom.contains(&format!("{svc}:{port}")),
            "prometheus.yml does not scrape {svc}:{port}"
        );
    }
    let scratch = tempfile::tempdir().unwrap();
    let alerts = deploy("prometheus/rtinval-alerts.yml");
    let local = prom.replace(
        "/etc/prometheus/rtinval-alerts.yml",
        &alerts.display().to_string(),
    );
    let path = scratch.path().join("prometheus.yml");
    std::fs::write(&path, local).unwrap();
    let out = Command::new("promtool")
        .args(["check", "config"])
        .arg(&path)
        .output()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
