//! # Layout
//!
//! Harness for rtinval's end-to-end tests against the real local stack (`scripts/stack up`):
//! MariaDB with binlog on, the tansu broker, Redis and memcached, all over loopback.
//!
//! Guarantees for tests built on it:
//! - **Isolation.** Each test gets its own database (`rtt_<test>_<unique>`), topic prefix and
//!   consumer group ([`unique`]), so tests run in parallel and rerun cleanly on a dirty stack.
//! - **Real processes.** The binaries under test run as child processes ([`Proc`]); their logs
//!   are printed when a test fails.
//! - **One source of truth.** Connection settings come from `scripts/stack env` (environment
//!   variables of the same names override).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;

pub mod proxy;
pub mod published;
pub mod registry;

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

/// The shipped RackTables producer config (`deploy/racktables/producer.toml` with its
/// `rules.toml`), pointed at a test database, the stack's broker and a topic prefix; `edit`
/// changes anything else.
pub fn racktables_producer_config(
    db: &str,
    prefix: &str,
    edit: impl FnOnce(&mut toml::Table),
) -> String {
    let s = Stack::get();
    let mut c: toml::Table =
        std::fs::read_to_string(workspace_root().join("deploy/racktables/producer.toml"))
            .expect("deploy/racktables/producer.toml")
            .parse()
            .expect("deploy/racktables/producer.toml is TOML");
    let source = c["source"].as_table_mut().expect("[source]");
    source.insert("url".into(), s.mysql_url.clone().into());
    source.insert("database".into(), db.into());
    source.insert("server_id".into(), i64::from(server_id()).into());
    let kafka = c["kafka"].as_table_mut().expect("[kafka]");
    kafka.insert("brokers".into(), s.brokers.clone().into());
    kafka.insert("topic_prefix".into(), prefix.into());
    kafka.insert("partitions".into(), 1.into());
    kafka.insert("replication_factor".into(), 1.into());
    c["producer"]
        .as_table_mut()
        .expect("[producer]")
        .insert("heartbeat_ms".into(), 200.into());
    c["http"]
        .as_table_mut()
        .expect("[http]")
        .insert("listen".into(), "".into());
    // The copy lives elsewhere: name the rule set by its absolute path.
    let rules = workspace_root().join("deploy/racktables/rules.toml");
    c.insert(
        "rules_files".into(),
        toml::Value::Array(vec![rules.display().to_string().into()]),
    );
    edit(&mut c);
    toml::to_string(&c).expect("TOML")
}

/// A database of its own for one test, created from a schema file.
pub struct TestDb {
    pub name: String,
    pub pool: mysql_async::Pool,
}

impl TestDb {
    /// Create `rtt_<base>_<unique>` and run `schema_sql` (statements separated by `;`).
    pub async fn create(base: &str, schema_sql: &str) -> TestDb {
        let stack = Stack::get();
        let name = format!("rtt_{}", unique(base));
        let admin = mysql_async::Pool::new(stack.mysql_admin_url.as_str());
        let mut conn = admin.get_conn().await.unwrap_or_else(|e| {
            panic!(
                "cannot connect to MariaDB at {}: {e}; is the stack up? (scripts/stack up)",
                stack.mysql_admin_url
            )
        });
        conn.query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .expect("create database");
        conn.query_drop(format!("USE `{name}`")).await.expect("use");
        for stmt in split_sql(schema_sql) {
            conn.query_drop(stmt)
                .await
                .unwrap_or_else(|e| panic!("schema statement failed: {e}\n{stmt}"));
        }
        drop(conn);
        admin.disconnect().await.ok();
        let url = format!("{}/{name}", stack.mysql_admin_url);
        TestDb {
            name,
            pool: mysql_async::Pool::new(url.as_str()),
        }
    }

    /// Create (or re-create) the MariaDB user `user` with `password`, the global `grants`
    /// (e.g. `REPLICATION SLAVE, BINLOG MONITOR`) and SELECT on this database; returns the
    /// `mysql://` URL a producer connects with.
    pub async fn user(&self, user: &str, password: &str, grants: &str) -> String {
        let stack = Stack::get();
        let admin = mysql_async::Pool::new(stack.mysql_admin_url.as_str());
        let mut conn = admin.get_conn().await.expect("admin connection");
        for stmt in [
            format!("DROP USER IF EXISTS '{user}'@'127.0.0.1'"),
            format!("CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY '{password}'"),
            format!("GRANT {grants} ON *.* TO '{user}'@'127.0.0.1'"),
            format!("GRANT SELECT ON `{}`.* TO '{user}'@'127.0.0.1'", self.name),
        ] {
            conn.query_drop(&stmt)
                .await
                .unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
        drop(conn);
        admin.disconnect().await.ok();
        let host_port = stack.mysql_url.rsplit_once('@').map_or("", |(_, h)| h);
        format!("mysql://{user}:{password}@{host_port}")
    }

    /// Run SQL statements (separated by `;`) in one session.
    pub async fn exec(&self, sql: &str) {
        self.exec_gtid(sql).await;
    }

    /// Run SQL statements (separated by `;`) in one session; the GTID of the last transaction
    /// (`@@last_gtid`), or "" if none was written.
    pub async fn exec_gtid(&self, sql: &str) -> String {
        let mut conn = self.pool.get_conn().await.expect("connection");
        for stmt in split_sql(sql) {
            conn.query_drop(stmt)
                .await
                .unwrap_or_else(|e| panic!("statement failed: {e}\n{stmt}"));
        }
        conn.query_first("SELECT @@last_gtid")
            .await
            .expect("SELECT @@last_gtid")
            .unwrap_or_default()
    }
}

/// Split a script into statements on `;` at line ends (enough for the fixtures).
pub fn split_sql(sql: &str) -> Vec<&str> {
    sql.split(";\n")
        .map(str::trim)
        .map(|s| s.trim_end_matches(';'))
        .filter(|s| {
            !s.lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with("--"))
        })
        .collect()
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped; prints the tail of
/// its log if the test is failing.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let err = file.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Exit status if it exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM and wait up to `timeout` for exit; returns the status.
    /// Wait until the log contains `text`; fails at once, with the log, if the process exits.
    pub fn wait_log(&mut self, text: &str, timeout: Duration) {
        wait_sync(
            &format!("{}: {text:?} in the log", self.name),
            timeout,
            || {
                if let Some(status) = self.try_exit() {
                    panic!("{} exited ({status}):\n{}", self.name, self.log_text());
                }
                self.log_text().contains(text).then_some(())
            },
        );
    }

    /// Wait until it accepts connections on `127.0.0.1:port`; fails at once, with the log, if
    /// the process exits.
    pub fn wait_port(&mut self, port: u16, timeout: Duration) {
        wait_sync(
            &format!("{} listening on {port}", self.name),
            timeout,
            || {
                if let Some(status) = self.try_exit() {
                    panic!("{} exited ({status}):\n{}", self.name, self.log_text());
                }
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(|_| ())
            },
        );
    }

    /// `kill -9` and wait until it is gone.
    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.child.id().to_string())
            .status();
        wait_sync(
            &format!("{} killed", self.name),
            Duration::from_secs(5),
            || self.try_exit(),
        );
    }

    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.try_exit() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_exit().is_none() && self.terminate(Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!(
                "----- last lines of {} ({}) -----",
                self.name,
                self.log.display()
            );
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Write `config` to `<dir>/producer.toml` and run `rtinval-producer --check` with it: the exit
/// code and everything it printed (stderr, then stdout).
pub fn producer_check(dir: &Path, config: &str) -> (Option<i32>, String) {
    let path = dir.join("producer.toml");
    std::fs::write(&path, config).expect("write the producer config");
    let out = Command::new(bin("rtinval-producer"))
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("rtinval-producer runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

/// Write `config` to `<dir>/<name>.toml`, start `rtinval-producer` with it (log in
/// `<dir>/<name>.log`) and wait until it streams the binlog.
pub fn start_producer(dir: &Path, name: &str, config: &str) -> Proc {
    start_producer_with(dir, name, config, &bin("rtinval-producer"))
}

/// Like [`start_producer`] with an explicit binary (e.g. a release build).
pub fn start_producer_with(dir: &Path, name: &str, config: &str, binary: &Path) -> Proc {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("write the producer config");
    let mut p = Proc::spawn(
        name,
        Command::new(binary).arg("--config").arg(&path),
        dir.join(format!("{name}.log")),
    );
    p.wait_log("Streaming binlog.", Duration::from_secs(60));
    p
}

/// The stand-in worker pool (`tests/fixtures/stand-in-pool.sh`): counts USR2 reloads.
pub struct StandInPool {
    pub proc: Proc,
    pub pidfile: PathBuf,
    pub reload_log: PathBuf,
}

impl StandInPool {
    pub fn start(dir: &Path, name: &str) -> StandInPool {
        let pidfile = dir.join(format!("{name}.pid"));
        let reload_log = dir.join(format!("{name}.reloads"));
        let script = workspace_root().join("tests/fixtures/stand-in-pool.sh");
        let proc = Proc::spawn(
            name,
            Command::new("bash")
                .arg(script)
                .arg(&reload_log)
                .arg(&pidfile),
            dir.join(format!("{name}.log")),
        );
        wait_sync("stand-in pool pidfile", Duration::from_secs(10), || {
            std::fs::read_to_string(&pidfile)
                .ok()
                .filter(|s| !s.trim().is_empty())
        });
        StandInPool {
            proc,
            pidfile,
            reload_log,
        }
    }

    /// Reloads recorded so far.
    pub fn reloads(&self) -> usize {
        std::fs::read_to_string(&self.reload_log).map_or(0, |s| s.lines().count())
    }
}

/// Poll `f` until it returns `Some` or `timeout` passes (then panic naming `what`).
pub fn wait_sync<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Async variant of [`wait_sync`].
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Minimal HTTP GET on loopback: (status, body), or `None` when nothing answers.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path)
}

/// Minimal HTTP request without a body on loopback: (status, body), or `None` when nothing
/// answers.
pub fn http_request(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    // One write: some servers (PHP's built-in one) reject a request that arrives in pieces.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

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

/// Publishes hand-made events to a topic prefix of its own (the test plays the producer).
pub struct Bus {
    pub prefix: String,
    producer: rdkafka::producer::FutureProducer,
}

impl Bus {
    /// Create `<prefix>.pool-reset` and `<prefix>.cache-keys` (one partition each).
    pub async fn new(prefix: &str) -> Bus {
        Bus::new_on(&Stack::get().brokers, prefix).await
    }

    /// Like [`Bus::new`] on another broker (e.g. a [`PrivateBroker`]).
    pub async fn new_on(brokers: &str, prefix: &str) -> Bus {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let mut c = rdkafka::ClientConfig::new();
        c.set("bootstrap.servers", brokers);
        let admin: AdminClient<rdkafka::client::DefaultClientContext> =
            c.create().expect("admin client");
        let topics = [
            format!("{prefix}.pool-reset"),
            format!("{prefix}.cache-keys"),
        ];
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
            .collect();
        for r in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .expect("create topics")
        {
            match r {
                Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, e)) => panic!("cannot create topic {t}: {e}"),
            }
        }
        let producer = c.set("linger.ms", "2").create().expect("producer");
        Bus {
            prefix: prefix.to_owned(),
            producer,
        }
    }

    /// An event with a plausible source block.
    pub fn event(body: rtinval_schemas::EventBody) -> rtinval_schemas::Event {
        let now = rtinval_consumer::now_ms();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed) as usize;
        rtinval_schemas::Event {
            schema_version: rtinval_schemas::SCHEMA_VERSION,
            id: rtinval_schemas::event_id(1, "test-bin.000001", 4, seq),
            source: rtinval_schemas::Source {
                server_id: 1,
                gtid: None,
                file: "test-bin.000001".into(),
                pos: 4,
                tables: vec![],
                committed_at: now,
            },
            emitted_at: now,
            body,
        }
    }

    /// Topic of an event kind, as the producer routes it.
    pub fn topic_for(&self, body: &rtinval_schemas::EventBody) -> String {
        use rtinval_schemas::EventBody::*;
        match body {
            PoolReset { .. } | Resync { .. } | Heartbeat { .. } => {
                format!("{}.pool-reset", self.prefix)
            }
            CacheKeys { .. } | CacheFlush { .. } => format!("{}.cache-keys", self.prefix),
        }
    }

    /// Publish one event and wait for the acknowledgment.
    pub async fn publish(&self, body: rtinval_schemas::EventBody) {
        let topic = self.topic_for(&body);
        self.raw(&topic, &Self::event(body).to_json()).await;
    }

    /// Publish one event with an explicit Kafka timestamp (Unix ms).
    pub async fn publish_at(&self, body: rtinval_schemas::EventBody, timestamp_ms: i64) {
        let topic = self.topic_for(&body);
        let payload = Self::event(body).to_json();
        let record = rdkafka::producer::FutureRecord::<str, [u8]>::to(&topic)
            .key("test")
            .payload(&payload)
            .timestamp(timestamp_ms);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("publish");
    }

    /// Publish raw bytes (garbage, foreign versions) and wait for the acknowledgment.
    pub async fn raw(&self, topic: &str, payload: &[u8]) {
        let record = rdkafka::producer::FutureRecord::<str, [u8]>::to(topic)
            .key("test")
            .payload(payload);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .expect("publish");
    }

    /// Enqueue without waiting (for bursts); `flush` waits for all.
    pub fn enqueue(&self, body: rtinval_schemas::EventBody) {
        let topic = self.topic_for(&body);
        let payload = Self::event(body).to_json();
        loop {
            let record = rdkafka::producer::FutureRecord::<str, [u8]>::to(&topic)
                .key("test")
                .payload(&payload);
            match self.producer.send_result(record) {
                Ok(_) => return,
                Err((e, _)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "{e}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }

    pub fn flush(&self) {
        use rdkafka::producer::Producer;
        self.producer.flush(Duration::from_secs(60)).expect("flush");
    }
}

/// The `[kafka]` section of a consumer config: the stack's broker, `prefix`'s topics and a
/// consumer group of its own (`<prefix>-node`).
pub fn consumer_kafka_section(prefix: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\ngroup_id = \"{prefix}-node\"\n",
        Stack::get().brokers
    )
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

/// Publish heartbeats until the consumer's `/readyz` answers 200.
pub async fn wait_ready(bus: &Bus, c: &ConsumerProc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        bus.publish(rtinval_schemas::EventBody::Heartbeat {
            source_time: rtinval_consumer::now_ms(),
        })
        .await;
        let r = http_get(&c.http, "/readyz");
        if r.as_ref().is_some_and(|(s, _)| *s == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not ready within {timeout:?}: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A consumer process with its HTTP address.
pub struct ConsumerProc {
    pub proc: Proc,
    pub http: String,
}

impl ConsumerProc {
    /// Write `config` (with `[http] listen` appended) and start `rtinval-consumer run`.
    pub fn start(dir: &Path, name: &str, config: &str) -> ConsumerProc {
        ConsumerProc::start_with(dir, name, config, &bin("rtinval-consumer"))
    }

    /// Like [`ConsumerProc::start`] with an explicit binary (e.g. a release build).
    pub fn start_with(dir: &Path, name: &str, config: &str, binary: &Path) -> ConsumerProc {
        ConsumerProc::start_logging(dir, name, config, binary, "info,rtinval_consumer=debug")
    }

    /// Like [`ConsumerProc::start_with`] with a log filter of its own (load tests log at
    /// `info`: a debug line per event costs CPU the measurement needs).
    pub fn start_logging(
        dir: &Path,
        name: &str,
        config: &str,
        binary: &Path,
        log: &str,
    ) -> ConsumerProc {
        let http = format!("127.0.0.1:{}", free_port());
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, format!("{config}\n[http]\nlisten = \"{http}\"\n"))
            .expect("write config");
        let proc = Proc::spawn(
            name,
            Command::new(binary)
                .arg("--config")
                .arg(&path)
                .arg("run")
                .env("RTINVAL_LOG", log),
            dir.join(format!("{name}.log")),
        );
        ConsumerProc { proc, http }
    }

    /// Wait until `/metrics` answers (the consumer is up; it may still be resyncing).
    pub fn wait_up(&mut self) {
        let http = self.http.clone();
        wait_sync("consumer HTTP endpoint", Duration::from_secs(30), || {
            if let Some(s) = self.proc.try_exit() {
                panic!("consumer exited with {s}:\n{}", self.proc.log_text());
            }
            http_get(&http, "/healthz").map(|_| ())
        });
    }

    /// Wait until the log says it is consuming.
    pub fn wait_consuming(&mut self) {
        self.wait_up();
        wait_sync("consumer consuming", Duration::from_secs(30), || {
            self.proc.log_text().contains("Consuming.").then_some(())
        });
    }

    /// Value of one metric series (exact name with labels, e.g. `x_total{pool="p"}`), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = http_get(&self.http, "/metrics").unwrap_or_default();
        body.lines()
            .filter_map(|l| l.rsplit_once(' '))
            .find(|(name, _)| *name == series)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// Wait until a metric reaches at least `value`.
    pub fn wait_metric(&self, series: &str, value: f64, timeout: Duration) {
        wait_sync(&format!("{series} >= {value}"), timeout, || {
            (self.metric(series) >= value).then_some(())
        });
    }
}

/// A replica server id unique among concurrently running tests (the source drops a replica
/// connection when another registers with the same id).
pub fn server_id() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    1_000_000 + (std::process::id() % 100_000) * 10 + N.fetch_add(1, Ordering::Relaxed)
}

/// Every event on partition 0 of `topic` of the stack's broker, from the beginning to the end.
pub async fn read_events(topic: &str) -> Vec<rtinval_schemas::Event> {
    read_events_from(&Stack::get().brokers, topic).await
}

/// Every event on partition 0 of `topic` of `brokers`, from the beginning to the current end.
pub async fn read_events_from(brokers: &str, topic: &str) -> Vec<rtinval_schemas::Event> {
    read_raw_from(brokers, topic)
        .await
        .iter()
        .filter_map(|p| rtinval_schemas::Event::from_json(p).ok())
        .collect()
}

/// A MariaDB server of one test's own (for restarts and binlog purges that would disturb
/// other tests on the shared stack), configured like the stack's.
pub struct PrivateMariaDb {
    pub proc: Option<Proc>,
    pub port: u16,
    dir: PathBuf,
    server_id: u32,
}

impl PrivateMariaDb {
    pub fn start(dir: &Path) -> PrivateMariaDb {
        PrivateMariaDb::start_with_id(dir, "mariadb", 7)
    }

    /// A server in `dir/name` with its own `server_id`.
    pub fn start_with_id(dir: &Path, name: &str, server_id: u32) -> PrivateMariaDb {
        let data = dir.join(name);
        // A tmpdir of its own: a starting mariadbd deletes every `#sql*` file in its tmpdir,
        // which in a shared /tmp broke concurrent servers' bootstraps.
        let tmp = data.join("tmp");
        std::fs::create_dir_all(&tmp).expect("create the server's tmpdir");
        let out = Command::new("mariadb-install-db")
            .args([
                "--no-defaults",
                "--user=root",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.join("data").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .output()
            .expect("mariadb-install-db runs");
        assert!(
            out.status.success(),
            "mariadb-install-db: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = PrivateMariaDb {
            proc: None,
            port: free_port(),
            dir: data,
            server_id,
        };
        db.run();
        db.sql(
            "CREATE USER 'rtinval'@'127.0.0.1' IDENTIFIED BY 'rtinval';\n\
             GRANT REPLICATION SLAVE, BINLOG MONITOR, SELECT ON *.* TO 'rtinval'@'127.0.0.1';\n\
             CREATE USER 'admin'@'127.0.0.1' IDENTIFIED BY 'admin';\n\
             GRANT ALL PRIVILEGES ON *.* TO 'admin'@'127.0.0.1'",
        );
        db
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("mysqld.sock")
    }

    fn run(&mut self) {
        let d = &self.dir;
        let mut proc = Proc::spawn(
            "private-mariadb",
            Command::new("mariadbd")
                .args([
                    "--no-defaults",
                    "--user=root",
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                ])
                .arg(format!("--server-id={}", self.server_id))
                .args([
                    "--binlog-format=ROW",
                    "--binlog-row-image=FULL",
                    "--binlog-row-metadata=FULL",
                ])
                .args([
                    "--innodb-buffer-pool-size=32M",
                    "--innodb-log-file-size=16M",
                ])
                .arg(format!("--datadir={}", d.join("data").display()))
                .arg(format!("--tmpdir={}", d.join("tmp").display()))
                .arg(format!("--socket={}", self.socket().display()))
                .arg(format!("--port={}", self.port))
                .arg(format!("--pid-file={}", d.join("mariadbd.pid").display()))
                .arg(format!("--log-bin={}", d.join("mariadb-bin").display())),
            d.join("mariadbd.log"),
        );
        proc.wait_port(self.port, Duration::from_secs(60));
        self.proc = Some(proc);
    }

    /// Run SQL as root over the socket.
    pub fn sql(&self, sql: &str) -> String {
        let out = Command::new("mariadb")
            .args(["--no-defaults", "-uroot", "-N", "-B"])
            .arg(format!("--socket={}", self.socket().display()))
            .arg("-e")
            .arg(sql)
            .output()
            .expect("mariadb client runs");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn producer_url(&self) -> String {
        format!("mysql://rtinval:rtinval@127.0.0.1:{}", self.port)
    }

    pub fn admin_url(&self) -> String {
        format!("mysql://admin:admin@127.0.0.1:{}", self.port)
    }

    /// Freeze the server (SIGSTOP): connections stay open but nothing answers (half-open).
    pub fn freeze(&self, frozen: bool) {
        if let Some(p) = &self.proc {
            let sig = if frozen { "-STOP" } else { "-CONT" };
            Command::new("kill")
                .arg(sig)
                .arg(p.pid().to_string())
                .status()
                .expect("kill");
        }
    }

    /// Clean shutdown and start again on the same port and data.
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            assert!(
                p.terminate(Duration::from_secs(60)).is_some(),
                "MariaDB did not stop"
            );
        }
        self.run();
    }
}

/// A tansu broker of one test's own (sqlite storage), for broker outages.
pub struct PrivateBroker {
    pub proc: Option<Proc>,
    pub port: u16,
    dir: PathBuf,
}

impl PrivateBroker {
    pub fn start(dir: &Path) -> PrivateBroker {
        let dir = dir.join("tansu");
        std::fs::create_dir_all(&dir).expect("tansu dir");
        let mut b = PrivateBroker {
            proc: None,
            port: free_port(),
            dir,
        };
        b.run();
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn run(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut proc = Proc::spawn(
            "private-tansu",
            Command::new(&Stack::get().tansu_bin)
                .current_dir(&self.dir)
                .args([
                    "broker",
                    "--listener-url",
                    &url,
                    "--advertised-listener-url",
                    &url,
                ])
                .args(["--storage-engine", "sqlite://tansu.db"]),
            self.dir.join(format!("tansu-{}.log", std::process::id())),
        );
        proc.wait_port(self.port, Duration::from_secs(30));
        self.proc = Some(proc);
        // The index tansu's schema lacks, as scripts/stack adds it to the shared broker.
        let status = Command::new(workspace_root().join("scripts/tansu-index.py"))
            .arg(self.dir.join("tansu.db"))
            .status()
            .expect("scripts/tansu-index.py runs (python3)");
        assert!(status.success(), "scripts/tansu-index.py failed");
    }

    /// SIGKILL (a crash), then nothing listens until [`PrivateBroker::resume`].
    pub fn crash(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(p.pid().to_string())
                .status();
            wait_sync("tansu killed", Duration::from_secs(10), || p.try_exit());
        }
    }

    pub fn resume(&mut self) {
        self.run();
    }
}

/// Every payload on partition 0 of `topic` of the stack's broker, from the beginning to the end.
pub async fn read_raw(topic: &str) -> Vec<Vec<u8>> {
    read_raw_from(&Stack::get().brokers, topic).await
}

/// Every payload on partition 0 of `topic` of `brokers`, from the beginning to the current end.
pub async fn read_raw_from(brokers: &str, topic: &str) -> Vec<Vec<u8>> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(30))
        .expect("watermarks");
    let mut out = Vec::new();
    if high <= low {
        return out;
    }
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Offset(low))
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("message in time")
            .expect("message");
        out.push(m.payload().unwrap_or_default().to_vec());
        if m.offset() + 1 >= high {
            return out;
        }
    }
}

/// (utime + stime in clock ticks, VmRSS kB, VmHWM kB) of a process.
pub fn proc_stats(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ticks = field(11) + field(12);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let kb = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks, kb("VmRSS:"), kb("VmHWM:"))
}

/// Clock ticks per second (for [`proc_stats`]).
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}
