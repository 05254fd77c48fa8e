//! Decode stage: binlog rows → typed values aligned with the table's column names.
//!
//! Column names come from the TABLE_MAP optional metadata (`binlog_row_metadata=FULL`), so a
//! schema change mid-stream is seen with the first row event after it.

use std::fmt::Write as _;
use std::sync::Arc;

use bitvec::slice::BitSlice;
use mysql_async::binlog::events::{
    OptionalMetaExtractor, OptionalMetadataField, RowsEventData, TableMapEvent,
};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_common::io::ParseBuf;
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
                    push_hex(b, out);
                }
            },
            Value::Text(s) => out.push_str(s),
        }
        true
    }
}

/// Append `bytes` as lowercase hex; true (writing to a `String` cannot fail).
pub fn push_hex(bytes: &[u8], out: &mut String) -> bool {
    bytes.iter().all(|b| write!(out, "{b:02x}").is_ok())
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

/// What decoding needs to know about a table, from its TABLE_MAP event.
#[derive(Debug, Clone)]
pub struct TableShape {
    /// Column names in table order.
    pub names: Arc<[String]>,
    /// For ENUM columns, the value names (the binlog carries 1-based indexes).
    enums: Vec<Option<Arc<[String]>>>,
    /// For fixed-length string columns (CHAR/BINARY(n)), the length in bytes: MariaDB strips
    /// the trailing zero bytes of BINARY(n) values in the binlog; they are padded back.
    fixed_len: Vec<Option<usize>>,
    /// How to decode each column, read once from the table map ([`TableShape::rows`]).
    columns: Arc<[ColumnSpec]>,
}

/// What decoding one column's values needs: type, metadata, signedness, binary charset.
#[derive(Debug, Clone)]
struct ColumnSpec {
    ty: ColumnType,
    meta: Box<[u8]>,
    unsigned: bool,
    binary: bool,
}

/// The binary pseudo-charset: BINARY/VARBINARY/BLOB columns.
const BINARY_CHARSET: u16 = 63;

impl TableShape {
    /// Read names and ENUM values from the optional metadata; `None` when the server did not
    /// send column names (`binlog_row_metadata` is not FULL).
    pub fn from_table_map(tme: &TableMapEvent<'_>) -> Option<TableShape> {
        let mut names: Option<Vec<String>> = None;
        let mut enum_values: Vec<Arc<[String]>> = Vec::new();
        for field in tme.iter_optional_meta() {
            match field {
                Ok(OptionalMetadataField::ColumnName(n)) => {
                    names = n
                        .iter_names()
                        .map(|n| n.map(|n| n.name().into_owned()))
                        .collect::<Result<_, _>>()
                        .ok();
                }
                Ok(OptionalMetadataField::EnumStrValue(e)) => {
                    for values in e.iter_values().flatten() {
                        enum_values.push(
                            values
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect(),
                        );
                    }
                }
                _ => {}
            }
        }
        let names = names?;
        let mut next_enum = enum_values.into_iter();
        let enums = (0..names.len())
            .map(|i| match tme.get_column_type(i) {
                Ok(Some(ColumnType::MYSQL_TYPE_ENUM)) => next_enum.next(),
                _ => None,
            })
            .collect();
        let fixed_len = (0..names.len())
            .map(|i| match tme.get_column_type(i) {
                Ok(Some(ColumnType::MYSQL_TYPE_STRING)) => {
                    tme.get_column_metadata(i).and_then(string_length)
                }
                _ => None,
            })
            .collect();
        Some(TableShape {
            names: names.into(),
            enums,
            fixed_len,
            columns: column_specs(tme).unwrap_or_default().into(),
        })
    }

    /// The rows of a rows event, decoded with the column facts read once from the table map
    /// instead of per row (mysql_common's row iterator rebuilds every column's description,
    /// with its names, for every row). `None` when this path does not apply (a MySQL partial
    /// JSON update, or a table map this shape was not built from): use [`TableShape::values`]
    /// on mysql_common's rows then. `tests/tests/decoder_equivalence.rs` checks both paths
    /// agree on every column type.
    pub fn rows<'a>(&'a self, event: &'a RowsEventData<'a>) -> Option<Rows<'a>> {
        if matches!(event, RowsEventData::PartialUpdateRowsEvent(_)) {
            return None;
        }
        let num_columns = usize::try_from(event.num_columns()).ok()?;
        if num_columns != self.columns.len() || num_columns != self.names.len() {
            return None;
        }
        Some(Rows {
            shape: self,
            before: event.columns_before_image(),
            after: event.columns_after_image(),
            buf: ParseBuf(event.rows_data()),
        })
    }

    /// One row image: the null bitmap of the present columns, then their values.
    fn image(&self, present: &BitSlice<u8>, buf: &mut ParseBuf<'_>) -> std::io::Result<Vec<Value>> {
        // A reborrow whose lifetime may be shorter than the buffer's: the column metadata the
        // value parser borrows lives only as long as `self`.
        let whole = buf.0;
        let mut local = ParseBuf(whole);
        let out = self.image_from(present, &mut local)?;
        buf.0 = &whole[whole.len() - local.0.len()..];
        Ok(out)
    }

    fn image_from<'s>(
        &'s self,
        present: &BitSlice<u8>,
        buf: &mut ParseBuf<'s>,
    ) -> std::io::Result<Vec<Value>> {
        let count = present.count_ones();
        let nulls: &[u8] = buf.parse(count.div_ceil(8))?;
        let mut out = Vec::with_capacity(self.columns.len());
        let mut image_idx = 0usize;
        for (i, spec) in self.columns.iter().enumerate() {
            if !present.get(i).as_deref().copied().unwrap_or(false) {
                out.push(Value::Absent);
                continue;
            }
            let null = nulls
                .get(image_idx / 8)
                .is_none_or(|b| b >> (image_idx % 8) & 1 == 1);
            image_idx += 1;
            if null {
                out.push(Value::Null);
                continue;
            }
            let v: BinlogValue<'_> = buf.parse((spec.ty, &spec.meta[..], spec.unsigned, false))?;
            out.push(self.finish(i, value(v), spec.binary));
        }
        Ok(out)
    }

    /// ENUM indexes become names; BINARY(n) values get their stripped zero bytes back.
    fn finish(&self, i: usize, v: Value, binary: bool) -> Value {
        match (v, self.enums.get(i)) {
            (Value::Int(idx), Some(Some(names))) => enum_name(names, idx),
            (Value::Bytes(mut b), _) => {
                if let (true, Some(Some(n))) = (binary, self.fixed_len.get(i))
                    && b.len() < *n
                {
                    b.resize(*n, 0);
                }
                Value::Bytes(b)
            }
            (v, _) => v,
        }
    }

    /// Values of one binlog row image (mysql_common's row type), index-aligned with the table's
    /// columns.
    pub fn values(&self, row: BinlogRow) -> Vec<Value> {
        let columns = self.names.len();
        let len = row.len();
        let mut out = Vec::with_capacity(columns.max(len));
        let mut row = row;
        for i in 0..len {
            let v = match row.take(i) {
                None => Value::Absent,
                Some(v) => value(v),
            };
            let binary = matches!(v, Value::Bytes(_))
                && row
                    .columns_ref()
                    .get(i)
                    .is_some_and(|c| c.character_set() == BINARY_CHARSET);
            out.push(self.finish(i, v, binary));
        }
        while out.len() < columns {
            out.push(Value::Absent);
        }
        out
    }
}

/// Rows of one rows event: (before image, after image) per row.
pub struct Rows<'a> {
    shape: &'a TableShape,
    before: Option<&'a BitSlice<u8>>,
    after: Option<&'a BitSlice<u8>>,
    buf: ParseBuf<'a>,
}

/// A row's images: before (updates, deletes) and after (inserts, updates).
pub type RowImages = (Option<Vec<Value>>, Option<Vec<Value>>);

impl Iterator for Rows<'_> {
    type Item = std::io::Result<RowImages>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let mut read = |present: Option<&BitSlice<u8>>| {
            present
                .map(|p| self.shape.image(p, &mut self.buf))
                .transpose()
        };
        let before = match read(self.before) {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        };
        let after = match read(self.after) {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok((before, after)))
    }
}

/// Per-column decoding facts of a table map, as mysql_common derives them for each row.
fn column_specs(tme: &TableMapEvent<'_>) -> Option<Vec<ColumnSpec>> {
    let extractor = OptionalMetaExtractor::new(tme.iter_optional_meta()).ok()?;
    let mut signedness = extractor.iter_signedness();
    let mut charset = extractor.iter_charset();
    let mut enum_charset = extractor.iter_enum_and_set_charset();
    let count = usize::try_from(tme.columns_count()).ok()?;
    let mut specs = Vec::with_capacity(count);
    for i in 0..count {
        let ty = tme.get_column_type(i).ok()??;
        let unsigned = ty.is_numeric_type() && signedness.next().unwrap_or_default();
        let cs = if ty.is_character_type() {
            charset.next().transpose().ok()?.unwrap_or_default()
        } else if ty.is_enum_or_set_type() {
            enum_charset.next().transpose().ok()?.unwrap_or_default()
        } else {
            0
        };
        specs.push(ColumnSpec {
            ty,
            meta: tme.get_column_metadata(i).unwrap_or(&[]).into(),
            unsigned,
            binary: cs == BINARY_CHARSET,
        });
    }
    Some(specs)
}

impl TableShape {
    /// A shape with these column names only (no ENUM or fixed-length facts): for rows that are
    /// already decoded, such as the cascade index's stored columns.
    pub fn named(names: Vec<String>) -> TableShape {
        let enums = vec![None; names.len()];
        let fixed_len = vec![None; names.len()];
        TableShape {
            names: names.into(),
            enums,
            fixed_len,
            columns: Arc::from(Vec::new()),
        }
    }

    /// A shape with these column names and no ENUM columns.
    #[cfg(test)]
    pub fn for_tests(names: Vec<String>) -> TableShape {
        TableShape::named(names)
    }
}

/// Byte length of a CHAR/BINARY column from its two metadata bytes (as the server encodes it:
/// lengths over 255 borrow bits of the type byte).
fn string_length(meta: &[u8]) -> Option<usize> {
    let (&b0, &b1) = (meta.first()?, meta.get(1)?);
    let (b0, b1) = (usize::from(b0), usize::from(b1));
    Some(if (b0 & 0x30) != 0x30 {
        b1 | (((b0 & 0x30) ^ 0x30) << 4)
    } else {
        b1
    })
}

/// ENUM index → name, as the server would print it (index 0 is the empty error value).
fn enum_name(names: &[String], idx: i64) -> Value {
    match usize::try_from(idx) {
        Ok(0) => Value::Bytes(Vec::new()),
        Ok(i) => names
            .get(i - 1)
            .map_or(Value::Int(idx), |n| Value::Bytes(n.clone().into_bytes())),
        Err(_) => Value::Int(idx),
    }
}

/// A value read by a query (binary protocol) as the binlog decoder would give it.
pub fn from_query(v: mysql_async::Value) -> Value {
    value(BinlogValue::Value(v))
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
        assert_eq!(
            rendered(Value::UInt(u64::MAX)).as_deref(),
            Some("18446744073709551615")
        );
        assert_eq!(
            rendered(Value::Bytes(b"srv-01".to_vec())).as_deref(),
            Some("srv-01")
        );
        assert_eq!(
            rendered(Value::Bytes(vec![0xfe, 0x80, 0, 1])).as_deref(),
            Some("fe800001")
        );
        assert_eq!(rendered(Value::Null), None);
        assert_eq!(rendered(Value::Absent), None);
    }

    #[test]
    fn fixed_string_lengths_from_metadata() {
        assert_eq!(string_length(&[0xfe, 16]), Some(16));
        // CHAR(300) in a 1-byte charset: the high bits of the length live in the type byte.
        assert_eq!(string_length(&[0xee, 44]), Some(300));
        assert_eq!(string_length(&[0xfe]), None);
    }

    #[test]
    fn enum_indexes_become_names() {
        let names: Vec<String> = vec!["object".into(), "rack".into()];
        assert_eq!(enum_name(&names, 2), Value::Bytes(b"rack".to_vec()));
        assert_eq!(enum_name(&names, 0), Value::Bytes(Vec::new()));
        assert_eq!(enum_name(&names, 9), Value::Int(9));
    }

    #[test]
    fn dates_and_times_render_like_the_server() {
        let d = value(BinlogValue::Value(mysql_async::Value::Date(
            2026, 1, 2, 3, 4, 5, 0,
        )));
        assert_eq!(d, Value::Text("2026-01-02 03:04:05".into()));
        let t = value(BinlogValue::Value(mysql_async::Value::Time(
            true, 1, 2, 3, 4, 5,
        )));
        assert_eq!(t, Value::Text("-26:03:04.000005".into()));
    }
}
