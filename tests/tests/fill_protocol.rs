//! The fill protocol, step by step, on the real Redis and memcached: the consumer's own purge
//! code (`rtinval_consumer::apply::Cache` with `fill_protocol = true`) against the Rust client
//! (`rtinval-client`), and the PHP client's checks (`clients/php/tests/protocol_test.php`).
//! The concurrent proof is `fill_race.rs`; this file pins down each rule of the protocol.
//!
//! Needs `scripts/stack up` (and PHP for the last test; `scripts/test` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::process::Command;
use std::time::Duration;

use rtinval_client::protocol::{APPLIED_KEY, FILL_SCRIPT, READ_SCRIPT, Stored};
use rtinval_client::{ClientError, Lookup, NodeCache};
use rtinval_consumer::apply::{Cache, Purged};
use rtinval_consumer::config::CacheConfig;
use rtinval_consumer::metrics::Metrics;
use rtinval_tests::{Stack, unique, workspace_root};

const TTL: Duration = Duration::from_secs(300);

fn memcached_addr() -> String {
    Stack::get().memcached.clone()
}

/// The consumer's cache (fill protocol on) and a client of it, under a prefix of their own.
async fn pair(kind: &str) -> (Cache, NodeCache, String) {
    let prefix = format!("{}:", unique(&format!("fp_{kind}")));
    let url = match kind {
        "redis" => Stack::get().redis_url.clone(),
        _ => memcached_addr(),
    };
    let config: CacheConfig = toml::from_str(&format!(
        "kind = \"{kind}\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\nfill_protocol = true\n"
    ))
    .unwrap();
    let cache = Cache::connect("c", &config, &Metrics::new()).await.unwrap();
    let client = match kind {
        "redis" => NodeCache::redis(&url, &prefix).await.unwrap(),
        _ => NodeCache::memcached(&url, &prefix),
    };
    (cache, client, prefix)
}

fn miss(l: Lookup) -> rtinval_client::FillToken {
    match l {
        Lookup::Miss(t) => t,
        Lookup::Hit(v) => panic!(
            "expected a miss, got a hit: {:?}",
            String::from_utf8_lossy(&v)
        ),
    }
}

fn hit(l: Lookup) -> Vec<u8> {
    match l {
        Lookup::Hit(v) => v,
        Lookup::Miss(t) => panic!("expected a hit, got a miss: {t:?}"),
    }
}

async fn raw(kind: &str, key: &str) -> Option<Vec<u8>> {
    rtinval_tests::cache_value(kind, key).await
}

async fn rules_hold(kind: &str) {
    let (cache, client, prefix) = pair(kind).await;
    let keys = |k: &str| vec![k.to_owned()];

    // A read that misses, a purge, then the fill: refused; the key keeps the tombstone.
    let before = miss(client.get("object:1").await.unwrap());
    assert_eq!(
        cache.purge(&keys("object:1"), "0-1-5").await.unwrap(),
        Purged::Keys
    );
    assert!(!client.fill(before, b"old", TTL).await.unwrap());
    let raw_value = raw(kind, &format!("{prefix}object:1")).await.unwrap();
    assert_eq!(
        Stored::parse(&raw_value),
        Stored::Tombstone { position: "0-1-5" }
    );

    // A read after the purge fills; the data records the purge's position as its basis.
    let after = miss(client.get("object:1").await.unwrap());
    assert!(client.fill(after, b"new", TTL).await.unwrap());
    assert_eq!(hit(client.get("object:1").await.unwrap()), b"new");
    let raw_value = raw(kind, &format!("{prefix}object:1")).await.unwrap();
    assert_eq!(
        Stored::parse(&raw_value),
        Stored::Data {
            basis: "0-1-5",
            payload: b"new"
        }
    );

    // A purge of filled data leaves a tombstone: the next read misses.
    cache.purge(&keys("object:1"), "0-1-6").await.unwrap();
    miss(client.get("object:1").await.unwrap());

    // A key never purged: its lease copies the cache's applied position, which only grows
    // (a redelivered older purge does not lower it).
    cache.purge(&keys("object:99"), "0-1-4").await.unwrap();
    let applied = raw(kind, &format!("{prefix}{APPLIED_KEY}")).await.unwrap();
    assert_eq!(applied, b"0-1-6");
    let fresh = miss(client.get("object:2").await.unwrap());
    assert!(client.fill(fresh, b"two", TTL).await.unwrap());
    let raw_value = raw(kind, &format!("{prefix}object:2")).await.unwrap();
    assert_eq!(
        Stored::parse(&raw_value),
        Stored::Data {
            basis: "0-1-6",
            payload: b"two"
        }
    );

    // Two readers miss together: the first fill wins, the second is refused.
    let a = miss(client.get("object:3").await.unwrap());
    let b = miss(client.get("object:3").await.unwrap());
    assert!(client.fill(a, b"a", TTL).await.unwrap());
    assert!(!client.fill(b, b"b", TTL).await.unwrap());
    assert_eq!(hit(client.get("object:3").await.unwrap()), b"a");

    // The same purge applied twice (redelivery) still refuses a read from before the first.
    let early = miss(client.get("object:4").await.unwrap());
    cache.purge(&keys("object:4"), "0-1-7").await.unwrap();
    cache.purge(&keys("object:4"), "0-1-7").await.unwrap();
    assert!(!client.fill(early, b"old", TTL).await.unwrap());

    // A whole-cache flush removes markers too: a fill from before it is refused.
    let pre_flush = miss(client.get("object:5").await.unwrap());
    cache.flush().await.unwrap();
    assert!(!client.fill(pre_flush, b"old", TTL).await.unwrap());
    let post_flush = miss(client.get("object:5").await.unwrap());
    assert!(client.fill(post_flush, b"new", TTL).await.unwrap());

    // Keys memcached cannot hold are refused with a clear error, not sent.
    if kind == "memcached" {
        let err = client.get("has space").await.unwrap_err();
        assert!(matches!(err, ClientError::BadKey(_)), "{err}");
    }
}

#[tokio::test]
async fn redis_a_fill_is_stored_only_if_no_purge_came_since_its_read() {
    rules_hold("redis").await;
}

#[tokio::test]
async fn memcached_a_fill_is_stored_only_if_no_purge_came_since_its_read() {
    rules_hold("memcached").await;
}

#[tokio::test]
async fn redis_a_late_purge_never_replaces_a_newer_positions_marker() {
    let (cache, client, prefix) = pair("redis").await;
    let keys = |k: &str| vec![k.to_owned()];
    let stored = async |k: &str| raw("redis", &format!("{prefix}{k}")).await.unwrap();
    // A retried or redelivered older purge after a newer one: the newer tombstone stays.
    cache.purge(&keys("object:1"), "0-1-9").await.unwrap();
    cache.purge(&keys("object:1"), "0-1-7").await.unwrap();
    assert_eq!(
        Stored::parse(&stored("object:1").await),
        Stored::Tombstone { position: "0-1-9" }
    );
    // Data read after the newer purge stays too; a newer purge replaces it.
    let token = miss(client.get("object:1").await.unwrap());
    assert!(client.fill(token, b"fresh", TTL).await.unwrap());
    cache.purge(&keys("object:1"), "0-1-8").await.unwrap();
    assert_eq!(hit(client.get("object:1").await.unwrap()), b"fresh");
    cache.purge(&keys("object:1"), "0-1-10").await.unwrap();
    miss(client.get("object:1").await.unwrap());
    // Another GTID domain, or a file position, is not comparable: always purged.
    cache.purge(&keys("object:1"), "1-1-3").await.unwrap();
    assert_eq!(
        Stored::parse(&stored("object:1").await),
        Stored::Tombstone { position: "1-1-3" }
    );
    cache
        .purge(&keys("object:1"), "bin.000001:4")
        .await
        .unwrap();
    assert_eq!(
        Stored::parse(&stored("object:1").await),
        Stored::Tombstone {
            position: "bin.000001:4"
        }
    );
}

#[tokio::test]
async fn redis_a_fill_after_its_lease_expired_is_refused() {
    let (_cache, client, _) = pair("redis").await;
    let client = client.with_lease_ttl(Duration::from_millis(50));
    let token = miss(client.get("object:1").await.unwrap());
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!client.fill(token, b"late", TTL).await.unwrap());
}

#[tokio::test]
async fn redis_the_consumer_loads_the_scripts_and_clients_survive_a_script_flush() {
    let (cache, client, _) = pair("redis").await;
    let mut r = rtinval_tests::redis().await;
    let sha = |s: &str| redis::Script::new(s).get_hash().to_owned();
    // The consumer loaded them at connect (and does so with every identity check).
    let exists: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(sha(READ_SCRIPT))
        .arg(sha(FILL_SCRIPT))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(exists, vec![true, true]);
    // A server without them: the client sends the script itself (EVALSHA, then EVAL).
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    let token = miss(client.get("object:1").await.unwrap());
    assert!(client.fill(token, b"v", TTL).await.unwrap());
    // The consumer's purge too: it loads its script again and purges.
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut r)
        .await
        .unwrap();
    cache
        .purge(&["object:1".to_owned()], "0-1-3")
        .await
        .unwrap();
    miss(client.get("object:1").await.unwrap());
    cache.check_identity().await.unwrap();
    let exists: Vec<bool> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(sha(READ_SCRIPT))
        .query_async(&mut r)
        .await
        .unwrap();
    assert_eq!(exists, vec![true]);
}

#[tokio::test]
async fn the_php_client_keeps_the_same_rules() {
    let (cache, _client, prefix) = pair("redis").await;
    // The PHP checks purge with the consumer's tombstone form; make sure the form they use is
    // the one the consumer writes.
    cache.purge(&["probe".to_owned()], "0-1-1").await.unwrap();
    let tomb = raw("redis", &format!("{prefix}probe")).await.unwrap();
    let tomb = String::from_utf8(tomb).unwrap();
    let redis = Stack::get()
        .redis_url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let out = Command::new("php")
        .arg(workspace_root().join("clients/php/tests/protocol_test.php"))
        .args([&redis, &memcached_addr(), &prefix, &tomb])
        .output()
        .expect("php runs (scripts/test installs php-cli, php-redis, php-memcached, php-mysql)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "PHP client checks failed:\n{text}");
    assert!(text.contains("checks passed"), "{text}");
}
