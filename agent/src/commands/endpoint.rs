//! Where the Workload API is: `--socket-path`, else `SPIFFE_ENDPOINT_SOCKET`, else the default.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::cli::DEFAULT_SOCKET_PATH;

/// The environment variable SPIFFE clients read the Workload API address from.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "SPIFFE_ENDPOINT_SOCKET";

/// Why `SPIFFE_ENDPOINT_SOCKET` could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The value is not UTF-8.
    #[error("{SPIFFE_ENDPOINT_SOCKET} is not valid UTF-8")]
    NotUtf8,
    /// The value is not an address the agent can be reached at.
    #[error("{SPIFFE_ENDPOINT_SOCKET}={value:?} is invalid: {reason}")]
    Invalid {
        /// The value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The socket path: the flag wins, then the environment variable, then the default.
pub fn resolve_socket(flag: Option<&Path>, env: Option<&OsStr>) -> Result<PathBuf, EndpointError> {
    if let Some(path) = flag {
        return Ok(path.to_owned());
    }
    match env {
        Some(value) if !value.is_empty() => parse_unix_endpoint(value.to_str().ok_or(EndpointError::NotUtf8)?),
        _ => Ok(PathBuf::from(DEFAULT_SOCKET_PATH)),
    }
}

/// Parses a Workload API endpoint URI of the `unix` scheme (conformance §5.2): `unix:///path`
/// or `unix:/path`; an absolute path, no authority, query or fragment. `tcp://` endpoints are
/// valid SPIFFE endpoints but the agent serves only a Unix socket.
pub fn parse_unix_endpoint(value: &str) -> Result<PathBuf, EndpointError> {
    let invalid = |reason| EndpointError::Invalid { value: value.to_owned(), reason };
    let Some((scheme, rest)) = value.split_once(':') else {
        return Err(invalid("expected a URI such as unix:///tmp/tessera-agent/public/api.sock"));
    };
    match scheme {
        "unix" => {}
        "tcp" => return Err(invalid("tcp endpoints are not supported: the Tessera agent serves a Unix socket")),
        _ => return Err(invalid("workload endpoint socket URI must have a \"tcp\" or \"unix\" scheme")),
    }
    if rest.contains('?') || rest.contains('#') {
        return Err(invalid("unix: endpoint socket URI must not include query values or a fragment"));
    }
    let path = match rest.strip_prefix("//") {
        Some(after_authority) if after_authority.starts_with('/') => after_authority,
        Some(_) => return Err(invalid("unix: endpoint socket URI must not include an authority")),
        None if rest.starts_with('/') => rest,
        None => return Err(invalid("unix: endpoint socket URI must have an absolute path")),
    };
    if path.trim_end_matches('/').is_empty() {
        return Err(invalid("unix: endpoint socket URI must include a path to the socket"));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_both_unix_forms() {
        assert_eq!(parse_unix_endpoint("unix:///run/agent.sock").unwrap(), Path::new("/run/agent.sock"));
        assert_eq!(parse_unix_endpoint("unix:/run/agent.sock").unwrap(), Path::new("/run/agent.sock"));
    }

    #[test]
    fn rejects_what_the_spec_forbids() {
        for bad in [
            "unix://",
            "unix:///",
            "unix:opaque",
            "unix:///p?x",
            "unix:///p#x",
            "unix://john:doe@foo/path",
            "unix://foo",
            "tcp://127.0.0.1:8081",
            "http://x",
            "/plain/path",
            "",
        ] {
            assert!(parse_unix_endpoint(bad).is_err(), "{bad} was accepted");
        }
        let err = parse_unix_endpoint("unix://host/p").unwrap_err().to_string();
        assert_eq!(
            err,
            r#"SPIFFE_ENDPOINT_SOCKET="unix://host/p" is invalid: unix: endpoint socket URI must not include an authority"#
        );
    }

    #[test]
    fn the_flag_wins_then_the_environment_then_the_default() {
        let flag = Path::new("/flag.sock");
        let env = OsStr::new("unix:///env.sock");
        assert_eq!(resolve_socket(Some(flag), Some(env)).unwrap(), flag);
        assert_eq!(resolve_socket(None, Some(env)).unwrap(), Path::new("/env.sock"));
        assert_eq!(resolve_socket(None, None).unwrap(), Path::new(DEFAULT_SOCKET_PATH));
        assert_eq!(resolve_socket(None, Some(OsStr::new(""))).unwrap(), Path::new(DEFAULT_SOCKET_PATH));
        assert!(resolve_socket(None, Some(OsStr::new("tcp://127.0.0.1:1"))).is_err());
    }
}
