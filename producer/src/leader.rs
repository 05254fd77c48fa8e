//! Leader election: one producer per checkpoint key streams; the others wait.
//!
//! The lock is a named lock on the source server (`GET_LOCK`), held by a dedicated connection:
//! the server releases it when that connection dies, so a killed or partitioned leader loses
//! it without any cooperation, and a standby's `GET_LOCK` returns within a second. The holder
//! pings its connection every second; if the ping fails the lock may already belong to someone
//! else, so the stage fails and the whole pipeline stops (a supervisor restarts it as a
//! standby). A new leader loads the checkpoint only after it holds the lock.

use std::time::Duration;

use mysql_async::Conn;
use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::error::SourceError;

/// A held leader lock.
pub struct LeaderLock {
    conn: Conn,
    name: String,
}

/// The lock name for a checkpoint key (server limit: 64 characters).
pub fn lock_name(checkpoint_key: &str, topic_prefix: &str) -> String {
    let name = format!("rtinval-producer:{topic_prefix}:{checkpoint_key}");
    name.chars().take(64).collect()
}

impl LeaderLock {
    /// Wait until this process holds the lock (or shutdown: `Ok(None)`).
    pub async fn acquire(
        url: &str,
        name: &str,
        shutdown: &CancellationToken,
    ) -> Result<Option<LeaderLock>, SourceError> {
        let mut conn = crate::server::connect(url).await?;
        let mut waiting_logged = false;
        loop {
            let got: Option<Option<i64>> =
                conn.exec_first("SELECT GET_LOCK(?, 1)", (name,)).await?;
            if got.flatten() == Some(1) {
                info!(lock = %name, "Leader lock acquired: this producer streams.");
                return Ok(Some(LeaderLock {
                    conn,
                    name: name.to_owned(),
                }));
            }
            if !waiting_logged {
                info!(lock = %name, "Another producer holds the leader lock; standing by.");
                waiting_logged = true;
            }
            if shutdown.is_cancelled() {
                return Ok(None);
            }
        }
    }

    /// Keep the lock until shutdown; fails if the lock connection breaks.
    pub async fn hold(mut self, shutdown: CancellationToken) -> Result<(), SourceError> {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = self.conn.exec_drop("SELECT RELEASE_LOCK(?)", (&self.name,)).await;
                    let _ = self.conn.disconnect().await;
                    return Ok(());
                }
                _ = tick.tick() => {
                    let ping = tokio::time::timeout(Duration::from_secs(5), self.conn.ping()).await;
                    if !matches!(ping, Ok(Ok(()))) {
                        warn!(lock = %self.name, "Lost the leader lock connection; stopping.");
                        return Err(SourceError::LostLeadership { lock: self.name.clone() });
                    }
                }
            }
        }
    }
}
