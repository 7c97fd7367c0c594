//! The job token: required on every call, compared in constant time.

use tonic::metadata::MetadataMap;
use tonic::Status;

/// The metadata key the token travels in.
pub const HEADER: &str = "authorization";

/// The header value for `token`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Equal bytes, in time that depends only on the length.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `got` is the token (anything is, if none is configured), compared in constant time.
pub(crate) fn same_token(got: &[u8], token: Option<&str>) -> bool {
    token.is_none_or(|t| same(got, t.as_bytes()))
}

/// Accepts the call if no token is configured or it carries the right one.
pub fn check(metadata: &MetadataMap, token: Option<&str>) -> Result<(), Status> {
    let Some(token) = token else { return Ok(()) };
    let got = metadata.get(HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if same(got, bearer(token).as_bytes()) {
        Ok(())
    } else {
        Err(Status::unauthenticated("missing or wrong job token (authorization: Bearer <token>)"))
    }
}

/// Shortest token accepted: 16 bytes (a guessable token is no token).
pub const MIN_TOKEN_BYTES: usize = 16;

/// The value `deploy/k8s/token-secret.yaml` ships with, refused so that a run whose Secret was
/// not replaced does not start.
pub const PLACEHOLDER: &str = "replace-me-with-a-random-token";

/// Whether `token` may guard a job: at least `MIN_TOKEN_BYTES` bytes and at most the
/// `MAX_TOKEN` a lane's hello carries, not blank, not the manifests' placeholder. `Err` says
/// what to do.
pub fn validate(token: &str) -> Result<(), String> {
    if token.trim().is_empty() {
        return Err("the job token is empty".into());
    }
    if token.trim() == PLACEHOLDER {
        return Err(format!(
            "the job token is the manifests' placeholder {PLACEHOLDER:?}: create the dtrain-token Secret with a random \
             token (deploy/README.md)"
        ));
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "the job token has {} bytes; use at least {MIN_TOKEN_BYTES} random ones (e.g. head -c 32 /dev/urandom | base64)",
            token.len()
        ));
    }
    if token.len() > dtrain_proto::lane::MAX_TOKEN {
        return Err(format!(
            "the job token has {} bytes; use at most {} (32 random bytes in base64 are plenty)",
            token.len(),
            dtrain_proto::lane::MAX_TOKEN
        ));
    }
    Ok(())
}

/// The job token: from `file` if given, else from the environment (`DTRAIN_TOKEN`), never
/// from a command-line flag, which every local user can read in the process list.
pub fn token(file: Option<&std::path::Path>) -> Result<Option<String>, crate::ClusterError> {
    match file {
        Some(f) => read_token_file(f).map(Some),
        None => Ok(std::env::var("DTRAIN_TOKEN").ok()),
    }
}

/// A fresh token of 32 random bytes (hex), from the operating system's generator.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A fresh chain ticket: 64 random bits from the operating system's generator, never 0 (which
/// means "no predecessor"). Without /dev/urandom, a hash of the time with a random key.
pub fn ticket() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    let t = match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => crate::shm::nonce(),
    };
    t.max(1)
}

/// Reads a token from a file (trimmed); an error names the file.
pub fn read_token_file(path: &std::path::Path) -> Result<String, crate::ClusterError> {
    let what = format!("{}: cannot read the token", path.display());
    let t = std::fs::read_to_string(path).map_err(|cause| crate::ClusterError::Io { what, cause })?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(crate::ClusterError::Config(format!("{}: the token file is empty", path.display())));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_blank_and_placeholder_tokens_are_refused() {
        assert!(validate("0123456789abcdef").is_ok());
        assert!(validate("0123456789abcde").unwrap_err().contains("15 bytes"));
        assert!(validate("   ").unwrap_err().contains("empty"));
        assert!(validate(&"x".repeat(1025)).unwrap_err().contains("at most 1024"));
        assert!(validate(&"x".repeat(1024)).is_ok());
        assert!(validate(PLACEHOLDER).unwrap_err().contains("placeholder"));
        assert!(validate(&random_token().unwrap()).is_ok());
    }

    #[test]
    fn tokens() {
        let mut m = MetadataMap::new();
        assert!(check(&m, None).is_ok());
        assert_eq!(check(&m, Some("s3cret")).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert(HEADER, bearer("s3cret").parse().unwrap());
        assert!(check(&m, Some("s3cret")).is_ok());
        assert!(check(&m, Some("s3cres")).is_err());
    }
}
