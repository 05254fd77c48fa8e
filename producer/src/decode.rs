//! Decode stage: binlog rows → typed values aligned with the table's column names.
//!
//! Column names come from the TABLE_MAP optional metadata (`binlog_row_metadata=FULL`), so a
//! schema change mid-stream is seen with the first row event after it.

use std::fmt::Write as _;
use std::sync::Arc;

use mysql_async::binlog::events::{OptionalMetadataField, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use rtinval_schemas::Op;

/// One column value, as rules see it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    UInt(u64),
    Float(f64),
    /// Text and binary columns. Rendered as UTF-8 when valid, else as lowercase hex.
    Bytes(Vec<u8>),
    /// Dates, times, JSON: already rendered as the server would print them.
    Text(String),
    /// The column is not in this row image (e.g. `binlog_row_image=MINIMAL`).
    Absent,
}

impl Value {
    /// Append the value as a key component. `false` for NULL and absent values.
    pub fn render(&self, out: &mut String) -> bool {
        match self {
            Value::Null | Value::Absent => return false,
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::UInt(u) => {
                let _ = write!(out, "{u}");
            }
            Value::Float(f) => {
                let _ = write!(out, "{f}");
            }
            Value::Bytes(b) => match std::str::from_utf8(b) {
                Ok(s) => out.push_str(s),
                Err(_) => {
                    for byte in b {
                        let _ = write!(out, "{byte:02x}");
                    }
                }
            },
            Value::Text(s) => out.push_str(s),
        }
        true
    }
}

/// A decoded row change of a watched table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub op: Op,
    /// Before image (updates, deletes), aligned with the table's columns.
    pub before: Option<Vec<Value>>,
    /// After image (inserts, updates), aligned with the table's columns.
    pub after: Option<Vec<Value>>,
}

/// Column names from a TABLE_MAP event, or `None` when the server did not send them
/// (`binlog_row_metadata` is not FULL).
pub fn column_names(tme: &TableMapEvent<'_>) -> Option<Arc<[String]>> {
    for field in tme.iter_optional_meta() {
        if let Ok(OptionalMetadataField::ColumnName(names)) = field {
            let names: Result<Vec<String>, _> =
                names.iter_names().map(|n| n.map(|n| n.name().into_owned())).collect();
            return names.ok().map(Into::into);
        }
    }
    None
}

/// Values of one binlog row image, index-aligned with the table's columns.
pub fn values(row: BinlogRow, columns: usize) -> Vec<Value> {
    let len = row.len();
    let mut out = Vec::with_capacity(columns.max(len));
    let mut row = row;
    for i in 0..len {
        out.push(match row.take(i) {
            None => Value::Absent,
            Some(v) => value(v),
        });
    }
    while out.len() < columns {
        out.push(Value::Absent);
    }
    out
}

fn value(v: BinlogValue<'_>) -> Value {
    use mysql_async::Value as V;
    match v {
        BinlogValue::Value(V::NULL) => Value::Null,
        BinlogValue::Value(V::Int(i)) => Value::Int(i),
        BinlogValue::Value(V::UInt(u)) => Value::UInt(u),
        BinlogValue::Value(V::Float(f)) => Value::Float(f64::from(f)),
        BinlogValue::Value(V::Double(f)) => Value::Float(f),
        BinlogValue::Value(V::Bytes(b)) => Value::Bytes(b),
        BinlogValue::Value(V::Date(y, mo, d, h, mi, s, us)) => {
            let mut t = format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}");
            if us != 0 {
                let _ = write!(t, ".{us:06}");
            }
            Value::Text(t)
        }
        BinlogValue::Value(V::Time(neg, days, h, mi, s, us)) => {
            let hours = u64::from(days) * 24 + u64::from(h);
            let mut t = format!("{}{hours:02}:{mi:02}:{s:02}", if neg { "-" } else { "" });
            if us != 0 {
                let _ = write!(t, ".{us:06}");
            }
            Value::Text(t)
        }
        BinlogValue::Jsonb(j) => match serde_json::Value::try_from(j) {
            Ok(json) => Value::Text(json.to_string()),
            Err(_) => Value::Absent,
        },
        BinlogValue::JsonDiff(_) => Value::Absent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(v: Value) -> Option<String> {
        let mut s = String::new();
        v.render(&mut s).then_some(s)
    }

    #[test]
    fn rendering_matches_what_an_application_would_print() {
        assert_eq!(rendered(Value::Int(-42)).as_deref(), Some("-42"));
        assert_eq!(rendered(Value::UInt(u64::MAX)).as_deref(), Some("18446744073709551615"));
        assert_eq!(rendered(Value::Bytes(b"srv-01".to_vec())).as_deref(), Some("srv-01"));
        assert_eq!(rendered(Value::Bytes(vec![0xfe, 0x80, 0, 1])).as_deref(), Some("fe800001"));
        assert_eq!(rendered(Value::Null), None);
        assert_eq!(rendered(Value::Absent), None);
    }

    #[test]
    fn dates_and_times_render_like_the_server() {
        let d = value(BinlogValue::Value(mysql_async::Value::Date(2026, 1, 2, 3, 4, 5, 0)));
        assert_eq!(d, Value::Text("2026-01-02 03:04:05".into()));
        let t = value(BinlogValue::Value(mysql_async::Value::Time(true, 1, 2, 3, 4, 5)));
        assert_eq!(t, Value::Text("-26:03:04.000005".into()));
    }
}
