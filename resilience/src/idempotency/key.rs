//! Parsing the key, fingerprinting the request, hashing the lock id.

use http::{HeaderMap, Method, StatusCode};
use sha2::{Digest, Sha256};

use super::IDEMPOTENCY_KEY;
use crate::problem::Problem;

/// Longest key accepted, in characters.
pub(crate) const MAX_KEY_LEN: usize = 255;

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid idempotency key")
        .kind("invalid-idempotency-key")
        .detail(detail)
}

/// The request's key: `None` if the header is absent, a 400 problem if it is
/// repeated or malformed (the rules [`IdempotencyLayer`](super::IdempotencyLayer)
/// applies).
pub fn parse_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(invalid("Idempotency-Key must appear once"));
    }
    parse_value(value.as_bytes()).map(Some).map_err(invalid)
}

/// A bare token or an RFC 8941 sf-string (`"abc"`, with `\"` and `\\`
/// escapes), holding 1 to 255 printable ASCII characters.
pub(crate) fn parse_value(raw: &[u8]) -> Result<String, &'static str> {
    let raw = trim_ows(raw);
    let key = if let Some(rest) = raw.strip_prefix(b"\"") {
        let Some(inner) = rest.strip_suffix(b"\"") else {
            return Err("unterminated quoted string");
        };
        let mut out = Vec::with_capacity(inner.len());
        let mut bytes = inner.iter();
        while let Some(&b) = bytes.next() {
            match b {
                b'\\' => match bytes.next() {
                    Some(&c @ (b'\\' | b'"')) => out.push(c),
                    _ => return Err("invalid escape in quoted string"),
                },
                b'"' => return Err("unescaped quote inside quoted string"),
                0x20..=0x7e => out.push(b),
                _ => return Err("the key must be printable ASCII"),
            }
        }
        out
    } else {
        if let Some(&b) = raw
            .iter()
            .find(|&&b| !(0x20..=0x7e).contains(&b) || b == b'"')
        {
            return Err(if b == b'"' {
                "stray quote in the key"
            } else {
                "the key must be printable ASCII"
            });
        }
        raw.to_vec()
    };
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.len() > MAX_KEY_LEN {
        return Err("the key is longer than 255 characters");
    }
    String::from_utf8(key).map_err(|_| "the key must be printable ASCII")
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// SHA-256 (hex) of method, path and query, and body. Method and path hold
/// no newline, so the encoding is unambiguous.
pub fn fingerprint(method: &Method, path_and_query: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(method.as_str().as_bytes());
    h.update(b"\n");
    h.update(path_and_query.as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}

/// The advisory lock id of a key: the first 8 bytes of SHA-256 over
/// (schema, scope, key), so services sharing a Postgres database do not
/// contend on each other's keys.
pub(crate) fn lock_id(schema: &str, scope: &str, key: &str) -> i64 {
    let mut h = Sha256::new();
    for part in [schema, scope, key] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_quoted_strings() {
        assert_eq!(parse_value(b"abc-123").unwrap(), "abc-123");
        assert_eq!(parse_value(b"\"abc\"").unwrap(), "abc");
        assert_eq!(parse_value(b"  abc ").unwrap(), "abc");
        assert_eq!(parse_value(br#""a\"b\\c""#).unwrap(), "a\"b\\c");
        assert_eq!(parse_value(b"a b").unwrap(), "a b");
        assert_eq!(parse_value(&[b'k'; 255]).unwrap().len(), 255);
    }

    #[test]
    fn rejects_bad_keys() {
        for bad in [
            &b""[..],
            b"\"\"",
            b"\"abc",
            b"ab\"c",
            b"\"a\"b\"",
            b"\"a\\nb\"",
            b"caf\xc3\xa9",
            b"a\tb",
            b"a\x01b",
            &[b'k'; 256],
        ] {
            assert!(
                parse_value(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn repeated_header_is_rejected() {
        let mut h = HeaderMap::new();
        h.append(IDEMPOTENCY_KEY, "a".parse().unwrap());
        h.append(IDEMPOTENCY_KEY, "b".parse().unwrap());
        assert!(parse_key(&h).is_err());
        assert_eq!(parse_key(&HeaderMap::new()).unwrap(), None);
    }

    #[test]
    fn fingerprints_differ_by_every_part() {
        let a = fingerprint(&Method::POST, "/w", b"x");
        assert_eq!(a.len(), 64);
        assert_ne!(a, fingerprint(&Method::PUT, "/w", b"x"));
        assert_ne!(a, fingerprint(&Method::POST, "/w?q=1", b"x"));
        assert_ne!(a, fingerprint(&Method::POST, "/w", b"y"));
        assert_eq!(a, fingerprint(&Method::POST, "/w", b"x"));
        assert_ne!(lock_id("s", "a", "bc"), lock_id("s", "ab", "c"));
    }
}
