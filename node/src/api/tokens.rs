//! GetAuthorizationToken and GetRepositoryEndpoint: what `aws codeartifact login` calls.

use granary_format::Body;
use http::Response;
use serde_json::json;

use super::error::field;
use super::{ApiError, ApiRequest, int_param, ok_json};
use crate::auth::token::{self, TokenClaims};

/// Token lifetimes CodeArtifact allows, in seconds.
const MIN_TOKEN_SECS: i64 = 900;
const MAX_TOKEN_SECS: i64 = 43_200;

/// The package formats of the service model.
pub(super) const FORMATS: &[&str] = &[
    "npm", "pypi", "maven", "nuget", "generic", "ruby", "swift", "cargo",
];

pub(super) fn get_authorization_token(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let d = req.domain()?;
    let duration = match int_param(req, "duration")? {
        // 0 means "the rest of the caller's session"; keys have no session, so the maximum.
        None | Some(0) => MAX_TOKEN_SECS,
        Some(s) if (MIN_TOKEN_SECS..=MAX_TOKEN_SECS).contains(&s) => s,
        Some(s) => {
            return Err(field(format!(
                "Value '{s}' at 'durationSeconds' failed to satisfy constraint: Member must have value between 900 and 43200, or be 0"
            )));
        }
    };
    let keys = req.node.state.token_keys()?;
    // The newest key signs; older ones still verify.
    let key = keys
        .iter()
        .max_by_key(|k| k.created_ms)
        .ok_or_else(|| ApiError::Internal("no token-signing key exists".into()))?;
    let secret = hex::decode(&key.key_hex).map_err(|e| ApiError::Internal(e.to_string()))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = TokenClaims {
        account: req.caller.account.clone(),
        principal: req.caller.arn(),
        domain: d.name.clone(),
        domain_owner: d.owner.clone(),
        issued_at: now,
        expires_at: now + duration,
        token_id: token::new_token_id(),
    };
    let tok = token::issue(&claims, &key.kid, &secret);
    ok_json(json!({ "authorizationToken": tok, "expiration": claims.expires_at }))
}

pub(super) fn get_repository_endpoint(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    let format = req.required("format")?;
    if !FORMATS.contains(&format) {
        return Err(field(format!(
            "Value '{format}' at 'format' failed to satisfy constraint: Member must satisfy enum value set: {FORMATS:?}"
        )));
    }
    if let Some(t) = req.q("endpointType")
        && t != "ipv4"
        && t != "dualstack"
    {
        return Err(field("endpointType must be ipv4 or dualstack"));
    }
    let endpoint = format!("{}/{format}/{}/{}/", req.node.public_url, d.name, r.name);
    ok_json(json!({ "repositoryEndpoint": endpoint }))
}
