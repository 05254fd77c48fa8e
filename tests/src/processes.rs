//! The binaries under test as child processes ([`Proc`], [`ConsumerProc`], the stand-in
//! pool), waiting on them and on conditions, their HTTP endpoints and resource use.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stack::{bin, free_port, workspace_root};

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

/// A child whose output the test reads at the end (stdout and stderr piped), killed when
/// dropped before that: a test that fails early leaves no process behind.
pub struct OwnedChild(Option<Child>);

impl OwnedChild {
    /// Start `cmd` with stdout and stderr piped.
    pub fn spawn(what: &str, cmd: &mut Command) -> OwnedChild {
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        OwnedChild(Some(child))
    }

    /// Wait for exit (off the async runtime) and return what it printed.
    pub async fn output(mut self) -> std::process::Output {
        let child = self.0.take().expect("an owned child is waited for once");
        tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("the waiting task")
            .expect("wait for the child")
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
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

/// A tiny HTTP reload endpoint: answers the first `fail_first` requests with 500, then 204;
/// returns its URL and the count of requests so far.
pub fn reload_endpoint(
    fail_first: usize,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a reload endpoint");
    let url = format!(
        "http://{}/reload",
        listener.local_addr().expect("the endpoint's address")
    );
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let n = h.fetch_add(1, Ordering::SeqCst);
            let status = if n < fail_first {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
    });
    (url, hits)
}

/// The node started from its committed offsets: no resync of any reason.
pub fn assert_no_resync(c: &ConsumerProc) {
    let log = c.proc.log_text();
    assert!(
        !log.contains("Resyncing this node"),
        "the restarted node resynced instead of resuming:\n{log}"
    );
}
