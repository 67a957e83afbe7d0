//! Talking to one node over HTTP, as clients do: SigV4-signed CodeArtifact and admin
//! calls (signed by AWS's own `aws-sigv4`, independent of the server's verifier), and
//! npm's package endpoints with a bearer token.
//!
//! Nothing here retries: a call returns the response, or how the transport failed
//! ([`TransportError`]), and the caller decides what is retryable. The cluster admin
//! API's reply is parsed into [`ClusterStatus`].

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

/// The admin access key every test node is started with.
pub const ACCESS_KEY: &str = "GRANARYCLUSTERKEY001";
/// The admin secret key every test node is started with.
pub const SECRET_KEY: &str = "cluster-test-secret-0123456789abcdefghij";
/// The region requests are signed for.
pub const SIGNING_REGION: &str = "us-east-1";
/// The cluster secret every test node shares.
pub const CLUSTER_SECRET: &str = "granary-cluster-tests-shared-secret";

/// How long one request may take before it counts as timed out.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A request that got no HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportError {
    /// The connection was refused (nothing listening: the node is down).
    Refused(String),
    /// The connection broke before a full response (reset, closed mid-request).
    Closed(String),
    /// No response within [`REQUEST_TIMEOUT`].
    Timeout(String),
}

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportError::Refused(m) => write!(f, "connection refused: {m}"),
            TransportError::Closed(m) => write!(f, "connection closed: {m}"),
            TransportError::Timeout(m) => write!(f, "timed out: {m}"),
        }
    }
}

fn classify(e: reqwest::Error) -> TransportError {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        TransportError::Timeout(msg)
    } else if e.is_connect() {
        TransportError::Refused(msg)
    } else {
        TransportError::Closed(msg)
    }
}

/// An HTTP response: status, headers and body.
#[derive(Debug, Clone)]
pub struct Resp {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body.
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as JSON; panics with the body if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }

    /// The body as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// True for a 503 that tells the client when to come back, as the contract requires
    /// of a write or read that cannot be served right now.
    pub fn is_retry_later(&self) -> bool {
        self.status == 503 && self.headers.contains_key("retry-after")
    }

    /// A one-line description for failure messages.
    pub fn describe(&self) -> String {
        let mut text = self.text();
        if text.len() > 300 {
            let mut cut = 300;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        format!("HTTP {}: {}", self.status, text.trim())
    }
}

/// A repository the tests publish to, and a token for it.
#[derive(Debug, Clone)]
pub struct Repo {
    /// The domain.
    pub domain: String,
    /// The repository.
    pub name: String,
    /// A token from `GetAuthorizationToken`; valid on every node.
    pub token: String,
}

impl Repo {
    /// The npm endpoint path under a node's base URL, with a trailing slash.
    pub fn npm_path(&self) -> String {
        format!("/npm/{}/{}/", self.domain, self.name)
    }
}

/// The cluster as one node sees it (`GET /admin/v1/cluster/status`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// The leader this node knows of, if any.
    pub leader_id: Option<u64>,
    /// This node's current term.
    pub term: u64,
    /// The membership.
    pub members: Vec<Member>,
    /// The node that answered.
    pub node_id: u64,
    /// The answering node's applied log index.
    pub applied_index: u64,
}

impl ClusterStatus {
    /// The member with `node_id`, if it is one.
    pub fn member(&self, node_id: u64) -> Option<&Member> {
        self.members.iter().find(|m| m.node_id == node_id)
    }

    /// Ids of the voters, sorted.
    pub fn voters(&self) -> Vec<u64> {
        self.ids_with(Role::Voter)
    }

    /// Ids of the learners, sorted.
    pub fn learners(&self) -> Vec<u64> {
        self.ids_with(Role::Learner)
    }

    fn ids_with(&self, role: Role) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .members
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.node_id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// One member in a [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Its Raft id.
    pub node_id: u64,
    /// Its gRPC address.
    pub grpc_addr: String,
    /// Its HTTP address.
    pub http_addr: String,
    /// Its region label.
    pub region: String,
    /// Voter or learner.
    pub role: Role,
    /// Its applied index as the leader last heard it (`null` when unknown).
    pub applied_index: Option<u64>,
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Votes and counts towards quorum.
    Voter,
    /// Receives the log, does not vote.
    Learner,
}

/// The body of `POST /admin/v1/cluster/add-node`.
#[derive(Debug, Clone)]
pub struct AddNode {
    /// The new node's id.
    pub node_id: u64,
    /// Its gRPC address.
    pub grpc_addr: String,
    /// Its HTTP address.
    pub http_addr: String,
    /// Its region label.
    pub region: String,
    /// Keep it a learner.
    pub learner: bool,
}

/// A client for one node.
#[derive(Debug, Clone)]
pub struct NodeClient {
    /// The node's id.
    pub node_id: u64,
    /// `http://ip:port`, no trailing slash.
    pub base: String,
    http: reqwest::Client,
}

impl NodeClient {
    /// A client for the node serving HTTP at `base` (`http://ip:port`).
    pub fn new(node_id: u64, base: String) -> NodeClient {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            // Do not keep idle connections long: a restarted node would see them reset.
            .pool_idle_timeout(Duration::from_secs(2))
            .build()
            .expect("build reqwest client");
        NodeClient {
            node_id,
            base,
            http,
        }
    }

    /// A SigV4-signed call with the admin's key.
    pub async fn api(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&Value>,
    ) -> Result<Resp, TransportError> {
        use aws_credential_types::Credentials;
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        use aws_sigv4::sign::v4;
        use aws_smithy_runtime_api::client::identity::Identity;

        let body_bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let url: reqwest::Url = format!("{}{path_and_query}", self.base)
            .parse()
            .unwrap_or_else(|e| panic!("bad URL {}{path_and_query}: {e}", self.base));
        let host = match url.port() {
            Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
            None => url.host_str().unwrap_or_default().to_owned(),
        };
        let identity: Identity =
            Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(SIGNING_REGION)
            .name("codeartifact")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .expect("signing params")
            .into();
        let headers = [
            ("host", host.as_str()),
            ("content-type", "application/json"),
        ];
        let signable = SignableRequest::new(
            method,
            url.as_str(),
            headers.iter().copied(),
            SignableBody::Bytes(&body_bytes),
        )
        .expect("signable request");
        let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
        let mut rb = self
            .http
            .request(method.parse().expect("method"), url)
            .header("content-type", "application/json");
        for (k, v) in instructions.headers() {
            rb = rb.header(k, v);
        }
        if !body_bytes.is_empty() {
            rb = rb.body(body_bytes);
        }
        send(rb).await
    }

    /// An unsigned request with the given headers.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Result<Resp, TransportError> {
        let mut rb = self.http.request(
            method.parse().expect("method"),
            format!("{}{path}", self.base),
        );
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        send(rb.body(body)).await
    }

    /// The node's `/metrics` text.
    pub async fn metrics(&self) -> Result<String, String> {
        match self.raw("GET", "/metrics", &[], vec![]).await {
            Ok(r) if r.status == 200 => Ok(r.text()),
            Ok(r) => Err(format!("/metrics: {}", r.describe())),
            Err(e) => Err(format!("/metrics: {e}")),
        }
    }

    /// `GET /healthz` is 200.
    pub async fn healthy(&self) -> bool {
        matches!(self.raw("GET", "/healthz", &[], vec![]).await, Ok(r) if r.status == 200)
    }

    /// `GET /readyz` is 200 (a member that knows a leader and is not cut off from a
    /// majority of voters).
    pub async fn ready(&self) -> bool {
        matches!(self.raw("GET", "/readyz", &[], vec![]).await, Ok(r) if r.status == 200)
    }

    // ---- cluster admin ----

    /// The cluster as this node sees it.
    pub async fn status(&self) -> Result<ClusterStatus, String> {
        let r = self
            .api("GET", "/admin/v1/cluster/status", None)
            .await
            .map_err(|e| format!("node {}: status: {e}", self.node_id))?;
        if r.status != 200 {
            return Err(format!("node {}: status: {}", self.node_id, r.describe()));
        }
        serde_json::from_slice(&r.body).map_err(|e| {
            format!(
                "node {}: status is not the documented JSON ({e}): {}",
                self.node_id,
                r.text()
            )
        })
    }

    /// `POST /admin/v1/cluster/add-node`.
    pub async fn add_node(&self, node: &AddNode) -> Result<Resp, TransportError> {
        let body = json!({
            "nodeId": node.node_id,
            "grpcAddr": node.grpc_addr,
            "httpAddr": node.http_addr,
            "region": node.region,
            "learner": node.learner,
        });
        self.api("POST", "/admin/v1/cluster/add-node", Some(&body))
            .await
    }

    /// `POST /admin/v1/cluster/promote`.
    pub async fn promote(&self, node_id: u64) -> Result<Resp, TransportError> {
        let body = json!({ "nodeId": node_id });
        self.api("POST", "/admin/v1/cluster/promote", Some(&body))
            .await
    }

    /// `POST /admin/v1/cluster/remove-node`.
    pub async fn remove_node(&self, node_id: u64) -> Result<Resp, TransportError> {
        let body = json!({ "nodeId": node_id });
        self.api("POST", "/admin/v1/cluster/remove-node", Some(&body))
            .await
    }

    // ---- CodeArtifact API ----

    /// Creates the domain and the repository (an existing one is fine: a retried create
    /// may have committed the first time) and gets a token. `Err` says which step failed.
    pub async fn try_setup(&self, domain: &str, repo: &str) -> Result<Repo, String> {
        let steps = [
            format!("/v1/domain?domain={domain}"),
            format!("/v1/repository?domain={domain}&repository={repo}"),
        ];
        for path in &steps {
            match self.api("POST", path, Some(&json!({}))).await {
                Ok(r) if r.status == 200 || r.status == 409 => {}
                Ok(r) => return Err(format!("POST {path}: {}", r.describe())),
                Err(e) => return Err(format!("POST {path}: {e}")),
            }
        }
        let token = self.token(domain).await?;
        Ok(Repo {
            domain: domain.to_owned(),
            name: repo.to_owned(),
            token,
        })
    }

    /// A token for `domain` (`GetAuthorizationToken`).
    pub async fn token(&self, domain: &str) -> Result<String, String> {
        let path = format!("/v1/authorization-token?domain={domain}");
        let r = self
            .api("POST", &path, None)
            .await
            .map_err(|e| format!("POST {path}: {e}"))?;
        if r.status != 200 {
            return Err(format!("POST {path}: {}", r.describe()));
        }
        r.json()["authorizationToken"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no authorizationToken in {}", r.text()))
    }

    /// Every package of a repository (`ListPackages`, all pages), sorted by format,
    /// namespace and name. `Err` for any non-200 or transport failure.
    pub async fn list_packages(&self, repo: &Repo) -> Result<Vec<Value>, String> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut path = format!(
                "/v1/packages?domain={}&repository={}&max-results=1000",
                repo.domain, repo.name
            );
            if let Some(t) = &next {
                path.push_str("&next-token=");
                path.push_str(&percent_encode(t));
            }
            let r = self
                .api("POST", &path, None)
                .await
                .map_err(|e| format!("node {}: list-packages: {e}", self.node_id))?;
            if r.status != 200 {
                return Err(format!(
                    "node {}: list-packages: {}",
                    self.node_id,
                    r.describe()
                ));
            }
            let page = r.json();
            out.extend(page["packages"].as_array().cloned().unwrap_or_default());
            match page["nextToken"].as_str() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort_by_key(|p| {
            (
                p["format"].to_string(),
                p["namespace"].to_string(),
                p["package"].to_string(),
            )
        });
        Ok(out)
    }

    // ---- npm ----

    /// `npm publish` of one version, as raw HTTP.
    pub async fn npm_publish(
        &self,
        repo: &Repo,
        name: &str,
        version: &str,
        tgz: &[u8],
    ) -> Result<Resp, TransportError> {
        let body = npm_publish_body(name, version, tgz)
            .to_string()
            .into_bytes();
        self.npm_put(repo, name, body).await
    }

    /// The `PUT` of a package document `npm publish` sends, with a body built already.
    pub async fn npm_put(
        &self,
        repo: &Repo,
        name: &str,
        body: Vec<u8>,
    ) -> Result<Resp, TransportError> {
        let path = format!("{}{}", repo.npm_path(), npm_escape(name));
        self.raw(
            "PUT",
            &path,
            &[
                ("authorization", format!("Bearer {}", repo.token)),
                ("content-type", "application/json".to_owned()),
            ],
            body,
        )
        .await
    }

    /// The packument of a package.
    pub async fn npm_packument(&self, repo: &Repo, name: &str) -> Result<Resp, TransportError> {
        self.npm_get(repo, &npm_escape(name)).await
    }

    /// The tarball of one version of an unscoped package.
    pub async fn npm_tarball(
        &self,
        repo: &Repo,
        name: &str,
        version: &str,
    ) -> Result<Resp, TransportError> {
        self.npm_get(repo, &format!("{name}/-/{name}-{version}.tgz"))
            .await
    }

    /// An authenticated `GET` under the repository's npm endpoint.
    async fn npm_get(&self, repo: &Repo, path: &str) -> Result<Resp, TransportError> {
        let path = format!("{}{path}", repo.npm_path());
        self.raw(
            "GET",
            &path,
            &[("authorization", format!("Bearer {}", repo.token))],
            vec![],
        )
        .await
    }
}

async fn send(rb: reqwest::RequestBuilder) -> Result<Resp, TransportError> {
    let r = rb.send().await.map_err(classify)?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.map_err(classify)?.to_vec();
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The sum of every sample of the counter `name` in a node's `/metrics` text (Prometheus
/// format; 0 when absent).
pub fn counter_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            (series.split('{').next()? == name)
                .then(|| value.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// The escaped path segment npm uses for a package name (`@scope/name` → `@scope%2fname`).
pub fn npm_escape(name: &str) -> String {
    name.replace('/', "%2f")
}

/// npm's `integrity` of a tarball: `sha512-<base64>`.
pub fn integrity(tgz: &[u8]) -> String {
    use sha2::Digest as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("sha512-{}", b64.encode(sha2::Sha512::digest(tgz)))
}

/// `len` deterministic bytes from `seed` that do not compress (xorshift64), for
/// packages that defeat compression and deduplication.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// A gzip-framed pseudo tarball made of `body` (the server stores bytes, it does not
/// unpack them).
pub fn fake_tgz(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x1f, 0x8b, 0x08, 0x00];
    v.extend_from_slice(body);
    v
}

/// The body `npm publish` sends for one version.
pub fn npm_publish_body(name: &str, version: &str, tgz: &[u8]) -> Value {
    use sha1::Digest as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let shasum = hex::encode(sha1::Sha1::digest(tgz));
    let file = format!("{}-{version}.tgz", name.rsplit('/').next().unwrap_or(name));
    json!({
        "_id": name,
        "name": name,
        "description": "a cluster test package",
        "dist-tags": {"latest": version},
        "versions": {version: {
            "name": name,
            "version": version,
            "description": "a cluster test package",
            "_id": format!("{name}@{version}"),
            "dist": {
                "shasum": shasum,
                "integrity": integrity(tgz),
                "tarball": format!("http://x/{name}/-/{file}"),
            },
        }},
        "access": null,
        "_attachments": {
            format!("{name}-{version}.tgz"): {
                "content_type": "application/octet-stream",
                "data": b64.encode(tgz),
                "length": tgz.len(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses_the_documented_shape() {
        let s: ClusterStatus = serde_json::from_value(json!({
            "leaderId": 2, "term": 7, "nodeId": 1, "appliedIndex": 40,
            "members": [
                {"nodeId": 1, "grpcAddr": "127.0.0.11:1", "httpAddr": "127.0.0.11:2",
                 "region": "local", "role": "voter", "appliedIndex": 40},
                {"nodeId": 2, "grpcAddr": "127.0.0.12:1", "httpAddr": "127.0.0.12:2",
                 "region": "local", "role": "voter", "appliedIndex": null},
                {"nodeId": 4, "grpcAddr": "127.0.0.14:1", "httpAddr": "127.0.0.14:2",
                 "region": "local", "role": "learner", "appliedIndex": 12},
            ],
        }))
        .unwrap();
        assert_eq!(s.leader_id, Some(2));
        assert_eq!(s.voters(), vec![1, 2]);
        assert_eq!(s.learners(), vec![4]);
        assert_eq!(s.member(2).unwrap().applied_index, None);
        let none: ClusterStatus = serde_json::from_value(json!({
            "leaderId": null, "term": 0, "nodeId": 3, "appliedIndex": 0, "members": []
        }))
        .unwrap();
        assert_eq!(none.leader_id, None);
    }

    #[test]
    fn publish_body_carries_the_tarball_and_its_integrity() {
        let tgz = fake_tgz(b"hello");
        let body = npm_publish_body("pkg-a", "1.0.3", &tgz);
        let att = &body["_attachments"]["pkg-a-1.0.3.tgz"];
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(b64.decode(att["data"].as_str().unwrap()).unwrap(), tgz);
        assert_eq!(
            body["versions"]["1.0.3"]["dist"]["integrity"],
            integrity(&tgz)
        );
        assert!(integrity(&tgz).starts_with("sha512-"));
    }

    #[test]
    fn escapes() {
        assert_eq!(npm_escape("@s/p"), "@s%2fp");
        assert_eq!(percent_encode("a b/c=="), "a%20b%2Fc%3D%3D");
    }
}
