//! Consumer configuration (TOML). Every field is documented for operators; `validate()` checks
//! cross-field rules before anything connects. `RTINVAL_REDIS_PASSWORD` overrides the password
//! of every Redis cache URL.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// The whole consumer configuration file.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where events come from.
    pub kafka: KafkaConfig,
    /// Freshness bound for `/readyz`.
    #[serde(default)]
    pub node: NodeConfig,
    /// `/metrics`, `/healthz`, `/readyz`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Worker pools on this node, by the name rules use in `reset_pools`.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    /// Node-local caches, by the name rules use in `cache`.
    #[serde(default)]
    pub caches: BTreeMap<String, CacheConfig>,
    /// Confluent-compatible Schema Registry, to read Avro events (the producer's
    /// `kafka.format = "avro"`). JSON events need none; each message's first byte tells.
    #[serde(default)]
    pub schema_registry: Option<rtinval_schemas::avro::RegistryConfig>,
}

/// Kafka connection, topics and consumer group.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Same prefix as the producer's: topics `<prefix>.pool-reset` and `<prefix>.cache-keys`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Consumer group of this node; every node needs its own (default:
    /// `rtinval-consumer-<hostname>`), since every node must apply every event.
    /// `RTINVAL_GROUP_ID` overrides it.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Extra librdkafka settings (e.g. `"security.protocol" = "ssl"`).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// If set, undecodable messages are copied here (with origin topic, partition, offset and
    /// the error in headers) before the node resyncs. Created if missing.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
}

/// Node-level settings.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// `/readyz` fails when the newest heartbeat says the source view is older than this.
    #[serde(default = "default_max_staleness_secs")]
    pub max_staleness_secs: u64,
    /// Seconds between progress lines in the log (events applied, offsets, staleness); 0: none.
    #[serde(default = "default_progress_log_secs")]
    pub progress_log_secs: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            max_staleness_secs: default_max_staleness_secs(),
            progress_log_secs: default_progress_log_secs(),
        }
    }
}

/// HTTP endpoint.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to listen on; empty disables the endpoint.
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

/// How a pool reloads, and how reload requests are coalesced.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// `signal` (send `signal` to the PID in `pidfile`), `command` (run `command`, exit 0 =
    /// success) or `http` (call `url` with `method`, 2xx = success).
    pub reload: ReloadKind,
    /// For `signal`: file holding the PID of the pool's master process.
    #[serde(default)]
    pub pidfile: Option<String>,
    /// For `signal`: signal name, e.g. `USR2` (PHP-FPM graceful reload) or `HUP`.
    #[serde(default = "default_signal")]
    pub signal: String,
    /// For `command`: argv, e.g. `["systemctl", "reload", "php8.2-fpm"]`; exit 0 = success.
    #[serde(default)]
    pub command: Vec<String>,
    /// For `http`: URL to call, `http://host:port/path` (a local reload endpoint; no TLS).
    #[serde(default)]
    pub url: Option<String>,
    /// For `http`: request method.
    #[serde(default = "default_method")]
    pub method: String,
    /// For `command` and `http`: seconds before the reload counts as failed (a command is killed).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Requests within this many ms of each other coalesce into one reload.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
    /// A reload happens at most this many ms after the first request it covers.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// At least this many ms between the end of one reload and the start of the next.
    #[serde(default)]
    pub min_interval_ms: u64,
}

/// Pool reload mechanisms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadKind {
    Signal,
    Command,
    Http,
}

/// A node-local cache.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Cache server kind: `redis` or `memcached`.
    pub kind: CacheKind,
    /// Redis: `redis://[:password@]host:port[/db]`. memcached: `memcached://host:port`,
    /// `host:port` or `unix:///path`.
    pub url: String,
    /// Prepended to every key from events (the application's key prefix).
    #[serde(default)]
    pub prefix: String,
    /// How to flush the whole cache. Redis: `prefix` (default; SCAN + UNLINK of `prefix*`) or
    /// `flushdb` (only when the cache owns its database). memcached: `flush_all` (the only way).
    #[serde(default)]
    pub flush: Option<FlushMode>,
    /// If set, purge the same keys again this many ms after the first purge: closes the race
    /// where a worker read the old row before the commit and writes it back after the purge.
    /// The message's offset is committed after the second purge.
    #[serde(default)]
    pub second_purge_ms: u64,
    /// Check every this many ms that the cache server is still the one this node purged (Redis
    /// `run_id`, role and replication id; memcached pid and uptime): a server that restarted
    /// from a snapshot, or a replica promoted in its place, may hold purged entries, so the
    /// cache is flushed before anything more is applied and `/readyz` fails meanwhile. New
    /// connections are checked too. 0: only new connections.
    #[serde(default = "default_identity_check_ms")]
    pub identity_check_ms: u64,
    /// The fill protocol (clients/README.md): a purge leaves a tombstone with the source
    /// position instead of deleting, and workers that fill through rtinval's clients store
    /// data only if no purge came since their read. Turn it on only when every writer of
    /// this cache uses the clients: a tombstone is a value to any other reader.
    #[serde(default)]
    pub fill_protocol: bool,
    /// How long a tombstone lives (fill protocol). Safety does not depend on it (a fill needs
    /// the very marker its read saw); it bounds the memory purges keep and how long an
    /// inspector can still see which position purged a key.
    #[serde(default = "default_tombstone_ttl_ms")]
    pub tombstone_ttl_ms: u64,
}

fn default_identity_check_ms() -> u64 {
    1000
}

fn default_tombstone_ttl_ms() -> u64 {
    60_000
}

impl CacheConfig {
    /// The flush mode, defaulted by kind.
    pub fn flush_mode(&self) -> FlushMode {
        self.flush.unwrap_or(match self.kind {
            CacheKind::Redis => FlushMode::Prefix,
            CacheKind::Memcached => FlushMode::FlushAll,
        })
    }

    /// Where this cache lives, parsed from `url` (the one place it is parsed: validation,
    /// the purger and the inspector all take this). `Err` says what the URL must look like.
    pub fn endpoint(&self) -> Result<CacheEndpoint, String> {
        match self.kind {
            CacheKind::Redis => redis::IntoConnectionInfo::into_connection_info(self.url.as_str())
                .map(|info| CacheEndpoint::Redis {
                    info: Box::new(info),
                    shown: redact_url(&self.url),
                })
                .map_err(|_| {
                    format!(
                        "url {:?} is not a redis:// URL (redis://[:password@]host:port[/db] or unix:///path)",
                        redact_url(&self.url)
                    )
                }),
            CacheKind::Memcached => {
                let addr = match self.url.strip_prefix("memcached://") {
                    Some(rest) => format!("tcp://{rest}"),
                    None if self.url.contains("://") => self.url.clone(),
                    None => format!("tcp://{}", self.url),
                };
                let ok = addr.starts_with("unix://")
                    || addr
                        .strip_prefix("tcp://")
                        .and_then(|a| a.rsplit_once(':'))
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if ok {
                    Ok(CacheEndpoint::Memcached { addr })
                } else {
                    Err(format!(
                        "url {:?} is not memcached://host:port, host:port or unix:///path",
                        self.url
                    ))
                }
            }
        }
    }
}

/// A cache server's address, parsed from a cache's `url` ([`CacheConfig::endpoint`]).
#[derive(Debug, Clone)]
pub enum CacheEndpoint {
    /// Redis, as the redis crate's connection info; `shown` is the URL with its password
    /// replaced, for logs and errors.
    Redis {
        info: Box<redis::ConnectionInfo>,
        shown: String,
    },
    /// memcached, in the form its client takes: `tcp://host:port` or `unix://path`.
    Memcached { addr: String },
}

/// Cache kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    Redis,
    Memcached,
}

/// Whole-cache flush strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FlushMode {
    Prefix,
    Flushdb,
    FlushAll,
}

fn default_topic_prefix() -> String {
    "rtinval".to_owned()
}
fn default_max_staleness_secs() -> u64 {
    30
}
fn default_progress_log_secs() -> u64 {
    60
}
fn default_listen() -> String {
    "127.0.0.1:9465".to_owned()
}
fn default_signal() -> String {
    "USR2".to_owned()
}
fn default_timeout_secs() -> u64 {
    30
}
fn default_method() -> String {
    "POST".to_owned()
}
fn default_debounce_ms() -> u64 {
    200
}
fn default_max_delay_ms() -> u64 {
    2000
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
        if let Ok(password) = std::env::var("RTINVAL_REDIS_PASSWORD") {
            for cache in config.caches.values_mut() {
                cache.url = with_redis_password(&cache.url, &password);
            }
        }
        // Where the host name is not the node's (a Kubernetes pod), the deployment names the
        // group: RTINVAL_GROUP_ID=rtinval-consumer-$(NODE_NAME).
        if let Ok(group) = std::env::var("RTINVAL_GROUP_ID")
            && !group.is_empty()
        {
            config.kafka.group_id = Some(group);
        }
        config.schema_registry = config.schema_registry.take().map(|r| r.with_env());
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            e => e,
        })?;
        Ok(config)
    }

    /// Parse TOML text (no validation).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Cross-field checks that need no server.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.kafka.brokers.trim().is_empty() {
            return invalid(
                "kafka.brokers is empty; set it to the bootstrap servers (host:port[,host:port])"
                    .into(),
            );
        }
        if self.node.max_staleness_secs == 0 {
            return invalid(
                "node.max_staleness_secs = 0 would keep the node never ready; use at least 1 (default 30)"
                    .into(),
            );
        }
        if !self.http.listen.is_empty() && !valid_listen(&self.http.listen) {
            return invalid(format!(
                "http.listen {:?} is not host:port; use e.g. \"127.0.0.1:9465\", or \"\" to disable the endpoint",
                self.http.listen
            ));
        }
        if let Some(registry) = &self.schema_registry {
            registry.validate().map_err(ConfigError::Invalid)?;
        }
        for (name, p) in &self.pools {
            p.reload_action()
                .map_err(|e| ConfigError::Invalid(format!("pools.{name}: {e}")))?;
            if p.max_delay_ms < p.debounce_ms {
                return invalid(format!(
                    "pools.{name}: max_delay_ms ({}) must be at least debounce_ms ({})",
                    p.max_delay_ms, p.debounce_ms
                ));
            }
        }
        for (name, c) in &self.caches {
            match (c.kind, c.flush_mode()) {
                (CacheKind::Redis, FlushMode::FlushAll) => {
                    return invalid(format!(
                        "caches.{name}: flush = \"flush_all\" is for memcached; Redis uses \"prefix\" or \"flushdb\""
                    ));
                }
                (CacheKind::Memcached, FlushMode::Prefix | FlushMode::Flushdb) => {
                    return invalid(format!(
                        "caches.{name}: memcached can only flush everything: use flush = \"flush_all\" (or leave it out)"
                    ));
                }
                _ => {}
            }
            if let Err(e) = c.endpoint() {
                return invalid(format!("caches.{name}: {e}"));
            }
            if c.fill_protocol && c.tombstone_ttl_ms < 1000 {
                return invalid(format!(
                    "caches.{name}: tombstone_ttl_ms = {} is too short to be seen by an inspector or a slow reader; use at least 1000 (default 60000)",
                    c.tombstone_ttl_ms
                ));
            }
            if c.kind == CacheKind::Redis
                && c.flush_mode() == FlushMode::Prefix
                && c.prefix.is_empty()
            {
                tracing::warn!(cache = %name, "flush = \"prefix\" with an empty prefix flushes every key of the database by SCAN; set a prefix or flush = \"flushdb\".");
            }
        }
        if self.pools.is_empty() && self.caches.is_empty() {
            return invalid(
                "no pools and no caches: this node would apply nothing; add a [pools.NAME] or [caches.NAME] section"
                    .into(),
            );
        }
        Ok(())
    }

    /// The configuration as JSON for the start-up log, with every secret replaced by `***`.
    pub fn redacted_json(&self) -> String {
        let mut c = self.clone();
        for cache in c.caches.values_mut() {
            cache.url = redact_url(&cache.url);
        }
        c.schema_registry = c.schema_registry.as_ref().map(|r| r.redacted());
        rtinval_schemas::config_file::redact_options(&mut c.kafka.options);
        serde_json::to_string(&c).unwrap_or_default()
    }

    /// The consumer group: configured, or derived from the host name.
    pub fn group_id(&self) -> String {
        self.kafka.group_id.clone().unwrap_or_else(|| {
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown".into());
            format!("rtinval-consumer-{host}")
        })
    }

    pub fn max_staleness(&self) -> Duration {
        Duration::from_secs(self.node.max_staleness_secs)
    }
}

/// `host:port` with a port number (the host may be a name, an IPv4 or a bracketed IPv6 address).
pub fn valid_listen(listen: &str) -> bool {
    listen
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
}

/// `USR2`, `SIGUSR2`, `hup` → a signal.
/// How a pool is reloaded, with its settings parsed: what `apply::pool` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadAction {
    /// Send `signal` to the PID in `pidfile`.
    Signal {
        pidfile: String,
        signal: nix::sys::signal::Signal,
    },
    /// Call `target` with `method`; 2xx within `timeout` is success.
    Http {
        target: HttpTarget,
        method: String,
        timeout: Duration,
    },
    /// Run `argv`; exit 0 within `timeout` is success (a command is killed after it).
    Command {
        argv: Vec<String>,
        timeout: Duration,
    },
}

impl PoolConfig {
    /// The reload this pool's settings describe, parsed once; `Err` names the setting to fix.
    pub fn reload_action(&self) -> Result<ReloadAction, String> {
        let timeout = Duration::from_secs(self.timeout_secs.max(1));
        match self.reload {
            ReloadKind::Signal => {
                let pidfile = self.pidfile.clone().unwrap_or_default();
                if pidfile.is_empty() {
                    return Err("reload = \"signal\" needs pidfile".into());
                }
                Ok(ReloadAction::Signal {
                    pidfile,
                    signal: parse_signal(&self.signal)?,
                })
            }
            ReloadKind::Http => {
                let target = HttpTarget::parse(self.url.as_deref().unwrap_or(""))
                    .map_err(|e| format!("url: {e}"))?;
                if !self.method.chars().all(|c| c.is_ascii_uppercase()) || self.method.is_empty() {
                    return Err(format!(
                        "method {:?} must be an HTTP method like POST",
                        self.method
                    ));
                }
                Ok(ReloadAction::Http {
                    target,
                    method: self.method.clone(),
                    timeout,
                })
            }
            ReloadKind::Command => {
                if self.command.is_empty() {
                    return Err("reload = \"command\" needs command = [argv...]".into());
                }
                Ok(ReloadAction::Command {
                    argv: self.command.clone(),
                    timeout,
                })
            }
        }
    }
}

pub fn parse_signal(name: &str) -> Result<nix::sys::signal::Signal, String> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse()
        .map_err(|_| format!("unknown signal {name:?} (use e.g. USR2, HUP, TERM)"))
}

fn with_redis_password(url: &str, password: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            format!("{scheme}://:{password}@{host}")
        }
        None => url.to_owned(),
    }
}

pub use rtinval_schemas::config_file::redact_url;

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) path: String,
}

impl std::fmt::Display for HttpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<HttpTarget, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url:?} must start with http:// (https is not supported for reload endpoints)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() || host.contains('@') {
            return Err(format!("{url:?}: needs a host (and no credentials)"));
        }
        Ok(HttpTarget {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[kafka]\nbrokers = \"b:1\"\n";

    fn check(text: &str) -> Result<Config, String> {
        let c = Config::parse(text)?;
        c.validate().map_err(|e| e.to_string())?;
        Ok(c)
    }

    #[test]
    fn pools_and_caches() {
        let c = check(&format!(
            "{BASE}[pools.rtapi]\nreload = \"signal\"\npidfile = \"/run/x.pid\"\n[caches.rt]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\nprefix = \"rt:\"\n"
        ))
        .unwrap();
        assert_eq!(c.pools["rtapi"].signal, "USR2");
        assert_eq!(c.caches["rt"].flush_mode(), FlushMode::Prefix);
        assert!(c.group_id().starts_with("rtinval-consumer-"));
    }

    #[test]
    fn clear_errors() {
        let e = check(&format!("{BASE}[pools.p]\nreload = \"signal\"\n")).unwrap_err();
        assert!(e.contains("needs pidfile"), "{e}");
        let e = check(&format!(
            "{BASE}[pools.p]\nreload = \"signal\"\npidfile = \"x\"\nsignal = \"NOPE\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("unknown signal"), "{e}");
        let e = check(&format!("{BASE}[pools.p]\nreload = \"command\"\n")).unwrap_err();
        assert!(e.contains("needs command"), "{e}");
        let e = check(&format!("{BASE}[pools.p]\nreload = \"restart\"\n")).unwrap_err();
        assert!(e.contains("restart"), "{e}");
        let e = check(BASE).unwrap_err();
        assert!(e.contains("apply nothing"), "{e}");
        let e = check(&format!(
            "{BASE}[caches.c]\nkind = \"redis\"\nurl = \"http://x\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("redis://"), "{e}");
    }

    #[test]
    fn memcached_caches() {
        let c = check(&format!(
            "{BASE}[caches.m]\nkind = \"memcached\"\nurl = \"memcached://127.0.0.1:11211\"\n"
        ))
        .unwrap();
        assert_eq!(c.caches["m"].flush_mode(), FlushMode::FlushAll);
        let CacheEndpoint::Memcached { addr } = c.caches["m"].endpoint().unwrap() else {
            panic!("a memcached cache has a memcached endpoint")
        };
        assert_eq!(addr, "tcp://127.0.0.1:11211");
        let e = check(&format!(
            "{BASE}[caches.m]\nkind = \"memcached\"\nurl = \"h:1\"\nflush = \"prefix\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("flush_all"), "{e}");
        let e = check(&format!(
            "{BASE}[caches.m]\nkind = \"memcached\"\nurl = \"nohost\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("memcached://host:port"), "{e}");
        let e = check(&format!(
            "{BASE}[caches.r]\nkind = \"redis\"\nurl = \"redis://h:1\"\nflush = \"flush_all\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("for memcached"), "{e}");
    }

    #[test]
    fn signals_and_passwords() {
        assert_eq!(
            parse_signal("usr2").unwrap(),
            nix::sys::signal::Signal::SIGUSR2
        );
        assert_eq!(
            parse_signal("SIGHUP").unwrap(),
            nix::sys::signal::Signal::SIGHUP
        );
        assert_eq!(
            with_redis_password("redis://:old@h:1/2", "new"),
            "redis://:new@h:1/2"
        );
        assert_eq!(redact_url("redis://:pw@h:1"), "redis://:***@h:1");
        let c = check(&format!(
            "{BASE}[caches.c]\nkind = \"redis\"\nurl = \"redis://:hunter2@h:1\"\n"
        ))
        .unwrap();
        assert!(!c.redacted_json().contains("hunter2"));
    }
}
