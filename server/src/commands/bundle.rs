//! `tessera-server bundle show|list|set|delete`.
//!
//! The server sends bundles as structured protobuf messages; this module turns them back into
//! a [`Bundle`] (checking every authority) and prints them as PEM `CERTIFICATE` blocks (X.509
//! authorities only) or as the SPIFFE bundle JSON document, the two encodings `--format` names.

use std::io::Read as _;
use std::path::Path;

use anyhow::{anyhow, bail};
use serde::Serialize;
use tessera_spiffe::bundle::{Bundle, MAX_BUNDLE_JSON_LEN};
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::common::v1 as common;

use super::output::Print;
use super::{AdminClient, io_message};
use crate::admin::bundle_from_proto;
use crate::cli::{BundleCommand, BundleFormat};

pub(super) async fn run(command: BundleCommand) -> anyhow::Result<()> {
    match command {
        BundleCommand::Show { format, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(client.inner.clone().get_bundle(pb::GetBundleRequest {}).await)?;
            let bundle = response.bundle.ok_or_else(|| anyhow!("the server answered without the bundle"))?;
            BundleOutput::new(&bundle, format)?.print(admin.output)
        }
        BundleCommand::List { format, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let response =
                client.call(client.inner.clone().list_federated_bundles(pb::ListFederatedBundlesRequest {}).await)?;
            let bundles =
                response.bundles.iter().map(|bundle| BundleOutput::new(bundle, format)).collect::<Result<_, _>>()?;
            BundleList { bundles }.print(admin.output)
        }
        BundleCommand::Set { id, path, format, admin } => {
            let bundle = read_bundle_file(&path)?;
            let request = pb::SetFederatedBundleRequest {
                trust_domain: id,
                bundle,
                format: match format {
                    BundleFormat::Pem => pb::BundleFormat::Pem,
                    BundleFormat::Spiffe => pb::BundleFormat::Spiffe,
                } as i32,
            };
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(client.inner.clone().set_federated_bundle(request).await)?;
            let stored = response.bundle.ok_or_else(|| anyhow!("the server answered without the bundle"))?;
            BundleSetOutput {
                trust_domain: trust_domain_id(&stored.trust_domain),
                sequence: stored.sequence,
                x509_authorities: stored.x509_authorities.len(),
                jwt_authorities: stored.jwt_authorities.len(),
            }
            .print(admin.output)
        }
        BundleCommand::Delete { id, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::DeleteFederatedBundleRequest { trust_domain: id.clone() };
            client.call(client.inner.clone().delete_federated_bundle(request).await)?;
            super::output::Done { action: "deleted", id }.print(admin.output)
        }
    }
}

/// Reads `--path`, refusing anything larger than a bundle can be (so `/dev/zero` or a wrong
/// multi-gigabyte file fails at once instead of filling memory).
fn read_bundle_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let describe = |err: std::io::Error| anyhow!("cannot read bundle file {}: {}", path.display(), io_message(&err));
    let file = std::fs::File::open(path).map_err(describe)?;
    let limit = u64::try_from(MAX_BUNDLE_JSON_LEN).unwrap_or(u64::MAX);
    let mut data = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut data).map_err(describe)?;
    if data.len() > MAX_BUNDLE_JSON_LEN {
        bail!("bundle file {} is larger than {MAX_BUNDLE_JSON_LEN} bytes", path.display());
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        bail!("bundle file {} is empty", path.display());
    }
    Ok(data)
}

/// `spiffe://<td>` for a bare trust domain name.
fn trust_domain_id(name: &str) -> String {
    format!("spiffe://{name}")
}

/// The bundle in `format`: PEM certificates, or the SPIFFE bundle JSON pretty-printed.
pub(super) fn encode(bundle: &Bundle, format: BundleFormat) -> anyhow::Result<String> {
    match format {
        BundleFormat::Pem => Ok(bundle.x509_authorities_pem()),
        BundleFormat::Spiffe => {
            let value: serde_json::Value = serde_json::from_str(&bundle.to_json())
                .map_err(|err| anyhow!("cannot format the bundle as JSON: {err}"))?;
            let mut text = serde_json::to_string_pretty(&value)
                .map_err(|err| anyhow!("cannot format the bundle as JSON: {err}"))?;
            text.push('\n');
            Ok(text)
        }
    }
}

/// One bundle (`bundle show`, an element of `bundle list`).
#[derive(Debug, Serialize)]
pub(super) struct BundleOutput {
    /// `spiffe://<td>`.
    trust_domain: String,
    sequence: u64,
    /// `pem` or `spiffe`: how `bundle` is encoded.
    format: &'static str,
    /// The bundle in `format`, exactly as the human output prints it.
    bundle: String,
}

impl BundleOutput {
    fn new(proto: &common::Bundle, format: BundleFormat) -> anyhow::Result<Self> {
        let bundle = bundle_from_proto(proto).map_err(|err| {
            anyhow!("the server sent an unusable bundle for trust domain {:?}: {err}", proto.trust_domain)
        })?;
        Ok(Self {
            trust_domain: trust_domain_id(bundle.trust_domain().name()),
            sequence: bundle.sequence(),
            format: match format {
                BundleFormat::Pem => "pem",
                BundleFormat::Spiffe => "spiffe",
            },
            bundle: encode(&bundle, format)?,
        })
    }
}

impl Print for BundleOutput {
    /// Only the bundle itself, so `bundle show > bundle.pem` gives a usable file.
    fn human(&self) -> String {
        self.bundle.clone()
    }
}

/// `bundle list`.
#[derive(Debug, Serialize)]
struct BundleList {
    bundles: Vec<BundleOutput>,
}

impl Print for BundleList {
    fn human(&self) -> String {
        let noun = if self.bundles.len() == 1 { "bundle" } else { "bundles" };
        let mut text = format!("Found {} federated {noun}\n", self.bundles.len());
        for bundle in &self.bundles {
            text.push_str(&format!("\nTrust domain: {}\nSequence: {}\n", bundle.trust_domain, bundle.sequence));
            text.push_str(&bundle.bundle);
        }
        text
    }
}

/// `bundle set`.
#[derive(Debug, Serialize)]
struct BundleSetOutput {
    trust_domain: String,
    sequence: u64,
    x509_authorities: usize,
    jwt_authorities: usize,
}

impl Print for BundleSetOutput {
    fn human(&self) -> String {
        format!(
            "Set bundle of {} (sequence {}): {} X.509 {}, {} JWT {}\n",
            self.trust_domain,
            self.sequence,
            self.x509_authorities,
            if self.x509_authorities == 1 { "authority" } else { "authorities" },
            self.jwt_authorities,
            if self.jwt_authorities == 1 { "authority" } else { "authorities" },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_files_are_checked_before_any_connection() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_bundle_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.pem") && err.contains("No such file"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_bundle_file(&empty).unwrap_err().to_string().contains("is empty"));
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; MAX_BUNDLE_JSON_LEN + 1]).unwrap();
        assert!(read_bundle_file(&big).unwrap_err().to_string().contains("larger than"));
    }

    #[test]
    fn set_output_counts_authorities() {
        let out = BundleSetOutput {
            trust_domain: "spiffe://other.org".into(),
            sequence: 2,
            x509_authorities: 1,
            jwt_authorities: 0,
        };
        assert_eq!(
            out.human(),
            "Set bundle of spiffe://other.org (sequence 2): 1 X.509 authority, 0 JWT authorities\n"
        );
    }
}
