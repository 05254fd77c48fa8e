//! Proves the Avro schema evolves only by the documented rules (schemas/README.md): the
//! current `schemas/event.avsc` reads data written with every earlier committed version
//! (backward) and every earlier version reads data written with the current one (forward), by
//! apache-avro's compatibility check; and that the check catches each forbidden change.
//! Earlier versions come from git history (`git log -- schemas/event.avsc`) plus the frozen
//! copies in `schemas/avro-history/` (released versions, for checkouts without history).
//! Run alone: `cargo test -p rtinval-schemas --test avro_evolution`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::path::Path;
use std::process::Command;

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use rtinval_schemas::AVRO_SCHEMA;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Every committed version of event.avsc: (where from, text).
fn earlier_versions() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let history = root().join("schemas/avro-history");
    for entry in std::fs::read_dir(&history).expect("schemas/avro-history exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "avsc") {
            found.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    let log = Command::new("git")
        .args(["log", "--format=%H", "--", "schemas/event.avsc"])
        .current_dir(root())
        .output();
    match log {
        Ok(out) if out.status.success() => {
            for commit in String::from_utf8_lossy(&out.stdout).lines() {
                let show = Command::new("git")
                    .args(["show", &format!("{commit}:schemas/event.avsc")])
                    .current_dir(root())
                    .output()
                    .unwrap();
                assert!(
                    show.status.success(),
                    "git show {commit}:schemas/event.avsc"
                );
                found.push((
                    format!("commit {commit}"),
                    String::from_utf8(show.stdout).unwrap(),
                ));
            }
        }
        // Not a git checkout (a source tarball): the frozen copies still hold.
        _ => eprintln!("no git history here; checking schemas/avro-history/ only"),
    }
    found
}

fn compatible(old: &Schema, new: &Schema) -> Result<(), String> {
    SchemaCompatibility::can_read(old, new).map_err(|e| format!("backward: {e}"))?;
    SchemaCompatibility::can_read(new, old).map_err(|e| format!("forward: {e}"))?;
    Ok(())
}

#[test]
fn the_current_schema_is_compatible_with_every_committed_version() {
    let current = Schema::parse_str(AVRO_SCHEMA).unwrap();
    let versions = earlier_versions();
    assert!(!versions.is_empty(), "no earlier version found");
    for (from, text) in versions {
        let old = Schema::parse_str(&text).unwrap_or_else(|e| panic!("{from}: {e}"));
        if let Err(e) = compatible(&old, &current) {
            panic!("schemas/event.avsc is not compatible with {from}: {e}");
        }
    }
}

/// The current schema, edited: `edit` rewrites its JSON.
fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> Schema {
    let mut json: serde_json::Value = serde_json::from_str(AVRO_SCHEMA).unwrap();
    edit(&mut json);
    Schema::parse_str(&json.to_string()).unwrap()
}

fn fields(json: &mut serde_json::Value) -> &mut Vec<serde_json::Value> {
    json["fields"].as_array_mut().unwrap()
}

#[test]
fn the_check_allows_what_the_rules_allow_and_refuses_the_rest() {
    let current = Schema::parse_str(AVRO_SCHEMA).unwrap();
    // Allowed: a new field with a default.
    let added = edited(|j| {
        fields(j).push(
            serde_json::json!({"name": "trace_id", "type": ["null", "string"], "default": null}),
        )
    });
    compatible(&current, &added).unwrap();

    // Refused: a new field without a default (new readers cannot read old data).
    let no_default =
        edited(|j| fields(j).push(serde_json::json!({"name": "trace_id", "type": "string"})));
    assert!(compatible(&current, &no_default).is_err());
    // Refused: a removed field (old readers cannot read new data).
    let removed = edited(|j| fields(j).retain(|f| f["name"] != "emitted_at"));
    assert!(compatible(&current, &removed).is_err());
    // Refused: a retyped field.
    let retyped = edited(|j| {
        for f in fields(j).iter_mut() {
            if f["name"] == "emitted_at" {
                f["type"] = serde_json::json!("string");
            }
        }
    });
    assert!(compatible(&current, &retyped).is_err());
}
