//! A minimal memcached text-protocol connection: the commands the fill protocol needs (`gets`,
//! `add`, `cas`, `set`), nothing else. One request at a time; any error drops the connection
//! and the next call reconnects.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::ClientError;

/// A stored item as `gets` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub value: Vec<u8>,
    pub cas: u64,
}

/// How a conditional store went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreResult {
    Stored,
    /// `add` found the key present, `cas` found it changed or gone.
    NotStored,
}

/// One memcached server at `host:port`.
pub struct Memcached {
    addr: String,
    conn: Mutex<Option<BufReader<TcpStream>>>,
}

impl std::fmt::Debug for Memcached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memcached")
            .field("addr", &self.addr)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> ClientError {
    ClientError::Memcached(e.to_string())
}

impl Memcached {
    /// `addr`: `host:port`, optionally as `memcached://host:port` or `tcp://host:port`.
    pub fn new(addr: &str) -> Memcached {
        let addr = addr
            .strip_prefix("memcached://")
            .or_else(|| addr.strip_prefix("tcp://"))
            .unwrap_or(addr);
        Memcached {
            addr: addr.to_owned(),
            conn: Mutex::new(None),
        }
    }

    /// Send `request` and read the answer with `read`, on a connection opened if needed.
    async fn call<T>(
        &self,
        request: &[u8],
        read: impl AsyncFnOnce(&mut BufReader<TcpStream>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let stream = TcpStream::connect(&self.addr).await.map_err(err)?;
            stream.set_nodelay(true).map_err(err)?;
            *guard = Some(BufReader::new(stream));
        }
        let Some(conn) = guard.as_mut() else {
            return Err(err("no connection"));
        };
        let result = async {
            conn.get_mut().write_all(request).await.map_err(err)?;
            read(conn).await
        }
        .await;
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// `gets` of several keys: the items found, in the order asked.
    pub async fn gets(&self, keys: &[&[u8]]) -> Result<Vec<Option<Item>>, ClientError> {
        let mut req = b"gets".to_vec();
        for k in keys {
            check_key(k)?;
            req.push(b' ');
            req.extend_from_slice(k);
        }
        req.extend_from_slice(b"\r\n");
        let found = self
            .call(&req, async |conn| {
                let mut found = Vec::new();
                loop {
                    let line = read_line(conn).await?;
                    if line == "END" {
                        return Ok(found);
                    }
                    let f: Vec<&str> = line.split(' ').collect();
                    let ["VALUE", key, _flags, bytes, cas] = f.as_slice() else {
                        return Err(err(format!("unexpected reply to gets: {line:?}")));
                    };
                    let bytes: usize = bytes.parse().map_err(err)?;
                    let cas: u64 = cas.parse().map_err(err)?;
                    let mut value = vec![0; bytes + 2];
                    conn.read_exact(&mut value).await.map_err(err)?;
                    value.truncate(bytes);
                    found.push((key.as_bytes().to_vec(), Item { value, cas }));
                }
            })
            .await?;
        Ok(keys
            .iter()
            .map(|k| {
                found
                    .iter()
                    .find(|(fk, _)| fk.as_slice() == *k)
                    .map(|(_, i)| i.clone())
            })
            .collect())
    }

    /// `add`, `cas` (with `cas: Some`) or `set` (`always`).
    async fn store(
        &self,
        verb: &str,
        key: &[u8],
        value: &[u8],
        ttl_secs: u32,
        cas: Option<u64>,
    ) -> Result<StoreResult, ClientError> {
        check_key(key)?;
        let mut req = Vec::with_capacity(key.len() + value.len() + 64);
        req.extend_from_slice(verb.as_bytes());
        req.push(b' ');
        req.extend_from_slice(key);
        req.extend_from_slice(format!(" 0 {ttl_secs} {}", value.len()).as_bytes());
        if let Some(cas) = cas {
            req.extend_from_slice(format!(" {cas}").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n");
        self.call(&req, async |conn| match read_line(conn).await?.as_str() {
            "STORED" => Ok(StoreResult::Stored),
            "NOT_STORED" | "EXISTS" | "NOT_FOUND" => Ok(StoreResult::NotStored),
            other => Err(err(format!("unexpected reply to {verb}: {other:?}"))),
        })
        .await
    }

    /// Store only if the key holds nothing.
    pub async fn add(
        &self,
        key: &[u8],
        value: &[u8],
        ttl_secs: u32,
    ) -> Result<StoreResult, ClientError> {
        self.store("add", key, value, ttl_secs, None).await
    }

    /// Store only if the key is unchanged since the `gets` that returned `cas`.
    pub async fn cas(
        &self,
        key: &[u8],
        value: &[u8],
        ttl_secs: u32,
        cas: u64,
    ) -> Result<StoreResult, ClientError> {
        self.store("cas", key, value, ttl_secs, Some(cas)).await
    }

    /// Store unconditionally.
    pub async fn set(&self, key: &[u8], value: &[u8], ttl_secs: u32) -> Result<(), ClientError> {
        self.store("set", key, value, ttl_secs, None)
            .await
            .map(|_| ())
    }
}

/// One reply line without its `\r\n`; server errors become errors.
async fn read_line(conn: &mut BufReader<TcpStream>) -> Result<String, ClientError> {
    let mut line = String::new();
    if conn.read_line(&mut line).await.map_err(err)? == 0 {
        return Err(err("connection closed"));
    }
    let line = line.trim_end_matches(['\r', '\n']).to_owned();
    if line == "ERROR" || line.starts_with("CLIENT_ERROR") || line.starts_with("SERVER_ERROR") {
        return Err(err(format!("memcached answered {line:?}")));
    }
    Ok(line)
}

/// memcached keys: 1 to 250 bytes, no spaces or control characters.
fn check_key(key: &[u8]) -> Result<(), ClientError> {
    if key.is_empty() || key.len() > 250 || key.iter().any(|b| *b <= b' ' || *b == 0x7f) {
        return Err(ClientError::BadKey(
            String::from_utf8_lossy(key).into_owned(),
        ));
    }
    Ok(())
}
