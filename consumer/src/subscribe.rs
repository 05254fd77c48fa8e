//! Subscribe stage: reads both event topics as this node's consumer group, decodes, plans and
//! applies each message, and stores its offset only once its actions are applied.
//!
//! Every node reads every partition, so partitions are assigned explicitly (no group
//! rebalancing; the group only holds this node's committed offsets). At start, a partition
//! without a committed offset makes the node resync first: the high watermarks are read
//! *before* the resync, so everything published before them is covered by it and consumption
//! starts there.
//!
//! Offsets: completions are awaited in message order (`FuturesOrdered`, which still runs the
//! actions concurrently); each completed message's offset is stored and librdkafka commits
//! stored offsets periodically; shutdown commits synchronously.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use rtinval_schemas::EventKind;
use rtinval_schemas::avro::{AvroReader, decode_any};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::apply::{Applier, Interrupted};
use crate::barrier::{Barrier, Completion};
use crate::config::Config;
use crate::error::ConsumerError;
use crate::metrics::{KindLabel, Metrics};
use crate::plan;
use rtinval_schemas::kafka::KafkaContext;

/// Messages whose actions may be in flight at once (back-pressure beyond this).
const MAX_PENDING: usize = 10_000;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Build the Kafka consumer of this node (its context turns librdkafka's errors into warnings,
/// a metric and the readiness reason).
pub fn consumer(
    config: &Config,
    metrics: &Metrics,
) -> Result<StreamConsumer<KafkaContext>, ConsumerError> {
    let group = config.group_id();
    let c = rtinval_schemas::kafka::client_config(
        &config.kafka.brokers,
        &config.kafka.options,
        &[
            ("group.id", group.as_str()),
            ("enable.auto.commit", "true"),
            ("auto.commit.interval.ms", "1000"),
            ("enable.auto.offset.store", "false"),
            // A committed offset out of range (retention passed, topic recreated) must not be
            // silently reset: it surfaces as an error and the node resyncs.
            ("auto.offset.reset", "error"),
            // Bounds the latency of an idle partition's fetch: some Kafka-protocol brokers
            // (tansu) answer an empty fetch only after this wait even when data arrives
            // meanwhile. Override in kafka.options; with Apache Kafka a larger value saves idle
            // requests.
            ("fetch.wait.max.ms", "50"),
        ],
    );
    let m = metrics.clone();
    let on_error = std::sync::Arc::new(move |code: &str| m.kafka_error(code));
    c.create_with_context(KafkaContext::new(&config.kafka.brokers, on_error))
        .map_err(|e| ConsumerError::Kafka {
            brokers: config.kafka.brokers.clone(),
            error: e,
        })
}

struct Done {
    topic: String,
    partition: i32,
    offset: i64,
    kind: Option<EventKind>,
    received: Instant,
    committed_at: u64,
    /// A heartbeat's source time, recorded when it completes (in message order).
    heartbeat_source_ms: Option<u64>,
    /// Where the event came from: binlog file, offset and GTID (for the barrier).
    source: Option<(String, u64, Option<String>)>,
    /// The producer's `resync`: the source's positions start over.
    source_changed: bool,
    result: Result<(), Interrupted>,
}

/// The subscribe/plan/apply loop.
pub struct Subscriber {
    config: Config,
    consumer: StreamConsumer<KafkaContext>,
    applier: Applier,
    inventory: plan::Inventory,
    metrics: Metrics,
    dead_letter: Option<DeadLetter>,
    /// Reads Avro events (writer schemas by id from the registry); `None`: JSON only.
    avro: Option<AvroReader>,
    barrier: Barrier,
}

/// Copies undecodable messages to the dead-letter topic, with where they came from.
pub struct DeadLetter {
    pub producer: rdkafka::producer::FutureProducer,
    pub topic: String,
    pub shutdown: CancellationToken,
}

impl DeadLetter {
    /// A future that resolves once Kafka acknowledged the copy (retried until then).
    fn send(
        &self,
        m: &BorrowedMessage<'_>,
        error: &str,
    ) -> futures::future::BoxFuture<'static, Result<(), Interrupted>> {
        use rdkafka::message::{Header, OwnedHeaders};
        let (producer, topic, shutdown) = (
            self.producer.clone(),
            self.topic.clone(),
            self.shutdown.clone(),
        );
        let payload = m.payload().map(<[u8]>::to_vec);
        let key = m.key().map(<[u8]>::to_vec);
        let origin = (
            m.topic().to_owned(),
            m.partition().to_string(),
            m.offset().to_string(),
            error.to_owned(),
        );
        async move {
            let mut backoff = Duration::from_millis(200);
            loop {
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "rtinval-origin-topic", value: Some(origin.0.as_str()) })
                    .insert(Header { key: "rtinval-origin-partition", value: Some(origin.1.as_str()) })
                    .insert(Header { key: "rtinval-origin-offset", value: Some(origin.2.as_str()) })
                    .insert(Header { key: "rtinval-error", value: Some(origin.3.as_str()) });
                let mut record =
                    rdkafka::producer::FutureRecord::<Vec<u8>, Vec<u8>>::to(&topic).headers(headers);
                if let Some(p) = &payload {
                    record = record.payload(p);
                }
                if let Some(k) = &key {
                    record = record.key(k);
                }
                match producer.send(record, Duration::from_secs(30)).await {
                    Ok(_) => return Ok(()),
                    Err((e, _)) => {
                        warn!(%topic, error = %e, "Cannot write to the dead-letter topic, retrying.");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Err(Interrupted),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        }
        .boxed()
    }
}

impl Subscriber {
    pub fn new(
        config: Config,
        consumer: StreamConsumer<KafkaContext>,
        applier: Applier,
        metrics: Metrics,
        dead_letter: Option<DeadLetter>,
        avro: Option<AvroReader>,
        barrier: Barrier,
    ) -> Subscriber {
        let inventory = applier.inventory();
        Subscriber {
            config,
            consumer,
            applier,
            inventory,
            metrics,
            dead_letter,
            avro,
            barrier,
        }
    }

    /// All partitions of both topics, waiting (with a log line) until the producer created them.
    async fn partitions(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<TopicPartitionList>, ConsumerError> {
        let names = rtinval_schemas::topics::events(&self.config.kafka.topic_prefix);
        let mut warned = false;
        loop {
            let mut tpl = TopicPartitionList::new();
            let mut missing = Vec::new();
            for name in &names {
                // Short: with the brokers away, the retry loop says so within seconds.
                let md = self
                    .consumer
                    .fetch_metadata(Some(name), Duration::from_secs(5))
                    .map_err(|e| ConsumerError::Kafka {
                        brokers: self.config.kafka.brokers.clone(),
                        error: e,
                    })?;
                match md.topics().iter().find(|t| t.name() == name) {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                        for p in t.partitions() {
                            tpl.add_partition(name, p.id());
                        }
                    }
                    _ => missing.push(name.clone()),
                }
            }
            if missing.is_empty() {
                return Ok(Some(tpl));
            }
            if !warned {
                warn!(topics = ?missing, "Topics do not exist yet (the producer creates them); waiting.");
                warned = true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Start offsets: committed ones, or — after a local resync — the high watermarks.
    async fn start_offsets(
        &self,
        all: &TopicPartitionList,
    ) -> Result<TopicPartitionList, ConsumerError> {
        let kafka_err = |e: rdkafka::error::KafkaError| ConsumerError::Kafka {
            brokers: self.config.kafka.brokers.clone(),
            error: e,
        };
        let committed = self
            .consumer
            .committed_offsets(all.clone(), TIMEOUT)
            .map_err(kafka_err)?;
        let mut start = TopicPartitionList::new();
        // Partitions that start at the high watermark after a resync.
        let mut reset = TopicPartitionList::new();
        let (mut fresh, mut out_of_range) = (0, 0);
        for e in committed.elements() {
            // Watermarks first: the resync below covers everything before them.
            let (low, high) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
                .map_err(kafka_err)?;
            match e.offset() {
                // Checked here too, not only by the broker: some Kafka-protocol brokers answer a
                // fetch beyond the end with an empty batch instead of OFFSET_OUT_OF_RANGE.
                Offset::Offset(o) if o >= 0 && (o < low || o > high) => {
                    warn!(
                        topic = e.topic(),
                        partition = e.partition(),
                        committed = o,
                        low,
                        high,
                        "Committed offset out of range."
                    );
                    out_of_range += 1;
                    reset
                        .add_partition_offset(e.topic(), e.partition(), Offset::Offset(high))
                        .map_err(kafka_err)?;
                }
                Offset::Offset(o) if o >= 0 => {
                    start
                        .add_partition_offset(e.topic(), e.partition(), Offset::Offset(o))
                        .map_err(kafka_err)?;
                }
                _ => {
                    fresh += 1;
                    reset
                        .add_partition_offset(e.topic(), e.partition(), Offset::Offset(high))
                        .map_err(kafka_err)?;
                }
            }
        }
        if reset.count() > 0 {
            let reason = if out_of_range > 0 {
                "offset_out_of_range"
            } else {
                "no_committed_offset"
            };
            warn!(fresh, out_of_range, group = %self.config.group_id(), reason, "Resyncing this node before consuming.");
            self.resync(reason).await?;
            self.consumer
                .commit(&reset, CommitMode::Sync)
                .map_err(kafka_err)?;
            for e in reset.elements() {
                start
                    .add_partition_offset(e.topic(), e.partition(), e.offset())
                    .map_err(kafka_err)?;
            }
        }
        Ok(start)
    }

    /// Continuity is lost on some partition (offset out of range): read every partition's high
    /// watermark, resync, and continue from those watermarks — the resync covers everything
    /// published before them.
    async fn resync_from_high_watermarks(
        &self,
        all: &TopicPartitionList,
        reason: &'static str,
    ) -> Result<(), ConsumerError> {
        let kafka_err = |e: rdkafka::error::KafkaError| ConsumerError::Kafka {
            brokers: self.config.kafka.brokers.clone(),
            error: e,
        };
        let mut high = TopicPartitionList::new();
        for e in all.elements() {
            let (_, h) = self
                .consumer
                .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
                .map_err(kafka_err)?;
            high.add_partition_offset(e.topic(), e.partition(), Offset::Offset(h))
                .map_err(kafka_err)?;
        }
        self.resync(reason).await?;
        self.consumer.assign(&high).map_err(kafka_err)?;
        self.consumer
            .commit(&high, CommitMode::Sync)
            .map_err(kafka_err)?;
        info!(
            reason,
            "Resynced; consuming from the current end of every partition."
        );
        Ok(())
    }

    async fn resync(&self, reason: &'static str) -> Result<(), ConsumerError> {
        self.metrics.resync(reason);
        let actions = self.inventory.resync();
        info!(
            reason,
            actions = actions.len(),
            "Local resync: reloading every pool, flushing every cache."
        );
        self.barrier.set_resyncing(true);
        let applied = self.applier.apply(actions).await;
        self.barrier.set_resyncing(false);
        applied.map_err(|_| ConsumerError::Stopped {
            during: "the initial resync",
        })
    }

    /// Partitions and start offsets; Kafka trouble is retried with backoff, the node staying
    /// not ready with the cause as its reason. `None` on shutdown.
    async fn start(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(TopicPartitionList, TopicPartitionList)>, ConsumerError> {
        let mut backoff = Duration::from_secs(1);
        loop {
            let attempt = match self.partitions(shutdown).await {
                Ok(None) => return Ok(None),
                Ok(Some(all)) => self.start_offsets(&all).await.map(|start| (all, start)),
                Err(e) => Err(e),
            };
            let e = match attempt {
                Ok(found) => {
                    self.metrics.set_problem(None);
                    return Ok(Some(found));
                }
                Err(e) if shutdown.is_cancelled() => return Err(e),
                Err(e) => e,
            };
            // Serve the client's event queue briefly (nothing is assigned yet, so no message
            // can come): librdkafka's own reason reaches the context this way.
            let _ = tokio::time::timeout(Duration::from_millis(200), self.consumer.recv()).await;
            let cause = self
                .consumer
                .context()
                .last_error()
                .unwrap_or_else(|| e.to_string());
            let brokers = &self.config.kafka.brokers;
            self.metrics.set_problem(Some(format!(
                "Kafka at {brokers} unreachable: {cause}; retrying"
            )));
            warn!(%brokers, error = %e, %cause, retry_in_secs = backoff.as_secs(), "Cannot start consuming: Kafka unreachable; retrying (the node stays not ready).");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Run until `shutdown`; returns after the final commit.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let Some((all, start)) = self.start(&shutdown).await? else {
            self.barrier.stop();
            return Ok(());
        };
        self.barrier.set_partitions(all.count());
        self.consumer
            .assign(&start)
            .map_err(|e| ConsumerError::Kafka {
                brokers: self.config.kafka.brokers.clone(),
                error: e,
            })?;
        self.metrics.set_assigned(true);
        info!(group = %self.config.group_id(), partitions = start.count(), "Consuming.");

        let progress_secs = self.config.node.progress_log_secs;
        let progress_every = Duration::from_secs(progress_secs.max(1));
        let mut progress =
            tokio::time::interval_at(tokio::time::Instant::now() + progress_every, progress_every);
        let mut applied_since = 0u64;
        // Next offset to read per topic-partition, as applied: the position the progress line shows.
        let mut applied_to: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut pending: FuturesOrdered<futures::future::BoxFuture<'static, Done>> =
            FuturesOrdered::new();
        let mut messages = self.consumer.stream();
        // Waiters on a node that turns not ready (stale, a cache restarting) are answered now.
        let mut readiness = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = readiness.tick() => {
                    if self.metrics.not_ready_reason().is_some() {
                        self.barrier.recheck();
                    }
                }
                Some(done) = pending.next(), if !pending.is_empty() => {
                    applied_since += 1;
                    if let Some((topic, partition, next)) = self.complete(done) {
                        applied_to.insert((topic, partition), next);
                    }
                }
                _ = progress.tick(), if progress_secs > 0 => {
                    let staleness = self.metrics.refresh_staleness().map(|d| d.as_secs_f64());
                    info!(
                        applied = applied_since,
                        in_flight = pending.len(),
                        offsets = %positions(&applied_to),
                        staleness_seconds = ?staleness,
                        "Progress."
                    );
                    applied_since = 0;
                }
                msg = messages.next(), if pending.len() < MAX_PENDING => match msg {
                    Some(Ok(m)) => pending.push_back(self.handle(&m).await),
                    Some(Err(rdkafka::error::KafkaError::MessageConsumption(rdkafka::types::RDKafkaErrorCode::AutoOffsetReset))) => {
                        warn!(group = %self.config.group_id(), "Committed offset out of range (retention passed?): resyncing this node.");
                        drop(messages);
                        self.resync_from_high_watermarks(&all, "offset_out_of_range").await?;
                        messages = self.consumer.stream();
                    }
                    Some(Err(e)) => warn!(error = %e, "Kafka consumer error."),
                    None => break,
                },
            }
        }
        // Waiters are answered now; then finish what is in flight (bounded) and commit.
        self.barrier.stop();
        let drain = async {
            while let Some(done) = pending.next().await {
                self.complete(done);
            }
        };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            warn!(
                "Shutdown: some actions did not finish within 10 s; their offsets stay uncommitted."
            );
        }
        self.metrics.set_assigned(false);
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => info!("Offsets committed."),
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(e) => {
                warn!(error = %e, "Final offset commit failed; the next start re-applies from the last commit.")
            }
        }
        Ok(())
    }

    /// Decode one message (JSON, or Avro through the registry) and start applying it.
    async fn handle(&self, m: &BorrowedMessage<'_>) -> futures::future::BoxFuture<'static, Done> {
        let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
        let received = Instant::now();
        let decoded = decode_any(m.payload().unwrap_or_default(), self.avro.as_ref()).await;
        let mut heartbeat_source_ms = None;
        let (mut source, mut source_changed) = (None, false);
        let (fut, kind, committed_at) = match decoded {
            Ok(event) => {
                debug!(%topic, partition, offset, id = %event.id, kind = %event.kind(), "Event.");
                if let rtinval_schemas::EventBody::Resync { reason } = &event.body {
                    warn!(%topic, partition, offset, %reason, id = %event.id, "The producer asks for a resync.");
                    self.metrics.resync("producer");
                    source_changed = true;
                }
                source = Some((
                    event.source.file.clone(),
                    event.source.pos,
                    event.source.gtid.clone(),
                ));
                if let rtinval_schemas::EventBody::Heartbeat { source_time } = &event.body {
                    heartbeat_source_ms = Some(*source_time);
                }
                let actions = plan::actions(&event, &self.inventory);
                (
                    self.applier.apply(actions),
                    Some(event.kind()),
                    event.source.committed_at,
                )
            }
            Err(e) => {
                // Poison message: never skipped silently. Keep a copy (if configured), resync.
                self.metrics.decode_errors.inc();
                self.metrics.resync("undecodable");
                warn!(%topic, partition, offset, error = %e, "Undecodable message: resyncing this node.");
                let dead = self.dead_letter.as_ref().map(|d| d.send(m, &e.to_string()));
                let resync = self.applier.apply(self.inventory.resync());
                let fut = async move {
                    if let Some(dead) = dead {
                        dead.await?;
                    }
                    resync.await
                };
                (fut.boxed(), None, 0)
            }
        };
        async move {
            let result = fut.await;
            Done {
                topic,
                partition,
                offset,
                kind,
                received,
                committed_at,
                heartbeat_source_ms,
                source,
                source_changed,
                result,
            }
        }
        .boxed()
    }

    /// Counts an applied action and stores its offset; returns topic, partition and the next
    /// offset, or `None` when the action was interrupted (its offset stays unstored).
    ///
    /// Interrupted results come only after the drain at shutdown (the actions' token is
    /// cancelled then), and completions arrive in message order, so no later offset of a
    /// partition is stored past an unapplied message.
    fn complete(&self, done: Done) -> Option<(String, i32, i64)> {
        if done.result.is_err() {
            return None;
        }
        // Completions arrive in message order: everything received before this heartbeat is
        // applied, so the node's view of the source is as new as the heartbeat says.
        if let Some(t) = done.heartbeat_source_ms {
            self.metrics.observe_source_time(t);
        }
        if done.source_changed {
            self.barrier.positions_restart();
        }
        if let Some((file, pos, gtid)) = &done.source {
            let completion = if done.heartbeat_source_ms.is_some() {
                Completion::Heartbeat
            } else {
                Completion::Event
            };
            self.barrier.completed(
                &done.topic,
                done.partition,
                file,
                *pos,
                gtid.as_deref(),
                completion,
            );
        }
        if let Some(kind) = done.kind {
            self.metrics
                .events_applied
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .inc();
            if kind != EventKind::Heartbeat {
                self.metrics
                    .apply_latency_seconds
                    .observe(done.received.elapsed().as_secs_f64());
                if done.committed_at > 0 {
                    let e2e = rtinval_schemas::runtime::now_ms().saturating_sub(done.committed_at);
                    self.metrics
                        .end_to_end_latency_seconds
                        .observe(e2e as f64 / 1000.0);
                }
            }
        }
        // rd_kafka_offsets_store takes the offset to resume from (the next message). Not
        // `store_offset`: the deprecated rd_kafka_offset_store behind it adds 1 itself, so
        // passing `offset + 1` there committed one message too far and a restart skipped it.
        let mut next = TopicPartitionList::with_capacity(1);
        let stored = next
            .add_partition_offset(&done.topic, done.partition, Offset::Offset(done.offset + 1))
            .and_then(|()| self.consumer.store_offsets(&next));
        if let Err(e) = stored {
            warn!(topic = %done.topic, partition = done.partition, offset = done.offset, error = %e, "Cannot store offset.");
        }
        Some((done.topic, done.partition, done.offset + 1))
    }
}

/// `topic:partition@next-offset` for every partition applied to, for the progress line.
fn positions(applied_to: &BTreeMap<(String, i32), i64>) -> String {
    if applied_to.is_empty() {
        return "none yet".to_owned();
    }
    let mut out = String::new();
    for ((topic, partition), next) in applied_to {
        if !out.is_empty() {
            out.push(' ');
        }
        let _ = write!(out, "{topic}:{partition}@{next}");
    }
    out
}

/// The dead-letter writer: an idempotent producer, and the topic created if missing.
pub async fn dead_letter(
    config: &Config,
    topic: &str,
    shutdown: &CancellationToken,
) -> Result<DeadLetter, ConsumerError> {
    use rdkafka::admin::{NewTopic, TopicReplication};
    use rtinval_schemas::kafka::{CreateTopicError, create_topic};
    let err = |error| ConsumerError::Kafka {
        brokers: config.kafka.brokers.clone(),
        error,
    };
    let mut c =
        rtinval_schemas::kafka::client_config(&config.kafka.brokers, &config.kafka.options, &[]);
    let new = NewTopic::new(topic, 1, TopicReplication::Fixed(1));
    match create_topic(&c, &new, Duration::from_secs(30)).await {
        Ok(()) => {}
        Err(CreateTopicError::Client(e)) => return Err(err(e)),
        Err(CreateTopicError::Refused(error)) => {
            return Err(ConsumerError::DeadLetterTopic {
                topic: topic.to_owned(),
                error,
            });
        }
    }
    let producer = c
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(err)?;
    Ok(DeadLetter {
        producer,
        topic: topic.to_owned(),
        shutdown: shutdown.clone(),
    })
}
