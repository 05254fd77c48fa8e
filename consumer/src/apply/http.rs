//! The `http` pool reloader's client: one HTTP/1.1 request to a local reload endpoint
//! (`http://host:port/path`), success on a 2xx status. Plain HTTP only: reload endpoints live on
//! the node itself; a TLS client is not worth its weight here.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The URL is parsed with the config (a malformed one is a config error).
pub use crate::config::HttpTarget;

impl HttpTarget {
    /// Send `method` with an empty body; `Ok` on a 2xx status.
    pub async fn call(&self, method: &str, timeout: Duration) -> Result<(), String> {
        let (status, _) = self.request(method, timeout).await?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    }

    /// Send `method` with an empty body; the status and the body (read to its
    /// `Content-Length`, or to the end of the connection).
    pub async fn request(&self, method: &str, timeout: Duration) -> Result<(u16, String), String> {
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
            let mut data = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            let header_end = loop {
                if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed before a complete response head".to_owned());
                }
                data.extend_from_slice(&buf[..n]);
            };
            let head = String::from_utf8_lossy(&data[..header_end]).into_owned();
            let status: u16 = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| {
                    format!(
                        "not an HTTP response: {:?}",
                        head.lines().next().unwrap_or("")
                    )
                })?;
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())
                    .flatten()
            });
            let mut body = data[header_end..].to_vec();
            while length.is_none_or(|n| body.len() < n) {
                let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&buf[..n]);
            }
            Ok((status, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
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
