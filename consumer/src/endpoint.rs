//! The consumer's HTTP endpoint: `/metrics`, `/healthz`, `/readyz` ([`crate::metrics`]) and
//! `/wait` ([`crate::barrier`]), on a thread and runtime of its own.

use crate::barrier::Barrier;
use crate::metrics::Metrics;

/// The HTTP endpoint running on a thread of its own (see [`serve_on_thread`]).
pub struct HttpThread {
    stop: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
    listen: String,
}

impl HttpThread {
    /// Stop serving (requests in flight are finished) and wait for the thread.
    pub fn stop(self) -> Result<(), crate::error::ConsumerError> {
        self.stop.cancel();
        match self.thread.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(crate::error::ConsumerError::Http {
                listen: self.listen,
                error,
            }),
            Err(_) => Err(crate::error::ConsumerError::Http {
                listen: self.listen,
                error: std::io::Error::other("the HTTP thread panicked"),
            }),
        }
    }
}

/// Bind `listen` now (an address in use is an error at once) and serve `/metrics`, `/healthz`,
/// `/readyz` and `/wait` on a thread and runtime of their own, so nothing the consumer waits on
/// (a blocking Kafka call at start, a cache that does not answer) can stall them.
pub fn serve_on_thread(
    listen: &str,
    metrics: Metrics,
    barrier: Barrier,
) -> Result<HttpThread, crate::error::ConsumerError> {
    let err = |error: std::io::Error| crate::error::ConsumerError::Http {
        listen: listen.to_owned(),
        error,
    };
    let listener = std::net::TcpListener::bind(listen).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let sd = stop.clone();
    let thread = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                serve(listener, metrics, Some(barrier), sd).await
            })
        })
        .map_err(err)?;
    Ok(HttpThread {
        stop,
        thread,
        listen: listen.to_owned(),
    })
}

/// Serve `/metrics`, `/healthz`, `/readyz` and (with a barrier) `/wait` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    barrier: Option<Barrier>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let mut app = rtinval_schemas::http::router(metrics);
    if let Some(barrier) = barrier {
        app = app.route(
            "/wait",
            get(move |uri: axum::http::Uri| {
                let barrier = barrier.clone();
                async move {
                    let (status, body) = crate::barrier::http_wait(&barrier, uri.query()).await;
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        body,
                    )
                }
            }),
        );
    }
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
