use std::path::Path;
use std::process::Command;

use crate::harness::{ACCESS_KEY, SECRET_KEY, Server, fake_tgz, npm_publish_body, require};

/// A CA and one certificate for 127.0.0.1 signed by it (serverAuth + clientAuth), made with
/// the openssl CLI; returns the TOML of a `[peer_tls]` section using them.
fn make_certs(dir: &Path) -> String {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    run(&ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node",
    ]);
    run(&csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    format!(
        "[peer_tls]\ncert_file = {:?}\nkey_file = {:?}\nca_file = {:?}\n",
        dir.join("node.pem"),
        dir.join("node.key"),
        dir.join("ca.pem")
    )
}

/// Members talk over mutual TLS and carry the cluster secret: a node with the secret and
/// a certificate joins; one with the wrong secret is refused and exits with a clear
/// message; one without TLS never gets in. `granary cluster status` shows the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_need_the_cluster_secret_and_the_ca() {
    if !require("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tls.toml");
    std::fs::write(&config, make_certs(tmp.path())).unwrap();
    let config = config.to_str().unwrap().to_owned();
    let secret = [("GRANARY_CLUSTER_SECRET", "right-secret")];

    let first = Server::spawn_env(
        &tmp.path().join("n1"),
        &["--config", &config, "--node-id", "1"],
        true,
        &secret,
    )
    .expect("first node starts");
    let seed = first.grpc_addr();
    let second = Server::spawn_env(
        &tmp.path().join("n2"),
        &["--config", &config, "--node-id", "2", "--join", &seed],
        true,
        &secret,
    )
    .expect("a node with the secret and a certificate joins");

    let status = second
        .client()
        .api("GET", "/admin/v1/cluster/status", None)
        .await;
    assert_eq!(status.status, 200, "{}", status.text());
    let status = status.json();
    let mut voters: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "voter")
        .map(|m| m["nodeId"].as_u64().unwrap())
        .collect();
    voters.sort();
    assert_eq!(voters, [1, 2], "{status}");
    assert!(status["leaderId"].as_u64().is_some(), "{status}");

    // A publish through one member is readable through the other: with peer TLS, blobs
    // are pushed through gRPC (the HTTP/1.1 push is for plain TCP only).
    let token = first.client().setup("tls", "repo").await;
    let tgz = fake_tgz(7, 4096);
    let body = npm_publish_body("over-tls", "1.0.0", &tgz, serde_json::json!({}));
    let auth = [("authorization", format!("Bearer {token}"))];
    let put = second
        .client()
        .npm_put(&token, "tls", "repo", "over-tls", &body)
        .await;
    assert_eq!(put.status, 201, "{}", put.text());
    let got = first
        .client()
        .raw(
            "GET",
            "/npm/tls/repo/over-tls/-/over-tls-1.0.0.tgz",
            &auth,
            vec![],
        )
        .await;
    assert_eq!(got.status, 200);
    assert!(
        got.body == tgz,
        "the tarball read through the other member is the one published"
    );
    let metrics = reqwest::get(format!("{}/metrics", second.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("granary_peer_blob_pushes_total{transport=\"grpc\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("transport=\"http1\""), "{metrics}");

    // The operator CLI shows the same, as JSON.
    let out = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args([
            "cluster",
            "status",
            "--output",
            "json",
            "--endpoint",
            &first.url(),
        ])
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["members"].as_array().unwrap().len(), 2, "{cli}");
    for m in cli["members"].as_array().unwrap() {
        assert_eq!(m["reachable"], true, "{cli}");
        assert!(m["appliedIndex"].as_u64().is_some(), "{cli}");
    }

    let wrong = Server::spawn_env(
        &tmp.path().join("n3"),
        &["--config", &config, "--node-id", "3", "--join", &seed],
        true,
        &[("GRANARY_CLUSTER_SECRET", "wrong-secret")],
    )
    .err()
    .expect("a node with the wrong secret must not start");
    assert!(
        wrong.iter().any(|l| l.contains("cluster secret")),
        "the refusal names the cluster secret: {wrong:?}"
    );

    // No TLS: the handshake never completes, so the node keeps retrying and never
    // becomes a member; stop it once it has tried.
    let plain_dir = tmp.path().join("n4");
    let mut plain = Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(["server", "--data-dir", plain_dir.to_str().unwrap()])
        .args(["--http", "127.0.0.1:0", "--grpc", "127.0.0.1:0"])
        .args(["--node-id", "4", "--join", &seed])
        .env("GRANARY_CLUSTER_SECRET", "right-secret")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = plain.stderr.take().unwrap();
    let tried = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("join not answered yet"))
    });
    assert!(
        tokio::time::timeout(std::time::Duration::from_secs(30), tried)
            .await
            .expect("the plain node tries to join")
            .unwrap(),
        "the plain node reports its failed attempts"
    );
    let _ = plain.kill();
    let _ = plain.wait();
    let status = first
        .client()
        .api("GET", "/admin/v1/cluster/status", None)
        .await
        .json();
    assert_eq!(
        status["members"].as_array().unwrap().len(),
        2,
        "no node joined without TLS or with the wrong secret: {status}"
    );
}

/// Peer calls over HTTP/1.1 on the peer port take the same checks as gRPC calls: the
/// cluster secret, well-formed digests and messages, and bytes that match what the sender
/// named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_peer_routes_check_the_secret_and_the_bytes() {
    use sha2::Digest;
    let tmp = tempfile::tempdir().unwrap();
    let node = Server::spawn_env(
        &tmp.path().join("n1"),
        &[],
        true,
        &[("GRANARY_CLUSTER_SECRET", "right-secret")],
    )
    .expect("node starts");
    let url = format!("http://{}/granary.v1.PeerHttp/PushBlob", node.grpc_addr());
    let bytes = b"a package's bytes".to_vec();
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let http = reqwest::Client::new();
    let push = |secret: Option<&str>, crc: Option<u32>, body: Vec<u8>| {
        let mut req = http
            .put(&url)
            .header("x-granary-blob-sha256", &sha256)
            .header("x-granary-blob-size", bytes.len().to_string())
            .header("x-granary-blob-md5", "0".repeat(32))
            .header("x-granary-blob-sha1", "0".repeat(40))
            .header("x-granary-blob-sha512", "0".repeat(128))
            .body(body);
        if let Some(s) = secret {
            req = req.header("x-granary-cluster-secret", s);
        }
        if let Some(c) = crc {
            req = req.header("x-granary-blob-crc32c", c.to_string());
        }
        req.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();

    assert_eq!(status(push(None, None, bytes.clone()).await.unwrap()), 401);
    assert_eq!(
        status(
            push(Some("wrong-secret"), None, bytes.clone())
                .await
                .unwrap()
        ),
        401
    );
    // The sender's CRC32C does not match the bytes: refused, with the reason.
    let wrong_crc = crc32c::crc32c(&bytes) ^ 1;
    let refused = push(Some("right-secret"), Some(wrong_crc), bytes.clone())
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 422);
    assert!(!refused.text().await.unwrap().is_empty());
    // Bytes that are not what the SHA-256 names (no CRC: checked by SHA-256).
    let mut other = bytes.clone();
    other[0] ^= 1;
    assert_eq!(
        status(push(Some("right-secret"), None, other).await.unwrap()),
        422
    );
    // A malformed head, another method, another path.
    let bad = http
        .put(&url)
        .header("x-granary-cluster-secret", "right-secret")
        .header("x-granary-blob-sha256", &sha256)
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().await.unwrap().contains("x-granary-blob-size"));
    let get = http
        .get(&url)
        .header("x-granary-cluster-secret", "right-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(get.status().as_u16(), 405);
    let elsewhere = http
        .put(format!(
            "http://{}/granary.v1.PeerHttp/Other",
            node.grpc_addr()
        ))
        .header("x-granary-cluster-secret", "right-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status().as_u16(), 404);
    // The unary calls: the secret first, then a well-formed message, then the gRPC
    // service's own answer, its status code in a header when it fails.
    let call = |name: &str, secret: Option<&str>, body: Vec<u8>| {
        let mut req = http
            .post(format!(
                "http://{}/granary.v1.PeerHttp/{name}",
                node.grpc_addr()
            ))
            .body(body);
        if let Some(s) = secret {
            req = req.header("x-granary-cluster-secret", s);
        }
        req.send()
    };
    assert_eq!(status(call("Propose", None, vec![]).await.unwrap()), 401);
    assert_eq!(
        status(
            call("Propose", Some("right-secret"), vec![0xff, 0xff])
                .await
                .unwrap()
        ),
        400
    );
    // An empty body is an empty ReadIndexRequest; this lone node leads, so it answers.
    assert_eq!(
        status(
            call("ReadIndex", Some("right-secret"), vec![])
                .await
                .unwrap()
        ),
        200
    );
    // A RaftRequest (field 1, bytes) whose payload is not an AppendEntries request:
    // refused by the Raft service as INVALID_ARGUMENT (3).
    let bad = call(
        "AppendEntries",
        Some("right-secret"),
        vec![0x0a, 0x02, b'{', b'}'],
    )
    .await
    .unwrap();
    assert_eq!(bad.status().as_u16(), 500);
    assert_eq!(bad.headers()["x-granary-status"], "3");
    assert!(bad.text().await.unwrap().contains("bad raft payload"));
    assert_eq!(
        status(
            http.put(format!(
                "http://{}/granary.v1.PeerHttp/Propose",
                node.grpc_addr()
            ))
            .header("x-granary-cluster-secret", "right-secret")
            .send()
            .await
            .unwrap()
        ),
        405
    );

    // The right bytes with the right CRC are taken, and again: a peer that has a blob
    // answers without reading it.
    let right_crc = crc32c::crc32c(&bytes);
    for _ in 0..2 {
        assert_eq!(
            status(
                push(Some("right-secret"), Some(right_crc), bytes.clone())
                    .await
                    .unwrap()
            ),
            204
        );
    }
}
