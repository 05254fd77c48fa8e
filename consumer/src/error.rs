//! Errors at the consumer's module boundaries.

use thiserror::Error;

/// The configuration file cannot be used (shared with the producer).
pub use rtinval_schemas::config_file::ConfigError;

/// A pool reload failed (retried with backoff by the debouncer).
#[derive(Debug, Error)]
pub enum ReloadError {
    #[error("pool {pool}: cannot read pidfile {path}: {error}")]
    Pidfile {
        pool: String,
        path: String,
        error: String,
    },
    #[error("pool {pool}: cannot send {signal} to pid {pid}: {error}")]
    Signal {
        pool: String,
        signal: String,
        pid: i32,
        error: String,
    },
    #[error("pool {pool}: reload request to {url} failed: {error}")]
    Http {
        pool: String,
        url: String,
        error: String,
    },
    #[error("pool {pool}: reload command {command:?} failed: {error}")]
    Command {
        pool: String,
        command: String,
        error: String,
    },
}

/// A cache could not be reached or refused a command (retried with backoff).
#[derive(Debug, Error)]
#[error("cache {cache} ({url}): {error}")]
pub struct CacheError {
    pub cache: String,
    pub url: String,
    pub error: String,
}

/// Why the consumer stopped.
#[derive(Debug, Error)]
pub enum ConsumerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("Kafka ({brokers}): {error}")]
    Kafka { brokers: String, error: String },
    #[error(
        "http.listen {listen}: {error}; choose a free address (another process may hold it), or \"\" to disable the endpoint"
    )]
    Http {
        listen: String,
        error: std::io::Error,
    },
}
