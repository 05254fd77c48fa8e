//! Pool reloads, debounced.
//!
//! Requests for one pool coalesce: a reload starts `debounce` after the latest request, but
//! never later than `max_delay` after the first request it covers, and never sooner than
//! `min_interval` after the previous reload ended. A request is satisfied only by a reload that
//! *started after it* and succeeded; failures are retried with backoff, so a request's future
//! resolving means the pool really dropped its state.

use rtinval_schemas::runtime::chain;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Mutex, Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apply::Interrupted;
use crate::config::{PoolConfig, ReloadAction};
use crate::error::ReloadError;
use crate::metrics::Metrics;

/// Timing of the debouncer.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub debounce: Duration,
    pub max_delay: Duration,
    pub min_interval: Duration,
}

impl Timing {
    pub fn from_config(c: &PoolConfig) -> Timing {
        Timing {
            debounce: Duration::from_millis(c.debounce_ms),
            max_delay: Duration::from_millis(c.max_delay_ms),
            min_interval: Duration::from_millis(c.min_interval_ms),
        }
    }
}

/// Something that reloads a pool once.
pub type ReloadFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), ReloadError>> + Send + Sync>;

/// The reload mechanism configured for a pool (its settings parsed by
/// [`PoolConfig::reload_action`], once).
pub fn reloader(name: &str, c: &PoolConfig) -> Result<ReloadFn, String> {
    let pool = name.to_owned();
    Ok(match c.reload_action()? {
        ReloadAction::Signal { pidfile, signal } => Arc::new(move || {
            let (pool, pidfile) = (pool.clone(), pidfile.clone());
            Box::pin(async move { send_signal(&pool, &pidfile, signal).await })
        }),
        ReloadAction::Http {
            target,
            method,
            timeout,
        } => Arc::new(move || {
            let (pool, target, method) = (pool.clone(), target.clone(), method.clone());
            Box::pin(async move {
                target
                    .call(&method, timeout)
                    .await
                    .map_err(|error| ReloadError::Http {
                        pool,
                        url: target.to_string(),
                        error: error.into(),
                    })
            })
        }),
        ReloadAction::Command { argv, timeout } => Arc::new(move || {
            let (pool, argv) = (pool.clone(), argv.clone());
            Box::pin(async move { run_command(&pool, &argv, timeout).await })
        }),
    })
}

async fn send_signal(
    pool: &str,
    pidfile: &str,
    signal: nix::sys::signal::Signal,
) -> Result<(), ReloadError> {
    let text = tokio::fs::read_to_string(pidfile)
        .await
        .map_err(|e| ReloadError::Pidfile {
            pool: pool.to_owned(),
            path: pidfile.to_owned(),
            error: Box::new(e),
        })?;
    let pid: i32 = text.trim().parse().map_err(|_| ReloadError::Pidfile {
        pool: pool.to_owned(),
        path: pidfile.to_owned(),
        error: format!("not a PID: {:?}", text.trim()).into(),
    })?;
    if pid <= 1 {
        return Err(ReloadError::Pidfile {
            pool: pool.to_owned(),
            path: pidfile.to_owned(),
            error: format!("refusing to signal pid {pid}").into(),
        });
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).map_err(|e| {
        ReloadError::Signal {
            pool: pool.to_owned(),
            signal: signal.to_string(),
            pid,
            error: Box::new(e),
        }
    })
}

async fn run_command(pool: &str, argv: &[String], timeout: Duration) -> Result<(), ReloadError> {
    let err = |error: crate::error::Cause| ReloadError::Command {
        pool: pool.to_owned(),
        command: argv.join(" "),
        error,
    };
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| err("empty command".into()))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| err(Box::new(e)))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Err(_) => Err(err(format!(
            "timed out after {} s (killed)",
            timeout.as_secs()
        )
        .into())),
        Ok(Err(e)) => Err(err(Box::new(e))),
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(err(format!("exited with {status}").into())),
    }
}

#[derive(Debug, Default)]
struct State {
    /// Reloads started so far; a request is satisfied once `started + 1` at its time completed.
    started: u64,
    first_pending: Option<Instant>,
    last_request: Option<Instant>,
    /// Requests since the last reload started (coalesced count for metrics).
    pending_requests: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Notify,
    completed: watch::Sender<u64>,
}

/// Handle to one pool's debouncer task; cheap to clone.
#[derive(Clone)]
pub struct Debouncer {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl Debouncer {
    /// Start the debouncer task of pool `name`.
    pub fn spawn(
        name: &str,
        timing: Timing,
        reload: ReloadFn,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Debouncer {
        let (completed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            completed,
        });
        tokio::spawn(run(
            name.to_owned(),
            timing,
            reload,
            metrics,
            shared.clone(),
            shutdown.clone(),
        ));
        Debouncer { shared, shutdown }
    }

    /// Ask for a reload; resolves when a reload that started after this call succeeded.
    pub fn request(&self) -> BoxFuture<'static, Result<(), Interrupted>> {
        let shared = self.shared.clone();
        let shutdown = self.shutdown.clone();
        Box::pin(async move {
            let ticket = {
                let mut st = shared.state.lock().await;
                let now = Instant::now();
                st.first_pending.get_or_insert(now);
                st.last_request = Some(now);
                st.pending_requests += 1;
                st.started + 1
            };
            let mut rx = shared.completed.subscribe();
            shared.wake.notify_one();
            tokio::select! {
                r = rx.wait_for(|done| *done >= ticket) => r.map(|_| ()).map_err(|_| Interrupted),
                _ = shutdown.cancelled() => Err(Interrupted),
            }
        })
    }
}

async fn run(
    name: String,
    timing: Timing,
    reload: ReloadFn,
    metrics: Metrics,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut last_end: Option<Instant> = None;
    loop {
        // Wait until something is pending, then until its deadline (re-evaluated on each request).
        loop {
            let deadline = {
                let st = shared.state.lock().await;
                match (st.first_pending, st.last_request) {
                    (Some(first), Some(last)) => {
                        let d = (last + timing.debounce).min(first + timing.max_delay);
                        Some(match last_end {
                            Some(end) => d.max(end + timing.min_interval),
                            None => d,
                        })
                    }
                    _ => None,
                }
            };
            match deadline {
                Some(d) if d <= Instant::now() => break,
                Some(d) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep_until(d) => {}
                        _ = shared.wake.notified() => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = shared.wake.notified() => {}
                    }
                }
            }
        }
        let (number, covered) = {
            let mut st = shared.state.lock().await;
            st.started += 1;
            st.first_pending = None;
            st.last_request = None;
            (st.started, std::mem::take(&mut st.pending_requests))
        };
        let mut backoff = Duration::from_millis(200);
        loop {
            let started = Instant::now();
            match reload().await {
                Ok(()) => {
                    metrics.pool_reloaded(&name, covered, started.elapsed());
                    info!(pool = %name, requests = covered, reload = number, "Pool reloaded.");
                    break;
                }
                Err(e) => {
                    metrics.pool_reload_failed(&name);
                    warn!(pool = %name, error = %chain(&e), retry_in_ms = backoff.as_millis() as u64, "Pool reload failed, retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        last_end = Some(Instant::now());
        shared.completed.send_replace(number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReloadKind;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(times: Arc<std::sync::Mutex<Vec<Instant>>>) -> ReloadFn {
        Arc::new(move || {
            let t = times.clone();
            Box::pin(async move {
                t.lock().unwrap().push(Instant::now());
                Ok(())
            })
        })
    }

    fn timing(debounce: u64, max_delay: u64, min_interval: u64) -> Timing {
        Timing {
            debounce: Duration::from_millis(debounce),
            max_delay: Duration::from_millis(max_delay),
            min_interval: Duration::from_millis(min_interval),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_coalesces_and_the_last_reload_follows_the_last_request() {
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let d = Debouncer::spawn(
            "p",
            timing(200, 1000, 0),
            counting(times.clone()),
            Metrics::new(),
            CancellationToken::new(),
        );
        let start = Instant::now();
        let mut waits = Vec::new();
        // 10,000 requests over one second (ten per millisecond: the timer's resolution).
        for i in 0..10_000 {
            waits.push(tokio::spawn(d.request()));
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let last_request = Instant::now();
        for w in waits {
            w.await.unwrap().unwrap();
        }
        let times = times.lock().unwrap().clone();
        assert!(times.len() <= 3, "{} reloads", times.len());
        assert!(
            *times.last().unwrap() >= last_request,
            "last reload after the last request"
        );
        // max_delay bounds the first reload.
        assert!(times[0] - start <= Duration::from_millis(1000) + Duration::from_millis(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_request_waits_the_debounce_window() {
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let d = Debouncer::spawn(
            "p",
            timing(200, 1000, 0),
            counting(times.clone()),
            Metrics::new(),
            CancellationToken::new(),
        );
        let start = Instant::now();
        d.request().await.unwrap();
        let times = times.lock().unwrap().clone();
        assert_eq!(times.len(), 1);
        assert_eq!(times[0] - start, Duration::from_millis(200));
    }

    #[tokio::test(start_paused = true)]
    async fn min_interval_spaces_reloads() {
        let times = Arc::new(std::sync::Mutex::new(Vec::new()));
        let d = Debouncer::spawn(
            "p",
            timing(10, 100, 500),
            counting(times.clone()),
            Metrics::new(),
            CancellationToken::new(),
        );
        d.request().await.unwrap();
        d.request().await.unwrap();
        let times = times.lock().unwrap().clone();
        assert_eq!(times.len(), 2);
        assert!(times[1] - times[0] >= Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_retried_and_the_request_waits_for_success() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let flaky: ReloadFn = Arc::new(move || {
            let c = c.clone();
            Box::pin(async move {
                if c.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(ReloadError::Command {
                        pool: "p".into(),
                        command: "x".into(),
                        error: "boom".into(),
                    })
                } else {
                    Ok(())
                }
            })
        });
        let d = Debouncer::spawn(
            "p",
            timing(10, 100, 0),
            flaky,
            Metrics::new(),
            CancellationToken::new(),
        );
        d.request().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_interrupts_a_waiting_request() {
        let never: ReloadFn = Arc::new(|| {
            Box::pin(async {
                Err(ReloadError::Command {
                    pool: "p".into(),
                    command: "x".into(),
                    error: "down".into(),
                })
            })
        });
        let sd = CancellationToken::new();
        let d = Debouncer::spawn("p", timing(10, 100, 0), never, Metrics::new(), sd.clone());
        let req = tokio::spawn(d.request());
        tokio::time::sleep(Duration::from_secs(2)).await;
        sd.cancel();
        assert_eq!(req.await.unwrap(), Err(Interrupted));
    }

    #[tokio::test]
    async fn command_reloader_checks_the_exit_status() {
        let ok = PoolConfig {
            reload: ReloadKind::Command,
            pidfile: None,
            signal: "USR2".into(),
            command: vec!["true".into()],
            timeout_secs: 5,
            url: None,
            method: "POST".into(),
            debounce_ms: 0,
            max_delay_ms: 0,
            min_interval_ms: 0,
        };
        assert!(reloader("p", &ok).unwrap()().await.is_ok());
        let fail = PoolConfig {
            command: vec!["false".into()],
            ..ok.clone()
        };
        let e = reloader("p", &fail).unwrap()().await.unwrap_err();
        assert!(chain(&e).contains("exited with"), "{e}");
        let slow = PoolConfig {
            command: vec!["sleep".into(), "5".into()],
            timeout_secs: 1,
            ..ok.clone()
        };
        let e = reloader("p", &slow).unwrap()().await.unwrap_err();
        assert!(chain(&e).contains("timed out"), "{e}");
        let missing = PoolConfig {
            reload: ReloadKind::Signal,
            pidfile: Some("/nonexistent/x.pid".into()),
            ..ok
        };
        let e = reloader("p", &missing).unwrap()().await.unwrap_err();
        assert!(chain(&e).contains("/nonexistent/x.pid"), "{e}");
    }
}
