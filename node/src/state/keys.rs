//! Key layout of the `state` column family. A key is a one-byte table tag followed by its
//! components, each terminated by a zero byte, so a prefix of components is a prefix of keys.
//!
//! ```text
//!   D domain                                   → DomainRecord
//!   R domain repo                              → RepositoryRecord
//!   P domain repo format namespace name        → PackageRecord     (namespace "" = none)
//!   V domain repo format namespace name version → VersionRecord
//!   K access-key-id                            → Principal
//!   T kid                                      → TokenKey
//!   M "applied" | "membership"                 → Raft bookkeeping
//! ```

use granary_format::model::PackageKey;

pub(crate) const DOMAIN: u8 = b'D';
pub(crate) const REPOSITORY: u8 = b'R';
pub(crate) const PACKAGE: u8 = b'P';
pub(crate) const VERSION: u8 = b'V';
pub(crate) const ACCESS_KEY: u8 = b'K';
pub(crate) const TOKEN_KEY: u8 = b'T';

/// Builds a key from a tag and components.
pub(crate) fn key(tag: u8, parts: &[&str]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p.as_bytes());
        k.push(0);
    }
    k
}

pub(crate) fn domain(name: &str) -> Vec<u8> {
    key(DOMAIN, &[name])
}

pub(crate) fn repository(domain: &str, repo: &str) -> Vec<u8> {
    key(REPOSITORY, &[domain, repo])
}

pub(crate) fn package(domain: &str, repo: &str, format: &str, pkg: &PackageKey) -> Vec<u8> {
    key(
        PACKAGE,
        &[
            domain,
            repo,
            format,
            pkg.namespace.as_deref().unwrap_or(""),
            &pkg.name,
        ],
    )
}

pub(crate) fn version(
    domain: &str,
    repo: &str,
    format: &str,
    pkg: &PackageKey,
    v: &str,
) -> Vec<u8> {
    key(
        VERSION,
        &[
            domain,
            repo,
            format,
            pkg.namespace.as_deref().unwrap_or(""),
            &pkg.name,
            v,
        ],
    )
}

pub(crate) fn access_key(id: &str) -> Vec<u8> {
    key(ACCESS_KEY, &[id])
}

pub(crate) fn token_key(kid: &str) -> Vec<u8> {
    key(TOKEN_KEY, &[kid])
}

pub(crate) const APPLIED: &[u8] = b"M\0applied\0";
pub(crate) const MEMBERSHIP: &[u8] = b"M\0membership\0";
/// While a batch entry is being applied: its index and how many of its commands are
/// written, so that a restart in its middle goes on from there (`raft::state_machine`).
pub(crate) const BATCH_PROGRESS: &[u8] = b"M\0batch\0";

/// The first key after every key starting with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

/// Splits a key's components (after the tag).
pub(crate) fn parts(key: &[u8]) -> Vec<&str> {
    key.get(1..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|p| std::str::from_utf8(p).ok())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .skip(1)
        .rev()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_nest() {
        let pkg = PackageKey::new(Some("s"), "p");
        let v = version("d", "r", "npm", &pkg, "1.0.0");
        let prefix = key(VERSION, &["d", "r", "npm", "s", "p"]);
        assert!(v.starts_with(&prefix));
        assert!(v.as_slice() < prefix_end(&prefix).as_slice());
        // A repository named "r2" is not inside "r"'s prefix.
        let other = repository("d", "r2");
        assert!(!other.starts_with(&repository("d", "r")));
        assert_eq!(parts(&v), vec!["d", "r", "npm", "s", "p", "1.0.0"]);
    }
}
