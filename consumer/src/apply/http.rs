//! The `http` pool reloader's client, and the `wait` command's: one request to a local
//! endpoint (`http://host:port/path`), success on a 2xx status. Sent with reqwest, which the
//! consumer links anyway (the Schema Registry client and rtinval-client use it): one client per
//! process, connections kept alive, proxies from the environment ignored (the endpoints live
//! on the node itself). Plain HTTP only: the URL is checked with the config.

use std::sync::OnceLock;
use std::time::Duration;

use rtinval_schemas::runtime::chain;

/// The URL is parsed with the config (a malformed one is a config error).
pub use crate::config::HttpTarget;

/// The process's client.
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    let c = reqwest::Client::builder()
        .user_agent("rtinval-consumer")
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", chain(&e)))?;
    Ok(CLIENT.get_or_init(|| c))
}

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

    /// Send `method` with an empty body; the status and the body.
    pub async fn request(&self, method: &str, timeout: Duration) -> Result<(u16, String), String> {
        let m = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("{method:?} is not an HTTP method"))?;
        let run = async {
            let response = client()?
                .request(m, self.to_string())
                .header(reqwest::header::CONTENT_LENGTH, "0")
                .send()
                .await
                .map_err(|e| chain(&e))?;
            let status = response.status().as_u16();
            let body = response.text().await.map_err(|e| chain(&e))?;
            Ok((status, body))
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
