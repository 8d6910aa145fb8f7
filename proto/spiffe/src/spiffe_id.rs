//! SPIFFE IDs and trust domains.
//!
//! The parser is strict and byte-oriented: it accepts exactly the grammar of the SPIFFE ID
//! standard (lowercase trust domain of `[a-z0-9._-]`, path segments of `[a-zA-Z0-9._-]`, no
//! empty or dot segments, no trailing slash) and reports the first violation in the same order
//! and with the same wording that SPIFFE libraries use, so operators see familiar messages.
//! Nothing is normalised: an ID that parses is compared byte for byte.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The scheme and authority separator every SPIFFE ID starts with.
const SCHEME_PREFIX: &str = "spiffe://";

/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest SPIFFE ID accepted, in bytes (including `spiffe://`).
///
/// The standard requires support for IDs up to 2048 bytes and forbids generating longer ones;
/// refusing longer ones on parse keeps hostile input bounded.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Why a string is not a SPIFFE ID or trust domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The input is empty.
    #[error("cannot be empty")]
    Empty,
    /// The input does not start with `spiffe://`.
    #[error("scheme is missing or invalid")]
    WrongScheme,
    /// No bytes between `spiffe://` and the path.
    #[error("trust domain is missing")]
    MissingTrustDomain,
    /// A trust domain byte outside `[a-z0-9._-]`.
    #[error("trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores")]
    BadTrustDomainChar,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is too long (at most 255 bytes)")]
    TrustDomainTooLong,
    /// A path byte outside `[a-zA-Z0-9._-]`.
    #[error("path segment characters are limited to letters, numbers, dots, dashes, and underscores")]
    BadPathSegmentChar,
    /// Two consecutive slashes.
    #[error("path cannot contain empty segments")]
    EmptySegment,
    /// A segment that is exactly `.` or `..`.
    #[error("path cannot contain dot segments")]
    DotSegment,
    /// The path ends with `/`.
    #[error("path cannot have a trailing slash")]
    TrailingSlash,
    /// A path that does not start with `/` (path-only builders).
    #[error("path must have a leading slash")]
    NoLeadingSlash,
    /// A workload ID was required but the ID names only a trust domain.
    #[error("path cannot be empty")]
    MissingPath,
    /// The whole ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("SPIFFE ID is too long (at most 2048 bytes)")]
    TooLong,
}

/// A trust domain name such as `example.org`.
///
/// Built only by [`TrustDomain::new`] (or [`FromStr`]), so every value is valid.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain {
    name: String,
}

/// A SPIFFE ID such as `spiffe://example.org/ns/default/sa/web`.
///
/// Built only by [`SpiffeId::parse`] and friends, so every value is valid. Ordering and
/// equality are byte-wise on the full string.
///
/// The text is shared: a clone is a reference count, not a copy (the server's entry index
/// keeps one parent ID text for all the entries under that parent, S9 memory).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    full: Arc<str>,
    /// Byte offset where the path begins (the end of the trust domain).
    path_start: usize,
}

// spec: trust-domain bytes are limited to lowercase letters, digits, '.', '-' and '_'.
fn is_trust_domain_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

// spec: path segment bytes are limited to letters, digits, '.', '-' and '_'.
fn is_path_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn check_trust_domain_name(name: &str) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::MissingTrustDomain);
    }
    if !name.bytes().all(is_trust_domain_byte) {
        return Err(SpiffeIdError::BadTrustDomainChar);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    Ok(())
}

/// Validates a SPIFFE ID path (`""` or `/seg/seg...`), reporting errors in the spec's order.
fn check_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(SpiffeIdError::NoLeadingSlash);
    };
    let bytes = rest.as_bytes();
    let mut segment_start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'/' {
            check_segment(&bytes[segment_start..i], false)?;
            segment_start = i + 1;
        } else if !is_path_byte(b) {
            return Err(SpiffeIdError::BadPathSegmentChar);
        }
    }
    check_segment(&bytes[segment_start..], true)
}

fn check_segment(segment: &[u8], last: bool) -> Result<(), SpiffeIdError> {
    match segment {
        // spec: no empty segments, and no trailing slash (an empty last segment).
        b"" if last => Err(SpiffeIdError::TrailingSlash),
        b"" => Err(SpiffeIdError::EmptySegment),
        // spec: no segment that is exactly "." or "..".
        b"." | b".." => Err(SpiffeIdError::DotSegment),
        _ => Ok(()),
    }
}

impl TrustDomain {
    /// Parses a trust domain from a bare name (`example.org`) or, when the input contains
    /// `:/`, from a full SPIFFE ID whose trust domain is taken (`spiffe://example.org/x`).
    pub fn new(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if input.contains(":/") {
            return SpiffeId::parse(input).map(|id| id.trust_domain());
        }
        check_trust_domain_name(input)?;
        Ok(Self { name: input.to_owned() })
    }

    /// The bare trust domain name, e.g. `example.org`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SPIFFE ID naming the trust domain itself, `spiffe://<name>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId { full: Arc::from(self.id_string()), path_start: SCHEME_PREFIX.len() + self.name.len() }
    }

    /// The text of [`Self::id`], made directly (`id().into_string()` would copy it twice).
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.name)
    }

    /// Builds a workload ID in this trust domain from a path such as `/ns/web`.
    pub fn workload_id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        if path.is_empty() {
            return Err(SpiffeIdError::MissingPath);
        }
        check_path(path)?;
        let full = format!("{SCHEME_PREFIX}{}{path}", self.name);
        if full.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(SpiffeId { path_start: SCHEME_PREFIX.len() + self.name.len(), full: full.into() })
    }

    /// Builds a workload ID from path segments, each checked on its own, e.g.
    /// `["tessera", "agent", "join_token", token]`.
    pub fn id_from_segments<S: AsRef<str>>(&self, segments: &[S]) -> Result<SpiffeId, SpiffeIdError> {
        let mut path = String::new();
        for segment in segments {
            let segment = segment.as_ref();
            // A segment containing '/' would silently create two segments: refuse it.
            if segment.contains('/') {
                return Err(SpiffeIdError::BadPathSegmentChar);
            }
            path.push('/');
            path.push_str(segment);
        }
        self.workload_id(&path)
    }
}

impl SpiffeId {
    /// Parses any SPIFFE ID, including one naming only a trust domain (`spiffe://example.org`).
    ///
    /// Errors are reported in this order: empty, scheme, trust domain characters, missing trust
    /// domain, trust domain length, then path rules segment by segment, then overall length.
    pub fn parse(input: &str) -> Result<Self, SpiffeIdError> {
        if input.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        // spec: the scheme is exactly "spiffe" followed by "://"; compared byte for byte.
        let Some(rest) = input.strip_prefix(SCHEME_PREFIX) else {
            return Err(SpiffeIdError::WrongScheme);
        };
        let td_len = rest.bytes().position(|b| b == b'/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        if !td.bytes().all(is_trust_domain_byte) {
            return Err(SpiffeIdError::BadTrustDomainChar);
        }
        check_trust_domain_name(td)?;
        check_path(path)?;
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        Ok(Self { full: Arc::from(input), path_start: SCHEME_PREFIX.len() + td_len })
    }

    /// Parses a SPIFFE ID that may name a workload: like [`SpiffeId::parse`] but the path must
    /// not be empty (a bare trust domain ID is never a leaf or workload identity).
    pub fn parse_workload(input: &str) -> Result<Self, SpiffeIdError> {
        let id = Self::parse(input)?;
        id.require_workload()?;
        Ok(id)
    }

    /// Parses raw bytes (e.g. a URI SAN) as a SPIFFE ID; non-UTF-8 input is refused with the
    /// error its first bad byte would produce.
    pub fn parse_bytes(input: &[u8]) -> Result<Self, SpiffeIdError> {
        match std::str::from_utf8(input) {
            Ok(s) => Self::parse(s),
            // Non-ASCII bytes are never valid; find which part they are in for the message.
            Err(_) => {
                let Some(rest) = input.strip_prefix(SCHEME_PREFIX.as_bytes()) else {
                    return Err(if input.is_empty() { SpiffeIdError::Empty } else { SpiffeIdError::WrongScheme });
                };
                let td_end = rest.iter().position(|&b| b == b'/').unwrap_or(rest.len());
                if rest[..td_end].iter().all(|&b| is_trust_domain_byte(b)) {
                    Err(SpiffeIdError::BadPathSegmentChar)
                } else {
                    Err(SpiffeIdError::BadTrustDomainChar)
                }
            }
        }
    }

    /// Fails with [`SpiffeIdError::MissingPath`] when this ID names only a trust domain.
    pub fn require_workload(&self) -> Result<(), SpiffeIdError> {
        if self.is_trust_domain_id() { Err(SpiffeIdError::MissingPath) } else { Ok(()) }
    }

    /// The full ID as a string.
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        &self.full[SCHEME_PREFIX.len()..self.path_start]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain { name: self.trust_domain_name().to_owned() }
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.full[self.path_start..]
    }

    /// True when the ID names a trust domain (`spiffe://example.org`, no path).
    pub fn is_trust_domain_id(&self) -> bool {
        self.path_start == self.full.len()
    }

    /// True when this ID belongs to `trust_domain`.
    pub fn is_member_of(&self, trust_domain: &TrustDomain) -> bool {
        self.trust_domain_name() == trust_domain.name()
    }

    /// Consumes the ID, returning the full string (a copy when the text is shared).
    pub fn into_string(self) -> String {
        self.full.as_ref().to_owned()
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({:?})", self.name)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({:?})", self.full)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.full
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(|e| serde::de::Error::custom(format!("invalid SPIFFE ID {s:?}: {e}")))
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name)
    }
}

impl<'de> Deserialize<'de> for TrustDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::new(&s).map_err(|e| serde::de::Error::custom(format!("invalid trust domain {s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accessors_split_trust_domain_and_path() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        assert_eq!(id.trust_domain_name(), "example.org");
        assert_eq!(id.path(), "/ns/default/sa/web");
        assert!(!id.is_trust_domain_id());
        assert_eq!(id.trust_domain().id().as_str(), "spiffe://example.org");
        assert_eq!(id.trust_domain().id_string(), "spiffe://example.org");
    }

    #[test]
    fn a_clone_shares_the_text_and_compares_by_content() {
        let id = SpiffeId::parse("spiffe://example.org/ns/default/sa/web").unwrap();
        let clone = id.clone();
        assert_eq!(clone.as_str().as_ptr(), id.as_str().as_ptr(), "a clone is not a copy");
        let parsed_again = SpiffeId::parse(id.as_str()).unwrap();
        assert_ne!(parsed_again.as_str().as_ptr(), id.as_str().as_ptr());
        assert_eq!(parsed_again, id);
        assert_eq!(clone.path(), "/ns/default/sa/web");
        assert_eq!(clone.into_string(), "spiffe://example.org/ns/default/sa/web");
    }

    #[test]
    fn trust_domain_accepts_bare_names_and_full_ids() {
        assert_eq!(TrustDomain::new("example.org").unwrap().name(), "example.org");
        assert_eq!(TrustDomain::new("spiffe://example.org/x").unwrap().name(), "example.org");
        assert_eq!(TrustDomain::new(""), Err(SpiffeIdError::Empty));
        assert_eq!(TrustDomain::new("Example.org"), Err(SpiffeIdError::BadTrustDomainChar));
        assert_eq!(TrustDomain::new("http://example.org"), Err(SpiffeIdError::WrongScheme));
    }

    #[test]
    fn workload_ids_require_a_path() {
        assert_eq!(SpiffeId::parse_workload("spiffe://example.org"), Err(SpiffeIdError::MissingPath));
        assert!(SpiffeId::parse_workload("spiffe://example.org/a").is_ok());
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.workload_id(""), Err(SpiffeIdError::MissingPath));
        assert_eq!(td.workload_id("a"), Err(SpiffeIdError::NoLeadingSlash));
        assert_eq!(td.workload_id("/a/b").unwrap().as_str(), "spiffe://example.org/a/b");
    }

    #[test]
    fn segments_cannot_smuggle_slashes() {
        let td = TrustDomain::new("example.org").unwrap();
        let id = td.id_from_segments(&["tessera", "agent", "join_token", "abc"]).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/tessera/agent/join_token/abc");
        assert_eq!(td.id_from_segments(&["a/b"]), Err(SpiffeIdError::BadPathSegmentChar));
        assert_eq!(td.id_from_segments(&[".."]), Err(SpiffeIdError::DotSegment));
    }

    #[test]
    fn non_utf8_bytes_are_refused_in_the_right_part() {
        assert_eq!(SpiffeId::parse_bytes(b"spiffe://ex\xffample/a"), Err(SpiffeIdError::BadTrustDomainChar));
        assert_eq!(SpiffeId::parse_bytes(b"spiffe://example/\xff"), Err(SpiffeIdError::BadPathSegmentChar));
        assert_eq!(SpiffeId::parse_bytes(b"\xff"), Err(SpiffeIdError::WrongScheme));
        assert_eq!(SpiffeId::parse_bytes(b""), Err(SpiffeIdError::Empty));
    }

    #[test]
    fn serde_round_trip_and_refusal() {
        let id: SpiffeId = serde_json::from_str("\"spiffe://example.org/a\"").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"spiffe://example.org/a\"");
        let err = serde_json::from_str::<SpiffeId>("\"spiffe://example.org/\"").unwrap_err();
        assert!(err.to_string().contains("trailing slash"), "{err}");
    }
}
