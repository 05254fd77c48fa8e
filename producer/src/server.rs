//! What the producer asks the source server, outside the binlog stream: one way to connect
//! (shared by the source stage, the leader lock and the cascade index), the start-up checks
//! (server settings, grants, rules against the live schema), the current binlog position, and
//! the foreign keys that cascade ([`load_cascades`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts};
use tracing::{info, warn};

use crate::cascade::{self, CascadeChain};
use crate::error::{ER_ACCESS_DENIED_ERROR, SourceError, is_privilege_error};
use crate::position::Position;
use crate::rules::Rule;

/// Server error "table doesn't exist".
const ER_NO_SUCH_TABLE: u16 = 1146;

/// An identifier quoted for SQL: `` `name` ``, backticks doubled.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// What the server is, as far as the producer cares.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub server_id: u32,
    pub is_mariadb: bool,
    pub version: String,
}

/// Connect to the source at `url`: a frozen server (TCP accepted, no handshake) is given 10 s; a
/// failed login and a missing privilege are told apart from an unreachable server.
pub async fn connect(url: &str) -> Result<Conn, SourceError> {
    let opts = Opts::from_url(url).map_err(|error| SourceError::BadUrl { error })?;
    let redacted = crate::config::redact_url(url);
    let conn = tokio::time::timeout(Duration::from_secs(10), Conn::new(opts))
        .await
        .map_err(|_| SourceError::NoHandshake {
            url: redacted.clone(),
        })?;
    conn.map_err(|error| match error {
        mysql_async::Error::Server(s) if s.code == ER_ACCESS_DENIED_ERROR => {
            SourceError::AuthenticationFailed {
                url: redacted,
                msg: s.message,
            }
        }
        mysql_async::Error::Server(s) if is_privilege_error(s.code) => {
            SourceError::MissingPrivilege { msg: s.message }
        }
        error => SourceError::Connect {
            url: redacted,
            error,
        },
    })
}

/// A server's "access denied" as [`SourceError::MissingPrivilege`], anything else as a query error.
pub(crate) fn privilege_error(e: mysql_async::Error) -> SourceError {
    match e {
        mysql_async::Error::Server(s) if is_privilege_error(s.code) => {
            SourceError::MissingPrivilege { msg: s.message }
        }
        e => SourceError::Query(e),
    }
}

/// Check the server settings the producer depends on.
pub async fn check_server(conn: &mut Conn) -> Result<ServerInfo, SourceError> {
    let rows: Vec<(String, String)> = conn
        .query(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('log_bin', 'binlog_format', \
             'binlog_row_image', 'binlog_row_metadata', 'log_bin_compress', \
             'binlog_transaction_compression', 'server_id', 'version')",
        )
        .await?;
    let vars: HashMap<String, String> = rows
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    let expect = |setting: &'static str, expected: &'static str| -> Result<(), SourceError> {
        let actual = get(setting);
        if actual.eq_ignore_ascii_case(expected) {
            Ok(())
        } else {
            Err(SourceError::InvalidServerSetting {
                setting,
                expected,
                actual,
            })
        }
    };
    expect("log_bin", "ON")?;
    expect("binlog_format", "ROW")?;
    expect("binlog_row_image", "FULL")?;
    expect("binlog_row_metadata", "FULL")?;
    if vars.contains_key("log_bin_compress") {
        expect("log_bin_compress", "OFF")?;
    }
    if vars.contains_key("binlog_transaction_compression") {
        expect("binlog_transaction_compression", "OFF")?;
    }
    // The account must be able to read the binlog position (BINLOG MONITOR / REPLICATION CLIENT).
    let server_id = get("server_id").parse().unwrap_or(0);
    current_position(conn, server_id).await?;
    let version = get("version");
    Ok(ServerInfo {
        server_id,
        is_mariadb: version.to_ascii_lowercase().contains("mariadb"),
        version,
    })
}

/// The server's current binlog position.
pub async fn current_position(conn: &mut Conn, server_id: u32) -> Result<Position, SourceError> {
    let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Ok(r) => r,
        // MySQL 8.4 removed SHOW MASTER STATUS.
        Err(mysql_async::Error::Server(s)) if s.code == 1064 => {
            conn.query_first("SHOW BINARY LOG STATUS").await?
        }
        Err(mysql_async::Error::Server(s)) if is_privilege_error(s.code) => {
            return Err(SourceError::MissingPrivilege { msg: s.message });
        }
        Err(e) => return Err(e.into()),
    };
    let Some(row) = row else {
        return Err(SourceError::InvalidServerSetting {
            setting: "log_bin",
            expected: "ON",
            actual: "(SHOW MASTER STATUS is empty)".into(),
        });
    };
    let file: String = row.get(0).unwrap_or_default();
    let pos: u64 = row.get(1).unwrap_or_default();
    let gtid = gtid_position(conn).await;
    Ok(Position {
        file,
        pos,
        gtid,
        server_id,
    })
}

async fn gtid_position(conn: &mut Conn) -> Option<String> {
    conn.query_first::<String, _>("SELECT @@gtid_binlog_pos")
        .await
        .ok()
        .flatten()
        .filter(|s| !s.is_empty())
}

/// Cascade paths by parent `database.table` ([`crate::cascade`]): every way a parent change
/// reaches, through foreign keys InnoDB applies unlogged, a table with rules — at any depth and
/// through tables without rules. Each parent's paths are logged at info, one line per table.
///
/// Foreign keys are read from `SHOW CREATE TABLE` (MariaDB hides
/// `information_schema.REFERENTIAL_CONSTRAINTS` rows from an account with only SELECT), first of
/// each table with rules, then of each table a cascading key of those points at, and so on up.
pub async fn load_cascades(
    conn: &mut Conn,
    rules: &[Rule],
) -> Result<BTreeMap<String, Vec<CascadeChain>>, SourceError> {
    let ruled: BTreeSet<String> = rules.iter().map(Rule::qualified_table).collect();
    let mut to_read: Vec<String> = ruled.iter().cloned().collect();
    let mut read: BTreeSet<String> = BTreeSet::new();
    let mut fks = Vec::new();
    while let Some(table) = to_read.pop() {
        if !read.insert(table.clone()) {
            continue;
        }
        let Some((db, name)) = table.split_once('.') else {
            continue;
        };
        let ddl: Option<(String, String)> = match conn
            .query_first(format!(
                "SHOW CREATE TABLE {}.{}",
                quote_ident(db),
                quote_ident(name)
            ))
            .await
        {
            Ok(row) => row,
            // A foreign key may name a table that does not exist (foreign_key_checks=0): it has
            // no rows, so nothing cascades from it.
            Err(mysql_async::Error::Server(e)) if e.code == ER_NO_SUCH_TABLE => {
                warn!(table = %table, "A foreign key references a table that does not exist; nothing cascades from it.");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let Some((_, ddl)) = ddl else { continue };
        for (parent, fk) in cascade::parse_foreign_keys(db, name, &ddl) {
            if fk.cascades() {
                to_read.push(parent.clone());
                fks.push((parent, fk));
            }
        }
    }
    let chains = cascade::chains(&fks, |t| ruled.contains(t));
    for (parent, paths) in &chains {
        let listed: Vec<String> = paths.iter().map(ToString::to_string).collect();
        info!(table = %parent, chains = %listed.join("; "), "Cascades: a change of this table's rows stands in for the rows these foreign keys change unlogged.");
    }
    Ok(chains)
}

/// `domain-server-sequence`, as MariaDB writes GTIDs (MySQL's are `uuid:n`).
pub(crate) fn is_mariadb_gtid(g: &str) -> bool {
    let parts: Vec<&str> = g.split('-').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Validate every rule against the live schema: the table exists and has every column the rule
/// reads. The message names the rule's table and the missing piece.
pub async fn validate_rules(conn: &mut Conn, rules: &[Rule]) -> Result<(), SourceError> {
    for rule in rules {
        let mismatch = |msg: String| SourceError::RuleDoesNotMatchSchema {
            table: rule.qualified_table(),
            msg,
        };
        let kind: Option<String> = conn
            .exec_first(
                "SELECT TABLE_TYPE FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (&rule.database, &rule.table),
            )
            .await?;
        match kind.as_deref() {
            None => {
                return Err(mismatch(format!(
                    "table does not exist, or the producer account cannot see it (GRANT SELECT ON `{}`.* TO the producer)",
                    rule.database
                )));
            }
            Some("VIEW") => {
                // A view has no rows of its own: the binlog carries changes of its base tables.
                return Err(mismatch(
                    "is a VIEW, and views never appear in the binlog; write the rule on the view's base table"
                        .into(),
                ));
            }
            Some(_) => {}
        }
        let columns: Vec<(String, String)> = conn
            .exec(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (&rule.database, &rule.table),
            )
            .await?;
        let type_of = |col: &str| {
            columns
                .iter()
                .find(|(c, _)| c.eq_ignore_ascii_case(col))
                .map(|(_, t)| t.as_str())
        };
        let missing = |col: &str| {
            let names: Vec<&str> = columns.iter().map(|(c, _)| c.as_str()).collect();
            mismatch(format!(
                "column {col:?} does not exist; the table has: {}",
                names.join(", ")
            ))
        };
        for col in rule.columns() {
            if type_of(col).is_none() {
                return Err(missing(col));
            }
        }
        for (col, filter) in rule.keys.iter().flat_map(|t| t.placeholders()) {
            if let (Some(filter), Some(data_type)) = (filter, type_of(col)) {
                filter
                    .accepts(data_type)
                    .map_err(|e| mismatch(format!("column {col:?}: {e}")))?;
            }
        }
    }
    Ok(())
}
