//! The probes both binaries serve on their HTTP listener: `/metrics` (OpenMetrics text),
//! `/healthz` (the process answers) and `/readyz` (200, or 503 with the reason). The consumer
//! adds `/wait` to the same router.

use axum::http::StatusCode;
use axum::routing::get;

/// What the probes read: the metrics as text, and why the process is not ready (if it isn't).
pub trait Probes: Clone + Send + Sync + 'static {
    fn encode(&self) -> String;
    fn not_ready_reason(&self) -> Option<String>;
}

/// `/metrics`, `/healthz` and `/readyz` over `probes`.
pub fn router<P: Probes>(probes: P) -> axum::Router {
    let ready = probes.clone();
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = probes.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let reason = ready.not_ready_reason();
                async move {
                    match reason {
                        None => (StatusCode::OK, "ready\n".to_owned()),
                        Some(r) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")),
                    }
                }
            }),
        )
}
