use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::harness::{ACCESS_KEY, REGION, SECRET_KEY, Server, fake_tgz, npm_output, require};

/// Runs the AWS CLI against the server with the admin's credentials and `home` as HOME.
fn aws(server: &Server, home: &Path, args: &[&str]) -> String {
    let out = Command::new("aws")
        .args(args)
        .args(["--endpoint-url", &server.url(), "--output", "json"])
        .env("HOME", home)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_DEFAULT_REGION", REGION)
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", home.join("aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
        .output()
        .expect("run aws");
    assert!(
        out.status.success(),
        "aws {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn aws_json(server: &Server, home: &Path, args: &[&str]) -> Value {
    let out = aws(server, home, args);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("aws {args:?} printed non-JSON ({e}): {out}"))
}

/// `aws codeartifact login --tool npm`: configures npm in `home` for the repository.
fn npm_login(server: &Server, home: &Path, domain: &str, repo: &str) {
    let args = [
        "codeartifact",
        "login",
        "--tool",
        "npm",
        "--domain",
        domain,
        "--repository",
        repo,
    ];
    aws(server, home, &args);
}

fn npm(home: &Path, cwd: &Path, args: &[&str]) -> String {
    let out = npm_output(home, cwd, args);
    assert!(
        out.status.success(),
        "npm {args:?} in {} failed:\nstdout: {}\nstderr: {}",
        cwd.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// The walk-through of the README: the AWS CLI creates a domain and a repository and
/// configures npm with `aws codeartifact login`; npm publishes a scoped and an unscoped
/// package (one depending on the other) and installs them into a fresh project; the API
/// lists and describes what was published.
#[test]
fn awscli_login_then_npm_publish_and_install() {
    if !require("aws") || !require("npm") {
        return;
    }
    let server = Server::start();
    let home = tempfile::tempdir().unwrap();
    let home = home.path();

    let d = aws_json(
        &server,
        home,
        &["codeartifact", "create-domain", "--domain", "acme"],
    );
    assert_eq!(d["domain"]["name"], "acme");
    assert_eq!(d["domain"]["status"], "Active");
    let r = aws_json(
        &server,
        home,
        &[
            "codeartifact",
            "create-repository",
            "--domain",
            "acme",
            "--repository",
            "app",
            "--description",
            "apps",
        ],
    );
    assert_eq!(r["repository"]["name"], "app");
    npm_login(&server, home, "acme", "app");
    let npmrc = std::fs::read_to_string(home.join(".npmrc"))
        .expect("aws codeartifact login wrote ~/.npmrc");
    let endpoint = format!("{}/npm/acme/app/", server.url());
    assert!(npmrc.contains(&format!("registry={endpoint}")), "{npmrc}");
    assert!(npmrc.contains("_authToken="), "{npmrc}");

    // A scoped library and an unscoped app that depends on it.
    let lib = home.join("src/util");
    write(
        &lib.join("package.json"),
        r#"{"name":"@acme/util","version":"1.0.0","description":"shared helpers","main":"index.js","license":"MIT"}"#,
    );
    write(
        &lib.join("index.js"),
        "module.exports = { answer: () => 42 };\n",
    );
    npm(home, &lib, &["publish"]);
    let app = home.join("src/app");
    write(
        &app.join("package.json"),
        r#"{"name":"acme-app","version":"1.0.0","description":"the app","main":"main.js","license":"MIT","dependencies":{"@acme/util":"^1.0.0"}}"#,
    );
    write(
        &app.join("main.js"),
        "console.log(require('@acme/util').answer());\n",
    );
    npm(home, &app, &["publish"]);

    // `npm view` reads the packument.
    let view = npm(home, home, &["view", "acme-app", "--json"]);
    let view: Value = serde_json::from_str(&view).unwrap();
    assert_eq!(view["version"], "1.0.0");
    assert_eq!(view["dependencies"]["@acme/util"], "^1.0.0");

    // A fresh project installs both, with the published contents.
    let fresh = home.join("fresh");
    write(
        &fresh.join("package.json"),
        r#"{"name":"fresh","version":"0.0.0","private":true}"#,
    );
    npm(home, &fresh, &["install", "acme-app@1.0.0"]);
    let installed = std::fs::read_to_string(fresh.join("node_modules/acme-app/main.js")).unwrap();
    assert_eq!(installed, "console.log(require('@acme/util').answer());\n");
    let installed =
        std::fs::read_to_string(fresh.join("node_modules/@acme/util/index.js")).unwrap();
    assert_eq!(installed, "module.exports = { answer: () => 42 };\n");
    let run = Command::new("node")
        .arg("node_modules/acme-app/main.js")
        .current_dir(&fresh)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "42");

    // The API sees both.
    let v = aws_json(
        &server,
        home,
        &[
            "codeartifact",
            "list-package-versions",
            "--domain",
            "acme",
            "--repository",
            "app",
            "--format",
            "npm",
            "--package",
            "acme-app",
        ],
    );
    assert_eq!(v["versions"][0]["version"], "1.0.0", "{v}");
    assert_eq!(v["versions"][0]["status"], "Published");
    assert_eq!(v["defaultDisplayVersion"], "1.0.0");
    // `aws codeartifact OP` on @acme/util 1.0.0, with `extra` arguments.
    let on_util = |op: &str, extra: &[&str]| {
        let mut args = vec!["codeartifact", op];
        args.extend([
            "--domain",
            "acme",
            "--repository",
            "app",
            "--format",
            "npm",
            "--namespace",
            "acme",
            "--package",
            "util",
            "--package-version",
            "1.0.0",
        ]);
        args.extend(extra);
        aws_json(&server, home, &args)
    };
    let v = on_util("describe-package-version", &[]);
    let pv = &v["packageVersion"];
    assert_eq!(pv["namespace"], "acme", "{v}");
    assert_eq!(pv["packageName"], "util");
    assert_eq!(pv["version"], "1.0.0");
    assert_eq!(pv["status"], "Published");
    assert_eq!(pv["summary"], "shared helpers");
    assert_eq!(pv["origin"]["originType"], "INTERNAL");
    let assets = on_util("list-package-version-assets", &[]);
    assert_eq!(assets["assets"][0]["name"], "util-1.0.0.tgz", "{assets}");
    // The four digests CodeArtifact lists are those of the bytes a download gets.
    let tgz = home.join("util-1.0.0.tgz");
    on_util(
        "get-package-version-asset",
        &["--asset", "util-1.0.0.tgz", tgz.to_str().unwrap()],
    );
    let bytes = std::fs::read(&tgz).unwrap();
    let hashes = &assets["assets"][0]["hashes"];
    use sha2::Digest;
    assert_eq!(
        hashes["MD5"],
        hex::encode(md5::Md5::digest(&bytes)),
        "{assets}"
    );
    assert_eq!(hashes["SHA-1"], hex::encode(sha1::Sha1::digest(&bytes)));
    assert_eq!(hashes["SHA-256"], hex::encode(sha2::Sha256::digest(&bytes)));
    assert_eq!(hashes["SHA-512"], hex::encode(sha2::Sha512::digest(&bytes)));
    assert_eq!(assets["assets"][0]["size"], bytes.len());
    let pkgs = aws_json(
        &server,
        home,
        &[
            "codeartifact",
            "list-packages",
            "--domain",
            "acme",
            "--repository",
            "app",
        ],
    );
    assert_eq!(pkgs["packages"].as_array().unwrap().len(), 2, "{pkgs}");

    // The same version again is refused with npm's message.
    let out = npm_output(home, &lib, &["publish"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot publish over the previously published versions"),
        "{err}"
    );
}

/// The rest of the npm CLI against a real node: dist-tag add/ls/rm, deprecate, view,
/// whoami, ping, unpublish of one version.
#[test]
fn npm_cli_tags_deprecate_whoami_ping_unpublish() {
    if !require("aws") || !require("npm") {
        return;
    }
    let server = Server::start();
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    aws(
        &server,
        home,
        &["codeartifact", "create-domain", "--domain", "tools"],
    );
    aws(
        &server,
        home,
        &[
            "codeartifact",
            "create-repository",
            "--domain",
            "tools",
            "--repository",
            "main",
        ],
    );
    npm_login(&server, home, "tools", "main");

    let pkg = home.join("src/cli");
    for version in ["1.0.0", "1.1.0", "2.0.0-beta.1"] {
        write(
            &pkg.join("package.json"),
            &format!(
                r#"{{"name":"@tools/cli","version":"{version}","description":"a cli","license":"MIT"}}"#
            ),
        );
        write(
            &pkg.join("index.js"),
            &format!("module.exports = '{version}';\n"),
        );
        let tag: &[&str] = if version.contains("beta") {
            &["--tag", "beta"]
        } else {
            &[]
        };
        let mut args = vec!["publish"];
        args.extend_from_slice(tag);
        npm(home, &pkg, &args);
    }

    assert_eq!(npm(home, home, &["whoami"]).trim(), "admin");
    npm(home, home, &["ping"]);

    let tags = npm(home, home, &["dist-tag", "ls", "@tools/cli"]);
    assert!(
        tags.contains("latest: 1.1.0") && tags.contains("beta: 2.0.0-beta.1"),
        "{tags}"
    );
    npm(
        home,
        home,
        &["dist-tag", "add", "@tools/cli@1.0.0", "stable"],
    );
    let tags = npm(home, home, &["dist-tag", "ls", "@tools/cli"]);
    assert!(tags.contains("stable: 1.0.0"), "{tags}");
    npm(home, home, &["dist-tag", "rm", "@tools/cli", "stable"]);
    let tags = npm(home, home, &["dist-tag", "ls", "@tools/cli"]);
    assert!(!tags.contains("stable"), "{tags}");

    npm(home, home, &["deprecate", "@tools/cli@1.0.0", "use 1.1.0"]);
    let view: Value =
        serde_json::from_str(&npm(home, home, &["view", "@tools/cli@1.0.0", "--json"])).unwrap();
    assert_eq!(view["deprecated"], "use 1.1.0", "{view}");
    let view: Value =
        serde_json::from_str(&npm(home, home, &["view", "@tools/cli", "--json"])).unwrap();
    assert_eq!(view["version"], "1.1.0");
    assert_eq!(view["dist-tags"]["beta"], "2.0.0-beta.1");

    npm(home, home, &["unpublish", "@tools/cli@2.0.0-beta.1"]);
    let view: Value = serde_json::from_str(&npm(
        home,
        home,
        &["view", "@tools/cli", "versions", "--json"],
    ))
    .unwrap();
    assert_eq!(view, serde_json::json!(["1.0.0", "1.1.0"]));
    let v = aws_json(
        &server,
        home,
        &[
            "codeartifact",
            "list-package-versions",
            "--domain",
            "tools",
            "--repository",
            "main",
            "--format",
            "npm",
            "--namespace",
            "tools",
            "--package",
            "cli",
        ],
    );
    assert_eq!(v["versions"].as_array().unwrap().len(), 2, "{v}");
}

/// Bytes of the node's blob segment files.
fn blob_files_bytes(data: &Path) -> u64 {
    std::fs::read_dir(data.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// What `npm unpublish` and `aws codeartifact delete-repository` leave unreferenced is
/// removed and its disk space given back (the collector runs every second here, with
/// 1 MiB segment files), while the versions still published install byte for byte.
#[test]
fn unpublished_and_deleted_packages_give_their_space_back() {
    if !require("aws") || !require("npm") {
        return;
    }
    let (tmp, server) =
        Server::start_with_config("[blob_gc]\ninterval_secs = 1\nsegment_mib = 1\n");
    let data = tmp.path().join("data");
    let home = tmp.path().join("home");
    let home = home.as_path();
    aws(
        &server,
        home,
        &["codeartifact", "create-domain", "--domain", "gc"],
    );
    for repo in ["main", "scratch"] {
        let args = [
            "codeartifact",
            "create-repository",
            "--domain",
            "gc",
            "--repository",
            repo,
        ];
        aws(&server, home, &args);
    }
    // Six versions in one repository, two in another: ~400 KB tarballs, two to a
    // segment file.
    let pkg = home.join("src/big");
    let mut files = Vec::new();
    for (repo, versions) in [("main", 0..6u64), ("scratch", 6..8)] {
        npm_login(&server, home, "gc", repo);
        for i in versions {
            let version = format!("1.0.{i}");
            write(
                &pkg.join("package.json"),
                &format!(r#"{{"name":"big","version":"{version}","license":"MIT"}}"#),
            );
            // Incompressible, so that the tarball is as large as the file.
            let bytes = fake_tgz(i, 400_000);
            std::fs::write(pkg.join("data.bin"), &bytes).unwrap();
            npm(home, &pkg, &["publish"]);
            files.push(bytes);
        }
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let peak = blob_files_bytes(&data);
    assert!(peak > 3_000_000, "{peak} bytes stored");

    npm_login(&server, home, "gc", "main");
    for i in 0..4 {
        npm(home, home, &["unpublish", &format!("big@1.0.{i}")]);
    }
    let args = [
        "codeartifact",
        "delete-repository",
        "--domain",
        "gc",
        "--repository",
        "scratch",
    ];
    aws(&server, home, &args);

    // Two passes a second apart remove the six, and the segments holding only them go.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (removed, reclaimed) = rt.block_on(async {
            (
                server.metric("granary_blobs_collected_total").await,
                server.metric("granary_blob_bytes_reclaimed_total").await,
            )
        });
        if removed >= 6 && reclaimed >= 1_500_000 {
            assert_eq!(removed, 6, "only the unreferenced blobs are removed");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{removed} blobs removed, {reclaimed} bytes reclaimed"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // The deleted files are closed a pass later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while blob_files_bytes(&data) + 1_500_000 > peak {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bytes stored, {peak} at the peak",
            blob_files_bytes(&data)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // The gauges: two blobs left (one per version still published), their bytes, and
    // the segment files' bytes as they are on disk.
    let (stored, stored_bytes, file_bytes) = rt.block_on(async {
        (
            server.metric("granary_blobs_stored").await,
            server.metric("granary_blob_bytes_stored").await,
            server.metric("granary_blob_file_bytes").await,
        )
    });
    assert_eq!(stored, 2);
    assert!(
        (800_000..820_000).contains(&stored_bytes),
        "{stored_bytes} bytes stored"
    );
    assert_eq!(file_bytes, blob_files_bytes(&data));
    assert!(file_bytes >= stored_bytes);

    // What is still published installs, identical; what is not, does not.
    let app = home.join("app");
    write(
        &app.join("package.json"),
        r#"{"name":"app","version":"1.0.0","license":"MIT"}"#,
    );
    for i in [4, 5] {
        npm(home, &app, &["install", &format!("big@1.0.{i}")]);
        let installed = std::fs::read(app.join("node_modules/big/data.bin")).unwrap();
        assert!(installed == files[i], "big@1.0.{i} installs its own bytes");
    }
    let gone = npm_output(home, &app, &["install", "big@1.0.1"]);
    assert!(!gone.status.success(), "an unpublished version installs");
}
