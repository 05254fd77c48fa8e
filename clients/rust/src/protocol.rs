//! The fill protocol's stored forms (pure): what a purge leaves, what a read takes, what a fill
//! stores. Every value in a cache that uses the protocol is one of three, all starting with the
//! version tag `rtv1 `:
//!
//! - **tombstone** `rtv1 T <position> <nonce>`: left by the consumer's purge instead of a
//!   delete; `position` is the source position of the purging transaction.
//! - **lease** `rtv1 L <basis> <nonce>`: left by a read that found nothing; `basis` is the
//!   cache's applied position when the lease was taken (or `-`).
//! - **data** `rtv1 D <basis>\n<payload>`: a fill; `basis` is the position of the marker the
//!   fill replaced, so a checker can tell which purges the data is known to be newer than.
//!
//! A fill stores data only if the key still holds the very marker its read saw. Markers carry
//! a nonce, so no later purge or read can recreate one: identity, not clocks, decides.

/// The version tag every protocol value starts with.
pub const TAG: &str = "rtv1 ";

/// Appended to a cache's key prefix: the key where the consumer keeps the newest position it
/// has applied to that cache (a lease copies it as its basis).
pub const APPLIED_KEY: &str = "rtinval:applied";

/// The Redis read script (`KEYS`: key, applied key; `ARGV`: nonce, lease TTL ms).
pub const READ_SCRIPT: &str = include_str!("../../lua/read.lua");

/// The Redis fill script (`KEYS`: key; `ARGV`: marker, value, TTL ms or 0).
pub const FILL_SCRIPT: &str = include_str!("../../lua/fill.lua");

/// The consumer's Redis purge script (`KEYS`: keys; `ARGV`: tombstone, TTL ms, GTID domain,
/// GTID sequence number or empty).
pub const PURGE_SCRIPT: &str = include_str!("../../lua/purge.lua");

/// A MariaDB GTID's domain and sequence number (`0-1-17` → `("0", 17)`), for the purge
/// script's "never replace a newer position" check.
pub fn gtid_parts(position: &str) -> Option<(&str, u64)> {
    let mut it = position.split('-');
    let (d, s, n) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || d.parse::<u32>().is_err() || s.parse::<u32>().is_err() {
        return None;
    }
    Some((d, n.parse().ok()?))
}

/// What a protocol cache holds for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored<'a> {
    Data {
        basis: &'a str,
        payload: &'a [u8],
    },
    Tombstone {
        position: &'a str,
    },
    Lease {
        basis: &'a str,
    },
    /// A value not written by the protocol (another writer shares the cache).
    Foreign(&'a [u8]),
}

impl<'a> Stored<'a> {
    /// Read a stored value.
    pub fn parse(value: &'a [u8]) -> Stored<'a> {
        let Some(rest) = value.strip_prefix(TAG.as_bytes()) else {
            return Stored::Foreign(value);
        };
        let word = |b: &'a [u8]| std::str::from_utf8(b).ok();
        match rest {
            [b'D', b' ', tail @ ..] => {
                let nl = tail.iter().position(|b| *b == b'\n');
                match nl.and_then(|i| Some((word(&tail[..i])?, &tail[i + 1..]))) {
                    Some((basis, payload)) => Stored::Data { basis, payload },
                    None => Stored::Foreign(value),
                }
            }
            [kind @ (b'T' | b'L'), b' ', tail @ ..] => {
                let mut fields = tail.split(|b| *b == b' ');
                let (Some(first), Some(_nonce), None) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    return Stored::Foreign(value);
                };
                match (kind, word(first)) {
                    (b'T', Some(position)) => Stored::Tombstone { position },
                    (_, Some(basis)) => Stored::Lease { basis },
                    _ => Stored::Foreign(value),
                }
            }
            _ => Stored::Foreign(value),
        }
    }

    /// The position a fill over this marker records as its basis (`-`: unknown).
    pub fn basis(&self) -> &'a str {
        match self {
            Stored::Data { basis, .. } | Stored::Lease { basis } => basis,
            Stored::Tombstone { position } => position,
            Stored::Foreign(_) => "-",
        }
    }
}

/// A position as one field: no spaces or line breaks, `-` when empty.
pub fn field(position: &str) -> String {
    let clean: String = position
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect();
    if clean.is_empty() { "-".into() } else { clean }
}

/// The marker a purge leaves.
pub fn tombstone(position: &str, nonce: &str) -> String {
    format!("{TAG}T {} {nonce}", field(position))
}

/// The marker a read that found nothing leaves.
pub fn lease(basis: &str, nonce: &str) -> String {
    format!("{TAG}L {} {nonce}", field(basis))
}

/// What a fill stores.
pub fn data(basis: &str, payload: &[u8]) -> Vec<u8> {
    let basis = field(basis);
    let mut v = Vec::with_capacity(TAG.len() + 3 + basis.len() + payload.len());
    v.extend_from_slice(TAG.as_bytes());
    v.extend_from_slice(b"D ");
    v.extend_from_slice(basis.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(payload);
    v
}

/// A nonce unique to this process and call: process id, start time and a counter (no clock is
/// compared; the start time only keeps two runs of one pid apart).
pub fn nonce() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static START: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}.{:x}.{n:x}", std::process::id(), start & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_round_trip() {
        let t = tombstone("0-1-17", "n1");
        assert_eq!(t, "rtv1 T 0-1-17 n1");
        assert_eq!(
            Stored::parse(t.as_bytes()),
            Stored::Tombstone { position: "0-1-17" }
        );
        let l = lease("", "n2");
        assert_eq!(Stored::parse(l.as_bytes()), Stored::Lease { basis: "-" });
        let d = data("0-1-17,1-2-5", b"payload\nwith lines");
        assert_eq!(
            Stored::parse(&d),
            Stored::Data {
                basis: "0-1-17,1-2-5",
                payload: b"payload\nwith lines"
            }
        );
        assert_eq!(Stored::parse(&data("x", b"")).basis(), "x");
    }

    #[test]
    fn anything_else_is_foreign() {
        for v in [
            &b"plain"[..],
            b"rtv1 ",
            b"rtv1 T only-one",
            b"rtv1 X a b",
            b"rtv1 D no-newline",
            b"",
        ] {
            assert_eq!(
                Stored::parse(v),
                Stored::Foreign(v),
                "{:?}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn positions_become_one_field() {
        assert_eq!(field("mariadb-bin.000001:42"), "mariadb-bin.000001:42");
        assert_eq!(field("a b\nc"), "a_b_c");
        assert_eq!(field(""), "-");
    }

    #[test]
    fn nonces_differ() {
        assert_ne!(nonce(), nonce());
    }
}
