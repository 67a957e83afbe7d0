//! CreateRepository, DescribeRepository, UpdateRepository, DeleteRepository,
//! ListRepositories, ListRepositoriesInDomain, AssociateExternalConnection,
//! DisassociateExternalConnection.

use granary_format::Body;
use http::Response;
use serde_json::{Value, json};

use super::domains::parse_tags;
use super::error::field;
use super::{
    ApiError, ApiRequest, epoch, int_param, ok_json, ok_page, paginate, validate_account,
    validate_repository_name,
};
use crate::node::Node;
use crate::state::command::{Command, CommandResult};
use crate::state::model::RepositoryRecord;

fn summary(req: &ApiRequest<'_>, owner: &str, r: &RepositoryRecord) -> Value {
    let mut v = json!({
        "name": r.name,
        "administratorAccount": r.administrator,
        "domainName": r.domain,
        "domainOwner": owner,
        "arn": req.arn(owner, &format!("repository/{}/{}", r.domain, r.name)),
        "createdTime": epoch(r.created_ms),
    });
    if let Some(d) = &r.description {
        v["description"] = json!(d);
    }
    v
}

fn description(req: &ApiRequest<'_>, owner: &str, r: &RepositoryRecord) -> Value {
    let mut v = summary(req, owner, r);
    v["upstreams"] = json!(
        r.upstreams
            .iter()
            .map(|u| json!({ "repositoryName": u }))
            .collect::<Vec<_>>()
    );
    v["externalConnections"] = json!(
        r.external_connections
            .iter()
            .map(|c| json!({ "externalConnectionName": c, "packageFormat": external_format(c), "status": "Available" }))
            .collect::<Vec<_>>()
    );
    if r.description.is_none() {
        v["description"] = json!("");
    }
    v
}

fn external_format(name: &str) -> &'static str {
    match name {
        "public:npmjs" => "npm",
        "public:pypi" => "pypi",
        "public:nuget-org" => "nuget",
        "public:ruby-gems-org" => "ruby",
        "public:crates-io" => "cargo",
        _ => "maven",
    }
}

fn parse_description(body: &serde_json::Map<String, Value>) -> Result<Option<String>, ApiError> {
    match body.get("description") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(d)) if d.chars().count() <= 1000 && !d.chars().any(char::is_control) => {
            Ok(Some(d.clone()))
        }
        Some(_) => Err(field(
            "description must be a string of at most 1000 printable characters",
        )),
    }
}

fn parse_upstreams(body: &serde_json::Map<String, Value>) -> Result<Option<Vec<String>>, ApiError> {
    let Some(v) = body.get("upstreams") else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let list = v
        .as_array()
        .ok_or_else(|| field("upstreams must be a list"))?;
    if list.len() > 10 {
        return Err(field("a repository can have at most 10 direct upstreams"));
    }
    let names = list
        .iter()
        .map(|u| {
            let n = u
                .get("repositoryName")
                .and_then(Value::as_str)
                .ok_or_else(|| field("each upstream needs a repositoryName"))?;
            validate_repository_name(n)?;
            Ok(n.to_owned())
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Some(names))
}

fn repository_result(
    req: &ApiRequest<'_>,
    owner: &str,
    r: CommandResult,
) -> Result<Response<Body>, ApiError> {
    match r {
        CommandResult::Repository(r) => {
            ok_json(json!({ "repository": description(req, owner, &r) }))
        }
        CommandResult::Failed(e) => Err(e.into()),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

pub(super) async fn create(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let d = req.domain()?;
    let name = req.required("repository")?;
    validate_repository_name(name)?;
    let body = req.json()?;
    let record = RepositoryRecord {
        domain: d.name.clone(),
        name: name.to_owned(),
        administrator: req.caller.account.clone(),
        description: parse_description(&body)?,
        upstreams: parse_upstreams(&body)?.unwrap_or_default(),
        external_connections: Vec::new(),
        created_ms: Node::now_ms(),
        tags: parse_tags(&body)?,
    };
    let r = req.node.propose(Command::CreateRepository(record)).await?;
    repository_result(req, &d.owner, r)
}

pub(super) fn describe(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    ok_json(json!({ "repository": description(req, &d.owner, &r) }))
}

pub(super) async fn update(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    let body = req.json()?;
    let cmd = Command::UpdateRepository {
        domain: d.name.clone(),
        name: r.name.clone(),
        description: parse_description(&body)?,
        upstreams: parse_upstreams(&body)?,
    };
    let r = req.node.propose(cmd).await?;
    repository_result(req, &d.owner, r)
}

/// The connection named in `external-connection`, if this node knows where it leads.
fn connection_param<'a>(req: &'a ApiRequest<'_>) -> Result<&'a str, ApiError> {
    let c = req.required("external-connection")?;
    if req.node.config.external_connection_url(c).is_none() {
        return Err(ApiError::Validation {
            message: format!(
                "{c} is not an external connection this server knows (configure it under \
                 [external_connections])"
            ),
            reason: "INVALID_PARAMETER",
        });
    }
    Ok(c)
}

pub(super) async fn associate_external_connection(
    req: &ApiRequest<'_>,
) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    let connection = connection_param(req)?;
    let cmd = Command::AssociateExternalConnection {
        domain: d.name.clone(),
        repository: r.name.clone(),
        connection: connection.to_owned(),
    };
    let r = req.node.propose(cmd).await?;
    repository_result(req, &d.owner, r)
}

pub(super) async fn disassociate_external_connection(
    req: &ApiRequest<'_>,
) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    let connection = req.required("external-connection")?;
    let cmd = Command::DisassociateExternalConnection {
        domain: d.name.clone(),
        repository: r.name.clone(),
        connection: connection.to_owned(),
    };
    let r = req.node.propose(cmd).await?;
    repository_result(req, &d.owner, r)
}

pub(super) async fn delete(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let (d, r) = req.repository()?;
    let cmd = Command::DeleteRepository {
        domain: d.name.clone(),
        name: r.name.clone(),
    };
    let r = req.node.propose(cmd).await?;
    repository_result(req, &d.owner, r)
}

fn listing(
    req: &ApiRequest<'_>,
    repos: Vec<(String, RepositoryRecord)>,
) -> Result<Response<Body>, ApiError> {
    let prefix = req.q("repository-prefix");
    if let Some(p) = prefix
        && (p.is_empty() || p.len() > 100)
    {
        return Err(field("repositoryPrefix must be 1-100 characters"));
    }
    let filtered: Vec<_> = repos
        .into_iter()
        .filter(|(_, r)| prefix.is_none_or(|p| r.name.starts_with(p)))
        .collect();
    let (page, next) = paginate(
        filtered,
        int_param(req, "max-results")?,
        req.q("next-token"),
        1000,
    )?;
    let list: Vec<Value> = page
        .iter()
        .map(|(owner, r)| summary(req, owner, r))
        .collect();
    let out = json!({ "repositories": list });
    ok_page(out, next)
}

pub(super) fn list(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let state = &req.node.state;
    let mut repos = Vec::new();
    for d in state.domains()? {
        if d.owner != req.caller.account {
            continue;
        }
        for r in state.repositories(Some(&d.name))? {
            repos.push((d.owner.clone(), r));
        }
    }
    listing(req, repos)
}

pub(super) fn list_in_domain(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let d = req.domain()?;
    let admin = req.q("administrator-account");
    if let Some(a) = admin {
        validate_account(a, "administratorAccount")?;
    }
    let repos = req
        .node
        .state
        .repositories(Some(&d.name))?
        .into_iter()
        .filter(|r| admin.is_none_or(|a| r.administrator == a))
        .map(|r| (d.owner.clone(), r))
        .collect();
    listing(req, repos)
}
