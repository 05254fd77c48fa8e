//! Producer configuration (TOML). Every field is documented for operators; `validate()` checks
//! cross-field rules before anything connects. Secrets may come from the environment:
//! `RTINVAL_SOURCE_PASSWORD` overrides the password in `source.url`.

use std::path::Path;
use std::time::Duration;

use rtinval_schemas::Op;
use serde::Deserialize;

use crate::error::ConfigError;
/// The compiled rule lives with the templates it is made of.
pub use crate::rules::Rule;
use crate::rules::Template;

/// The whole producer configuration file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The MySQL/MariaDB server whose binlog is tailed.
    pub source: SourceConfig,
    /// Where events go.
    pub kafka: KafkaConfig,
    /// Pipeline tuning.
    #[serde(default)]
    pub producer: ProducerSettings,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Confluent-compatible Schema Registry; needed when `kafka.format = "avro"`.
    #[serde(default)]
    pub schema_registry: Option<rtinval_schemas::avro::RegistryConfig>,
    /// Value maps for key templates: `{objtype_id|realm}` writes `maps.realm["1560"]` for a
    /// row whose `objtype_id` is 1560, or `maps.realm["*"]` for a value not listed (without a
    /// `*` entry, such a row's key is underivable and its cache is flushed).
    #[serde(default)]
    pub maps: crate::rules::Maps,
    /// Files with more `[maps.*]` and `[[rules]]` (nothing else), read after this one; a
    /// relative path is relative to this file's directory. Keeps a rule set (e.g.
    /// deploy/racktables/rules.toml) apart from each installation's connection settings.
    #[serde(default)]
    pub rules_files: Vec<String>,
    /// Table change → invalidation rules. Tables without a rule are ignored.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Where each rule came from (file and 1-based position), for error messages.
    #[serde(skip)]
    rule_origins: Vec<(String, usize)>,
    /// `rules` compiled (tables resolved, templates parsed) by [`Config::validate`], kept so
    /// nothing compiles them again.
    #[serde(skip)]
    compiled: Vec<Rule>,
}

/// A file named in `rules_files`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    maps: crate::rules::Maps,
    #[serde(default)]
    rules: Vec<RuleConfig>,
}

/// Connection to the binlog source.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// `mysql://user:password@host:port`. The account needs REPLICATION SLAVE, REPLICATION
    /// CLIENT (MariaDB: BINLOG MONITOR) and SELECT on the watched schemas.
    pub url: String,
    /// Database that unqualified rule tables (`table = "Object"`) belong to.
    #[serde(default)]
    pub database: Option<String>,
    /// Replica server id this producer registers with; unique among the source's replicas.
    #[serde(default = "default_server_id")]
    pub server_id: u32,
    /// Seconds between binlog heartbeats the server sends while idle (detects dead links).
    #[serde(default = "default_binlog_heartbeat_secs")]
    pub binlog_heartbeat_secs: u64,
    /// Seconds without any binlog traffic (events or heartbeats) before reconnecting.
    #[serde(default = "default_read_timeout_secs")]
    pub read_timeout_secs: u64,
}

/// Kafka connection and topics.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Topic names are `<prefix>.pool-reset`, `<prefix>.cache-keys`, `<prefix>.checkpoints`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Partitions of the event topics when the producer creates them.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics the producer creates.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Name under which this producer group stores its binlog position in the checkpoint
    /// topic; producers sharing it (active + standbys) resume from each other's position.
    #[serde(default = "default_checkpoint_key")]
    pub checkpoint_key: String,
    /// Extra librdkafka settings (e.g. `"security.protocol" = "ssl"`).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// Wire format of events: `json` (default) or `avro` (Confluent Schema Registry framing;
    /// needs `[schema_registry]`). The checkpoint topic is always JSON.
    #[serde(default)]
    pub format: WireFormat,
}

/// The wire format of events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WireFormat {
    #[default]
    Json,
    Avro,
}

/// Pipeline tuning.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProducerSettings {
    /// Milliseconds between heartbeats (freshness signal to consumers, checkpoint advance).
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// After a transaction that published events, a heartbeat follows right behind them, or —
    /// if one went out less than this many ms ago — at the end of that window (at most one per
    /// window, however many transactions). It tells every consumer node that the positions up
    /// to it are complete on partitions the transaction did not touch, so `/wait` answers
    /// promptly. 0: only the periodic heartbeat (a wait may then take up to `heartbeat_ms`).
    #[serde(default = "default_progress_heartbeat_ms")]
    pub progress_heartbeat_ms: u64,
    /// Distinct keys of one cache in one transaction above which the cache is flushed instead.
    #[serde(default = "default_max_keys_per_transaction")]
    pub max_keys_per_transaction: usize,
    /// Keys per `cache_keys` message (a transaction's keys are split into chunks of this size).
    #[serde(default = "default_keys_per_event")]
    pub keys_per_event: usize,
    /// Milliseconds between checkpoint writes (a checkpoint is also written on shutdown).
    #[serde(default = "default_checkpoint_ms")]
    pub checkpoint_ms: u64,
    /// Seconds between progress lines in the log (position, rows, batches, lag); 0 disables.
    #[serde(default = "default_progress_log_secs")]
    pub progress_log_secs: u64,
    /// Keep an index of the child rows foreign keys cascade to (built from a snapshot at start,
    /// maintained from the binlog), so that a parent's delete or update yields exactly the
    /// cascaded rows' keys. Off: such cascades flush the caches their keys live in.
    #[serde(default = "default_true")]
    pub cascade_index: bool,
    /// Rows of one table above which the cascade index stops holding that table (and the
    /// tables below it): their cascades fall back to flushing, counted and logged.
    #[serde(default = "default_cascade_index_max_rows")]
    pub cascade_index_max_rows: usize,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            heartbeat_ms: default_heartbeat_ms(),
            progress_heartbeat_ms: default_progress_heartbeat_ms(),
            max_keys_per_transaction: default_max_keys_per_transaction(),
            keys_per_event: default_keys_per_event(),
            checkpoint_ms: default_checkpoint_ms(),
            progress_log_secs: default_progress_log_secs(),
            cascade_index: true,
            cascade_index_max_rows: default_cascade_index_max_rows(),
        }
    }
}

/// HTTP endpoint for metrics and probes.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to listen on; empty disables the endpoint.
    #[serde(default = "default_producer_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_producer_listen(),
        }
    }
}

/// One rule: which changes of one table cause which invalidations.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// `database.table`, or `table` in `source.database`.
    pub table: String,
    /// Operations that trigger the rule (default: all three).
    #[serde(default = "default_ops")]
    pub ops: Vec<Op>,
    /// For updates: fire only if one of these columns changed (empty: any change).
    #[serde(default)]
    pub when_changed: Vec<String>,
    /// Pools to reset (graceful reload) when the rule fires.
    #[serde(default)]
    pub reset_pools: Vec<String>,
    /// Cache whose keys the rule purges; needs `keys`.
    #[serde(default)]
    pub cache: Option<String>,
    /// Key templates, e.g. `"object:{id}"`; placeholders name columns. Rendered from the
    /// before and the after image, so an update that renames yields both keys. A NULL value
    /// yields no key for that image; a column missing from the image flushes the cache.
    #[serde(default)]
    pub keys: Vec<String>,
}

fn default_server_id() -> u32 {
    4_242_001
}
fn default_binlog_heartbeat_secs() -> u64 {
    1
}
fn default_read_timeout_secs() -> u64 {
    10
}
fn default_topic_prefix() -> String {
    "rtinval".to_owned()
}
fn default_partitions() -> i32 {
    1
}
fn default_replication_factor() -> i32 {
    1
}
fn default_checkpoint_key() -> String {
    "default".to_owned()
}
fn default_heartbeat_ms() -> u64 {
    1000
}
fn default_progress_heartbeat_ms() -> u64 {
    5
}
fn default_max_keys_per_transaction() -> usize {
    10_000
}
fn default_keys_per_event() -> usize {
    500
}
fn default_checkpoint_ms() -> u64 {
    1000
}
fn default_progress_log_secs() -> u64 {
    60
}
fn default_true() -> bool {
    true
}
fn default_cascade_index_max_rows() -> usize {
    5_000_000
}
fn default_producer_listen() -> String {
    "127.0.0.1:9464".to_owned()
}
fn default_ops() -> Vec<Op> {
    vec![Op::Insert, Op::Update, Op::Delete]
}

impl Config {
    /// Read and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            error: e,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            error: rtinval_schemas::config_file::parse_error(&text, &e),
        })?;
        config.rule_origins = (1..=config.rules.len())
            .map(|i| (path.display().to_string(), i))
            .collect();
        let dir = path.parent().unwrap_or(Path::new("."));
        for file in config.rules_files.clone() {
            config.read_rules_file(&dir.join(&file))?;
        }
        if let Ok(password) = std::env::var("RTINVAL_SOURCE_PASSWORD") {
            config.source.url = with_password(&config.source.url, &password)?;
        }
        config.schema_registry = config.schema_registry.take().map(|r| r.with_env());
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(config)
    }

    fn read_rules_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: shown.clone(),
            error: e,
        })?;
        let file: RulesFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: shown.clone(),
            error: rtinval_schemas::config_file::parse_error(&text, &e),
        })?;
        for (name, map) in file.maps {
            if self.maps.insert(name.clone(), map).is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{shown}: [maps.{name}] is defined twice"
                )));
            }
        }
        let n = file.rules.len();
        self.rules.extend(file.rules);
        self.rule_origins
            .extend((1..=n).map(|i| (shown.clone(), i)));
        Ok(())
    }

    /// Cross-field checks that need no server; compiles the rules once and keeps them
    /// ([`Config::compiled_rules`]).
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        mysql_async::Opts::from_url(&self.source.url).map_err(|e| {
            ConfigError::Invalid(format!(
                "source.url is not a mysql:// URL ({e}); write mysql://user:password@host:port"
            ))
        })?;
        if self.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "kafka.brokers is empty; set it to the bootstrap servers (host:port[,host:port])"
                    .into(),
            ));
        }
        if !valid_name(&self.kafka.topic_prefix) {
            return Err(ConfigError::Invalid(format!(
                "kafka.topic_prefix {:?} may use only letters, digits, '.', '_' and '-'",
                self.kafka.topic_prefix
            )));
        }
        if self.kafka.partitions < 1 || self.kafka.replication_factor < 1 {
            return Err(ConfigError::Invalid(
                "kafka.partitions and kafka.replication_factor must be at least 1 (defaults 1, 1)"
                    .into(),
            ));
        }
        if self.producer.heartbeat_ms == 0 || self.producer.checkpoint_ms == 0 {
            return Err(ConfigError::Invalid(
                "producer.heartbeat_ms and producer.checkpoint_ms must be positive (defaults 1000, 1000)"
                    .into(),
            ));
        }
        if self.producer.keys_per_event == 0 {
            return Err(ConfigError::Invalid(
                "producer.keys_per_event must be positive (default 500)".into(),
            ));
        }
        if !self.http.listen.is_empty()
            && !self
                .http
                .listen
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Err(ConfigError::Invalid(format!(
                "http.listen {:?} is not host:port; use e.g. \"127.0.0.1:9464\", or \"\" to disable the endpoint",
                self.http.listen
            )));
        }
        match (&self.kafka.format, &self.schema_registry) {
            (WireFormat::Avro, None) => {
                return Err(ConfigError::Invalid(
                    "kafka.format = \"avro\" needs a [schema_registry] section with its url".into(),
                ));
            }
            (_, Some(registry)) => registry.validate().map_err(ConfigError::Invalid)?,
            (WireFormat::Json, None) => {}
        }
        self.compiled = self.rules()?;
        Ok(())
    }

    /// The rules as [`Config::validate`] compiled them ([`Config::load`] validates).
    pub fn compiled_rules(&self) -> Result<Vec<Rule>, ConfigError> {
        if self.compiled.len() == self.rules.len() {
            Ok(self.compiled.clone())
        } else {
            // Not validated (a config assembled in code): compile now.
            self.rules()
        }
    }

    /// Rules with tables resolved and templates parsed.
    pub fn rules(&self) -> Result<Vec<Rule>, ConfigError> {
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| self.rule(i, r))
            .collect()
    }

    fn rule(&self, index: usize, r: &RuleConfig) -> Result<Rule, ConfigError> {
        let (origin, index) = self
            .rule_origins
            .get(index)
            .cloned()
            .unwrap_or_else(|| ("the config".to_owned(), index + 1));
        let at = |msg: String| ConfigError::Rule {
            index,
            origin: origin.clone(),
            table: r.table.clone(),
            msg,
        };
        let (database, table) = match r.table.split_once('.') {
            Some((d, t)) => (d.to_owned(), t.to_owned()),
            None => match &self.source.database {
                Some(d) => (d.clone(), r.table.clone()),
                None => {
                    return Err(at(
                        "table is not qualified; write \"database.table\" or set source.database"
                            .into(),
                    ));
                }
            },
        };
        if database.is_empty() || table.is_empty() {
            return Err(at("table must be \"database.table\"".into()));
        }
        if r.ops.is_empty() {
            return Err(at("ops is empty; the rule would never fire".into()));
        }
        if r.cache.is_none() && !r.keys.is_empty() {
            return Err(at(
                "keys name no cache: add cache = \"NAME\" (the consumers' [caches.NAME] the keys belong to)"
                    .into(),
            ));
        }
        if r.reset_pools.is_empty() && r.cache.is_none() {
            return Err(at(
                "the rule does nothing: set reset_pools and/or cache + keys".into(),
            ));
        }
        if r.cache.is_some() && r.keys.is_empty() {
            return Err(at(
                "cache and keys go together: a cache needs key templates (keys = [\"object:{id}\"])"
                    .into(),
            ));
        }
        for name in r.reset_pools.iter().chain(r.cache.iter()) {
            if !valid_name(name) {
                return Err(at(format!(
                    "pool/cache name {name:?} may use only letters, digits, '.', '_' and '-'"
                )));
            }
        }
        let keys = r
            .keys
            .iter()
            .map(|k| {
                Template::parse_with(k, &self.maps)
                    .map_err(|e| at(format!("key template {k:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Rule {
            database,
            table,
            ops: r.ops.iter().copied().collect(),
            when_changed: r.when_changed.clone(),
            reset_pools: r.reset_pools.clone(),
            cache: r.cache.clone(),
            keys,
        })
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.producer.heartbeat_ms)
    }

    /// The configuration as JSON for the start-up log, with every secret replaced by `***`.
    pub fn redacted_json(&self) -> String {
        let mut c = self.clone();
        c.source.url = redact_url(&c.source.url);
        redact_options(&mut c.kafka.options);
        c.schema_registry = c.schema_registry.as_ref().map(|r| r.redacted());
        serde_json::to_string(&c).unwrap_or_default()
    }

    /// The source URL with the password replaced by `***`, for logs.
    pub fn redacted_source_url(&self) -> String {
        redact_url(&self.source.url)
    }
}

/// Names of pools, caches and topic prefixes: safe in topic names, metric labels and logs.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn with_password(url: &str, password: &str) -> Result<String, ConfigError> {
    let opts = mysql_async::Opts::from_url(url)
        .map_err(|e| ConfigError::Invalid(format!("source.url is not a mysql:// URL: {e}")))?;
    let user = opts.user().unwrap_or("root");
    let rest = url
        .rsplit_once('@')
        .map(|(_, r)| r)
        .unwrap_or_else(|| url.strip_prefix("mysql://").unwrap_or(url));
    Ok(format!(
        "mysql://{user}:{}@{rest}",
        percent_encode(password)
    ))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub use rtinval_schemas::config_file::{redact_options, redact_url};

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(s).map_err(|e| ConfigError::Parse {
            path: "test".into(),
            error: e.to_string(),
        })?;
        c.validate()?;
        Ok(c)
    }

    const BASE: &str = r#"
[source]
url = "mysql://u:p@127.0.0.1:3306"
database = "racktables"
[kafka]
brokers = "127.0.0.1:9092"
"#;

    #[test]
    fn minimal_config_with_one_rule() {
        let c = parse(&format!(
            "{BASE}\n[[rules]]\ntable = \"Object\"\nreset_pools = [\"rtapi\"]\ncache = \"rt\"\nkeys = [\"object:{{id}}\"]\n"
        ))
        .unwrap();
        let rules = c.rules().unwrap();
        assert_eq!(rules[0].qualified_table(), "racktables.Object");
        assert_eq!(
            rules[0].columns().into_iter().collect::<Vec<_>>(),
            vec!["id"]
        );
        assert_eq!(c.kafka.topic_prefix, "rtinval");
    }

    #[test]
    fn unknown_fields_and_bad_rules_are_refused_with_a_reason() {
        let err = parse(&format!(
            "{BASE}\n[[rules]]\ntable = \"Object\"\nreset_pool = [\"x\"]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("reset_pool"), "{err}");
        let err = parse(&format!(
            "{BASE}\n[[rules]]\ntable = \"Object\"\ncache = \"rt\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("key templates"), "{err}");
        let err = parse(&format!("{BASE}\n[[rules]]\ntable = \"Object\"\n")).unwrap_err();
        assert!(err.to_string().contains("does nothing"), "{err}");
        let err = parse(&format!(
            "{BASE}\n[[rules]]\ntable = \"Object\"\ncache = \"rt\"\nkeys = [\"object:{{id\"]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("object:{id"), "{err}");
    }

    #[test]
    fn unqualified_table_needs_a_database() {
        let base = BASE.replace("database = \"racktables\"\n", "");
        let err = parse(&format!(
            "{base}\n[[rules]]\ntable = \"Object\"\nreset_pools = [\"p\"]\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("source.database"), "{err}");
    }

    #[test]
    fn password_override_and_redaction() {
        let url = with_password("mysql://u:old@h:1/db", "n@w:pw").unwrap();
        assert_eq!(url, "mysql://u:n%40w%3Apw@h:1/db");
        let opts = mysql_async::Opts::from_url(&url).unwrap();
        assert_eq!(opts.pass(), Some("n@w:pw"));
        assert_eq!(redact_url("mysql://u:secret@h:1"), "mysql://u:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        let mut c = parse(BASE).unwrap();
        c.kafka
            .options
            .insert("sasl.password".into(), "hunter2".into());
        let shown = c.redacted_json();
        assert!(
            !shown.contains("hunter2") && !shown.contains(":p@"),
            "{shown}"
        );
    }

    #[test]
    fn avro_needs_a_registry_and_its_password_is_redacted() {
        let base = BASE.replace(
            "brokers = \"127.0.0.1:9092\"\n",
            "brokers = \"127.0.0.1:9092\"\nformat = \"avro\"\n",
        );
        let err = parse(&base).unwrap_err().to_string();
        assert!(err.contains("[schema_registry]"), "{err}");
        let c = parse(&format!(
            "{base}\n[schema_registry]\nurl = \"https://sr:8081\"\nusername = \"u\"\npassword = \"hunter2\"\n"
        ))
        .unwrap();
        assert_eq!(c.kafka.format, WireFormat::Avro);
        let shown = c.redacted_json();
        assert!(
            !shown.contains("hunter2") && shown.contains("sr:8081"),
            "{shown}"
        );
        let err = parse(&format!("{base}\n[schema_registry]\nurl = \"sr:8081\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("http://"), "{err}");
        assert_eq!(parse(BASE).unwrap().kafka.format, WireFormat::Json);
    }
}
