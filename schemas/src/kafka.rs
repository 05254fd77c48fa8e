//! The Kafka client context both binaries use: librdkafka's own errors (connection refused,
//! DNS, TLS, authentication) become a warning that names the brokers and the cause — at once,
//! then with backoff while they repeat — a count (the caller's metric), and the newest cause,
//! which the binaries show as their `/readyz` reason while Kafka keeps them from starting.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use tracing::warn;

/// Counts one error, by librdkafka error code (a bounded set of names).
pub type OnError = Arc<dyn Fn(&str) + Send + Sync>;

/// Longest pause between two warnings about the same ongoing trouble.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// Shared by the client's threads; cheap to clone.
#[derive(Clone)]
pub struct KafkaContext {
    brokers: String,
    on_error: OnError,
    state: Arc<Mutex<LogState>>,
}

struct LogState {
    last: Option<String>,
    next_log: Option<Instant>,
    backoff: Duration,
}

impl KafkaContext {
    pub fn new(brokers: &str, on_error: OnError) -> KafkaContext {
        KafkaContext {
            brokers: brokers.to_owned(),
            on_error,
            state: Arc::new(Mutex::new(LogState {
                last: None,
                next_log: None,
                backoff: Duration::from_secs(2),
            })),
        }
    }

    /// The newest error librdkafka reported, if any.
    pub fn last_error(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .last
            .clone()
    }
}

impl ClientContext for KafkaContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let code = error
            .rdkafka_error_code()
            .map_or_else(|| "unknown".to_owned(), |c| format!("{c:?}"));
        (self.on_error)(&code);
        let now = Instant::now();
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.last = Some(format!("{error}: {reason}"));
        // A quiet minute since the last warning starts the backoff over.
        if s.next_log.is_some_and(|t| now >= t + MAX_BACKOFF) {
            s.backoff = Duration::from_secs(2);
        }
        if s.next_log.is_none_or(|t| now >= t) {
            warn!(brokers = %self.brokers, error = %error, cause = %reason, next_warning_in_secs = s.backoff.as_secs(), "Kafka is not reachable (or refuses this client); retrying.");
            s.next_log = Some(now + s.backoff);
            s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
        }
    }
}

impl ConsumerContext for KafkaContext {}

/// A librdkafka config for `brokers`: `defaults` first, then the operator's `options`
/// (`kafka.options`), which win. Settings that are not tunable are set by the caller after.
pub fn client_config(
    brokers: &str,
    options: &std::collections::BTreeMap<String, String>,
    defaults: &[(&str, &str)],
) -> rdkafka::ClientConfig {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in options {
        c.set(k, v);
    }
    c
}

/// Why [`create_topic`] could not create a topic.
#[derive(Debug, thiserror::Error)]
pub enum CreateTopicError {
    #[error("cannot create a Kafka admin client or reach the brokers")]
    Client(#[source] KafkaError),
    #[error("the broker refused to create the topic")]
    Refused(#[source] rdkafka::types::RDKafkaErrorCode),
}

/// Create one topic with an admin client of its own (dropped after); a topic that exists
/// already is fine.
pub async fn create_topic(
    config: &rdkafka::ClientConfig,
    topic: &rdkafka::admin::NewTopic<'_>,
    timeout: Duration,
) -> Result<(), CreateTopicError> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> =
        config.create().map_err(CreateTopicError::Client)?;
    let opts = AdminOptions::new().operation_timeout(Some(timeout));
    let results = admin
        .create_topics([topic], &opts)
        .await
        .map_err(CreateTopicError::Client)?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => return Err(CreateTopicError::Refused(code)),
        }
    }
    Ok(())
}

/// Why [`read_partition`] stopped before the end.
#[derive(Debug, thiserror::Error)]
pub enum ReadPartitionError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("timed out reading offsets {start}..{high}")]
    Timeout { start: i64, high: i64 },
}

/// Read partition `partition` of `topic` from `start` up to `high` (exclusive; a high
/// watermark read before), handing each record to `each`, with `consumer` assigned to it alone.
/// Ends at `high`, at end of partition (a compacted topic may end below `high`; with
/// `enable.partition.eof`), or with [`ReadPartitionError::Timeout`] after `timeout`.
pub fn read_partition<C: ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    partition: i32,
    (start, high): (i64, i64),
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), ReadPartitionError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::{Message, Offset, TopicPartitionList};
    if high <= start {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    loop {
        if Instant::now() > deadline {
            return Err(ReadPartitionError::Timeout { start, high });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(m)) => {
                each(&m);
                if m.offset() + 1 >= high {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_operators_options_win_over_defaults() {
        let options = std::collections::BTreeMap::from([("linger.ms".to_owned(), "50".to_owned())]);
        let c = super::client_config("b:1", &options, &[("linger.ms", "5"), ("acks", "all")]);
        assert_eq!(c.get("bootstrap.servers"), Some("b:1"));
        assert_eq!(c.get("linger.ms"), Some("50"));
        assert_eq!(c.get("acks"), Some("all"));
    }

    use super::*;
    use rdkafka::types::RDKafkaErrorCode;

    #[test]
    fn errors_are_counted_every_time_and_kept_as_the_cause() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let c = KafkaContext::new(
            "127.0.0.1:1",
            Arc::new(move |code: &str| s.lock().unwrap().push(code.to_owned())),
        );
        assert_eq!(c.last_error(), None);
        for _ in 0..3 {
            c.error(
                KafkaError::Global(RDKafkaErrorCode::BrokerTransportFailure),
                "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused",
            );
        }
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(seen.lock().unwrap()[0], "BrokerTransportFailure");
        assert!(c.last_error().unwrap().contains("Connection refused"));
    }
}
