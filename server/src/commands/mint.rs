//! `tessera-server x509 mint` and `tessera-server jwt mint`.
//!
//! `x509 mint` generates an EC P-256 key here and sends only a CSR: the private key never
//! crosses the admin socket. With `--write DIR` it writes `svid.pem` (leaf then
//! intermediates), `key.pem` (PKCS#8, mode 0600) and `bundle.pem` (the trust domain's X.509
//! authorities); without, it prints the three PEM documents.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use serde::Serialize;
use tessera_spiffe::bundle::encode_pem_certificates;
use tessera_wire::tessera::admin::v1 as pb;

use super::output::{Print, rfc3339};
use super::{AdminClient, io_message, ttl_flag};
use crate::admin::bundle_from_proto;
use crate::cli::{AdminArgs, BundleFormat};

/// File names written by `x509 mint --write DIR`.
pub(super) const SVID_FILE: &str = "svid.pem";
pub(super) const KEY_FILE: &str = "key.pem";
pub(super) const BUNDLE_FILE: &str = "bundle.pem";

/// `x509 mint`.
pub(super) async fn x509(
    spiffe_id: String,
    ttl: Option<u64>,
    dns_names: Vec<String>,
    write: Option<PathBuf>,
    admin: &AdminArgs,
) -> anyhow::Result<()> {
    let ttl = ttl_flag("--ttl", ttl)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|err| anyhow!("cannot generate the SVID key: {err}"))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|err| anyhow!("cannot create the certificate signing request: {err}"))?;
    let request = pb::MintX509SvidRequest { spiffe_id: spiffe_id.clone(), ttl, dns_names, csr: csr.der().to_vec() };
    let client = AdminClient::connect(admin).await?;
    let response = client.call(client.inner.clone().mint_x509_svid(request).await)?;
    if response.cert_chain.is_empty() {
        return Err(anyhow!("the server answered without a certificate"));
    }
    let bundle = response.bundle.ok_or_else(|| anyhow!("the server answered without the bundle"))?;
    let bundle = bundle_from_proto(&bundle).map_err(|err| anyhow!("the server sent an unusable bundle: {err}"))?;
    let svid_pem = encode_pem_certificates(response.cert_chain.iter().map(Vec::as_slice));
    let key_pem = key.serialize_pem();
    let bundle_pem = super::bundle::encode(&bundle, BundleFormat::Pem)?;
    let mut output = X509Output {
        spiffe_id,
        expires_at: rfc3339(response.expires_at),
        svid_pem: None,
        key_pem: None,
        bundle_pem: None,
        svid_path: None,
        key_path: None,
        bundle_path: None,
    };
    match write {
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .map_err(|err| anyhow!("cannot create directory {}: {}", dir.display(), io_message(&err)))?;
            let svid_path = dir.join(SVID_FILE);
            let key_path = dir.join(KEY_FILE);
            let bundle_path = dir.join(BUNDLE_FILE);
            // The key first: if it cannot be written, no certificate is left without its key.
            write_file(&key_path, key_pem.as_bytes(), 0o600)?;
            write_file(&svid_path, svid_pem.as_bytes(), 0o644)?;
            write_file(&bundle_path, bundle_pem.as_bytes(), 0o644)?;
            output.svid_path = Some(svid_path);
            output.key_path = Some(key_path);
            output.bundle_path = Some(bundle_path);
        }
        None => {
            output.svid_pem = Some(svid_pem);
            output.key_pem = Some(key_pem);
            output.bundle_pem = Some(bundle_pem);
        }
    }
    output.print(admin.output)
}

/// Writes `data` to `path` with `mode`, replacing any previous file (whose permissions are
/// reset, so an old world-readable `key.pem` does not stay world-readable).
fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let describe = |err: std::io::Error| anyhow!("cannot write {}: {}", path.display(), io_message(&err));
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path).map_err(describe)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(describe)?;
    file.write_all(data).and_then(|()| file.sync_all()).map_err(describe)
}

/// `jwt mint`.
pub(super) async fn jwt(
    spiffe_id: String,
    audiences: Vec<String>,
    ttl: Option<u64>,
    admin: &AdminArgs,
) -> anyhow::Result<()> {
    let request = pb::MintJwtSvidRequest { spiffe_id, audiences, ttl: ttl_flag("--ttl", ttl)? };
    let client = AdminClient::connect(admin).await?;
    let response = client.call(client.inner.clone().mint_jwt_svid(request).await)?;
    JwtOutput { token: response.token, expires_at: rfc3339(response.expires_at) }
        .print(admin.output)
        .context("cannot print the token")
}

/// `x509 mint`: the PEM documents, or where they were written.
#[derive(Debug, Serialize)]
struct X509Output {
    spiffe_id: String,
    /// RFC 3339.
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    svid_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bundle_path: Option<PathBuf>,
}

impl Print for X509Output {
    fn human(&self) -> String {
        let mut text =
            format!("SPIFFE ID: {}\nExpires at: {}\n", self.spiffe_id, self.expires_at.as_deref().unwrap_or("-"));
        let parts = [
            ("X509-SVID", &self.svid_pem, &self.svid_path),
            ("Private key", &self.key_pem, &self.key_path),
            ("Bundle", &self.bundle_pem, &self.bundle_path),
        ];
        for (label, pem, path) in parts {
            if let Some(path) = path {
                text.push_str(&format!("{label} written to {}\n", path.display()));
            }
            if let Some(pem) = pem {
                text.push_str(&format!("\n{label}:\n{pem}"));
            }
        }
        text
    }
}

/// `jwt mint`.
#[derive(Debug, Serialize)]
struct JwtOutput {
    token: String,
    /// RFC 3339.
    expires_at: Option<String>,
}

impl Print for JwtOutput {
    /// The token alone, so `TOKEN=$(tessera-server jwt mint ...)` works.
    fn human(&self) -> String {
        format!("{}\n", self.token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_private_even_when_replacing_an_open_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = write_file(&dir.path().join("no/such/dir/key.pem"), b"x", 0o600).unwrap_err().to_string();
        assert!(err.contains("no/such/dir/key.pem"), "{err}");
    }

    #[test]
    fn x509_text_lists_what_was_written() {
        let out = X509Output {
            spiffe_id: "spiffe://example.org/web".into(),
            expires_at: Some("2030-01-01T00:00:00Z".into()),
            svid_pem: None,
            key_pem: None,
            bundle_pem: None,
            svid_path: Some("d/svid.pem".into()),
            key_path: Some("d/key.pem".into()),
            bundle_path: Some("d/bundle.pem".into()),
        };
        let text = out.human();
        assert!(text.contains("Private key written to d/key.pem\n"), "{text}");
        let json = serde_json::to_value(&out).unwrap();
        assert_eq!(json["key_path"], "d/key.pem");
        assert!(json.get("key_pem").is_none());
    }
}
