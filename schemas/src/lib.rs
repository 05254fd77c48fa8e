//! # Layout
//!
//! The rtinval event envelope: one versioned [`Event`] with one variant per [`EventKind`],
//! shared by the producer (which emits it), the consumer (which applies it) and `replay`.
//!
//! The files next to this crate are the contract, and tests keep the types honest to them:
//! - `event.schema.json` — JSON Schema (draft 2020-12) of the JSON wire format (the default);
//! - `event.avsc` — the Avro schema for the Schema Registry format.
//!
//! Guarantees of this crate:
//! - [`Event::id`] is derived from the source position only ([`event_id`]), so the same binlog
//!   change re-published after a crash carries the same id and duplicates are recognisable.
//! - Decoding rejects an unknown `schema_version` ([`DecodeError::UnsupportedVersion`]) instead
//!   of guessing; callers turn that into their widest safe action.
//!
//! Beside the contract, what both binaries share at run time (one place each, so the producer
//! and the consumer cannot drift apart): [`topics`] (topic names from the prefix), [`kafka`]
//! (the client context, the base librdkafka config, topic creation, reading a partition),
//! [`config_file`] (parse errors as one line, secret redaction), [`http`] (the `/metrics`,
//! `/healthz`, `/readyz` probes), [`runtime`] (logging set-up, `--version`, the clock) and
//! [`position`] (binlog positions and GTIDs, compared for the barrier).

use serde::{Deserialize, Serialize};

pub mod avro;
pub mod config_file;
pub mod http;
pub mod kafka;
pub mod position;
pub mod runtime;
pub mod topics;

/// Version of the envelope written by this build. Bumped only with a documented migration.
pub const SCHEMA_VERSION: u32 = 1;

/// Kafka header that carries the event kind (`pool_reset`, `cache_keys`, ...).
pub const HEADER_KIND: &str = "rtinval-kind";
/// Kafka header that carries the schema version as decimal text.
pub const HEADER_SCHEMA_VERSION: &str = "rtinval-schema-version";

/// JSON Schema of the wire format, as shipped in `schemas/event.schema.json`.
pub const JSON_SCHEMA: &str = include_str!("../event.schema.json");
/// Avro schema of the wire format, as shipped in `schemas/event.avsc`.
pub const AVRO_SCHEMA: &str = include_str!("../event.avsc");

/// One invalidation event, as published to Kafka.
///
/// Unknown fields are ignored when decoding (the JSON Schema is strict; readers are lenient so
/// that fields added with defaults in a later version do not break older consumers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Envelope version ([`SCHEMA_VERSION`] when written by this build).
    pub schema_version: u32,
    /// Deterministic id derived from the source position (see [`event_id`]).
    pub id: String,
    /// Where the change came from.
    pub source: Source,
    /// When the producer emitted the event, Unix time in milliseconds.
    pub emitted_at: u64,
    /// What to do.
    #[serde(flatten)]
    pub body: EventBody,
}

/// The kinds of event; the `kind` field on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// The pools listed must drop all in-process state (graceful reload).
    PoolReset {
        /// Pool names, sorted and unique.
        pools: Vec<String>,
    },
    /// Keys of a named cache are stale.
    CacheKeys {
        /// Cache name from the consumer's configuration.
        cache: String,
        /// Keys, sorted and unique, without the cache's node-local prefix.
        keys: Vec<String>,
    },
    /// A whole named cache is stale.
    CacheFlush {
        /// Cache name.
        cache: String,
        /// Why a flush instead of keys (bounded vocabulary, e.g. `too_many_keys`).
        reason: String,
    },
    /// Continuity is lost: every pool and every cache on the node is suspect.
    Resync {
        /// Why (bounded vocabulary, e.g. `position_lost`).
        reason: String,
    },
    /// The producer is alive and has published everything up to `source_time`.
    Heartbeat {
        /// Unix time in milliseconds up to which every source commit has been published.
        source_time: u64,
    },
}

/// The kind of an event without its payload: for metrics labels, headers and filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    PoolReset,
    CacheKeys,
    CacheFlush,
    Resync,
    Heartbeat,
}

impl EventKind {
    /// All kinds, in wire-name order of the design table.
    pub const ALL: [EventKind; 5] = [
        EventKind::PoolReset,
        EventKind::CacheKeys,
        EventKind::CacheFlush,
        EventKind::Resync,
        EventKind::Heartbeat,
    ];

    /// The wire name (`pool_reset`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::PoolReset => "pool_reset",
            EventKind::CacheKeys => "cache_keys",
            EventKind::CacheFlush => "cache_flush",
            EventKind::Resync => "resync",
            EventKind::Heartbeat => "heartbeat",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EventBody {
    /// The kind of this body.
    pub fn kind(&self) -> EventKind {
        match self {
            EventBody::PoolReset { .. } => EventKind::PoolReset,
            EventBody::CacheKeys { .. } => EventKind::CacheKeys,
            EventBody::CacheFlush { .. } => EventKind::CacheFlush,
            EventBody::Resync { .. } => EventKind::Resync,
            EventBody::Heartbeat { .. } => EventKind::Heartbeat,
        }
    }
}

/// Where an event came from: the source server and the transaction.
///
/// Like [`Event`], decoding ignores unknown fields: a later version may add fields (with
/// defaults) without breaking consumers that do not know them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Source {
    /// `server_id` of the source server that wrote the binlog event.
    pub server_id: u32,
    /// GTID of the transaction (MariaDB `domain-server-seq`, or a MySQL `uuid:n`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    /// Binlog file of the commit event.
    pub file: String,
    /// Binlog position just after the commit event (the resume position).
    pub pos: u64,
    /// Tables the transaction changed (watched ones only), with the operations seen.
    #[serde(default)]
    pub tables: Vec<TableChange>,
    /// Commit time on the source, Unix time in milliseconds (second resolution in binlogs).
    pub committed_at: u64,
}

/// A table touched by a transaction and the operations seen on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableChange {
    /// `database.table`.
    pub table: String,
    /// Operations seen, sorted and unique.
    pub ops: Vec<Op>,
}

/// A row operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }
}

/// The deterministic event id: `server_id:file:pos:seq`, where `seq` numbers the events one
/// source transaction produced. Same position and rules → same ids.
pub fn event_id(server_id: u32, file: &str, pos: u64, seq: usize) -> String {
    format!("{server_id}:{file}:{pos}:{seq}")
}

/// Why a message could not be turned into an [`Event`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload is not a valid JSON event.
    #[error("malformed event payload: {0}")]
    Malformed(serde_json::Error),
    /// An Avro payload that cannot be decoded: malformed, an unknown schema id, the registry
    /// unreachable, or no registry configured.
    #[error("undecodable Avro event: {0}")]
    Avro(String),
    /// The envelope version is not one this build can read.
    #[error(
        "unsupported schema_version {0} (this build reads {SCHEMA_VERSION}); upgrade the consumer"
    )]
    UnsupportedVersion(u32),
}

impl Event {
    /// The kind of this event.
    pub fn kind(&self) -> EventKind {
        self.body.kind()
    }

    /// Serialise to the JSON wire format.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising these plain types cannot fail: no maps, no I/O, no custom serialisers.
        #[allow(clippy::expect_used)]
        serde_json::to_vec(self).expect("serialising an Event to JSON is infallible")
    }

    /// Parse the JSON wire format, checking the schema version first so that a newer
    /// envelope is reported as such rather than as a field mismatch.
    pub fn from_json(bytes: &[u8]) -> Result<Event, DecodeError> {
        #[derive(Deserialize)]
        struct VersionOnly {
            schema_version: u32,
        }
        let v: VersionOnly = serde_json::from_slice(bytes).map_err(DecodeError::Malformed)?;
        if v.schema_version != SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedVersion(v.schema_version));
        }
        serde_json::from_slice(bytes).map_err(DecodeError::Malformed)
    }
}
