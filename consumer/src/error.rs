//! Errors at the consumer's module boundaries.

use thiserror::Error;

/// The configuration file cannot be used (shared with the producer).
pub use rtinval_schemas::config_file::ConfigError;

/// The cause beneath an error: a library's error, or a sentence where there is none.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// A pool reload failed (retried with backoff by the debouncer).
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("pool {pool}: cannot read pidfile {path}")]
    Pidfile {
        pool: String,
        path: String,
        #[source]
        error: Cause,
    },
    #[error("pool {pool}: cannot send {signal} to pid {pid}")]
    Signal {
        pool: String,
        signal: String,
        pid: i32,
        #[source]
        error: Cause,
    },
    #[error("pool {pool}: reload request to {url} failed")]
    Http {
        pool: String,
        url: String,
        #[source]
        error: Cause,
    },
    #[error("pool {pool}: reload command {command:?} failed")]
    Command {
        pool: String,
        command: String,
        #[source]
        error: Cause,
    },
}

/// A cache could not be reached or refused a command (retried with backoff).
#[derive(Debug, Error)]
#[error("cache {cache} ({url})")]
pub struct CacheError {
    pub cache: String,
    pub url: String,
    #[source]
    pub error: Cause,
}

/// Why the consumer stopped.
#[derive(Debug, Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("Kafka ({brokers})")]
    Kafka {
        brokers: String,
        #[source]
        error: rdkafka::error::KafkaError,
    },
    #[error("the dead-letter topic {topic} cannot be created")]
    DeadLetterTopic {
        topic: String,
        #[source]
        error: rdkafka::types::RDKafkaErrorCode,
    },
    #[error("stopped during {during}")]
    Stopped { during: &'static str },
    #[error(
        "http.listen {listen}: {error}; choose a free address (another process may hold it), or \"\" to disable the endpoint"
    )]
    Http {
        listen: String,
        error: std::io::Error,
    },
}
