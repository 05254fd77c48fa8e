//! The `http` pool reloader's client: one HTTP/1.1 request to a local reload endpoint
//! (`http://host:port/path`), success on a 2xx status. Plain HTTP only: reload endpoints live on
//! the node itself; a TLS client is not worth its weight here.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A parsed `http://host:port/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    host: String,
    port: u16,
    path: String,
}

impl std::fmt::Display for HttpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.path)
    }
}

impl HttpTarget {
    pub fn parse(url: &str) -> Result<HttpTarget, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("{url:?} must start with http:// (https is not supported for reload endpoints)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() || host.contains('@') {
            return Err(format!("{url:?}: needs a host (and no credentials)"));
        }
        Ok(HttpTarget {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// Send `method` with an empty body; `Ok` on a 2xx status.
    pub async fn call(&self, method: &str, timeout: Duration) -> Result<(), String> {
        let run = async {
            let mut s = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| e.to_string())?;
            let req = format!(
                "{method} {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: rtinval-consumer\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.path, self.host, self.port
            );
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut head = Vec::with_capacity(256);
            let mut buf = [0u8; 256];
            while !head.windows(2).any(|w| w == b"\r\n") {
                let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed before a status line".to_owned());
                }
                head.extend_from_slice(&buf[..n]);
            }
            let line = String::from_utf8_lossy(&head);
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| {
                    format!(
                        "not an HTTP response: {:?}",
                        line.lines().next().unwrap_or("")
                    )
                })?;
            if (200..300).contains(&status) {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            HttpTarget::parse("http://127.0.0.1:8080/reload").unwrap(),
            HttpTarget {
                host: "127.0.0.1".into(),
                port: 8080,
                path: "/reload".into()
            }
        );
        assert_eq!(
            HttpTarget::parse("http://localhost").unwrap().to_string(),
            "http://localhost:80/"
        );
        assert!(
            HttpTarget::parse("https://x/")
                .unwrap_err()
                .contains("https")
        );
        assert!(HttpTarget::parse("http://:1/").is_err());
        assert!(HttpTarget::parse("http://h:x/").is_err());
    }

    #[tokio::test]
    async fn status_decides_success() {
        for (status, ok) in [
            ("204 No Content", true),
            ("500 Internal Server Error", false),
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap();
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                String::from_utf8_lossy(&buf[..n]).into_owned()
            });
            let t = HttpTarget::parse(&format!("http://127.0.0.1:{port}/reload")).unwrap();
            assert_eq!(
                t.call("POST", Duration::from_secs(5)).await.is_ok(),
                ok,
                "{status}"
            );
            assert!(
                server
                    .await
                    .unwrap()
                    .starts_with("POST /reload HTTP/1.1\r\n")
            );
        }
    }
}
