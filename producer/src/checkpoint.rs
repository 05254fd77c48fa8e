//! Checkpoint stage: waits for Kafka's acknowledgment of every event of a batch, in source
//! order, and only then lets the resume position advance. The position is stored in Kafka
//! (`<prefix>.checkpoints`, compacted, message key = `kafka.checkpoint_key`) so a standby on
//! another host resumes where the active producer stopped.
//!
//! A position is always a commit boundary (the end of an XID or DDL event): resuming there never
//! splits a transaction.

use std::time::Duration;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;
use rdkafka::producer::FutureRecord;
use rtinval_schemas::kafka::ReadPartitionError;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::config::KafkaConfig;
use crate::error::KafkaError;
use crate::metrics::Metrics;
use crate::position::Position;
use crate::publish::{InFlight, client_config};

/// The stored record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    #[serde(flatten)]
    position: Position,
    /// Unix ms when it was written.
    updated_at: u64,
}

/// Read the last checkpoint written under `key`, if any.
pub fn load(kafka: &KafkaConfig, topic: &str, key: &str) -> Result<Option<Position>, KafkaError> {
    let err = |error| KafkaError::ReadCheckpoint {
        topic: topic.to_owned(),
        error,
    };
    let consumer: BaseConsumer = client_config(kafka)
        .set("group.id", format!("rtinval-checkpoint-reader-{key}"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .map_err(err)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(30))
        .map_err(err)?;
    if high <= low {
        return Ok(None);
    }
    // Recent records first: a compacted (or young) topic finds it in the tail.
    let mut start = (high - 1000).max(low);
    loop {
        let found = scan(&consumer, topic, key, start, high)?;
        if found.is_some() || start == low {
            return found
                .map(|bytes| {
                    serde_json::from_slice::<Stored>(&bytes)
                        .map(|s| s.position)
                        .map_err(|error| KafkaError::BadCheckpoint {
                            topic: topic.to_owned(),
                            error,
                        })
                })
                .transpose();
        }
        start = low;
    }
}

/// The payload of the last record under `key` in `start..high`.
fn scan(
    consumer: &BaseConsumer,
    topic: &str,
    key: &str,
    start: i64,
    high: i64,
) -> Result<Option<Vec<u8>>, KafkaError> {
    let mut last = None;
    rtinval_schemas::kafka::read_partition(
        consumer,
        topic,
        0,
        (start, high),
        Duration::from_secs(30),
        |m| {
            if m.key() == Some(key.as_bytes()) {
                last = m.payload().map(<[u8]>::to_vec);
            }
        },
    )
    .map_err(|e| match e {
        ReadPartitionError::Kafka(error) => KafkaError::ReadCheckpoint {
            topic: topic.to_owned(),
            error,
        },
        ReadPartitionError::Timeout { start, high } => KafkaError::CheckpointTimeout {
            topic: topic.to_owned(),
            start,
            high,
        },
    })?;
    Ok(last)
}

/// The checkpoint stage.
pub struct Checkpointer {
    pub producer: FutureProducer,
    pub topic: String,
    pub key: String,
    pub interval: Duration,
    pub metrics: Metrics,
}

impl Checkpointer {
    /// Await deliveries in order; write the newest acknowledged position every `interval` and
    /// once more when the input closes (shutdown).
    pub async fn run(self, mut input: mpsc::Receiver<InFlight>) -> Result<(), KafkaError> {
        let mut acked: Option<Position> = None;
        let mut written: Option<Position> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = input.recv() => match item {
                    Some(inflight) => {
                        self.await_deliveries(inflight, &mut acked).await?;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if acked != written
                        && let Some(p) = &acked {
                            self.write(p).await?;
                            written = acked.clone();
                        }
                }
            }
        }
        if acked != written
            && let Some(p) = &acked
        {
            self.write(p).await?;
            info!(position = %p, "Final checkpoint written.");
        }
        Ok(())
    }

    async fn await_deliveries(
        &self,
        inflight: InFlight,
        acked: &mut Option<Position>,
    ) -> Result<(), KafkaError> {
        let position = inflight.position;
        for (delivery, kind) in inflight.deliveries.into_iter().zip(inflight.kinds) {
            match delivery.await {
                Ok(Ok(_)) => self.metrics.published(kind, inflight.committed_at),
                Ok(Err((e, _))) => {
                    return Err(KafkaError::Delivery {
                        position: position.to_string(),
                        error: e,
                    });
                }
                Err(_) => {
                    return Err(KafkaError::DeliveryReportLost {
                        position: position.to_string(),
                    });
                }
            }
        }
        debug!(%position, "Batch acknowledged.");
        self.metrics.set_position(&position);
        *acked = Some(position);
        Ok(())
    }

    async fn write(&self, position: &Position) -> Result<(), KafkaError> {
        let stored = Stored {
            position: position.clone(),
            updated_at: rtinval_schemas::runtime::now_ms(),
        };
        let payload =
            serde_json::to_vec(&stored).map_err(|error| KafkaError::EncodeCheckpoint {
                position: position.to_string(),
                error,
            })?;
        let record = FutureRecord::to(&self.topic)
            .key(&self.key)
            .payload(&payload)
            .partition(0);
        self.producer
            .send(record, Duration::from_secs(300))
            .await
            .map_err(|(error, _)| KafkaError::Delivery {
                position: position.to_string(),
                error,
            })?;
        self.metrics.checkpoint_written();
        debug!(%position, "Checkpoint written.");
        Ok(())
    }
}
