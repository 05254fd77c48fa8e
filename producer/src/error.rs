//! Errors at the producer's module boundaries. Each variant names a condition and carries the
//! fields an operator needs; `is_transient` separates "retry with backoff" from "stop and say why".

use thiserror::Error;

/// The configuration file cannot be used (shared with the consumer).
pub use rtinval_schemas::config_file::ConfigError;

/// The binlog source failed.
#[derive(Debug, Error)]
pub enum SourceError {
    #[error(
        "source server setting {setting} is {actual:?}, rtinval needs {expected:?}; set it in the server config ({setting}={expected}) and restart the server"
    )]
    InvalidServerSetting {
        setting: &'static str,
        expected: &'static str,
        actual: String,
    },
    #[error("rule for {table}: {msg}")]
    RuleDoesNotMatchSchema { table: String, msg: String },
    #[error(
        "the source account lacks a privilege: {msg}; grant REPLICATION SLAVE, BINLOG MONITOR (MySQL: REPLICATION CLIENT) on *.* and SELECT on the watched schemas"
    )]
    MissingPrivilege { msg: String },
    #[error(
        "the source refused the login for {url}: {msg}; the user or password in source.url is wrong (RTINVAL_SOURCE_PASSWORD overrides the password), or the account may not connect from this host"
    )]
    AuthenticationFailed { url: String, msg: String },
    #[error("cannot connect to the source {url}")]
    Connect {
        url: String,
        #[source]
        error: mysql_async::Error,
    },
    #[error("source.url is not a mysql:// URL; write mysql://user:password@host:port")]
    BadUrl {
        #[source]
        error: mysql_async::UrlError,
    },
    #[error("the source {url} accepted the connection but sent no handshake within 10 s")]
    NoHandshake { url: String },
    #[error("binlog stream failed at {position}")]
    Stream {
        position: String,
        #[source]
        error: mysql_async::Error,
    },
    #[error("the server closed the binlog stream at {position}")]
    StreamClosed { position: String },
    #[error("no answer to a binlog request at {position} within 10 s")]
    NoBinlogAnswer { position: String },
    #[error("binlog position {position} is no longer on the server: {error}")]
    PositionLost { position: String, error: String },
    #[error("binlog stream idle for {secs} s at {position} (no events, no heartbeats)")]
    ReadTimeout { position: String, secs: u64 },
    #[error("cannot decode binlog event at {position} (table {table})")]
    Decode {
        position: String,
        table: String,
        #[source]
        error: std::io::Error,
    },
    #[error("query on the source failed: {0}")]
    Query(#[from] mysql_async::Error),
    #[error(
        "lost the leader lock {lock} (its connection to the source broke); another producer may lead now"
    )]
    LostLeadership { lock: String },
    #[error("the publish stage stopped")]
    OutputClosed,
}

impl SourceError {
    /// Transient errors are retried with backoff; the others stop the producer.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Connect { .. }
            | SourceError::NoHandshake { .. }
            | SourceError::Stream { .. }
            | SourceError::StreamClosed { .. }
            | SourceError::ReadTimeout { .. } => true,
            SourceError::Query(e) => {
                !matches!(e, mysql_async::Error::Server(s) if is_privilege_error(s.code))
            }
            _ => false,
        }
    }
}

/// MySQL/MariaDB error codes that mean "the account is not allowed to", on a query.
///
/// ER_DBACCESS_DENIED, ER_ACCESS_DENIED_ERROR, ER_TABLEACCESS_DENIED, ER_COLUMNACCESS_DENIED,
/// ER_SPECIFIC_ACCESS_DENIED. MariaDB answers a replication command without REPLICATION SLAVE
/// with ER_ACCESS_DENIED_ERROR (1045) too; only at connect does 1045 mean a failed login
/// ([`ER_ACCESS_DENIED_ERROR`], checked first by `server::connect`).
pub fn is_privilege_error(code: u16) -> bool {
    matches!(code, 1044 | 1045 | 1142 | 1143 | 1227)
}

/// ER_ACCESS_DENIED_ERROR: at connect, a wrong user or password, or a host that may not connect.
pub const ER_ACCESS_DENIED_ERROR: u16 = 1045;

/// Kafka publishing or checkpointing failed.
#[derive(Debug, Error)]
pub enum KafkaError {
    #[error("cannot create Kafka client for {brokers}")]
    Client {
        brokers: String,
        #[source]
        error: rdkafka::error::KafkaError,
    },
    #[error("the broker refused to create topic {topic}")]
    CreateTopic {
        topic: String,
        #[source]
        error: rdkafka::types::RDKafkaErrorCode,
    },
    #[error("cannot read metadata of topic {topic}")]
    Metadata {
        topic: String,
        #[source]
        error: rdkafka::error::KafkaError,
    },
    #[error("topic {topic} is not in the broker's metadata")]
    TopicMissing { topic: String },
    #[error("the broker reports topic {topic} unusable: {code}")]
    TopicUnusable { topic: String, code: String },
    #[error("Kafka did not acknowledge an event for {position} after all retries")]
    Delivery {
        position: String,
        #[source]
        error: rdkafka::error::KafkaError,
    },
    #[error("the delivery report for {position} was lost (the Kafka producer closed)")]
    DeliveryReportLost { position: String },
    #[error("cannot read the checkpoint from {topic}")]
    ReadCheckpoint {
        topic: String,
        #[source]
        error: rdkafka::error::KafkaError,
    },
    #[error("timed out reading the checkpoint from {topic} (offsets {start}..{high})")]
    CheckpointTimeout {
        topic: String,
        start: i64,
        high: i64,
    },
    #[error("cannot encode the checkpoint for {position}")]
    EncodeCheckpoint {
        position: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("the checkpoint in {topic} is not valid JSON")]
    BadCheckpoint {
        topic: String,
        #[source]
        error: serde_json::Error,
    },
    #[error(
        "schema registry: {0}; check [schema_registry] (url, username/password, ca_file) and that the registry is up"
    )]
    Registry(String),
}
