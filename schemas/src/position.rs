//! Source positions a writer can wait for (`/wait?gtid=…`), parsed and compared in one place.
//!
//! Three forms, as the servers report them after a commit:
//! - **MariaDB GTIDs**: `domain-server-seq`, or a list `0-1-17,1-2-5` (`@@last_gtid`,
//!   `@@gtid_binlog_pos`). Per domain the sequence number grows in binlog order, so a position
//!   is reached in a domain once a transaction of that domain with an equal or higher sequence
//!   number is applied. The server id does not take part (it changes on failover).
//! - **MySQL GTID sets**: `uuid:1-100:200-300,uuid2:5` (`session_track_gtids=OWN_GTID`,
//!   `@@gtid_executed`). Compared the same way, by the highest transaction number per source
//!   uuid: transactions of one source enter the binlog in number order.
//! - **Binlog file and offset**: `mariadb-bin.000003:1234`, ordered by the file's sequence
//!   number, then the offset.
//!
//! [`Reached`] is what a node has applied; [`WaitFor::reached_by`] decides a wait.

use std::collections::BTreeMap;
use std::fmt;

/// A binlog file and offset, ordered as the server writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePos {
    pub file: String,
    pub pos: u64,
}

impl FilePos {
    /// `(base name, sequence number)`: `mariadb-bin.000003` → `("mariadb-bin", 3)`.
    fn sequence(&self) -> (&str, u64) {
        match self.file.rsplit_once('.') {
            Some((base, n)) => match n.parse::<u64>() {
                Ok(n) => (base, n),
                Err(_) => (self.file.as_str(), 0),
            },
            None => (self.file.as_str(), 0),
        }
    }
}

impl PartialOrd for FilePos {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FilePos {
    /// By file sequence number (a 7-digit `.1000000` follows `.999999`), then offset.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        let (b0, n0) = self.sequence();
        let (b1, n1) = other.sequence();
        (b0, n0, self.pos).cmp(&(b1, n1, other.pos))
    }
}

impl fmt::Display for FilePos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

/// The highest transaction number per GTID source: MariaDB domain (`"0"`) or MySQL uuid.
pub type GtidState = BTreeMap<String, u64>;

/// A position to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// MariaDB GTIDs or a MySQL GTID set, as the highest number per source.
    Gtids(GtidState),
    FilePos(FilePos),
}

/// Why a position string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPosition(pub String);

impl fmt::Display for BadPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadPosition {}

impl WaitFor {
    /// Parse `0-1-17`, `0-1-17,1-2-5`, `uuid:1-100[:…][,uuid2:…]` or `file.000003:1234`.
    pub fn parse(text: &str) -> Result<WaitFor, BadPosition> {
        let text = text.trim();
        let bad = |why: &str| {
            Err(BadPosition(format!(
                "position {text:?}: {why}; expected a MariaDB GTID (0-1-17, or a list 0-1-17,1-2-5), a MySQL GTID set (3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5) or a binlog file:pos (mariadb-bin.000003:1234)"
            )))
        };
        if text.is_empty() {
            return bad("empty");
        }
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.iter().all(|p| parse_mariadb_gtid(p).is_some()) {
            let mut state = GtidState::new();
            for (domain, seq) in parts.iter().filter_map(|p| parse_mariadb_gtid(p)) {
                let e = state.entry(domain).or_insert(0);
                *e = (*e).max(seq);
            }
            return Ok(WaitFor::Gtids(state));
        }
        if parts.iter().all(|p| parse_mysql_gtids(p).is_some()) {
            let mut state = GtidState::new();
            for (uuid, max) in parts.iter().filter_map(|p| parse_mysql_gtids(p)) {
                let e = state.entry(uuid).or_insert(0);
                *e = (*e).max(max);
            }
            return Ok(WaitFor::Gtids(state));
        }
        if let Some((file, pos)) = text.rsplit_once(':')
            && !file.is_empty()
            && !is_uuid(file)
            && !file.contains(',')
            && !file.contains(':')
            && let Ok(pos) = pos.parse::<u64>()
        {
            return Ok(WaitFor::FilePos(FilePos {
                file: file.to_owned(),
                pos,
            }));
        }
        bad("not a GTID, GTID set or file:pos")
    }

    /// Has a node that reached `reached` applied everything up to this position?
    pub fn reached_by(&self, reached: &Reached) -> bool {
        match self {
            WaitFor::FilePos(p) => reached.file_pos.as_ref().is_some_and(|r| r >= p),
            WaitFor::Gtids(want) => want
                .iter()
                .all(|(source, seq)| reached.gtids.get(source).is_some_and(|r| r >= seq)),
        }
    }
}

impl fmt::Display for WaitFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitFor::FilePos(p) => p.fmt(f),
            WaitFor::Gtids(g) => write_gtids(f, g),
        }
    }
}

fn write_gtids(f: &mut fmt::Formatter<'_>, g: &GtidState) -> fmt::Result {
    for (i, (source, seq)) in g.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        if source.contains('-') {
            write!(f, "{source}:{seq}")?;
        } else {
            write!(f, "{source}-*-{seq}")?;
        }
    }
    Ok(())
}

/// `domain-server-seq` → `(domain, seq)`.
fn parse_mariadb_gtid(g: &str) -> Option<(String, u64)> {
    let mut it = g.split('-');
    let (d, s, n) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    d.parse::<u32>().ok()?;
    s.parse::<u32>().ok()?;
    Some((d.to_owned(), n.parse().ok()?))
}

fn is_uuid(s: &str) -> bool {
    let hex = s.chars().filter(|c| *c != '-').count();
    s.len() == 36 && hex == 32 && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

/// `uuid:1-100:200` → `(uuid, 200)`: the highest number in the intervals.
fn parse_mysql_gtids(g: &str) -> Option<(String, u64)> {
    let mut it = g.split(':');
    let uuid = it.next()?.to_ascii_lowercase();
    if !is_uuid(&uuid) {
        return None;
    }
    let mut max = None;
    for interval in it {
        let (lo, hi) = match interval.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u64>().ok()?, hi.parse::<u64>().ok()?),
            None => {
                let n = interval.parse::<u64>().ok()?;
                (n, n)
            }
        };
        if lo == 0 || hi < lo {
            return None;
        }
        max = Some(max.unwrap_or(0).max(hi));
    }
    Some((uuid, max?))
}

/// What a node has applied: everything up to `file_pos` in binlog order, and per GTID source
/// everything up to the number given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reached {
    pub file_pos: Option<FilePos>,
    pub gtids: GtidState,
}

impl Reached {
    /// Take in one applied transaction's GTID (`0-1-17` or `uuid:17`; unparsable ones are
    /// ignored: the file:pos still counts).
    pub fn add_gtid(&mut self, gtid: &str) {
        let parsed = parse_mariadb_gtid(gtid).or_else(|| parse_mysql_gtids(gtid));
        if let Some((source, seq)) = parsed {
            let e = self.gtids.entry(source).or_insert(0);
            *e = (*e).max(seq);
        }
    }
}

impl fmt::Display for Reached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file_pos {
            Some(p) => write!(f, "{p}")?,
            None => f.write_str("nothing yet")?,
        }
        if !self.gtids.is_empty() {
            f.write_str(" (gtid ")?;
            write_gtids(f, &self.gtids)?;
            f.write_str(")")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "3e11fa47-71ca-11e1-9e33-c80aa9429562";

    fn reached(fp: Option<(&str, u64)>, gtids: &[&str]) -> Reached {
        let mut r = Reached {
            file_pos: fp.map(|(file, pos)| FilePos {
                file: file.into(),
                pos,
            }),
            gtids: GtidState::new(),
        };
        for g in gtids {
            r.add_gtid(g);
        }
        r
    }

    #[test]
    fn mariadb_gtids_compare_per_domain_by_sequence() {
        let w = WaitFor::parse("0-1-17").unwrap();
        assert!(!w.reached_by(&reached(None, &[])));
        assert!(!w.reached_by(&reached(None, &["0-1-16"])));
        assert!(w.reached_by(&reached(None, &["0-1-17"])));
        assert!(
            w.reached_by(&reached(None, &["0-2-18"])),
            "server id may change"
        );
        assert!(!w.reached_by(&reached(None, &["1-1-99"])), "another domain");
        let list = WaitFor::parse("0-1-17, 1-2-5").unwrap();
        assert!(!list.reached_by(&reached(None, &["0-1-20"])));
        assert!(list.reached_by(&reached(None, &["0-1-20", "1-2-5"])));
        assert_eq!(list.to_string(), "0-*-17,1-*-5");
    }

    #[test]
    fn mysql_gtid_sets_compare_by_the_highest_number_per_uuid() {
        let w = WaitFor::parse(&format!("{UUID}:1-100:200-250")).unwrap();
        assert_eq!(w, WaitFor::Gtids(GtidState::from([(UUID.to_owned(), 250)])));
        assert!(!w.reached_by(&reached(None, &[&format!("{UUID}:249")])));
        assert!(w.reached_by(&reached(None, &[&format!("{UUID}:250")])));
        let upper = WaitFor::parse(&format!("{}:7", UUID.to_ascii_uppercase())).unwrap();
        assert!(upper.reached_by(&reached(None, &[&format!("{UUID}:7")])));
        let two = WaitFor::parse(&format!(
            "{UUID}:5,aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee:1-3"
        ))
        .unwrap();
        assert!(!two.reached_by(&reached(None, &[&format!("{UUID}:9")])));
        assert!(two.reached_by(&reached(
            None,
            &[
                &format!("{UUID}:9"),
                "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee:3"
            ]
        )));
    }

    #[test]
    fn file_positions_compare_by_file_sequence_then_offset() {
        let w = WaitFor::parse("mariadb-bin.000003:1234").unwrap();
        assert!(!w.reached_by(&reached(None, &["0-1-99"])));
        assert!(!w.reached_by(&reached(Some(("mariadb-bin.000003", 1233)), &[])));
        assert!(w.reached_by(&reached(Some(("mariadb-bin.000003", 1234)), &[])));
        assert!(w.reached_by(&reached(Some(("mariadb-bin.000004", 4)), &[])));
        assert!(!w.reached_by(&reached(Some(("mariadb-bin.000002", 99_999)), &[])));
        let big = WaitFor::parse("b.999999:10").unwrap();
        assert!(
            big.reached_by(&reached(Some(("b.1000000", 4)), &[])),
            "numeric, not text"
        );
    }

    #[test]
    fn malformed_positions_are_refused_with_the_forms_named() {
        for bad in [
            "",
            "0-1",
            "0-1-x",
            "a-b-c",
            "0-1-17,",
            "nocolon",
            "file:",
            ":12",
            "file:-1",
            "3e11fa47-71ca-11e1-9e33:1-5",
            &format!("{UUID}:0"),
            &format!("{UUID}:5-3"),
            UUID,
        ] {
            let e = WaitFor::parse(bad).expect_err(bad);
            assert!(e.0.contains("expected a MariaDB GTID"), "{e}");
        }
    }
}
