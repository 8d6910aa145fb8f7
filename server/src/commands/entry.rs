//! `tessera-server entry create|show|update|delete|count`.

use anyhow::{anyhow, bail};
use tessera_spiffe::Selector;
use tessera_wire::tessera::admin::v1 as pb;
use tessera_wire::tessera::common::v1 as common;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::output::{CountOutput, Done, EntryList, EntryOutput, Print};
use super::{AdminClient, ttl_flag};
use crate::cli::{EntryCommand, EntryFields};

pub(super) async fn run(command: EntryCommand) -> anyhow::Result<()> {
    match command {
        EntryCommand::Create { fields, entry_id, admin } => {
            let entry = create_request(&fields, entry_id)?;
            let client = AdminClient::connect(&admin).await?;
            let response =
                client.call(client.inner.clone().create_entry(pb::CreateEntryRequest { entry: Some(entry) }).await)?;
            let entry = response.entry.ok_or_else(|| anyhow!("the server answered without the entry"))?;
            EntryOutput::from(&entry).print(admin.output)
        }
        EntryCommand::Show { entry_id, spiffe_id, parent_id, selectors, admin } => {
            let client = AdminClient::connect(&admin).await?;
            let entries = match entry_id {
                Some(id) => {
                    let response = client.call(client.inner.clone().get_entry(pb::GetEntryRequest { id }).await)?;
                    response.entry.iter().map(EntryOutput::from).collect()
                }
                None => {
                    let filter = pb::EntryFilter {
                        spiffe_id: spiffe_id.unwrap_or_default(),
                        parent_id: parent_id.unwrap_or_default(),
                        selectors: if selectors.is_empty() {
                            None
                        } else {
                            Some(pb::SelectorMatch {
                                selectors: parse_selectors(&selectors)?,
                                mode: pb::SelectorMatchMode::Superset as i32,
                            })
                        },
                    };
                    list(&client, filter).await?
                }
            };
            EntryList { entries }.print(admin.output)
        }
        EntryCommand::Update { entry_id, fields, admin } => {
            let (entry, mask) = update_request(entry_id, &fields)?;
            let client = AdminClient::connect(&admin).await?;
            let request = pb::UpdateEntryRequest { entry: Some(entry), mask: Some(mask) };
            let response = client.call(client.inner.clone().update_entry(request).await)?;
            let entry = response.entry.ok_or_else(|| anyhow!("the server answered without the entry"))?;
            EntryOutput::from(&entry).print(admin.output)
        }
        EntryCommand::Delete { entry_id, admin } => {
            let client = AdminClient::connect(&admin).await?;
            client.call(client.inner.clone().delete_entry(pb::DeleteEntryRequest { id: entry_id.clone() }).await)?;
            Done { action: "deleted", id: entry_id }.print(admin.output)
        }
        EntryCommand::Count { admin } => {
            let client = AdminClient::connect(&admin).await?;
            let response = client.call(client.inner.clone().count_entries(pb::CountEntriesRequest {}).await)?;
            CountOutput { count: response.count }.print(admin.output)
        }
    }
}

async fn list(client: &AdminClient, filter: pb::EntryFilter) -> anyhow::Result<Vec<EntryOutput>> {
    let mut entries = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListEntriesRequest { filter: Some(filter.clone()), page_size: 0, page_token };
        let response = client.call(client.inner.clone().list_entries(request).await)?;
        entries.extend(response.entries.iter().map(EntryOutput::from));
        if response.next_page_token.is_empty() {
            return Ok(entries);
        }
        page_token = response.next_page_token;
    }
}

/// `--selector type:value` flags as protobuf selectors, checked here so the error names the
/// flag.
fn parse_selectors(flags: &[String]) -> anyhow::Result<Vec<common::Selector>> {
    flags
        .iter()
        .map(|flag| {
            let selector = Selector::parse(flag).map_err(|err| anyhow!("invalid --selector {flag:?}: {err}"))?;
            Ok(common::Selector { r#type: selector.kind().to_owned(), value: selector.value().to_owned() })
        })
        .collect()
}

fn parse_expires_at(flag: &str) -> anyhow::Result<i64> {
    OffsetDateTime::parse(flag, &Rfc3339)
        .map(OffsetDateTime::unix_timestamp)
        .map_err(|err| anyhow!("invalid --expires-at {flag:?}: expected RFC 3339 such as 2030-01-01T00:00:00Z ({err})"))
}

/// The entry of `entry create`: parent ID, SPIFFE ID and a selector are required.
fn create_request(fields: &EntryFields, entry_id: Option<String>) -> anyhow::Result<common::Entry> {
    let Some(parent_id) = fields.parent_id.clone() else {
        bail!("entry create needs --parent-id ID");
    };
    let Some(spiffe_id) = fields.spiffe_id.clone() else {
        bail!("entry create needs --spiffe-id ID");
    };
    if fields.selectors.is_empty() {
        bail!("entry create needs at least one --selector TYPE:VALUE");
    }
    Ok(common::Entry {
        id: entry_id.unwrap_or_default(),
        spiffe_id,
        parent_id,
        selectors: parse_selectors(&fields.selectors)?,
        x509_svid_ttl: ttl_flag("--x509-svid-ttl", fields.x509_svid_ttl)?,
        jwt_svid_ttl: ttl_flag("--jwt-svid-ttl", fields.jwt_svid_ttl)?,
        dns_names: fields.dns_names.clone(),
        federates_with: fields.federates_with.clone(),
        hint: fields.hint.clone().unwrap_or_default(),
        admin: fields.admin,
        downstream: fields.downstream,
        expires_at: fields.expires_at.as_deref().map(parse_expires_at).transpose()?.unwrap_or(0),
        revision: 0,
    })
}

/// The entry and mask of `entry update`: only the flags given change the entry.
fn update_request(entry_id: String, fields: &EntryFields) -> anyhow::Result<(common::Entry, pb::EntryMask)> {
    let mask = pb::EntryMask {
        spiffe_id: fields.spiffe_id.is_some(),
        parent_id: fields.parent_id.is_some(),
        selectors: !fields.selectors.is_empty(),
        x509_svid_ttl: fields.x509_svid_ttl.is_some(),
        jwt_svid_ttl: fields.jwt_svid_ttl.is_some(),
        dns_names: !fields.dns_names.is_empty(),
        federates_with: !fields.federates_with.is_empty(),
        hint: fields.hint.is_some(),
        admin: fields.admin,
        downstream: fields.downstream,
        expires_at: fields.expires_at.is_some(),
    };
    if mask == pb::EntryMask::default() {
        bail!("entry update needs at least one field to change (--spiffe-id, --parent-id, --selector, ...)");
    }
    let entry = common::Entry {
        id: entry_id,
        spiffe_id: fields.spiffe_id.clone().unwrap_or_default(),
        parent_id: fields.parent_id.clone().unwrap_or_default(),
        selectors: parse_selectors(&fields.selectors)?,
        x509_svid_ttl: ttl_flag("--x509-svid-ttl", fields.x509_svid_ttl)?,
        jwt_svid_ttl: ttl_flag("--jwt-svid-ttl", fields.jwt_svid_ttl)?,
        dns_names: fields.dns_names.clone(),
        federates_with: fields.federates_with.clone(),
        hint: fields.hint.clone().unwrap_or_default(),
        admin: fields.admin,
        downstream: fields.downstream,
        expires_at: fields.expires_at.as_deref().map(parse_expires_at).transpose()?.unwrap_or(0),
        revision: 0,
    };
    Ok((entry, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> EntryFields {
        EntryFields {
            parent_id: Some("spiffe://example.org/agent".into()),
            spiffe_id: Some("spiffe://example.org/web".into()),
            selectors: vec!["unix:uid:1000".into()],
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: vec![],
            federates_with: vec![],
            hint: None,
            admin: false,
            downstream: false,
            expires_at: None,
        }
    }

    #[test]
    fn create_checks_its_flags() {
        let entry = create_request(&fields(), None).unwrap();
        assert_eq!(entry.selectors[0].value, "uid:1000");
        type Mutation = fn(&mut EntryFields);
        let cases: Vec<(Mutation, &str)> = vec![
            (|f| f.parent_id = None, "--parent-id"),
            (|f| f.spiffe_id = None, "--spiffe-id"),
            (|f| f.selectors.clear(), "--selector"),
            (|f| f.selectors = vec!["nocolon".into()], "invalid --selector \"nocolon\""),
            (|f| f.x509_svid_ttl = Some(0), "invalid --x509-svid-ttl 0"),
            (|f| f.expires_at = Some("tomorrow".into()), "invalid --expires-at"),
        ];
        for (mutate, expected) in cases {
            let mut f = fields();
            mutate(&mut f);
            let err = create_request(&f, None).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }

    #[test]
    fn expires_at_is_rfc3339() {
        assert_eq!(parse_expires_at("1970-01-02T00:00:00Z").unwrap(), 86_400);
        assert_eq!(parse_expires_at("1970-01-02T01:00:00+01:00").unwrap(), 86_400);
    }

    #[test]
    fn update_masks_only_given_flags() {
        let empty = EntryFields { parent_id: None, spiffe_id: None, selectors: vec![], ..fields() };
        assert!(update_request("e1".into(), &empty).is_err());
        let hint = EntryFields { hint: Some("h".into()), ..empty };
        let (entry, mask) = update_request("e1".into(), &hint).unwrap();
        assert_eq!(mask, pb::EntryMask { hint: true, ..Default::default() });
        assert_eq!((entry.id.as_str(), entry.hint.as_str()), ("e1", "h"));
    }
}
