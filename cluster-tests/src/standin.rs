//! A stand-in for a public npm registry (registry.npmjs.org), for the tests of Granary's
//! external connections (`public:npmjs`, whose base URL the tests point here).
//!
//! It serves what Granary fetches from upstream, shaped as the public registry shapes it:
//! the full packument (`GET /{name}`, `application/json`), the abbreviated one when asked
//! with `Accept: application/vnd.npm.install-v1+json`, and the tarballs the packument
//! links to (`GET /{name}/-/{unscoped}-{version}.tgz`). Tarballs are real npm tarballs
//! built from [`NpmVersion`]s, byte for byte the same on every build.
//!
//! ```text
//!   test ── add / tag / remove_package / set_mode ──▶ StandIn state ◀── requests, counted
//!                                                        │               on arrival
//!   Granary (upstream fetch) ── HTTP/1.1 ──▶ accept loop ─┴─▶ one task per connection
//!                                              │
//!                                  stop(): listener closed, every connection dropped
//! ```
//!
//! A test controls the upstream through [`Mode`]: failing, slow, corrupt tarballs, or
//! hanging; and [`StandIn::stop`] makes it go away. Every request is counted when it
//! arrives, whatever the mode, so a test can assert exactly how often Granary went
//! upstream ([`StandIn::requests`], [`StandIn::requests_for`]).
//!
//! It owns nothing of Granary's: it is the far side of the wire, and knows no crate of ours.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use flate2::Compression;
use flate2::write::GzEncoder;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use sha1::{Digest, Sha1};
use sha2::Sha512;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// The mtime of every tarball entry: npm's own fixed date (1985-10-26T08:15:00Z), which
/// `npm pack` uses so that the same files always make the same tarball.
const NPM_MTIME: u64 = 499_162_500;

/// The media type of the abbreviated packument ("corgi") npm asks for when installing.
const ABBREVIATED: &str = "application/vnd.npm.install-v1+json";

/// How many connections may wait to be accepted: tests open 1,000 at once.
const LISTEN_BACKLOG: u32 = 4096;

/// One version of one package, as a test describes it; [`StandIn::add`] serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpmVersion {
    /// The package name: `left-pad`, or `@scope/name`.
    pub name: String,
    /// The version, semver (`1.0.0`).
    pub version: String,
    /// `dependencies` of its package.json: name → range.
    pub dependencies: BTreeMap<String, String>,
    /// Files of the tarball besides `package/package.json`, as (path under `package/`,
    /// bytes). A `package.json` here replaces the generated one in the tarball (the
    /// packument still shows the generated fields).
    pub files: Vec<(String, Vec<u8>)>,
    /// `description` of its package.json.
    pub description: String,
}

impl NpmVersion {
    /// A version with no dependencies and one file, `index.js`, exporting a line that
    /// names it.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        let name = name.into();
        let version = version.into();
        let index = format!("module.exports = \"{name}@{version}\";\n");
        NpmVersion {
            description: format!("{name}, served by the npm stand-in"),
            dependencies: BTreeMap::new(),
            files: vec![("index.js".to_owned(), index.into_bytes())],
            name,
            version,
        }
    }

    /// Adds (or replaces) the dependency `name` with the semver `range`.
    pub fn dep(mut self, name: impl Into<String>, range: impl Into<String>) -> Self {
        self.dependencies.insert(name.into(), range.into());
        self
    }

    /// Adds the file `path` (relative, under `package/`), replacing one of the same path.
    pub fn file(mut self, path: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        let path = path.into();
        let bytes = bytes.into();
        match self.files.iter_mut().find(|(p, _)| *p == path) {
            Some(existing) => existing.1 = bytes,
            None => self.files.push((path, bytes)),
        }
        self
    }

    /// The fields of its package.json (also those of its entry in the packument).
    pub fn manifest(&self) -> Value {
        json!({
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "main": "index.js",
            "dependencies": self.dependencies,
            "license": "MIT",
        })
    }

    /// The tarball's file name: `{unscoped name}-{version}.tgz`.
    pub fn tarball_name(&self) -> String {
        let unscoped = self.name.rsplit('/').next().unwrap_or(&self.name);
        format!("{unscoped}-{}.tgz", self.version)
    }

    /// The path the stand-in serves the tarball at, as it appears in the packument:
    /// `/{name}/-/{unscoped}-{version}.tgz` (a scope keeps its literal `/`).
    pub fn tarball_path(&self) -> String {
        format!("/{}/-/{}", self.name, self.tarball_name())
    }

    /// The npm tarball: a gzip'd tar with every entry under `package/`, `package.json`
    /// first. The bytes depend only on the version's fields (fixed mtime, mode 0o644,
    /// uid/gid 0, no gzip name or time).
    ///
    /// # Panics
    ///
    /// If a file path is one tar refuses (absolute, or with `..`).
    pub fn tarball(&self) -> Vec<u8> {
        self.build_tarball().unwrap_or_else(|e| {
            panic!(
                "building the tarball of {}@{}: {e}",
                self.name, self.version
            )
        })
    }

    /// The tarball's entries (path under `package/`, bytes), `package.json` first.
    fn entries(&self) -> Vec<(&str, Cow<'_, [u8]>)> {
        let package_json = match self.files.iter().find(|(p, _)| p == "package.json") {
            Some((_, given)) => Cow::Borrowed(given.as_slice()),
            None => {
                let mut generated = serde_json::to_vec_pretty(&self.manifest())
                    .expect("a JSON value always serializes");
                generated.push(b'\n');
                Cow::Owned(generated)
            }
        };
        let rest = self
            .files
            .iter()
            .filter(|(p, _)| p != "package.json")
            .map(|(p, b)| (p.as_str(), Cow::Borrowed(b.as_slice())));
        std::iter::once(("package.json", package_json))
            .chain(rest)
            .collect()
    }

    fn build_tarball(&self) -> io::Result<Vec<u8>> {
        // flate2's default gzip header has no name and mtime 0: deterministic.
        let gz = GzEncoder::new(Vec::new(), Compression::default());
        let mut tar = tar::Builder::new(gz);
        for (path, data) in self.entries() {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(NPM_MTIME);
            header.set_uid(0);
            header.set_gid(0);
            tar.append_data(&mut header, format!("package/{path}"), &*data)?;
        }
        let mut gz = tar.into_inner()?;
        gz.flush()?;
        gz.finish()
    }
}

/// How the stand-in answers; see [`StandIn::set_mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Serves what it has.
    #[default]
    Normal,
    /// Every request is answered with this status (and an npm-style error body).
    Fail(u16),
    /// Every request waits this long, then is answered as in `Normal`.
    Delay(Duration),
    /// Tarball bodies have one byte flipped (same length, different hashes); packuments
    /// still carry the true `shasum` and `integrity`.
    CorruptTarballs,
    /// Requests are read and never answered (until [`StandIn::stop`] drops the connection).
    Hang,
}

/// Requests received, by kind; counted on arrival, whatever the [`Mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Requests for a package name (`/{name}`), known to the stand-in or not.
    pub packuments: u64,
    /// Requests for a tarball (`/{name}/-/{file}.tgz`), known or not.
    pub tarballs: u64,
    /// Anything else (`/`, `/-/ping`, ...).
    pub other: u64,
}

impl Counts {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.packuments + self.tarballs + self.other
    }
}

/// A public npm registry on 127.0.0.1, port chosen by the OS, driven by a test.
///
/// Dropping it stops it too, without waiting; [`StandIn::stop`] waits until it has.
#[derive(Debug)]
pub struct StandIn {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl StandIn {
    /// Binds 127.0.0.1:0 and serves, with no packages, in [`Mode::Normal`].
    ///
    /// # Panics
    ///
    /// If no port on 127.0.0.1 can be bound.
    pub async fn start() -> StandIn {
        let listener = (|| {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            socket.listen(LISTEN_BACKLOG)
        })()
        .expect("binding the npm stand-in to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let shared = Arc::new(Shared {
            base_url: format!("http://{addr}/"),
            state: Mutex::new(State::default()),
        });
        let (shutdown, stopped) = oneshot::channel();
        let server = tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        StandIn {
            shared,
            addr,
            shutdown: Some(shutdown),
            server: Some(server),
        }
    }

    /// The registry's base URL, with a trailing slash: `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The address it listens on (listened, after [`StandIn::stop`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Publishes `v`, replacing a version of the same number. Its tarball is built now
    /// and kept. `dist-tags.latest` becomes the highest version (the highest release if
    /// there is one), unless a test set it with [`StandIn::tag`].
    ///
    /// # Panics
    ///
    /// As [`NpmVersion::tarball`].
    pub fn add(&self, v: NpmVersion) {
        let published = Published::new(&v, now_iso());
        let mut state = self.shared.lock();
        let package = state
            .packages
            .entry(v.name.clone())
            .or_insert_with(|| Package {
                created: published.time.clone(),
                ..Package::default()
            });
        package.versions.insert(v.version.clone(), published);
        package.changed(&v.name, &self.shared.base_url);
    }

    /// Points the dist-tag `tag` of `name` at `version` (which need not exist: a test
    /// may serve a dangling tag). A `latest` set here stays until set again.
    ///
    /// # Panics
    ///
    /// If the stand-in has no package `name`.
    pub fn tag(&self, name: &str, tag: &str, version: &str) {
        let mut state = self.shared.lock();
        let package = state
            .packages
            .get_mut(name)
            .unwrap_or_else(|| panic!("the npm stand-in has no package {name} to tag"));
        package.tags.insert(tag.to_owned(), version.to_owned());
        package.changed(name, &self.shared.base_url);
    }

    /// Deletes the package `name` upstream: its packument and tarballs answer 404 from now on.
    pub fn remove_package(&self, name: &str) {
        self.shared.lock().packages.remove(name);
    }

    /// How every request is answered from now on.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.lock().mode = mode;
    }

    /// Requests received since start or the last [`StandIn::reset_counts`].
    pub fn requests(&self) -> Counts {
        self.shared.lock().counts
    }

    /// Requests received for exactly this path, as sent (not decoded, no query):
    /// `/left-pad/-/left-pad-1.0.0.tgz`, `/@scope%2fname`.
    pub fn requests_for(&self, path: &str) -> u64 {
        self.shared.lock().by_path.get(path).copied().unwrap_or(0)
    }

    /// Sets every count back to zero.
    pub fn reset_counts(&self) {
        let mut state = self.shared.lock();
        state.counts = Counts::default();
        state.by_path.clear();
    }

    /// The true bytes of the tarball of `name@version` (whatever the mode).
    ///
    /// # Panics
    ///
    /// If the stand-in has no such version.
    pub fn tarball_bytes(&self, name: &str, version: &str) -> Vec<u8> {
        let state = self.shared.lock();
        let published = state
            .packages
            .get(name)
            .and_then(|p| p.versions.get(version))
            .unwrap_or_else(|| panic!("the npm stand-in has no {name}@{version}"));
        published.tarball.to_vec()
    }

    /// Stops listening and drops every open connection (a hanging request sees its
    /// connection close); connecting is refused afterwards. Returns once all of that
    /// is done; a second call does nothing.
    pub async fn stop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(server) = self.server.take() {
            // An error here is the accept loop's panic or its cancellation by a runtime
            // shutting down; either way it is no longer listening.
            let _ = server.await;
        }
    }
}

/// `n` packages `{prefix}-0` .. `{prefix}-{n-1}`, each at 1.0.0, in a binary tree:
/// package `i` depends on `{prefix}-{2i+1}` and `{prefix}-{2i+2}` (those below `n`) with
/// range `^1.0.0`, so installing `{prefix}-0` pulls in all `n`.
pub fn dependency_tree(prefix: &str, n: usize) -> Vec<NpmVersion> {
    (0..n)
        .map(|i| {
            [2 * i + 1, 2 * i + 2]
                .into_iter()
                .filter(|&child| child < n)
                .fold(
                    NpmVersion::new(format!("{prefix}-{i}"), "1.0.0"),
                    |v, child| v.dep(format!("{prefix}-{child}"), "^1.0.0"),
                )
        })
        .collect()
}

/// What the server task and the test share.
#[derive(Debug)]
struct Shared {
    /// `http://127.0.0.1:PORT/`, the prefix of every tarball URL.
    base_url: String,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it, bar a bug already failing the test.
        self.state.lock().expect("npm stand-in state lock poisoned")
    }
}

#[derive(Debug, Default)]
struct State {
    packages: BTreeMap<String, Package>,
    mode: Mode,
    counts: Counts,
    by_path: HashMap<String, u64>,
}

/// One package: its versions, and both packuments rendered after every change.
#[derive(Debug, Default)]
struct Package {
    versions: BTreeMap<String, Published>,
    /// Tags a test set; `latest` is computed when not among them.
    tags: BTreeMap<String, String>,
    created: String,
    modified: String,
    /// The revision number in `_rev`, bumped on every change.
    rev: u64,
    full: Bytes,
    abbreviated: Bytes,
}

impl Package {
    /// Records a change: new `modified` and `_rev`, both documents rendered again (so
    /// a request only clones `Bytes`).
    fn changed(&mut self, name: &str, base_url: &str) {
        self.rev += 1;
        self.modified = now_iso();
        let dist_tags = self.dist_tags();
        let mut full_versions = Map::new();
        let mut abbreviated_versions = Map::new();
        let mut time = Map::new();
        time.insert("created".to_owned(), json!(self.created));
        time.insert("modified".to_owned(), json!(self.modified));
        for (version, p) in &self.versions {
            let dist = json!({
                "tarball": format!("{base_url}{name}/-/{}", p.file_name),
                "shasum": p.shasum,
                "integrity": p.integrity,
                "fileCount": p.file_count,
                "unpackedSize": p.unpacked_size,
            });
            let mut entry = p.manifest.clone();
            if let Value::Object(fields) = &mut entry {
                fields.insert("_id".to_owned(), json!(format!("{name}@{version}")));
                fields.insert("dist".to_owned(), dist.clone());
            }
            full_versions.insert(version.clone(), entry);
            abbreviated_versions.insert(
                version.clone(),
                json!({
                    "name": name,
                    "version": version,
                    "dependencies": p.manifest.get("dependencies").cloned().unwrap_or(json!({})),
                    "dist": dist,
                }),
            );
            time.insert(version.clone(), json!(p.time));
        }
        let description = dist_tags
            .get("latest")
            .and_then(|latest| self.versions.get(latest))
            .and_then(|p| p.manifest.get("description").cloned())
            .unwrap_or(json!(""));
        let full = json!({
            "_id": name,
            "_rev": format!("{}-{}", self.rev, rev_hash(name, self.rev)),
            "name": name,
            "description": description,
            "dist-tags": dist_tags,
            "versions": full_versions,
            "time": time,
            "license": "MIT",
            "readme": "",
        });
        let abbreviated = json!({
            "name": name,
            "modified": self.modified,
            "dist-tags": dist_tags,
            "versions": abbreviated_versions,
        });
        self.full = Bytes::from(full.to_string());
        self.abbreviated = Bytes::from(abbreviated.to_string());
    }

    /// The tags a test set, plus `latest` = the highest release (or, with none, the
    /// highest prerelease) unless a test set it.
    fn dist_tags(&self) -> BTreeMap<String, String> {
        let mut tags = self.tags.clone();
        if !tags.contains_key("latest") {
            let parsed = || {
                self.versions
                    .keys()
                    .filter_map(|v| semver::Version::parse(v).ok())
            };
            let highest = parsed()
                .filter(|v| v.pre.is_empty())
                .max()
                .or_else(|| parsed().max());
            if let Some(latest) = highest {
                tags.insert("latest".to_owned(), latest.to_string());
            }
        }
        tags
    }
}

/// One version as served: its manifest, tarball (true and corrupt) and `dist` fields.
#[derive(Debug)]
struct Published {
    manifest: Value,
    tarball: Bytes,
    /// The tarball with one byte flipped, served in [`Mode::CorruptTarballs`].
    corrupt: Bytes,
    file_name: String,
    shasum: String,
    integrity: String,
    file_count: usize,
    unpacked_size: u64,
    /// When it was added (the packument's `time[version]`).
    time: String,
}

impl Published {
    fn new(v: &NpmVersion, time: String) -> Self {
        let entries = v.entries();
        let file_count = entries.len();
        let unpacked_size = entries.iter().map(|(_, b)| b.len() as u64).sum();
        drop(entries);
        let tarball = v.tarball();
        let shasum = hex::encode(Sha1::digest(&tarball));
        let integrity = format!(
            "sha512-{}",
            base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&tarball))
        );
        let mut corrupt = tarball.clone();
        let middle = corrupt.len() / 2;
        if let Some(byte) = corrupt.get_mut(middle) {
            *byte ^= 0xff;
        }
        Published {
            manifest: v.manifest(),
            tarball: Bytes::from(tarball),
            corrupt: Bytes::from(corrupt),
            file_name: v.tarball_name(),
            shasum,
            integrity,
            file_count,
            unpacked_size,
            time,
        }
    }
}

/// What a request path asks for, judged by its shape alone.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `/{name}`; a scope's slash may come as `/`, `%2f` or `%2F`.
    Packument(String),
    /// `/{name}/-/{file}.tgz`.
    Tarball {
        name: String,
        file: String,
    },
    Other,
}

fn route(path: &str) -> Route {
    let Ok(decoded) = percent_encoding::percent_decode_str(path).decode_utf8() else {
        return Route::Other;
    };
    let Some(rest) = decoded.strip_prefix('/') else {
        return Route::Other;
    };
    if let Some((name, file)) = rest.split_once("/-/") {
        if is_package_name(name) && file.ends_with(".tgz") && !file.contains('/') {
            return Route::Tarball {
                name: name.to_owned(),
                file: file.to_owned(),
            };
        }
        return Route::Other;
    }
    if is_package_name(rest) {
        Route::Packument(rest.to_owned())
    } else {
        Route::Other
    }
}

/// `name` or `@scope/name`; npm's finer rules (length, case) do not matter here.
fn is_package_name(s: &str) -> bool {
    let plain = |n: &str| !n.is_empty() && !n.contains('/') && !n.starts_with(['.', '-', '_']);
    match s.strip_prefix('@') {
        Some(scoped) => {
            matches!(scoped.split_once('/'), Some((scope, name)) if plain(scope) && plain(name))
        }
        None => plain(s),
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            // A stop, or the StandIn dropped.
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                // Out of descriptors, or a connection reset before it was accepted: the
                // listener itself is fine, so pause (not to spin) and go on.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            // Reaps finished connections, so the set does not grow with every one.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(handle(&shared, req).await) }
    });
    // HTTP/1.1 only, as the public registry over plain HTTP; an error is the client
    // going away, which is its business.
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let route = route(path);
    let mode = {
        let mut state = shared.lock();
        match route {
            Route::Packument(_) => state.counts.packuments += 1,
            Route::Tarball { .. } => state.counts.tarballs += 1,
            Route::Other => state.counts.other += 1,
        }
        *state.by_path.entry(path.to_owned()).or_default() += 1;
        state.mode
    };
    let corrupt = match mode {
        Mode::Normal => false,
        Mode::CorruptTarballs => true,
        Mode::Delay(delay) => {
            tokio::time::sleep(delay).await;
            false
        }
        Mode::Fail(status) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error(status, "The stand-in was told to fail", false);
        }
        Mode::Hang => {
            let never: Infallible = std::future::pending().await;
            match never {}
        }
    };
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => return error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", false),
    };
    let state = shared.lock();
    match route {
        Route::Packument(name) => match state.packages.get(&name) {
            Some(package) => {
                let wants_abbreviated = req
                    .headers()
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.contains(ABBREVIATED));
                if wants_abbreviated {
                    respond(
                        StatusCode::OK,
                        ABBREVIATED,
                        package.abbreviated.clone(),
                        head,
                    )
                } else {
                    respond(
                        StatusCode::OK,
                        "application/json",
                        package.full.clone(),
                        head,
                    )
                }
            }
            None => error(StatusCode::NOT_FOUND, "Not found", head),
        },
        Route::Tarball { name, file } => {
            let published = state
                .packages
                .get(&name)
                .and_then(|p| p.versions.values().find(|v| v.file_name == file));
            match published {
                Some(p) => {
                    let body = if corrupt {
                        p.corrupt.clone()
                    } else {
                        p.tarball.clone()
                    };
                    respond(StatusCode::OK, "application/octet-stream", body, head)
                }
                None => error(StatusCode::NOT_FOUND, "Not found", head),
            }
        }
        Route::Other => error(StatusCode::NOT_FOUND, "Not found", head),
    }
}

/// A response with `Content-Type` and `Content-Length` (of `body`, also for HEAD,
/// which gets no body).
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
    head: bool,
) -> Response<Full<Bytes>> {
    let length = body.len();
    let mut response = Response::new(Full::new(if head { Bytes::new() } else { body }));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// The registry's error shape: `{"error": message}`.
fn error(status: StatusCode, message: &str, head: bool) -> Response<Full<Bytes>> {
    let body = Bytes::from(json!({ "error": message }).to_string());
    respond(status, "application/json", body, head)
}

/// The hex part of `_rev` (CouchDB's is an MD5 of the document; any stable hex will do).
fn rev_hash(name: &str, rev: u64) -> String {
    let digest = Sha1::digest(format!("{name}/{rev}"));
    hex::encode(&digest[..16])
}

/// Now, as the registry writes times: `2024-05-01T12:34:56.789Z`.
fn now_iso() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(format)
        .expect("a UTC time formats with a fixed description")
}

/// A cluster of `nodes` whose `public:npmjs` is `standin`, every node with the same
/// [`node_config`].
pub async fn cluster_with(
    standin: &StandIn,
    nodes: usize,
    metadata_ttl_secs: u64,
    unavailable_backoff_ms: u64,
) -> crate::cluster::Cluster {
    crate::cluster::Cluster::start_with(
        crate::seed::Seed::from_env(),
        cluster_options(standin, nodes, metadata_ttl_secs, unavailable_backoff_ms),
    )
    .await
}

/// The options [`cluster_with`] starts its cluster with, for callers that change more.
pub fn cluster_options(
    standin: &StandIn,
    nodes: usize,
    metadata_ttl_secs: u64,
    unavailable_backoff_ms: u64,
) -> crate::cluster::Options {
    crate::cluster::Options {
        nodes,
        config_toml: Some(node_config(
            &standin.url(),
            metadata_ttl_secs,
            unavailable_backoff_ms,
        )),
        ..Default::default()
    }
}

/// A node config (TOML) whose `public:npmjs` is the stand-in at `url`: public documents
/// fresh for `metadata_ttl_secs`, a failed upstream left alone for `unavailable_backoff_ms`.
pub fn node_config(url: &str, metadata_ttl_secs: u64, unavailable_backoff_ms: u64) -> String {
    format!(
        "[external_connections]\n\"public:npmjs\" = \"{url}\"\n\n[upstream]\n\
         metadata_ttl_secs = {metadata_ttl_secs}\nnot_found_ttl_secs = 1\n\
         unavailable_backoff_ms = {unavailable_backoff_ms}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::noise;

    use std::io::Read;
    use std::time::Instant;

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    async fn get_json(url: &str) -> (StatusCode, Value) {
        let response = client()
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .expect("request");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        (status, response.json().await.expect("json body"))
    }

    async fn get_bytes(url: &str) -> (StatusCode, Vec<u8>) {
        let response = client().get(url).send().await.expect("request");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        (status, response.bytes().await.expect("body").to_vec())
    }

    /// Every file of a tarball, by path.
    fn unpack(tarball: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(tarball));
        let mut files = BTreeMap::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            assert_eq!(entry.header().mode().expect("mode"), 0o644);
            assert_eq!(entry.header().mtime().expect("mtime"), NPM_MTIME);
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read entry");
            files.insert(path, data);
        }
        files
    }

    fn sha1_hex(bytes: &[u8]) -> String {
        hex::encode(Sha1::digest(bytes))
    }

    #[tokio::test]
    async fn serves_a_packument_and_its_tarballs() {
        let standin = StandIn::start().await;
        assert!(standin.url().starts_with("http://127.0.0.1:") && standin.url().ends_with('/'));
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        standin.add(NpmVersion::new("left-pad", "1.10.0").dep("pad-core", "^2.0.0"));
        standin.add(NpmVersion::new("left-pad", "1.2.0"));
        standin.add(NpmVersion::new("left-pad", "2.0.0-beta.1"));

        let response = client()
            .get(format!("{}left-pad", standin.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/json");
        let doc: Value = response.json().await.unwrap();
        assert_eq!(doc["_id"], "left-pad");
        assert_eq!(doc["name"], "left-pad");
        assert!(doc["_rev"].as_str().unwrap().starts_with("4-"));
        assert_eq!(
            doc["dist-tags"]["latest"], "1.10.0",
            "highest release, not the prerelease"
        );
        assert_eq!(doc["license"], "MIT");
        assert_eq!(doc["readme"], "");
        assert!(doc["time"]["created"].as_str().unwrap().ends_with('Z'));
        assert!(doc["time"]["modified"].is_string());
        assert!(doc["time"]["1.2.0"].is_string());
        assert_eq!(doc["versions"].as_object().unwrap().len(), 4);

        let v = &doc["versions"]["1.10.0"];
        assert_eq!(v["_id"], "left-pad@1.10.0");
        assert_eq!(v["name"], "left-pad");
        assert_eq!(v["main"], "index.js");
        assert_eq!(v["dependencies"], json!({"pad-core": "^2.0.0"}));
        let dist = &v["dist"];
        let url = dist["tarball"].as_str().unwrap();
        assert_eq!(
            url,
            format!("{}left-pad/-/left-pad-1.10.0.tgz", standin.url())
        );

        let response = client().get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"],
            "application/octet-stream"
        );
        let length: usize = response.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let tarball = response.bytes().await.unwrap();
        assert_eq!(length, tarball.len());
        assert_eq!(tarball, standin.tarball_bytes("left-pad", "1.10.0"));
        assert_eq!(dist["shasum"], sha1_hex(&tarball));
        let sha512 = base64::engine::general_purpose::STANDARD.encode(Sha512::digest(&tarball));
        assert_eq!(dist["integrity"], format!("sha512-{sha512}"));

        let files = unpack(&tarball);
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["package/index.js", "package/package.json"]
        );
        let manifest: Value = serde_json::from_slice(&files["package/package.json"]).unwrap();
        assert_eq!(manifest["name"], "left-pad");
        assert_eq!(manifest["version"], "1.10.0");
        assert_eq!(manifest["dependencies"], json!({"pad-core": "^2.0.0"}));
        assert_eq!(manifest["license"], "MIT");
        assert_eq!(dist["fileCount"], 2);
        let unpacked: usize = files.values().map(Vec::len).sum();
        assert_eq!(dist["unpackedSize"], unpacked);
        assert_eq!(
            files["package/index.js"],
            b"module.exports = \"left-pad@1.10.0\";\n".to_vec()
        );
    }

    #[test]
    fn tarballs_are_deterministic() {
        let v = NpmVersion::new("same", "1.0.0")
            .file("lib/a.js", "a")
            .dep("x", "^1");
        assert_eq!(v.tarball(), v.tarball());
        assert_eq!(v.tarball(), v.clone().tarball());
        assert_ne!(v.tarball(), NpmVersion::new("same", "1.0.1").tarball());
        let files = unpack(&v.tarball());
        assert_eq!(files["package/lib/a.js"], b"a");
        let replaced = v.file("lib/a.js", "b");
        assert_eq!(replaced.files.len(), 2);
        assert_eq!(unpack(&replaced.tarball())["package/lib/a.js"], b"b");
    }

    #[tokio::test]
    async fn abbreviated_packument_when_asked() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("corgi", "1.0.0").dep("dep", "^1.0.0"));
        let response = client()
            .get(format!("{}corgi", standin.url()))
            .header(
                "accept",
                "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], ABBREVIATED);
        let doc: Value = response.json().await.unwrap();
        assert_eq!(doc["name"], "corgi");
        assert!(doc["modified"].is_string());
        assert_eq!(doc["dist-tags"]["latest"], "1.0.0");
        assert!(doc.get("time").is_none() && doc.get("_rev").is_none());
        let v = &doc["versions"]["1.0.0"];
        assert_eq!(v["dependencies"], json!({"dep": "^1.0.0"}));
        assert_eq!(
            v["dist"]["shasum"],
            sha1_hex(&standin.tarball_bytes("corgi", "1.0.0"))
        );
        assert!(v.get("description").is_none());
    }

    #[tokio::test]
    async fn scoped_names_escaped_or_literal() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("@acme/widget", "1.0.0"));
        let mut docs = Vec::new();
        for path in ["@acme%2fwidget", "@acme%2Fwidget", "@acme/widget"] {
            let (status, doc) = get_json(&format!("{}{path}", standin.url())).await;
            assert_eq!(status, 200, "{path}");
            docs.push(doc);
        }
        assert!(docs.iter().all(|d| *d == docs[0]));
        let doc = &docs[0];
        assert_eq!(doc["name"], "@acme/widget");
        assert_eq!(doc["versions"]["1.0.0"]["_id"], "@acme/widget@1.0.0");
        let url = doc["versions"]["1.0.0"]["dist"]["tarball"]
            .as_str()
            .unwrap();
        assert_eq!(
            url,
            format!("{}@acme/widget/-/widget-1.0.0.tgz", standin.url())
        );
        assert_eq!(
            NpmVersion::new("@acme/widget", "1.0.0").tarball_path(),
            "/@acme/widget/-/widget-1.0.0.tgz"
        );

        let (status, tarball) = get_bytes(url).await;
        assert_eq!(status, 200);
        assert!(unpack(&tarball).contains_key("package/package.json"));
        let (status, _) = get_bytes(&format!(
            "{}@acme%2fwidget/-/widget-1.0.0.tgz",
            standin.url()
        ))
        .await;
        assert_eq!(status, 200);

        assert_eq!(
            standin.requests(),
            Counts {
                packuments: 3,
                tarballs: 2,
                other: 0
            }
        );
        assert_eq!(standin.requests_for("/@acme%2fwidget"), 1);
        assert_eq!(standin.requests_for("/@acme%2Fwidget"), 1);
        assert_eq!(standin.requests_for("/@acme/widget"), 1);
        assert_eq!(standin.requests_for("/@acme/widget/-/widget-1.0.0.tgz"), 1);
    }

    #[tokio::test]
    async fn counts_every_request_and_404s_the_unknown() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        let base = standin.url();

        let (status, body) = get_json(&format!("{base}nope")).await;
        assert_eq!(status, 404);
        assert_eq!(body, json!({"error": "Not found"}));
        let (status, _) = get_bytes(&format!("{base}left-pad/-/left-pad-9.9.9.tgz")).await;
        assert_eq!(status, 404);
        let (status, _) = get_bytes(&format!("{base}nope/-/nope-1.0.0.tgz")).await;
        assert_eq!(status, 404);
        let (status, _) = get_bytes(&base).await;
        assert_eq!(status, 404);
        let (status, _) = get_bytes(&format!("{base}-/ping")).await;
        assert_eq!(status, 404);
        for _ in 0..3 {
            let (status, _) = get_bytes(&format!("{base}left-pad/-/left-pad-1.0.0.tgz")).await;
            assert_eq!(status, 200);
        }
        let (status, _) = get_json(&format!("{base}left-pad")).await;
        assert_eq!(status, 200);

        assert_eq!(
            standin.requests(),
            Counts {
                packuments: 2,
                tarballs: 5,
                other: 2
            }
        );
        assert_eq!(standin.requests().total(), 9);
        assert_eq!(standin.requests_for("/left-pad/-/left-pad-1.0.0.tgz"), 3);
        assert_eq!(standin.requests_for("/left-pad"), 1);
        assert_eq!(standin.requests_for("/nope"), 1);
        assert_eq!(standin.requests_for("/never"), 0);

        standin.reset_counts();
        assert_eq!(standin.requests(), Counts::default());
        assert_eq!(standin.requests_for("/left-pad"), 0);
    }

    #[tokio::test]
    async fn head_has_the_length_and_no_body() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        let url = format!("{}left-pad/-/left-pad-1.0.0.tgz", standin.url());
        let response = client().head(&url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let length: usize = response.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, standin.tarball_bytes("left-pad", "1.0.0").len());
        assert!(response.bytes().await.unwrap().is_empty());
        let response = client()
            .head(format!("{}left-pad", standin.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            standin.requests(),
            Counts {
                packuments: 1,
                tarballs: 1,
                other: 0
            }
        );
    }

    #[tokio::test]
    async fn tags_and_removal() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("tagged", "1.0.0"));
        standin.tag("tagged", "latest", "1.0.0");
        standin.tag("tagged", "next", "3.0.0-rc.1");
        standin.add(NpmVersion::new("tagged", "2.0.0"));
        standin.add(NpmVersion::new("tagged", "3.0.0-rc.1"));
        let (_, doc) = get_json(&format!("{}tagged", standin.url())).await;
        assert_eq!(
            doc["dist-tags"],
            json!({"latest": "1.0.0", "next": "3.0.0-rc.1"})
        );

        standin.add(NpmVersion::new("tagged", "2.0.0").file("extra.txt", "replaced"));
        let (_, doc) = get_json(&format!("{}tagged", standin.url())).await;
        assert_eq!(doc["versions"]["2.0.0"]["dist"]["fileCount"], 3);
        assert!(
            unpack(&standin.tarball_bytes("tagged", "2.0.0")).contains_key("package/extra.txt")
        );

        standin.remove_package("tagged");
        let (status, _) = get_json(&format!("{}tagged", standin.url())).await;
        assert_eq!(status, 404);
        let (status, _) = get_bytes(&format!("{}tagged/-/tagged-1.0.0.tgz", standin.url())).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn fail_mode_answers_that_status_and_still_counts() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        standin.set_mode(Mode::Fail(500));
        let (status, body) = get_json(&format!("{}left-pad", standin.url())).await;
        assert_eq!(status, 500);
        assert!(body["error"].is_string());
        let (status, _) =
            get_bytes(&format!("{}left-pad/-/left-pad-1.0.0.tgz", standin.url())).await;
        assert_eq!(status, 500);
        standin.set_mode(Mode::Fail(503));
        let (status, _) = get_bytes(&format!("{}left-pad", standin.url())).await;
        assert_eq!(status, 503);
        assert_eq!(
            standin.requests(),
            Counts {
                packuments: 2,
                tarballs: 1,
                other: 0
            }
        );

        standin.set_mode(Mode::Normal);
        let (status, _) = get_json(&format!("{}left-pad", standin.url())).await;
        assert_eq!(status, 200);
    }

    #[tokio::test]
    async fn corrupt_tarballs_keep_their_length_not_their_hash() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        let url = format!("{}left-pad/-/left-pad-1.0.0.tgz", standin.url());
        let (_, good) = get_bytes(&url).await;
        let (_, doc) = get_json(&format!("{}left-pad", standin.url())).await;

        standin.set_mode(Mode::CorruptTarballs);
        let (status, bad) = get_bytes(&url).await;
        assert_eq!(status, 200);
        assert_eq!(bad.len(), good.len());
        assert_ne!(sha1_hex(&bad), sha1_hex(&good));
        assert_eq!(bad.iter().zip(&good).filter(|(a, b)| a != b).count(), 1);
        let (_, same_doc) = get_json(&format!("{}left-pad", standin.url())).await;
        assert_eq!(
            same_doc["versions"], doc["versions"],
            "the packument keeps the true hashes"
        );
        assert_eq!(standin.tarball_bytes("left-pad", "1.0.0"), good);
    }

    #[tokio::test]
    async fn delay_mode_answers_late() {
        let standin = StandIn::start().await;
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        standin.set_mode(Mode::Delay(Duration::from_millis(150)));
        let started = Instant::now();
        let (status, _) = get_json(&format!("{}left-pad", standin.url())).await;
        assert_eq!(status, 200);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn stop_drops_hanging_requests_and_refuses_connections() {
        let mut standin = StandIn::start().await;
        standin.add(NpmVersion::new("left-pad", "1.0.0"));
        standin.set_mode(Mode::Hang);
        let url = format!("{}left-pad", standin.url());
        let hanging = tokio::spawn(async move { client().get(url).send().await });
        crate::poll::until(
            "the hanging request to arrive",
            Duration::from_secs(5),
            || {
                let counts = standin.requests();
                async move {
                    if counts.packuments == 1 {
                        Ok(())
                    } else {
                        Err(format!("{counts:?}"))
                    }
                }
            },
        )
        .await;
        assert!(!hanging.is_finished());

        standin.stop().await;
        let outcome = tokio::time::timeout(Duration::from_secs(5), hanging)
            .await
            .expect("stop ends the hanging request")
            .unwrap();
        assert!(
            outcome.is_err(),
            "the connection was dropped, not answered: {outcome:?}"
        );
        assert!(TcpStream::connect(standin.addr()).await.is_err());
        let refused = client().get(standin.url()).send().await.unwrap_err();
        assert!(refused.is_connect(), "{refused:?}");
        standin.stop().await;
    }

    #[tokio::test]
    async fn dependency_tree_of_seven() {
        let tree = dependency_tree("tree", 7);
        let names: Vec<_> = tree.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "tree-0", "tree-1", "tree-2", "tree-3", "tree-4", "tree-5", "tree-6"
            ]
        );
        let deps = |i: usize| tree[i].dependencies.keys().cloned().collect::<Vec<_>>();
        assert_eq!(deps(0), ["tree-1", "tree-2"]);
        assert_eq!(deps(1), ["tree-3", "tree-4"]);
        assert_eq!(deps(2), ["tree-5", "tree-6"]);
        assert!((3..7).all(|i| deps(i).is_empty()));
        assert!(tree.iter().all(|v| v.version == "1.0.0"));
        assert!(
            tree.iter()
                .flat_map(|v| v.dependencies.values())
                .all(|r| r == "^1.0.0")
        );
        assert_eq!(dependency_tree("odd", 6)[2].dependencies.len(), 1);

        // Walking the packuments from the root reaches every package.
        let standin = StandIn::start().await;
        tree.into_iter().for_each(|v| standin.add(v));
        let mut seen = std::collections::BTreeSet::new();
        let mut todo = vec!["tree-0".to_owned()];
        while let Some(name) = todo.pop() {
            let (status, doc) = get_json(&format!("{}{name}", standin.url())).await;
            assert_eq!(status, 200);
            let deps = doc["versions"]["1.0.0"]["dependencies"]
                .as_object()
                .unwrap();
            todo.extend(deps.keys().cloned());
            seen.insert(name);
        }
        assert_eq!(seen.len(), 7);
        assert_eq!(standin.requests().packuments, 7);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn serves_a_big_tarball_to_a_thousand_connections() {
        let standin = StandIn::start().await;
        let blob = noise(1 << 20, 0x9e37_79b9_7f4a_7c15);
        standin.add(NpmVersion::new("big", "1.0.0").file("blob.bin", blob.clone()));
        standin.add(NpmVersion::new("small", "1.0.0"));
        let expected = standin.tarball_bytes("big", "1.0.0");
        let (_, tarball) = get_bytes(&format!("{}big/-/big-1.0.0.tgz", standin.url())).await;
        assert_eq!(tarball, expected);
        assert_eq!(unpack(&tarball)["package/blob.bin"], blob);

        // 1,000 requests in flight at once: each holds its own connection.
        let client = client();
        let url = format!("{}small/-/small-1.0.0.tgz", standin.url());
        standin.set_mode(Mode::Delay(Duration::from_millis(200)));
        let requests = (0..1000).map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { client.get(url).send().await?.bytes().await })
        });
        let started = Instant::now();
        let bodies = futures::future::join_all(requests).await;
        let expected = standin.tarball_bytes("small", "1.0.0");
        for body in bodies {
            assert_eq!(body.unwrap().unwrap(), expected);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answered concurrently"
        );
        assert_eq!(standin.requests_for("/small/-/small-1.0.0.tgz"), 1000);
    }
}
