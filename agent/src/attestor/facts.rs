//! What attestation learned about a process, and the pure derivation of its selectors.

use tessera_spiffe::{Selector, SelectorSet};

/// The selector type of every selector this attestor produces.
pub const UNIX_SELECTOR_TYPE: &str = "unix";

/// The facts about a caller's process from which its `unix:` selectors are derived.
///
/// A plain struct so that fakes and tests can build one directly; [`derive_selectors`] is the
/// only interpretation of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFacts {
    /// Effective uid.
    pub uid: u32,
    /// Name of the uid, when the user database has one.
    pub user_name: Option<String>,
    /// Effective gid.
    pub gid: u32,
    /// Name of the gid, when the group database has one.
    pub group_name: Option<String>,
    /// Supplementary groups in the kernel's order (the primary gid is often among them).
    pub supplementary_groups: Vec<SupplementaryGroup>,
    /// The executable's path as the kernel reports it (`readlink /proc/<pid>/exe`), including a
    /// trailing ` (deleted)` when the file was unlinked. `None` when it could not be read or is
    /// not UTF-8.
    pub exe_path: Option<String>,
    /// Lowercase hex SHA-256 of the executable; `None` when hashing is disabled, the file is
    /// larger than the limit, or it could not be read.
    pub sha256: Option<String>,
}

/// One supplementary group of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupplementaryGroup {
    /// The group id.
    pub gid: u32,
    /// Its name, when the group database has one.
    pub name: Option<String>,
}

impl ProcessFacts {
    /// Facts with only a uid and gid: no names, groups, path or hash.
    pub fn new(uid: u32, gid: u32) -> Self {
        Self {
            uid,
            user_name: None,
            gid,
            group_name: None,
            supplementary_groups: Vec::new(),
            exe_path: None,
            sha256: None,
        }
    }
}

/// Derives the `unix:` selectors of a process from its facts. Pure: no I/O.
///
/// `uid`, `gid` and one `supplementary_gid` per group are always present; `user`, `group`,
/// `supplementary_group`, `path` and `sha256` only when the fact is known. A value that cannot
/// be a selector value (a control character, such as a newline in a file name, or more than
/// [`tessera_spiffe::selector::MAX_SELECTOR_VALUE_LEN`] bytes) yields no selector. Leaving a selector
/// out is the safe direction: an entry matches when *all* its selectors are among the
/// caller's, so a caller can only ever lose matches by having fewer selectors.
pub fn derive_selectors(facts: &ProcessFacts) -> SelectorSet {
    let mut selectors = Vec::with_capacity(8 + 2 * facts.supplementary_groups.len());
    let mut add = |key: &str, value: &dyn std::fmt::Display| {
        let value = format!("{key}:{value}");
        match Selector::new(UNIX_SELECTOR_TYPE, &value) {
            Ok(selector) => selectors.push(selector),
            Err(error) => tracing::warn!(%error, "left out a unix:{key} selector"),
        }
    };
    add("uid", &facts.uid);
    if let Some(name) = &facts.user_name {
        add("user", name);
    }
    add("gid", &facts.gid);
    if let Some(name) = &facts.group_name {
        add("group", name);
    }
    for group in &facts.supplementary_groups {
        add("supplementary_gid", &group.gid);
        if let Some(name) = &group.name {
            add("supplementary_group", name);
        }
    }
    if let Some(path) = &facts.exe_path {
        add("path", path);
    }
    if let Some(digest) = &facts.sha256 {
        add("sha256", digest);
    }
    SelectorSet::from(selectors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> SelectorSet {
        SelectorSet::parse_all(items).unwrap()
    }

    fn group(gid: u32, name: Option<&str>) -> SupplementaryGroup {
        SupplementaryGroup { gid, name: name.map(str::to_owned) }
    }

    #[test]
    fn derivation_table() {
        let full = ProcessFacts {
            uid: 1000,
            user_name: Some("alice".into()),
            gid: 100,
            group_name: Some("users".into()),
            supplementary_groups: vec![group(27, Some("sudo")), group(100, Some("users")), group(4242, None)],
            exe_path: Some("/usr/bin/sleep".into()),
            sha256: Some("ab".repeat(32)),
        };
        let sha = format!("unix:sha256:{}", "ab".repeat(32));
        let cases: Vec<(&str, ProcessFacts, Vec<&str>)> = vec![
            ("ids only", ProcessFacts::new(0, 0), vec!["unix:uid:0", "unix:gid:0"]),
            (
                "everything",
                full.clone(),
                vec![
                    "unix:uid:1000",
                    "unix:user:alice",
                    "unix:gid:100",
                    "unix:group:users",
                    "unix:supplementary_gid:27",
                    "unix:supplementary_group:sudo",
                    "unix:supplementary_gid:100",
                    "unix:supplementary_group:users",
                    "unix:supplementary_gid:4242",
                    "unix:path:/usr/bin/sleep",
                    &sha,
                ],
            ),
            (
                "names absent when lookups fail",
                ProcessFacts {
                    user_name: None,
                    group_name: None,
                    supplementary_groups: vec![group(27, None), group(100, None)],
                    exe_path: None,
                    sha256: None,
                    ..full.clone()
                },
                vec!["unix:uid:1000", "unix:gid:100", "unix:supplementary_gid:27", "unix:supplementary_gid:100"],
            ),
            (
                "deleted executable keeps the kernel's suffix",
                ProcessFacts { exe_path: Some("/opt/app (deleted)".into()), ..ProcessFacts::new(5, 6) },
                vec!["unix:uid:5", "unix:gid:6", "unix:path:/opt/app (deleted)"],
            ),
            (
                "values that cannot be selectors are left out",
                ProcessFacts {
                    user_name: Some("bad\nname".into()),
                    exe_path: Some(format!("/{}", "x".repeat(5000))),
                    ..ProcessFacts::new(5, 6)
                },
                vec!["unix:uid:5", "unix:gid:6"],
            ),
        ];
        for (name, facts, expected) in cases {
            assert_eq!(derive_selectors(&facts), set(&expected), "{name}");
        }
    }

    #[test]
    fn an_entry_on_uid_matches_whatever_else_the_caller_has() {
        let caller = derive_selectors(&ProcessFacts {
            supplementary_groups: vec![group(27, Some("sudo"))],
            exe_path: Some("/bin/x".into()),
            ..ProcessFacts::new(1000, 1000)
        });
        assert!(set(&["unix:uid:1000"]).is_subset_of(&caller));
        assert!(set(&["unix:uid:1000", "unix:supplementary_group:sudo"]).is_subset_of(&caller));
        assert!(!set(&["unix:uid:1000", "unix:path:/bin/y"]).is_subset_of(&caller));
    }
}
