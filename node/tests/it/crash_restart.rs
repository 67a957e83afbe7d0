use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{Server, fake_tgz, npm_path, npm_publish_body};

/// SIGKILL the node in the middle of a burst of publishes, restart it on the same data
/// directory: every publish that was acknowledged (201) is there, with the right bytes.
#[test]
fn sigkill_during_publish_burst_keeps_every_acknowledged_publish() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut server = Server::start_on(&dir, &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = server.client();
    let token = rt.block_on(client.setup("crash", "repo"));

    // version -> tarball bytes, for every 201 the clients saw.
    let acked: Arc<Mutex<BTreeMap<String, Vec<u8>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let (client, token, acked, stop) =
            (client.clone(), token.clone(), acked.clone(), stop.clone());
        workers.push(rt.spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 10_000 {
                let name = format!("pkg-{w}");
                let version = format!("1.0.{i}");
                let tgz = fake_tgz(w * 100_000 + i, 2000 + (i as usize % 7) * 1000);
                let body = npm_publish_body(&name, &version, &tgz, json!({}));
                let r = reqwest::Client::new()
                    .put(format!(
                        "{}/npm/crash/repo/{}",
                        client.base,
                        npm_path(&name)
                    ))
                    .bearer_auth(&token)
                    .json(&body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().as_u16() == 201 => {
                        acked
                            .lock()
                            .unwrap()
                            .insert(format!("{name}@{version}"), tgz);
                    }
                    Ok(r) => {
                        let s = r.status();
                        panic!(
                            "unexpected status {s}: {}",
                            r.text().await.unwrap_or_default()
                        );
                    }
                    Err(_) => return, // the server is gone
                }
                i += 1;
            }
        }));
    }
    // Kill once the burst is well under way.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 150 {
        assert!(
            Instant::now() < deadline,
            "publishes are not being acknowledged"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    server.kill();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        rt.block_on(w).unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 150);

    let server = Server::start_on(&dir, &[]);
    let client = server.client();
    let token = rt.block_on(client.token("crash"));
    rt.block_on(async {
        for (id, tgz) in &acked {
            let (name, version) = id.split_once('@').unwrap();
            let r = client
                .raw(
                    "GET",
                    &format!("/npm/crash/repo/{name}/-/{name}-{version}.tgz"),
                    &[("authorization", format!("Bearer {token}"))],
                    vec![],
                )
                .await;
            assert_eq!(r.status, 200, "{id} lost after restart: {}", r.text());
            assert_eq!(&r.body, tgz, "{id} has other bytes after restart");
        }
        // And the packuments list them.
        for w in 0..8 {
            let name = format!("pkg-{w}");
            let r = client
                .raw(
                    "GET",
                    &format!("/npm/crash/repo/{name}"),
                    &[("authorization", format!("Bearer {token}"))],
                    vec![],
                )
                .await;
            if r.status == 404 {
                assert!(!acked.keys().any(|k| k.starts_with(&format!("{name}@"))));
                continue;
            }
            let doc = r.json();
            for id in acked.keys().filter(|k| k.starts_with(&format!("{name}@"))) {
                let v = id.split_once('@').unwrap().1;
                assert!(
                    doc["versions"].get(v).is_some(),
                    "{id} missing from the packument"
                );
            }
        }
    });
}

/// A clean shutdown (SIGTERM) exits 0, and the data is there after a restart.
#[test]
fn sigterm_shuts_down_cleanly_and_restart_keeps_data() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut server = Server::start_on(&dir, &[]);
    rt.block_on(server.client().setup("keep", "repo"));
    assert!(
        server.terminate(),
        "granary did not exit cleanly: {:?}",
        server.output.lock().unwrap()
    );
    let server = Server::start_on(&dir, &[]);
    let r = rt.block_on(server.client().api(
        "GET",
        "/v1/repository?domain=keep&repository=repo",
        None,
    ));
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The blob collector's candidates outlive a SIGKILL: the bytes of a deleted repository
/// that a pass found unreferenced before the kill are removed by the first pass after
/// the restart (not a second one), and what is still published reads back identical.
#[test]
fn collector_candidates_survive_a_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let cfg = tmp.path().join("node.toml");
    std::fs::write(&cfg, "[blob_gc]\ninterval_secs = 4\n").unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut server = Server::start_on(&dir, &args);
    let client = server.client();
    let token = rt.block_on(client.setup("gc", "keep"));
    let r = rt.block_on(client.api("POST", "/v1/repository?domain=gc&repository=drop", None));
    assert_eq!(r.status, 200, "{}", r.text());
    let kept = fake_tgz(1, 60_000);
    for (repo, seed) in [("keep", 1), ("drop", 2)] {
        let tgz = fake_tgz(seed, 60_000);
        let body = npm_publish_body("pkg", "1.0.0", &tgz, json!({}));
        let r = rt.block_on(client.npm_put(&token, "gc", repo, "pkg", &body));
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let r = rt.block_on(client.api("DELETE", "/v1/repository?domain=gc&repository=drop", None));
    assert_eq!(r.status, 200, "{}", r.text());

    // A pass finds the deleted repository's tarball unreferenced; kill the node before
    // the next one (4 s later) removes it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rt.block_on(server.metric("granary_blob_gc_candidates")) != 1 {
        assert!(Instant::now() < deadline, "no pass found the candidate");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rt.block_on(server.metric("granary_blobs_collected_total")),
        0
    );
    server.kill();
    assert!(dir.join("blob-gc.candidates").exists());

    let server = Server::start_on(&dir, &args);
    assert_eq!(
        rt.block_on(server.metric("granary_blob_gc_candidates")),
        1,
        "the candidate is taken back"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while rt.block_on(server.metric("granary_blob_gc_passes_total")) < 1 {
        assert!(Instant::now() < deadline, "no pass after the restart");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        rt.block_on(server.metric("granary_blobs_collected_total")),
        1,
        "the first pass after the restart removes it"
    );
    assert_eq!(rt.block_on(server.metric("granary_blob_gc_candidates")), 0);
    assert!(!dir.join("blob-gc.candidates").exists());
    let r = rt.block_on(server.client().raw(
        "GET",
        "/npm/gc/keep/pkg/-/pkg-1.0.0.tgz",
        &[("authorization", format!("Bearer {token}"))],
        vec![],
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.body == kept, "the published tarball reads back identical");
}

/// A client's cached npm documents are not confirmed by a cluster that only looks like
/// the one they came from: a fresh data directory at the same public URL, with the same
/// names and the same steps, reaches the same change counters (stamps), so its ETags
/// must differ by something else (the repository's creation). `npm install` otherwise
/// gets 304 for the old packument and installs the old tarball from its cache.
#[test]
fn a_new_cluster_at_the_same_url_does_not_confirm_cached_documents() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let args = ["--public-url", "http://registry.test"];
    let mut seen: Vec<String> = Vec::new();
    for seed in [1u64, 2] {
        let tmp = tempfile::tempdir().unwrap();
        let server = Server::start_on(&tmp.path().join("data"), &args);
        let client = server.client();
        let token = rt.block_on(client.setup("acme", "app"));
        let tgz = fake_tgz(seed, 4000);
        let body = npm_publish_body("lib", "1.0.0", &tgz, json!({}));
        let r = rt.block_on(client.npm_put(&token, "acme", "app", "lib", &body));
        assert_eq!(r.status, 201, "{}", r.text());
        let auth = ("authorization", format!("Bearer {token}"));
        let abbreviated = (
            "accept",
            "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8".to_owned(),
        );
        let documents = [
            ("/npm/acme/app/lib", vec![auth.clone(), abbreviated]),
            ("/npm/acme/app/lib", vec![auth.clone()]),
            ("/npm/acme/app/lib/1.0.0", vec![auth.clone()]),
        ];
        let mut etags = Vec::new();
        for (i, (path, headers)) in documents.iter().enumerate() {
            let r = rt.block_on(client.raw("GET", path, headers, vec![]));
            assert_eq!(r.status, 200, "{}", r.text());
            let etag = r.headers["etag"].to_str().unwrap().to_owned();
            let integrity = r.json().to_string().contains(&npm_integrity(&tgz));
            assert!(integrity, "{path} names this cluster's tarball");
            // What the first cluster served is not current here.
            if let Some(old) = seen.get(i) {
                let mut conditional = headers.clone();
                conditional.push(("if-none-match", old.clone()));
                let r = rt.block_on(client.raw("GET", path, &conditional, vec![]));
                assert_eq!(
                    r.status, 200,
                    "{path}: the old document confirmed as current"
                );
                assert!(r.json().to_string().contains(&npm_integrity(&tgz)));
            }
            // And what this one serves is.
            let mut conditional = headers.clone();
            conditional.push(("if-none-match", etag.clone()));
            let r = rt.block_on(client.raw("GET", path, &conditional, vec![]));
            assert_eq!(r.status, 304, "{path}");
            etags.push(etag);
        }
        seen = etags;
    }
}

/// npm's `dist.integrity` of a tarball.
fn npm_integrity(tgz: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    format!(
        "sha512-{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(tgz))
    )
}

/// Sends a request that is not a probe every 20 ms until `stop` says so; each outcome
/// with when it came (since `from`): `Err` for a request that got no HTTP answer.
async fn clients_until(
    url: &str,
    from: Instant,
    mut stop: impl FnMut() -> bool,
) -> Vec<(Duration, Result<u16, String>)> {
    let http = reqwest::Client::new();
    let mut outcomes = Vec::new();
    while !stop() {
        let r = http.get(format!("{url}/not-a-probe")).send().await;
        outcomes.push((
            from.elapsed(),
            r.map(|r| r.status().as_u16()).map_err(|e| e.to_string()),
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    outcomes
}

/// SIGTERM with `shutdown_drain_ms`: `/readyz` answers 503 at once while the node serves
/// on. Clients that still arrive after the drain (a load balancer slower to act on
/// `/readyz`) are served until they stop, instead of meeting a closed port; then the node
/// exits cleanly. Clients that never stop keep it at most another drain.
#[test]
fn a_draining_node_serves_clients_that_still_arrive_then_stops() {
    const DRAIN: Duration = Duration::from_millis(600);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tmp, mut server) =
        Server::start_with_config(&format!("shutdown_drain_ms = {}\n", DRAIN.as_millis()));
    let url = server.url();
    server.sigterm();
    let sent = Instant::now();
    let readyz = rt.block_on(async {
        loop {
            let r = reqwest::get(format!("{url}/readyz"))
                .await
                .expect("/readyz");
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            if status == 503 || sent.elapsed() > DRAIN {
                return (status, text, sent.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    assert!(
        readyz.0 == 503 && readyz.1.contains("shutting down"),
        "/readyz while draining: {readyz:?}"
    );
    // Clients go on for half a drain more than the drain.
    let until = DRAIN * 3 / 2;
    let outcomes = rt.block_on(clients_until(&url, sent, || sent.elapsed() >= until));
    let failed: Vec<_> = outcomes.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests in the {until:?} after SIGTERM (drain {DRAIN:?}) got no answer, \
         the first: {:?}",
        failed.len(),
        outcomes.len(),
        failed[0]
    );
    assert!(outcomes.iter().all(|(_, r)| *r == Ok(404)), "{outcomes:?}");
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit after the drain: {status:?}\n{:?}",
        server.output.lock().unwrap()
    );

    // Clients that never stop: the node stops anyway, a drain after the drain.
    let mut server = Server::start_on(
        &tmp.path().join("data"),
        &[
            "--config",
            tmp.path().join("node.toml").to_str().expect("a UTF-8 path"),
        ],
    );
    let url = server.url();
    server.sigterm();
    let sent = Instant::now();
    let outcomes = rt.block_on(clients_until(&url, sent, || {
        server.exited() || sent.elapsed() > Duration::from_secs(20)
    }));
    let exited_after = sent.elapsed();
    let status = server.wait_exit(Duration::from_secs(1));
    assert!(
        status.is_some_and(|s| s.success()),
        "exit with clients still arriving: {status:?} after {exited_after:?}"
    );
    let first_failure = outcomes.iter().find(|(_, r)| r.is_err()).map(|(at, _)| *at);
    eprintln!(
        "clients that never stop: {} requests, the first unanswered {first_failure:?} after \
         SIGTERM, exited after {exited_after:?}",
        outcomes.len()
    );
    assert!(
        first_failure.unwrap_or(exited_after) >= DRAIN * 2,
        "the node stopped listening {first_failure:?} after SIGTERM, before its drain and \
         the longest wait for clients after it ({:?})",
        DRAIN * 2
    );
}
