//! Configs the binaries under test start with: one base per binary (the stack's services, a
//! test's database and topics, no HTTP listener) with a test's own TOML merged in
//! ([`producer_config`], [`consumer_config`]); the shipped RackTables producer config pointed
//! at a test's database and topics; and sections tests compose consumer configs from.

use crate::processes::StandInPool;
use crate::stack::{Stack, server_id, workspace_root};

/// A producer config: `[source]` on the stack's MariaDB and database `db` with a server id of
/// its own, `[kafka]` on the stack's broker with `prefix`'s topics, no HTTP listener; then
/// `rest` (TOML: rules, sections, and keys that add to or override the base) merged in.
pub fn producer_config(db: &str, prefix: &str, rest: &str) -> String {
    let s = Stack::get();
    let base = format!(
        "[source]\nurl = \"{}\"\ndatabase = \"{db}\"\nserver_id = {}\n\
         [kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\n[http]\nlisten = \"\"\n",
        s.mysql_url,
        server_id(),
        s.brokers
    );
    merged(&base, rest)
}

/// A consumer config: `[kafka]` on the stack's broker with `prefix`'s topics and consumer group
/// `group`; then `rest` (pools, caches, overrides) merged in. No `[http]`: `ConsumerProc` adds
/// the listener it talks to.
pub fn consumer_config(prefix: &str, group: &str, rest: &str) -> String {
    merged(&consumer_kafka_section_of(prefix, group), rest)
}

/// `rest` merged into `base` (both TOML): tables key by key, recursively; any other value,
/// arrays of tables (`[[rules]]`) included, replaces the base's.
fn merged(base: &str, rest: &str) -> String {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let parse = |text: &str| -> toml::Table {
        text.parse()
            .unwrap_or_else(|e| panic!("a test config is not TOML: {e}\n{text}"))
    };
    let mut c = parse(base);
    merge(&mut c, parse(rest));
    toml::to_string(&c).expect("TOML")
}

/// The shipped RackTables producer config (`deploy/racktables/producer.toml` with its
/// `rules.toml`), pointed at a test database, the stack's broker and a topic prefix; `edit`
/// changes anything else.
pub fn racktables_producer_config(
    db: &str,
    prefix: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> String {
    let s = Stack::get();
    let mut c: toml::Table =
        std::fs::read_to_string(workspace_root().join("deploy/racktables/producer.toml"))
            .expect("deploy/racktables/producer.toml")
            .parse()
            .expect("deploy/racktables/producer.toml is TOML");
    let source = c["source"].as_table_mut().expect("[source]");
    source.insert("url".into(), s.mysql_url.clone().into());
    source.insert("database".into(), db.into());
    source.insert("server_id".into(), i64::from(server_id()).into());
    let kafka = c["kafka"].as_table_mut().expect("[kafka]");
    kafka.insert("brokers".into(), s.brokers.clone().into());
    kafka.insert("topic_prefix".into(), prefix.into());
    kafka.insert("partitions".into(), 1.into());
    kafka.insert("replication_factor".into(), 1.into());
    c["producer"]
        .as_table_mut()
        .expect("[producer]")
        .insert("heartbeat_ms".into(), 200.into());
    c["http"]
        .as_table_mut()
        .expect("[http]")
        .insert("listen".into(), "".into());
    // The copy lives elsewhere: name the rule set by its absolute path.
    let rules = workspace_root().join("deploy/racktables/rules.toml");
    c.insert(
        "rules_files".into(),
        toml::Value::Array(vec![rules.display().to_string().into()]),
    );
    edit(&mut c);
    toml::to_string(&c).expect("TOML")
}

/// The `[kafka]` section of a consumer config: the stack's broker, `prefix`'s topics and a
/// consumer group of its own (`<prefix>-node`).
pub fn consumer_kafka_section(prefix: &str) -> String {
    consumer_kafka_section_of(prefix, &format!("{prefix}-node"))
}

fn consumer_kafka_section_of(prefix: &str, group: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\ngroup_id = \"{group}\"\n",
        Stack::get().brokers
    )
}

/// A `[pools.NAME]` section that reloads the stand-in `pool` by signal.
pub fn signal_pool(name: &str, pool: &StandInPool, debounce_ms: u64, max_delay_ms: u64) -> String {
    format!(
        "[pools.{name}]\nreload = \"signal\"\npidfile = \"{}\"\ndebounce_ms = {debounce_ms}\nmax_delay_ms = {max_delay_ms}\n",
        pool.pidfile.display()
    )
}

/// A `[caches.NAME]` section on the stack's Redis with key `prefix` and `extra` settings.
pub fn redis_cache(name: &str, prefix: &str, extra: &str) -> String {
    format!(
        "[caches.{name}]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{prefix}\"\n{extra}\n",
        Stack::get().redis_url
    )
}
