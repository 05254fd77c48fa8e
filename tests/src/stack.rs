//! The local stack's connection settings (`scripts/stack env`), the workspace and its
//! binaries, and unique names and ids that keep parallel tests apart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// Connection settings of the local stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub mysql_url: String,
    pub mysql_admin_url: String,
    pub brokers: String,
    pub redis_url: String,
    pub memcached: String,
    /// The tansu binary the stack runs (for tests that need a broker of their own).
    pub tansu_bin: PathBuf,
}

/// The workspace root (where `scripts/` lives).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

impl Stack {
    /// Settings from `scripts/stack env`, overridden by the environment.
    pub fn get() -> &'static Stack {
        static STACK: OnceLock<Stack> = OnceLock::new();
        STACK.get_or_init(|| {
            let out = Command::new(workspace_root().join("scripts/stack"))
                .arg("env")
                .output()
                .expect("scripts/stack env runs");
            let mut vars: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("export "))
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
                .collect();
            for (k, v) in vars.iter_mut() {
                if let Ok(e) = std::env::var(k) {
                    *v = e;
                }
            }
            let get = |k: &str| {
                vars.get(k)
                    .cloned()
                    .unwrap_or_else(|| panic!("scripts/stack env does not set {k}"))
            };
            Stack {
                mysql_url: get("RTINVAL_MYSQL_URL"),
                mysql_admin_url: get("RTINVAL_MYSQL_ADMIN_URL"),
                brokers: get("RTINVAL_KAFKA_BROKERS"),
                redis_url: get("RTINVAL_REDIS_URL"),
                memcached: get("RTINVAL_MEMCACHED"),
                tansu_bin: PathBuf::from(get("RTINVAL_TANSU_BIN")),
            }
        })
    }
}

/// A name unique to this test run: `<base>_<pid>_<n>_<millis>` (lowercase, `[a-z0-9_]`).
pub fn unique(base: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() % 100_000_000);
    format!("{base}_{}_{n}_{ms}", std::process::id()).to_ascii_lowercase()
}

/// Path of a workspace binary built next to this test binary (`cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins, or scripts/test)",
        path.display()
    );
    path
}

/// Path of a workspace binary's release build, for load tests that measure the product as it
/// ships (`scripts/test` builds them: `cargo build --release --bins -p …`).
pub fn release_bin(name: &str) -> PathBuf {
    let path = workspace_root().join("target/release").join(name);
    assert!(
        path.exists(),
        "{} is missing: this load test runs release builds (scripts/test builds them; or cargo build --release -p rtinval-producer -p rtinval-consumer -p rtinval-tests --bin rtinval-producer --bin rtinval-consumer --bin fill-worker)",
        path.display()
    );
    path
}

/// A replica server id unique among concurrently running tests (the source drops a replica
/// connection when another registers with the same id).
pub fn server_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    1_000_000 + (std::process::id() % 100_000) * 10 + N.fetch_add(1, Ordering::Relaxed)
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}
