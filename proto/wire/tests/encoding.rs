#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Wire-level checks: field numbers and type URLs that other implementations depend on.
//!
//! Each test encodes a message and compares the exact bytes, so a wrong field number or wire
//! type in a `.proto` file fails here. A protobuf tag byte is `(field_number << 3) | wire_type`,
//! with wire type 0 for varints and 2 for length-delimited fields.

use prost::{Message, Name};
use tessera_wire::envoy::config::core::v3::{BuildVersion, DataSource, Node, TypedExtensionConfig, data_source, node};
use tessera_wire::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use tessera_wire::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tessera_wire::envoy::r#type::v3::SemanticVersion;
use tessera_wire::google::rpc::Status;
use tessera_wire::tessera::common::v1::{Bundle, Entry, JwtAuthority, Selector};
use tessera_wire::workload::{
    JwtBundlesResponse, JwtsvidRequest, ValidateJwtsvidResponse, WitBundlesResponse, X509BundlesResponse, X509svid,
    X509svidResponse,
};

/// Tag byte of a length-delimited field.
const fn ld(field: u8) -> u8 {
    (field << 3) | 2
}

/// Tag byte of a varint field.
const fn varint(field: u8) -> u8 {
    field << 3
}

fn inline_bytes(data: &[u8]) -> DataSource {
    DataSource { specifier: Some(data_source::Specifier::InlineBytes(data.to_vec())) }
}

/// `tag, len, bytes...` for a short length-delimited field.
fn field(field: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![ld(field), u8::try_from(content.len()).unwrap()];
    out.extend_from_slice(content);
    out
}

// ----------------------------------------------------------------------------------------------
// Workload API

#[test]
fn x509_svid_fields() {
    let svid = X509svid {
        spiffe_id: "s".to_owned(),
        x509_svid: vec![1],
        x509_svid_key: vec![2],
        bundle: vec![3],
        hint: "h".to_owned(),
    };
    let expected = [field(1, b"s"), field(2, &[1]), field(3, &[2]), field(4, &[3]), field(5, b"h")].concat();
    assert_eq!(svid.encode_to_vec(), expected);

    let response = X509svidResponse { svids: vec![X509svid::default()], crl: vec![vec![9]], ..Default::default() };
    assert_eq!(response.encode_to_vec(), [field(1, &[]), field(2, &[9])].concat());
}

#[test]
fn x509_svid_response_federated_bundles_is_field_3_map() {
    let response =
        X509svidResponse { federated_bundles: [("spiffe://a".to_owned(), vec![7])].into(), ..Default::default() };
    // Map entries are messages with the key as field 1 and the value as field 2.
    let entry = [field(1, b"spiffe://a"), field(2, &[7])].concat();
    assert_eq!(response.encode_to_vec(), field(3, &entry));
}

#[test]
fn bundle_maps() {
    let entry = [field(1, b"spiffe://a"), field(2, b"{}")].concat();

    let x509 = X509BundlesResponse { crl: vec![vec![1]], bundles: [("spiffe://a".to_owned(), b"{}".to_vec())].into() };
    assert_eq!(x509.encode_to_vec(), [field(1, &[1]), field(2, &entry)].concat());

    let jwt = JwtBundlesResponse { bundles: [("spiffe://a".to_owned(), b"{}".to_vec())].into() };
    assert_eq!(jwt.encode_to_vec(), field(1, &entry));

    let wit = WitBundlesResponse { bundles: [("spiffe://a".to_owned(), "{}".to_owned())].into() };
    assert_eq!(wit.encode_to_vec(), field(1, &entry));
}

#[test]
fn jwt_svid_request_fields() {
    let request = JwtsvidRequest { audience: vec!["a".to_owned(), "b".to_owned()], spiffe_id: "s".to_owned() };
    assert_eq!(request.encode_to_vec(), [field(1, b"a"), field(1, b"b"), field(2, b"s")].concat());
}

#[test]
fn validate_response_claims_is_a_struct_in_field_2() {
    let response = ValidateJwtsvidResponse { spiffe_id: "s".to_owned(), claims: Some(prost_types::Struct::default()) };
    assert_eq!(response.encode_to_vec(), [field(1, b"s"), field(2, &[])].concat());
    assert_eq!(ValidateJwtsvidResponse::full_name(), "ValidateJWTSVIDResponse");
}

// ----------------------------------------------------------------------------------------------
// Envoy SDS

#[test]
fn secret_with_tls_certificate() {
    let secret = Secret {
        name: "n".to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: Some(inline_bytes(&[1])),
            private_key: Some(inline_bytes(&[2])),
        })),
    };
    let cert = [
        field(1, &field(2, &[1])), // certificate_chain { inline_bytes }
        field(2, &field(2, &[2])), // private_key { inline_bytes }
    ]
    .concat();
    assert_eq!(secret.encode_to_vec(), [field(1, b"n"), field(2, &cert)].concat());
}

#[test]
fn secret_with_spiffe_validation_context() {
    let validator = SpiffeCertValidatorConfig {
        trust_domains: vec![spiffe_cert_validator_config::TrustDomain {
            name: "td".to_owned(),
            trust_bundle: Some(inline_bytes(&[3])),
        }],
        trust_bundles: Some(DataSource { specifier: Some(data_source::Specifier::Filename("f".to_owned())) }),
    };
    let validator_bytes =
        [field(1, &[field(1, b"td"), field(2, &field(2, &[3]))].concat()), field(2, &field(1, b"f"))].concat();
    assert_eq!(validator.encode_to_vec(), validator_bytes);

    let any = prost_types::Any::from_msg(&validator).unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig");

    let secret = Secret {
        name: "ROOTCA".to_owned(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: Some(DataSource { specifier: Some(data_source::Specifier::InlineString("p".to_owned())) }),
            custom_validator_config: Some(TypedExtensionConfig {
                name: "v".to_owned(),
                typed_config: Some(prost_types::Any { type_url: "t".to_owned(), value: vec![] }),
            }),
        })),
    };
    // custom_validator_config is field 12: tag 0x62. Any: type_url = 1, value = 2.
    let typed = [field(1, b"v"), field(2, &field(1, b"t"))].concat();
    let mut context = field(1, &field(3, b"p"));
    context.push(0x62);
    context.push(u8::try_from(typed.len()).unwrap());
    context.extend_from_slice(&typed);
    assert_eq!(secret.encode_to_vec(), [field(1, b"ROOTCA"), field(4, &context)].concat());

    let env = DataSource { specifier: Some(data_source::Specifier::EnvironmentVariable("E".to_owned())) };
    assert_eq!(env.encode_to_vec(), field(4, b"E"));
}

#[test]
fn secret_type_url() {
    assert_eq!(Secret::type_url(), "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret");
}

#[test]
fn discovery_request_and_node_fields() {
    let request = DiscoveryRequest {
        version_info: "1".to_owned(),
        node: Some(Node {
            id: "i".to_owned(),
            cluster: "c".to_owned(),
            metadata: Some(prost_types::Struct::default()),
            user_agent_name: "envoy".to_owned(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                version: Some(SemanticVersion { major_number: 1, minor_number: 17, patch: 2 }),
                metadata: None,
            })),
            client_features: vec![],
        }),
        resource_names: vec!["ALL".to_owned()],
        resource_locators: vec![],
        type_url: "t".to_owned(),
        response_nonce: "n".to_owned(),
        error_detail: Some(Status { code: 3, message: "m".to_owned(), details: vec![] }),
    };

    let semver = [varint(1), 1, varint(2), 17, varint(3), 2];
    let node =
        [field(1, b"i"), field(2, b"c"), field(3, &[]), field(6, b"envoy"), field(8, &field(1, &semver))].concat();
    let status = [vec![varint(1), 3], field(2, b"m")].concat();
    let expected =
        [field(1, b"1"), field(2, &node), field(3, b"ALL"), field(4, b"t"), field(5, b"n"), field(6, &status)].concat();
    assert_eq!(request.encode_to_vec(), expected);

    let string_version = Node {
        user_agent_version_type: Some(node::UserAgentVersionType::UserAgentVersion("1.30".to_owned())),
        ..Default::default()
    };
    assert_eq!(string_version.encode_to_vec(), field(7, b"1.30"));
}

#[test]
fn discovery_response_fields() {
    let response = DiscoveryResponse {
        version_info: "2".to_owned(),
        resources: vec![prost_types::Any::default()],
        canary: true,
        type_url: "t".to_owned(),
        nonce: "n".to_owned(),
        control_plane: None,
    };
    let expected = [field(1, b"2"), field(2, &[]), vec![varint(3), 1], field(4, b"t"), field(5, b"n")].concat();
    assert_eq!(response.encode_to_vec(), expected);
}

// ----------------------------------------------------------------------------------------------
// Tessera's own messages: these numbers are a compatibility promise between releases.

#[test]
fn entry_fields() {
    let entry = Entry {
        id: "e".to_owned(),
        spiffe_id: "s".to_owned(),
        parent_id: "p".to_owned(),
        selectors: vec![Selector { r#type: "unix".to_owned(), value: "uid:0".to_owned() }],
        x509_svid_ttl: 5,
        jwt_svid_ttl: 6,
        dns_names: vec!["d".to_owned()],
        federates_with: vec!["f".to_owned()],
        hint: "h".to_owned(),
        admin: true,
        downstream: true,
        expires_at: 12,
        revision: 13,
    };
    let expected = [
        field(1, b"e"),
        field(2, b"s"),
        field(3, b"p"),
        field(4, &[field(1, b"unix"), field(2, b"uid:0")].concat()),
        vec![varint(5), 5, varint(6), 6],
        field(7, b"d"),
        field(8, b"f"),
        field(9, b"h"),
        vec![varint(10), 1, varint(11), 1, varint(12), 12, varint(13), 13],
    ]
    .concat();
    assert_eq!(entry.encode_to_vec(), expected);
}

#[test]
fn bundle_fields() {
    let bundle = Bundle {
        trust_domain: "td".to_owned(),
        x509_authorities: vec![vec![1]],
        jwt_authorities: vec![JwtAuthority { key_id: "k".to_owned(), public_key: vec![2], expires_at: 3 }],
        sequence: 4,
        refresh_hint_seconds: 5,
    };
    let authority = [field(1, b"k"), field(2, &[2]), vec![varint(3), 3]].concat();
    let expected = [field(1, b"td"), field(2, &[1]), field(3, &authority), vec![varint(4), 4, varint(5), 5]].concat();
    assert_eq!(bundle.encode_to_vec(), expected);
}
