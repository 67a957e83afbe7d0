//! AWS Signature Version 4 (`AWS4-HMAC-SHA256`) for the CodeArtifact-compatible API:
//! server-side parsing and verification of signed requests (the `Authorization` header
//! and presigned `X-Amz-*` query parameters), plus [`sign`], the same machinery run
//! the other way round for our own clients and tests.
//!
//! The canonical request is built the way botocore and the AWS SDKs build it for
//! non-S3 services:
//!
//! * **path**: the path exactly as received (already percent-encoded on the wire),
//!   with dot segments and empty segments removed, then percent-encoded *again* with
//!   everything but `A-Za-z0-9-_.~/` escaped (`/v1/a%2Fb` is signed as `/v1/a%252Fb`);
//! * **query**: every `key=value` pair form-decoded (`+` is a space, `%XX` a byte) and
//!   re-encoded with only `A-Za-z0-9-_.~` left bare, a pair without `=` getting an
//!   empty value, empty pairs (`a=1&&b=2`) skipped, sorted by key then value;
//! * **headers**: the names listed in `SignedHeaders` (which must include `host`),
//!   each value trimmed with inner whitespace runs collapsed to one space, repeated
//!   headers joined with `,`;
//! * **payload**: the caller's hex SHA-256 of the body, or the `x-amz-content-sha256`
//!   value when the client sent one (see [`payload_hash`] and [`declared_payload_hash`]);
//!   `UNSIGNED-PAYLOAD` is also accepted when that header is signed (see [`verify`]).
//!
//! One known divergence among clients: for a path ending in `/.` or `/..`, botocore
//! drops the trailing slash after normalising while the Rust SDK keeps it; this module
//! follows botocore. CodeArtifact paths never end that way.
//!
//! A request is checked in two steps so that the caller can look the secret up in
//! between: [`parse`] extracts the [`Credential`] (access key id and scope) without any
//! secret, then [`verify`] checks scope, clock and signature. Only `x-amz-date` is
//! accepted as the request time (the legacy `Date` header form is not supported).
//! For HTTP/2 requests, which carry the host in the `:authority` pseudo-header, the
//! caller must copy it into a `host` header before calling in.

use std::fmt::Write as _;

use hmac::{Hmac, Mac};
use http::{HeaderMap, Method};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode, utf8_percent_encode};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime, PrimitiveDateTime, macros::format_description};

type HmacSha256 = Hmac<Sha256>;

/// The only signing algorithm accepted and produced: `AWS4-HMAC-SHA256`.
pub(crate) const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// The last component of every credential scope: `aws4_request`.
pub(crate) const SCOPE_TERMINATOR: &str = "aws4_request";

/// The `x-amz-content-sha256` value by which a client declares that the body is not
/// covered by the signature.
pub(crate) const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// Hex SHA-256 of the empty body.
pub(crate) const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// The clock skew AWS tolerates between the request time and the server time.
pub(crate) const DEFAULT_MAX_SKEW: Duration = Duration::minutes(15);

/// The longest validity a presigned request may ask for (`X-Amz-Expires`): 7 days.
pub(crate) const MAX_PRESIGNED_EXPIRES: Duration = Duration::days(7);

/// Headers never included in the signature by [`sign`] (botocore's list, plus
/// `authorization` itself).
const UNSIGNABLE_HEADERS: &[&str] = &[
    "authorization",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

/// Query parameter names used by presigned requests.
mod param {
    pub(super) const ALGORITHM: &str = "X-Amz-Algorithm";
    pub(super) const CREDENTIAL: &str = "X-Amz-Credential";
    pub(super) const DATE: &str = "X-Amz-Date";
    pub(super) const EXPIRES: &str = "X-Amz-Expires";
    pub(super) const SIGNED_HEADERS: &str = "X-Amz-SignedHeaders";
    pub(super) const SIGNATURE: &str = "X-Amz-Signature";
}

/// RFC 3986 unreserved characters stay bare; everything else is `%XX` (upper case).
const QUERY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// As [`QUERY_ENCODE`], but `/` separates path segments and stays bare.
const PATH_ENCODE: &AsciiSet = &QUERY_ENCODE.remove(b'/');

/// Why a request's SigV4 authentication was refused. Each variant names what the
/// caller should answer; none of them carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SigV4Error {
    /// The request carries no SigV4 authentication at all (no `Authorization` header
    /// and no `X-Amz-Signature` / `X-Amz-Credential` / `X-Amz-Algorithm` query
    /// parameter). The caller may try another scheme or answer "missing token".
    #[error("request carries no AWS Signature Version 4 authentication")]
    Missing,
    /// The authentication is present but cannot be understood (bad syntax, a missing
    /// or repeated component, a signed header absent from the request, an unsupported
    /// scheme or algorithm, …). The text says what is wrong.
    #[error("malformed SigV4 authentication: {0}")]
    Malformed(String),
    /// The credential scope does not fit: wrong region, service or terminator, or a
    /// scope date other than the request date. The text says which.
    #[error("credential scope mismatch: {0}")]
    WrongScope(String),
    /// The request time is further from the server's clock than allowed (or a
    /// presigned request is dated in the future).
    #[error("request time is too far from the server time")]
    Skewed,
    /// A presigned request used after `X-Amz-Date + X-Amz-Expires`.
    #[error("presigned request has expired")]
    Expired,
    /// The body's SHA-256 differs from the `x-amz-content-sha256` header.
    #[error("request body does not match x-amz-content-sha256")]
    PayloadMismatch,
    /// The signature does not match the request and the secret.
    #[error("the request signature does not match")]
    SignatureMismatch,
}

/// The parts of an incoming (or outgoing) HTTP request that SigV4 covers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SignedRequest<'a> {
    /// The request method.
    pub(crate) method: &'a Method,
    /// The path exactly as received on the wire, still percent-encoded
    /// (`uri.path()`), without the query.
    pub(crate) path: &'a str,
    /// The raw query string without the leading `?` (`uri.query()`), if any.
    pub(crate) query: Option<&'a str>,
    /// All request headers; must contain `host` (see the module docs for HTTP/2).
    pub(crate) headers: &'a HeaderMap,
    /// The payload hash to sign: lower-case hex SHA-256 of the body, or the
    /// `x-amz-content-sha256` value the client sent (see [`payload_hash`]).
    pub(crate) payload_sha256: &'a str,
}

/// What the server requires of a request's credential scope and time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Expect<'a> {
    /// The region this node serves, e.g. `us-east-1`.
    pub(crate) region: &'a str,
    /// The signing service name, e.g. `codeartifact`.
    pub(crate) service: &'a str,
    /// The server's current time.
    pub(crate) now: OffsetDateTime,
    /// The largest accepted distance between request time and `now`
    /// (normally [`DEFAULT_MAX_SKEW`]).
    pub(crate) max_skew: Duration,
}

/// The credential a request was signed with:
/// `<access_key_id>/<date>/<region>/<service>/aws4_request`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credential {
    /// The access key id, used by the caller to look up the secret.
    pub(crate) access_key_id: String,
    /// The scope date, `YYYYMMDD` (already checked equal to the request date).
    pub(crate) date: String,
    /// The scope region.
    pub(crate) region: String,
    /// The scope service.
    pub(crate) service: String,
}

/// Where a request carried its signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthLocation {
    /// In the `Authorization` header.
    Header,
    /// In presigned `X-Amz-*` query parameters, valid for `expires` from the request
    /// time.
    Query {
        /// The `X-Amz-Expires` validity.
        expires: Duration,
    },
}

/// A request's SigV4 authentication, parsed and syntactically checked but not yet
/// verified. Produced by [`parse`], consumed by [`verify`] with the same request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParsedAuth {
    /// The credential and its scope.
    pub(crate) credential: Credential,
    /// The signed header names: lower case, sorted, unique, including `host`.
    pub(crate) signed_headers: Vec<String>,
    /// The request time as sent (`x-amz-date` / `X-Amz-Date`), `YYYYMMDDTHHMMSSZ`.
    pub(crate) timestamp: String,
    /// The request time, parsed.
    pub(crate) time: OffsetDateTime,
    /// Header or presigned-query authentication.
    pub(crate) location: AuthLocation,
    /// The claimed signature (32 bytes, decoded from hex).
    pub(crate) signature: [u8; 32],
}

/// Who signs, for [`sign`]. Its `Debug` output hides the secret.
#[derive(Clone, Copy)]
pub(crate) struct SigningParams<'a> {
    /// The access key id placed in the credential.
    pub(crate) access_key_id: &'a str,
    /// The secret access key.
    pub(crate) secret: &'a str,
    /// The region of the scope.
    pub(crate) region: &'a str,
    /// The service of the scope.
    pub(crate) service: &'a str,
}

impl std::fmt::Debug for SigningParams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningParams")
            .field("access_key_id", &self.access_key_id)
            .field("secret", &"<redacted>")
            .field("region", &self.region)
            .field("service", &self.service)
            .finish()
    }
}

/// Extracts and checks the syntax of a request's SigV4 authentication, without any
/// secret, so that the caller can look up the secret of
/// `parsed.credential.access_key_id` and call [`verify`].
///
/// Checks done here: exactly one authentication mechanism; the algorithm; the
/// credential's shape and terminator; `SignedHeaders` lower case, sorted, unique and
/// including `host` (and `x-amz-date` for header authentication); the request time's
/// format; the scope date equal to the request date; presigned expiry within 7 days.
pub(crate) fn parse(req: &SignedRequest<'_>) -> Result<ParsedAuth, SigV4Error> {
    let mut auth_headers = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let header = auth_headers.next();
    if auth_headers.next().is_some() {
        return Err(malformed("more than one Authorization header"));
    }
    let query_pairs = req.query.map(split_query).unwrap_or_default();
    let presigned = query_pairs.iter().any(|(k, _)| {
        k == param::SIGNATURE.as_bytes()
            || k == param::CREDENTIAL.as_bytes()
            || k == param::ALGORITHM.as_bytes()
    });
    match (header, presigned) {
        (None, false) => Err(SigV4Error::Missing),
        (Some(_), true) => Err(malformed(
            "both an Authorization header and presigned query parameters",
        )),
        (Some(value), false) => {
            let value = value
                .to_str()
                .map_err(|_| malformed("Authorization header is not visible ASCII"))?;
            parse_header_auth(value, req.headers)
        }
        (None, true) => parse_query_auth(&query_pairs),
    }
}

/// Verifies a parsed request against the caller's expectation and the secret of
/// `parsed.credential.access_key_id`.
///
/// In order: the scope's region and service ([`SigV4Error::WrongScope`]); the time
/// (header authentication: within `max_skew` of `now` either way, else
/// [`SigV4Error::Skewed`]; presigned: not more than `max_skew` in the future, else
/// [`SigV4Error::Skewed`], and not past its expiry, else [`SigV4Error::Expired`]); the
/// signature, compared in constant time ([`SigV4Error::SignatureMismatch`]).
///
/// The signature is checked over `req.payload_sha256`; if that fails and the client
/// signed its `x-amz-content-sha256` header, it is checked once more over
/// [`UNSIGNED_PAYLOAD`], which is how the AWS SDK for Rust signs streaming bodies. The
/// body is then covered through that signed header, so the caller must (as always)
/// check the body against `x-amz-content-sha256` ([`payload_hash`] does).
///
/// `parsed` must come from [`parse`] on the same `req`.
pub(crate) fn verify(
    req: &SignedRequest<'_>,
    parsed: &ParsedAuth,
    secret: &str,
    expect: &Expect<'_>,
) -> Result<(), SigV4Error> {
    let cred = &parsed.credential;
    if cred.region != expect.region {
        return Err(SigV4Error::WrongScope(format!(
            "credential region `{}` is not `{}`",
            cred.region, expect.region
        )));
    }
    if cred.service != expect.service {
        return Err(SigV4Error::WrongScope(format!(
            "credential service `{}` is not `{}`",
            cred.service, expect.service
        )));
    }
    match parsed.location {
        AuthLocation::Header => {
            if (expect.now - parsed.time).abs() > expect.max_skew {
                return Err(SigV4Error::Skewed);
            }
        }
        AuthLocation::Query { expires } => {
            if parsed.time - expect.now > expect.max_skew {
                return Err(SigV4Error::Skewed);
            }
            // `None` only past year 9999, where nothing has expired yet.
            if parsed
                .time
                .checked_add(expires)
                .is_some_and(|end| expect.now > end)
            {
                return Err(SigV4Error::Expired);
            }
        }
    }
    let presigned = matches!(parsed.location, AuthLocation::Query { .. });
    let key = signing_key(secret, &cred.date, &cred.region, &cred.service);
    let matches = |payload_sha256: &str| -> Result<bool, SigV4Error> {
        let req = SignedRequest {
            payload_sha256,
            ..*req
        };
        let canonical = canonical_request_bytes(&req, &parsed.signed_headers, presigned)?;
        let sts = string_to_sign(&parsed.timestamp, &scope_of(cred), &canonical);
        let mut mac = hmac_new(&key);
        mac.update(sts.as_bytes());
        Ok(mac.verify_slice(&parsed.signature).is_ok())
    };
    if matches(req.payload_sha256)? {
        return Ok(());
    }
    // The AWS SDKs for Rust and others sign a streaming body as UNSIGNED-PAYLOAD while
    // still sending a modeled `x-amz-content-sha256` header (PublishPackageVersion's
    // assetSHA256). Accept that only when the header itself is signed: the body stays
    // bound to the signature through it (the caller checks body against header).
    let header_signed = parsed
        .signed_headers
        .binary_search_by(|h| h.as_str().cmp("x-amz-content-sha256"))
        .is_ok();
    if header_signed && req.payload_sha256 != UNSIGNED_PAYLOAD && matches(UNSIGNED_PAYLOAD)? {
        return Ok(());
    }
    Err(SigV4Error::SignatureMismatch)
}

/// The canonical request of `req` as `parsed` describes it, for diagnostics (AWS
/// quotes it in its signature-mismatch message). Header bytes that are not UTF-8 are
/// shown lossily; the signature itself is computed on the exact bytes.
pub(crate) fn canonical_request(
    req: &SignedRequest<'_>,
    parsed: &ParsedAuth,
) -> Result<String, SigV4Error> {
    let presigned = matches!(parsed.location, AuthLocation::Query { .. });
    let bytes = canonical_request_bytes(req, &parsed.signed_headers, presigned)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Signs `req` and returns the value for its `Authorization` header.
///
/// `req.headers` must already hold `host` and `x-amz-date` (see [`format_amz_date`]);
/// every header present is signed except `authorization` and the hop-by-hop /
/// volatile ones botocore leaves out (`user-agent`, `expect`, `transfer-encoding`, …).
/// The request time is taken from `x-amz-date`.
pub(crate) fn sign(
    req: &SignedRequest<'_>,
    params: &SigningParams<'_>,
) -> Result<String, SigV4Error> {
    let timestamp = single_header(req.headers, "x-amz-date")?
        .ok_or_else(|| malformed("x-amz-date header is missing"))?;
    let timestamp =
        std::str::from_utf8(timestamp).map_err(|_| malformed("x-amz-date header is not ASCII"))?;
    parse_amz_date(timestamp)?;
    if !req.headers.contains_key(http::header::HOST) {
        return Err(malformed("host header is missing"));
    }
    let mut names: Vec<String> = req
        .headers
        .keys()
        .map(|name| name.as_str().to_owned())
        .filter(|name| !UNSIGNABLE_HEADERS.contains(&name.as_str()))
        .collect();
    names.sort();
    names.dedup();
    let credential = Credential {
        access_key_id: params.access_key_id.to_owned(),
        date: timestamp[..8].to_owned(),
        region: params.region.to_owned(),
        service: params.service.to_owned(),
    };
    check_credential_fields(&credential)?;
    let canonical = canonical_request_bytes(req, &names, false)?;
    let sts = string_to_sign(timestamp, &scope_of(&credential), &canonical);
    let key = signing_key(
        params.secret,
        &credential.date,
        &credential.region,
        &credential.service,
    );
    let mut mac = hmac_new(&key);
    mac.update(sts.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    Ok(format!(
        "{ALGORITHM} Credential={}/{}, SignedHeaders={}, Signature={signature}",
        credential.access_key_id,
        scope_of(&credential),
        names.join(";"),
    ))
}

/// Derives the SigV4 signing key:
/// `HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
pub(crate) fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let mut k_secret = Vec::with_capacity(4 + secret.len());
    k_secret.extend_from_slice(b"AWS4");
    k_secret.extend_from_slice(secret.as_bytes());
    let k_date = hmac_sha256(&k_secret, date.as_bytes());
    let k_region = hmac_sha256(&k_date, region.as_bytes());
    let k_service = hmac_sha256(&k_region, service.as_bytes());
    hmac_sha256(&k_service, SCOPE_TERMINATOR.as_bytes())
}

/// Formats a time as SigV4 wants it in `x-amz-date`: `YYYYMMDDTHHMMSSZ` (UTC).
pub(crate) fn format_amz_date(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Lower-case hex SHA-256 of `body`.
pub(crate) fn sha256_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// The `x-amz-content-sha256` header, checked: `None` when absent; otherwise either
/// 64 hex digits or [`UNSIGNED_PAYLOAD`], returned verbatim (that is what the client
/// signed). Streaming (`STREAMING-…`) payloads are refused as malformed.
///
/// When the body is read after the signature is verified, a returned hash must be
/// compared with the body's afterwards (unless it is [`UNSIGNED_PAYLOAD`]).
pub(crate) fn declared_payload_hash(headers: &HeaderMap) -> Result<Option<&str>, SigV4Error> {
    let Some(value) = single_header(headers, "x-amz-content-sha256")? else {
        return Ok(None);
    };
    let value =
        std::str::from_utf8(value).map_err(|_| malformed("x-amz-content-sha256 is not ASCII"))?;
    if value == UNSIGNED_PAYLOAD
        || (value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(Some(value))
    } else {
        Err(malformed("unsupported x-amz-content-sha256 value"))
    }
}

/// The payload hash to put in [`SignedRequest::payload_sha256`] for a fully read
/// body: the `x-amz-content-sha256` value if the client sent one (after checking it
/// against the body, [`SigV4Error::PayloadMismatch`] otherwise; [`UNSIGNED_PAYLOAD`]
/// is passed through unchecked), else the body's hex SHA-256.
pub(crate) fn payload_hash(headers: &HeaderMap, body: &[u8]) -> Result<String, SigV4Error> {
    let actual = sha256_hex(body);
    match declared_payload_hash(headers)? {
        None => Ok(actual),
        Some(declared) if declared == UNSIGNED_PAYLOAD => Ok(declared.to_owned()),
        Some(declared) if declared.eq_ignore_ascii_case(&actual) => Ok(declared.to_owned()),
        Some(_) => Err(SigV4Error::PayloadMismatch),
    }
}

// ---------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------

fn malformed(what: &str) -> SigV4Error {
    SigV4Error::Malformed(what.to_owned())
}

/// `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`, components in any
/// order, separated by commas and/or whitespace.
fn parse_header_auth(value: &str, headers: &HeaderMap) -> Result<ParsedAuth, SigV4Error> {
    let value = value.trim_matches(|c: char| c.is_ascii_whitespace());
    let (scheme, rest) = value
        .split_once(|c: char| c.is_ascii_whitespace())
        .unwrap_or((value, ""));
    if scheme != ALGORITHM {
        return Err(if scheme.starts_with("AWS4-") {
            malformed("unsupported signing algorithm")
        } else {
            malformed("Authorization header is not AWS4-HMAC-SHA256")
        });
    }
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest
        .split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|p| !p.is_empty())
    {
        let (key, val) = part
            .split_once('=')
            .ok_or_else(|| malformed("Authorization component without `=`"))?;
        let slot = match key {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(malformed("unknown Authorization component")),
        };
        if slot.replace(val).is_some() {
            return Err(malformed("repeated Authorization component"));
        }
    }
    let credential = credential.ok_or_else(|| malformed("Credential is missing"))?;
    let signed_headers = signed_headers.ok_or_else(|| malformed("SignedHeaders is missing"))?;
    let signature = signature.ok_or_else(|| malformed("Signature is missing"))?;

    let timestamp = single_header(headers, "x-amz-date")?
        .ok_or_else(|| malformed("x-amz-date header is missing"))?;
    let timestamp =
        std::str::from_utf8(timestamp).map_err(|_| malformed("x-amz-date header is not ASCII"))?;
    let signed_headers = parse_signed_headers(signed_headers)?;
    if signed_headers
        .binary_search_by(|h| h.as_str().cmp("x-amz-date"))
        .is_err()
    {
        return Err(malformed("x-amz-date must be a signed header"));
    }
    finish_parse(
        credential,
        signed_headers,
        signature,
        timestamp,
        AuthLocation::Header,
    )
}

/// Presigned authentication from already split (still encoded) query pairs.
fn parse_query_auth(pairs: &[(Vec<u8>, Vec<u8>)]) -> Result<ParsedAuth, SigV4Error> {
    let mut found: [Option<String>; 6] = Default::default();
    let names = [
        param::ALGORITHM,
        param::CREDENTIAL,
        param::DATE,
        param::EXPIRES,
        param::SIGNED_HEADERS,
        param::SIGNATURE,
    ];
    for (key, value) in pairs {
        let Some(i) = names.iter().position(|n| n.as_bytes() == key.as_slice()) else {
            continue;
        };
        let value = String::from_utf8(value.clone())
            .map_err(|_| SigV4Error::Malformed(format!("{} is not UTF-8", names[i])))?;
        if found[i].replace(value).is_some() {
            return Err(SigV4Error::Malformed(format!("repeated {}", names[i])));
        }
    }
    let [
        algorithm,
        credential,
        date,
        expires,
        signed_headers,
        signature,
    ] = found;
    let get = |v: Option<String>, name: &str| {
        v.ok_or_else(|| SigV4Error::Malformed(format!("{name} is missing")))
    };
    if get(algorithm, param::ALGORITHM)? != ALGORITHM {
        return Err(malformed("unsupported signing algorithm"));
    }
    let credential = get(credential, param::CREDENTIAL)?;
    let date = get(date, param::DATE)?;
    let expires = get(expires, param::EXPIRES)?;
    let signed_headers = get(signed_headers, param::SIGNED_HEADERS)?;
    let signature = get(signature, param::SIGNATURE)?;

    let expires = Some(expires.as_str())
        .filter(|e| (1..=7).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|e| e.parse::<i64>().ok())
        .map(Duration::seconds)
        .filter(|e| e.is_positive() && *e <= MAX_PRESIGNED_EXPIRES)
        .ok_or_else(|| malformed("X-Amz-Expires must be 1 to 604800 seconds"))?;
    let signed_headers = parse_signed_headers(&signed_headers)?;
    finish_parse(
        &credential,
        signed_headers,
        &signature,
        &date,
        AuthLocation::Query { expires },
    )
}

fn finish_parse(
    credential: &str,
    signed_headers: Vec<String>,
    signature: &str,
    timestamp: &str,
    location: AuthLocation,
) -> Result<ParsedAuth, SigV4Error> {
    let credential = parse_credential(credential)?;
    let time = parse_amz_date(timestamp)?;
    if credential.date != timestamp[..8] {
        return Err(SigV4Error::WrongScope(format!(
            "credential date `{}` is not the request date `{}`",
            credential.date,
            &timestamp[..8]
        )));
    }
    let mut sig = [0u8; 32];
    if signature.len() != 64 || hex::decode_to_slice(signature, &mut sig).is_err() {
        return Err(malformed("Signature must be 64 hex digits"));
    }
    Ok(ParsedAuth {
        credential,
        signed_headers,
        timestamp: timestamp.to_owned(),
        time,
        location,
        signature: sig,
    })
}

/// `AKID/YYYYMMDD/region/service/aws4_request`.
fn parse_credential(value: &str) -> Result<Credential, SigV4Error> {
    let parts: Vec<&str> = value.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts.as_slice() else {
        return Err(malformed(
            "Credential must be <key>/<date>/<region>/<service>/aws4_request",
        ));
    };
    if *terminator != SCOPE_TERMINATOR {
        return Err(SigV4Error::WrongScope(format!(
            "credential scope must end with `{SCOPE_TERMINATOR}`"
        )));
    }
    if date.len() != 8 || !date.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("credential date must be YYYYMMDD"));
    }
    let credential = Credential {
        access_key_id: (*access_key_id).to_owned(),
        date: (*date).to_owned(),
        region: (*region).to_owned(),
        service: (*service).to_owned(),
    };
    check_credential_fields(&credential)?;
    Ok(credential)
}

fn check_credential_fields(c: &Credential) -> Result<(), SigV4Error> {
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if !ok(&c.access_key_id) {
        return Err(malformed("credential access key id is empty or invalid"));
    }
    if !ok(&c.region) || !ok(&c.service) {
        return Err(malformed(
            "credential region or service is empty or invalid",
        ));
    }
    Ok(())
}

/// `a;b;c`: lower-case header names, strictly ascending, `host` among them.
fn parse_signed_headers(value: &str) -> Result<Vec<String>, SigV4Error> {
    let is_token =
        |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b);
    let mut names: Vec<String> = Vec::new();
    for name in value.split(';') {
        if name.is_empty() || !name.bytes().all(is_token) {
            return Err(malformed(
                "SignedHeaders must be lower-case header names separated by `;`",
            ));
        }
        if names.last().is_some_and(|prev| prev.as_str() >= name) {
            return Err(malformed("SignedHeaders must be sorted and unique"));
        }
        names.push(name.to_owned());
    }
    if names.binary_search_by(|h| h.as_str().cmp("host")).is_err() {
        return Err(malformed("host must be a signed header"));
    }
    Ok(names)
}

/// `YYYYMMDDTHHMMSSZ`, strictly.
fn parse_amz_date(value: &str) -> Result<OffsetDateTime, SigV4Error> {
    let b = value.as_bytes();
    let shape_ok = b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
    if !shape_ok {
        return Err(malformed("request date must be YYYYMMDDTHHMMSSZ"));
    }
    PrimitiveDateTime::parse(
        value,
        format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .map(PrimitiveDateTime::assume_utc)
    .map_err(|_| malformed("request date is not a valid time"))
}

/// The one value of header `name`, if present; two or more are malformed.
fn single_header<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h [u8]>, SigV4Error> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(SigV4Error::Malformed(format!(
            "more than one {name} header"
        )));
    }
    Ok(first.map(|v| v.as_bytes()))
}

/// Splits a raw query into form-decoded `(key, value)` byte pairs, skipping empty
/// pieces; a piece without `=` has an empty value.
fn split_query(query: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

fn form_decode(s: &str) -> Vec<u8> {
    let plus_as_space: Vec<u8> = s
        .bytes()
        .map(|b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&plus_as_space).collect()
}

// ---------------------------------------------------------------------------------------
// Canonical request and signature
// ---------------------------------------------------------------------------------------

/// The canonical request's exact bytes. `presigned` leaves `X-Amz-Signature` out of
/// the canonical query.
fn canonical_request_bytes(
    req: &SignedRequest<'_>,
    signed_headers: &[String],
    presigned: bool,
) -> Result<Vec<u8>, SigV4Error> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_path(req.path).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(canonical_query(req.query.unwrap_or(""), presigned).as_bytes());
    out.push(b'\n');
    for name in signed_headers {
        let mut values = req.headers.get_all(name.as_str()).iter().peekable();
        if values.peek().is_none() {
            return Err(SigV4Error::Malformed(format!(
                "signed header `{name}` is missing from the request"
            )));
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        for (i, value) in values.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            push_trimmed(&mut out, value.as_bytes());
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(signed_headers.join(";").as_bytes());
    out.push(b'\n');
    out.extend_from_slice(req.payload_sha256.as_bytes());
    Ok(out)
}

/// Appends `value` without leading/trailing whitespace and with each inner run of
/// whitespace replaced by one space.
fn push_trimmed(out: &mut Vec<u8>, value: &[u8]) {
    let mut words = value
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty());
    if let Some(first) = words.next() {
        out.extend_from_slice(first);
        for word in words {
            out.push(b' ');
            out.extend_from_slice(word);
        }
    }
}

/// botocore's `quote(remove_dot_segments(path), safe='/~')`: `.`/`..` and empty
/// segments removed, a trailing `/` kept, then every byte outside `A-Za-z0-9-_.~/`
/// percent-encoded (so `%2F` on the wire becomes `%252F`).
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".to_owned();
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut normalized = String::with_capacity(path.len() + 1);
    if path.starts_with('/') {
        normalized.push('/');
    }
    normalized.push_str(&segments.join("/"));
    if path.ends_with('/') && !segments.is_empty() {
        normalized.push('/');
    }
    utf8_percent_encode(&normalized, PATH_ENCODE).to_string()
}

/// Decoded pairs re-encoded with only unreserved characters bare, sorted by key then
/// value, joined with `&`.
fn canonical_query(query: &str, presigned: bool) -> String {
    let mut pairs: Vec<(String, String)> = split_query(query)
        .into_iter()
        .filter(|(k, _)| !(presigned && k == param::SIGNATURE.as_bytes()))
        .map(|(k, v)| (encode_query_part(&k), encode_query_part(&v)))
        .collect();
    pairs.sort();
    let mut out = String::with_capacity(query.len() + 16);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

fn encode_query_part(bytes: &[u8]) -> String {
    percent_encoding::percent_encode(bytes, QUERY_ENCODE).to_string()
}

fn scope_of(c: &Credential) -> String {
    format!("{}/{}/{}/{SCOPE_TERMINATOR}", c.date, c.region, c.service)
}

fn string_to_sign(timestamp: &str, scope: &str, canonical_request: &[u8]) -> String {
    let mut sts = String::with_capacity(128);
    // Writing to a String cannot fail.
    let _ = write!(
        sts,
        "{ALGORITHM}\n{timestamp}\n{scope}\n{}",
        sha256_hex(canonical_request)
    );
    sts
}

fn hmac_new(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = hmac_new(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// One request signed by botocore; see `botocore_vectors` below.
    struct Vector {
        name: &'static str,
        access_key: &'static str,
        secret: &'static str,
        region: &'static str,
        /// The frozen signing time (`x-amz-date`).
        now: &'static str,
        method: &'static str,
        path: &'static str,
        query: &'static str,
        /// The wire headers (lower-cased), including `authorization` for header auth.
        headers: &'static [(&'static str, &'static str)],
        body: &'static str,
        /// The canonical request botocore logged while signing.
        canonical: &'static str,
    }

    // Produced by `scripts/gen_sigv4_vectors.py` (botocore 1.43.11): the `client:*` vectors are
    // real `codeartifact` client calls (botocore's own rest-json serialization, clock
    // frozen, the HTTP send intercepted); the `raw:*` ones run `SigV4Auth` /
    // `SigV4QueryAuth` on hand-made `AWSRequest`s with pre-encoded paths (`%40`, `%2F`,
    // `%20`, `%3A`), dot segments, repeated/unsorted/empty query keys, duplicated and
    // space-padded headers, and a presigned URL.
    // Generated by scripts/gen_sigv4_vectors.py with botocore 1.43.11; do not edit by hand.
    const VECTORS: &[Vector] = &[
        Vector {
            name: "client:CreateDomain",
            access_key: "AKIDEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "POST",
            path: "/v1/domain",
            query: "domain=my-domain",
            headers: &[
                ("host", "localhost:8080"),
                ("content-type", "application/json"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=2c7589d714a98fb5a1aba32a5e053e948f7b52b4748e44662a0b8ebb149e123c",
                ),
            ],
            body: "{}",
            canonical: "POST\n/v1/domain\ndomain=my-domain\ncontent-type:application/json\nhost:localhost:8080\nx-amz-date:20261125T120000Z\n\ncontent-type;host;x-amz-date\n44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
        },
        Vector {
            name: "client:GetRepositoryEndpoint",
            access_key: "AKIDEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: "20261125T235959Z",
            method: "GET",
            path: "/v1/repository/endpoint",
            query: "domain=d&repository=r&format=npm",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20261125T235959Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-date, Signature=f894d36610be8311eef08381d50427551c6c7be42a6b3438fd25bf5680149490",
                ),
            ],
            body: "",
            canonical: "GET\n/v1/repository/endpoint\ndomain=d&format=npm&repository=r\nhost:localhost:8080\nx-amz-date:20261125T235959Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "client:DeleteDomain",
            access_key: "AKIDEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "eu-west-2",
            now: "20260101T000000Z",
            method: "DELETE",
            path: "/v1/domain",
            query: "domain=my-domain&domain-owner=111122223333",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20260101T000000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/eu-west-2/codeartifact/aws4_request, SignedHeaders=host;x-amz-date, Signature=f9c1b806d950c5364a4f8d369159d1eef02f6f0ed5d7f75fe0780df678613195",
                ),
            ],
            body: "",
            canonical: "DELETE\n/v1/domain\ndomain=my-domain&domain-owner=111122223333\nhost:localhost:8080\nx-amz-date:20260101T000000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "client:PutDomainPermissionsPolicy",
            access_key: "AKIDEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "PUT",
            path: "/v1/domain/permissions/policy",
            query: "",
            headers: &[
                ("host", "localhost:8080"),
                ("content-type", "application/json"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=ebebf591e1e244b73fe31243baed305941e80482505718a26f4f26a20ee6e073",
                ),
            ],
            body: "{\"domain\": \"my-domain\", \"policyDocument\": \"{\\\"Version\\\":\\\"2012-10-17\\\",\\\"Statement\\\":[{\\\"Effect\\\":\\\"Allow\\\",\\\"Principal\\\":\\\"*\\\",\\\"Action\\\":\\\"codeartifact:*\\\"}]}\"}",
            canonical: "PUT\n/v1/domain/permissions/policy\n\ncontent-type:application/json\nhost:localhost:8080\nx-amz-date:20261125T120000Z\n\ncontent-type;host;x-amz-date\n085ff76d68e401c196d5252199fb48cf6b94733b709c664b1dff53108ab7a3e5",
        },
        Vector {
            name: "client:ListPackages-encoded-query",
            access_key: "AKIDEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "POST",
            path: "/v1/packages",
            query: "domain=my-domain&repository=my%20repo&format=npm&namespace=%40sc%20ope&package-prefix=a%2Fb%3Dc%252f~%2B%26%C3%A9",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-date, Signature=5732daf3f71a9ce9cfd90b812a21c2d28ae5fe6cfff2f506c04a0f5e685ac2db",
                ),
            ],
            body: "",
            canonical: "POST\n/v1/packages\ndomain=my-domain&format=npm&namespace=%40sc%20ope&package-prefix=a%2Fb%3Dc%252f~%2B%26%C3%A9&repository=my%20repo\nhost:localhost:8080\nx-amz-date:20261125T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "client:GetAuthorizationToken-session-token",
            access_key: "ASIAEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "POST",
            path: "/v1/authorization-token",
            query: "domain=my-domain&domain-owner=111122223333&duration=3600",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "x-amz-security-token",
                    "FwoGZXIvYXdzEXAMPLE//token+with/slashes=",
                ),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=ASIAEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=ddc0a3327626932aac752d02bfd3b8cb5d8968c9e1eefe3f95bc29463683e3a3",
                ),
            ],
            body: "",
            canonical: "POST\n/v1/authorization-token\ndomain=my-domain&domain-owner=111122223333&duration=3600\nhost:localhost:8080\nx-amz-date:20261125T120000Z\nx-amz-security-token:FwoGZXIvYXdzEXAMPLE//token+with/slashes=\n\nhost;x-amz-date;x-amz-security-token\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "client:PublishPackageVersion-body",
            access_key: "AKIDEXAMPLE",
            secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "POST",
            path: "/v1/package/version/publish",
            query: "domain=my-domain&repository=my-repo&format=generic&namespace=ns&package=pkg&version=1.0.0&asset=hello.txt&unfinished=true",
            headers: &[
                ("host", "localhost:8080"),
                (
                    "x-amz-content-sha256",
                    "a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447",
                ),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=5c621f8bbd194944c6be80520a516980a4c46503c1cf3a68b47b5dad1d674b13",
                ),
            ],
            body: "hello world\n",
            canonical: "POST\n/v1/package/version/publish\nasset=hello.txt&domain=my-domain&format=generic&namespace=ns&package=pkg&repository=my-repo&unfinished=true&version=1.0.0\nhost:localhost:8080\nx-amz-content-sha256:a948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447\nx-amz-date:20261125T120000Z\n\nhost;x-amz-content-sha256;x-amz-date\na948904f2f0f479b8f8197694b30184b0d2ed1c1cd2a1ec0fb85d299a192a447",
        },
        Vector {
            name: "raw:path-percent-encoded-labels",
            access_key: "AKIDEXAMPLE",
            secret: "raw-secret",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "GET",
            path: "/v1/package/%40scope%2Fname/a%20b~c%3A1",
            query: "domain=d",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-date, Signature=ef8d6ac2d5cc41db96317756afbdf0b57c0d761c5bfe2ce9e04a7b2bbabf6d58",
                ),
            ],
            body: "",
            canonical: "GET\n/v1/package/%2540scope%252Fname/a%2520b~c%253A1\ndomain=d\nhost:localhost:8080\nx-amz-date:20261125T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "raw:path-dot-segments-and-double-slash",
            access_key: "AKIDEXAMPLE",
            secret: "raw-secret",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "GET",
            path: "/v1//a/./b/../c/",
            query: "",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-date, Signature=db0711d496682cbad0462d76428b1bec560ba3f76a8f7ab8bfaf2e6a0f10c6ae",
                ),
            ],
            body: "",
            canonical: "GET\n/v1/a/c/\n\nhost:localhost:8080\nx-amz-date:20261125T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "raw:query-repeated-unsorted-empty",
            access_key: "AKIDEXAMPLE",
            secret: "raw-secret",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "GET",
            path: "/v1/x",
            query: "b=2&a=3&a=1&c=&d&A=z&a%20b=%2Fx%3D%40",
            headers: &[
                ("host", "localhost:8080"),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=host;x-amz-date, Signature=0311856fd88c9fa7a45629c642e35d5f0337dbb19d9f7f5cd8e8427a574d362e",
                ),
            ],
            body: "",
            canonical: "GET\n/v1/x\nA=z&a=1&a=3&a%20b=%2Fx%3D%40&b=2&c=&d=\nhost:localhost:8080\nx-amz-date:20261125T120000Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
        Vector {
            name: "raw:headers-spaces-and-duplicates",
            access_key: "AKIDEXAMPLE",
            secret: "raw-secret",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "POST",
            path: "/v1/x",
            query: "domain=d",
            headers: &[
                ("host", "localhost:8080"),
                ("content-type", "application/json"),
                ("x-custom", "  a   b\tc  "),
                ("x-multi", "one"),
                ("x-multi", " two "),
                ("x-amz-date", "20261125T120000Z"),
                (
                    "authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261125/us-east-1/codeartifact/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-custom;x-multi, Signature=b4d5e2bf680333682fa64766a8552d531c66e7aaa33888466f2494edccf4cdd8",
                ),
            ],
            body: "{\"a\": \"b\",  \"c\": [1, 2]}",
            canonical: "POST\n/v1/x\ndomain=d\ncontent-type:application/json\nhost:localhost:8080\nx-amz-date:20261125T120000Z\nx-custom:a b c\nx-multi:one,two\n\ncontent-type;host;x-amz-date;x-custom;x-multi\nddddc60e90227d77ea8b6952357ac8cbe3e23f8a4f0cc73a6b2282c696801e33",
        },
        Vector {
            name: "raw:presigned-get",
            access_key: "AKIDEXAMPLE",
            secret: "raw-secret",
            region: "us-east-1",
            now: "20261125T120000Z",
            method: "GET",
            path: "/v1/repository/endpoint",
            query: "domain=d&repository=r&format=npm&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261125%2Fus-east-1%2Fcodeartifact%2Faws4_request&X-Amz-Date=20261125T120000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=4f60f4d1a9398701c883807976432d83800b7080eff906f8f3d4a8a9d3aa4de9",
            headers: &[("host", "localhost:8080")],
            body: "",
            canonical: "GET\n/v1/repository/endpoint\nX-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261125%2Fus-east-1%2Fcodeartifact%2Faws4_request&X-Amz-Date=20261125T120000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&domain=d&format=npm&repository=r\nhost:localhost:8080\n\nhost\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        },
    ];

    fn t(amz: &str) -> OffsetDateTime {
        parse_amz_date(amz).unwrap()
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    fn expect<'a>(region: &'a str, now: &str) -> Expect<'a> {
        Expect {
            region,
            service: "codeartifact",
            now: t(now),
            max_skew: DEFAULT_MAX_SKEW,
        }
    }

    fn request<'a>(
        method: &'a Method,
        path: &'a str,
        query: &'a str,
        headers: &'a HeaderMap,
        payload: &'a str,
    ) -> SignedRequest<'a> {
        SignedRequest {
            method,
            path,
            query: (!query.is_empty()).then_some(query),
            headers,
            payload_sha256: payload,
        }
    }

    #[test]
    fn botocore_vectors() {
        for v in VECTORS {
            let headers = header_map(v.headers);
            let method = Method::from_bytes(v.method.as_bytes()).unwrap();
            let payload = payload_hash(&headers, v.body.as_bytes()).unwrap();
            let req = request(&method, v.path, v.query, &headers, &payload);
            let parsed = parse(&req).unwrap_or_else(|e| panic!("{}: {e}", v.name));
            assert_eq!(parsed.credential.access_key_id, v.access_key, "{}", v.name);
            assert_eq!(
                canonical_request(&req, &parsed).unwrap(),
                v.canonical,
                "{}",
                v.name
            );
            let exp = expect(v.region, v.now);
            assert_eq!(verify(&req, &parsed, v.secret, &exp), Ok(()), "{}", v.name);
            assert_eq!(
                verify(&req, &parsed, "not-the-secret", &exp),
                Err(SigV4Error::SignatureMismatch),
                "{}",
                v.name
            );

            // `sign` over the same signed headers reproduces botocore's header exactly.
            if let Some(expected) = headers.get(AUTHORIZATION) {
                let mut only_signed = HeaderMap::new();
                for name in &parsed.signed_headers {
                    for value in headers.get_all(name.as_str()) {
                        only_signed.append(
                            HeaderName::from_bytes(name.as_bytes()).unwrap(),
                            value.clone(),
                        );
                    }
                }
                only_signed.insert("user-agent", HeaderValue::from_static("ignored/1.0"));
                let out = sign(
                    &request(&method, v.path, v.query, &only_signed, &payload),
                    &SigningParams {
                        access_key_id: v.access_key,
                        secret: v.secret,
                        region: v.region,
                        service: "codeartifact",
                    },
                )
                .unwrap();
                assert_eq!(out, expected.to_str().unwrap(), "{}", v.name);
            }
        }
    }

    #[test]
    fn double_encoding_of_the_path_matches_botocore() {
        assert_eq!(canonical_path(""), "/");
        assert_eq!(canonical_path("/"), "/");
        assert_eq!(canonical_path("//"), "/");
        assert_eq!(canonical_path("/a/b/"), "/a/b/");
        assert_eq!(canonical_path("/a/./b/../../.."), "/");
        assert_eq!(canonical_path("/a/b/."), "/a/b");
        assert_eq!(
            canonical_path("/v1/%40scope%2Fname/a%20b~c%3A1"),
            "/v1/%2540scope%252Fname/a%2520b~c%253A1"
        );
        assert_eq!(
            canonical_path("/x/@:+=!*'()$,;"),
            "/x/%40%3A%2B%3D%21%2A%27%28%29%24%2C%3B"
        );
        assert_eq!(canonical_path("/ሴ"), "/%E1%88%B4");
    }

    #[test]
    fn canonical_query_rules() {
        assert_eq!(canonical_query("", false), "");
        assert_eq!(canonical_query("&&", false), "");
        assert_eq!(
            canonical_query("b=2&a=1&a=0&c&d=", false),
            "a=0&a=1&b=2&c=&d="
        );
        // `+` is a space; `%2B` is a plus; lower-case escapes are normalised.
        assert_eq!(canonical_query("q=a+b%2Bc%2f", false), "q=a%20b%2Bc%2F");
        // Raw reserved characters are encoded, `=` inside a value kept as data.
        assert_eq!(canonical_query("k=a=b/c@d", false), "k=a%3Db%2Fc%40d");
        // Invalid escapes are taken literally.
        assert_eq!(canonical_query("k=%zz%4", false), "k=%25zz%254");
        // Sorting is on the encoded bytes: upper case before lower case.
        assert_eq!(
            canonical_query("b=1&B=2&a%20=3&a=4", false),
            "B=2&a=4&a%20=3&b=1"
        );
        assert_eq!(canonical_query("a=1&X-Amz-Signature=00", true), "a=1");
    }

    /// Method, path, query, extra headers, expected signature.
    type SuiteCase = (
        &'static str,
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        &'static str,
    );

    /// Selected cases of the AWS SigV4 test suite (service `service`, us-east-1,
    /// AKIDEXAMPLE / wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20150830T123600Z).
    #[test]
    fn aws_test_suite_cases() {
        let cases: &[SuiteCase] = &[
            (
                "GET",
                "/",
                "",
                &[],
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "GET",
                "/",
                "Param2=value2&Param1=value1",
                &[],
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
            (
                "GET",
                "/",
                "Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
                &[],
                "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
            ),
            (
                "GET",
                "/",
                "",
                &[("my-header1", " value1"), ("my-header2", "\"a   b   c\"")],
                "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
            ),
            (
                "GET",
                "/",
                "",
                &[
                    ("my-header1", "value4"),
                    ("my-header1", "value1"),
                    ("my-header1", "value3"),
                    ("my-header1", "value2"),
                ],
                "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
            ),
            (
                "GET",
                "//example//",
                "",
                &[],
                "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
            ),
            (
                "GET",
                "/example1/example2/../..",
                "",
                &[],
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
        ];
        for (method, path, query, extra, signature) in cases {
            let mut pairs = vec![
                ("host", "example.amazonaws.com"),
                ("x-amz-date", "20150830T123600Z"),
            ];
            pairs.extend_from_slice(extra);
            let mut names: Vec<&str> = pairs.iter().map(|p| p.0).collect();
            names.sort();
            names.dedup();
            let auth = format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={}, Signature={signature}",
                names.join(";")
            );
            pairs.push(("authorization", &auth));
            let headers = header_map(&pairs);
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let req = request(&method, path, query, &headers, EMPTY_PAYLOAD_SHA256);
            let parsed = parse(&req).unwrap();
            let exp = Expect {
                region: "us-east-1",
                service: "service",
                now: t("20150830T123600Z"),
                max_skew: DEFAULT_MAX_SKEW,
            };
            assert_eq!(
                verify(
                    &req,
                    &parsed,
                    "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                    &exp
                ),
                Ok(()),
                "{path}?{query} {extra:?}"
            );
        }
    }

    /// The AWS suite's `double-url-encode` case (Lambda, us-east-2): `%3A` on the wire
    /// is signed as `%253A`.
    #[test]
    fn aws_double_url_encode_case() {
        let headers = header_map(&[
            ("host", "lambda.us-east-2.amazonaws.com"),
            ("x-amz-date", "20210511T154045Z"),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20210511/us-east-2/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=4b93abbcc68be32bd64c18e2c71150660ab4c29bbd6c32a383a7517a88fc1804",
            ),
        ]);
        let path = "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-west-2%3A892717189312%3Afunction%3Amy-rusty-fun/invocations";
        let post = Method::POST;
        let req = request(&post, path, "", &headers, EMPTY_PAYLOAD_SHA256);
        let parsed = parse(&req).unwrap();
        assert!(canonical_request(&req, &parsed).unwrap().starts_with(
            "POST\n/2015-03-31/functions/arn%253Aaws%253Alambda%253Aus-west-2%253A892717189312%253Afunction%253Amy-rusty-fun/invocations\n\n"
        ));
        let exp = Expect {
            region: "us-east-2",
            service: "lambda",
            now: t("20210511T154045Z"),
            max_skew: DEFAULT_MAX_SKEW,
        };
        assert_eq!(
            verify(
                &req,
                &parsed,
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                &exp
            ),
            Ok(())
        );
    }

    /// The GetRepositoryEndpoint botocore vector, as a base for the negative tests.
    fn base() -> (HeaderMap, &'static Vector) {
        let v = VECTORS
            .iter()
            .find(|v| v.name == "client:GetRepositoryEndpoint")
            .unwrap();
        (header_map(v.headers), v)
    }

    fn check(
        headers: &HeaderMap,
        method: &Method,
        path: &str,
        query: &str,
        payload: &str,
        now: &str,
    ) -> Result<(), SigV4Error> {
        let req = request(method, path, query, headers, payload);
        let parsed = parse(&req)?;
        verify(
            &req,
            &parsed,
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            &expect("us-east-1", now),
        )
    }

    #[test]
    fn any_change_to_a_signed_part_breaks_the_signature() {
        let (headers, v) = base();
        let get = Method::GET;
        let e = EMPTY_PAYLOAD_SHA256;
        assert_eq!(check(&headers, &get, v.path, v.query, e, v.now), Ok(()));
        let mismatch = Err(SigV4Error::SignatureMismatch);
        assert_eq!(
            check(&headers, &Method::POST, v.path, v.query, e, v.now),
            mismatch
        );
        assert_eq!(
            check(
                &headers,
                &get,
                "/v1/repository/endpoints",
                v.query,
                e,
                v.now
            ),
            mismatch
        );
        assert_eq!(
            check(
                &headers,
                &get,
                v.path,
                "domain=d&repository=r&format=pypi",
                e,
                v.now
            ),
            mismatch
        );
        assert_eq!(
            check(&headers, &get, v.path, "domain=d&repository=r", e, v.now),
            mismatch
        );
        assert_eq!(
            check(&headers, &get, v.path, v.query, &sha256_hex(b"x"), v.now),
            mismatch
        );
        let mut h = headers.clone();
        h.insert("host", HeaderValue::from_static("evil:8080"));
        assert_eq!(check(&h, &get, v.path, v.query, e, v.now), mismatch);
        // Equivalent encodings and unsigned headers do not matter.
        assert_eq!(
            check(
                &headers,
                &get,
                v.path,
                "format=npm&repository=%72&domain=d",
                e,
                v.now
            ),
            Ok(())
        );
        let mut h = headers.clone();
        h.insert("user-agent", HeaderValue::from_static("whatever"));
        h.insert("x-unsigned", HeaderValue::from_static("1"));
        assert_eq!(check(&h, &get, v.path, v.query, e, v.now), Ok(()));
    }

    #[test]
    fn scope_and_clock() {
        let (headers, v) = base();
        let get = Method::GET;
        let e = EMPTY_PAYLOAD_SHA256;
        let req = request(&get, v.path, v.query, &headers, e);
        let parsed = parse(&req).unwrap();
        let secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
        let mut exp = expect("us-east-1", v.now);
        exp.region = "eu-west-1";
        assert!(matches!(
            verify(&req, &parsed, secret, &exp),
            Err(SigV4Error::WrongScope(_))
        ));
        let mut exp = expect("us-east-1", v.now);
        exp.service = "s3";
        assert!(matches!(
            verify(&req, &parsed, secret, &exp),
            Err(SigV4Error::WrongScope(_))
        ));

        // v.now is 20261125T235959Z: 15 minutes either way is fine, one second more is not.
        for (now, ok) in [
            ("20261126T001459Z", true),
            ("20261126T001500Z", false),
            ("20261125T234459Z", true),
            ("20261125T234458Z", false),
        ] {
            let result = verify(&req, &parsed, secret, &expect("us-east-1", now));
            assert_eq!(result.is_ok(), ok, "{now}");
            if !ok {
                assert_eq!(result, Err(SigV4Error::Skewed));
            }
        }

        // Scope date must be the request date; terminator must be aws4_request.
        let auth = headers[AUTHORIZATION].to_str().unwrap();
        for (from, to) in [
            ("/20261125/", "/20261126/"),
            ("/aws4_request", "/aws5_request"),
        ] {
            let mut h = headers.clone();
            h.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&auth.replace(from, to)).unwrap(),
            );
            let req = request(&get, v.path, v.query, &h, e);
            assert!(
                matches!(parse(&req), Err(SigV4Error::WrongScope(_))),
                "{to}"
            );
        }
    }

    #[test]
    fn presigned_window() {
        let v = VECTORS
            .iter()
            .find(|v| v.name == "raw:presigned-get")
            .unwrap();
        let headers = header_map(v.headers);
        let get = Method::GET;
        let req = request(&get, v.path, v.query, &headers, EMPTY_PAYLOAD_SHA256);
        let parsed = parse(&req).unwrap();
        assert_eq!(
            parsed.location,
            AuthLocation::Query {
                expires: Duration::seconds(900)
            }
        );
        let at = |now: &str| verify(&req, &parsed, "raw-secret", &expect("us-east-1", now));
        assert_eq!(at("20261125T120000Z"), Ok(()));
        assert_eq!(at("20261125T121500Z"), Ok(()));
        assert_eq!(at("20261125T121501Z"), Err(SigV4Error::Expired));
        assert_eq!(at("20261125T114500Z"), Ok(()));
        assert_eq!(at("20261125T114459Z"), Err(SigV4Error::Skewed));
        // Changing an operation parameter or the expiry breaks the signature.
        for q in [
            v.query.replace("format=npm", "format=pypi"),
            v.query.replace("X-Amz-Expires=900", "X-Amz-Expires=901"),
        ] {
            let req = request(&get, v.path, &q, &headers, EMPTY_PAYLOAD_SHA256);
            let parsed = parse(&req).unwrap();
            assert_eq!(
                verify(&req, &parsed, "raw-secret", &expect("us-east-1", v.now)),
                Err(SigV4Error::SignatureMismatch)
            );
        }
        // The end of time does not overflow.
        let q = v
            .query
            .replace("20261125T120000Z", "99991231T235959Z")
            .replace("%2F20261125%2F", "%2F99991231%2F")
            .replace("X-Amz-Expires=900", "X-Amz-Expires=604800");
        let req = request(&get, v.path, &q, &headers, EMPTY_PAYLOAD_SHA256);
        let parsed = parse(&req).unwrap();
        assert_eq!(
            verify(
                &req,
                &parsed,
                "raw-secret",
                &expect("us-east-1", "99991231T235959Z")
            ),
            Err(SigV4Error::SignatureMismatch)
        );
        // Expiry bounds and mixing with header auth.
        for (from, to) in [
            ("X-Amz-Expires=900", "X-Amz-Expires=0"),
            ("X-Amz-Expires=900", "X-Amz-Expires=604801"),
            ("X-Amz-Expires=900", "X-Amz-Expires=-1"),
            (
                "X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "X-Amz-Algorithm=AWS4-HMAC-SHA512",
            ),
            ("&X-Amz-SignedHeaders=host", ""),
        ] {
            let q = v.query.replace(from, to);
            let req = request(&get, v.path, &q, &headers, EMPTY_PAYLOAD_SHA256);
            assert!(matches!(parse(&req), Err(SigV4Error::Malformed(_))), "{to}");
        }
        let q = format!("{}&X-Amz-Date=20261125T120000Z", v.query);
        let req = request(&get, v.path, &q, &headers, EMPTY_PAYLOAD_SHA256);
        assert!(matches!(parse(&req), Err(SigV4Error::Malformed(_))));
        let (with_auth, _) = base();
        let req = request(&get, v.path, v.query, &with_auth, EMPTY_PAYLOAD_SHA256);
        assert!(matches!(parse(&req), Err(SigV4Error::Malformed(_))));
    }

    #[test]
    fn authorization_header_syntax() {
        let (headers, v) = base();
        let get = Method::GET;
        let auth = headers[AUTHORIZATION].to_str().unwrap().to_owned();
        let (_, rest) = auth.split_once(' ').unwrap();
        let parts: Vec<&str> = rest.split(", ").collect();
        let with = |value: &str| {
            let mut h = headers.clone();
            h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            check(&h, &get, v.path, v.query, EMPTY_PAYLOAD_SHA256, v.now)
        };
        // Tolerated spellings.
        for ok in [
            format!("AWS4-HMAC-SHA256 {}", parts.join(",")),
            format!(
                "AWS4-HMAC-SHA256   {} ,  {},{}  ",
                parts[2], parts[0], parts[1]
            ),
            format!(
                "  AWS4-HMAC-SHA256\t{}\t{}\t{}",
                parts[0], parts[1], parts[2]
            ),
        ] {
            assert_eq!(with(&ok), Ok(()), "{ok}");
        }
        // Refused ones.
        for bad in [
            String::new(),
            "AWS4-HMAC-SHA256".into(),
            format!("AWS4-HMAC-SHA256,{}", parts.join(",")),
            format!("aws4-hmac-sha256 {}", parts.join(", ")),
            format!("AWS4-ECDSA-P256-SHA256 {}", parts.join(", ")),
            "Bearer abc".into(),
            format!("AWS4-HMAC-SHA256 {}, {}", parts[0], parts[1]),
            format!(
                "AWS4-HMAC-SHA256 {}, {}, {}, {}",
                parts[0], parts[1], parts[2], parts[2]
            ),
            format!(
                "AWS4-HMAC-SHA256 {}, {}, {}, Extra=1",
                parts[0], parts[1], parts[2]
            ),
            format!("AWS4-HMAC-SHA256 {}, {}, Signature", parts[0], parts[1]),
            format!("AWS4-HMAC-SHA256 {}, {}, {}0", parts[0], parts[1], parts[2]),
            format!(
                "AWS4-HMAC-SHA256 {}, {}, {}",
                parts[0],
                parts[1],
                parts[2].replace('f', "g")
            ),
            auth.replace(
                "SignedHeaders=host;x-amz-date",
                "SignedHeaders=x-amz-date;host",
            ),
            auth.replace(
                "SignedHeaders=host;x-amz-date",
                "SignedHeaders=host;host;x-amz-date",
            ),
            auth.replace(
                "SignedHeaders=host;x-amz-date",
                "SignedHeaders=Host;x-amz-date",
            ),
            auth.replace("SignedHeaders=host;x-amz-date", "SignedHeaders=x-amz-date"),
            auth.replace("SignedHeaders=host;x-amz-date", "SignedHeaders=host"),
            auth.replace(
                "SignedHeaders=host;x-amz-date",
                "SignedHeaders=host;;x-amz-date",
            ),
            auth.replace(
                "SignedHeaders=host;x-amz-date",
                "SignedHeaders=host;x-amz-date;x-missing",
            ),
            auth.replace("Credential=AKIDEXAMPLE/", "Credential=/"),
            auth.replace("Credential=AKIDEXAMPLE/", "Credential=AKID/EXAMPLE/"),
            auth.replace("/us-east-1/", "//"),
        ] {
            assert!(
                matches!(with(&bad), Err(SigV4Error::Malformed(_))),
                "{bad} gave {:?}",
                with(&bad)
            );
        }
        // Without any authentication.
        let mut h = headers.clone();
        h.remove(AUTHORIZATION);
        assert_eq!(
            check(&h, &get, v.path, v.query, EMPTY_PAYLOAD_SHA256, v.now),
            Err(SigV4Error::Missing)
        );
        // Two Authorization headers, a missing or repeated or malformed x-amz-date.
        let mut h = headers.clone();
        h.append(AUTHORIZATION, HeaderValue::from_str(&auth).unwrap());
        assert!(matches!(
            check(&h, &get, v.path, v.query, EMPTY_PAYLOAD_SHA256, v.now),
            Err(SigV4Error::Malformed(_))
        ));
        for date in [
            None,
            Some("20261125T235959"),
            Some("2026-11-25T23:59:59Z"),
            Some("20261325T235959Z"),
            Some("20261125T245959Z"),
        ] {
            let mut h = headers.clone();
            h.remove("x-amz-date");
            if let Some(d) = date {
                h.insert("x-amz-date", HeaderValue::from_static(d));
            }
            assert!(
                matches!(
                    check(&h, &get, v.path, v.query, EMPTY_PAYLOAD_SHA256, v.now),
                    Err(SigV4Error::Malformed(_))
                ),
                "{date:?}"
            );
        }
        let mut h = headers.clone();
        h.append("x-amz-date", HeaderValue::from_static("20261125T235959Z"));
        assert!(matches!(
            check(&h, &get, v.path, v.query, EMPTY_PAYLOAD_SHA256, v.now),
            Err(SigV4Error::Malformed(_))
        ));
    }

    /// A streaming body signed as UNSIGNED-PAYLOAD next to a signed, modeled
    /// `x-amz-content-sha256` header (the AWS SDK for Rust's PublishPackageVersion).
    #[test]
    fn unsigned_payload_fallback_needs_the_signed_hash_header() {
        let body = b"package bytes";
        let sha = sha256_hex(body);
        let post = Method::POST;
        let (path, query) = ("/v1/package/version/publish", "domain=d&asset=a.tgz");
        let params = SigningParams {
            access_key_id: "AKID",
            secret: "secret",
            region: "us-east-1",
            service: "codeartifact",
        };
        let verify_with = |extra: &[(&str, &str)]| {
            let mut pairs = vec![("host", "h:1"), ("x-amz-date", "20261125T120000Z")];
            pairs.extend_from_slice(extra);
            let mut headers = header_map(&pairs);
            let auth = sign(
                &request(&post, path, query, &headers, UNSIGNED_PAYLOAD),
                &params,
            )
            .unwrap();
            headers.insert(AUTHORIZATION, HeaderValue::from_str(&auth).unwrap());
            let payload = payload_hash(&headers, body)?;
            let req = request(&post, path, query, &headers, &payload);
            let parsed = parse(&req)?;
            verify(
                &req,
                &parsed,
                "secret",
                &expect("us-east-1", "20261125T120000Z"),
            )
        };
        assert_eq!(verify_with(&[("x-amz-content-sha256", &sha)]), Ok(()));
        // Without the signed header the body would be unauthenticated: refused.
        assert_eq!(verify_with(&[]), Err(SigV4Error::SignatureMismatch));
        // A header that does not match the body is caught before.
        assert_eq!(
            verify_with(&[("x-amz-content-sha256", EMPTY_PAYLOAD_SHA256)]),
            Err(SigV4Error::PayloadMismatch)
        );
    }

    #[test]
    fn payload_hash_rules() {
        let body = b"hello world\n";
        let sha = sha256_hex(body);
        let h = |v: &str| header_map(&[("x-amz-content-sha256", v)]);
        assert_eq!(payload_hash(&HeaderMap::new(), body), Ok(sha.clone()));
        assert_eq!(
            payload_hash(&HeaderMap::new(), b""),
            Ok(EMPTY_PAYLOAD_SHA256.to_owned())
        );
        assert_eq!(payload_hash(&h(&sha), body), Ok(sha.clone()));
        // An upper-case declaration is checked case-insensitively but signed verbatim.
        let upper = sha.to_ascii_uppercase();
        assert_eq!(payload_hash(&h(&upper), body), Ok(upper));
        assert_eq!(
            payload_hash(&h(EMPTY_PAYLOAD_SHA256), body),
            Err(SigV4Error::PayloadMismatch)
        );
        assert_eq!(
            payload_hash(&h(UNSIGNED_PAYLOAD), body),
            Ok(UNSIGNED_PAYLOAD.to_owned())
        );
        for bad in [
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "abc",
            "",
            &format!("{sha}0"),
        ] {
            assert!(
                matches!(payload_hash(&h(bad), body), Err(SigV4Error::Malformed(_))),
                "{bad}"
            );
        }
        assert_eq!(declared_payload_hash(&HeaderMap::new()), Ok(None));
        assert_eq!(declared_payload_hash(&h(&sha)), Ok(Some(sha.as_str())));
    }

    #[test]
    fn sign_then_verify_round_trip() {
        let mut headers = header_map(&[
            ("host", "granary.local:7700"),
            ("content-type", "application/json"),
            ("x-amz-date", "20261125T120000Z"),
            ("transfer-encoding", "chunked"),
        ]);
        let body = br#"{"description":"x"}"#;
        let payload = sha256_hex(body);
        let post = Method::POST;
        let path = "/v1/repository/%40weird%2Fname";
        let query = "domain=my-domain&repository=r+1&description=a%2Fb";
        let params = SigningParams {
            access_key_id: "GRANARYKEY1",
            secret: "s3cr3t",
            region: "local",
            service: "codeartifact",
        };
        let auth = sign(&request(&post, path, query, &headers, &payload), &params).unwrap();
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date,"),
            "{auth}"
        );
        headers.insert(AUTHORIZATION, HeaderValue::from_str(&auth).unwrap());
        let req = request(&post, path, query, &headers, &payload);
        let parsed = parse(&req).unwrap();
        assert_eq!(
            parsed.credential,
            Credential {
                access_key_id: "GRANARYKEY1".into(),
                date: "20261125".into(),
                region: "local".into(),
                service: "codeartifact".into(),
            }
        );
        assert_eq!(
            verify(
                &req,
                &parsed,
                "s3cr3t",
                &expect("local", "20261125T120500Z")
            ),
            Ok(())
        );

        // sign() needs host and a well-formed x-amz-date.
        let no_host = header_map(&[("x-amz-date", "20261125T120000Z")]);
        assert!(sign(&request(&post, path, query, &no_host, &payload), &params).is_err());
        let no_date = header_map(&[("host", "h")]);
        assert!(sign(&request(&post, path, query, &no_date, &payload), &params).is_err());
    }

    #[test]
    fn helpers() {
        let when = t("20261125T010203Z");
        assert_eq!(format_amz_date(when), "20261125T010203Z");
        let offset = when.to_offset(time::UtcOffset::from_hms(5, 30, 0).unwrap());
        assert_eq!(format_amz_date(offset), "20261125T010203Z");
        assert_eq!(sha256_hex(b""), EMPTY_PAYLOAD_SHA256);
        // The AWS documentation's signing-key example.
        assert_eq!(
            hex::encode(signing_key(
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                "20120215",
                "us-east-1",
                "iam"
            )),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    /// Fuzz-ish: parse/verify never panic on random or mutated input.
    #[test]
    fn never_panics() {
        let mut rng = StdRng::seed_from_u64(5_349_475_634);
        let (headers, v) = base();
        let auth = headers[AUTHORIZATION].to_str().unwrap().to_owned();
        let presigned = VECTORS
            .iter()
            .find(|v| v.name == "raw:presigned-get")
            .unwrap();
        let alphabet: &[u8] = b"AWS4-HMAC-SHA256 Credential=/;,=&%+.~_abcdefXYZ0123456789\t";
        let get = Method::GET;
        for i in 0..20_000 {
            let mutate = |s: &str, rng: &mut StdRng| -> String {
                let mut b = s.as_bytes().to_vec();
                for _ in 0..rng.random_range(1..5) {
                    if b.is_empty() {
                        break;
                    }
                    let at = rng.random_range(0..b.len());
                    match rng.random_range(0..3) {
                        0 => b[at] = alphabet[rng.random_range(0..alphabet.len())],
                        1 => b.insert(at, alphabet[rng.random_range(0..alphabet.len())]),
                        _ => {
                            b.truncate(at);
                        }
                    }
                }
                String::from_utf8(b).unwrap_or_default()
            };
            let mut h = headers.clone();
            let (path, query);
            if i % 2 == 0 {
                let value = mutate(&auth, &mut rng);
                h.insert(AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
                path = mutate(v.path, &mut rng);
                query = v.query.to_owned();
            } else {
                h.remove(AUTHORIZATION);
                path = presigned.path.to_owned();
                query = mutate(presigned.query, &mut rng);
            }
            let req = request(&get, &path, &query, &h, EMPTY_PAYLOAD_SHA256);
            if let Ok(parsed) = parse(&req) {
                let _ = canonical_request(&req, &parsed);
                for now in [v.now, "00000101T000000Z", "99991231T235959Z"] {
                    let _ = verify(&req, &parsed, "raw-secret", &expect("us-east-1", now));
                }
            }
        }
    }
}
