//! `granary cluster …`: the operator's commands, calling a node's admin API with SigV4
//! (credentials from the AWS environment or shared credentials file, as the AWS CLI finds
//! them).

use std::path::PathBuf;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::auth::sigv4;

/// Cluster membership and status, for operators.
#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Show the leader and every member (id, addresses, region, role, applied index).
    Status {
        /// Where to send it.
        #[command(flatten)]
        target: Target,
        /// `text` (a table) or `json`.
        #[arg(long, default_value = "text")]
        output: Output,
    },
    /// Add a running node as a learner; it is promoted once caught up unless `--learner`.
    AddNode {
        /// Where to send it.
        #[command(flatten)]
        target: Target,
        /// The new node's id (unique in the cluster).
        #[arg(long)]
        node_id: u64,
        /// Its gRPC address (`host:port`), as peers reach it.
        #[arg(long, value_name = "ADDR")]
        grpc: String,
        /// Its HTTP address.
        #[arg(long, value_name = "ADDR", default_value = "")]
        http: String,
        /// Its region label.
        #[arg(long)]
        region: Option<String>,
        /// Keep it a learner.
        #[arg(long)]
        learner: bool,
    },
    /// Make a learner a voter.
    Promote {
        /// Where to send it.
        #[command(flatten)]
        target: Target,
        /// The node to promote.
        #[arg(long)]
        node_id: u64,
    },
    /// Remove a voter or learner from the cluster.
    RemoveNode {
        /// Where to send it.
        #[command(flatten)]
        target: Target,
        /// The node to remove.
        #[arg(long)]
        node_id: u64,
    },
}

/// Where to send the command.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// Any node's HTTP URL (or the load balancer's), e.g. `http://127.0.0.1:8080`.
    #[arg(long, value_name = "URL")]
    endpoint: String,
    /// The region requests are signed for (default: AWS_REGION, AWS_DEFAULT_REGION, or
    /// `us-east-1`).
    #[arg(long)]
    aws_region: Option<String>,
}

/// How `status` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Output {
    /// A table.
    Text,
    /// The JSON document.
    Json,
}

/// Runs one cluster command, printing its result on stdout.
pub async fn run_cluster_command(cmd: ClusterCommand) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::Status { target, output } => {
            let status = call(&target, "GET", "/admin/v1/cluster/status", None).await?;
            print_status(&status, output)
        }
        ClusterCommand::AddNode {
            target,
            node_id,
            grpc,
            http,
            region,
            learner,
        } => {
            let body = json!({"nodeId": node_id, "grpcAddr": grpc, "httpAddr": http,
                              "region": region, "learner": learner});
            let status = call(&target, "POST", "/admin/v1/cluster/add-node", Some(body)).await?;
            print_status(&status, Output::Text)
        }
        ClusterCommand::Promote { target, node_id } => {
            let body = json!({ "nodeId": node_id });
            let status = call(&target, "POST", "/admin/v1/cluster/promote", Some(body)).await?;
            print_status(&status, Output::Text)
        }
        ClusterCommand::RemoveNode { target, node_id } => {
            let body = json!({ "nodeId": node_id });
            let status = call(&target, "POST", "/admin/v1/cluster/remove-node", Some(body)).await?;
            print_status(&status, Output::Text)
        }
    }
}

fn print_status(status: &Value, output: Output) -> anyhow::Result<()> {
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(status)?);
        return Ok(());
    }
    let leader = status["leaderId"].as_u64();
    println!(
        "leader: {}   term: {}",
        leader.map_or("none".to_owned(), |l| l.to_string()),
        status["term"]
    );
    println!(
        "{:>6}  {:<8} {:<22} {:<22} {:<12} {:>10}",
        "node", "role", "grpc", "http", "region", "applied"
    );
    for m in status["members"].as_array().into_iter().flatten() {
        let id = m["nodeId"].as_u64().unwrap_or(0);
        let role = m["role"].as_str().unwrap_or("");
        let mark = if Some(id) == leader { "*" } else { "" };
        println!(
            "{:>6}  {:<8} {:<22} {:<22} {:<12} {:>10}",
            format!("{mark}{id}"),
            role,
            m["grpcAddr"].as_str().unwrap_or(""),
            m["httpAddr"].as_str().unwrap_or(""),
            m["region"].as_str().unwrap_or(""),
            m["appliedIndex"]
                .as_u64()
                .map_or("-".to_owned(), |i| i.to_string()),
        );
    }
    Ok(())
}

/// AWS credentials as the AWS CLI finds them: the environment, then the shared
/// credentials file's profile (`AWS_PROFILE`, default `default`).
fn credentials() -> anyhow::Result<(String, String)> {
    if let (Ok(id), Ok(secret)) = (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) && !id.is_empty()
    {
        return Ok((id, secret));
    }
    let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".aws/credentials")))
        .context("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no AWS credentials in the environment and cannot read {}",
            path.display()
        )
    })?;
    let (mut id, mut secret, mut in_profile) = (None, None, false);
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = name.trim() == profile;
        } else if in_profile && let Some((k, v)) = line.split_once('=') {
            match k.trim() {
                "aws_access_key_id" => id = Some(v.trim().to_owned()),
                "aws_secret_access_key" => secret = Some(v.trim().to_owned()),
                _ => {}
            }
        }
    }
    match (id, secret) {
        (Some(i), Some(s)) => Ok((i, s)),
        _ => bail!("profile {profile} in {} has no access key", path.display()),
    }
}

async fn call(
    target: &Target,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (key_id, secret) = credentials()?;
    let region = target
        .aws_region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok())
        .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
        .unwrap_or_else(|| "us-east-1".into());
    let base = target.endpoint.trim_end_matches('/');
    let uri: http::Uri = format!("{base}{path}")
        .parse()
        .with_context(|| format!("invalid --endpoint {:?}", target.endpoint))?;
    if uri.scheme_str() != Some("http") {
        bail!("--endpoint must be an http:// URL");
    }
    let host = uri
        .authority()
        .context("--endpoint has no host")?
        .as_str()
        .to_owned();
    let bytes = match &body {
        Some(v) => serde_json::to_vec(v)?,
        None => Vec::new(),
    };
    let payload = hex::encode(Sha256::digest(&bytes));
    let method: http::Method = method.parse()?;
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::HOST, host.parse()?);
    headers.insert(
        "x-amz-date",
        sigv4::format_amz_date(time::OffsetDateTime::now_utc()).parse()?,
    );
    headers.insert("x-amz-content-sha256", payload.parse()?);
    if body.is_some() {
        headers.insert(http::header::CONTENT_TYPE, "application/json".parse()?);
    }
    let authorization = sigv4::sign(
        &sigv4::SignedRequest {
            method: &method,
            path: uri.path(),
            query: uri.query(),
            headers: &headers,
            payload_sha256: &payload,
        },
        &sigv4::SigningParams {
            access_key_id: &key_id,
            secret: &secret,
            region: &region,
            service: "codeartifact",
        },
    )
    .map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    let mut req = http::Request::builder().method(method).uri(uri.clone());
    for (k, v) in &headers {
        req = req.header(k, v);
    }
    let req = req
        .header(http::header::AUTHORIZATION, authorization)
        .body(Full::new(Bytes::from(bytes)))?;
    let client = Client::builder(TokioExecutor::new()).build_http();
    let resp = client
        .request(req)
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| json!({ "message": String::from_utf8_lossy(&body).into_owned() }));
    if !status.is_success() {
        let message = value["message"]
            .as_str()
            .or_else(|| value["Message"].as_str())
            .unwrap_or("");
        bail!("{status}: {message}");
    }
    Ok(value)
}
