//! What the `api` subcommands print (text, or JSON with `--output json`) and write
//! (`--write DIR`). The JSON field names are part of the CLI contract for scripts: add fields,
//! never rename them.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, anyhow};
use ring::rand::SystemRandom;
use serde::Serialize;
use serde_json::Value as Json;
use tessera_spiffe::bundle::{encode_pem_certificates, split_der_certificates};
use tessera_spiffe::x509::X509Svid;
use tessera_wire::workload as pb;

use crate::cli::OutputFormat;

/// Prints one line on stdout.
pub(super) fn print_line(text: &str) -> anyhow::Result<()> {
    write_stdout(&format!("{text}\n"))
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()).context("cannot write to stdout")
}

/// Printing as text or JSON.
pub(super) trait Print: Serialize {
    /// The human-readable form, ending with a newline.
    fn human(&self) -> String;

    /// Prints on stdout in `format`.
    fn print(&self, format: OutputFormat) -> anyhow::Result<()> {
        let text = match format {
            OutputFormat::Json => {
                let mut json = serde_json::to_string_pretty(self).context("cannot encode the output as JSON")?;
                json.push('\n');
                json
            }
            OutputFormat::Human => self.human(),
        };
        write_stdout(&text)
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Concatenated DER certificates as PEM.
fn der_to_pem(der: &[u8], what: &str) -> anyhow::Result<(String, usize)> {
    let certificates = split_der_certificates(der).map_err(|err| anyhow!("the agent sent an invalid {what}: {err}"))?;
    Ok((encode_pem_certificates(certificates.iter().copied()), certificates.len()))
}

/// `api fetch x509` and each message of `api watch`.
#[derive(Debug, Serialize)]
pub(super) struct X509Output {
    svids: Vec<SvidOutput>,
    /// `spiffe://<td>` -> PEM CA certificates.
    federated_bundles: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
struct SvidOutput {
    spiffe_id: String,
    hint: String,
    expires_at: String,
    /// The certificate chain, leaf first, PEM.
    x509_svid: String,
    /// The private key, PKCS#8 PEM.
    x509_svid_key: String,
    /// The CA certificates of the SVID's trust domain, PEM.
    bundle: String,
    #[serde(skip)]
    chain_len: usize,
    #[serde(skip)]
    bundle_len: usize,
}

impl X509Output {
    /// Checks each SVID as a SPIFFE client would (chain shape, SPIFFE ID, key matches leaf).
    pub(super) fn from_response(response: &pb::X509svidResponse) -> anyhow::Result<Self> {
        if response.svids.is_empty() {
            return Err(anyhow!("the agent sent a response without any X.509-SVID"));
        }
        let rng = SystemRandom::new();
        let mut svids = Vec::with_capacity(response.svids.len());
        for svid in &response.svids {
            let parsed = X509Svid::parse(&svid.x509_svid, &svid.x509_svid_key, &rng)
                .map_err(|err| anyhow!("the agent sent an invalid X.509-SVID for {:?}: {err}", svid.spiffe_id))?;
            if parsed.spiffe_id().as_str() != svid.spiffe_id {
                return Err(anyhow!(
                    "the agent sent an X.509-SVID for {} labelled {:?}",
                    parsed.spiffe_id(),
                    svid.spiffe_id
                ));
            }
            let (bundle, bundle_len) = der_to_pem(&svid.bundle, "trust bundle")?;
            let key = pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone());
            svids.push(SvidOutput {
                spiffe_id: svid.spiffe_id.clone(),
                hint: svid.hint.clone(),
                expires_at: rfc3339(parsed.not_after()),
                x509_svid: encode_pem_certificates(parsed.chain().iter().map(Vec::as_slice)),
                x509_svid_key: pem::encode(&key),
                bundle,
                chain_len: parsed.chain().len(),
                bundle_len,
            });
        }
        let mut federated_bundles = BTreeMap::new();
        for (trust_domain, der) in &response.federated_bundles {
            let (pem, _) = der_to_pem(der, "federated bundle")?;
            federated_bundles.insert(trust_domain.clone(), pem);
        }
        Ok(Self { svids, federated_bundles })
    }

    /// One line per update, for `api watch`.
    pub(super) fn print_update(&self) -> anyhow::Result<()> {
        let ids: Vec<&str> = self.svids.iter().map(|svid| svid.spiffe_id.as_str()).collect();
        let federated: Vec<&str> = self.federated_bundles.keys().map(String::as_str).collect();
        print_line(&format!(
            "{} received {} X.509-SVID(s): {}; federated bundles: [{}]",
            rfc3339(SystemTime::now()),
            ids.len(),
            ids.join(", "),
            federated.join(", ")
        ))
    }

    /// `--write DIR`: `svid.<n>.pem` (chain), `svid.<n>.key` (mode 0600), `bundle.<n>.pem` per
    /// SVID, and `federated_bundle.<n>.pem` per federated trust domain (sorted by name).
    pub(super) fn write_files(&self, dir: &Path, format: OutputFormat) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        let mut written = Vec::new();
        for (n, svid) in self.svids.iter().enumerate() {
            written.push(write_file(&dir.join(format!("svid.{n}.pem")), svid.x509_svid.as_bytes(), 0o644)?);
            written.push(write_file(&dir.join(format!("svid.{n}.key")), svid.x509_svid_key.as_bytes(), 0o600)?);
            written.push(write_file(&dir.join(format!("bundle.{n}.pem")), svid.bundle.as_bytes(), 0o644)?);
        }
        for (n, pem) in self.federated_bundles.values().enumerate() {
            written.push(write_file(&dir.join(format!("federated_bundle.{n}.pem")), pem.as_bytes(), 0o644)?);
        }
        if format == OutputFormat::Human {
            for path in written {
                print_line(&format!("Wrote {}", path.display()))?;
            }
        }
        Ok(())
    }
}

/// Writes through a temporary file created with `mode` and renamed into place, so the file
/// never exists with a wider mode or half written.
pub(crate) fn write_file(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<PathBuf> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let context = || format!("cannot write {}", path.display());
    match std::fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(context),
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&temporary).with_context(context)?;
    file.write_all(content).and_then(|()| file.sync_all()).with_context(context)?;
    std::fs::rename(&temporary, path).with_context(context)?;
    Ok(path.to_owned())
}

impl Print for X509Output {
    fn human(&self) -> String {
        let mut text = format!("Received {} X.509-SVID(s)\n", self.svids.len());
        for svid in &self.svids {
            text.push('\n');
            text.push_str(&format!("SPIFFE ID:      {}\n", svid.spiffe_id));
            if !svid.hint.is_empty() {
                text.push_str(&format!("Hint:           {}\n", svid.hint));
            }
            text.push_str(&format!("Valid until:    {}\n", svid.expires_at));
            text.push_str(&format!("Certificates:   {} (leaf first)\n", svid.chain_len));
            text.push_str(&format!("Bundle:         {} CA certificate(s)\n", svid.bundle_len));
        }
        if !self.federated_bundles.is_empty() {
            let names: Vec<&str> = self.federated_bundles.keys().map(String::as_str).collect();
            text.push_str(&format!("\nFederated bundles: {}\n", names.join(", ")));
        }
        text
    }
}

/// `api fetch jwt`.
#[derive(Debug, Serialize)]
pub(super) struct JwtOutput {
    svids: Vec<JwtSvidOutput>,
}

#[derive(Debug, Serialize)]
struct JwtSvidOutput {
    spiffe_id: String,
    hint: String,
    token: String,
}

impl JwtOutput {
    pub(super) fn from_response(response: pb::JwtsvidResponse) -> Self {
        let svids = response
            .svids
            .into_iter()
            .map(|svid| JwtSvidOutput { spiffe_id: svid.spiffe_id, hint: svid.hint, token: svid.svid })
            .collect();
        Self { svids }
    }
}

impl Print for JwtOutput {
    fn human(&self) -> String {
        self.svids.iter().map(|svid| format!("token({}):\n\t{}\n", svid.spiffe_id, svid.token)).collect()
    }
}

/// `api fetch bundles`.
#[derive(Debug, Serialize)]
pub(super) struct BundlesOutput {
    /// `spiffe://<td>` -> PEM CA certificates.
    x509_bundles: BTreeMap<String, String>,
    /// `spiffe://<td>` -> JWKS document.
    jwt_bundles: BTreeMap<String, Json>,
}

impl BundlesOutput {
    pub(super) fn from_responses(x509: &pb::X509BundlesResponse, jwt: &pb::JwtBundlesResponse) -> anyhow::Result<Self> {
        let mut x509_bundles = BTreeMap::new();
        for (trust_domain, der) in &x509.bundles {
            x509_bundles.insert(trust_domain.clone(), der_to_pem(der, "X.509 bundle")?.0);
        }
        let mut jwt_bundles = BTreeMap::new();
        for (trust_domain, jwks) in &jwt.bundles {
            let document: Json = serde_json::from_slice(jwks)
                .map_err(|err| anyhow!("the agent sent an invalid JWT bundle for {trust_domain}: {err}"))?;
            jwt_bundles.insert(trust_domain.clone(), document);
        }
        Ok(Self { x509_bundles, jwt_bundles })
    }
}

impl Print for BundlesOutput {
    fn human(&self) -> String {
        let mut text = String::new();
        for (trust_domain, pem) in &self.x509_bundles {
            text.push_str(&format!("X.509 bundle of {trust_domain}:\n{pem}"));
            if pem.is_empty() {
                text.push_str("(no CA certificates)\n");
            }
            text.push('\n');
        }
        for (trust_domain, jwks) in &self.jwt_bundles {
            let pretty = serde_json::to_string_pretty(jwks).unwrap_or_else(|_| jwks.to_string());
            text.push_str(&format!("JWT bundle of {trust_domain}:\n{pretty}\n\n"));
        }
        text
    }
}

/// `api validate jwt`.
#[derive(Debug, Serialize)]
pub(super) struct ValidationOutput {
    spiffe_id: String,
    claims: Json,
}

impl ValidationOutput {
    pub(super) fn from_response(response: pb::ValidateJwtsvidResponse) -> Self {
        let claims = response.claims.map(struct_to_json).unwrap_or(Json::Null);
        Self { spiffe_id: response.spiffe_id, claims }
    }
}

impl Print for ValidationOutput {
    fn human(&self) -> String {
        format!("SVID is valid.\nSPIFFE ID: {}\nClaims:    {}\n", self.spiffe_id, self.claims)
    }
}

fn struct_to_json(fields: prost_types::Struct) -> Json {
    Json::Object(fields.fields.into_iter().map(|(k, v)| (k, value_to_json(v))).collect())
}

fn value_to_json(value: prost_types::Value) -> Json {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(b),
        // Whole numbers (exp, iat) print as integers.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => Json::from(n as i64),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s),
        Some(Kind::ListValue(list)) => Json::Array(list.values.into_iter().map(value_to_json).collect()),
        Some(Kind::StructValue(fields)) => struct_to_json(fields),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_print_whole_numbers_as_integers() {
        use prost_types::value::Kind;
        let mut fields = BTreeMap::new();
        fields.insert("exp".to_owned(), prost_types::Value { kind: Some(Kind::NumberValue(1_700_000_000.0)) });
        fields.insert("x".to_owned(), prost_types::Value { kind: Some(Kind::NumberValue(0.5)) });
        let json = struct_to_json(prost_types::Struct { fields });
        assert_eq!(json.to_string(), r#"{"exp":1700000000,"x":0.5}"#);
    }

    #[test]
    fn written_files_replace_old_ones_with_the_requested_mode() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svid.0.key");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        write_file(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
