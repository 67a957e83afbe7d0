//! Turns an npm CLI request (method, path after `/npm/{domain}/{repository}/`, a few
//! headers) into a [`Route`]. Owns path safety; touches no storage.
//!
//! ```text
//!   rest (percent-encoded) ─decode─▶ check (`..`, `\`, controls, empty segments) ─split '/'─▶
//!     ["-", …]                          registry endpoints (whoami, ping, dist-tags, audit, …)
//!     [name(@scope,pkg)]                packument / publish
//!     [name, "-rev", rev]               document update / unpublish all
//!     [name, "-", file(@scope,file)]    tarball
//!     [name, "-", file, "-rev", rev]    tarball delete
//!     [name, version-or-tag]            one version's manifest
//! ```
//!
//! Decoding before splitting accepts both `@scope%2fpkg` (what the CLI sends) and
//! `@scope/pkg`.

use http::header;
use percent_encoding::percent_decode_str;

use granary_format::{Action, FormatError};

use crate::validate::PackageName;

/// The media type of abbreviated packuments.
pub(crate) const ABBREVIATED_MEDIA_TYPE: &str = "application/vnd.npm.install-v1+json";

/// What a read request carries besides its target: HEAD and conditional headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadRequest {
    /// A HEAD request: same headers as GET, empty body.
    pub head: bool,
    /// The `If-None-Match` header, if any.
    pub if_none_match: Option<String>,
}

/// One variant per npm registry endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET {name}`: the packument.
    Packument {
        /// The package.
        name: PackageName,
        /// `Accept: application/vnd.npm.install-v1+json` (and not `?write=true`).
        abbreviated: bool,
        /// `?write=true`: the document a client edits and sends back (unpublish,
        /// deprecate): this repository's own versions only, never its upstreams'.
        write: bool,
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `GET {name}/{version-or-tag}`: one version's manifest.
    VersionManifest {
        /// The package.
        name: PackageName,
        /// A version or a dist-tag.
        spec: String,
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `GET {name}/-/{file}`: a tarball.
    Tarball {
        /// The package.
        name: PackageName,
        /// The file name (`pkg-1.0.0.tgz` or `@scope/pkg-1.0.0.tgz`).
        file: String,
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `PUT {name}`: publish (with `_attachments`) or a document update without them
    /// (npm 11 `deprecate`), which may change metadata only.
    PutPackage {
        /// The package.
        name: PackageName,
    },
    /// `PUT {name}/-rev/{rev}`: replace the document (deprecate, unpublish one version).
    UpdatePackage {
        /// The package.
        name: PackageName,
        /// The revision the client read.
        rev: String,
    },
    /// `DELETE {name}/-rev/{rev}`: unpublish every version.
    UnpublishPackage {
        /// The package.
        name: PackageName,
        /// The revision the client read.
        rev: String,
    },
    /// `DELETE {name}/-/{file}/-rev/{rev}`: delete one version's tarball.
    DeleteTarball {
        /// The package.
        name: PackageName,
        /// The file name.
        file: String,
        /// The revision the client read.
        rev: String,
    },
    /// `GET -/package/{name}/dist-tags`.
    DistTags {
        /// The package.
        name: PackageName,
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `PUT -/package/{name}/dist-tags/{tag}` with a JSON string body.
    SetDistTag {
        /// The package.
        name: PackageName,
        /// The tag.
        tag: String,
    },
    /// `DELETE -/package/{name}/dist-tags/{tag}`.
    RemoveDistTag {
        /// The package.
        name: PackageName,
        /// The tag.
        tag: String,
    },
    /// `GET -/whoami`.
    Whoami {
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `GET -/ping`.
    Ping {
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `GET -/v1/search`.
    Search {
        /// HEAD and conditional headers.
        read: ReadRequest,
    },
    /// `POST -/npm/v1/security/advisories/bulk` and `…/audits/quick`.
    Audit,
    /// `PUT -/user/org.couchdb.user:{user}` (couch login) and `POST -/v1/login` (web login):
    /// not supported, tokens come from `aws codeartifact login`.
    Login,
    /// `DELETE -/user/token/{token}` (`npm logout`): tokens expire on their own.
    Logout,
}

impl Route {
    /// The permission the route needs.
    pub fn action(&self) -> Action {
        match self {
            Route::Packument { .. }
            | Route::VersionManifest { .. }
            | Route::Tarball { .. }
            | Route::DistTags { .. }
            | Route::Whoami { .. }
            | Route::Ping { .. }
            | Route::Search { .. }
            | Route::Audit
            | Route::Login
            | Route::Logout => Action::Read,
            // A `PUT {name}` without attachments may deprecate (see `PutPackage`); the
            // route cannot see the body, so it is authorized as a publish.
            Route::PutPackage { .. } => Action::Publish,
            Route::UpdatePackage { .. }
            | Route::UnpublishPackage { .. }
            | Route::DeleteTarball { .. }
            | Route::SetDistTag { .. }
            | Route::RemoveDistTag { .. } => Action::Write,
        }
    }
}

/// Parses a request into a [`Route`].
pub(crate) fn route(req: &http::request::Parts, rest: &str) -> Result<Route, FormatError> {
    let decoded = decode_path(rest)?;
    if decoded.is_empty() {
        return Err(not_found());
    }
    let segments: Vec<&str> = decoded.split('/').collect();
    let method = Method::from(&req.method);
    match segments.as_slice() {
        ["-", tail @ ..] => route_special(req, &method, tail),
        _ => route_package(req, &method, &segments),
    }
}

/// The method class: HEAD is served as GET with an empty body.
enum Method {
    Get { head: bool },
    Put,
    Post,
    Delete,
    Other,
}

impl From<&http::Method> for Method {
    fn from(m: &http::Method) -> Self {
        match *m {
            http::Method::GET => Method::Get { head: false },
            http::Method::HEAD => Method::Get { head: true },
            http::Method::PUT => Method::Put,
            http::Method::POST => Method::Post,
            http::Method::DELETE => Method::Delete,
            _ => Method::Other,
        }
    }
}

fn read_request(req: &http::request::Parts, head: bool) -> ReadRequest {
    ReadRequest {
        head,
        if_none_match: req
            .headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

/// `-/…` endpoints.
fn route_special(
    req: &http::request::Parts,
    method: &Method,
    tail: &[&str],
) -> Result<Route, FormatError> {
    match (tail, method) {
        (["ping"], Method::Get { head }) => Ok(Route::Ping {
            read: read_request(req, *head),
        }),
        (["whoami"], Method::Get { head }) => Ok(Route::Whoami {
            read: read_request(req, *head),
        }),
        (["v1", "search"], Method::Get { head }) => Ok(Route::Search {
            read: read_request(req, *head),
        }),
        (["npm", "v1", "security", "advisories", "bulk"], Method::Post)
        | (["npm", "v1", "security", "audits", "quick"], Method::Post)
        | (["npm", "v1", "security", "audits"], Method::Post) => Ok(Route::Audit),
        (["v1", "login"], Method::Post) => Ok(Route::Login),
        (["user", user], Method::Put) if user.starts_with("org.couchdb.user:") => Ok(Route::Login),
        (["user", "token", _], Method::Delete) => Ok(Route::Logout),
        (["package", name @ ..], _) => route_dist_tags(req, method, name),
        (["ping"] | ["whoami"] | ["v1", "search"], _)
        | (
            ["npm", "v1", "security", "advisories", "bulk"]
            | ["npm", "v1", "security", "audits", "quick"]
            | ["npm", "v1", "security", "audits"]
            | ["v1", "login"],
            _,
        ) => Err(FormatError::MethodNotAllowed),
        (["user", user], _) if user.starts_with("org.couchdb.user:") => {
            Err(FormatError::MethodNotAllowed)
        }
        _ => Err(not_found()),
    }
}

/// `-/package/{name}/dist-tags[/{tag}]`.
fn route_dist_tags(
    req: &http::request::Parts,
    method: &Method,
    segments: &[&str],
) -> Result<Route, FormatError> {
    let (name, rest) = split_name(segments)?;
    match (rest, method) {
        (["dist-tags"], Method::Get { head }) => Ok(Route::DistTags {
            name,
            read: read_request(req, *head),
        }),
        (["dist-tags", tag], Method::Put | Method::Post) => Ok(Route::SetDistTag {
            name,
            tag: (*tag).to_owned(),
        }),
        (["dist-tags", tag], Method::Delete) => Ok(Route::RemoveDistTag {
            name,
            tag: (*tag).to_owned(),
        }),
        (["dist-tags"] | ["dist-tags", _], _) => Err(FormatError::MethodNotAllowed),
        _ => Err(not_found()),
    }
}

/// `{name}…` endpoints.
fn route_package(
    req: &http::request::Parts,
    method: &Method,
    segments: &[&str],
) -> Result<Route, FormatError> {
    let (name, rest) = split_name(segments)?;
    match rest {
        [] => match method {
            Method::Get { head } => Ok(Route::Packument {
                abbreviated: wants_abbreviated(req),
                write: query_flag(req.uri.query(), "write"),
                name,
                read: read_request(req, *head),
            }),
            Method::Put => Ok(Route::PutPackage { name }),
            _ => Err(FormatError::MethodNotAllowed),
        },
        ["-rev", rev] => match method {
            Method::Put => Ok(Route::UpdatePackage {
                name,
                rev: (*rev).to_owned(),
            }),
            Method::Delete => Ok(Route::UnpublishPackage {
                name,
                rev: (*rev).to_owned(),
            }),
            _ => Err(FormatError::MethodNotAllowed),
        },
        ["-", file @ ..] => {
            let (file, rev) = match file {
                [file @ .., "-rev", rev] => (file, Some(*rev)),
                _ => (file, None),
            };
            let file = tarball_file(file)?;
            match (method, rev) {
                (Method::Get { head }, None) => Ok(Route::Tarball {
                    name,
                    file,
                    read: read_request(req, *head),
                }),
                (Method::Delete, Some(rev)) => Ok(Route::DeleteTarball {
                    name,
                    file,
                    rev: rev.to_owned(),
                }),
                _ => Err(FormatError::MethodNotAllowed),
            }
        }
        [spec] if !spec.starts_with('-') => match method {
            Method::Get { head } => Ok(Route::VersionManifest {
                name,
                spec: (*spec).to_owned(),
                read: read_request(req, *head),
            }),
            _ => Err(FormatError::MethodNotAllowed),
        },
        _ => Err(not_found()),
    }
}

/// A tarball file is `file.tgz` or `@scope/file.tgz`.
fn tarball_file(segments: &[&str]) -> Result<String, FormatError> {
    match segments {
        [file] if !file.starts_with('@') => Ok((*file).to_owned()),
        [scope, file] if scope.starts_with('@') => Ok(format!("{scope}/{file}")),
        _ => Err(not_found()),
    }
}

/// Splits `@scope/pkg/…` or `pkg/…` into the name and the rest.
fn split_name<'a, 'b>(
    segments: &'a [&'b str],
) -> Result<(PackageName, &'a [&'b str]), FormatError> {
    let (name, rest) = match segments {
        [scope, name, rest @ ..] if scope.starts_with('@') => (format!("{scope}/{name}"), rest),
        [scope] if scope.starts_with('@') => return Err(not_found()),
        [name, rest @ ..] => ((*name).to_owned(), rest),
        [] => return Err(not_found()),
    };
    let name = PackageName::parse(&name)
        .map_err(|e| FormatError::BadRequest(format!("Invalid package name {name:?}: {e}")))?;
    Ok((name, rest))
}

/// Install requests ask for the abbreviated document; `?write=true` always gets the full one.
fn wants_abbreviated(req: &http::request::Parts) -> bool {
    if query_flag(req.uri.query(), "write") {
        return false;
    }
    req.headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains(ABBREVIATED_MEDIA_TYPE))
}

/// True when the query has `key=true`.
fn query_flag(query: Option<&str>, key: &str) -> bool {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .any(|(k, v)| k == key && v == "true")
}

/// Percent-decodes the path and refuses anything that could escape or confuse it.
fn decode_path(rest: &str) -> Result<String, FormatError> {
    let bad = |why: &str| FormatError::BadRequest(format!("invalid path: {why}"));
    let decoded = percent_decode_str(rest)
        .decode_utf8()
        .map_err(|_| bad("not UTF-8"))?;
    if decoded.chars().any(|c| c.is_control()) {
        return Err(bad("control character"));
    }
    if decoded.contains('\\') {
        return Err(bad("backslash"));
    }
    if decoded.is_empty() {
        return Ok(String::new());
    }
    for segment in decoded.split('/') {
        match segment {
            "" => return Err(bad("empty segment")),
            "." | ".." => return Err(bad("dot segment")),
            _ => {}
        }
    }
    Ok(decoded.into_owned())
}

fn not_found() -> FormatError {
    FormatError::NotFound("Not found".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn r(method: &str, rest: &str) -> Result<Route, FormatError> {
        // `rest` goes in as is: `http::Uri` itself refuses some of the unsafe paths.
        route(&parts(method, "/npm/d/r/x", &[]), rest)
    }

    fn name(n: &str) -> PackageName {
        PackageName::parse(n).unwrap()
    }

    #[test]
    fn packument_spellings() {
        for rest in ["@acme%2fwidget", "@acme%2Fwidget", "@acme/widget"] {
            match r("GET", rest).unwrap() {
                Route::Packument {
                    name: n,
                    abbreviated: false,
                    ..
                } => assert_eq!(n, name("@acme/widget")),
                other => panic!("{rest}: {other:?}"),
            }
        }
        assert!(matches!(
            r("HEAD", "left-pad").unwrap(),
            Route::Packument {
                read: ReadRequest { head: true, .. },
                ..
            }
        ));
    }

    #[test]
    fn abbreviated_and_write() {
        let accept = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*";
        let p = parts("GET", "/npm/d/r/x", &[("accept", accept)]);
        assert!(matches!(
            route(&p, "x").unwrap(),
            Route::Packument {
                abbreviated: true,
                ..
            }
        ));
        let p = parts("GET", "/npm/d/r/x?write=true", &[("accept", accept)]);
        assert!(matches!(
            route(&p, "x").unwrap(),
            Route::Packument {
                abbreviated: false,
                write: true,
                ..
            }
        ));
    }

    #[test]
    fn tarballs() {
        for rest in [
            "@acme/widget/-/widget-1.0.0.tgz",
            "@acme%2fwidget/-/widget-1.0.0.tgz",
        ] {
            assert_eq!(
                r("GET", rest).unwrap(),
                Route::Tarball {
                    name: name("@acme/widget"),
                    file: "widget-1.0.0.tgz".into(),
                    read: ReadRequest::default()
                }
            );
        }
        assert_eq!(
            r("GET", "@acme/widget/-/@acme/widget-1.0.0.tgz").unwrap(),
            Route::Tarball {
                name: name("@acme/widget"),
                file: "@acme/widget-1.0.0.tgz".into(),
                read: ReadRequest::default()
            }
        );
        assert_eq!(
            r("DELETE", "granary-demo/-/granary-demo-1.0.0.tgz/-rev/3-abc").unwrap(),
            Route::DeleteTarball {
                name: name("granary-demo"),
                file: "granary-demo-1.0.0.tgz".into(),
                rev: "3-abc".into()
            }
        );
        assert!(matches!(
            r("PUT", "x/-/x-1.0.0.tgz"),
            Err(FormatError::MethodNotAllowed)
        ));
    }

    #[test]
    fn writes_and_actions() {
        let cases = [
            ("PUT", "x", Action::Publish),
            ("PUT", "x/-rev/1-a", Action::Write),
            ("DELETE", "x/-rev/1-a", Action::Write),
            ("PUT", "-/package/x/dist-tags/next", Action::Write),
            ("DELETE", "-/package/@s%2fx/dist-tags/next", Action::Write),
            ("GET", "-/package/@s%2fx/dist-tags", Action::Read),
            ("GET", "-/whoami", Action::Read),
            ("GET", "-/ping", Action::Read),
            ("GET", "-/v1/search", Action::Read),
            ("POST", "-/npm/v1/security/advisories/bulk", Action::Read),
            ("POST", "-/npm/v1/security/audits/quick", Action::Read),
            ("PUT", "-/user/org.couchdb.user:alice", Action::Read),
            ("POST", "-/v1/login", Action::Read),
            ("GET", "x/1.0.0", Action::Read),
        ];
        for (method, rest, action) in cases {
            let route = r(method, rest).unwrap_or_else(|e| panic!("{method} {rest}: {e}"));
            assert_eq!(route.action(), action, "{method} {rest}");
        }
    }

    #[test]
    fn unsafe_paths_are_bad_requests() {
        for rest in [
            "..", "a/../b", "%2e%2e/x", "a/%2E%2E", "./x", "a//b", "a/", "a\\b", "a%5cb", "a%00b",
            "a%0ab", "%ff",
        ] {
            let err = r("GET", rest).unwrap_err();
            assert_eq!(err.status(), 400, "{rest}: {err}");
        }
        assert_eq!(r("GET", "Bad Name").unwrap_err().status(), 400);
    }

    #[test]
    fn unknown_routes_and_methods() {
        for rest in [
            "",
            "-/nope",
            "x/-/a/b/c",
            "@s",
            "x/a/b",
            "-/package/x/other",
        ] {
            assert_eq!(r("GET", rest).unwrap_err().status(), 404, "{rest}");
        }
        for (method, rest) in [
            ("POST", "x"),
            ("DELETE", "x"),
            ("GET", "x/-rev/1"),
            ("POST", "-/ping"),
            ("GET", "-/v1/login"),
            ("DELETE", "-/package/x/dist-tags"),
            ("PATCH", "x"),
        ] {
            assert_eq!(
                r(method, rest).unwrap_err().status(),
                405,
                "{method} {rest}"
            );
        }
    }
}
