//! A **stand-in** for a Confluent-compatible Schema Registry, for tests only.
//!
//! No Confluent-compatible registry server can be installed on the project's machines, so the
//! Avro tests run this instead: an HTTP server in the test process implementing the REST
//! endpoints `schema_registry_converter` calls, with the registry's semantics for them — one
//! id per distinct schema, versions per subject, the registry's error bodies (`error_code`,
//! `message`), optional basic authentication. It does not check compatibility between versions
//! (the project checks that itself, in `schemas/tests/avro_evolution.rs`).
//!
//! Endpoints: `POST /subjects/{subject}/versions` (register), `GET /schemas/ids/{id}`,
//! `GET /subjects/{subject}/versions/latest`, `GET /subjects`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

#[derive(Default)]
struct Registry {
    /// Schema text by id (ids start at 1).
    schemas: Vec<String>,
    /// Schema ids by subject, in version order.
    subjects: BTreeMap<String, Vec<u32>>,
    /// Expected `Authorization` header, if authentication is on.
    auth: Option<String>,
    /// Requests refused for missing or wrong credentials.
    refused: usize,
}

type Shared = Arc<Mutex<Registry>>;

/// A running stand-in registry; stops when dropped.
pub struct RegistryStandIn {
    /// Base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    state: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/vnd.schemaregistry.v1+json")],
        body.to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, code: u32, message: &str) -> Response {
    reply(
        status,
        serde_json::json!({"error_code": code, "message": message}),
    )
}

/// False (and counted) when authentication is on and the request lacks the credentials.
fn authorized(state: &Shared, headers: &HeaderMap) -> bool {
    let mut r = state.lock().unwrap_or_else(|p| p.into_inner());
    let Some(expected) = r.auth.clone() else {
        return true;
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given != expected {
        r.refused += 1;
    }
    given == expected
}

fn unauthorized() -> Response {
    error(StatusCode::UNAUTHORIZED, 40101, "Unauthorized")
}

async fn register(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let Some(schema) = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["schema"].as_str().map(str::to_owned))
    else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, 42201, "Invalid schema");
    };
    let mut r = state.lock().unwrap_or_else(|p| p.into_inner());
    let id = match r.schemas.iter().position(|s| *s == schema) {
        Some(i) => i as u32 + 1,
        None => {
            r.schemas.push(schema);
            r.schemas.len() as u32
        }
    };
    let versions = r.subjects.entry(subject).or_default();
    if !versions.contains(&id) {
        versions.push(id);
    }
    reply(StatusCode::OK, serde_json::json!({ "id": id }))
}

async fn by_id(State(state): State<Shared>, Path(id): Path<u32>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let r = state.lock().unwrap_or_else(|p| p.into_inner());
    match id.checked_sub(1).and_then(|i| r.schemas.get(i as usize)) {
        Some(schema) => reply(StatusCode::OK, serde_json::json!({ "schema": schema })),
        None => error(StatusCode::NOT_FOUND, 40403, "Schema not found"),
    }
}

async fn latest(
    State(state): State<Shared>,
    Path(subject): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let r = state.lock().unwrap_or_else(|p| p.into_inner());
    let Some(versions) = r.subjects.get(&subject) else {
        return error(StatusCode::NOT_FOUND, 40401, "Subject not found");
    };
    let (Some(&id), version) = (versions.last(), versions.len()) else {
        return error(StatusCode::NOT_FOUND, 40402, "Version not found");
    };
    reply(
        StatusCode::OK,
        serde_json::json!({
            "subject": subject,
            "version": version,
            "id": id,
            "schema": r.schemas[id as usize - 1],
        }),
    )
}

async fn subjects(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let r = state.lock().unwrap_or_else(|p| p.into_inner());
    let names: Vec<&String> = r.subjects.keys().collect();
    reply(StatusCode::OK, serde_json::json!(names))
}

/// Standard base64 (RFC 4648, with padding), for the basic authentication header.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl RegistryStandIn {
    /// Start on a free loopback port, without authentication.
    pub fn start() -> RegistryStandIn {
        RegistryStandIn::start_inner(None)
    }

    /// Start requiring HTTP basic authentication with these credentials.
    pub fn start_with_basic_auth(user: &str, password: &str) -> RegistryStandIn {
        let header = format!("Basic {}", base64(format!("{user}:{password}").as_bytes()));
        RegistryStandIn::start_inner(Some(header))
    }

    fn start_inner(auth: Option<String>) -> RegistryStandIn {
        let state: Shared = Arc::new(Mutex::new(Registry {
            auth,
            ..Registry::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        listener.set_nonblocking(true).expect("non-blocking");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let app = Router::new()
            .route("/subjects", get(subjects))
            .route("/subjects/{subject}/versions", post(register))
            .route("/subjects/{subject}/versions/latest", get(latest))
            .route("/schemas/ids/{id}", get(by_id))
            .with_state(state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // A thread and runtime of its own: usable from sync and async tests alike.
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        RegistryStandIn {
            url,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Subjects with their schema ids, in version order.
    pub fn subjects(&self) -> BTreeMap<String, Vec<u32>> {
        self.lock().subjects.clone()
    }

    /// Schema text of `id`.
    pub fn schema(&self, id: u32) -> Option<String> {
        self.lock()
            .schemas
            .get(id.checked_sub(1)? as usize)
            .cloned()
    }

    /// Requests refused for missing or wrong credentials.
    pub fn refused(&self) -> usize {
        self.lock().refused
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for RegistryStandIn {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }
}
