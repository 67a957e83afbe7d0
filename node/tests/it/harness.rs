use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

pub(crate) const ACCESS_KEY: &str = "GRANARYTESTKEY0001";
pub(crate) const SECRET_KEY: &str = "test-secret-key-0123456789abcdefghijklmn";
pub(crate) const REGION: &str = "us-east-1";

/// True when the tool exists; under `CI=true` a missing tool fails the test.
pub(crate) fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{tool} is required for this test under CI=true (run scripts/install-test-deps.sh)"
            );
        }
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// A running `granary server` process on its own data directory and ports.
pub(crate) struct Server {
    child: Option<Child>,
    pub(crate) http: String,
    /// The bound gRPC address, once printed.
    pub(crate) grpc: Arc<Mutex<Option<String>>>,
    pub(crate) output: Arc<Mutex<Vec<String>>>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a node on a fresh data directory.
    pub(crate) fn start() -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("data");
        let mut s = Server::start_on(&dir, &[]);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a node on a fresh data directory with `toml` as its config file; the
    /// directory lives as long as the returned one.
    pub(crate) fn start_with_config(toml: &str) -> (tempfile::TempDir, Server) {
        let tmp = tempfile::tempdir().expect("tempdir");
        let cfg = tmp.path().join("node.toml");
        std::fs::write(&cfg, toml).expect("write the config");
        let server = Server::start_on(
            &tmp.path().join("data"),
            &["--config", cfg.to_str().expect("a UTF-8 path")],
        );
        (tmp, server)
    }

    /// Starts a node on `dir` (kept by the caller), with extra arguments.
    pub(crate) fn start_on(dir: &Path, extra: &[&str]) -> Server {
        Server::spawn(dir, extra, true)
    }

    /// Starts a node; `admin_from_env` passes the test admin's key in the environment
    /// (otherwise the node generates one on its first start).
    pub(crate) fn spawn(dir: &Path, extra: &[&str], admin_from_env: bool) -> Server {
        Server::spawn_env(dir, extra, admin_from_env, &[]).expect("granary did not start")
    }

    /// Starts a node with extra environment variables; `Err` carries its output if it
    /// exited (or never printed its address) instead of serving.
    pub(crate) fn spawn_env(
        dir: &Path,
        extra: &[&str],
        admin_from_env: bool,
        envs: &[(&str, &str)],
    ) -> Result<Server, Vec<String>> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_granary"));
        cmd.envs(envs.iter().copied());
        cmd.arg("server")
            .arg("--data-dir")
            .arg(dir)
            .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "warn");
        if admin_from_env {
            cmd.env("GRANARY_ADMIN_ACCESS_KEY_ID", ACCESS_KEY)
                .env("GRANARY_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY);
        } else {
            cmd.env_remove("GRANARY_ADMIN_ACCESS_KEY_ID")
                .env_remove("GRANARY_ADMIN_SECRET_ACCESS_KEY");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn granary");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let out = output.clone();
        let grpc = Arc::new(Mutex::new(None));
        let grpc_seen = grpc.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("granary: http: ") {
                    let _ = tx.send(addr.to_owned());
                }
                if let Some(addr) = line.strip_prefix("granary: grpc: ") {
                    *grpc_seen.lock().unwrap() = Some(addr.to_owned());
                }
                out.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let out = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                out.lock().unwrap().push(line);
            }
        });
        let http = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                // Let the reader threads drain what the process wrote last.
                std::thread::sleep(Duration::from_millis(100));
                return Err(output.lock().unwrap().clone());
            }
        };
        let server = Server {
            child: Some(child),
            http,
            grpc,
            output,
            _tmp: None,
        };
        server.wait_healthy();
        Ok(server)
    }

    /// The gRPC address the node printed.
    pub(crate) fn grpc_addr(&self) -> String {
        self.grpc
            .lock()
            .unwrap()
            .clone()
            .expect("grpc address printed before http")
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((200, _)) = try_raw_http(&self.http, "GET", "/healthz", &[]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "granary never became healthy: {:?}",
                self.output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to flush or shut down.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status's success.
    pub(crate) fn terminate(&mut self) -> bool {
        self.sigterm();
        self.wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    }

    /// Sends SIGTERM, without waiting.
    pub(crate) fn sigterm(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit; SIGKILL and `None` after that.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process has exited.
    pub(crate) fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Counter or gauge `name` (no labels) from the node's `/metrics`; 0 if absent.
    pub(crate) async fn metric(&self, name: &str) -> u64 {
        let text = self
            .client()
            .raw("GET", "/metrics", &[], vec![])
            .await
            .text();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// A blocking client for this server.
    pub(crate) fn client(&self) -> Client {
        Client { base: self.url() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A response: status, headers and body.
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Signs and sends requests the way the AWS SDKs do.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) base: String,
}

impl Client {
    /// A SigV4-signed API call with the admin's key.
    pub(crate) async fn api(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Resp {
        self.api_with(method, path_and_query, body, ACCESS_KEY, SECRET_KEY)
            .await
    }

    pub(crate) async fn api_with(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<Value>,
        key: &str,
        secret: &str,
    ) -> Resp {
        use aws_credential_types::Credentials;
        use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
        use aws_sigv4::sign::v4;
        use aws_smithy_runtime_api::client::identity::Identity;

        let body_bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let url: reqwest::Url = format!("{}{path_and_query}", self.base).parse().unwrap();
        let host = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap());
        let identity: Identity = Credentials::new(key, secret, None, None, "test").into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(REGION)
            .name("codeartifact")
            .time(std::time::SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .unwrap()
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
        .unwrap();
        let (instructions, _) = sign(signable, &params).unwrap().into_parts();
        let mut rb = reqwest::Client::new()
            .request(method.parse().unwrap(), url)
            .header("content-type", "application/json");
        for (k, v) in instructions.headers() {
            rb = rb.header(k, v);
        }
        if !body_bytes.is_empty() {
            rb = rb.body(body_bytes);
        }
        to_resp(rb.send().await.expect("send")).await
    }

    /// An unsigned or custom request.
    pub(crate) async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
    ) -> Resp {
        let mut rb =
            reqwest::Client::new().request(method.parse().unwrap(), format!("{}{path}", self.base));
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        to_resp(rb.body(body).send().await.expect("send")).await
    }

    /// `PUT /npm/{domain}/{repo}/{name}` with an npm publish document `body` and the
    /// token, as `npm publish` sends it.
    pub(crate) async fn npm_put(
        &self,
        token: &str,
        domain: &str,
        repo: &str,
        name: &str,
        body: &serde_json::Value,
    ) -> Resp {
        self.raw(
            "PUT",
            &format!("/npm/{domain}/{repo}/{}", npm_path(name)),
            &[
                ("authorization", format!("Bearer {token}")),
                ("content-type", "application/json".into()),
            ],
            body.to_string().into_bytes(),
        )
        .await
    }

    /// Creates a domain and a repository; returns a token for the domain.
    pub(crate) async fn setup(&self, domain: &str, repo: &str) -> String {
        let r = self
            .api("POST", &format!("/v1/domain?domain={domain}"), None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = self
            .api(
                "POST",
                &format!("/v1/repository?domain={domain}&repository={repo}"),
                Some(json!({"description": "test"})),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        self.token(domain).await
    }

    pub(crate) async fn token(&self, domain: &str) -> String {
        let r = self
            .api(
                "POST",
                &format!("/v1/authorization-token?domain={domain}"),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["authorizationToken"].as_str().unwrap().to_owned()
    }
}

async fn to_resp(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.expect("body").to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

/// A gzip-framed pseudo tarball of `len` bytes, unique per seed.
pub(crate) fn fake_tgz(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0x1f, 0x8b, 0x08, 0x00];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The body `npm publish` sends for one version.
pub(crate) fn npm_publish_body(name: &str, version: &str, tgz: &[u8], extra: Value) -> Value {
    use sha1::Digest as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let shasum = hex::encode(sha1::Sha1::digest(tgz));
    let integrity = format!("sha512-{}", b64.encode(sha2::Sha512::digest(tgz)));
    let file = format!("{}-{version}.tgz", name.rsplit('/').next().unwrap());
    let mut manifest = json!({
        "name": name,
        "version": version,
        "description": "a test package",
        "_id": format!("{name}@{version}"),
        "dist": {"shasum": shasum, "integrity": integrity, "tarball": format!("http://x/{name}/-/{file}")},
    });
    if let (Value::Object(m), Value::Object(e)) = (&mut manifest, extra) {
        m.extend(e);
    }
    json!({
        "_id": name,
        "name": name,
        "description": "a test package",
        "dist-tags": {"latest": version},
        "versions": {version: manifest},
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

/// The escaped path npm uses for a package name.
pub(crate) fn npm_path(name: &str) -> String {
    name.replace('/', "%2f")
}

/// Runs npm with `home` as HOME (its `.npmrc`) and a private cache.
pub(crate) fn npm_output(home: &Path, cwd: &Path, args: &[&str]) -> std::process::Output {
    Command::new("npm")
        .args(args)
        .current_dir(cwd)
        .env("HOME", home)
        .env("npm_config_cache", home.join("npm-cache"))
        .env("npm_config_update_notifier", "false")
        .env("npm_config_fund", "false")
        .env("npm_config_audit", "false")
        .env_remove("npm_config_registry")
        .env_remove("NPM_CONFIG_REGISTRY")
        .output()
        .expect("run npm")
}

/// Sends a request exactly as written (no URL normalization), over HTTP/1.1; returns the
/// status and the body. For paths a URL library would rewrite (`..`, `//`).
pub(crate) fn raw_http(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    try_raw_http(addr, method, target, headers).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

fn try_raw_http(
    addr: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
