//! Attestation selectors: `type:value` facts about a node or workload (`unix:uid:1000`).
//!
//! An entry matches a caller when every selector of the entry is among the caller's selectors
//! (subset matching). Selector sets are kept sorted and de-duplicated so that matching is a
//! linear merge and equality of two sets is structural.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest selector type accepted, in bytes.
pub const MAX_SELECTOR_TYPE_LEN: usize = 64;
/// Longest selector value accepted, in bytes.
pub const MAX_SELECTOR_VALUE_LEN: usize = 4096;

/// Why a string is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// No `:` separates the type from the value.
    #[error("selector {0:?} must be of the form type:value")]
    MissingColon(String),
    /// The type (before the first `:`) is empty.
    #[error("selector {0:?} has an empty type")]
    EmptyType(String),
    /// The value (after the first `:`) is empty.
    #[error("selector {0:?} has an empty value")]
    EmptyValue(String),
    /// The type has a byte outside `[a-z0-9_-]`.
    #[error("selector type {0:?} may only contain lowercase letters, digits, '_' and '-'")]
    BadType(String),
    /// The type or value is too long, or the value contains a control character.
    #[error("selector {0:?} is too long or contains control characters")]
    BadValue(String),
}

/// One selector: a type such as `unix` and a value such as `uid:1000`.
///
/// Held as its `type:value` text in one allocation (an agent holds one per entry it caches,
/// issue 7), ordered as the pair (type, value).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Selector {
    /// `type:value`.
    text: Box<str>,
    /// The length of the type: where the first `:` is.
    colon: u8,
}

impl Selector {
    /// Builds a selector from its two parts, checking both.
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let shown = || format!("{kind}:{value}");
        if kind.is_empty() {
            return Err(SelectorError::EmptyType(shown()));
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue(shown()));
        }
        let colon = match u8::try_from(kind.len()) {
            Ok(len) if kind.len() <= MAX_SELECTOR_TYPE_LEN => len,
            _ => return Err(SelectorError::BadType(kind.to_owned())),
        };
        if !kind.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-')) {
            return Err(SelectorError::BadType(kind.to_owned()));
        }
        if value.len() > MAX_SELECTOR_VALUE_LEN || value.chars().any(char::is_control) {
            return Err(SelectorError::BadValue(shown()));
        }
        Ok(Self { text: shown().into_boxed_str(), colon })
    }

    /// Parses `type:value`; the value may itself contain colons (`unix:uid:1000` is type
    /// `unix`, value `uid:1000`).
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        let Some((kind, value)) = input.split_once(':') else {
            return Err(SelectorError::MissingColon(input.to_owned()));
        };
        Self::new(kind, value)
    }

    /// The selector type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        self.text.get(..usize::from(self.colon)).unwrap_or_default()
    }

    /// The selector value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        self.text.get(usize::from(self.colon) + 1..).unwrap_or_default()
    }
}

// By type, then value: a type that is a prefix of another sorts first (`unix` before
// `unix2`), which comparing the `type:value` texts would not give (':' sorts after digits).
impl Ord for Selector {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.kind(), self.value()).cmp(&(other.kind(), other.value()))
    }
}

impl PartialOrd for Selector {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Selector {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A sorted, de-duplicated set of selectors.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<Selector>", into = "Vec<Selector>")]
pub struct SelectorSet {
    selectors: Vec<Selector>,
}

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses each `type:value` string; the first bad one is the error.
    pub fn parse_all<S: AsRef<str>>(inputs: &[S]) -> Result<Self, SelectorError> {
        inputs.iter().map(|s| Selector::parse(s.as_ref())).collect::<Result<Vec<_>, _>>().map(Self::from)
    }

    /// Adds a selector, keeping the set sorted and without duplicates.
    pub fn insert(&mut self, selector: Selector) {
        if let Err(pos) = self.selectors.binary_search(&selector) {
            self.selectors.insert(pos, selector);
        }
    }

    /// True when `selector` is in the set.
    pub fn contains(&self, selector: &Selector) -> bool {
        self.selectors.binary_search(selector).is_ok()
    }

    /// True when every selector of `self` is in `other`: an entry with these selectors matches
    /// a caller that has `other`. An empty set is a subset of everything; callers that must
    /// not match on an empty set (registration entries) refuse empty sets when they are made.
    pub fn is_subset_of(&self, other: &SelectorSet) -> bool {
        let mut theirs = other.selectors.iter();
        'outer: for mine in &self.selectors {
            for candidate in theirs.by_ref() {
                match candidate.cmp(mine) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Equal => continue 'outer,
                    std::cmp::Ordering::Greater => return false,
                }
            }
            return false;
        }
        true
    }

    /// The selectors of `self` that are missing from `other` (why an entry did not match).
    pub fn missing_from<'a>(&'a self, other: &'a SelectorSet) -> impl Iterator<Item = &'a Selector> + 'a {
        self.selectors.iter().filter(move |s| !other.contains(s))
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.selectors.len()
    }

    /// True when there are no selectors.
    pub fn is_empty(&self) -> bool {
        self.selectors.is_empty()
    }

    /// Iterates in sorted order.
    pub fn iter(&self) -> std::slice::Iter<'_, Selector> {
        self.selectors.iter()
    }
}

impl From<Vec<Selector>> for SelectorSet {
    fn from(mut selectors: Vec<Selector>) -> Self {
        selectors.sort();
        selectors.dedup();
        Self { selectors }
    }
}

impl From<SelectorSet> for Vec<Selector> {
    fn from(set: SelectorSet) -> Self {
        set.selectors
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        Self::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl<'a> IntoIterator for &'a SelectorSet {
    type Item = &'a Selector;
    type IntoIter = std::slice::Iter<'a, Selector>;
    fn into_iter(self) -> Self::IntoIter {
        self.selectors.iter()
    }
}

impl fmt::Debug for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.selectors.iter().map(|s| s.to_string())).finish()
    }
}

impl fmt::Display for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.selectors.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(items: &[&str]) -> SelectorSet {
        SelectorSet::parse_all(items).unwrap()
    }

    #[test]
    fn value_may_contain_colons() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!((s.kind(), s.value()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        let s = Selector::parse("k8s:pod-label:app:web").unwrap();
        assert_eq!(s.value(), "pod-label:app:web");
    }

    #[test]
    fn malformed_selectors_are_refused_with_the_reason() {
        type Check = fn(&SelectorError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("unix", |e| matches!(e, SelectorError::MissingColon(_))),
            (":uid:1", |e| matches!(e, SelectorError::EmptyType(_))),
            ("unix:", |e| matches!(e, SelectorError::EmptyValue(_))),
            ("Unix:uid:1", |e| matches!(e, SelectorError::BadType(_))),
            ("unix:uid:\n1", |e| matches!(e, SelectorError::BadValue(_))),
        ];
        for (input, check) in cases {
            let err = Selector::parse(input).unwrap_err();
            assert!(check(&err), "{input:?} gave {err:?}");
        }
        assert!(Selector::parse(&format!("unix:{}", "x".repeat(MAX_SELECTOR_VALUE_LEN + 1))).is_err());
        for long in [MAX_SELECTOR_TYPE_LEN + 1, 300] {
            let err = Selector::parse(&format!("{}:v", "a".repeat(long))).unwrap_err();
            assert!(matches!(err, SelectorError::BadType(_)), "type of {long} bytes gave {err:?}");
        }
        let longest = Selector::parse(&format!("{}:v", "a".repeat(MAX_SELECTOR_TYPE_LEN))).unwrap();
        assert_eq!((longest.kind().len(), longest.value()), (MAX_SELECTOR_TYPE_LEN, "v"));
    }

    #[test]
    fn selectors_are_ordered_by_type_then_value() {
        let sorted = set(&["unix2:a", "unix:uid:1", "unix:gid:9", "k8s:ns:x"]);
        let order: Vec<String> = sorted.iter().map(ToString::to_string).collect();
        assert_eq!(order, ["k8s:ns:x", "unix:gid:9", "unix:uid:1", "unix2:a"]);
    }

    #[test]
    fn subset_matching() {
        let caller = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:alice"]);
        assert!(set(&["unix:uid:1000"]).is_subset_of(&caller));
        assert!(set(&["unix:uid:1000", "unix:gid:1000"]).is_subset_of(&caller));
        assert!(!set(&["unix:uid:1000", "unix:gid:0"]).is_subset_of(&caller));
        assert!(!set(&["unix:uid:0"]).is_subset_of(&caller));
        assert!(!set(&["unix:uid:1000"]).is_subset_of(&SelectorSet::new()));
        assert!(SelectorSet::new().is_subset_of(&caller));
        let entry = set(&["unix:uid:1000", "unix:gid:0"]);
        let missing: Vec<String> = entry.missing_from(&caller).map(|s| s.to_string()).collect();
        assert_eq!(missing, ["unix:gid:0"]);
    }

    #[test]
    fn sets_are_sorted_and_deduplicated() {
        let s = set(&["unix:uid:2", "unix:uid:1", "unix:uid:2"]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.to_string(), "unix:uid:1, unix:uid:2");
        assert_eq!(s, set(&["unix:uid:1", "unix:uid:2"]));
    }

    fn selector_strategy() -> impl Strategy<Value = Selector> {
        ("[a-c0-2]{1,2}", "[a-c:0-2]{1,4}").prop_map(|(k, v)| Selector::new(&k, &v).unwrap())
    }

    proptest! {
        #[test]
        fn subset_agrees_with_the_naive_definition(
            a in proptest::collection::vec(selector_strategy(), 0..6),
            b in proptest::collection::vec(selector_strategy(), 0..6),
        ) {
            let (sa, sb) = (SelectorSet::from(a.clone()), SelectorSet::from(b.clone()));
            let naive = a.iter().all(|s| b.contains(s));
            prop_assert_eq!(sa.is_subset_of(&sb), naive);
        }

        #[test]
        fn order_is_the_order_of_the_pair(a in selector_strategy(), b in selector_strategy()) {
            prop_assert_eq!(a.cmp(&b), (a.kind(), a.value()).cmp(&(b.kind(), b.value())));
            prop_assert_eq!(a == b, (a.kind(), a.value()) == (b.kind(), b.value()));
        }

        #[test]
        fn parse_never_panics_and_round_trips(input in "\\PC{0,40}") {
            if let Ok(s) = Selector::parse(&input) {
                prop_assert_eq!(s.to_string(), input);
            }
        }
    }
}
