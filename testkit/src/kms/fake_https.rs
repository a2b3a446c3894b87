//! A small HTTP/1.1 server on 127.0.0.1 for the fakes of the cloud KMSs that have no local
//! emulator (Azure Key Vault, Google Cloud KMS): TLS with a certificate from a CA made for this
//! run, or plain HTTP for the instance-metadata endpoints (which are plain HTTP in the clouds).
//!
//! The server owns a thread with its own tokio runtime, so it serves whatever runtime (or none)
//! the test uses. One request per connection (`Connection: close`). A [`Handler`] answers each
//! request; the server records every request it got ([`FakeHttps::requests`]) and can be told to
//! answer some of them with an injected status first ([`FakeHttps::inject`]), for the retry and
//! outage tests.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// The most a request's head or body may hold; a larger one is answered 413.
const MAX_REQUEST: usize = 1 << 20;

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path without the query, as sent (not percent-decoded).
    pub path: String,
    /// The query string (after `?`), as sent; empty if none.
    pub query: String,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (any case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The query's parameters, percent-decoded.
    #[must_use]
    pub fn query_pairs(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(self.query.as_bytes())
            .into_owned()
            .collect()
    }

    /// One query parameter, percent-decoded.
    #[must_use]
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The body as `application/x-www-form-urlencoded` fields (decoded), in order.
    #[must_use]
    pub fn form(&self) -> Vec<(String, String)> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }

    /// The bearer token of the `Authorization` header, if there is one.
    #[must_use]
    pub fn bearer(&self) -> Option<&str> {
        let value = self.header("authorization")?;
        let (scheme, token) = value.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then_some(token.trim())
    }
}

/// A response to send.
#[derive(Clone, Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response.
    #[must_use]
    pub fn json(status: u16, value: &serde_json::Value) -> Self {
        Response {
            status,
            content_type: "application/json; charset=utf-8",
            body: value.to_string().into_bytes(),
        }
    }
}

/// Answers the fake's requests. `route` names the kind of request for [`FakeHttps::inject`]
/// (e.g. `"token"`, `"kms"`); `None` when the handler does not know the request (it is then
/// answered 404 by [`Handler::handle`] itself).
pub trait Handler: Send + Sync + 'static {
    /// Which injectable route `request` belongs to.
    fn route(&self, request: &Request) -> Option<&'static str>;
    /// The response to `request`.
    fn handle(&self, request: &Request) -> Response;
}

/// What to do with the next requests of one route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Injection {
    /// Answer the next `n` with this status.
    Times(u16, u32),
    /// Answer all of them with this status.
    Always(u16),
    /// Accept no connections at all (closes them at once), as a server that is down.
    Drop,
}

#[derive(Default)]
struct Shared {
    requests: Vec<(Option<&'static str>, Request)>,
    injections: HashMap<&'static str, Injection>,
    refuse_all: bool,
}

/// A CA made for one run and the server certificate it signed (for `127.0.0.1` and
/// `localhost`), the CA written as PEM to a temporary file for `TlsOptions.ca_file`.
pub struct TestCa {
    dir: tempfile::TempDir,
    ca_pem: String,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl TestCa {
    /// Makes a fresh CA and a server certificate for `127.0.0.1`, `::1` and `localhost`.
    ///
    /// # Errors
    /// Certificate generation or writing the temporary file failed.
    pub fn new() -> io::Result<TestCa> {
        let other = |e: rcgen::Error| io::Error::other(e.to_string());
        let ca_key = rcgen::KeyPair::generate().map_err(other)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(other)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fieldcrypt test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(other)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);

        let server_key = rcgen::KeyPair::generate().map_err(other)?;
        let mut params = rcgen::CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .map_err(other)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fieldcrypt fake KMS");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&server_key, &issuer).map_err(other)?;

        let dir = tempfile::Builder::new()
            .prefix("fieldcrypt-fake-kms-")
            .tempdir()?;
        let ca_pem = ca_cert.pem();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem)?;
        Ok(TestCa {
            dir,
            ca_pem,
            cert: cert.der().clone(),
            key_der: server_key.serialize_der(),
        })
    }

    /// The CA certificate's PEM file: give it to the client as `TlsOptions.ca_file`.
    #[must_use]
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The CA certificate as PEM text.
    #[must_use]
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A directory that lives as long as this CA (for other temporary files of a test).
    #[must_use]
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn server_config(&self) -> io::Result<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .map_err(io::Error::other)
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("ca_file", &self.ca_file())
            .finish_non_exhaustive()
    }
}

/// A running fake server; stops when dropped.
pub struct FakeHttps {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Mutex<Shared>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHttps {
    /// Serves `handler` over TLS with `ca`'s server certificate on a free port of 127.0.0.1.
    ///
    /// # Errors
    /// Binding the port or building the TLS configuration failed.
    pub fn start_tls(ca: &TestCa, handler: Arc<dyn Handler>) -> io::Result<FakeHttps> {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(ca.server_config()?));
        Self::start(Some(acceptor), handler)
    }

    /// Serves `handler` over plain HTTP on a free port of 127.0.0.1 (the clouds' instance
    /// metadata endpoints are plain HTTP).
    ///
    /// # Errors
    /// Binding the port failed.
    pub fn start_plain(handler: Arc<dyn Handler>) -> io::Result<FakeHttps> {
        Self::start(None, handler)
    }

    fn start(
        acceptor: Option<tokio_rustls::TlsAcceptor>,
        handler: Arc<dyn Handler>,
    ) -> io::Result<FakeHttps> {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let tls = acceptor.is_some();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fake-kms-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(std_listener) else {
                        return;
                    };
                    serve(listener, acceptor, handler, thread_shared, stop_rx).await;
                });
            })?;
        Ok(FakeHttps {
            addr,
            tls,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// `127.0.0.1:<port>`: what goes into an `endpoint` field.
    #[must_use]
    pub fn host_and_port(&self) -> String {
        self.addr.to_string()
    }

    /// `https://127.0.0.1:<port>` (or `http://` for a plain server).
    #[must_use]
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every request received so far, in order, with its route.
    #[must_use]
    pub fn requests(&self) -> Vec<(Option<&'static str>, Request)> {
        self.lock().requests.clone()
    }

    /// The requests of one route received so far.
    #[must_use]
    pub fn requests_of(&self, route: &str) -> Vec<Request> {
        self.lock()
            .requests
            .iter()
            .filter(|(r, _)| *r == Some(route))
            .map(|(_, req)| req.clone())
            .collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Answers the next `times` requests of `route` with `status` (and a JSON error body), then
    /// serves normally again.
    pub fn inject(&self, route: &'static str, status: u16, times: u32) {
        self.lock()
            .injections
            .insert(route, Injection::Times(status, times));
    }

    /// Answers every request of `route` with `status` until [`FakeHttps::heal`].
    pub fn inject_always(&self, route: &'static str, status: u16) {
        self.lock()
            .injections
            .insert(route, Injection::Always(status));
    }

    /// Closes every connection of `route` as soon as its request is read, without a response.
    pub fn drop_connections(&self, route: &'static str) {
        self.lock().injections.insert(route, Injection::Drop);
    }

    /// Closes every connection at once, before reading anything (a server that is down).
    pub fn refuse_all(&self, refuse: bool) {
        self.lock().refuse_all = refuse;
    }

    /// Removes every injection.
    pub fn heal(&self) {
        let mut shared = self.lock();
        shared.injections.clear();
        shared.refuse_all = false;
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for FakeHttps {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl fmt::Debug for FakeHttps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeHttps")
            .field("url", &self.base_url())
            .finish_non_exhaustive()
    }
}

async fn serve(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<dyn Handler>,
    shared: Arc<Mutex<Shared>>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        let refuse = shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .refuse_all;
        if refuse {
            drop(tcp);
            continue;
        }
        let handler = handler.clone();
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        connection(stream, &*handler, &shared).await;
                    }
                }
                None => connection(tcp, &*handler, &shared).await,
            }
        });
    }
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    handler: &dyn Handler,
    shared: &Mutex<Shared>,
) {
    let response = match read_request(&mut stream).await {
        Ok(Some(request)) => {
            let route = handler.route(&request);
            let injection = {
                let mut shared = shared
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                shared.requests.push((route, request.clone()));
                route.and_then(|r| take_injection(&mut shared.injections, r))
            };
            match injection {
                Some(Injection::Drop) => return,
                Some(Injection::Times(status, _) | Injection::Always(status)) => Response::json(
                    status,
                    &serde_json::json!({"error": {"code": status, "message": "injected failure"}}),
                ),
                None if route.is_none() => Response::json(
                    404,
                    &serde_json::json!({"error": {"code": 404, "message": "no such resource"}}),
                ),
                None => handler.handle(&request),
            }
        }
        Ok(None) => return,
        Err(status) => Response::json(status, &serde_json::json!({"error": "bad request"})),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    if stream.write_all(head.as_bytes()).await.is_ok()
        && stream.write_all(&response.body).await.is_ok()
    {
        let _ = stream.flush().await;
    }
    let _ = stream.shutdown().await;
}

fn take_injection(
    injections: &mut HashMap<&'static str, Injection>,
    route: &'static str,
) -> Option<Injection> {
    let injection = *injections.get(route)?;
    if let Injection::Times(status, n) = injection {
        if n <= 1 {
            injections.remove(route);
        } else {
            injections.insert(route, Injection::Times(status, n - 1));
        }
    }
    Some(injection)
}

/// Reads one request. `Ok(None)`: the peer closed before sending one. `Err(status)`: malformed.
async fn read_request<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<Request>, u16> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_REQUEST {
            return Err(413);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) if buf.is_empty() => return Ok(None),
            Ok(0) | Err(_) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(400),
    }
    let method = parsed.method.ok_or(400u16)?.to_owned();
    let target = parsed.path.ok_or(400u16)?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), q.to_owned()),
        None => (target.to_owned(), String::new()),
    };
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let content_length = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v.trim().parse::<usize>().map_err(|_| 400u16)?,
        None if headers.iter().any(|(n, _)| n == "transfer-encoding") => {
            // The clients under test send sized bodies; a chunked one is a finding.
            return Err(411);
        }
        None => 0,
    };
    if content_length > MAX_REQUEST {
        return Err(413);
    }
    let mut body = buf[head_len..].to_vec();
    while body.len() < content_length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(400),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(content_length);
    Ok(Some(Request {
        method,
        path,
        query,
        headers,
        body,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
