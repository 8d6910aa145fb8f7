//! Parsers of the two `/proc/<pid>` files attestation reads: `stat` and `status`.
//!
//! Both take raw bytes: the command name inside them is chosen by the caller (`prctl(PR_SET_NAME)`,
//! or simply the executable's file name), may contain spaces, parentheses, newlines and bytes
//! that are not UTF-8, and must never make the parser panic or misread a field.

/// The fields of `/proc/<pid>/stat` that attestation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3, the state letter (`R`, `S`, `Z` for a zombie, `X` for dead, ...).
    pub state: u8,
    /// Field 22, the start time in clock ticks since boot. A reused pid gets a new start time,
    /// which is why it pins the process identity.
    pub start_time: u64,
}

impl ProcStat {
    /// True for a zombie or dead process: it has exited, whoever holds its socket.
    pub fn has_exited(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// The credential lines of `/proc/<pid>/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStatus {
    /// `Uid:` real, effective, saved set and filesystem uid.
    pub uids: [u32; 4],
    /// `Gid:` real, effective, saved set and filesystem gid.
    pub gids: [u32; 4],
    /// `Groups:` the supplementary group ids, as the kernel lists them.
    pub groups: Vec<u32>,
}

impl ProcStatus {
    /// The effective uid: the one SO_PEERCRED reports and SPIRE's `unix:uid` selector uses.
    pub fn effective_uid(&self) -> u32 {
        self.uids[1]
    }

    /// The effective gid: the one SO_PEERCRED reports and SPIRE's `unix:gid` selector uses.
    pub fn effective_gid(&self) -> u32 {
        self.gids[1]
    }
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid ...`.
///
/// The command name may contain `)` and spaces, so the fields after it are found after the
/// *last* `)` of the file: no later field can contain one.
pub fn parse_stat(content: &[u8]) -> Result<ProcStat, &'static str> {
    let open = content.iter().position(|&b| b == b'(').ok_or("no '(' before the command name")?;
    let close = content.iter().rposition(|&b| b == b')').ok_or("no ')' after the command name")?;
    if close < open {
        return Err("')' before '('");
    }
    let tail = content.get(close + 1..).ok_or("nothing after the command name")?;
    let tail = std::str::from_utf8(tail).map_err(|_| "bytes after the command name are not UTF-8")?;
    let mut fields = tail.split_ascii_whitespace();
    let state = match fields.next().map(str::as_bytes) {
        Some([letter]) if letter.is_ascii_alphabetic() => *letter,
        _ => return Err("field 3 (state) is not a letter"),
    };
    // Field 3 was the state; `nth(18)` skips fields 4 to 21 and yields field 22.
    let start_time = fields
        .nth(18)
        .ok_or("fewer than 22 fields")?
        .parse::<u64>()
        .map_err(|_| "field 22 (starttime) is not a number")?;
    Ok(ProcStat { state, start_time })
}

/// Parses the `Uid:`, `Gid:` and `Groups:` lines of `/proc/<pid>/status`.
///
/// Each line must appear exactly once. The kernel escapes newlines in the `Name:` line, so a
/// command name cannot forge a second `Uid:` line; refusing duplicates makes that fail closed
/// even on a kernel that did not.
pub fn parse_status(content: &[u8]) -> Result<ProcStatus, &'static str> {
    let mut uids = None;
    let mut gids = None;
    let mut groups = None;
    for line in content.split(|&b| b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"Uid:") {
            if uids.replace(parse_id_quad(rest, "malformed Uid: line")?).is_some() {
                return Err("more than one Uid: line");
            }
        } else if let Some(rest) = line.strip_prefix(b"Gid:") {
            if gids.replace(parse_id_quad(rest, "malformed Gid: line")?).is_some() {
                return Err("more than one Gid: line");
            }
        } else if let Some(rest) = line.strip_prefix(b"Groups:") {
            let list = std::str::from_utf8(rest)
                .map_err(|_| "malformed Groups: line")?
                .split_ascii_whitespace()
                .map(|n| n.parse::<u32>().map_err(|_| "malformed Groups: line"))
                .collect::<Result<Vec<_>, _>>()?;
            if groups.replace(list).is_some() {
                return Err("more than one Groups: line");
            }
        }
    }
    Ok(ProcStatus {
        uids: uids.ok_or("no Uid: line")?,
        gids: gids.ok_or("no Gid: line")?,
        groups: groups.ok_or("no Groups: line")?,
    })
}

fn parse_id_quad(rest: &[u8], error: &'static str) -> Result<[u32; 4], &'static str> {
    let text = std::str::from_utf8(rest).map_err(|_| error)?;
    let mut ids = [0u32; 4];
    let mut fields = text.split_ascii_whitespace();
    for id in &mut ids {
        *id = fields.next().ok_or(error)?.parse().map_err(|_| error)?;
    }
    if fields.next().is_some() {
        return Err(error);
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `stat` line with the given command name, state `S` and start time 987654.
    fn stat_line(comm: &[u8]) -> Vec<u8> {
        let mut line = b"4242 (".to_vec();
        line.extend_from_slice(comm);
        line.extend_from_slice(
            b") S 1 4242 4242 0 -1 4194560 120 0 0 0 1 2 0 0 20 0 1 0 987654 8192000 200 18446744073709551615 \
              1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n",
        );
        line
    }

    #[test]
    fn stat_start_time_survives_hostile_command_names() {
        let names: &[&[u8]] = &[
            b"sleep",
            b"a) (b",
            b"a b c",
            b")",
            b"((",
            b") S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
            b"new\nline",
            b"\xff\xfe not utf8",
            b"",
        ];
        for name in names {
            let stat = parse_stat(&stat_line(name)).unwrap_or_else(|e| panic!("{name:?}: {e}"));
            assert_eq!(stat, ProcStat { state: b'S', start_time: 987654 }, "{name:?}");
            assert!(!stat.has_exited());
        }
    }

    #[test]
    fn stat_of_a_zombie_says_so() {
        let line = String::from_utf8(stat_line(b"x")).unwrap().replacen(") S ", ") Z ", 1);
        assert!(parse_stat(line.as_bytes()).unwrap().has_exited());
    }

    #[test]
    fn malformed_stat_is_an_error_not_a_panic() {
        let cases: &[&[u8]] = &[
            b"",
            b"4242",
            b"4242 (sleep",
            b"4242 sleep) S 1",
            b")( S 1",
            b"4242 (sleep)",
            b"4242 (sleep) S 1 2 3",
            b"4242 (sleep) 7 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19",
            b"4242 (sleep) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 -5",
            b"4242 (sleep) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 \xff",
        ];
        for case in cases {
            assert!(parse_stat(case).is_err(), "{:?}", String::from_utf8_lossy(case));
        }
    }

    const STATUS: &[u8] = b"Name:\tbash\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t7\nPid:\t7\n\
        Uid:\t1000\t1001\t1002\t1003\nGid:\t100\t101\t102\t103\nFDSize:\t256\n\
        Groups:\t4 24 27 100 \nNStgid:\t7\n";

    #[test]
    fn status_credentials() {
        let status = parse_status(STATUS).unwrap();
        assert_eq!(status.uids, [1000, 1001, 1002, 1003]);
        assert_eq!(status.gids, [100, 101, 102, 103]);
        assert_eq!(status.groups, [4, 24, 27, 100]);
        assert_eq!((status.effective_uid(), status.effective_gid()), (1001, 101));
        let none = parse_status(b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(none.groups.is_empty());
    }

    #[test]
    fn malformed_status_is_an_error_not_a_panic() {
        let forged = b"Name:\tx\nUid:\t0\t0\t0\t0\nUid:\t1000\t1000\t1000\t1000\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        let cases: &[(&[u8], &str)] = &[
            (b"", "no Uid: line"),
            (b"Uid:\t0\t0\t0\t0\nGroups:\t\n", "no Gid: line"),
            (b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n", "no Groups: line"),
            (forged, "more than one Uid: line"),
            (b"Uid:\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n", "malformed Uid: line"),
            (b"Uid:\t0\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n", "malformed Uid: line"),
            (b"Uid:\t0\t0\t0\t-1\nGid:\t0\t0\t0\t0\nGroups:\t\n", "malformed Uid: line"),
            (b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t\xff\nGroups:\t\n", "malformed Gid: line"),
            (b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t1 x\n", "malformed Groups: line"),
            (b"Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t4294967296\n", "malformed Groups: line"),
        ];
        for (input, reason) in cases {
            assert_eq!(parse_status(input), Err(*reason), "{:?}", String::from_utf8_lossy(input));
        }
    }
}
