use std::process::Command;

use crate::harness::Server;

fn granary(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_granary"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run granary")
}

#[test]
fn bad_configs_are_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "http_adr = \"127.0.0.1:1\"\n").unwrap();
    let out = granary(&["server", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown field") && err.contains("http_adr"),
        "{err}"
    );

    std::fs::write(
        &cfg,
        "[raft]\nheartbeat_ms = 500\nelection_timeout_min_ms = 400\n",
    )
    .unwrap();
    let out = granary(&["server", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("election_timeout_min_ms"));

    let out = granary(&["server", "--config", "/nonexistent/granary.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config file"));

    let out = granary(&["server", "--public-url", "ftp://x"]);
    assert!(!out.status.success());
}

#[test]
fn first_start_prints_generated_admin_credentials_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut first = Server::spawn(&dir, &[], false);
    let printed = |s: &Server| {
        s.output
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("AWS_SECRET_ACCESS_KEY=")
                    .map(str::to_owned)
            })
            .collect::<Vec<_>>()
    };
    let key_id = first
        .output
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_prefix("AWS_ACCESS_KEY_ID=")
                .map(str::to_owned)
        })
        .expect("access key id printed");
    let secrets = printed(&first);
    assert_eq!(secrets.len(), 1, "{:?}", first.output.lock().unwrap());
    // The printed key works with the API.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt.block_on(
        first
            .client()
            .api_with("POST", "/v1/domains", None, &key_id, &secrets[0]),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(first.terminate());
    let second = Server::spawn(&dir, &[], false);
    assert!(printed(&second).is_empty(), "the secret is shown only once");
    let r =
        rt.block_on(
            second
                .client()
                .api_with("POST", "/v1/domains", None, &key_id, &secrets[0]),
        );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn health_and_unknown_paths() {
    let server = Server::start();
    let (status, body) = crate::harness::raw_http(&server.http, "GET", "/healthz", &[]);
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = crate::harness::raw_http(&server.http, "GET", "/nothing/here", &[]);
    assert_eq!(status, 404);
}
