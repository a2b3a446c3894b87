//! One KMIP request over mutual TLS: connect, send the TTLV request, read one TTLV response,
//! with the provider's retry policy.
//!
//! KMIP has no HTTP: a request and its response are TTLV messages on a TLS connection (KMIP
//! 1.0 §10.1, port 5696). Each request gets its own connection, as libmongocrypt's drivers do.
//! A failed connection (refused, reset, timed out) is tried again with backoff up to the policy's
//! attempts; a request that may have reached the server is tried again only if sending it twice
//! does no harm ([`Operation::idempotent`](super::message::Operation::idempotent)). TLS
//! failures (an untrusted server, a refused client certificate) are permanent and reported at
//! once.

use core::fmt;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

use super::message::Request;
use super::ttlv;
use crate::kms::RetryPolicy;

/// KMIP's registered port.
pub(crate) const DEFAULT_PORT: u16 = 5696;

/// The largest response read (libmongocrypt's limit is the same order): every response
/// fieldcrypt asks for is a few hundred bytes.
const MAX_RESPONSE_LEN: usize = 1 << 20;

/// A KMIP server's address: `host` or `host:port` (port 5696 by default), as MongoDB's drivers
/// take it in `kmsProviders.kmip.endpoint` and `masterKey.endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`.
    ///
    /// # Errors
    /// A message saying what is wrong (a scheme, a path, an empty host, a bad port).
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        if s.contains("://") || s.contains('/') {
            return Err(format!(
                "endpoint {s:?} must be host or host:port (no scheme, no path)"
            ));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("endpoint {s:?}: unclosed '['"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(p.strip_prefix(':').ok_or_else(|| {
                        format!("endpoint {s:?}: expected ':' and a port after ']'")
                    })?),
                ),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => {
                    return Err(format!(
                        "endpoint {s:?}: write an IPv6 address as [addr]:port"
                    ))
                }
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("endpoint {s:?}: no valid host"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("endpoint {s:?}: port must be 1 to 65535"))?,
        };
        ServerName::try_from(host.to_owned())
            .map_err(|_| format!("endpoint {s:?}: {host:?} is not a DNS name or an IP address"))?;
        Ok(Endpoint {
            host: host.to_owned(),
            port,
        })
    }

    /// Whether both name the same host (case-insensitively) and port.
    pub(crate) fn same_server(&self, other: &Endpoint) -> bool {
        self.port == other.port && self.host.eq_ignore_ascii_case(&other.host)
    }

    fn server_name(&self) -> Option<ServerName<'static>> {
        ServerName::try_from(self.host.clone()).ok()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a request got no response. The message names the endpoint and what failed, never the
/// request's bytes.
#[derive(Debug)]
pub(crate) struct TransportError {
    pub(crate) message: String,
    /// TLS refused: a certificate the client does not trust, or one the server refuses.
    pub(crate) tls: bool,
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// How one attempt failed.
enum Failure {
    /// Before the request was sent: connection refused or timed out. Always worth retrying.
    Connect(String),
    /// TLS refused by either side: retrying cannot help.
    Tls(String),
    /// After (part of) the request was sent: retried only for idempotent operations.
    Exchange(String),
    /// A response that is not a KMIP message: permanent.
    Framing(String),
}

/// Sends `request` to `endpoint` and returns the response's bytes (wiped on drop: a Get or
/// Decrypt response holds key material).
///
/// # Errors
/// [`TransportError`] after the last attempt, or at once for TLS and framing failures.
pub(crate) async fn send(
    endpoint: &Endpoint,
    tls: &Arc<rustls::ClientConfig>,
    retry: &RetryPolicy,
    request: &Request,
) -> Result<Zeroizing<Vec<u8>>, TransportError> {
    let attempts = retry.attempts.max(1);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut sent = false;
        let outcome = tokio::time::timeout(
            retry.timeout,
            exchange(endpoint, tls, &request.bytes, &mut sent),
        )
        .await
        .unwrap_or_else(|_| {
            let what = format!("no answer within {:?}", retry.timeout);
            Err(if sent {
                Failure::Exchange(what)
            } else {
                Failure::Connect(what)
            })
        });
        let (retryable, why) = match outcome {
            Ok(response) => return Ok(response),
            Err(Failure::Connect(why)) => (true, why),
            Err(Failure::Exchange(why)) => (request.operation.idempotent(), why),
            Err(Failure::Tls(why)) => {
                return Err(TransportError {
                    message: format!(
                        "TLS with KMIP server {endpoint} failed during {}: {why}",
                        request.operation
                    ),
                    tls: true,
                });
            }
            Err(Failure::Framing(why)) => {
                return Err(TransportError {
                    message: format!(
                        "KMIP server {endpoint} sent no KMIP response to {}: {why}",
                        request.operation
                    ),
                    tls: false,
                })
            }
        };
        if !retryable || attempt >= attempts {
            let tries = if attempt == 1 {
                "1 attempt".to_owned()
            } else {
                format!("{attempt} attempts")
            };
            return Err(TransportError {
                message: format!(
                    "KMIP {} to {endpoint} failed after {tries}: {why}",
                    request.operation
                ),
                tls: false,
            });
        }
        tokio::time::sleep(retry.backoff(attempt)).await;
    }
}

/// Whether an I/O error is TLS refusing (a certificate, an alert), not the network failing.
fn tls_refusal(e: &std::io::Error) -> Option<String> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .map(ToString::to_string)
}

async fn exchange(
    endpoint: &Endpoint,
    tls: &Arc<rustls::ClientConfig>,
    request: &[u8],
    sent: &mut bool,
) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|e| Failure::Connect(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name = endpoint
        .server_name()
        .ok_or_else(|| Failure::Tls("not a valid server name".into()))?;
    let mut stream = TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| match tls_refusal(&e) {
            Some(why) => Failure::Tls(why),
            None => Failure::Connect(format!("TLS handshake interrupted: {e}")),
        })?;
    let io = |e: std::io::Error| match tls_refusal(&e) {
        // With TLS 1.3 a refused client certificate shows on the first read.
        Some(why) => Failure::Tls(why),
        None => Failure::Exchange(e.to_string()),
    };
    *sent = true;
    stream.write_all(request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut header = [0u8; ttlv::HEADER_LEN];
    stream.read_exact(&mut header).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Failure::Exchange("the server closed the connection without a response".into())
        } else {
            io(e)
        }
    })?;
    let total = match ttlv::message_len(&header) {
        Some((ttlv::tag::RESPONSE_MESSAGE, total)) if total <= MAX_RESPONSE_LEN => total,
        Some((ttlv::tag::RESPONSE_MESSAGE, total)) => {
            return Err(Failure::Framing(format!(
                "a response of {total} bytes (more than {MAX_RESPONSE_LEN})"
            )))
        }
        _ => return Err(Failure::Framing("not a Response Message".into())),
    };
    // Allocated once at its final size, so no copy of key material is left behind by growth.
    let mut response = Zeroizing::new(vec![0u8; total]);
    response[..ttlv::HEADER_LEN].copy_from_slice(&header);
    stream
        .read_exact(&mut response[ttlv::HEADER_LEN..])
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Failure::Framing("the response ends before its declared length".into())
            }
            _ => io(e),
        })?;
    // close_notify, so the server logs a clean end of session; its failure changes nothing.
    let _ = stream.shutdown().await;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn endpoints() {
        for (s, want) in [
            ("kms.example.com", "kms.example.com:5696"),
            ("kms.example.com:9999", "kms.example.com:9999"),
            ("127.0.0.1:5696", "127.0.0.1:5696"),
            ("localhost", "localhost:5696"),
            ("[::1]:7000", "[::1]:7000"),
            ("[::1]", "[::1]:5696"),
        ] {
            assert_eq!(Endpoint::parse(s).unwrap().to_string(), want, "{s}");
        }
        for bad in [
            "",
            ":5696",
            "https://kms.example.com",
            "kms.example.com/path",
            "kms.example.com:0",
            "kms.example.com:70000",
            "kms.example.com:x",
            "::1",
            "[::1",
            "[::1]x",
            "a b:1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap() {
        let p = RetryPolicy {
            attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
        };
        for (attempt, lo, hi) in [
            (1, 50, 100),
            (2, 100, 200),
            (4, 400, 800),
            (5, 500, 1000),
            (30, 500, 1000),
        ] {
            for _ in 0..200 {
                let d = p.backoff(attempt).as_millis();
                assert!((lo..=hi).contains(&d), "{attempt}: {d}");
            }
        }
    }
}
