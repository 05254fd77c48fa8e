//! MariaDB: a database of each test's own on the stack's server ([`TestDb`]), and a server of
//! a test's own for restarts and purges ([`PrivateMariaDb`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::processes::Proc;
use crate::stack::{Stack, free_port, unique};

use mysql_async::prelude::Queryable;

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
        let pool = mysql_async::Pool::new(Self::url_of(&name).as_str());
        TestDb { name, pool }
    }

    /// The stack's admin URL for this database: for a pool or a worker of a test's own.
    pub fn url(&self) -> String {
        Self::url_of(&self.name)
    }

    fn url_of(name: &str) -> String {
        format!("{}/{name}", Stack::get().mysql_admin_url)
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
