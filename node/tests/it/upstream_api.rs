//! Upstreams, external connections and package origin controls, driven with the real AWS
//! CLI (`aws codeartifact … --endpoint-url`): the shapes the CLI prints, the errors it
//! reports, and that a refused change changes nothing. Domains and repositories the
//! tests only need to exist are made with signed API calls, which are quicker.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

use crate::harness::{
    ACCESS_KEY, Client, REGION, SECRET_KEY, Server, fake_tgz, npm_publish_body, require,
};

/// The AWS CLI pointed at one server, with the admin's credentials and a private HOME.
struct Aws {
    endpoint: String,
    home: tempfile::TempDir,
}

impl Aws {
    fn new(server: &Server) -> Aws {
        Aws {
            endpoint: server.url(),
            home: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// Runs `aws codeartifact <args>`.
    fn run(&self, args: &[&str]) -> Output {
        let home: &Path = self.home.path();
        Command::new("aws")
            .arg("codeartifact")
            .args(args)
            .args(["--endpoint-url", &self.endpoint, "--output", "json"])
            .env("HOME", home)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_MAX_ATTEMPTS", "1")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_CONFIG_FILE", home.join("aws-config"))
            .env("AWS_SHARED_CREDENTIALS_FILE", home.join("aws-credentials"))
            .output()
            .expect("run aws")
    }

    /// A command that must succeed; its JSON output.
    fn ok(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "aws codeartifact {args:?} failed:\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!("aws codeartifact {args:?} printed non-JSON ({e}): {stdout}")
        })
    }

    /// A command that must fail; its standard error.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "aws codeartifact {args:?} succeeded but should fail:\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// A command the server must refuse with `code` (e.g. `ConflictException`); the
    /// message the CLI printed.
    fn refused(&self, args: &[&str], code: &str) -> String {
        let stderr = self.fails(args);
        assert!(
            stderr.contains(&format!("({code})")),
            "aws codeartifact {args:?}: expected {code}, got: {stderr}"
        );
        stderr
    }
}

/// Creates a repository (no upstreams) with a signed API call.
async fn create_repository(c: &Client, domain: &str, repo: &str) {
    let r = c
        .api(
            "POST",
            &format!("/v1/repository?domain={domain}&repository={repo}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// DescribeRepository with a signed API call (for checks that a refusal changed nothing).
async fn describe_repository(c: &Client, domain: &str, repo: &str) -> Value {
    let r = c
        .api(
            "GET",
            &format!("/v1/repository?domain={domain}&repository={repo}"),
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// `upstreams` as the CLI's shorthand list: `repositoryName=a repositoryName=b …`.
fn upstream_args(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| format!("repositoryName={n}"))
        .collect()
}

/// `update-repository --upstreams …` for `repo` in `domain`.
fn update_upstreams_args<'a>(
    domain: &'a str,
    repo: &'a str,
    upstreams: &'a [String],
) -> Vec<&'a str> {
    let mut args = vec![
        "update-repository",
        "--domain",
        domain,
        "--repository",
        repo,
        "--upstreams",
    ];
    args.extend(upstreams.iter().map(String::as_str));
    args
}

fn upstream_names(repository: &Value) -> Vec<String> {
    repository["upstreams"]
        .as_array()
        .unwrap_or_else(|| panic!("no upstreams list in {repository}"))
        .iter()
        .map(|u| u["repositoryName"].as_str().unwrap().to_owned())
        .collect()
}

/// PUTs an npm publish of `name@version` to `domain/repo`; the response.
async fn npm_publish(
    c: &Client,
    token: &str,
    domain: &str,
    repo: &str,
    name: &str,
    version: &str,
) -> crate::harness::Resp {
    let tgz = fake_tgz(name.len() as u64 * 31 + version.len() as u64, 600);
    let body = npm_publish_body(name, version, &tgz, json!({"license": "MIT"}));
    c.npm_put(token, domain, repo, name, &body).await
}

/// Associating `public:npmjs` shows it on the repository as CodeArtifact does; a second
/// connection (the same one or another) is a conflict, an unknown name is invalid, and
/// a missing repository is not found; none of them changes the repository.
#[tokio::test(flavor = "multi_thread")]
async fn external_connection_association_and_its_refusals() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    c.setup("ext", "app").await;
    let aws = Aws::new(&server);
    let associate = |repo: &'static str, connection: &'static str| {
        [
            "associate-external-connection",
            "--domain",
            "ext",
            "--repository",
            repo,
            "--external-connection",
            connection,
        ]
    };
    let npmjs = json!([{
        "externalConnectionName": "public:npmjs",
        "packageFormat": "npm",
        "status": "Available",
    }]);

    let r = aws.ok(&associate("app", "public:npmjs"));
    assert_eq!(r["repository"]["name"], "app", "{r}");
    assert_eq!(r["repository"]["domainName"], "ext");
    assert_eq!(r["repository"]["externalConnections"], npmjs, "{r}");
    assert_eq!(r["repository"]["upstreams"], json!([]), "{r}");

    let d = aws.ok(&[
        "describe-repository",
        "--domain",
        "ext",
        "--repository",
        "app",
    ]);
    assert_eq!(d["repository"]["externalConnections"], npmjs, "{d}");

    let msg = aws.refused(&associate("app", "public:npmjs"), "ConflictException");
    assert!(msg.contains("public:npmjs"), "{msg}");
    let msg = aws.refused(&associate("app", "public:pypi"), "ConflictException");
    assert!(
        msg.contains("public:npmjs"),
        "names the connection it has: {msg}"
    );
    let msg = aws.refused(&associate("app", "public:nope"), "ValidationException");
    assert!(msg.contains("public:nope"), "{msg}");
    aws.refused(
        &associate("ghost", "public:npmjs"),
        "ResourceNotFoundException",
    );

    let d = describe_repository(&c, "ext", "app").await;
    assert_eq!(
        d["repository"]["externalConnections"], npmjs,
        "refusals changed nothing: {d}"
    );
}

/// Disassociating removes the connection; disassociating it again is not found; the
/// repository may then take another connection.
#[tokio::test(flavor = "multi_thread")]
async fn external_connection_disassociation() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    c.setup("ext", "app").await;
    let r = c
        .api(
            "POST",
            "/v1/repository/external-connection?domain=ext&repository=app&external-connection=public:npmjs",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let aws = Aws::new(&server);
    let disassociate = [
        "disassociate-external-connection",
        "--domain",
        "ext",
        "--repository",
        "app",
        "--external-connection",
        "public:npmjs",
    ];

    let r = aws.ok(&disassociate);
    assert_eq!(r["repository"]["name"], "app", "{r}");
    assert_eq!(r["repository"]["externalConnections"], json!([]), "{r}");
    let msg = aws.refused(&disassociate, "ResourceNotFoundException");
    assert!(msg.contains("public:npmjs"), "{msg}");

    let r = aws.ok(&[
        "associate-external-connection",
        "--domain",
        "ext",
        "--repository",
        "app",
        "--external-connection",
        "public:pypi",
    ]);
    assert_eq!(
        r["repository"]["externalConnections"],
        json!([{"externalConnectionName": "public:pypi", "packageFormat": "pypi", "status": "Available"}]),
        "{r}"
    );
}

/// Upstreams that would form a cycle (directly, through a longer chain, or a repository
/// naming itself) are refused with a ValidationException that says why, and the refused
/// update leaves the repository as it was.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_cycles_are_refused() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    c.setup("cyc", "ra").await;
    create_repository(&c, "cyc", "rb").await;
    create_repository(&c, "cyc", "rc").await;
    let aws = Aws::new(&server);

    let to_b = upstream_args(&["rb"]);
    let r = aws.ok(&update_upstreams_args("cyc", "ra", &to_b));
    assert_eq!(upstream_names(&r["repository"]), ["rb"], "{r}");

    // rb → ra while ra → rb.
    let to_a = upstream_args(&["ra"]);
    let msg = aws.refused(
        &update_upstreams_args("cyc", "rb", &to_a),
        "ValidationException",
    );
    assert!(msg.contains("cycle"), "{msg}");

    // ra → rb → rc, then rc → ra closes a longer loop.
    let to_c = upstream_args(&["rc"]);
    aws.ok(&update_upstreams_args("cyc", "rb", &to_c));
    let msg = aws.refused(
        &update_upstreams_args("cyc", "rc", &to_a),
        "ValidationException",
    );
    assert!(msg.contains("cycle"), "{msg}");

    // A repository cannot be its own upstream.
    let msg = aws.refused(
        &update_upstreams_args("cyc", "ra", &to_a),
        "ValidationException",
    );
    assert!(msg.contains("own upstream"), "{msg}");

    let d = describe_repository(&c, "cyc", "rc").await;
    assert_eq!(
        upstream_names(&d["repository"]),
        Vec::<String>::new(),
        "{d}"
    );
    let d = describe_repository(&c, "cyc", "ra").await;
    assert_eq!(upstream_names(&d["repository"]), ["rb"], "{d}");
}

/// Ten upstreams are kept in the order given and described in that order; an eleventh
/// is a ValidationException and an unknown name a ResourceNotFoundException, neither of
/// which changes the list.
#[tokio::test(flavor = "multi_thread")]
async fn upstreams_are_ordered_known_and_at_most_ten() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    c.setup("ord", "top").await;
    let names: Vec<String> = (0..11).map(|i| format!("u{i:02}")).collect();
    for n in &names {
        create_repository(&c, "ord", n).await;
    }
    let aws = Aws::new(&server);

    // Ten, in an order that is neither creation nor name order.
    let mut ten: Vec<&str> = names[..10].iter().map(String::as_str).collect();
    ten.rotate_left(3);
    ten.swap(0, 9);
    let args = upstream_args(&ten);
    let r = aws.ok(&update_upstreams_args("ord", "top", &args));
    assert_eq!(upstream_names(&r["repository"]), ten, "{r}");
    let d = aws.ok(&[
        "describe-repository",
        "--domain",
        "ord",
        "--repository",
        "top",
    ]);
    assert_eq!(upstream_names(&d["repository"]), ten, "{d}");

    let eleven: Vec<&str> = names.iter().map(String::as_str).collect();
    let args = upstream_args(&eleven);
    let msg = aws.refused(
        &update_upstreams_args("ord", "top", &args),
        "ValidationException",
    );
    assert!(msg.contains("10"), "{msg}");

    let args = upstream_args(&["u00", "ghost"]);
    let msg = aws.refused(
        &update_upstreams_args("ord", "top", &args),
        "ResourceNotFoundException",
    );
    assert!(msg.contains("ghost"), "{msg}");

    let d = describe_repository(&c, "ord", "top").await;
    assert_eq!(
        upstream_names(&d["repository"]),
        ten,
        "refusals changed nothing: {d}"
    );
}

/// A repository that another lists as an upstream cannot be deleted; once no repository
/// lists it (upstreams set to an empty list), it can.
#[tokio::test(flavor = "multi_thread")]
async fn a_repository_that_is_an_upstream_cannot_be_deleted() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    server.client().setup("del", "base").await;
    let aws = Aws::new(&server);
    let r = aws.ok(&[
        "create-repository",
        "--domain",
        "del",
        "--repository",
        "app",
        "--upstreams",
        "repositoryName=base",
    ]);
    assert_eq!(upstream_names(&r["repository"]), ["base"], "{r}");

    let delete_base = [
        "delete-repository",
        "--domain",
        "del",
        "--repository",
        "base",
    ];
    let msg = aws.refused(&delete_base, "ConflictException");
    assert!(
        msg.contains("app"),
        "names the downstream repository: {msg}"
    );

    let r = aws.ok(&[
        "update-repository",
        "--domain",
        "del",
        "--repository",
        "app",
        "--upstreams",
        "[]",
    ]);
    assert_eq!(
        upstream_names(&r["repository"]),
        Vec::<String>::new(),
        "{r}"
    );
    let r = aws.ok(&delete_base);
    assert_eq!(r["repository"]["name"], "base", "{r}");
    aws.refused(
        &[
            "describe-repository",
            "--domain",
            "del",
            "--repository",
            "base",
        ],
        "ResourceNotFoundException",
    );
}

/// Origin controls can protect a package name before its first version: `publish=BLOCK`
/// shows in DescribePackage and makes npm publishes of it fail with npm's error body;
/// an invalid value fails and changes nothing; `publish=ALLOW` lets the publish through,
/// and blocking again keeps the published version.
#[tokio::test(flavor = "multi_thread")]
async fn origin_controls_before_the_first_publish_block_npm_publish() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    c.setup("orig", "repo").await;
    let aws = Aws::new(&server);
    let put = |restrictions: &'static str| {
        [
            "put-package-origin-configuration",
            "--domain",
            "orig",
            "--repository",
            "repo",
            "--format",
            "npm",
            "--package",
            "p",
            "--restrictions",
            restrictions,
        ]
    };
    let blocked = json!({"publish": "BLOCK", "upstream": "ALLOW"});

    let r = aws.ok(&put("publish=BLOCK,upstream=ALLOW"));
    assert_eq!(r["originConfiguration"]["restrictions"], blocked, "{r}");

    // An invalid value fails (in the CLI or as a ValidationException) and changes nothing.
    let msg = aws.fails(&put("publish=MAYBE,upstream=ALLOW"));
    assert!(
        msg.contains("ValidationException") || msg.contains("MAYBE"),
        "{msg}"
    );
    let describe = [
        "describe-package",
        "--domain",
        "orig",
        "--repository",
        "repo",
        "--format",
        "npm",
        "--package",
        "p",
    ];
    let d = aws.ok(&describe);
    assert_eq!(d["package"]["name"], "p", "{d}");
    assert_eq!(d["package"]["format"], "npm", "{d}");
    assert_eq!(
        d["package"]["originConfiguration"]["restrictions"], blocked,
        "{d}"
    );

    let token = aws.ok(&["get-authorization-token", "--domain", "orig"])["authorizationToken"]
        .as_str()
        .expect("authorizationToken")
        .to_owned();
    let r = npm_publish(&c, &token, "orig", "repo", "p", "1.0.0").await;
    assert!(
        r.status == 409 || r.status == 403,
        "{} {}",
        r.status,
        r.text()
    );
    let error = r.json()["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("origin controls"), "{}", r.text());
    aws.refused(
        &[
            "describe-package-version",
            "--domain",
            "orig",
            "--repository",
            "repo",
            "--format",
            "npm",
            "--package",
            "p",
            "--package-version",
            "1.0.0",
        ],
        "ResourceNotFoundException",
    );

    let r = aws.ok(&put("publish=ALLOW,upstream=ALLOW"));
    assert_eq!(
        r["originConfiguration"]["restrictions"],
        json!({"publish": "ALLOW", "upstream": "ALLOW"}),
        "{r}"
    );
    let r = npm_publish(&c, &token, "orig", "repo", "p", "1.0.0").await;
    assert_eq!(r.status, 201, "{}", r.text());

    // Blocking again keeps what was published and refuses the next version.
    aws.ok(&put("publish=BLOCK,upstream=ALLOW"));
    let r = npm_publish(&c, &token, "orig", "repo", "p", "1.1.0").await;
    assert!(
        r.status == 409 || r.status == 403,
        "{} {}",
        r.status,
        r.text()
    );
    let r = c
        .raw(
            "GET",
            "/npm/orig/repo/p",
            &[("authorization", format!("Bearer {token}"))],
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let doc = r.json();
    assert_eq!(doc["dist-tags"]["latest"], "1.0.0", "{doc}");
    assert!(doc["versions"].get("1.1.0").is_none(), "{doc}");
}

/// The same for a scoped npm package (namespace `team`, npm name `@team/lib`).
#[tokio::test(flavor = "multi_thread")]
async fn origin_controls_of_a_scoped_package_block_npm_publish() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    let token = c.setup("orig", "repo").await;
    let aws = Aws::new(&server);
    let r = aws.ok(&[
        "put-package-origin-configuration",
        "--domain",
        "orig",
        "--repository",
        "repo",
        "--format",
        "npm",
        "--namespace",
        "team",
        "--package",
        "lib",
        "--restrictions",
        "publish=BLOCK,upstream=BLOCK",
    ]);
    assert_eq!(
        r["originConfiguration"]["restrictions"],
        json!({"publish": "BLOCK", "upstream": "BLOCK"}),
        "{r}"
    );
    let r = npm_publish(&c, &token, "orig", "repo", "@team/lib", "1.0.0").await;
    assert!(
        r.status == 409 || r.status == 403,
        "{} {}",
        r.status,
        r.text()
    );
    assert!(r.text().contains("origin controls"), "{}", r.text());
    // Another package of the scope is not affected.
    let r = npm_publish(&c, &token, "orig", "repo", "@team/other", "1.0.0").await;
    assert_eq!(r.status, 201, "{}", r.text());
}

/// A version an upstream repository already offers cannot be published downstream,
/// unless the downstream package blocks upstream versions (its origin controls).
#[tokio::test(flavor = "multi_thread")]
async fn publishing_a_version_an_upstream_offers_needs_upstream_blocked() {
    if !require("aws") {
        return;
    }
    let server = Server::start();
    let c = server.client();
    let token = c.setup("chain", "lib").await;
    let aws = Aws::new(&server);
    aws.ok(&[
        "create-repository",
        "--domain",
        "chain",
        "--repository",
        "app",
        "--upstreams",
        "repositoryName=lib",
    ]);
    let r = npm_publish(&c, &token, "chain", "lib", "shared", "1.0.0").await;
    assert_eq!(r.status, 201, "{}", r.text());

    let r = npm_publish(&c, &token, "chain", "app", "shared", "1.0.0").await;
    assert!(
        r.status == 409 || r.status == 403,
        "{} {}",
        r.status,
        r.text()
    );
    assert!(r.text().contains("lib"), "names the upstream: {}", r.text());

    aws.ok(&[
        "put-package-origin-configuration",
        "--domain",
        "chain",
        "--repository",
        "app",
        "--format",
        "npm",
        "--package",
        "shared",
        "--restrictions",
        "publish=ALLOW,upstream=BLOCK",
    ]);
    let r = npm_publish(&c, &token, "chain", "app", "shared", "1.0.0").await;
    assert_eq!(r.status, 201, "{}", r.text());
}

/// A repository whose external connection leads nowhere (a configured address no one
/// listens on) still takes publishes of its own packages and serves them.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_external_connection_does_not_block_publishing() {
    if !require("aws") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // A port that was just free: connections to it are refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = tmp.path().join("granary.toml");
    std::fs::write(
        &config,
        format!("[external_connections]\n\"public:npmjs\" = \"http://{closed}/\"\n"),
    )
    .unwrap();
    let server = Server::start_on(
        &tmp.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    let c = server.client();
    let token = c.setup("air", "repo").await;
    let aws = Aws::new(&server);
    let r = aws.ok(&[
        "associate-external-connection",
        "--domain",
        "air",
        "--repository",
        "repo",
        "--external-connection",
        "public:npmjs",
    ]);
    assert_eq!(
        r["repository"]["externalConnections"][0]["externalConnectionName"], "public:npmjs",
        "{r}"
    );

    let r = npm_publish(&c, &token, "air", "repo", "own-pkg", "1.0.0").await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = c
        .raw(
            "GET",
            "/npm/air/repo/own-pkg",
            &[("authorization", format!("Bearer {token}"))],
            Vec::new(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["dist-tags"]["latest"], "1.0.0", "{}", r.text());
}
