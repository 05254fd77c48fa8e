//! Topic names, built in one place: `<prefix>.pool-reset` and `<prefix>.cache-keys` carry the
//! events, `<prefix>.checkpoints` the producer's positions, `<prefix>.nodes` the consumers'
//! registrations (which groups a cluster wait waits for).

/// Suffix of the topic of `pool_reset` events (and their heartbeats).
pub const POOL_RESET: &str = "pool-reset";
/// Suffix of the topic of `cache_keys`, `cache_flush` and `resync` events (and heartbeats).
pub const CACHE_KEYS: &str = "cache-keys";
/// Suffix of the compacted topic of producer checkpoints.
pub const CHECKPOINTS: &str = "checkpoints";
/// Suffix of the compacted topic where each consumer node registers its group.
pub const NODES: &str = "nodes";
/// The event topics' suffixes, in the order consumers subscribe.
pub const EVENTS: [&str; 2] = [POOL_RESET, CACHE_KEYS];

/// `<prefix>.<suffix>`.
pub fn name(prefix: &str, suffix: &str) -> String {
    format!("{prefix}.{suffix}")
}

/// Both event topics of `prefix`.
pub fn events(prefix: &str) -> Vec<String> {
    EVENTS.iter().map(|s| name(prefix, s)).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_from_the_prefix() {
        assert_eq!(
            super::events("rtinval"),
            ["rtinval.pool-reset", "rtinval.cache-keys"]
        );
        assert_eq!(super::name("p", super::CHECKPOINTS), "p.checkpoints");
    }
}
