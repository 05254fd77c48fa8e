//! Cache keys from the rule set's key templates, rendered as the producer renders them, so a
//! worker reads exactly the key a purge names: `object:{id}` with `id = 42` → `object:42`.
//! Filters: `{col|ipv4}` (an integer or 4 bytes as a dotted quad), `{col|ipv6}` (16 bytes),
//! `{col|hex}` (bytes as lowercase hex). Rule-set maps (`[maps.NAME]`) are the caller's to
//! apply: pass the mapped text as the column's value.

use std::net::{Ipv4Addr, Ipv6Addr};

/// A column value as the worker read it from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column<'a> {
    Int(i64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Why a key could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key template {template:?}: {why}")]
pub struct KeyError {
    pub template: String,
    pub why: String,
}

/// Render `template` with the named columns.
pub fn render(template: &str, columns: &[(&str, Column<'_>)]) -> Result<String, KeyError> {
    let bad = |why: String| KeyError {
        template: template.to_owned(),
        why,
    };
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err(bad("a '{' is not closed".into()));
        };
        let inner = &rest[open + 1..open + close];
        let (name, filter) = match inner.split_once('|') {
            Some((n, f)) => (n.trim(), Some(f.trim())),
            None => (inner.trim(), None),
        };
        let Some((_, value)) = columns.iter().find(|(n, _)| *n == name) else {
            return Err(bad(format!("no value for column {name:?}")));
        };
        let piece = match (filter, value) {
            (None, Column::Int(i)) => i.to_string(),
            (None, Column::Text(t)) => (*t).to_owned(),
            (None, Column::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
            (Some("ipv4"), Column::Int(i)) => u32::try_from(*i)
                .map(|v| Ipv4Addr::from(v).to_string())
                .map_err(|_| bad(format!("{i} is not an IPv4 address")))?,
            (Some("ipv4"), Column::Bytes(b)) => <[u8; 4]>::try_from(*b)
                .map(|a| Ipv4Addr::from(a).to_string())
                .map_err(|_| bad("an IPv4 address needs 4 bytes".into()))?,
            (Some("ipv6"), Column::Bytes(b)) => <[u8; 16]>::try_from(*b)
                .map(|a| Ipv6Addr::from(a).to_string())
                .map_err(|_| bad("an IPv6 address needs 16 bytes".into()))?,
            (Some("hex"), Column::Bytes(b)) => hex(b),
            (Some("hex"), Column::Text(t)) => hex(t.as_bytes()),
            (Some(f), _) => return Err(bad(format!("filter {f:?} does not apply to this value"))),
        };
        out.push_str(&piece);
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_the_producer() {
        assert_eq!(
            render("object:{id}", &[("id", Column::Int(42))]).unwrap(),
            "object:42"
        );
        assert_eq!(
            render("ipv4:{ip|ipv4}", &[("ip", Column::Int(167772161))]).unwrap(),
            "ipv4:10.0.0.1"
        );
        let v6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(
            render("ipv6:{ip|ipv6}", &[("ip", Column::Bytes(&v6))]).unwrap(),
            "ipv6:2001:db8::1"
        );
        assert_eq!(
            render("h:{x|hex}", &[("x", Column::Bytes(&[1, 255]))]).unwrap(),
            "h:01ff"
        );
        assert_eq!(
            render(
                "{a}-{b}",
                &[("a", Column::Text("x")), ("b", Column::Int(-1))]
            )
            .unwrap(),
            "x--1"
        );
    }

    #[test]
    fn says_what_is_missing() {
        assert!(render("o:{id}", &[]).unwrap_err().why.contains("\"id\""));
        assert!(render("o:{id", &[("id", Column::Int(1))]).is_err());
        assert!(render("o:{id|ipv6}", &[("id", Column::Int(1))]).is_err());
    }
}
