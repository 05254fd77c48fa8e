//! The source position that travels between the stages: what a batch was read at, what the
//! checkpoint stores, what metrics and events report. A module of its own so that source,
//! publish, metrics and checkpoint all import it and none of them imports another for it.

use serde::{Deserialize, Serialize};

/// A resume position in the source binlog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Position {
    /// Binlog file name.
    pub file: String,
    /// Offset within `file` of the first event after the commit.
    pub pos: u64,
    /// GTID of the last transaction before this position, if the server uses GTIDs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    /// `server_id` of the source that wrote the binlog.
    pub server_id: u32,
}

impl Position {
    /// The `source` block of an event emitted at this position (no table changes of its own).
    pub fn source(&self, committed_at: u64) -> rtinval_schemas::Source {
        rtinval_schemas::Source {
            server_id: self.server_id,
            gtid: self.gtid.clone(),
            file: self.file.clone(),
            pos: self.pos,
            tables: vec![],
            committed_at,
        }
    }
}

/// Order of two positions in one server's binlog: by the file's sequence number (the digits
/// after its last dot), then by offset.
pub fn binlog_order(a: (&str, u64), b: (&str, u64)) -> std::cmp::Ordering {
    let seq = |f: &str| {
        f.rsplit_once('.')
            .and_then(|(_, n)| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (seq(a.0), a.0, a.1).cmp(&(seq(b.0), b.0, b.1))
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)?;
        if let Some(g) = &self.gtid {
            write!(f, " (gtid {g})")?;
        }
        Ok(())
    }
}
