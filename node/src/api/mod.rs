//! The CodeArtifact control-plane API at the service model's REST paths (`/v1/…`),
//! authenticated with SigV4.
//!
//! ```text
//!  request ─▶ read body (bounded) ─▶ SigV4 verify ─▶ dispatch(method, path) ─▶ op handler
//!             │ reads: StateView          │ writes: Node::propose (Raft) │
//!  response ◀─ JSON (epoch-second timestamps) | error shape (error.rs)
//! ```

mod admin;
mod domains;
mod error;
mod packages;
mod repositories;
mod tokens;

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use granary_format::Body;
use http::{Method, Response};
use http_body_util::BodyExt;
use serde_json::Value;

pub(crate) use error::ApiError;
use error::field;

use crate::auth::{self, ApiAuthError};
use crate::node::Node;
use crate::state::command::ResourceKind;
use crate::state::model::{DomainRecord, Principal, RepositoryRecord};

/// One authenticated API request.
pub(crate) struct ApiRequest<'a> {
    pub(crate) node: &'a Node,
    pub(crate) caller: Principal,
    query: HashMap<String, String>,
    body: Bytes,
}

/// Serves one request under `/v1/`.
pub(crate) async fn handle(
    node: &Node,
    req: http::Request<hyper::body::Incoming>,
    request_id: &str,
) -> Response<Body> {
    match handle_inner(node, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(request_id),
    }
}

async fn handle_inner(
    node: &Node,
    req: http::Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = req.into_parts();
    let limit = node.config.max_api_body_bytes;
    let kept = crate::http::Kept::new(body);
    let body = match http_body_util::Limited::new(kept.clone(), limit as usize)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) if granary_format::body::is_too_large(&*e) => {
            // The client may still be sending: read that first, or it sees a reset.
            kept.drain_rest().await;
            return Err(ApiError::TooLarge(limit));
        }
        Err(e) => return Err(field(format!("could not read the request body: {e}"))),
    };
    let caller = auth::authenticate_api(node, &parts, &body).map_err(|e| match e {
        ApiAuthError::Missing => ApiError::Unauthenticated {
            code: "MissingAuthenticationTokenException",
            message: e.to_string(),
        },
        ApiAuthError::UnknownKey => ApiError::Unauthenticated {
            code: "UnrecognizedClientException",
            message: e.to_string(),
        },
        ApiAuthError::BadSignature(m) => ApiError::Unauthenticated {
            code: "InvalidSignatureException",
            message: m,
        },
        ApiAuthError::Store(e) => ApiError::Internal(e.to_string()),
    })?;
    let query = parse_query(parts.uri.query().unwrap_or(""))?;
    let req = ApiRequest {
        node,
        caller,
        query,
        body,
    };
    let path = parts.uri.path();
    let m = &parts.method;
    if let Some(op) = path.strip_prefix("/admin/v1/cluster/") {
        return match (m, op) {
            (&Method::GET, "status") => admin::status(&req).await,
            (&Method::POST, "add-node" | "promote" | "remove-node") => {
                admin::change(&req, op).await
            }
            _ => Err(ApiError::Validation {
                message: format!("{m} {path} is not an operation this server supports"),
                reason: "UNKNOWN_OPERATION",
            }),
        };
    }
    // Reads see every write acknowledged before them, on whichever node they land.
    node.cluster
        .linearize()
        .await
        .map_err(|e| ApiError::Throttling {
            message: e.to_string(),
            retry_after: 1,
        })?;
    match (m, path) {
        (&Method::POST, "/v1/domain") => domains::create(&req).await,
        (&Method::GET, "/v1/domain") => domains::describe(&req).await,
        (&Method::DELETE, "/v1/domain") => domains::delete(&req).await,
        (&Method::POST, "/v1/domains") => domains::list(&req),
        (&Method::POST, "/v1/repository") => repositories::create(&req).await,
        (&Method::GET, "/v1/repository") => repositories::describe(&req),
        (&Method::PUT, "/v1/repository") => repositories::update(&req).await,
        (&Method::DELETE, "/v1/repository") => repositories::delete(&req).await,
        (&Method::POST, "/v1/repositories") => repositories::list(&req),
        (&Method::POST, "/v1/domain/repositories") => repositories::list_in_domain(&req),
        (&Method::POST, "/v1/authorization-token") => tokens::get_authorization_token(&req),
        (&Method::GET, "/v1/repository/endpoint") => tokens::get_repository_endpoint(&req),
        (&Method::POST, "/v1/repository/external-connection") => {
            repositories::associate_external_connection(&req).await
        }
        (&Method::DELETE, "/v1/repository/external-connection") => {
            repositories::disassociate_external_connection(&req).await
        }
        (&Method::POST, "/v1/package") => packages::put_origin_configuration(&req).await,
        (&Method::POST, "/v1/packages") => packages::list_packages(&req),
        (&Method::GET, "/v1/package") => packages::describe_package(&req),
        (&Method::POST, "/v1/package/versions") => packages::list_versions(&req),
        (&Method::GET, "/v1/package/version") => packages::describe_version(&req),
        (&Method::POST, "/v1/package/version/assets") => packages::list_assets(&req),
        (&Method::GET, "/v1/package/version/asset") => packages::get_asset(&req),
        _ => Err(ApiError::Validation {
            message: format!("{m} {path} is not an operation this server supports"),
            reason: "UNKNOWN_OPERATION",
        }),
    }
}

/// Parses a query string (percent-decoded; a repeated key is an error).
fn parse_query(q: &str) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| field("query string is not valid UTF-8"))
        };
        let (k, v) = (dec(k)?, dec(v)?);
        if out.insert(k.clone(), v).is_some() {
            return Err(field(format!("query parameter {k} is repeated")));
        }
    }
    Ok(out)
}

impl ApiRequest<'_> {
    /// An optional query parameter.
    pub(crate) fn q(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// A required query parameter.
    pub(crate) fn required(&self, name: &str) -> Result<&str, ApiError> {
        self.q(name)
            .ok_or_else(|| field(format!("Missing required parameter in query: \"{name}\"")))
    }

    /// The JSON body (an empty body is `{}`).
    pub(crate) fn json(&self) -> Result<serde_json::Map<String, Value>, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Default::default());
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(ApiError::Validation {
                message: "the request body must be a JSON object".into(),
                reason: "CANNOT_PARSE",
            }),
            Err(e) => Err(ApiError::Validation {
                message: format!("the request body is not valid JSON: {e}"),
                reason: "CANNOT_PARSE",
            }),
        }
    }

    /// The domain named by `domain` (and `domain-owner`), which the caller may use.
    pub(crate) fn domain(&self) -> Result<DomainRecord, ApiError> {
        let name = self.required("domain")?;
        validate_domain_name(name)?;
        let owner = self.q("domain-owner");
        if let Some(o) = owner {
            validate_account(o, "domainOwner")?;
        }
        let d = self
            .node
            .state
            .domain(name)?
            .filter(|d| owner.is_none_or(|o| o == d.owner))
            .ok_or_else(|| error::not_found(ResourceKind::Domain, name))?;
        if d.owner != self.caller.account {
            return Err(ApiError::AccessDenied(format!(
                "{} is not authorized to access domain {name}",
                self.caller.arn()
            )));
        }
        Ok(d)
    }

    /// The repository named by `repository` in the request's domain.
    pub(crate) fn repository(&self) -> Result<(DomainRecord, RepositoryRecord), ApiError> {
        let d = self.domain()?;
        let name = self.required("repository")?;
        validate_repository_name(name)?;
        let r = self
            .node
            .state
            .repository(&d.name, name)?
            .ok_or_else(|| error::not_found(ResourceKind::Repository, name))?;
        Ok((d, r))
    }

    /// A region-qualified ARN.
    pub(crate) fn arn(&self, account: &str, resource: &str) -> String {
        format!(
            "arn:aws:codeartifact:{}:{account}:{resource}",
            self.node.config.aws_region
        )
    }
}

pub(crate) fn validate_domain_name(name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = (2..=50).contains(&b.len())
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.last()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(field(format!(
            "Value '{name}' at 'domain' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-z][a-z0-9\\-]{{0,48}}[a-z0-9]"
        )))
    }
}

pub(crate) fn validate_repository_name(name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = (2..=100).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(field(format!(
            "Value '{name}' at 'repository' failed to satisfy constraint: Member must satisfy regular expression pattern: [A-Za-z0-9][A-Za-z0-9._\\-]{{1,99}}"
        )))
    }
}

pub(crate) fn validate_account(v: &str, what: &str) -> Result<(), ApiError> {
    if v.len() == 12 && v.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(field(format!(
            "Value '{v}' at '{what}' failed to satisfy constraint: Member must be 12 digits"
        )))
    }
}

/// Epoch seconds, as rest-json timestamps are written.
pub(crate) fn epoch(ms: i64) -> Value {
    serde_json::json!(ms as f64 / 1000.0)
}

/// A JSON 200 response.
pub(crate) fn ok_json(v: Value) -> Result<Response<Body>, ApiError> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(granary_format::body::full(v.to_string()))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// A JSON 200 response for a page of a listing, with `nextToken` when more follow.
pub(crate) fn ok_page(mut out: Value, next: Option<String>) -> Result<Response<Body>, ApiError> {
    if let Some(n) = next {
        out["nextToken"] = serde_json::json!(n);
    }
    ok_json(out)
}

/// Offset paging with opaque tokens: returns the page and the next token.
pub(crate) fn paginate<T>(
    items: Vec<T>,
    max_results: Option<i64>,
    next_token: Option<&str>,
    max_allowed: i64,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let max = max_results.unwrap_or(max_allowed);
    if !(1..=max_allowed).contains(&max) {
        return Err(field(format!(
            "Value '{max}' at 'maxResults' failed to satisfy constraint: Member must have value between 1 and {max_allowed}"
        )));
    }
    let start = match next_token {
        None => 0,
        Some(t) => base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(t)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("o:").and_then(|n| n.parse::<usize>().ok()))
            .ok_or_else(|| field("nextToken is not a token this server issued"))?,
    };
    let total = items.len();
    let page: Vec<T> = items.into_iter().skip(start).take(max as usize).collect();
    let end = start + page.len();
    let next = (end < total)
        .then(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("o:{end}")));
    Ok((page, next))
}

/// A query integer parameter.
pub(crate) fn int_param(req: &ApiRequest<'_>, name: &str) -> Result<Option<i64>, ApiError> {
    req.q(name)
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| field(format!("{name} must be an integer")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_domain_name("acme").is_ok());
        assert!(validate_domain_name("a").is_err());
        assert!(validate_domain_name("Acme").is_err());
        assert!(validate_domain_name("acme-").is_err());
        assert!(validate_repository_name("My_repo.1").is_ok());
        assert!(validate_repository_name("_x").is_err());
        assert!(validate_repository_name("a/b").is_err());
    }

    #[test]
    fn paging_round_trips() {
        let (p, next) = paginate((0..5).collect::<Vec<_>>(), Some(2), None, 100).unwrap();
        assert_eq!(p, vec![0, 1]);
        let (p, next) =
            paginate((0..5).collect::<Vec<_>>(), Some(2), next.as_deref(), 100).unwrap();
        assert_eq!(p, vec![2, 3]);
        let (p, next) =
            paginate((0..5).collect::<Vec<_>>(), Some(2), next.as_deref(), 100).unwrap();
        assert_eq!(p, vec![4]);
        assert!(next.is_none());
        assert!(paginate(vec![1], Some(0), None, 100).is_err());
        assert!(paginate(vec![1], None, Some("garbage"), 100).is_err());
    }

    #[test]
    fn query_parsing() {
        let q = parse_query("domain=a%2Fb&format=npm&x=").unwrap();
        assert_eq!(q["domain"], "a/b");
        assert_eq!(q["x"], "");
        assert!(parse_query("a=1&a=2").is_err());
    }
}
