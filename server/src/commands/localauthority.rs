//! `tessera-server localauthority x509|jwt show|prepare|activate|taint|revoke`: forced
//! rotation through the admin API's `ShowLocalAuthorities` and `ChangeLocalAuthority`.

use anyhow::anyhow;
use serde::Serialize;
use tessera_wire::tessera::admin::v1 as pb;

use super::AdminClient;
use super::output::{Print, rfc3339};
use crate::cli::{LocalAuthorityAction, LocalAuthorityCommand};

/// One authority as printed.
#[derive(Debug, Serialize)]
struct AuthorityOutput {
    authority_id: String,
    state: String,
    expires_at: Option<String>,
    created_at: Option<String>,
    tainted: bool,
    upstream: bool,
}

impl From<&pb::LocalAuthority> for AuthorityOutput {
    fn from(a: &pb::LocalAuthority) -> Self {
        Self {
            authority_id: a.authority_id.clone(),
            state: a.state.clone(),
            expires_at: rfc3339(a.expires_at),
            created_at: rfc3339(a.created_at),
            tainted: a.tainted,
            upstream: a.upstream,
        }
    }
}

impl AuthorityOutput {
    fn lines(&self) -> String {
        let mut text = format!("Authority ID: {}\n  State: {}", self.authority_id, self.state);
        if self.tainted {
            text.push_str(" (tainted)");
        }
        text.push('\n');
        if let Some(at) = &self.created_at {
            text.push_str(&format!("  Created at: {at}\n"));
        }
        if let Some(at) = &self.expires_at {
            text.push_str(&format!("  Expires at: {at}\n"));
        }
        if self.upstream {
            text.push_str("  Signed by the upstream authority\n");
        }
        text
    }
}

/// `show`.
#[derive(Debug, Serialize)]
struct AuthorityList {
    kind: &'static str,
    authorities: Vec<AuthorityOutput>,
}

impl Print for AuthorityList {
    fn human(&self) -> String {
        let mut text = format!("{} authorities: {}\n", self.kind, self.authorities.len());
        for a in &self.authorities {
            text.push_str(&a.lines());
        }
        text
    }
}

/// A change.
#[derive(Debug, Serialize)]
struct Changed {
    kind: &'static str,
    action: &'static str,
    authority: AuthorityOutput,
}

impl Print for Changed {
    fn human(&self) -> String {
        format!("{} authority {}.\n{}", self.kind, self.action, self.authority.lines())
    }
}

pub(super) async fn run(command: LocalAuthorityCommand) -> anyhow::Result<()> {
    let (kind, name, action) = match command {
        LocalAuthorityCommand::X509(action) => (pb::LocalAuthorityKind::X509, "X.509", action),
        LocalAuthorityCommand::Jwt(action) => (pb::LocalAuthorityKind::Jwt, "JWT", action),
    };
    let (verb, done, id, admin) = match action {
        LocalAuthorityAction::Show { admin } => {
            let client = AdminClient::connect(&admin).await?;
            let request = pb::ShowLocalAuthoritiesRequest { kind: kind.into() };
            let response = client.call(client.inner.clone().show_local_authorities(request).await)?;
            let authorities = response.authorities.iter().map(AuthorityOutput::from).collect();
            return AuthorityList { kind: name, authorities }.print(admin.output);
        }
        LocalAuthorityAction::Prepare { admin } => {
            (pb::LocalAuthorityAction::Prepare, "prepared", String::new(), admin)
        }
        LocalAuthorityAction::Activate { authority_id, admin } => {
            (pb::LocalAuthorityAction::Activate, "activated", authority_id, admin)
        }
        LocalAuthorityAction::Taint { authority_id, admin } => {
            (pb::LocalAuthorityAction::Taint, "tainted", authority_id, admin)
        }
        LocalAuthorityAction::Revoke { authority_id, admin } => {
            (pb::LocalAuthorityAction::Revoke, "revoked", authority_id, admin)
        }
    };
    if verb != pb::LocalAuthorityAction::Prepare && id.trim().is_empty() {
        return Err(anyhow!("--authority-id: must not be empty"));
    }
    let client = AdminClient::connect(&admin).await?;
    let request = pb::ChangeLocalAuthorityRequest { kind: kind.into(), action: verb.into(), authority_id: id };
    let response = client.call(client.inner.clone().change_local_authority(request).await)?;
    let authority = response.authority.as_ref().ok_or_else(|| anyhow!("the server answered without the authority"))?;
    Changed { kind: name, action: done, authority: AuthorityOutput::from(authority) }.print(admin.output)
}
