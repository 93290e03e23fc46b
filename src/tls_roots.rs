//! What our two TLS clients (the add-on's API, `check --login`) trust: the Mozilla roots built
//! in, and CA certificates from a PEM file.

use std::io;
use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

/// Why a PEM file gave no trust anchors; each caller names its own setting.
#[derive(Debug)]
pub enum PemFileError {
    Unreadable(io::Error),
    Unusable(String),
}

/// The Mozilla roots (webpki-roots): a static binary on a dyno has no dependable system store.
pub fn mozilla() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    roots
}

/// Adds every certificate of the PEM file at `path` to `roots`; returns how many.
pub fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<usize, PemFileError> {
    let pem = std::fs::read(path).map_err(PemFileError::Unreadable)?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| PemFileError::Unusable(e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| PemFileError::Unusable(e.to_string()))?;
        added += 1;
    }
    Ok(added)
}
