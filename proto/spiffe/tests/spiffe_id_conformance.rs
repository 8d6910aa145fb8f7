//! SPIFFE ID parser conformance: every example verdict of the conformance checklist (§1.2,
//! numbered as there) and the parser cases of §8, plus property tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use tessera_spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

use SpiffeIdError::*;

type Verdict = Result<(&'static str, &'static str), SpiffeIdError>;

/// (case number, input, Ok((trust domain, path)) or the expected error). A `<...>` placeholder
/// means "not compared" for inputs too long to spell out.
fn verdicts() -> Vec<(u32, String, Verdict)> {
    let s = |x: &str| x.to_owned();
    let td_255 = "a".repeat(255);
    let td_256 = "a".repeat(256);
    // A valid ID of exactly 2048 bytes: "spiffe://example.org" (20) + "/" + 2027 bytes.
    let id_2048 = format!("spiffe://example.org/{}", "p".repeat(2048 - 21));
    assert_eq!(id_2048.len(), 2048);
    vec![
        (1, s("spiffe://trustdomain"), Ok(("trustdomain", ""))),
        (2, s("spiffe://trustdomain/path"), Ok(("trustdomain", "/path"))),
        (3, s("spiffe://example.org/ns/default/sa/web"), Ok(("example.org", "/ns/default/sa/web"))),
        (4, s("spiffe://staging.example.com/payments/mysql"), Ok(("staging.example.com", "/payments/mysql"))),
        (
            5,
            s("spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453"),
            Ok(("example.com", "/9eebccd2-12bf-40a6-b262-65fe0487d453")),
        ),
        (6, s("spiffe://trust_domain-1.example/Path_A/b-C.d"), Ok(("trust_domain-1.example", "/Path_A/b-C.d"))),
        (7, s("spiffe://trustdomain/.path"), Ok(("trustdomain", "/.path"))),
        (8, s("spiffe://trustdomain/..path"), Ok(("trustdomain", "/..path"))),
        (9, s("spiffe://trustdomain/..."), Ok(("trustdomain", "/..."))),
        (10, s("spiffe://1.2.3.4/path"), Ok(("1.2.3.4", "/path"))),
        (11, s(""), Err(Empty)),
        (12, s("s"), Err(WrongScheme)),
        (13, s("spiffe:/"), Err(WrongScheme)),
        (14, s("spiffe:/trustdomain/path"), Err(WrongScheme)),
        (15, s("Spiffe://trustdomain"), Err(WrongScheme)),
        (15, s("SPIFFE://trustdomain"), Err(WrongScheme)),
        (16, s("http://trustdomain/path"), Err(WrongScheme)),
        (17, s("spiffe://"), Err(MissingTrustDomain)),
        (18, s("spiffe:///"), Err(MissingTrustDomain)),
        (19, s("spiffe:///path"), Err(MissingTrustDomain)),
        (20, s("spiffe://Trustdomain/path"), Err(BadTrustDomainChar)),
        (21, s("spiffe://trust$domain"), Err(BadTrustDomainChar)),
        (22, s("spiffe://trustdomain:8080/path"), Err(BadTrustDomainChar)),
        (23, s("spiffe://user:pass@trustdomain/path"), Err(BadTrustDomainChar)),
        (24, s("spiffe://[::1]/path"), Err(BadTrustDomainChar)),
        (25, s("spiffe://%62%61%64/path"), Err(BadTrustDomainChar)),
        (26, s("spiffe://trustdomain?x=1"), Err(BadTrustDomainChar)),
        (27, s("spiffe://trustdomain/"), Err(TrailingSlash)),
        (28, s("spiffe://trustdomain/path/"), Err(TrailingSlash)),
        (29, s("spiffe://trustdomain//"), Err(EmptySegment)),
        (30, s("spiffe://trustdomain//path"), Err(EmptySegment)),
        (31, s("spiffe://trustdomain/."), Err(DotSegment)),
        (32, s("spiffe://trustdomain/./path"), Err(DotSegment)),
        (33, s("spiffe://trustdomain/path/../other"), Err(DotSegment)),
        (34, s("spiffe://trustdomain/.."), Err(DotSegment)),
        (35, s("spiffe://trustdomain/path$"), Err(BadPathSegmentChar)),
        (36, s("spiffe://trustdomain/%62%61%64"), Err(BadPathSegmentChar)),
        (37, s("spiffe://trustdomain/%F0%9F%A4%AF"), Err(BadPathSegmentChar)),
        (38, s("spiffe://trustdomain/path?query=1"), Err(BadPathSegmentChar)),
        (39, s("spiffe://trustdomain/path#frag"), Err(BadPathSegmentChar)),
        (40, s("spiffe://trustdomain/pa th"), Err(BadPathSegmentChar)),
        (41, s("spiffe://trustdomain/café"), Err(BadPathSegmentChar)),
        (42, format!("spiffe://{td_255}"), Ok(("<255 a>", ""))),
        (43, format!("spiffe://{td_256}"), Err(TrustDomainTooLong)),
        (44, id_2048, Ok(("example.org", "<2027 p>"))),
    ]
}

#[test]
fn all_44_example_verdicts() {
    let cases = verdicts();
    let numbers: std::collections::BTreeSet<u32> = cases.iter().map(|c| c.0).collect();
    assert_eq!(numbers.len(), 44, "every numbered example is covered");
    for (n, input, expected) in cases {
        let got = SpiffeId::parse(&input);
        match (expected, got) {
            (Ok((td, path)), Ok(id)) => {
                assert_eq!(id.as_str(), input, "case {n}: an accepted ID is kept byte for byte");
                if !td.starts_with('<') {
                    assert_eq!(id.trust_domain_name(), td, "case {n}");
                }
                if !path.starts_with('<') {
                    assert_eq!(id.path(), path, "case {n}");
                }
            }
            (Err(want), Err(got)) => assert_eq!(got, want, "case {n}: {input:?}"),
            (want, got) => panic!("case {n}: {input:?}: expected {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn error_messages_are_worded_like_the_spec() {
    let msg = |s: &str| SpiffeId::parse(s).unwrap_err().to_string();
    assert_eq!(msg(""), "cannot be empty");
    assert_eq!(msg("http://x/y"), "scheme is missing or invalid");
    assert_eq!(msg("spiffe:///x"), "trust domain is missing");
    assert_eq!(
        msg("spiffe://A/x"),
        "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
    );
    assert_eq!(
        msg("spiffe://a/x$"),
        "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
    );
    assert_eq!(msg("spiffe://a//x"), "path cannot contain empty segments");
    assert_eq!(msg("spiffe://a/./x"), "path cannot contain dot segments");
    assert_eq!(msg("spiffe://a/x/"), "path cannot have a trailing slash");
}

/// Conformance §8, parser cases 1-10.
#[test]
fn section_8_parser_cases() {
    // 1
    let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
    assert_eq!((id.trust_domain_name(), id.path()), ("example.org", "/ns/default/sa/web"));
    // 2: valid as an ID, refused as a workload (leaf) ID.
    assert!(SpiffeId::parse("spiffe://example.org").is_ok());
    assert_eq!(SpiffeId::parse_workload("spiffe://example.org"), Err(MissingPath));
    // 3-9
    for bad in [
        "spiffe://Example.org/x",
        "SPIFFE://example.org/x",
        "spiffe://example.org/",
        "spiffe://example.org//a",
        "spiffe://example.org/a/../b",
        "spiffe://example.org:443/a",
        "spiffe://u@example.org/a",
        "spiffe://example.org/a%20b",
        "spiffe://example.org/a?b=c",
        "spiffe://example.org/a#b",
    ] {
        assert!(SpiffeId::parse(bad).is_err(), "{bad} must be refused");
    }
    assert!(SpiffeId::parse("spiffe://example.org/...").is_ok());
    // 10
    assert_eq!(TrustDomain::new(&"a".repeat(256)), Err(TrustDomainTooLong));
    let long = format!("spiffe://example.org/{}", "p".repeat(2027));
    assert!(SpiffeId::parse(&long).is_ok());
}

#[test]
fn ids_beyond_2048_bytes_are_refused() {
    let long = format!("spiffe://example.org/{}", "p".repeat(2028));
    assert_eq!(SpiffeId::parse(&long), Err(TooLong));
}

fn td_strategy() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,40}"
}

fn segment_strategy() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,12}".prop_filter("dot segments are invalid", |s| s != "." && s != "..")
}

fn valid_id_strategy() -> impl Strategy<Value = String> {
    (td_strategy(), proptest::collection::vec(segment_strategy(), 0..6)).prop_map(|(td, segs)| {
        let mut id = format!("spiffe://{td}");
        for s in segs {
            id.push('/');
            id.push_str(&s);
        }
        id
    })
}

/// Bytes that may appear nowhere in a SPIFFE ID.
fn forbidden_byte() -> impl Strategy<Value = u8> {
    any::<u8>().prop_filter("must be forbidden everywhere", |b| {
        !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
    })
}

proptest! {
    #[test]
    fn valid_ids_round_trip(id in valid_id_strategy()) {
        let parsed = SpiffeId::parse(&id).unwrap();
        prop_assert_eq!(parsed.as_str(), id.as_str());
        let reparsed: SpiffeId = parsed.to_string().parse().unwrap();
        prop_assert_eq!(&reparsed, &parsed);
        prop_assert_eq!(format!("spiffe://{}{}", parsed.trust_domain_name(), parsed.path()), id);
        let td = parsed.trust_domain();
        prop_assert_eq!(TrustDomain::new(td.name()).unwrap(), td);
    }

    #[test]
    fn inserting_a_forbidden_byte_is_always_rejected(
        id in valid_id_strategy(),
        byte in forbidden_byte(),
        pos_seed in any::<usize>(),
    ) {
        // Insert after the scheme so the mutation lands in the trust domain or the path.
        let mut bytes = id.into_bytes();
        let prefix = "spiffe://".len();
        let pos = prefix + pos_seed % (bytes.len() - prefix + 1);
        bytes.insert(pos, byte);
        prop_assert!(SpiffeId::parse_bytes(&bytes).is_err());
        if let Ok(s) = std::str::from_utf8(&bytes) {
            prop_assert!(SpiffeId::parse(s).is_err());
        }
    }

    #[test]
    fn uppercase_in_the_trust_domain_is_rejected(id in valid_id_strategy(), upper in "[A-Z]") {
        let mutated = id.replacen("spiffe://", &format!("spiffe://{upper}"), 1);
        prop_assert_eq!(SpiffeId::parse(&mutated), Err(BadTrustDomainChar));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = SpiffeId::parse_bytes(&bytes);
        let mut with_prefix = b"spiffe://".to_vec();
        with_prefix.extend_from_slice(&bytes);
        if let Ok(id) = SpiffeId::parse_bytes(&with_prefix) {
            prop_assert_eq!(id.as_str().as_bytes(), &with_prefix[..]);
        }
    }
}
