//! Redis and memcached as the tests see them: a key's value, a connection, a Redis server of
//! a test's own.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::processes::Proc;
use crate::stack::Stack;

/// What the stack's cache of `kind` (`redis` or `memcached`) holds at `key`, as stored.
pub async fn cache_value(kind: &str, key: &str) -> Option<Vec<u8>> {
    match kind {
        "redis" => {
            let mut r = redis().await;
            redis::cmd("GET")
                .arg(key)
                .query_async(&mut r)
                .await
                .expect("redis GET")
        }
        _ => rtinval_client::memcached::Memcached::new(&Stack::get().memcached)
            .gets(&[key.as_bytes()])
            .await
            .expect("memcached gets")
            .pop()
            .flatten()
            .map(|i| i.value),
    }
}

/// A Redis connection to the stack's Redis.
pub async fn redis() -> redis::aio::MultiplexedConnection {
    let url = &Stack::get().redis_url;
    redis::Client::open(url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot connect to Redis at {url}: {e}; is the stack up? (scripts/stack up)")
        })
}

/// A private `redis-server` on `port` (loopback) with `args`, started and listening; its files
/// (a replica's full-sync RDB too) go to `dir` unless `args` names another `--dir`.
pub fn redis_server(dir: &Path, name: &str, port: u16, args: &[&str]) -> Proc {
    let mut p = Proc::spawn(
        name,
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--dir")
            .arg(dir)
            .args(args),
        dir.join(format!("{name}.log")),
    );
    p.wait_port(port, Duration::from_secs(10));
    p
}
