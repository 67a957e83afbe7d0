use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Server, fake_tgz, npm_publish_body};

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

    // The slow publish: its headers and half its body, over a socket of its own.
    let slow = npm_publish_body("slow", "1.0.0", &fake_tgz(1, 50_000), json!({}))
        .to_string()
        .into_bytes();
    let mut sock = tokio::net::TcpStream::connect(&server.http).await.unwrap();
    let head = format!(
        "PUT /npm/busy/repo/slow HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.http,
        slow.len()
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let half = slow.len() / 2;
    sock.write_all(&slow[..half]).await.unwrap();

    // A write that takes a turn and is then refused (not a publish document) shows when
    // the slow publish holds the turn: 400 before, 503 after.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = c
            .raw("PUT", "/npm/busy/repo/probe", &auth, b"{}".to_vec())
            .await;
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(
            Instant::now() < deadline,
            "the slow publish never held the turn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
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
    sock.write_all(&slow[half..]).await.unwrap();
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
    let metrics = c.raw("GET", "/metrics", &[], vec![]).await.text();
    let turned_away: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("granary_writes_turned_away_total{format=\"npm\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count of writes turned away in:\n{metrics}"));
    assert!(turned_away >= 2, "{turned_away}");
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
