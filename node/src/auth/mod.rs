//! Authentication: SigV4 for the CodeArtifact API, authorization tokens for the package
//! endpoints. Both verify against the replicated state (access keys, token-signing keys),
//! so any node authenticates any request with no call to another node.

// The signing halves (`sigv4::sign`, `token::generate_key`) serve tests and the operator
// CLI; the server itself only verifies.
#[allow(dead_code)]
pub(crate) mod sigv4;
#[allow(dead_code)]
pub(crate) mod token;

use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;

use crate::node::Node;
use crate::state::StateView;
use crate::state::model::Principal;
use crate::store::StoreError;
pub(crate) use token::TokenClaims;

/// Why an API request was not authenticated, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiAuthError {
    /// No SigV4 authentication.
    #[error("Missing Authentication Token")]
    Missing,
    /// The access key id is unknown.
    #[error("The security token included in the request is invalid.")]
    UnknownKey,
    /// The signature, scope or time is wrong.
    #[error("{0}")]
    BadSignature(String),
    /// Storage failed while looking up the key.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Verifies a SigV4-signed API request; returns the calling principal.
pub(crate) fn authenticate_api(
    node: &Node,
    parts: &http::request::Parts,
    body: &[u8],
) -> Result<Principal, ApiAuthError> {
    let payload = sigv4::payload_hash(&parts.headers, body)
        .map_err(|e| ApiAuthError::BadSignature(e.to_string()))?;
    let req = sigv4::SignedRequest {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        payload_sha256: &payload,
    };
    let parsed = match sigv4::parse(&req) {
        Ok(p) => p,
        Err(sigv4::SigV4Error::Missing) => return Err(ApiAuthError::Missing),
        Err(e) => return Err(ApiAuthError::BadSignature(e.to_string())),
    };
    let principal = node
        .state
        .principal(&parsed.credential.access_key_id)?
        .ok_or(ApiAuthError::UnknownKey)?;
    let expect = sigv4::Expect {
        region: &node.config.aws_region,
        service: "codeartifact",
        now: time::OffsetDateTime::now_utc(),
        max_skew: time::Duration::seconds(node.config.sigv4_max_skew_secs as i64),
    };
    sigv4::verify(&req, &parsed, &principal.secret_access_key, &expect).map_err(|e| match e {
        sigv4::SigV4Error::SignatureMismatch => ApiAuthError::BadSignature(
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method."
                .into(),
        ),
        other => ApiAuthError::BadSignature(other.to_string()),
    })?;
    Ok(principal)
}

/// Why a package-endpoint request was not authenticated.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenAuthError {
    /// No credentials at all.
    #[error("authentication required: get a token with `aws codeartifact get-authorization-token`")]
    Missing,
    /// The token is malformed or forged.
    #[error("the authorization token is not valid")]
    Invalid,
    /// The token names a signing key this node does not hold: revoked, made up, or made
    /// a moment ago through another node and not applied here yet.
    #[error("the authorization token is not valid")]
    UnknownKey,
    /// The token expired.
    #[error("the authorization token has expired; get a new one")]
    Expired,
    /// The token is for another domain.
    #[error("the authorization token is not valid for domain {0}")]
    WrongDomain(String),
    /// Storage failed while looking up the key.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The bearer string of a package-manager request: `Authorization: Bearer …`, Basic with
/// the token as password (any user name), a raw `Authorization` value (cargo, gem), or
/// `X-NuGet-ApiKey`.
pub(crate) fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or(("", v));
        if scheme.eq_ignore_ascii_case("bearer") {
            return Some(rest.trim().to_owned());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (_, password) = text.split_once(':')?;
            return Some(password.to_owned());
        }
        if !v.is_empty() && !v.contains(' ') {
            return Some(v.to_owned());
        }
    }
    headers
        .get("x-nuget-apikey")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

/// Verifies the token of a package-endpoint request for `domain`.
pub(crate) fn authenticate_token(
    state: &StateView,
    headers: &HeaderMap,
    domain: &str,
    now: i64,
) -> Result<TokenClaims, TokenAuthError> {
    let presented = presented_token(headers).ok_or(TokenAuthError::Missing)?;
    // A token verified before (under the same key epoch) needs only its expiry checked.
    let epoch = state.cache().map(|c| c.epoch());
    let cached = match (state.cache(), epoch) {
        (Some(c), Some(e)) => c.tokens.get(presented.as_str(), e),
        _ => None,
    };
    let claims = match cached {
        Some(claims) if claims.expires_at > now => claims,
        Some(_) => return Err(TokenAuthError::Expired),
        None => {
            let lookup = |kid: &str| state.token_secret(kid).ok().flatten();
            let claims = Arc::new(token::verify(&presented, lookup, now).map_err(|e| match e {
                token::TokenError::Expired => TokenAuthError::Expired,
                token::TokenError::UnknownKey => TokenAuthError::UnknownKey,
                _ => TokenAuthError::Invalid,
            })?);
            if let (Some(c), Some(e)) = (state.cache(), epoch) {
                c.tokens.put(presented, e, claims.clone());
            }
            claims
        }
    };
    if claims.domain != domain {
        return Err(TokenAuthError::WrongDomain(domain.to_owned()));
    }
    Ok(Arc::unwrap_or_clone(claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::model::TokenKey;
    use crate::store::{CF_STATE, Store};

    fn state_with_key(dir: &std::path::Path, key: &[u8]) -> StateView {
        let store = Store::open(dir).unwrap();
        let k = TokenKey {
            kid: "k1".into(),
            key_hex: hex::encode(key),
            created_ms: 0,
        };
        store
            .db()
            .put_cf(
                store.cf(CF_STATE),
                crate::state::keys::token_key("k1"),
                serde_json::to_vec(&k).unwrap(),
            )
            .unwrap();
        StateView::new(store)
    }

    fn claims(domain: &str, exp: i64) -> TokenClaims {
        TokenClaims {
            account: "000000000000".into(),
            principal: "arn:aws:iam::000000000000:user/admin".into(),
            domain: domain.into(),
            domain_owner: "000000000000".into(),
            issued_at: exp - 900,
            expires_at: exp,
            token_id: "t".into(),
        }
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        h
    }

    #[test]
    fn expired_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        let state = state_with_key(dir.path(), &key);
        let now = 1_800_000_000;
        let live = token::issue(&claims("d", now + 60), "k1", &key);
        assert!(authenticate_token(&state, &bearer(&live), "d", now).is_ok());
        let expired = token::issue(&claims("d", now - 1), "k1", &key);
        assert!(matches!(
            authenticate_token(&state, &bearer(&expired), "d", now),
            Err(TokenAuthError::Expired)
        ));
        assert!(matches!(
            authenticate_token(&state, &bearer(&live), "other", now),
            Err(TokenAuthError::WrongDomain(_))
        ));
        let foreign = token::issue(&claims("d", now + 60), "k1", &[8u8; 32]);
        assert!(matches!(
            authenticate_token(&state, &bearer(&foreign), "d", now),
            Err(TokenAuthError::Invalid)
        ));
        let unknown = token::issue(&claims("d", now + 60), "k2", &key);
        assert!(matches!(
            authenticate_token(&state, &bearer(&unknown), "d", now),
            Err(TokenAuthError::UnknownKey)
        ));
        assert!(matches!(
            authenticate_token(&state, &HeaderMap::new(), "d", now),
            Err(TokenAuthError::Missing)
        ));
    }

    #[test]
    fn tokens_are_taken_from_every_client_scheme() {
        use base64::Engine;
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("aws:abc");
        h.insert("authorization", format!("Basic {basic}").parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
        h.insert("authorization", "abc".parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
        let mut h = HeaderMap::new();
        h.insert("x-nuget-apikey", "abc".parse().unwrap());
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
    }
}
