//! The admin API's bearer token (`[api] token-file`): reading it and comparing it with what a
//! client presents without leaking, through timing, how much of a guess was right.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use super::ConfigError;

/// Longer token files are refused: a token is a short secret, and the file is re-read every
/// poll, so a wrong path pointing at something big must not be slurped every 2 s.
pub const TOKEN_FILE_MAX_BYTES: u64 = 4096;

/// A bearer token. Its `Debug` output is redacted so that it never reaches a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(Arc<[u8]>);

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiToken(<{} bytes redacted>)", self.0.len())
    }
}

impl ApiToken {
    /// Reads `path`; the token is its content with surrounding whitespace trimmed (files
    /// written by `echo` or editors end with a newline; Kubernetes Secrets often do too).
    pub fn read(path: &Path) -> Result<ApiToken, ConfigError> {
        let fail = |message: String| ConfigError::TokenFile {
            path: path.to_path_buf(),
            message,
        };
        let mut raw = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(TOKEN_FILE_MAX_BYTES + 1).read_to_end(&mut raw))
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if raw.len() as u64 > TOKEN_FILE_MAX_BYTES {
            return Err(fail(format!(
                "is larger than {TOKEN_FILE_MAX_BYTES} bytes; expected a token"
            )));
        }
        Self::from_bytes(&raw).map_err(|m| fail(m.into()))
    }

    /// The token in `raw` (trimmed), or why there is none.
    pub fn from_bytes(raw: &[u8]) -> Result<ApiToken, &'static str> {
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err("is empty (after trimming whitespace); expected a token");
        }
        // A control character (e.g. a second line) cannot be sent in an HTTP header, so such a
        // token could never be presented: refuse it here with a clear message instead.
        if token.iter().any(|b| b.is_ascii_control()) {
            return Err("contains a control character (more than one line?); expected one token");
        }
        Ok(ApiToken(token.into()))
    }

    /// Whether `presented` equals the token. The time taken depends only on the token's
    /// length, not on where the first difference is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(&self.0, presented)
    }
}

/// Compares every byte of `expected` whatever the outcome; a length mismatch is folded into
/// the same accumulator instead of returning early.
fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    let mut diff = expected.len() ^ presented.len();
    for (i, &e) in expected.iter().enumerate() {
        let p = presented.get(i).copied().unwrap_or(0);
        diff |= usize::from(e ^ p);
    }
    // Keeps the optimiser from turning the loop into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_agrees_with_eq() {
        for (a, b) in [
            (&b"secret"[..], &b"secret"[..]),
            (b"secret", b"secreT"),
            (b"secret", b"secret2"),
            (b"secret", b"secre"),
            (b"secret", b""),
            (b"a", b"b"),
            // Equal except for a trailing NUL: the length must still count.
            (b"abc", b"abc\0"),
        ] {
            assert_eq!(constant_time_eq(a, b), a == b, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn tokens_are_trimmed_and_checked() {
        let t = ApiToken::from_bytes(b"  s3cret\n").unwrap();
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cret\n"));
        assert!(!t.matches(b"s3cre"));
        assert!(ApiToken::from_bytes(b"").is_err());
        assert!(ApiToken::from_bytes(b" \n\t ").is_err());
        assert!(ApiToken::from_bytes(b"one\ntwo").is_err());
    }

    #[test]
    fn debug_does_not_show_the_token() {
        let t = ApiToken::from_bytes(b"hunter2").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn read_errors_name_the_path() {
        let dir = std::env::temp_dir().join(format!("tiproxy-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing");
        let err = ApiToken::read(&missing).unwrap_err().to_string();
        assert!(
            err.contains("api.token-file") && err.contains("missing"),
            "{err}"
        );

        let empty = dir.join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = ApiToken::read(&empty).unwrap_err().to_string();
        assert!(
            err.contains(&*empty.to_string_lossy()) && err.contains("empty"),
            "{err}"
        );

        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; TOKEN_FILE_MAX_BYTES as usize + 1]).unwrap();
        let err = ApiToken::read(&big).unwrap_err().to_string();
        assert!(err.contains("larger"), "{err}");

        let good = dir.join("good");
        std::fs::write(&good, "tok\n").unwrap();
        assert!(ApiToken::read(&good).unwrap().matches(b"tok"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
