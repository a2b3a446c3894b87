//! The HTTPS client every REST KMS provider uses: one connection pool per provider, rustls,
//! bounded retries with backoff, and one place that turns transport failures into
//! [`Error::Kms`] without credentials (requests carry them in headers, which no error prints).

use core::fmt;
use std::time::Duration;

use zeroize::Zeroizing;

use super::{kms_error, ProviderContext, RetryPolicy};
use crate::error::{Error, Result};

/// A response, for the provider to interpret.
pub(crate) struct HttpResponse {
    /// The HTTP status.
    pub status: u16,
    /// The body (a few hundred bytes of JSON for every KMS used here), wiped on drop: a
    /// decrypt's answer holds a data key, a token endpoint's a token.
    pub body: Zeroizing<Vec<u8>>,
}

impl HttpResponse {
    /// Whether the status is 2xx.
    pub(crate) fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl fmt::Debug for HttpResponse {
    /// The status and size only: a body may hold key material (a decrypt's plaintext).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpResponse")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Whether a response is worth trying again: request timeout, throttling, and the server
/// errors a load balancer or an overloaded KMS returns.
pub(crate) fn transient_status(r: &HttpResponse) -> bool {
    matches!(r.status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// An HTTPS client for one KMS provider.
pub(crate) struct HttpClient {
    provider: String,
    client: reqwest::Client,
    retry: RetryPolicy,
}

impl HttpClient {
    /// A client with the provider's TLS options and retry policy.
    ///
    /// # Errors
    /// As [`super::tls::client_config`]; [`Error::Kms`] if the HTTP client cannot be built.
    pub(crate) fn new(ctx: &ProviderContext<'_>) -> Result<Self> {
        let tls = super::tls::client_config(ctx.tls)?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .timeout(ctx.retry.timeout)
            .connect_timeout(ctx.retry.timeout.min(Duration::from_secs(10)))
            // A KMS never redirects; following one could send a signed request elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|_| Error::Kms {
                provider: ctx.name.to_owned(),
                reason: "cannot build the HTTPS client".to_owned(),
            })?;
        Ok(Self {
            provider: ctx.name.to_owned(),
            client,
            retry: ctx.retry.clone(),
        })
    }

    /// The provider this client talks for.
    pub(crate) fn provider(&self) -> &str {
        &self.provider
    }

    /// Sends the request `build` makes, retrying transient failures (see
    /// [`HttpClient::send_with`]) with the default classification, [`transient_status`].
    ///
    /// # Errors
    /// As [`HttpClient::send_with`].
    pub(crate) async fn send(
        &self,
        key_id: &str,
        build: &(dyn Fn(&reqwest::Client) -> Result<reqwest::Request> + Sync),
    ) -> Result<HttpResponse> {
        self.send_with(key_id, build, &transient_status).await
    }

    /// Sends the request `build` makes — called again for every attempt, so that signatures
    /// and dates are fresh — and retries connection failures, timeouts and responses that
    /// `retryable` accepts, with exponential backoff and jitter, up to the policy's attempts.
    /// Returns the last response (a retryable one too, once attempts run out) for the provider to
    /// interpret.
    ///
    /// # Errors
    /// [`Error::Kms`] naming the provider, `key_id` and the URL's host when no response came
    /// (cannot connect, timed out); errors of `build`.
    pub(crate) async fn send_with(
        &self,
        key_id: &str,
        build: &(dyn Fn(&reqwest::Client) -> Result<reqwest::Request> + Sync),
        retryable: &(dyn Fn(&HttpResponse) -> bool + Sync),
    ) -> Result<HttpResponse> {
        let attempts = self.retry.attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request = build(&self.client)?;
            let target = origin(request.url());
            let last = attempt >= attempts;
            match self.client.execute(request).await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    match response.bytes().await {
                        Ok(body) => {
                            let r = HttpResponse {
                                status,
                                body: Zeroizing::new(body.to_vec()),
                            };
                            if last || !retryable(&r) {
                                return Ok(r);
                            }
                            tracing::warn!(provider = %self.provider, key = key_id, status, attempt, "KMS: transient failure, retrying");
                        }
                        Err(e) if last => {
                            return Err(self.transport(key_id, &target, &e, attempt));
                        }
                        Err(_) => {}
                    }
                }
                Err(e) if last => return Err(self.transport(key_id, &target, &e, attempt)),
                Err(e) => {
                    tracing::warn!(provider = %self.provider, key = key_id, attempt, error = %describe(&e), "KMS: request failed, retrying");
                }
            }
            tokio::time::sleep(self.retry.backoff(attempt)).await;
        }
    }

    fn transport(&self, key_id: &str, target: &str, e: &reqwest::Error, attempts: u32) -> Error {
        kms_error(
            &self.provider,
            key_id,
            format_args!(
                "{} {target} ({attempts} attempt{})",
                describe(e),
                if attempts == 1 { "" } else { "s" }
            ),
        )
    }
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("provider", &self.provider)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

/// What went wrong, without the URL (which [`HttpClient::transport`] prints as its origin).
fn describe(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out waiting for"
    } else if e.is_connect() {
        "cannot connect to"
    } else if e.is_body() || e.is_decode() {
        "incomplete response from"
    } else {
        "request failed to"
    }
}

/// `scheme://host:port` of a URL: never its path or query.
pub(crate) fn origin(url: &reqwest::Url) -> String {
    match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{}://{h}:{p}", url.scheme()),
        (Some(h), None) => format!("{}://{h}", url.scheme()),
        _ => url.scheme().to_owned(),
    }
}

/// Parses an endpoint URL for a provider: `https://` always; `http://` only for a loopback
/// host (127.0.0.1, ::1, localhost) — local KMS servers for tests and development (moto,
/// OpenBao's dev server) and local proxies. A bare `host[:port]`, as libmongocrypt's
/// `endpoint` fields hold, means `https://host[:port]`.
///
/// # Errors
/// [`Error::KeyFormat`] for a URL that does not parse, another scheme, or plain HTTP to a
/// host that is not loopback.
pub(crate) fn endpoint_url(provider: &str, endpoint: &str) -> Result<reqwest::Url> {
    let text = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("https://{endpoint}")
    };
    let url = reqwest::Url::parse(&text).map_err(|_| {
        Error::KeyFormat(format!(
            "KMS {provider}: endpoint {endpoint:?} is not a URL"
        ))
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::KeyFormat(format!(
            "KMS {provider}: an endpoint must not hold credentials"
        )));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(Error::KeyFormat(format!(
            "KMS {provider}: endpoint {} uses plain HTTP to a host that is not loopback; use https://",
            origin(&url)
        ))),
        other => Err(Error::KeyFormat(format!(
            "KMS {provider}: endpoint scheme {other:?} is not https"
        ))),
    }
}

fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_need_https_but_for_loopback() {
        for ok in [
            "kms.us-east-1.amazonaws.com",
            "https://kms.eu-west-1.amazonaws.com:443",
            "http://127.0.0.1:4566",
            "http://localhost:8200",
            "http://[::1]:8200",
        ] {
            assert!(endpoint_url("aws", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://kms.us-east-1.amazonaws.com",
            "http://10.0.0.1:8200",
            "ftp://127.0.0.1",
            "https://user:pass@vault.example",
            "https://",
        ] {
            let e = endpoint_url("aws", bad).unwrap_err();
            assert!(!e.to_string().contains("pass"), "{e}");
        }
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let p = RetryPolicy {
            attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            timeout: Duration::from_secs(1),
        };
        for (attempt, full) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)] {
            let d = p.backoff(attempt).as_millis();
            assert!((full / 2..=full).contains(&d), "attempt {attempt}: {d} ms");
        }
        assert!(p.backoff(u32::MAX) <= Duration::from_millis(1000));
    }
}
