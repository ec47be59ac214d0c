//! tls: the TLS client settings shared by the IMAP watchers and the cluster's database
//! connections: rustls (ring) with the web PKI roots plus an optional extra CA file.

use std::io;
use std::path::{Path, PathBuf};

/// An extra CA file (`ca_file`) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("ca_file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ca_file {}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
    #[error("ca_file {}: no PEM certificate in it", .0.display())]
    Empty(PathBuf),
}

/// A rustls client config trusting the public roots and, when given, the CA certificates in
/// `ca_file`.
pub fn tls_config(ca_file: Option<&Path>) -> Result<tokio_rustls::rustls::ClientConfig, CaFileError> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let read = |source| CaFileError::Read { path: path.to_path_buf(), source };
        let pem = std::fs::read(path).map_err(read)?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(read)?;
            roots.add(cert).map_err(|source| CaFileError::Certificate { path: path.to_path_buf(), source })?;
            added += 1;
        }
        if added == 0 {
            return Err(CaFileError::Empty(path.to_path_buf()));
        }
    }
    Ok(tokio_rustls::rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}
