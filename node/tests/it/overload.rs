use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Server, fake_tgz, npm_output, npm_publish_body, require};

/// While one publish's body is still arriving it holds the node's only turn: another
/// write waits `write_queue_ms`, then gets npm's 503 with `Retry-After`, and changes
/// nothing; once the first is answered, writes go through again.
#[tokio::test(flavor = "multi_thread")]
async fn writes_past_the_limit_are_turned_away_retryably_and_change_nothing() {
    // One write at once, and a short wait for it.
    let (_tmp, server) =
        Server::start_with_config("max_concurrent_writes = 1\nwrite_queue_ms = 200\n");
    let c = server.client();
    let token = c.setup("busy", "repo").await;
    let auth = [("authorization", format!("Bearer {token}"))];

    let (mut sock, rest, refused) = hold_the_turn(&server, &token, "slow").await;
    assert_eq!(refused.headers["retry-after"], "1");
    let error = refused.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains("limit of 1 writes at once"), "{error}");

    // A real publish meanwhile: turned away after the wait, and nothing of it kept.
    let other = npm_publish_body("other", "1.0.0", &fake_tgz(2, 1000), json!({}));
    let started = Instant::now();
    let r = c.npm_put(&token, "busy", "repo", "other", &other).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "it waited its turn first"
    );

    // The slow publish completes, and writes go through again.
    sock.write_all(&rest).await.unwrap();
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 201"), "{answer}");
    let r = c.raw("GET", "/npm/busy/repo/other", &auth, vec![]).await;
    assert_eq!(r.status, 404, "the turned-away publish left nothing");
    let r = c.npm_put(&token, "busy", "repo", "other", &other).await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Reads never wait for a turn; the refusals are counted.
    let r = c.raw("GET", "/npm/busy/repo/slow", &auth, vec![]).await;
    assert_eq!(r.status, 200);
    let counted = turned_away(&server).await;
    assert!(counted >= 2, "{counted}");
}

/// Starts a publish of `package` whose body stops half way, over a socket of its own,
/// and waits until it holds the node's only write turn: a write that takes a turn and
/// is then refused (not a publish document) gets 400 before, 503 after. Returns the
/// socket, the rest of the body, and that 503.
async fn hold_the_turn(
    server: &Server,
    token: &str,
    package: &str,
) -> (tokio::net::TcpStream, Vec<u8>, crate::harness::Resp) {
    let body = npm_publish_body(package, "1.0.0", &fake_tgz(1, 50_000), json!({}))
        .to_string()
        .into_bytes();
    let mut sock = tokio::net::TcpStream::connect(&server.http).await.unwrap();
    let head = format!(
        "PUT /npm/busy/repo/{package} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.http,
        body.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let half = body.len() / 2;
    sock.write_all(&body[..half]).await.unwrap();
    let c = server.client();
    let auth = [("authorization", format!("Bearer {token}"))];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .raw("PUT", "/npm/busy/repo/probe", &auth, b"{}".to_vec())
            .await;
        if r.status == 503 {
            return (sock, body[half..].to_vec(), r);
        }
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "the slow publish never held the turn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The writes this node turned away, from `/metrics`.
async fn turned_away(server: &Server) -> u64 {
    let metrics = server
        .client()
        .raw("GET", "/metrics", &[], vec![])
        .await
        .text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("granary_writes_turned_away_total{format=\"npm\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// `npm publish` turned away retries by itself (npm retries a 503 on a PUT) and
/// succeeds once the node has a turn for it.
#[tokio::test(flavor = "multi_thread")]
async fn npm_publish_retries_a_write_turned_away() {
    if !require("npm") {
        return;
    }
    let (tmp, server) =
        Server::start_with_config("max_concurrent_writes = 1\nwrite_queue_ms = 200\n");
    let c = server.client();
    let token = c.setup("busy", "repo").await;
    let (mut sock, rest, _) = hold_the_turn(&server, &token, "slow").await;
    let before = turned_away(&server).await;

    let home = tmp.path().join("home");
    let lib = home.join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    let registry = format!("{}/npm/busy/repo/", server.url());
    let host_path = registry.trim_start_matches("http:");
    std::fs::write(
        home.join(".npmrc"),
        format!("registry={registry}\n{host_path}:_authToken={token}\n"),
    )
    .unwrap();
    std::fs::write(
        lib.join("package.json"),
        r#"{"name":"patient","version":"1.0.0","license":"MIT"}"#,
    )
    .unwrap();
    std::fs::write(lib.join("index.js"), "module.exports = 1;\n").unwrap();
    let publish = tokio::task::spawn_blocking(move || {
        let args = [
            "publish",
            "--fetch-retry-mintimeout=1000",
            "--fetch-retry-maxtimeout=2000",
        ];
        npm_output(&home, &lib, &args)
    });

    // npm's first attempt is turned away; then the turn is free again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while turned_away(&server).await == before {
        assert!(
            Instant::now() < deadline,
            "npm's publish never reached the node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sock.write_all(&rest).await.unwrap();
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 201"));

    let out = publish.await.unwrap();
    assert!(
        out.status.success(),
        "npm publish failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let auth = [("authorization", format!("Bearer {token}"))];
    let r = c.raw("GET", "/npm/busy/repo/patient", &auth, vec![]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["versions"]["1.0.0"].is_object());
}

#[test]
fn a_limit_of_no_writes_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("zero.toml");
    std::fs::write(&cfg, "max_concurrent_writes = 0\n").unwrap();
    let out = Server::spawn_env(
        &tmp.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
        true,
        &[],
    )
    .err()
    .expect("the node refuses to start");
    assert!(
        out.iter()
            .any(|l| l.contains("max_concurrent_writes must be between 1 and 1048576")),
        "{out:?}"
    );
}
