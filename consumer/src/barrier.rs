//! Read-your-writes barrier: which source position this node has applied, and the waits on it
//! (`GET /wait?gtid=…&timeout_ms=…`, `rtinval-consumer wait`).
//!
//! The producer publishes in binlog order to every partition, and after every transaction that
//! produced events a heartbeat follows to every partition (`producer.progress_heartbeat_ms`),
//! carrying the position it was sent at. Completions here arrive in message order per
//! partition, so once every partition of both topics has completed a message at or past a
//! position, every event of every transaction up to it is applied on this node — including a
//! transaction that produced nothing for this node. That minimum over the partitions is the
//! node's frontier; a transaction's GTID counts as applied once the frontier passes the position
//! its events or a later heartbeat carried.
//!
//! Waiters are kept in order of what they wait for and woken only when the frontier passes it
//! (or when the node stops, resyncs or turns not ready): 10,000 waiters cost a map entry each,
//! not a wake-up per applied message.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rtinval_schemas::position::{FilePos, Reached, WaitFor};
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Everything up to the position is applied on this node.
    Reached(Reached),
    /// The timeout passed first; what the node had applied by then.
    Timeout(Reached),
    /// The node cannot answer for its caches now (stopping, resyncing, stale, not consuming).
    NotReady(String),
}

/// What a completed message proves about its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// An event of a transaction: everything before that transaction is applied.
    Event,
    /// A heartbeat: everything up to and including its position is applied.
    Heartbeat,
}

/// Why the node answers no wait now, if it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    Resyncing,
    Stopping,
}

/// A handle on this node's frontier; cheap to clone.
#[derive(Clone)]
pub struct Barrier {
    inner: Arc<Mutex<Inner>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Barrier")
    }
}

struct Inner {
    state: State,
    /// Partitions of both topics this node reads.
    partitions: usize,
    /// The newest position completed per (topic, partition).
    newest: BTreeMap<(String, i32), FilePos>,
    /// GTIDs of completed messages the frontier has not passed yet, by their position.
    pending: BTreeMap<FilePos, Vec<String>>,
    reached: Reached,
    /// Waiters by (what they wait for, id); GTID waiters under one of their sources.
    by_pos: BTreeMap<(FilePos, u64), oneshot::Sender<()>>,
    by_gtid: BTreeMap<(String, u64, u64), oneshot::Sender<()>>,
    next_id: u64,
}

impl Barrier {
    pub fn new(metrics: &Metrics) -> Barrier {
        Barrier {
            inner: Arc::new(Mutex::new(Inner {
                state: State::Running,
                partitions: usize::MAX,
                newest: BTreeMap::new(),
                pending: BTreeMap::new(),
                reached: Reached::default(),
                by_pos: BTreeMap::new(),
                by_gtid: BTreeMap::new(),
                next_id: 0,
            })),
            metrics: metrics.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many partitions (of both topics) the node reads: the frontier needs each.
    pub fn set_partitions(&self, n: usize) {
        self.lock().partitions = n;
    }

    /// What the node has applied.
    pub fn reached(&self) -> Reached {
        self.lock().reached.clone()
    }

    /// A message of `topic`/`partition` whose event came from `file:pos` (transaction `gtid`)
    /// completed, in message order.
    ///
    /// One transaction may have several events in a partition (one per cache, pool message or
    /// key chunk), so an event proves only that everything *before* its transaction is applied
    /// there; its own transaction is complete once a later message completes — the heartbeat
    /// the producer sends behind every transaction, or the next transaction's event. A
    /// heartbeat (`Completion::Heartbeat`) proves its position itself.
    pub fn completed(
        &self,
        topic: &str,
        partition: i32,
        file: &str,
        pos: u64,
        gtid: Option<&str>,
        completion: Completion,
    ) {
        let mut g = self.lock();
        let at = FilePos {
            file: file.to_owned(),
            pos,
        };
        let proven = match completion {
            Completion::Heartbeat => at.clone(),
            Completion::Event => FilePos {
                file: file.to_owned(),
                pos: pos.saturating_sub(1),
            },
        };
        let key = (topic.to_owned(), partition);
        if g.newest.get(&key).is_none_or(|p| *p < proven) {
            g.newest.insert(key, proven);
        }
        if let Some(gtid) = gtid {
            g.pending.entry(at).or_default().push(gtid.to_owned());
        }
        g.advance();
        self.metrics.barrier_waiters.set(g.waiters() as i64);
    }

    /// The source changed (the producer's `resync`): positions start over; GTIDs go on.
    pub fn positions_restart(&self) {
        let mut g = self.lock();
        g.newest.clear();
        g.pending.clear();
        g.reached.file_pos = None;
    }

    /// A local resync starts (`true`) or ends: waits answer "resync in progress" meanwhile.
    pub fn set_resyncing(&self, on: bool) {
        let mut g = self.lock();
        if g.state != State::Stopping {
            g.state = if on { State::Resyncing } else { State::Running };
        }
        if on {
            g.wake_all();
            self.metrics.barrier_waiters.set(0);
        }
    }

    /// The node stops: every waiter is answered now, and every later wait at once.
    pub fn stop(&self) {
        let mut g = self.lock();
        g.state = State::Stopping;
        g.wake_all();
        self.metrics.barrier_waiters.set(0);
    }

    /// Wake every waiter to re-check readiness (called when the node turns not ready).
    pub fn recheck(&self) {
        self.lock().wake_all();
        self.metrics.barrier_waiters.set(0);
    }

    /// Wait until the node has applied everything up to `want`, for at most `timeout`.
    pub async fn wait(&self, want: &WaitFor, timeout: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (rx, key) = {
                let mut g = self.lock();
                match g.state {
                    State::Stopping => return Answer::NotReady("the consumer is stopping".into()),
                    State::Resyncing => {
                        return Answer::NotReady(
                            "resync in progress: every cache is being flushed".into(),
                        );
                    }
                    State::Running => {}
                }
                if want.reached_by(&g.reached) {
                    return Answer::Reached(g.reached.clone());
                }
                if let Some(reason) = self.metrics.not_ready_reason() {
                    return Answer::NotReady(reason);
                }
                let registered = g.register(want);
                self.metrics.barrier_waiters.set(g.waiters() as i64);
                registered
            };
            tokio::select! {
                _ = rx => {}
                _ = tokio::time::sleep_until(deadline) => {
                    let mut g = self.lock();
                    g.unregister(&key);
                    self.metrics.barrier_waiters.set(g.waiters() as i64);
                    return if want.reached_by(&g.reached) {
                        Answer::Reached(g.reached.clone())
                    } else {
                        Answer::Timeout(g.reached.clone())
                    };
                }
            }
        }
    }

    /// Waiters registered now.
    pub fn waiting(&self) -> usize {
        self.lock().waiters()
    }
}

/// Where a waiter is registered.
enum WaitKey {
    Pos((FilePos, u64)),
    Gtid((String, u64, u64)),
}

impl Inner {
    /// Move the frontier to the oldest of the partitions' newest positions, take in the GTIDs
    /// it passed, and wake the waiters it satisfied.
    fn advance(&mut self) {
        if self.newest.len() < self.partitions {
            return;
        }
        let Some(frontier) = self.newest.values().min().cloned() else {
            return;
        };
        if self
            .reached
            .file_pos
            .as_ref()
            .is_some_and(|r| *r >= frontier)
        {
            return;
        }
        let later = self.pending.split_off(&FilePos {
            file: frontier.file.clone(),
            pos: frontier.pos + 1,
        });
        let passed = std::mem::replace(&mut self.pending, later);
        for gtid in passed.into_values().flatten() {
            self.reached.add_gtid(&gtid);
        }
        self.reached.file_pos = Some(frontier.clone());
        // Wake the file:pos waiters at or below the frontier...
        let above = self.by_pos.split_off(&(
            FilePos {
                file: frontier.file.clone(),
                pos: frontier.pos + 1,
            },
            0,
        ));
        for (_, tx) in std::mem::replace(&mut self.by_pos, above) {
            let _ = tx.send(());
        }
        // ...and the GTID waiters whose source reached their number.
        let mut woken = Vec::new();
        for (source, seq) in &self.reached.gtids {
            let range = (source.clone(), 0, 0)..=(source.clone(), *seq, u64::MAX);
            woken.extend(self.by_gtid.range(range).map(|(k, _)| k.clone()));
        }
        for k in woken {
            if let Some(tx) = self.by_gtid.remove(&k) {
                let _ = tx.send(());
            }
        }
    }

    fn register(&mut self, want: &WaitFor) -> (oneshot::Receiver<()>, WaitKey) {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = self.next_id;
        let key = match want {
            WaitFor::FilePos(p) => {
                let k = (p.clone(), id);
                self.by_pos.insert(k.clone(), tx);
                WaitKey::Pos(k)
            }
            WaitFor::Gtids(g) => {
                // Under the first source not reached yet; woken, the waiter checks them all.
                let (source, seq) = g
                    .iter()
                    .find(|(s, n)| self.reached.gtids.get(*s).is_none_or(|r| r < *n))
                    .map_or((String::new(), 0), |(s, n)| (s.clone(), *n));
                let k = (source, seq, id);
                self.by_gtid.insert(k.clone(), tx);
                WaitKey::Gtid(k)
            }
        };
        (rx, key)
    }

    fn unregister(&mut self, key: &WaitKey) {
        match key {
            WaitKey::Pos(k) => {
                self.by_pos.remove(k);
            }
            WaitKey::Gtid(k) => {
                self.by_gtid.remove(k);
            }
        }
    }

    fn waiters(&self) -> usize {
        self.by_pos.len() + self.by_gtid.len()
    }

    fn wake_all(&mut self) {
        for (_, tx) in std::mem::take(&mut self.by_pos) {
            let _ = tx.send(());
        }
        for (_, tx) in std::mem::take(&mut self.by_gtid) {
            let _ = tx.send(());
        }
    }
}

/// Longest wait a request may ask for.
const MAX_TIMEOUT_MS: u64 = 600_000;
/// The wait when a request names none.
const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// `GET /wait?gtid=<position>&timeout_ms=<n>`: the HTTP status and JSON body.
///
/// 200 `applied`, 504 `timeout` (with the node's position), 503 `not_ready` (stopping,
/// resyncing, stale, not consuming: at once), 400 `bad_request` naming the problem.
pub async fn http_wait(barrier: &Barrier, query: Option<&str>) -> (u16, String) {
    let bad = |error: String| {
        (
            400,
            serde_json::json!({"status": "bad_request", "error": error}).to_string(),
        )
    };
    let mut position = None;
    let mut timeout_ms = DEFAULT_TIMEOUT_MS;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = percent_decode(v) else {
            return bad(format!("{k}: malformed percent-encoding"));
        };
        match k {
            "gtid" | "position" => position = Some(v),
            "timeout_ms" => match v.parse::<u64>() {
                Ok(ms) if ms <= MAX_TIMEOUT_MS => timeout_ms = ms,
                _ => {
                    return bad(format!(
                        "timeout_ms {v:?}: expected milliseconds from 0 to {MAX_TIMEOUT_MS}"
                    ));
                }
            },
            _ => return bad(format!("unknown parameter {k:?}; use gtid and timeout_ms")),
        }
    }
    let Some(position) = position else {
        return bad("missing gtid=<position> (a GTID, GTID set or file:pos)".into());
    };
    let want = match WaitFor::parse(&position) {
        Ok(w) => w,
        Err(e) => return bad(e.to_string()),
    };
    let started = std::time::Instant::now();
    let answer = barrier.wait(&want, Duration::from_millis(timeout_ms)).await;
    let waited_ms = started.elapsed().as_millis() as u64;
    match answer {
        Answer::Reached(r) => (
            200,
            serde_json::json!({"status": "applied", "position": position, "applied": r.to_string(), "waited_ms": waited_ms}).to_string(),
        ),
        Answer::Timeout(r) => (
            504,
            serde_json::json!({"status": "timeout", "position": position, "applied": r.to_string(), "waited_ms": waited_ms}).to_string(),
        ),
        Answer::NotReady(reason) => (
            503,
            serde_json::json!({"status": "not_ready", "position": position, "reason": reason, "waited_ms": waited_ms}).to_string(),
        ),
    }
}

/// `%2C` → `,`; `+` stays (positions hold none). `None` for a broken escape.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::Completion::{Event, Heartbeat};
    use super::*;

    fn ready_metrics() -> Metrics {
        let m = Metrics::new();
        m.set_assigned(true);
        m.observe_source_time(rtinval_schemas::runtime::now_ms());
        m
    }

    fn gtid(s: &str) -> WaitFor {
        WaitFor::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_wait_returns_once_every_partition_passed_the_position() {
        let b = Barrier::new(&ready_metrics());
        b.set_partitions(2);
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move { b.wait(&gtid("0-1-17"), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b.waiting(), 1);
        // The transaction's own event and the heartbeat behind it on the cache-keys partition...
        b.completed("t.cache-keys", 0, "bin.000001", 500, Some("0-1-17"), Event);
        b.completed(
            "t.cache-keys",
            0,
            "bin.000001",
            500,
            Some("0-1-17"),
            Heartbeat,
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !waiter.is_finished(),
            "the pool-reset partition has not passed it yet"
        );
        // ...and a heartbeat after it on the other partition.
        b.completed(
            "t.pool-reset",
            0,
            "bin.000001",
            520,
            Some("0-1-17"),
            Heartbeat,
        );
        let Answer::Reached(r) = waiter.await.unwrap() else {
            panic!("not reached")
        };
        assert_eq!(r.gtids["0"], 17);
        assert_eq!(b.waiting(), 0);
        // Already reached: at once; a file:pos wait the same way.
        assert!(matches!(
            b.wait(&gtid("0-1-3"), Duration::ZERO).await,
            Answer::Reached(_)
        ));
        assert!(matches!(
            b.wait(&gtid("bin.000001:500"), Duration::ZERO).await,
            Answer::Reached(_)
        ));
    }

    #[tokio::test]
    async fn a_position_never_reached_times_out_with_the_nodes_position() {
        let b = Barrier::new(&ready_metrics());
        b.set_partitions(1);
        b.completed(
            "t.cache-keys",
            0,
            "bin.000001",
            500,
            Some("0-1-17"),
            Heartbeat,
        );
        let Answer::Timeout(r) = b.wait(&gtid("7-1-1"), Duration::from_millis(50)).await else {
            panic!("another domain must time out")
        };
        assert_eq!(r.to_string(), "bin.000001:500 (gtid 0-*-17)");
        assert_eq!(b.waiting(), 0, "a timed-out waiter is removed");
        assert!(matches!(
            b.wait(&gtid("bin.000002:4"), Duration::from_millis(10))
                .await,
            Answer::Timeout(_)
        ));
    }

    #[tokio::test]
    async fn stopping_resyncing_and_not_ready_answer_every_waiter_at_once() {
        let m = ready_metrics();
        let b = Barrier::new(&m);
        b.set_partitions(1);
        let mut waiters = Vec::new();
        for i in 0..1000 {
            let b = b.clone();
            waiters.push(tokio::spawn(async move {
                b.wait(&gtid(&format!("0-1-{}", 100 + i)), Duration::from_secs(60))
                    .await
            }));
        }
        while b.waiting() < 1000 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        b.stop();
        for w in waiters {
            assert_eq!(
                w.await.unwrap(),
                Answer::NotReady("the consumer is stopping".into())
            );
        }
        assert!(matches!(
            b.wait(&gtid("0-1-1"), Duration::from_secs(60)).await,
            Answer::NotReady(_)
        ));

        let b = Barrier::new(&m);
        b.set_resyncing(true);
        assert!(matches!(
            b.wait(&gtid("0-1-1"), Duration::from_secs(60)).await,
            Answer::NotReady(r) if r.contains("resync")
        ));
        b.set_resyncing(false);
        let not_consuming = Metrics::new();
        let b = Barrier::new(&not_consuming);
        assert!(matches!(
            b.wait(&gtid("0-1-1"), Duration::from_secs(60)).await,
            Answer::NotReady(r) if r.contains("not consuming")
        ));
    }

    #[tokio::test]
    async fn a_gtid_counts_only_once_the_frontier_passed_its_position() {
        let b = Barrier::new(&ready_metrics());
        b.set_partitions(2);
        b.completed("a", 0, "bin.000001", 100, Some("0-1-5"), Heartbeat);
        b.completed("b", 0, "bin.000001", 100, Some("0-1-5"), Heartbeat);
        // Transaction 6 is applied on partition a only.
        b.completed("a", 0, "bin.000001", 200, Some("0-1-6"), Heartbeat);
        assert_eq!(b.reached().gtids["0"], 5);
        b.completed("b", 0, "bin.000001", 300, Some("0-1-7"), Heartbeat);
        assert_eq!(b.reached().gtids["0"], 6, "7 waits for partition a");
        b.positions_restart();
        assert_eq!(b.reached().file_pos, None);
        assert_eq!(
            b.reached().gtids["0"],
            6,
            "GTIDs go on across a source change"
        );
    }

    #[tokio::test]
    async fn a_transaction_counts_only_once_all_its_events_in_a_partition_are_applied() {
        // One transaction purging keys of four caches: four events at one position.
        let b = Barrier::new(&ready_metrics());
        b.set_partitions(1);
        b.completed("t", 0, "bin.000001", 400, Some("0-1-16"), Heartbeat);
        b.completed("t", 0, "bin.000001", 500, Some("0-1-17"), Event);
        assert_eq!(
            b.reached().gtids["0"],
            16,
            "three more events of 17 are pending"
        );
        assert!(matches!(
            b.wait(&gtid("bin.000001:500"), Duration::ZERO).await,
            Answer::Timeout(_)
        ));
        assert!(matches!(
            b.wait(&gtid("bin.000001:400"), Duration::ZERO).await,
            Answer::Reached(_)
        ));
        b.completed("t", 0, "bin.000001", 500, Some("0-1-17"), Event);
        assert_eq!(b.reached().gtids["0"], 16);
        // The next transaction's event proves 17 complete; so does the heartbeat behind 17.
        b.completed("t", 0, "bin.000001", 600, Some("0-1-18"), Event);
        assert_eq!(b.reached().gtids["0"], 17);
        b.completed("t", 0, "bin.000001", 600, Some("0-1-18"), Heartbeat);
        assert_eq!(b.reached().gtids["0"], 18);
    }

    #[tokio::test]
    async fn http_answers_name_the_problem() {
        let b = Barrier::new(&ready_metrics());
        b.set_partitions(1);
        b.completed("t", 0, "bin.000001", 500, Some("0-1-17"), Heartbeat);
        let (s, body) = http_wait(&b, Some("gtid=0-1-17&timeout_ms=10")).await;
        assert_eq!(s, 200, "{body}");
        assert!(
            body.contains("\"applied\":\"bin.000001:500 (gtid 0-*-17)\""),
            "{body}"
        );
        let (s, _) = http_wait(&b, Some("gtid=0-1-16%2C1-1-0&timeout_ms=10")).await;
        assert_eq!(s, 504, "domain 1 never seen");
        let (s, body) = http_wait(&b, Some("gtid=banana")).await;
        assert_eq!(s, 400);
        assert!(body.contains("expected a MariaDB GTID"), "{body}");
        let (s, body) = http_wait(&b, None).await;
        assert_eq!(s, 400);
        assert!(body.contains("missing gtid"), "{body}");
        let (s, body) = http_wait(&b, Some("gtid=0-1-1&timeout_ms=-4")).await;
        assert_eq!(s, 400);
        assert!(body.contains("timeout_ms"), "{body}");
        let (s, _) = http_wait(&b, Some("gtid=0-1-1&wait=1")).await;
        assert_eq!(s, 400);
        b.stop();
        let (s, body) = http_wait(&b, Some("gtid=0-1-99")).await;
        assert_eq!(s, 503);
        assert!(body.contains("stopping"), "{body}");
    }
}
