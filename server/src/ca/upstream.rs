//! The "disk" upstream authority: an operator-supplied CA certificate and key that sign the
//! server's intermediate CA.

use std::fs;
use std::path::Path;

use tessera_spiffe::x509::X509Issuer;

use super::CaError;
use crate::config::UpstreamAuthorityConfig;

/// Largest upstream PEM file accepted, in bytes.
const MAX_PEM_LEN: u64 = 1024 * 1024;

/// The loaded upstream authority.
pub(super) struct Upstream {
    /// The upstream CA (first certificate of `cert_file`) with its key.
    pub(super) issuer: X509Issuer,
    /// Certificates served after the server's intermediate: those of `cert_file` that are not
    /// roots of the bundle, in file order.
    pub(super) chain: Vec<Vec<u8>>,
    /// The roots published in the trust bundle.
    pub(super) roots: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

fn upstream_error(path: &Path, reason: impl Into<String>) -> CaError {
    CaError::Upstream { path: path.to_path_buf(), reason: reason.into() }
}

fn read_pem(path: &Path) -> Result<Vec<pem::Pem>, CaError> {
    let meta = fs::metadata(path).map_err(|e| upstream_error(path, format!("cannot read: {e}")))?;
    if meta.len() > MAX_PEM_LEN {
        return Err(upstream_error(path, format!("larger than {MAX_PEM_LEN} bytes")));
    }
    let bytes = fs::read(path).map_err(|e| upstream_error(path, format!("cannot read: {e}")))?;
    pem::parse_many(&bytes).map_err(|e| upstream_error(path, format!("not PEM: {e}")))
}

fn certificates(path: &Path) -> Result<Vec<Vec<u8>>, CaError> {
    let certs: Vec<Vec<u8>> =
        read_pem(path)?.into_iter().filter(|p| p.tag() == "CERTIFICATE").map(pem::Pem::into_contents).collect();
    if certs.is_empty() {
        return Err(upstream_error(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Loads `cert_file`, `key_file` and `bundle_file` of the upstream authority.
pub(super) fn load(config: &UpstreamAuthorityConfig) -> Result<Upstream, CaError> {
    let certs = certificates(&config.cert_file)?;
    let key_blocks = read_pem(&config.key_file)?;
    let key = match key_blocks.iter().find(|p| p.tag().ends_with("PRIVATE KEY")) {
        Some(p) if p.tag() == "PRIVATE KEY" => p.contents().to_vec(),
        Some(p) => {
            return Err(upstream_error(
                &config.key_file,
                format!(
                    "{} blocks are not supported; convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt`",
                    p.tag()
                ),
            ));
        }
        None => return Err(upstream_error(&config.key_file, "no PRIVATE KEY block")),
    };
    let mut certs = certs.into_iter();
    let Some(first) = certs.next() else {
        return Err(upstream_error(&config.cert_file, "no CERTIFICATE block"));
    };
    let rest: Vec<Vec<u8>> = certs.collect();
    let issuer = X509Issuer::from_pkcs8_der(first.clone(), &key).map_err(|e| {
        upstream_error(
            &config.key_file,
            format!("cannot sign with it and the certificate of {}: {e}", config.cert_file.display()),
        )
    })?;
    let (roots, chain) = match &config.bundle_file {
        None => (vec![first], rest),
        Some(bundle_file) => {
            let roots = certificates(bundle_file)?;
            let chain = std::iter::once(first).chain(rest).filter(|c| !roots.contains(c)).collect();
            (roots, chain)
        }
    };
    Ok(Upstream { issuer, chain, roots })
}
