//! Configs the binaries under test start with: the shipped RackTables producer config
//! pointed at a test's database and topics, and the consumer's `[kafka]` section.

use crate::processes::StandInPool;
use crate::stack::{Stack, server_id, workspace_root};

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
    format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\ngroup_id = \"{prefix}-node\"\n",
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
