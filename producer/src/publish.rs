//! Publish stage: events → Kafka (idempotent producer, `acks=all`), and topic administration.
//!
//! Routing: `pool_reset` and `resync` go to `<prefix>.pool-reset` (message key: the pool name,
//! or `resync`), `cache_keys` and `cache_flush` to `<prefix>.cache-keys` (message key: the cache
//! name), and each `heartbeat` to every partition of both topics so that every consumer
//! partition learns how fresh it is. Headers carry kind and schema version.
//!
//! The stage hands each batch's delivery futures, with the batch's source position, to the
//! checkpoint stage in order; nothing here moves the checkpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rtinval_schemas::avro::AvroWriter;
use rtinval_schemas::kafka::KafkaContext;
use rtinval_schemas::{Event, EventBody, HEADER_KIND, HEADER_SCHEMA_VERSION};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, KafkaConfig, WireFormat};
use crate::error::KafkaError;
use crate::metrics::Metrics;
use crate::position::Position;

/// Topic names derived from the prefix.
#[derive(Debug, Clone)]
pub struct Topics {
    pub pool_reset: String,
    pub cache_keys: String,
    pub checkpoints: String,
    /// The consumers' node registry (they create it too; created here so that it exists, with
    /// the configured replication, before the first node starts).
    pub nodes: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Topics {
        use rtinval_schemas::topics::{CACHE_KEYS, CHECKPOINTS, NODES, POOL_RESET, name};
        Topics {
            pool_reset: name(prefix, POOL_RESET),
            cache_keys: name(prefix, CACHE_KEYS),
            checkpoints: name(prefix, CHECKPOINTS),
            nodes: name(prefix, NODES),
        }
    }
}

/// What the source stage sends: the events of one commit (or a heartbeat), and the position
/// from which to resume once they are acknowledged.
#[derive(Debug)]
pub struct Batch {
    pub position: Position,
    pub events: Vec<Event>,
}

/// A batch in flight: its position and one delivery future per message.
pub struct InFlight {
    pub position: Position,
    pub deliveries: Vec<DeliveryFuture>,
    pub kinds: Vec<rtinval_schemas::EventKind>,
    pub committed_at: u64,
}

/// librdkafka settings shared by the producer's clients.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    rtinval_schemas::kafka::client_config(&kafka.brokers, &kafka.options, &[])
}

/// The idempotent, acks=all producer.
pub fn producer(kafka: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    // Tunable defaults: kafka.options wins.
    let mut c = rtinval_schemas::kafka::client_config(
        &kafka.brokers,
        &kafka.options,
        &[
            ("linger.ms", "5"),
            ("message.timeout.ms", "300000"),
            ("queue.buffering.max.messages", "200000"),
        ],
    );
    // The delivery guarantees are not tunable.
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(|error| KafkaError::Client {
            brokers: kafka.brokers.clone(),
            error,
        })
}

/// Create the event topics and the checkpoint topic if missing (an existing topic is fine).
/// Kafka unreachable (or not answering) is retried with backoff until `shutdown` (`Ok(false)`):
/// each attempt's cause — librdkafka's own reason, such as "Connection refused" — is logged
/// with the brokers, counted, and shown by `/readyz`.
pub async fn ensure_topics(
    kafka: &KafkaConfig,
    topics: &Topics,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<bool, KafkaError> {
    let m = metrics.clone();
    let context = KafkaContext::new(
        &kafka.brokers,
        Arc::new(move |code: &str| m.kafka_error(code)),
    );
    let client_err = |error| KafkaError::Client {
        brokers: kafka.brokers.clone(),
        error,
    };
    let admin: AdminClient<KafkaContext> = client_config(kafka)
        .create_with_context(context.clone())
        .map_err(client_err)?;
    // The admin client never serves its event queue, where librdkafka reports the cause
    // (connection refused, TLS, auth); a client that shares the context and is polled does.
    let probe: BaseConsumer<KafkaContext> = client_config(kafka)
        .create_with_context(context.clone())
        .map_err(client_err)?;
    let rf = || TopicReplication::Fixed(kafka.replication_factor);
    let new = [
        NewTopic::new(&topics.pool_reset, kafka.partitions, rf()),
        NewTopic::new(&topics.cache_keys, kafka.partitions, rf()),
        NewTopic::new(&topics.checkpoints, 1, rf()).set("cleanup.policy", "compact"),
        NewTopic::new(&topics.nodes, 1, rf()).set("cleanup.policy", "compact"),
    ];
    // Short attempts: an unreachable broker is reported within seconds, then retried.
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(5)))
        .request_timeout(Some(Duration::from_secs(5)));
    let mut backoff = Duration::from_secs(1);
    loop {
        let cause = match admin.create_topics(&new, &opts).await {
            Ok(results) => {
                let mut retry = None;
                for r in results {
                    match r {
                        Ok(topic) => info!(%topic, "Created topic."),
                        Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                            debug!(%topic, "Topic exists.");
                        }
                        Err((_, code)) if transient(code) => retry = Some(code.to_string()),
                        Err((topic, code)) => {
                            return Err(KafkaError::CreateTopic { topic, error: code });
                        }
                    }
                }
                match retry {
                    None => {
                        metrics.set_problem(None);
                        return Ok(true);
                    }
                    Some(c) => c,
                }
            }
            Err(e) => e.to_string(),
        };
        if context.last_error().is_none() {
            // Ask the probe to reach the brokers, then serve what it learnt (blocking ~1 s: a
            // start-up path, on a multi-threaded runtime).
            let _ = tokio::task::block_in_place(|| {
                let _ = probe.fetch_metadata(None, Duration::from_secs(1));
                probe.poll(Duration::from_millis(100))
            });
        }
        let cause = context.last_error().unwrap_or(cause);
        metrics.set_problem(Some(format!(
            "Kafka at {} unreachable: {cause}; retrying",
            kafka.brokers
        )));
        warn!(brokers = %kafka.brokers, %cause, retry_in_secs = backoff.as_secs(), "Cannot create the topics: Kafka unreachable; retrying (not ready meanwhile).");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Errors of topic creation worth retrying: the broker is away or busy.
fn transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::NotController
            | RDKafkaErrorCode::LeaderNotAvailable
    )
}

/// Number of partitions of `topic` (waits for metadata up to 30 s).
pub fn partition_count(producer: &FutureProducer, topic: &str) -> Result<i32, KafkaError> {
    let md = producer
        .client()
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|error| KafkaError::Metadata {
            topic: topic.to_owned(),
            error,
        })?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| KafkaError::TopicMissing {
            topic: topic.to_owned(),
        })?;
    if let Some(e) = t.error() {
        return Err(KafkaError::TopicUnusable {
            topic: topic.to_owned(),
            code: format!("{e:?}"),
        });
    }
    Ok(t.partitions().len().max(1) as i32)
}

/// How events become message payloads.
#[derive(Debug)]
pub enum Wire {
    Json,
    Avro(Box<AvroWriter>),
}

impl Wire {
    pub fn new(config: &Config) -> Result<Wire, KafkaError> {
        match (config.kafka.format, &config.schema_registry) {
            (WireFormat::Avro, Some(registry)) => Ok(Wire::Avro(Box::new(
                AvroWriter::new(registry).map_err(KafkaError::Registry)?,
            ))),
            (WireFormat::Avro, None) => Err(KafkaError::Registry(
                "kafka.format = \"avro\" without [schema_registry]".into(),
            )),
            (WireFormat::Json, _) => Ok(Wire::Json),
        }
    }

    /// Avro: register the event schema under both event topics' value subjects now, so a
    /// wrong registry address or credentials stop the producer before it reads anything.
    pub async fn register(&self, topics: &Topics) -> Result<(), KafkaError> {
        if let Wire::Avro(writer) = self {
            for topic in [&topics.pool_reset, &topics.cache_keys] {
                let id = writer.register(topic).await.map_err(KafkaError::Registry)?;
                info!(subject = %format!("{topic}-value"), schema_id = id, "Event schema registered.");
            }
        }
        Ok(())
    }

    async fn encode(&self, topic: &str, event: &Event) -> Result<Vec<u8>, KafkaError> {
        match self {
            Wire::Json => Ok(event.to_json()),
            Wire::Avro(writer) => writer
                .encode(topic, event)
                .await
                .map_err(KafkaError::Registry),
        }
    }
}

/// The publish stage.
pub struct Publisher {
    pub producer: FutureProducer,
    pub wire: Wire,
    pub topics: Topics,
    /// Partition counts of the two event topics, for heartbeats.
    pub partitions: BTreeMap<String, i32>,
    pub metrics: Metrics,
}

impl Publisher {
    pub async fn run(
        self,
        mut input: mpsc::Receiver<Batch>,
        output: mpsc::Sender<InFlight>,
        shutdown: CancellationToken,
    ) -> Result<(), KafkaError> {
        // On shutdown the source stops first; we drain what it already sent.
        let _ = shutdown;
        while let Some(batch) = input.recv().await {
            let committed_at = batch.events.first().map_or(0, |e| e.source.committed_at);
            let mut deliveries = Vec::with_capacity(batch.events.len());
            let mut kinds = Vec::with_capacity(batch.events.len());
            for event in &batch.events {
                // Encoded once per topic (a heartbeat goes to every partition of both): with
                // Avro, each topic's subject has its own schema id.
                let mut encoded: Option<(&str, Vec<u8>)> = None;
                for (topic, partition, key) in self.routes(event) {
                    let payload = match &mut encoded {
                        Some((t, p)) if *t == topic => p,
                        slot => {
                            &mut slot
                                .insert((topic, self.wire.encode(topic, event).await?))
                                .1
                        }
                    };
                    deliveries.push(self.send(topic, partition, &key, payload, event).await?);
                    kinds.push(event.kind());
                }
            }
            let inflight = InFlight {
                position: batch.position,
                deliveries,
                kinds,
                committed_at,
            };
            if output.send(inflight).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    fn routes<'a>(&'a self, event: &'a Event) -> Vec<(&'a str, Option<i32>, String)> {
        match &event.body {
            EventBody::PoolReset { pools } => {
                vec![(self.topics.pool_reset.as_str(), None, pools.join(","))]
            }
            EventBody::Resync { .. } => {
                vec![(self.topics.pool_reset.as_str(), Some(0), "resync".into())]
            }
            EventBody::CacheKeys { cache, .. } | EventBody::CacheFlush { cache, .. } => {
                vec![(self.topics.cache_keys.as_str(), None, cache.clone())]
            }
            EventBody::Heartbeat { .. } => {
                let mut routes = Vec::new();
                for topic in [&self.topics.pool_reset, &self.topics.cache_keys] {
                    let n = self.partitions.get(topic.as_str()).copied().unwrap_or(1);
                    for p in 0..n {
                        routes.push((topic.as_str(), Some(p), "heartbeat".to_owned()));
                    }
                }
                routes
            }
        }
    }

    /// Enqueue one message; waits (back-pressure) while librdkafka's queue is full.
    async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: &[u8],
        event: &Event,
    ) -> Result<DeliveryFuture, KafkaError> {
        let version = event.schema_version.to_string();
        let mut backoff = Duration::from_millis(5);
        loop {
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: HEADER_KIND,
                    value: Some(event.kind().as_str()),
                })
                .insert(Header {
                    key: HEADER_SCHEMA_VERSION,
                    value: Some(version.as_str()),
                });
            let mut record = FutureRecord::to(topic)
                .key(key)
                .payload(payload)
                .headers(headers);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    self.metrics.publish_backpressure.inc();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err((e, _)) => {
                    // Not retriable (e.g. message too large): stop before the checkpoint can
                    // move past this event; a restart resumes from the last checkpoint.
                    warn!(%topic, error = %e, id = %event.id, "Kafka refused an event.");
                    return Err(KafkaError::Delivery {
                        position: event.id.clone(),
                        error: e,
                    });
                }
            }
        }
    }
}
