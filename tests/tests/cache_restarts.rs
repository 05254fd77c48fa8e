//! Proves that a node notices when its cache server's content goes back in time behind its
//! back — a Redis restarted from its RDB snapshot or from an AOF that lacks the last purges, a
//! replica promoted in place of the primary the node purged, a memcached restarted with older
//! entries — and flushes that cache before it applies more and before `/readyz` says ready
//! again, counting `rtinval_consumer_resyncs_total{reason="cache_restarted"}`. An outage after
//! which the same server comes back flushes nothing: the failed purge is retried.
//!
//! The tests run private Redis and memcached servers; a TCP proxy stands for the address that
//! moves in a failover (virtual IP, DNS). Needs `scripts/stack up` (broker) and the binaries.
//! Run alone: `cargo test -p rtinval-tests --test cache_restarts`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a failed step is a failed test

use std::path::Path;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use rtinval_schemas::EventBody;
use rtinval_tests::proxy::TcpProxy;
use rtinval_tests::{
    Bus, ConsumerProc, Proc, consumer_kafka_section, free_port, redis_server, unique, wait_for,
    wait_ready,
};

/// The application's key prefix in every cache of these tests.
const P: &str = "c:";
const RESTARTS: &str = "rtinval_consumer_resyncs_total{reason=\"cache_restarted\"}";
const FAILURES: &str = "rtinval_consumer_cache_failures_total{cache=\"rt\"}";
const LONG: Duration = Duration::from_secs(30);

fn consumer_config(prefix: &str, kind: &str, url: &str) -> String {
    format!(
        "{}[node]\nmax_staleness_secs = 60\n[caches.rt]\nkind = \"{kind}\"\nurl = \"{url}\"\nprefix = \"{P}\"\nidentity_check_ms = 200\n",
        consumer_kafka_section(prefix)
    )
}

async fn start_consumer(
    dir: &Path,
    bus: &Bus,
    prefix: &str,
    kind: &str,
    port: u16,
) -> ConsumerProc {
    let scheme = if kind == "redis" {
        "redis"
    } else {
        "memcached"
    };
    let config = consumer_config(prefix, kind, &format!("{scheme}://127.0.0.1:{port}"));
    let mut c = ConsumerProc::start(dir, "consumer", &config);
    c.wait_consuming();
    // The first start resyncs (no committed offset), flushing the cache: keys come after.
    wait_ready(bus, &c, LONG).await;
    c
}

async fn redis_at(port: u16) -> MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

async fn mc_at(port: u16) -> async_memcached::Client {
    async_memcached::Client::new(format!("tcp://127.0.0.1:{port}"))
        .await
        .expect("memcached")
}

/// A cache server of either kind, by port: the test's view of it.
#[derive(Clone, Copy)]
enum Server {
    Redis(u16),
    Memcached(u16),
}

impl Server {
    fn port(self) -> u16 {
        match self {
            Server::Redis(p) | Server::Memcached(p) => p,
        }
    }

    async fn set(self, key: &str) {
        use async_memcached::AsciiProtocol;
        let key = format!("{P}{key}");
        match self {
            Server::Redis(p) => redis_at(p).await.set::<_, _, ()>(key, "old").await.unwrap(),
            Server::Memcached(p) => mc_at(p).await.set(key, "old", None, None).await.unwrap(),
        }
    }

    async fn has(self, key: &str) -> bool {
        use async_memcached::AsciiProtocol;
        let key = format!("{P}{key}");
        match self {
            Server::Redis(p) => redis_at(p).await.exists(key).await.unwrap(),
            Server::Memcached(p) => mc_at(p).await.get(key).await.unwrap().is_some(),
        }
    }
}

async fn publish_purge(bus: &Bus, key: &str) {
    bus.publish(EventBody::CacheKeys {
        cache: "rt".into(),
        keys: vec![key.into()],
    })
    .await;
}

/// Purge `key` through the consumer and wait until it is gone from `server`.
async fn purge(bus: &Bus, server: Server, key: &str) {
    publish_purge(bus, key).await;
    wait_for(&format!("{key} purged"), LONG, || async move {
        (!server.has(key).await).then_some(())
    })
    .await;
}

/// The node's cache address refuses for a while, then leads to the same `server` again: the
/// purge published meanwhile fails, is retried and applied; nothing is flushed.
async fn an_outage_flushes_nothing(bus: &Bus, c: &ConsumerProc, proxy: &TcpProxy, server: Server) {
    proxy.set_target(None);
    publish_purge(bus, "object:2").await;
    c.wait_metric(FAILURES, 1.0, LONG);
    proxy.set_target(Some(server.port()));
    wait_for("object:2 purged after the outage", LONG, || async {
        (!server.has("object:2").await).then_some(())
    })
    .await;
    wait_ready(bus, c, LONG).await;
    assert!(server.has("other").await, "an outage must not flush");
    assert_eq!(c.metric(RESTARTS), 0.0);
}

/// The node flushed the restarted cache, counted it once, and is ready: no purged key, and no
/// other key of the cache, is left on `server`.
async fn assert_flushed_and_ready(bus: &Bus, c: &ConsumerProc, server: Server) {
    c.wait_metric(RESTARTS, 1.0, LONG);
    wait_ready(bus, c, LONG).await;
    assert!(!server.has("object:1").await, "a purged key survived");
    assert!(!server.has("other").await, "the cache was not flushed");
    assert_eq!(c.metric(RESTARTS), 1.0);
    assert!(
        c.proc
            .log_text()
            .contains("Cache server restarted or replaced")
    );
}

/// A node whose cache address (a proxy) leads to `server`, with `object:1`, `object:2` and
/// `other` cached, after one outage of that same server ([`an_outage_flushes_nothing`]).
async fn a_node_after_an_outage(
    dir: &Path,
    name: &str,
    server: Server,
) -> (Bus, ConsumerProc, TcpProxy) {
    let prefix = unique(name);
    let bus = Bus::new(&prefix).await;
    let proxy = TcpProxy::start(server.port());
    let kind = match server {
        Server::Redis(_) => "redis",
        Server::Memcached(_) => "memcached",
    };
    let c = start_consumer(dir, &bus, &prefix, kind, proxy.port).await;
    for k in ["object:1", "object:2", "other"] {
        server.set(k).await;
    }
    an_outage_flushes_nothing(&bus, &c, &proxy, server).await;
    (bus, c, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_from_its_snapshot_is_flushed_and_an_outage_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::Redis(port);
    let args = [
        "--dbfilename",
        "dump.rdb",
        "--save",
        "",
        "--appendonly",
        "no",
    ];
    let mut redis = redis_server(dir.path(), "redis", port, &args);
    let (bus, c, _proxy) = a_node_after_an_outage(dir.path(), "rdb", server).await;

    // The snapshot holds object:1; then the node purges it.
    redis::cmd("SAVE")
        .query_async::<()>(&mut redis_at(port).await)
        .await
        .unwrap();
    purge(&bus, server, "object:1").await;
    let rdb = std::fs::read(dir.path().join("dump.rdb")).unwrap();
    assert!(
        rdb.windows(10).any(|w| w == b"c:object:1"),
        "the snapshot holds the key that was purged"
    );
    // kill -9 and a restart from the snapshot: the purged key is back on the server.
    redis.kill9();
    let _redis = redis_server(dir.path(), "redis-again", port, &args);
    assert_flushed_and_ready(&bus, &c, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_killed_and_restarted_from_an_aof_lacking_the_purge_is_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::Redis(port);
    let args = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ];
    let mut redis = redis_server(dir.path(), "redis", port, &args);
    let (bus, c, _proxy) = a_node_after_an_outage(dir.path(), "aof", server).await;
    // The AOF as it stands before the purge (appendfsync always: both writes are in it). A
    // restart from it is what `appendfsync everysec` gives when the purge's second is lost.
    let aof = dir.path().join("appendonlydir");
    let before = dir.path().join("aof-before-purge");
    copy_dir(&aof, &before);
    purge(&bus, server, "object:1").await;
    redis.kill9();
    std::fs::remove_dir_all(&aof).unwrap();
    copy_dir(&before, &aof);
    let _redis = redis_server(dir.path(), "redis-again", port, &args);
    assert_flushed_and_ready(&bus, &c, server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_in_place_of_the_primary_is_flushed_and_an_outage_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (free_port(), free_port());
    let (primary_server, replica_server) = (Server::Redis(a), Server::Redis(b));
    let none = ["--save", "", "--appendonly", "no"];
    let mut primary = redis_server(dir.path(), "primary", a, &none);
    let replica_of = a.to_string();
    let _replica = redis_server(
        dir.path(),
        "replica",
        b,
        &[
            "--save",
            "",
            "--appendonly",
            "no",
            "--replicaof",
            "127.0.0.1",
            &replica_of,
        ],
    );
    let (bus, c, proxy) = a_node_after_an_outage(dir.path(), "failover", primary_server).await;
    wait_for("the replica has the keys", LONG, || async {
        (replica_server.has("object:1").await
            && replica_server.has("other").await
            && !replica_server.has("object:2").await)
            .then_some(())
    })
    .await;
    // The replica falls behind (here: it stops replicating) and is promoted; the purge reaches
    // only the old primary.
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async::<()>(&mut redis_at(b).await)
        .await
        .unwrap();
    purge(&bus, primary_server, "object:1").await;
    assert!(
        replica_server.has("object:1").await,
        "the replica lacks the purge"
    );
    // Failover: the primary dies and its address now leads to the promoted replica.
    primary.kill9();
    proxy.set_target(Some(b));
    assert_flushed_and_ready(&bus, &c, replica_server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memcached_restart_with_older_entries_is_flushed_and_an_outage_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (free_port(), free_port());
    let (first_server, restarted_server) = (Server::Memcached(a), Server::Memcached(b));
    let memcached = |name: &str, port: u16| {
        let mut p = Proc::spawn(
            name,
            std::process::Command::new("memcached")
                .args(["-l", "127.0.0.1", "-U", "0", "-m", "16", "-u", "root"])
                .arg("-p")
                .arg(port.to_string()),
            dir.path().join(format!("{name}.log")),
        );
        p.wait_port(port, Duration::from_secs(10));
        p
    };
    let mut first = memcached("memcached", a);
    // The server the address leads to after the restart, holding entries as old as a warm
    // restart (`-e`) from an earlier memory file would.
    let _second = memcached("memcached-restarted", b);
    for k in ["object:1", "object:2", "other"] {
        restarted_server.set(k).await;
    }
    let (bus, c, proxy) = a_node_after_an_outage(dir.path(), "mcrestart", first_server).await;
    purge(&bus, first_server, "object:1").await;
    // The restart: the process at the node's cache address is another one, with older entries.
    first.kill9();
    proxy.set_target(Some(b));
    assert_flushed_and_ready(&bus, &c, restarted_server).await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
