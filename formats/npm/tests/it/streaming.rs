//! Publish bodies that stream: a 64 MiB tarball in small frames (bounded memory, bytes
//! round-trip), bodies split at odd places, npm-shaped variants (attachment first, escaped
//! slashes) and shapes that must be refused with 400 and nothing stored.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use futures::stream;
use granary_format::body::BodyError;
use granary_format::hashing::MultiHasher;
use granary_format::model::{
    BlobInfo, Hashes, NewVersion, PackageChange, PackageKey, PackageRecord, VersionRecord,
};
use granary_format::testing::MemRegistry;
use granary_format::testing::conformance::rest_of;
use granary_format::{Body, Caller, Format, Registry, RegistryError, RepositoryRef};
use granary_format_npm::NpmFormat;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{Value, json};

use crate::support::{DEMO_1_0_0, fixture, fixture_json, registry, tarball_of};

/// Raw tarball bytes per body frame: 16 KiB of base64, as a network would deliver it.
const FRAME_RAW: usize = 12 * 1024;

/// A deterministic tarball of `len` bytes (gzip magic, then xorshift output), generated
/// in pieces of `FRAME_RAW` bytes so that no test holds it whole.
fn tarball_pieces(len: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> + Send + 'static {
    let mut x = seed | 1;
    let mut made = 0;
    std::iter::from_fn(move || {
        if made >= len {
            return None;
        }
        let n = FRAME_RAW.min(len - made);
        let mut piece = Vec::with_capacity(n + 8);
        if made == 0 {
            piece.extend_from_slice(&[0x1f, 0x8b]);
        }
        while piece.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            piece.extend_from_slice(&x.to_le_bytes());
        }
        piece.truncate(n);
        made += n;
        Some(piece)
    })
}

fn hashes_of(len: usize, seed: u64) -> Hashes {
    let mut hasher = MultiHasher::new();
    for piece in tarball_pieces(len, seed) {
        hasher.update(&piece);
    }
    hasher.finish()
}

fn hex_to_base64(hex: &str) -> String {
    let raw: Vec<u8> = (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    BASE64.encode(raw)
}

/// The body `npm publish` would send for `name@1.0.0` with a generated tarball, as a
/// stream of small frames: the document, the base64 a frame at a time, the end.
fn streamed_publish(name: &str, len: usize, seed: u64, hashes: &Hashes) -> Body {
    let manifest = json!({
        "name": name,
        "version": "1.0.0",
        "description": "generated",
        "dist": {
            "shasum": hashes.sha1,
            "integrity": format!("sha512-{}", hex_to_base64(&hashes.sha512)),
        },
    });
    let head = format!(
        r#"{{"_id":"{name}","name":"{name}","description":"generated","dist-tags":{{"latest":"1.0.0"}},"versions":{{"1.0.0":{manifest}}},"access":null,"_attachments":{{"{name}-1.0.0.tgz":{{"content_type":"application/octet-stream","data":""#
    );
    let tail = format!(r#"","length":{len}}}}}}}"#);
    let frames = std::iter::once(head)
        .chain(tarball_pieces(len, seed).map(|piece| BASE64.encode(piece)))
        .chain(std::iter::once(tail))
        .map(|text| Ok::<_, BodyError>(Frame::data(Bytes::from(text))));
    StreamBody::new(stream::iter(frames)).boxed_unsync()
}

/// A body of `bytes` in frames of `size` bytes.
fn framed(bytes: &[u8], size: usize) -> Body {
    let frames: Vec<_> = bytes
        .chunks(size)
        .map(|c| Ok::<_, BodyError>(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    StreamBody::new(stream::iter(frames)).boxed_unsync()
}

/// One request through the format, as the node drives it, with a streaming body.
async fn call(
    format: &NpmFormat,
    repo: &dyn Registry,
    method: &str,
    path: &str,
    body: Body,
) -> (StatusCode, Body) {
    let (parts, ()) = Request::builder()
        .method(method)
        .uri(format!("/npm/test-domain/test-repo/{path}"))
        .body(())
        .expect("request")
        .into_parts();
    let rest = rest_of::<NpmFormat>(repo, parts.uri.path()).to_owned();
    let response = match format.route(&parts, &rest) {
        Ok(route) => match format.handle(route, body, repo).await {
            Ok(response) => response,
            Err(err) => format.error_response(&err),
        },
        Err(err) => format.error_response(&err),
    };
    let status = response.status();
    (status, response.into_body())
}

async fn put(repo: &dyn Registry, path: &str, body: Body) -> (StatusCode, Value) {
    let (status, body) = call(&NpmFormat::default(), repo, "PUT", path, body).await;
    let bytes = body.collect().await.expect("reply").to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Peak resident memory of this process (VmHWM), in KiB; `None` off Linux.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Resets the peak to the current resident size (Linux ≥ 4.0), so the next reading is
/// this test's own peak; false when the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A registry whose blob store hashes and drops what it is given, so that what a publish
/// costs in memory is the format's alone; everything else is a [`MemRegistry`].
struct DiscardingRegistry {
    inner: MemRegistry,
    stored: Mutex<Vec<BlobInfo>>,
    published: Mutex<Vec<NewVersion>>,
}

#[async_trait]
impl Registry for DiscardingRegistry {
    fn repository(&self) -> &RepositoryRef {
        self.inner.repository()
    }
    fn caller(&self) -> &Caller {
        self.inner.caller()
    }
    async fn package(&self, key: &PackageKey) -> Result<Option<PackageRecord>, RegistryError> {
        self.inner.package(key).await
    }
    async fn versions(&self, key: &PackageKey) -> Result<Vec<VersionRecord>, RegistryError> {
        self.inner.versions(key).await
    }
    async fn version(
        &self,
        key: &PackageKey,
        version: &str,
    ) -> Result<Option<Arc<VersionRecord>>, RegistryError> {
        self.inner.version(key, version).await
    }
    async fn store_blob(&self, mut body: Body) -> Result<BlobInfo, RegistryError> {
        let mut hasher = MultiHasher::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RegistryError::Invalid(e.to_string()))?;
            if let Ok(data) = frame.into_data() {
                hasher.update(&data);
            }
        }
        let info = BlobInfo {
            size: hasher.len(),
            hashes: hasher.finish(),
        };
        self.stored.lock().expect("lock").push(info.clone());
        Ok(info)
    }
    async fn open_blob(&self, sha256: &str) -> Result<Option<(u64, Body)>, RegistryError> {
        self.inner.open_blob(sha256).await
    }
    async fn publish(&self, version: NewVersion) -> Result<(), RegistryError> {
        self.published.lock().expect("lock").push(version);
        Ok(())
    }
    async fn change(&self, key: &PackageKey, change: PackageChange) -> Result<(), RegistryError> {
        self.inner.change(key, change).await
    }
    fn cached_document(
        &self,
        key: &PackageKey,
        variant: &'static str,
        stamp: u64,
    ) -> Option<Bytes> {
        self.inner.cached_document(key, variant, stamp)
    }
    fn cache_document(&self, key: &PackageKey, variant: &'static str, stamp: u64, doc: Bytes) {
        self.inner.cache_document(key, variant, stamp, doc);
    }
}

#[tokio::test]
async fn a_64_mib_tarball_streams_in_bounded_memory_and_round_trips() {
    const LEN: usize = 64 * 1024 * 1024;
    let hashes = hashes_of(LEN, 42);

    // 1. The format's own cost: the store drops the bytes, so the peak is the scan's.
    let discarding = DiscardingRegistry {
        inner: registry(),
        stored: Mutex::new(Vec::new()),
        published: Mutex::new(Vec::new()),
    };
    let measured = reset_peak_rss();
    let before = peak_rss_kib();
    let (status, reply) = put(
        &discarding,
        "big-pkg",
        streamed_publish("big-pkg", LEN, 42, &hashes),
    )
    .await;
    let after = peak_rss_kib();
    assert_eq!(status, 201, "{reply}");
    let stored = discarding.stored.lock().expect("lock").clone();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].size, LEN as u64);
    assert_eq!(stored[0].hashes, hashes);
    assert_eq!(discarding.published.lock().expect("lock").len(), 1);
    if let (true, Some(before), Some(after)) = (measured, before, after) {
        let grew = after.saturating_sub(before);
        eprintln!(
            "publishing 64 MiB (blob dropped): peak RSS {before} KiB -> {after} KiB (+{grew} KiB)"
        );
        // Other tests of this binary run alongside and are small; the scan holds a few
        // hundred KiB. A regression to whole-body reading would add over 150 MiB.
        assert!(
            grew < 32 * 1024,
            "the publish raised peak memory by {grew} KiB"
        );
    }

    // 2. Through the in-memory registry: the stored bytes are the generated ones.
    let repo = registry();
    let (status, reply) = put(
        &repo,
        "big-pkg",
        streamed_publish("big-pkg", LEN, 42, &hashes),
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let key = PackageKey::new(None, "big-pkg");
    let v = repo
        .version(&key, "1.0.0")
        .await
        .unwrap()
        .expect("published");
    assert_eq!(v.assets[0].size, LEN as u64);
    assert_eq!(v.assets[0].hashes, hashes);
    assert_eq!(v.metadata["dist"]["shasum"], hashes.sha1);

    // Back out through the format: the bytes are the generated ones.
    let (status, mut body) = call(
        &NpmFormat::default(),
        &repo,
        "GET",
        "big-pkg/-/big-pkg-1.0.0.tgz",
        granary_format::body::empty(),
    )
    .await;
    assert_eq!(status, 200);
    let mut expected = tarball_pieces(LEN, 42);
    let mut pending: Vec<u8> = Vec::new();
    let mut at = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.expect("frame").into_data() else {
            continue;
        };
        let mut data = &data[..];
        while !data.is_empty() {
            if pending.is_empty() {
                pending = expected.next().expect("more bytes than were published");
            }
            let n = pending.len().min(data.len());
            assert!(pending[..n] == data[..n], "bytes differ after {at}");
            pending.drain(..n);
            data = &data[n..];
            at += n;
        }
    }
    assert!(
        pending.is_empty() && expected.next().is_none(),
        "bytes missing"
    );
    assert_eq!(at, LEN);
}

#[tokio::test]
async fn fixture_in_tiny_frames_publishes() {
    for size in [1, 7, 4096] {
        let repo = registry();
        let (status, reply) = put(&repo, "granary-demo", framed(&fixture(DEMO_1_0_0), size)).await;
        assert_eq!(status, 201, "frames of {size}: {reply}");
        let v = repo
            .version(&PackageKey::new(None, "granary-demo"), "1.0.0")
            .await
            .unwrap()
            .expect("published");
        let tarball = tarball_of(&fixture_json(DEMO_1_0_0));
        assert_eq!(
            repo.blob(&v.assets[0].hashes.sha256).as_deref(),
            Some(&tarball[..])
        );
    }
}

#[tokio::test]
async fn attachment_first_and_escaped_slashes_publish() {
    let doc = fixture_json(DEMO_1_0_0);
    let tarball = tarball_of(&doc);
    // `_attachments` first, then the rest; every `/` of the base64 written as `\/`.
    let mut rest = doc.as_object().unwrap().clone();
    let attachments = rest.remove("_attachments").unwrap();
    let mut text = format!("{{\"_attachments\":{attachments},");
    text.push_str(&Value::Object(rest).to_string()[1..]);
    let b64 = BASE64.encode(&tarball);
    assert!(
        b64.contains('/'),
        "the fixture's base64 has slashes to escape"
    );
    let text = text.replace(&b64, &b64.replace('/', "\\/"));
    let repo = registry();
    let (status, reply) = put(&repo, "granary-demo", framed(text.as_bytes(), 100)).await;
    assert_eq!(status, 201, "{reply}");
    let v = repo
        .version(&PackageKey::new(None, "granary-demo"), "1.0.0")
        .await
        .unwrap()
        .expect("published");
    assert_eq!(
        repo.blob(&v.assets[0].hashes.sha256).as_deref(),
        Some(&tarball[..])
    );
}

#[tokio::test]
async fn refused_shapes_are_400_and_store_nothing() {
    let base = fixture_json(DEMO_1_0_0);
    let body = fixture(DEMO_1_0_0);
    let file = "granary-demo-1.0.0.tgz";
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut doc = base.clone();
    doc["_attachments"][file]["data"] = json!(12);
    cases.push((
        "data not a string",
        doc.to_string().into(),
        "invalid package document",
    ));
    let mut doc = base.clone();
    doc["_attachments"][file]["data"] = json!({"inner": "H4sI"});
    cases.push((
        "data an object",
        doc.to_string().into(),
        "invalid package document",
    ));
    let mut doc = base.clone();
    doc["_attachments"][file]
        .as_object_mut()
        .unwrap()
        .remove("data");
    cases.push((
        "no data",
        doc.to_string().into(),
        "invalid package document",
    ));
    let mut doc = base.clone();
    doc["_attachments"] = json!([base["_attachments"][file]]);
    cases.push((
        "attachments an array",
        doc.to_string().into(),
        "invalid package document",
    ));
    let text = String::from_utf8(body.clone()).unwrap();
    let twice = text.replacen(
        &format!("\"_attachments\":{{\"{file}\":"),
        &format!(
            "\"_attachments\":{{\"{file}\":{},\"{file}\":",
            base["_attachments"][file]
        ),
        1,
    );
    cases.push(("one file twice", twice.into(), "exactly one attachment"));
    cases.push(("truncated", body[..body.len() - 40].to_vec(), "ends early"));
    cases.push((
        "truncated in data",
        body[..body.len() / 2].to_vec(),
        "ends early",
    ));
    cases.push(("not JSON", b"<xml/>".to_vec(), "invalid package document"));
    cases.push(("empty", Vec::new(), "invalid package document"));
    let mut deep = b"{\"_attachments\":".to_vec();
    deep.extend(std::iter::repeat_n(b'[', 10_000));
    cases.push(("deep", deep, "nested too deeply"));
    let mut doc = text.clone();
    doc.insert_str(doc.find("H4sI").unwrap() + 4, "\\q");
    cases.push(("bad escape in data", doc.into(), "invalid escape"));

    for (why, bytes, message) in cases {
        let repo = registry();
        let (status, reply) = put(&repo, "granary-demo", framed(&bytes, 333)).await;
        assert_eq!(status, 400, "{why}: {reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{why}: {error}");
        assert_eq!(repo.blob_count(), 0, "{why}: no blob stored");
        assert_eq!(repo.publish_count(), 0, "{why}: no version published");
    }
}

#[tokio::test]
async fn tarball_errors_keep_their_messages() {
    let base = fixture_json(DEMO_1_0_0);
    let file = "granary-demo-1.0.0.tgz";
    let tarball = tarball_of(&base);
    let mut cases: Vec<(Value, String)> = Vec::new();
    let mut doc = base.clone();
    doc["_attachments"][file]["data"] = json!("%%% not base64 %%%");
    cases.push((
        doc,
        "attachment data is not valid base64: Invalid symbol 37, offset 0.".into(),
    ));
    let mut doc = base.clone();
    doc["_attachments"][file]["length"] = json!(1);
    cases.push((
        doc,
        format!(
            "attachment length 1 does not match the decoded tarball ({} bytes)",
            tarball.len()
        ),
    ));
    let mut doc = base.clone();
    doc["_attachments"][file] = json!({"data": BASE64.encode(b"PK\x03\x04 zip")});
    cases.push((doc, "attachment is not a gzip-compressed tarball".into()));
    let mut doc = base.clone();
    doc["versions"]["1.0.0"]["dist"]["shasum"] = json!("00");
    cases.push((
        doc,
        "shasum mismatch: dist.shasum is 00, the tarball's SHA-1 is".into(),
    ));
    for (doc, message) in cases {
        let repo = registry();
        let (status, reply) = put(
            &repo,
            "granary-demo",
            framed(doc.to_string().as_bytes(), 500),
        )
        .await;
        assert_eq!(status, 400, "{reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(&message), "{error}");
    }
}

#[tokio::test]
async fn document_updates_go_through_the_scanner() {
    // A deprecate body with whitespace and escapes everywhere, in tiny frames.
    let repo = registry();
    crate::support::publish_fixture(&repo, DEMO_1_0_0).await;
    let mut doc = crate::support::write_doc(&repo, "granary-demo").await;
    doc["versions"]["1.0.0"]["deprecated"] = json!("use \"2\" \\ now/");
    let text = serde_json::to_string_pretty(&doc).unwrap();
    let (status, reply) = put(&repo, "granary-demo", framed(text.as_bytes(), 5)).await;
    assert_eq!(status, 200, "{reply}");
    let v = repo
        .version(&PackageKey::new(None, "granary-demo"), "1.0.0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.metadata["deprecated"], "use \"2\" \\ now/");
    assert_eq!(repo.blob_count(), 1, "only the published tarball");
}
