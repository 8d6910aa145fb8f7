//! The agent's half of the `k8s_psat` and `oidc` node attestors: the token file.
//!
//! The file is read at every attestation attempt, so a token the kubelet (or whatever keeps
//! the file fresh) rotated in is the one sent. It must hold one compact JWT of at most
//! [`MAX_TOKEN_LEN`] bytes; surrounding whitespace (a trailing newline) is dropped. The server
//! does every check that matters; the agent only refuses what cannot be a token, with an error
//! naming the configuration key and the file.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use tessera_common::node_token::{K8S_PSAT, MAX_TOKEN_LEN, OIDC};

use crate::config::{K8sPsatConfig, OidcConfig};

/// Where a token attestor's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    /// `k8s_psat` or `oidc`: the attestation type.
    pub attestor: &'static str,
    /// The configuration key of the path, for errors.
    pub key: &'static str,
    /// The file.
    pub path: PathBuf,
}

impl TokenFile {
    /// `[node_attestor.k8s_psat]`.
    pub fn k8s_psat(config: &K8sPsatConfig) -> Self {
        Self { attestor: K8S_PSAT, key: "node_attestor.k8s_psat.token_path", path: config.token_path.clone() }
    }

    /// `[node_attestor.oidc]`.
    pub fn oidc(config: &OidcConfig) -> Self {
        Self { attestor: OIDC, key: "node_attestor.oidc.token_path", path: config.token_path.clone() }
    }

    /// Reads the token now. The error names the key and the file.
    pub fn read(&self) -> Result<String, String> {
        read_token(&self.path).map_err(|reason| format!("{} {}: {reason}", self.key, self.path.display()))
    }
}

fn read_token(path: &Path) -> Result<String, String> {
    let file =
        std::fs::File::open(path).map_err(|error| format!("cannot read: {}", crate::config::io_message(&error)))?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells "too large" apart, whatever the file's size claims.
    file.take(MAX_TOKEN_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|error| format!("cannot read: {}", crate::config::io_message(&error)))?;
    if bytes.len() > MAX_TOKEN_LEN {
        return Err(format!("larger than {MAX_TOKEN_LEN} bytes: not a token"));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8: not a token".to_owned())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("empty: no token has been written there yet".to_owned());
    }
    let parts = token.split('.').count();
    if parts != 3 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("not a compact JWT (three base64url parts separated by dots)".to_owned());
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, contents: &[u8]) -> TokenFile {
        let path = dir.join("token");
        std::fs::write(&path, contents).unwrap();
        TokenFile::oidc(&OidcConfig { token_path: path })
    }

    #[test]
    fn reads_and_trims_a_token() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(file(dir.path(), b"aGVhZA.Ym9keQ.c2ln\n").read().unwrap(), "aGVhZA.Ym9keQ.c2ln");
        let k8s = TokenFile::k8s_psat(&K8sPsatConfig::default());
        assert_eq!(
            (k8s.attestor, k8s.path.as_path()),
            ("k8s_psat", Path::new("/var/run/secrets/tokens/tessera-agent"))
        );
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TokenFile::oidc(&OidcConfig { token_path: dir.path().join("absent") });
        let error = missing.read().unwrap_err();
        assert!(error.starts_with("node_attestor.oidc.token_path ") && error.contains("absent"), "{error}");
        assert!(error.contains("cannot read"), "{error}");
        for (contents, expected) in [
            (b" \n".to_vec(), "empty"),
            (vec![b'a'; MAX_TOKEN_LEN + 1], "larger than 16384 bytes"),
            (vec![0xff, 0xfe, b'.', b'.'], "not UTF-8"),
            (b"just-one-part".to_vec(), "not a compact JWT"),
            (b"a.b c.d".to_vec(), "not a compact JWT"),
        ] {
            let error = file(dir.path(), &contents).read().unwrap_err();
            assert!(error.contains(expected), "{expected}: {error}");
            assert!(error.contains(&dir.path().join("token").display().to_string()), "{error}");
        }
    }
}
