//! Repository authorization tokens, as handed out by `GetAuthorizationToken`: their
//! format, issuing and verification.
//!
//! A token is a self-contained bearer string that any node can check with nothing but
//! the signing key it names (keys live in replicated state; several may be valid at
//! once during a rotation, each under its own key id):
//!
//! ```text
//! gr1.<base64url(JSON claims, incl. "kid")>.<base64url(HMAC-SHA256(key, "gr1." + payload))>
//! ```
//!
//! base64url is unpadded, so a token only holds `A-Za-z0-9-_.`: safe in `.npmrc`, as a
//! Basic-auth password, in a URL and unquoted in a shell. Verification is strict (one
//! canonical encoding, no unknown JSON fields, bounded length), compares the MAC in
//! constant time and never panics, whatever the input.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix (format and version tag) every token starts with.
pub(crate) const TOKEN_PREFIX: &str = "gr1.";

/// The longest string [`verify`] will look at; longer ones are malformed.
pub(crate) const MAX_TOKEN_LEN: usize = 4096;

/// The length of keys made by [`generate_key`].
pub(crate) const KEY_LEN: usize = 32;

/// The shortest key [`verify`] accepts; a shorter key found by the lookup is treated
/// as unknown, so that a misconfigured (e.g. empty) key cannot validate forgeries.
pub(crate) const MIN_KEY_LEN: usize = 16;

/// What a token asserts. Everything is covered by the MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TokenClaims {
    /// The 12-digit account of the principal the token was issued to.
    pub(crate) account: String,
    /// The principal's name or ARN.
    pub(crate) principal: String,
    /// The domain the token grants access to.
    pub(crate) domain: String,
    /// The 12-digit account that owns the domain.
    pub(crate) domain_owner: String,
    /// Issue time, Unix seconds.
    pub(crate) issued_at: i64,
    /// Expiry, Unix seconds; the token is refused from this second on.
    pub(crate) expires_at: i64,
    /// A random id (see [`new_token_id`]), for future revocation lists.
    pub(crate) token_id: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenError {
    /// Not a token of this format: wrong prefix, bad encoding, bad JSON, unknown or
    /// missing fields, too long, issued after it expires, …
    #[error("malformed authorization token")]
    Malformed,
    /// The key id it names is not (or no longer) a valid signing key.
    #[error("authorization token signed with an unknown key")]
    UnknownKey,
    /// The MAC does not match: forged or altered.
    #[error("authorization token signature is invalid")]
    BadSignature,
    /// Past its `expires_at`.
    #[error("authorization token has expired")]
    Expired,
}

/// The JSON payload. Short names keep tokens compact; field order is fixed.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    kid: String,
    acct: String,
    sub: String,
    dom: String,
    own: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// Issues a token for `claims`, signed with `key` under the id `key_id`.
///
/// `key` should come from [`generate_key`]; keys shorter than [`MIN_KEY_LEN`] make
/// tokens that [`verify`] refuses.
pub(crate) fn issue(claims: &TokenClaims, key_id: &str, key: &[u8]) -> String {
    let payload = Payload {
        kid: key_id.to_owned(),
        acct: claims.account.clone(),
        sub: claims.principal.clone(),
        dom: claims.domain.clone(),
        own: claims.domain_owner.clone(),
        iat: claims.issued_at,
        exp: claims.expires_at,
        jti: claims.token_id.clone(),
    };
    let json = serde_json::to_vec(&payload).expect("strings and integers always serialize");
    let mut token = String::with_capacity(TOKEN_PREFIX.len() + json.len() * 4 / 3 + 48);
    token.push_str(TOKEN_PREFIX);
    URL_SAFE_NO_PAD.encode_string(&json, &mut token);
    let mac = mac_of(key, token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(mac, &mut token);
    token
}

/// Verifies `token` and returns its claims.
///
/// `lookup_key` maps a key id to the key bytes if that key is currently valid for
/// verification. `now_unix` is the current time in Unix seconds.
///
/// Errors: [`TokenError::Malformed`] for anything that is not a well-formed token,
/// [`TokenError::UnknownKey`] if the lookup fails (or returns a key shorter than
/// [`MIN_KEY_LEN`]), [`TokenError::BadSignature`] if the MAC does not match (compared
/// in constant time), [`TokenError::Expired`] once `now_unix >= expires_at`.
pub(crate) fn verify<K, F>(
    token: &str,
    lookup_key: F,
    now_unix: i64,
) -> Result<TokenClaims, TokenError>
where
    K: AsRef<[u8]>,
    F: Fn(&str) -> Option<K>,
{
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let body = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenError::Malformed)?;
    let (payload_b64, mac_b64) = body.split_once('.').ok_or(TokenError::Malformed)?;
    if payload_b64.is_empty() || mac_b64.contains('.') {
        return Err(TokenError::Malformed);
    }
    let mac = URL_SAFE_NO_PAD
        .decode(mac_b64)
        .map_err(|_| TokenError::Malformed)?;
    if mac.len() != 32 {
        return Err(TokenError::Malformed);
    }
    let json = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| TokenError::Malformed)?;
    let payload: Payload = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;

    let key = lookup_key(&payload.kid).ok_or(TokenError::UnknownKey)?;
    let key = key.as_ref();
    if key.len() < MIN_KEY_LEN {
        return Err(TokenError::UnknownKey);
    }
    let signed = &token[..TOKEN_PREFIX.len() + payload_b64.len()];
    let mut check = new_mac(key);
    check.update(signed.as_bytes());
    check
        .verify_slice(&mac)
        .map_err(|_| TokenError::BadSignature)?;

    if payload.iat > payload.exp {
        return Err(TokenError::Malformed);
    }
    if now_unix >= payload.exp {
        return Err(TokenError::Expired);
    }
    Ok(TokenClaims {
        account: payload.acct,
        principal: payload.sub,
        domain: payload.dom,
        domain_owner: payload.own,
        issued_at: payload.iat,
        expires_at: payload.exp,
        token_id: payload.jti,
    })
}

/// A fresh random signing key of [`KEY_LEN`] bytes (from the thread-local CSPRNG,
/// seeded by the operating system).
pub(crate) fn generate_key() -> Vec<u8> {
    let mut key = vec![0u8; KEY_LEN];
    rand::rng().fill_bytes(&mut key);
    key
}

/// A fresh random token id: 16 random bytes as 32 lower-case hex digits.
pub(crate) fn new_token_id() -> String {
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    hex::encode(id)
}

fn new_mac(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn mac_of(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = new_mac(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const NOW: i64 = 1_795_000_000;

    fn claims() -> TokenClaims {
        TokenClaims {
            account: "111122223333".into(),
            principal: "arn:aws:iam::111122223333:user/alice".into(),
            domain: "my-domain".into(),
            domain_owner: "444455556666".into(),
            issued_at: NOW,
            expires_at: NOW + 43_200,
            token_id: "0123456789abcdef0123456789abcdef".into(),
        }
    }

    fn key_a() -> Vec<u8> {
        (0u8..32).collect()
    }

    fn lookup(kid: &str) -> Option<Vec<u8>> {
        match kid {
            "k1" => Some(key_a()),
            "k2" => Some(vec![7u8; 32]),
            "short" => Some(vec![1u8; 8]),
            _ => None,
        }
    }

    /// Signs an arbitrary payload the way `issue` does, to test payload validation.
    fn forge(json: &str, key: &[u8]) -> String {
        let mut token = String::from(TOKEN_PREFIX);
        URL_SAFE_NO_PAD.encode_string(json.as_bytes(), &mut token);
        let mac = mac_of(key, token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(mac, &mut token);
        token
    }

    #[test]
    fn round_trip() {
        let token = issue(&claims(), "k1", &key_a());
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(verify(&token, lookup, NOW), Ok(claims()));
        assert_eq!(verify(&token, lookup, NOW + 43_199), Ok(claims()));
        // Borrowed keys work as well as owned ones.
        let key = key_a();
        let borrowed = |kid: &str| (kid == "k1").then_some(key.as_slice());
        assert_eq!(verify(&token, borrowed, NOW), Ok(claims()));
    }

    #[test]
    fn token_is_safe_in_npmrc_basic_auth_and_shell() {
        let mut c = claims();
        c.principal = "weird \"name\" with / + = : @ ~ and ünïcode".into();
        let token = issue(&c, "k2", &[7u8; 32]);
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
            "{token}"
        );
        assert_eq!(token.matches('.').count(), 2);
        assert_eq!(verify(&token, lookup, NOW), Ok(c));
    }

    #[test]
    fn rotation_uses_the_named_key() {
        let t1 = issue(&claims(), "k1", &key_a());
        let t2 = issue(&claims(), "k2", &[7u8; 32]);
        assert!(verify(&t1, lookup, NOW).is_ok());
        assert!(verify(&t2, lookup, NOW).is_ok());
        // Signed with k2's bytes but naming k1.
        let wrong = issue(&claims(), "k1", &[7u8; 32]);
        assert_eq!(verify(&wrong, lookup, NOW), Err(TokenError::BadSignature));
    }

    #[test]
    fn expiry() {
        let token = issue(&claims(), "k1", &key_a());
        assert_eq!(
            verify(&token, lookup, NOW + 43_200),
            Err(TokenError::Expired)
        );
        assert_eq!(verify(&token, lookup, i64::MAX), Err(TokenError::Expired));
        assert!(verify(&token, lookup, i64::MIN).is_ok());
    }

    #[test]
    fn unknown_or_weak_key() {
        let token = issue(&claims(), "retired", &key_a());
        assert_eq!(verify(&token, lookup, NOW), Err(TokenError::UnknownKey));
        let token = issue(&claims(), "short", &[1u8; 8]);
        assert_eq!(verify(&token, lookup, NOW), Err(TokenError::UnknownKey));
        let empty = |_: &str| Some(Vec::<u8>::new());
        let token = issue(&claims(), "k1", &[]);
        assert_eq!(verify(&token, empty, NOW), Err(TokenError::UnknownKey));
    }

    #[test]
    fn strict_payload() {
        let key = key_a();
        let ok = r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":1,"exp":9999999999,"jti":"j"}"#;
        assert!(verify(&forge(ok, &key), lookup, NOW).is_ok());
        for bad in [
            // unknown field
            r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":1,"exp":9999999999,"jti":"j","adm":true}"#,
            // missing field
            r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":1,"exp":9999999999}"#,
            // duplicate field
            r#"{"kid":"k1","acct":"1","acct":"3","sub":"s","dom":"d","own":"2","iat":1,"exp":9999999999,"jti":"j"}"#,
            // wrong types
            r#"{"kid":"k1","acct":1,"sub":"s","dom":"d","own":"2","iat":1,"exp":9999999999,"jti":"j"}"#,
            r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":1,"exp":1e20,"jti":"j"}"#,
            r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":1,"exp":99999999999999999999,"jti":"j"}"#,
            // issued after it expires
            r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":9999999999,"exp":9999999998,"jti":"j"}"#,
            // not an object / trailing garbage
            r#"["k1"]"#,
            r#"{"kid":"k1","acct":"1","sub":"s","dom":"d","own":"2","iat":1,"exp":9999999999,"jti":"j"}x"#,
            "",
        ] {
            assert_eq!(
                verify(&forge(bad, &key), lookup, NOW),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn strict_envelope() {
        let token = issue(&claims(), "k1", &key_a());
        let (head, mac) = token.rsplit_once('.').unwrap();
        let payload = head.strip_prefix(TOKEN_PREFIX).unwrap();
        let cases = [
            String::new(),
            "gr1.".into(),
            "gr1..".into(),
            format!("gr2.{payload}.{mac}"),
            format!("GR1.{payload}.{mac}"),
            format!(" {token}"),
            format!("{token} "),
            format!("{token}="),
            format!("{token}."),
            format!("{head}.{mac}.{mac}"),
            format!("gr1.{payload}"),
            format!("gr1..{mac}"),
            format!("gr1.{payload}=.{mac}"),
            // The standard (non-URL) alphabet is not accepted.
            format!("gr1.{}.{mac}", payload.replace('-', "+").replace('_', "/")),
            format!("{head}.{}", mac.replace('-', "+").replace('_', "/")),
            format!("{head}.{}", &mac[..mac.len() - 1]),
            format!("{head}.{mac}AA"),
            format!("gr1.{}.{mac}", "A".repeat(MAX_TOKEN_LEN)),
        ];
        for case in cases.into_iter().filter(|c| *c != token) {
            let result = verify(&case, lookup, NOW);
            assert!(
                matches!(
                    result,
                    Err(TokenError::Malformed | TokenError::BadSignature)
                ),
                "{case:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn non_canonical_base64_is_refused() {
        // The last character of a 32-byte MAC carries 4 unused bits; setting them must
        // not yield a second valid spelling of the same token.
        let token = issue(&claims(), "k1", &key_a());
        let last = token.chars().last().unwrap();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.find(last).unwrap();
        for bits in 1..4 {
            let other = alphabet.as_bytes()[(idx & !3) | bits] as char;
            let mut t = token.clone();
            t.pop();
            t.push(other);
            if t != token {
                assert_eq!(verify(&t, lookup, NOW), Err(TokenError::Malformed), "{t}");
            }
        }
    }

    /// Fuzz-ish: random, truncated and mutated tokens never panic and never verify.
    #[test]
    fn never_panics_and_only_the_original_verifies() {
        let mut rng = StdRng::seed_from_u64(677_261_626_172);
        let original = issue(&claims(), "k1", &key_a());
        let alphabet: Vec<u8> =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ {}\":,\\\x00\xff"
                .to_vec();

        let check = |candidate: &[u8]| {
            let Ok(s) = std::str::from_utf8(candidate) else {
                return;
            };
            let result = verify(s, lookup, NOW);
            if s == original {
                assert!(result.is_ok());
            } else {
                assert!(result.is_err(), "{s:?} verified");
            }
        };

        // Every truncation, from both ends.
        for i in 0..=original.len() {
            check(&original.as_bytes()[..i]);
            check(&original.as_bytes()[i..]);
        }
        // Point mutations, insertions and deletions.
        for _ in 0..20_000 {
            let mut t = original.clone().into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..t.len());
                match rng.random_range(0..4) {
                    0 => t[at] = alphabet[rng.random_range(0..alphabet.len())],
                    1 => t[at] ^= 1 << rng.random_range(0..8),
                    2 => t.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                    _ => {
                        t.remove(at);
                    }
                }
                if t.is_empty() {
                    break;
                }
            }
            check(&t);
        }
        // Pure noise, with and without the prefix.
        for _ in 0..5_000 {
            let len = rng.random_range(0..200);
            let mut t: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            if rng.random_bool(0.5) {
                t.splice(0..0, TOKEN_PREFIX.bytes());
            }
            check(&t);
        }
        // Validly MAC'd but random JSON-ish payloads.
        let key = key_a();
        for _ in 0..2_000 {
            let len = rng.random_range(0..80);
            let json: String = (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len() - 2)] as char)
                .collect();
            let t = forge(&json, &key);
            assert!(verify(&t, lookup, NOW).is_err(), "{json:?}");
        }
    }

    #[test]
    fn generated_keys_and_ids() {
        let (a, b) = (generate_key(), generate_key());
        assert_eq!(a.len(), KEY_LEN);
        assert_ne!(a, b);
        let id = new_token_id();
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, new_token_id());
        let token = issue(&claims(), "fresh", &a);
        let found = |kid: &str| (kid == "fresh").then(|| a.clone());
        assert_eq!(verify(&token, found, NOW), Ok(claims()));
    }
}
