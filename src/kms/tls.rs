//! TLS for KMS connections: rustls with the *ring* provider, the Mozilla roots
//! (`webpki-roots`) plus any `tlsCAFile`, and a client certificate when `tlsCertificateKeyFile`
//! is given (KMIP requires one; MongoDB's drivers take the same two options per provider).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};
use zeroize::Zeroizing;

use super::TlsOptions;
use crate::error::{Error, Result};

/// A rustls client configuration for one provider's connections.
///
/// # Errors
/// [`Error::Io`]/[`Error::KeyFormat`] when a file named by `tls` cannot be read or holds no
/// certificate (or no private key), naming the file, never its contents.
pub(crate) fn client_config(tls: &TlsOptions) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &tls.ca_file {
        let pem = read(ca)?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|_| bad_file(ca, "a PEM certificate"))?;
            roots
                .add(cert)
                .map_err(|_| bad_file(ca, "a CA certificate rustls accepts"))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad_file(ca, "a PEM certificate"));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::KeyFormat(format!("TLS configuration: {e}")))?
        .with_root_certificates(roots);
    let config = match &tls.certificate_key_file {
        None => builder.with_no_client_auth(),
        Some(file) => {
            let pem = read(file)?;
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| bad_file(file, "PEM certificates"))?;
            if chain.is_empty() {
                return Err(bad_file(file, "a PEM client certificate"));
            }
            let key = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|_| bad_file(file, "a PEM private key"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|_| bad_file(file, "a private key matching its certificate"))?
        }
    };
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    std::fs::read(path).map(Zeroizing::new).map_err(|e| {
        Error::Io(std::io::Error::new(
            e.kind(),
            format!("{}: {e}", path.display()),
        ))
    })
}

fn bad_file(path: &Path, what: &str) -> Error {
    Error::KeyFormat(format!("{} does not hold {what}", path.display()))
}
