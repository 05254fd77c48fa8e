//! The Kafka-protocol broker: publishing test events ([`Bus`]), reading topics back, and a
//! broker of a test's own ([`PrivateBroker`]); waiting until a consumer node is ready.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::processes::{ConsumerProc, Proc, http_get, wait_sync};
use crate::stack::{Stack, free_port, unique, workspace_root};

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
        let now = rtinval_schemas::runtime::now_ms();
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

/// Publish heartbeats until the consumer's `/readyz` answers 200.
pub async fn wait_ready(bus: &Bus, c: &ConsumerProc, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        bus.publish(rtinval_schemas::EventBody::Heartbeat {
            source_time: rtinval_schemas::runtime::now_ms(),
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
