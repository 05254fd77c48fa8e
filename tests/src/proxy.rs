//! A TCP proxy on loopback for the tests: the cache the consumer talks to can go away and come
//! back as the same server (an outage), or as another server (a failover), without the
//! consumer's configured address changing — as a virtual IP or DNS name does in production.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Forwards `127.0.0.1:<port>` to a target that can be switched or removed.
pub struct TcpProxy {
    pub port: u16,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

#[derive(Default)]
struct Shared {
    target: Mutex<Option<SocketAddr>>,
    open: Mutex<Vec<AbortHandle>>,
}

impl TcpProxy {
    /// Start forwarding to `127.0.0.1:target_port`, on a thread and runtime of its own (so a
    /// test that blocks its own runtime does not stall the proxy).
    pub fn start(target_port: u16) -> TcpProxy {
        let shared = Arc::new(Shared::default());
        shared.set(Some(target_port));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("proxy addr").port();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener).expect("proxy listener");
                tokio::select! {
                    _ = stopped => {}
                    _ = accept(listener, s.clone()) => {}
                }
                s.cut();
            });
        });
        TcpProxy {
            port,
            shared,
            stop: Some(stop),
        }
    }

    /// Forward new connections to `127.0.0.1:port`, or refuse them (`None`: accepted and closed
    /// at once). Every open connection is cut either way.
    pub fn set_target(&self, port: Option<u16>) {
        self.shared.set(port);
        self.shared.cut();
    }
}

impl Shared {
    fn set(&self, port: Option<u16>) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) =
            port.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
    }

    fn cut(&self) {
        for h in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            h.abort();
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((mut down, _)) = listener.accept().await {
        let Some(target) = *shared.target.lock().unwrap_or_else(|e| e.into_inner()) else {
            continue; // dropped: closed at once
        };
        let task = tokio::spawn(async move {
            if let Ok(mut up) = TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
        });
        let mut open = shared.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|h| !h.is_finished());
        open.push(task.abort_handle());
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
