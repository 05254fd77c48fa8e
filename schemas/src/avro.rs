//! The Avro wire format with a Confluent-compatible Schema Registry.
//!
//! Messages are framed as the Confluent serializers frame them (magic byte `0`, the schema id
//! as 4 big-endian bytes, then the Avro binary datum), by `schema_registry_converter`. The
//! producer registers `schemas/event.avsc` under each topic's value subject
//! (`<topic>-value`) and writes with it ([`AvroWriter`]); readers fetch the writer's schema by
//! id, cached ([`AvroReader`]). JSON payloads start with `{`, so [`is_avro`] tells the two
//! apart per message and consumers read both.
//!
//! Evolution (checked by `schemas/tests/avro_evolution.rs` against every committed version of
//! `event.avsc`): add fields with defaults only; never remove, rename or retype a field; add
//! body kinds only at the end of the union. Readers map fields and body kinds by name, using
//! the writer's schema, so an older or newer writer's datum decodes.

use std::sync::OnceLock;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::avro_common::get_supplied_schema;
use schema_registry_converter::schema_registry_common::{SubjectNameStrategy, SuppliedSchema};
use serde::{Deserialize, Serialize};

use crate::{AVRO_SCHEMA, DecodeError, Event, EventBody, Op, SCHEMA_VERSION, Source, TableChange};

/// The first byte of a Confluent-framed message.
pub const MAGIC_BYTE: u8 = 0;

/// True when `payload` is Confluent-framed (Avro); JSON events start with `{`.
pub fn is_avro(payload: &[u8]) -> bool {
    payload.first() == Some(&MAGIC_BYTE)
}

/// `schemas/event.avsc`, parsed once.
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        // The file is compiled in and parsed by the tests; a failure is a build defect.
        #[allow(clippy::expect_used)]
        Schema::parse_str(AVRO_SCHEMA).expect("schemas/event.avsc is a valid Avro schema")
    })
}

/// Where the Schema Registry is and how to reach it (`[schema_registry]` in both configs).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL(s), comma-separated, e.g. `https://registry-1:8081,https://registry-2:8081`.
    pub url: String,
    /// Basic authentication user.
    #[serde(default)]
    pub username: Option<String>,
    /// Basic authentication password; `RTINVAL_SCHEMA_REGISTRY_PASSWORD` overrides it.
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of the CA(s) that sign the registry's TLS certificate, beside the system's.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Seconds before a registry request fails.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_timeout_secs() -> u64 {
    10
}

impl RegistryConfig {
    /// Apply `RTINVAL_SCHEMA_REGISTRY_PASSWORD` if set.
    pub fn with_env(mut self) -> RegistryConfig {
        if let Ok(p) = std::env::var("RTINVAL_SCHEMA_REGISTRY_PASSWORD") {
            self.password = Some(p);
        }
        self
    }

    /// The same, with the password replaced by `***` (for the start-up log).
    pub fn redacted(&self) -> RegistryConfig {
        let mut c = self.clone();
        if c.password.is_some() {
            c.password = Some("***".into());
        }
        c
    }

    /// Check what can be checked without the registry: URLs, the CA file.
    pub fn validate(&self) -> Result<(), String> {
        self.settings().map(|_| ())
    }

    fn settings(&self) -> Result<SrSettings, String> {
        let mut urls = self.url.split(',').map(str::trim).filter(|u| !u.is_empty());
        let first = urls
            .next()
            .ok_or("schema_registry.url is empty; set the registry's base URL")?;
        for u in std::iter::once(first).chain(urls.clone()) {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!(
                    "schema_registry.url {u:?} must start with http:// or https://"
                ));
            }
        }
        let mut builder = SrSettings::new_builder(first.trim_end_matches('/').to_owned());
        for u in urls {
            builder.add_url(u.trim_end_matches('/').to_owned());
        }
        if let Some(user) = &self.username {
            builder.set_basic_authorization(user, self.password.as_deref());
        }
        builder.set_timeout(Duration::from_secs(self.timeout_secs.max(1)));
        let mut client = reqwest::Client::builder();
        if let Some(path) = &self.ca_file {
            let pem =
                std::fs::read(path).map_err(|e| format!("schema_registry.ca_file {path}: {e}"))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("schema_registry.ca_file {path} is not PEM: {e}"))?;
            for cert in certs {
                client = client.add_root_certificate(cert);
            }
        }
        builder
            .build_with(client)
            .map_err(|e| format!("schema registry client: {e}"))
    }
}

/// Encodes events as Avro against the registry; registers `event.avsc` once per subject.
pub struct AvroWriter {
    encoder: AvroEncoder<'static>,
    supplied: SuppliedSchema,
}

impl std::fmt::Debug for AvroWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AvroWriter")
    }
}

impl AvroWriter {
    pub fn new(config: &RegistryConfig) -> Result<AvroWriter, String> {
        Ok(AvroWriter {
            encoder: AvroEncoder::new(config.settings()?),
            supplied: get_supplied_schema(schema()),
        })
    }

    fn strategy(&self, topic: &str) -> SubjectNameStrategy {
        SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_owned(),
            false,
            self.supplied.clone(),
        )
    }

    /// Register the schema under `<topic>-value` (idempotent in the registry); returns its id.
    /// The producer calls it at start so a wrong URL or credentials stop it with one line.
    pub async fn register(&self, topic: &str) -> Result<u32, String> {
        let subject = format!("{topic}-value");
        self.encoder
            .get_schema_and_id(&subject, self.strategy(topic))
            .await
            .map(|s| s.id)
            .map_err(|e| format!("registering the event schema as {subject}: {e}"))
    }

    /// The Confluent-framed Avro payload of `event` for `topic`.
    pub async fn encode(&self, topic: &str, event: &Event) -> Result<Vec<u8>, String> {
        self.encoder
            .encode_value(to_value(event), &self.strategy(topic))
            .await
            .map_err(|e| format!("Avro encoding for {topic}: {e}"))
    }
}

/// Decodes Confluent-framed Avro events, fetching writer schemas by id (cached).
pub struct AvroReader {
    decoder: AvroDecoder<'static>,
}

impl std::fmt::Debug for AvroReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AvroReader")
    }
}

impl AvroReader {
    pub fn new(config: &RegistryConfig) -> Result<AvroReader, String> {
        Ok(AvroReader {
            decoder: AvroDecoder::new(config.settings()?),
        })
    }

    /// Decode one framed payload. An unknown schema id or an unreachable registry is a
    /// [`DecodeError::Avro`]: the message cannot be applied, and the caller's fail-safe rules
    /// apply. Failed lookups are not cached, so the next message asks the registry again.
    pub async fn decode(&self, payload: &[u8]) -> Result<Event, DecodeError> {
        let decoded = self.decoder.decode_with_schema(Some(payload)).await;
        let decoded = match decoded {
            Ok(Some(d)) => d,
            Ok(None) => return Err(DecodeError::Avro("empty payload".into())),
            Err(e) => {
                self.decoder.remove_errors_from_cache();
                return Err(DecodeError::Avro(e.to_string()));
            }
        };
        from_value(decoded.value, &decoded.schema.parsed)
    }
}

/// Decode a payload of either wire format; Avro needs a reader (a configured registry).
pub async fn decode_any(payload: &[u8], avro: Option<&AvroReader>) -> Result<Event, DecodeError> {
    if !is_avro(payload) {
        return Event::from_json(payload);
    }
    match avro {
        Some(reader) => reader.decode(payload).await,
        None => Err(DecodeError::Avro(
            "an Avro message (Confluent framing) but no [schema_registry] is configured".into(),
        )),
    }
}

fn long(v: u64) -> Value {
    Value::Long(i64::try_from(v).unwrap_or(i64::MAX))
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().cloned().map(Value::String).collect())
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// The Avro value of an event, shaped by the current `event.avsc`.
pub fn to_value(e: &Event) -> Value {
    let s = &e.source;
    let tables = s
        .tables
        .iter()
        .map(|t| {
            let ops = t
                .ops
                .iter()
                .map(|op| {
                    let i = match op {
                        Op::Insert => 0,
                        Op::Update => 1,
                        Op::Delete => 2,
                    };
                    Value::Enum(i, op.as_str().to_owned())
                })
                .collect();
            record(vec![
                ("table", Value::String(t.table.clone())),
                ("ops", Value::Array(ops)),
            ])
        })
        .collect();
    let gtid = match &s.gtid {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(g) => Value::Union(1, Box::new(Value::String(g.clone()))),
    };
    let source = record(vec![
        ("server_id", Value::Long(i64::from(s.server_id))),
        ("gtid", gtid),
        ("file", Value::String(s.file.clone())),
        ("pos", long(s.pos)),
        ("tables", Value::Array(tables)),
        ("committed_at", long(s.committed_at)),
    ]);
    let (branch, body) = match &e.body {
        EventBody::PoolReset { pools } => (0, record(vec![("pools", strings(pools))])),
        EventBody::CacheKeys { cache, keys } => (
            1,
            record(vec![
                ("cache", Value::String(cache.clone())),
                ("keys", strings(keys)),
            ]),
        ),
        EventBody::CacheFlush { cache, reason } => (
            2,
            record(vec![
                ("cache", Value::String(cache.clone())),
                ("reason", Value::String(reason.clone())),
            ]),
        ),
        EventBody::Resync { reason } => {
            (3, record(vec![("reason", Value::String(reason.clone()))]))
        }
        EventBody::Heartbeat { source_time } => {
            (4, record(vec![("source_time", long(*source_time))]))
        }
    };
    record(vec![
        (
            "schema_version",
            Value::Int(i32::try_from(e.schema_version).unwrap_or(i32::MAX)),
        ),
        ("id", Value::String(e.id.clone())),
        ("source", source),
        ("emitted_at", long(e.emitted_at)),
        ("body", Value::Union(branch, Box::new(body))),
    ])
}

/// Fields of a record value, by name.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn of(v: Value, what: &str) -> Result<Fields, DecodeError> {
        match v {
            Value::Record(f) => Ok(Fields(f)),
            other => Err(bad(format!("{what} is not a record: {other:?}"))),
        }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.swap_remove(i).1)
    }

    fn need(&mut self, name: &str) -> Result<Value, DecodeError> {
        self.take(name)
            .ok_or_else(|| bad(format!("field {name} is missing")))
    }
}

fn bad(msg: String) -> DecodeError {
    DecodeError::Avro(msg)
}

/// Strip a union wrapper (a nullable field) down to its value.
fn plain(v: Value) -> Value {
    match v {
        Value::Union(_, inner) => plain(*inner),
        other => other,
    }
}

fn as_u64(v: Value, name: &str) -> Result<u64, DecodeError> {
    match plain(v) {
        Value::Long(n) => u64::try_from(n).map_err(|_| bad(format!("{name} is negative"))),
        Value::Int(n) => u64::try_from(n).map_err(|_| bad(format!("{name} is negative"))),
        other => Err(bad(format!("{name} is not a number: {other:?}"))),
    }
}

fn as_string(v: Value, name: &str) -> Result<String, DecodeError> {
    match plain(v) {
        Value::String(s) => Ok(s),
        other => Err(bad(format!("{name} is not a string: {other:?}"))),
    }
}

fn as_strings(v: Value, name: &str) -> Result<Vec<String>, DecodeError> {
    match plain(v) {
        Value::Array(items) => items.into_iter().map(|i| as_string(i, name)).collect(),
        other => Err(bad(format!("{name} is not an array: {other:?}"))),
    }
}

/// Names of the body union's branches in `writer` (the schema the datum was written with).
fn body_branches(writer: &Schema) -> Result<Vec<String>, DecodeError> {
    let Schema::Record(event) = writer else {
        return Err(bad("the writer schema is not a record".into()));
    };
    let body = event
        .fields
        .iter()
        .find(|f| f.name == "body")
        .ok_or_else(|| bad("the writer schema has no body".into()))?;
    let Schema::Union(union) = &body.schema else {
        return Err(bad("the writer schema's body is not a union".into()));
    };
    Ok(union
        .variants()
        .iter()
        .map(|v| v.name().map(|n| n.name.clone()).unwrap_or_default())
        .collect())
}

/// An event from its Avro value; `writer` is the schema the value was written with. Fields and
/// body kinds are matched by name, so older and newer writers' data decode.
pub fn from_value(v: Value, writer: &Schema) -> Result<Event, DecodeError> {
    let mut f = Fields::of(v, "the event")?;
    let version = as_u64(f.need("schema_version")?, "schema_version")?;
    let version = u32::try_from(version).unwrap_or(u32::MAX);
    if version != SCHEMA_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let mut s = Fields::of(f.need("source")?, "source")?;
    let gtid = match s.take("gtid").map(plain) {
        None | Some(Value::Null) => None,
        Some(g) => Some(as_string(g, "source.gtid")?),
    };
    let tables = match s.take("tables").map(plain) {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|t| {
                let mut t = Fields::of(t, "a table change")?;
                let ops = match plain(t.need("ops")?) {
                    Value::Array(ops) => ops
                        .into_iter()
                        .map(|op| match op {
                            Value::Enum(_, sym) => match sym.as_str() {
                                "insert" => Ok(Op::Insert),
                                "update" => Ok(Op::Update),
                                "delete" => Ok(Op::Delete),
                                other => Err(bad(format!("unknown op {other:?}"))),
                            },
                            other => Err(bad(format!("an op is not an enum: {other:?}"))),
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    other => return Err(bad(format!("ops is not an array: {other:?}"))),
                };
                Ok(TableChange {
                    table: as_string(t.need("table")?, "table")?,
                    ops,
                })
            })
            .collect::<Result<Vec<_>, DecodeError>>()?,
        Some(other) => return Err(bad(format!("source.tables is not an array: {other:?}"))),
    };
    let source = Source {
        server_id: u32::try_from(as_u64(s.need("server_id")?, "source.server_id")?)
            .map_err(|_| bad("source.server_id is out of range".into()))?,
        gtid,
        file: as_string(s.need("file")?, "source.file")?,
        pos: as_u64(s.need("pos")?, "source.pos")?,
        tables,
        committed_at: as_u64(s.need("committed_at")?, "source.committed_at")?,
    };
    let (branch, body) = match f.need("body")? {
        Value::Union(i, inner) => (i, *inner),
        other => return Err(bad(format!("body is not a union: {other:?}"))),
    };
    let names = body_branches(writer)?;
    let kind = names
        .get(branch as usize)
        .ok_or_else(|| bad(format!("body branch {branch} is not in the writer schema")))?;
    let mut b = Fields::of(body, "body")?;
    let body = match kind.as_str() {
        "PoolReset" => EventBody::PoolReset {
            pools: as_strings(b.need("pools")?, "pools")?,
        },
        "CacheKeys" => EventBody::CacheKeys {
            cache: as_string(b.need("cache")?, "cache")?,
            keys: as_strings(b.need("keys")?, "keys")?,
        },
        "CacheFlush" => EventBody::CacheFlush {
            cache: as_string(b.need("cache")?, "cache")?,
            reason: as_string(b.need("reason")?, "reason")?,
        },
        "Resync" => EventBody::Resync {
            reason: as_string(b.need("reason")?, "reason")?,
        },
        "Heartbeat" => EventBody::Heartbeat {
            source_time: as_u64(b.need("source_time")?, "source_time")?,
        },
        other => {
            return Err(bad(format!(
                "unknown event kind {other:?} (written by a newer producer); upgrade the consumer"
            )));
        }
    };
    Ok(Event {
        schema_version: version,
        id: as_string(f.need("id")?, "id")?,
        source,
        emitted_at: as_u64(f.need("emitted_at")?, "emitted_at")?,
        body,
    })
}

/// The plain Avro datum of an event (no framing), for tests and tools.
pub fn to_datum(e: &Event) -> Result<Vec<u8>, String> {
    apache_avro::to_avro_datum(schema(), to_value(e)).map_err(|err| err.to_string())
}

/// An event from a plain datum written with `writer`.
pub fn from_datum(datum: &[u8], writer: &Schema) -> Result<Event, DecodeError> {
    let mut reader = datum;
    let v = apache_avro::from_avro_datum(writer, &mut reader, None)
        .map_err(|e| DecodeError::Avro(e.to_string()))?;
    from_value(v, writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> RegistryConfig {
        RegistryConfig {
            url: url.into(),
            username: Some("u".into()),
            password: Some("secret".into()),
            ca_file: None,
            timeout_secs: 10,
        }
    }

    #[test]
    fn registry_settings_are_checked_before_any_request() {
        assert!(config("http://a:8081, https://b:8081/").validate().is_ok());
        let e = config("registry:8081").validate().unwrap_err();
        assert!(e.contains("http://"), "{e}");
        assert!(config(" , ").validate().unwrap_err().contains("empty"));
        let mut c = config("https://a:8081");
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = c.validate().unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let garbage = std::env::temp_dir().join(format!("rtinval-ca-{}.pem", std::process::id()));
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        c.ca_file = Some(garbage.display().to_string());
        let e = c.validate().unwrap_err();
        std::fs::remove_file(&garbage).ok();
        assert!(e.contains("PEM"), "{e}");
    }

    #[test]
    fn the_password_is_redacted() {
        let r = config("http://a:8081").redacted();
        assert_eq!(r.password.as_deref(), Some("***"));
        assert_eq!(r.username.as_deref(), Some("u"));
    }

    #[test]
    fn payloads_are_told_apart_by_their_first_byte() {
        assert!(is_avro(&[0, 0, 0, 0, 1, 2]));
        assert!(!is_avro(b"{\"schema_version\":1}"));
        assert!(!is_avro(b""));
    }

    #[test]
    fn an_unknown_body_kind_from_a_newer_writer_is_reported_by_name() {
        // A writer schema with one more body kind at the end of the union.
        let mut json: serde_json::Value = serde_json::from_str(AVRO_SCHEMA).unwrap();
        let body = json["fields"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|f| f["name"] == "body")
            .unwrap();
        body["type"].as_array_mut().unwrap().push(serde_json::json!(
            {"type": "record", "name": "Rebalance", "fields": [{"name": "pools", "type": {"type": "array", "items": "string"}}]}
        ));
        let writer = Schema::parse_str(&json.to_string()).unwrap();
        let event = Event {
            schema_version: SCHEMA_VERSION,
            id: "1:f:4:0".into(),
            source: Source::default(),
            emitted_at: 1,
            body: EventBody::Resync { reason: "x".into() },
        };
        let Value::Record(mut fields) = to_value(&event) else {
            panic!("a record")
        };
        let body = fields.iter_mut().find(|(n, _)| n == "body").unwrap();
        body.1 = Value::Union(
            5,
            Box::new(Value::Record(vec![(
                "pools".into(),
                Value::Array(vec![Value::String("p".into())]),
            )])),
        );
        let datum = apache_avro::to_avro_datum(&writer, Value::Record(fields)).unwrap();
        let err = from_datum(&datum, &writer).unwrap_err().to_string();
        assert!(
            err.contains("Rebalance") && err.contains("upgrade"),
            "{err}"
        );
        // The current kinds still decode with that writer schema.
        let ok = apache_avro::to_avro_datum(&writer, to_value(&event)).unwrap();
        assert_eq!(from_datum(&ok, &writer).unwrap(), event);
    }
}
