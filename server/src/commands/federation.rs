//! `tessera-server federation create|list|show|update|delete|refresh`: federation
//! relationships through the admin API. File flags are read here (bounded) and sent as their
//! contents, so the server stores what the operator saw.

use std::io::Read as _;
use std::path::Path;

use anyhow::{anyhow, bail};
use serde::Serialize;
use tessera_wire::tessera::admin::v1 as pb;

use super::output::{Done, Print, rfc3339};
use super::{AdminClient, io_message};
use crate::cli::{FederationCommand, FederationFields, FederationProfile};

/// Largest file a flag may name.
const MAX_FILE_LEN: u64 = 1024 * 1024;

pub(super) async fn run(command: FederationCommand) -> anyhow::Result<()> {
    match command {
        FederationCommand::Create { fields, admin } => {
            let request = pb::CreateFederationRelationshipRequest { relationship: Some(relationship(fields)?) };
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(client.inner.clone().create_federation_relationship(request).await)?;
            one(response.relationship)?.print(admin.output)
        }
        FederationCommand::Update { fields, admin } => {
            let request = pb::UpdateFederationRelationshipRequest { relationship: Some(relationship(fields)?) };
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(client.inner.clone().update_federation_relationship(request).await)?;
            one(response.relationship)?.print(admin.output)
        }
        FederationCommand::List { admin } => {
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(
                client.inner.clone().list_federation_relationships(pb::ListFederationRelationshipsRequest {}).await,
            )?;
            RelationshipList { relationships: response.relationships.iter().map(RelationshipOutput::from).collect() }
                .print(admin.output)
        }
        FederationCommand::Show { trust_domain, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::GetFederationRelationshipRequest { trust_domain };
            let response = client.call(client.inner.clone().get_federation_relationship(request).await)?;
            one(response.relationship)?.print(admin.output)
        }
        FederationCommand::Delete { trust_domain, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::DeleteFederationRelationshipRequest { trust_domain: trust_domain.clone() };
            client.call(client.inner.clone().delete_federation_relationship(request).await)?;
            Done { action: "deleted", id: trust_domain }.print(admin.output)
        }
        FederationCommand::Refresh { trust_domain, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::RefreshFederationRelationshipRequest { trust_domain };
            let response = client.call(client.inner.clone().refresh_federation_relationship(request).await)?;
            one(response.relationship)?.print(admin.output)
        }
    }
}

fn one(relationship: Option<pb::FederationRelationship>) -> anyhow::Result<RelationshipOutput> {
    relationship
        .as_ref()
        .map(RelationshipOutput::from)
        .ok_or_else(|| anyhow!("the server answered without the relationship"))
}

fn read_file(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let describe = |err: std::io::Error| anyhow!("cannot read {flag} {}: {}", path.display(), io_message(&err));
    let file = std::fs::File::open(path).map_err(describe)?;
    let mut data = Vec::new();
    file.take(MAX_FILE_LEN + 1).read_to_end(&mut data).map_err(describe)?;
    if data.len() as u64 > MAX_FILE_LEN {
        bail!("{flag} {} is larger than {MAX_FILE_LEN} bytes", path.display());
    }
    if data.iter().all(u8::is_ascii_whitespace) {
        bail!("{flag} {} is empty", path.display());
    }
    Ok(data)
}

fn relationship(fields: FederationFields) -> anyhow::Result<pb::FederationRelationship> {
    let trust_bundle = match &fields.trust_bundle_path {
        Some(path) => read_file("--trust-bundle-path", path)?,
        None => Vec::new(),
    };
    let ca_bundle = match &fields.ca_bundle_path {
        Some(path) => read_file("--ca-bundle-path", path)?,
        None => Vec::new(),
    };
    Ok(pb::FederationRelationship {
        trust_domain: fields.trust_domain,
        bundle_endpoint_url: fields.bundle_endpoint_url,
        profile: match fields.profile {
            FederationProfile::HttpsWeb => "https_web",
            FederationProfile::HttpsSpiffe => "https_spiffe",
        }
        .to_owned(),
        endpoint_spiffe_id: fields.endpoint_spiffe_id.unwrap_or_default(),
        trust_bundle,
        ca_bundle,
        ..Default::default()
    })
}

/// One relationship as printed.
#[derive(Debug, Serialize)]
struct RelationshipOutput {
    trust_domain: String,
    bundle_endpoint_url: String,
    profile: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    endpoint_spiffe_id: Option<String>,
    /// `config` or `api`.
    source: String,
    /// 0 when no bundle is stored yet.
    bundle_sequence: u64,
    last_success: Option<String>,
    last_error: Option<String>,
    next_refresh: Option<String>,
}

impl From<&pb::FederationRelationship> for RelationshipOutput {
    fn from(proto: &pb::FederationRelationship) -> Self {
        let time = |unix: i64| if unix == 0 { None } else { rfc3339(unix) };
        Self {
            trust_domain: proto.trust_domain.clone(),
            bundle_endpoint_url: proto.bundle_endpoint_url.clone(),
            profile: proto.profile.clone(),
            endpoint_spiffe_id: (!proto.endpoint_spiffe_id.is_empty()).then(|| proto.endpoint_spiffe_id.clone()),
            source: proto.source.clone(),
            bundle_sequence: proto.bundle_sequence,
            last_success: time(proto.last_success),
            last_error: (!proto.last_error.is_empty()).then(|| proto.last_error.clone()),
            next_refresh: time(proto.next_refresh),
        }
    }
}

impl Print for RelationshipOutput {
    fn human(&self) -> String {
        let mut text = format!(
            "Trust domain       : {}\nBundle endpoint URL: {}\nProfile            : {}\n",
            self.trust_domain, self.bundle_endpoint_url, self.profile
        );
        if let Some(id) = &self.endpoint_spiffe_id {
            text.push_str(&format!("Endpoint SPIFFE ID : {id}\n"));
        }
        text.push_str(&format!("Source             : {}\n", self.source));
        let sequence = if self.bundle_sequence == 0 { "none".to_owned() } else { self.bundle_sequence.to_string() };
        text.push_str(&format!("Bundle sequence    : {sequence}\n"));
        text.push_str(&format!("Last success       : {}\n", self.last_success.as_deref().unwrap_or("never")));
        if let Some(error) = &self.last_error {
            text.push_str(&format!("Last error         : {error}\n"));
        }
        if let Some(next) = &self.next_refresh {
            text.push_str(&format!("Next refresh       : {next}\n"));
        }
        text
    }
}

#[derive(Debug, Serialize)]
struct RelationshipList {
    relationships: Vec<RelationshipOutput>,
}

impl Print for RelationshipList {
    fn human(&self) -> String {
        let count = self.relationships.len();
        let mut text = format!("Found {count} federation relationship{}\n", if count == 1 { "" } else { "s" });
        for relationship in &self.relationships {
            text.push('\n');
            text.push_str(&relationship.human());
        }
        text
    }
}
