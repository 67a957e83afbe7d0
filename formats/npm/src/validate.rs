//! npm names, versions and dist-tags: parsing and the rules of
//! [validate-npm-package-name](https://github.com/npm/validate-npm-package-name).
//!
//! Two levels of strictness, as in the npm tool itself:
//!
//! ```text
//!   legacy rules ─ every name that may exist in a registry (reads, existing packages):
//!                  non-empty, ≤ 214 chars, no leading `.`/`_`, no spaces, URL-safe,
//!                  scope `@[a-z0-9-~][a-z0-9-._~]*`
//!   new rules    ─ names of packages created now (first publish): legacy rules plus
//!                  lowercase only, none of ~'!()*, not a Node.js core module
//! ```
//!
//! This module owns no I/O; it turns strings into checked values.

use std::fmt;

use granary_format::FormatError;
use granary_format::model::PackageKey;

/// The longest package name npm allows, scope included.
const MAX_NAME_LEN: usize = 214;

/// Names npm reserves.
const BLOCKED_NAMES: &[&str] = &["node_modules", "favicon.ico"];

/// Node.js core modules: npm refuses them as names of new packages.
const CORE_MODULES: &[&str] = &[
    "assert",
    "async_hooks",
    "buffer",
    "child_process",
    "cluster",
    "console",
    "constants",
    "crypto",
    "dgram",
    "diagnostics_channel",
    "dns",
    "domain",
    "events",
    "fs",
    "http",
    "http2",
    "https",
    "inspector",
    "module",
    "net",
    "os",
    "path",
    "perf_hooks",
    "process",
    "punycode",
    "querystring",
    "readline",
    "repl",
    "stream",
    "string_decoder",
    "sys",
    "timers",
    "tls",
    "trace_events",
    "tty",
    "url",
    "util",
    "v8",
    "vm",
    "wasi",
    "worker_threads",
    "zlib",
];

/// Why a package name, version or tag is invalid. The messages follow the npm tools'.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// An empty name.
    #[error("name length must be greater than zero")]
    EmptyName,
    /// A name longer than 214 characters.
    #[error("name can no longer contain more than 214 characters")]
    NameTooLong,
    /// A name starting with `.`.
    #[error("name cannot start with a period")]
    LeadingPeriod,
    /// A name starting with `_`.
    #[error("name cannot start with an underscore")]
    LeadingUnderscore,
    /// A name with leading or trailing spaces.
    #[error("name cannot contain leading or trailing spaces")]
    Spaces,
    /// `node_modules` or `favicon.ico`.
    #[error("{0} is a blocked name")]
    Blocked(String),
    /// A Node.js core module name, for a new package.
    #[error("{0} is a core module name")]
    CoreModule(String),
    /// Capital letters, for a new package.
    #[error("name can no longer contain capital letters")]
    Capitals,
    /// One of `~'!()*`, for a new package.
    #[error("name can no longer contain special characters (\"~'!()*\")")]
    SpecialCharacters,
    /// Characters `encodeURIComponent` would escape.
    #[error("name can only contain URL-friendly characters")]
    NotUrlSafe,
    /// A malformed `@scope/` part.
    #[error("invalid scope: {0:?}")]
    Scope(String),
    /// Not a SemVer 2.0 version.
    #[error("invalid version {0:?}: versions must be valid SemVer (e.g. 1.0.0)")]
    Version(String),
    /// A malformed dist-tag.
    #[error("invalid tag {0:?}: tags must be URL-safe and not empty")]
    Tag(String),
    /// A dist-tag that reads as a version range (npm: "Tag name must not be a valid SemVer range").
    #[error("tag name must not be a valid SemVer range: {0}")]
    TagIsRange(String),
}

impl From<InvalidInput> for FormatError {
    fn from(err: InvalidInput) -> Self {
        FormatError::BadRequest(err.to_string())
    }
}

/// A parsed npm package name: `pkg` or `@scope/pkg`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageName {
    scope: Option<String>,
    name: String,
}

impl PackageName {
    /// Parses a decoded name (`pkg` or `@scope/pkg`) under the legacy rules, which every
    /// name that may exist in a registry satisfies.
    pub fn parse(full: &str) -> Result<Self, InvalidInput> {
        if full.is_empty() {
            return Err(InvalidInput::EmptyName);
        }
        if full.trim() != full {
            return Err(InvalidInput::Spaces);
        }
        if full.chars().count() > MAX_NAME_LEN {
            return Err(InvalidInput::NameTooLong);
        }
        if full.starts_with('.') {
            return Err(InvalidInput::LeadingPeriod);
        }
        if full.starts_with('_') {
            return Err(InvalidInput::LeadingUnderscore);
        }
        let (scope, name) = match full.strip_prefix('@') {
            Some(scoped) => {
                let Some((scope, name)) = scoped.split_once('/') else {
                    return Err(InvalidInput::Scope(full.to_owned()));
                };
                check_scope(scope)?;
                (Some(scope), name)
            }
            None => (None, full),
        };
        if name.is_empty() {
            return Err(InvalidInput::EmptyName);
        }
        if name.starts_with('.') {
            return Err(InvalidInput::LeadingPeriod);
        }
        if name.starts_with('_') {
            return Err(InvalidInput::LeadingUnderscore);
        }
        if BLOCKED_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(InvalidInput::Blocked(name.to_owned()));
        }
        if !name.chars().all(is_uri_component_char) {
            return Err(InvalidInput::NotUrlSafe);
        }
        Ok(Self {
            scope: scope.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// Parses a name and applies the rules for a package created now.
    pub fn parse_new(full: &str) -> Result<Self, InvalidInput> {
        let parsed = Self::parse(full)?;
        parsed.check_new()?;
        Ok(parsed)
    }

    /// Checks the extra rules for a package created now (lowercase, no `~'!()*`, not a
    /// core module).
    pub fn check_new(&self) -> Result<(), InvalidInput> {
        if self.name.chars().any(|c| "~'!()*".contains(c)) {
            return Err(InvalidInput::SpecialCharacters);
        }
        if self.name.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(InvalidInput::Capitals);
        }
        if self.scope.is_none() && CORE_MODULES.contains(&self.name.as_str()) {
            return Err(InvalidInput::CoreModule(self.name.clone()));
        }
        Ok(())
    }

    /// The scope without `@`, if any.
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The name without its scope (the tarball file prefix).
    pub fn unscoped(&self) -> &str {
        &self.name
    }

    /// The full name: `pkg` or `@scope/pkg`.
    pub fn full(&self) -> String {
        self.to_string()
    }

    /// The registry key: the scope is the namespace.
    pub fn key(&self) -> PackageKey {
        PackageKey::new(self.scope.as_deref(), &self.name)
    }

    /// The canonical tarball file name of a version: `{unscoped}-{version}.tgz`.
    pub fn tarball_file(&self, version: &str) -> String {
        format!("{}-{version}.tgz", self.name)
    }

    /// The version a tarball file name names: accepts `{unscoped}-{v}.tgz` and
    /// `@scope/pkg-{v}.tgz` (the name libnpmpublish gives the attachment).
    pub fn version_of_file<'a>(&self, file: &'a str) -> Option<&'a str> {
        let stem = file.strip_suffix(".tgz")?;
        let full_prefix = format!("{self}-");
        let short_prefix = format!("{}-", self.name);
        let version = stem
            .strip_prefix(full_prefix.as_str())
            .or_else(|| stem.strip_prefix(short_prefix.as_str()))?;
        (!version.is_empty()).then_some(version)
    }
}

impl fmt::Display for PackageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(scope) => write!(f, "@{scope}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// `@[a-z0-9-~][a-z0-9-._~]*` (without the `@`).
fn check_scope(scope: &str) -> Result<(), InvalidInput> {
    let mut chars = scope.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '~');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._~".contains(c));
    if first_ok && rest_ok {
        Ok(())
    } else {
        Err(InvalidInput::Scope(scope.to_owned()))
    }
}

/// Characters JavaScript's `encodeURIComponent` leaves alone.
fn is_uri_component_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.!~*'()".contains(c)
}

/// Parses a version: strict SemVer 2.0 (what `npm publish` sends after `semver.clean`).
pub fn parse_version(version: &str) -> Result<semver::Version, InvalidInput> {
    semver::Version::parse(version).map_err(|_| InvalidInput::Version(version.to_owned()))
}

/// Checks a dist-tag: 1–128 URL-safe characters, not something npm would read as a
/// version range (`1`, `v2`, `^1.0.0`, `1.x`, …), since `npm install pkg@<tag>` must
/// resolve to the tag.
pub fn check_tag(tag: &str) -> Result<(), InvalidInput> {
    if tag.is_empty()
        || tag.len() > 128
        || tag.starts_with('.')
        || !tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.~".contains(c))
    {
        return Err(InvalidInput::Tag(tag.to_owned()));
    }
    if looks_like_range(tag) {
        return Err(InvalidInput::TagIsRange(tag.to_owned()));
    }
    Ok(())
}

/// An approximation of node-semver's `validRange` for strings that passed the tag
/// charset: anything starting with a digit (optionally after `v`), or an `x`/`X` wildcard.
fn looks_like_range(tag: &str) -> bool {
    let body = tag.strip_prefix(['v', 'V']).unwrap_or(tag);
    body.starts_with(|c: char| c.is_ascii_digit())
        || matches!(tag, "x" | "X")
        || semver::VersionReq::parse(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unscoped_and_scoped() {
        let n = PackageName::parse("left-pad").unwrap();
        assert_eq!(n.scope(), None);
        assert_eq!(n.key(), PackageKey::new(None, "left-pad"));
        let s = PackageName::parse("@acme/widget").unwrap();
        assert_eq!(s.scope(), Some("acme"));
        assert_eq!(s.unscoped(), "widget");
        assert_eq!(s.full(), "@acme/widget");
        assert_eq!(s.key(), PackageKey::new(Some("acme"), "widget"));
    }

    #[test]
    fn rejects_bad_names() {
        for (name, err) in [
            ("", InvalidInput::EmptyName),
            (".hidden", InvalidInput::LeadingPeriod),
            ("_under", InvalidInput::LeadingUnderscore),
            (" spaced", InvalidInput::Spaces),
            ("node_modules", InvalidInput::Blocked("node_modules".into())),
            ("favicon.ico", InvalidInput::Blocked("favicon.ico".into())),
            ("a b", InvalidInput::NotUrlSafe),
            ("a/b", InvalidInput::NotUrlSafe),
            ("a%20b", InvalidInput::NotUrlSafe),
            ("@Acme/x", InvalidInput::Scope("Acme".into())),
            ("@/x", InvalidInput::Scope(String::new())),
            ("@.a/x", InvalidInput::Scope(".a".into())),
            ("@acme", InvalidInput::Scope("@acme".into())),
            ("@acme/", InvalidInput::EmptyName),
            ("@acme/.x", InvalidInput::LeadingPeriod),
            ("@acme/a/b", InvalidInput::NotUrlSafe),
        ] {
            assert_eq!(PackageName::parse(name), Err(err), "{name:?}");
        }
        assert_eq!(
            PackageName::parse(&"a".repeat(215)),
            Err(InvalidInput::NameTooLong)
        );
        assert!(PackageName::parse(&"a".repeat(214)).is_ok());
        assert_eq!(
            PackageName::parse(&format!("@s/{}", "a".repeat(212))),
            Err(InvalidInput::NameTooLong)
        );
    }

    #[test]
    fn new_names_are_stricter() {
        assert!(PackageName::parse("JSONStream").is_ok());
        assert_eq!(
            PackageName::parse_new("JSONStream"),
            Err(InvalidInput::Capitals)
        );
        assert_eq!(
            PackageName::parse_new("ok!"),
            Err(InvalidInput::SpecialCharacters)
        );
        assert_eq!(
            PackageName::parse_new("fs"),
            Err(InvalidInput::CoreModule("fs".into()))
        );
        assert!(PackageName::parse_new("@acme/fs").is_ok());
        assert!(PackageName::parse_new("@~tilde-scope/x.y_z-1").is_ok());
    }

    #[test]
    fn tarball_files() {
        let s = PackageName::parse("@acme/widget").unwrap();
        assert_eq!(s.tarball_file("1.0.0"), "widget-1.0.0.tgz");
        assert_eq!(s.version_of_file("widget-1.0.0.tgz"), Some("1.0.0"));
        assert_eq!(
            s.version_of_file("@acme/widget-0.1.0-beta.1.tgz"),
            Some("0.1.0-beta.1")
        );
        assert_eq!(s.version_of_file("other-1.0.0.tgz"), None);
        assert_eq!(s.version_of_file("widget-.tgz"), None);
        assert_eq!(s.version_of_file("widget-1.0.0.zip"), None);
    }

    #[test]
    fn versions() {
        assert!(parse_version("1.0.0").is_ok());
        assert!(parse_version("0.1.0-beta.1").is_ok());
        assert!(parse_version("1.0.0+build.5").is_ok());
        for bad in [
            "", "1", "1.0", "v1.0.0", "=1.0.0", "01.0.0", "1.0.0 ", "latest",
        ] {
            assert!(parse_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags() {
        for ok in [
            "latest",
            "next",
            "beta",
            "canary-2024",
            "v-next",
            "legacy_1",
        ] {
            assert_eq!(check_tag(ok), Ok(()), "{ok}");
        }
        for range in ["1", "1.2", "1.x", "v2", "x", "*", "1.0.0"] {
            assert!(check_tag(range).is_err(), "{range}");
        }
        for bad in ["", "a/b", "a b", "^1", ">=1", ".x"] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }
}
