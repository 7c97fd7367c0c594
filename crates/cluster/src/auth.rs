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

/// A fresh token of 32 random bytes (hex), from the operating system's generator.
pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
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
    fn tokens() {
        let mut m = MetadataMap::new();
        assert!(check(&m, None).is_ok());
        assert_eq!(check(&m, Some("s3cret")).unwrap_err().code(), tonic::Code::Unauthenticated);
        m.insert(HEADER, bearer("s3cret").parse().unwrap());
        assert!(check(&m, Some("s3cret")).is_ok());
        assert!(check(&m, Some("s3cres")).is_err());
    }
}
