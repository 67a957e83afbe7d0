//! CreateDomain, DescribeDomain, DeleteDomain, ListDomains.

use granary_format::Body;
use http::Response;
use serde_json::{Value, json};

use super::error::field;
use super::{ApiError, ApiRequest, epoch, ok_json, ok_page, paginate, validate_domain_name};
use crate::node::Node;
use crate::state::command::{Command, CommandResult};
use crate::state::model::{DomainRecord, Tag};

pub(super) fn parse_tags(body: &serde_json::Map<String, Value>) -> Result<Vec<Tag>, ApiError> {
    let Some(tags) = body.get("tags") else {
        return Ok(Vec::new());
    };
    let list = tags
        .as_array()
        .ok_or_else(|| field("tags must be a list"))?;
    if list.len() > 200 {
        return Err(field("at most 200 tags are allowed"));
    }
    list.iter()
        .map(|t| {
            let key = t
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| field("each tag needs a key"))?;
            let value = t
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| field("each tag needs a value"))?;
            if key.is_empty() || key.chars().count() > 128 || value.chars().count() > 256 {
                return Err(field("tag keys are 1-128 characters and values 0-256"));
            }
            Ok(Tag {
                key: key.to_owned(),
                value: value.to_owned(),
            })
        })
        .collect()
}

fn description(req: &ApiRequest<'_>, d: &DomainRecord, full: bool) -> Result<Value, ApiError> {
    let mut v = json!({
        "name": d.name,
        "owner": d.owner,
        "arn": req.arn(&d.owner, &format!("domain/{}", d.name)),
        "status": "Active",
        "createdTime": epoch(d.created_ms),
        "encryptionKey": d.encryption_key,
    });
    if full {
        let repos = req.node.state.repositories(Some(&d.name))?.len();
        v["repositoryCount"] = json!(repos);
        v["assetSizeBytes"] = json!(0);
    }
    Ok(v)
}

pub(super) async fn create(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let name = req.required("domain")?;
    validate_domain_name(name)?;
    let body = req.json()?;
    let tags = parse_tags(&body)?;
    let account = req.caller.account.clone();
    let encryption_key = match body.get("encryptionKey") {
        None | Some(Value::Null) => format!(
            "arn:aws:kms:{}:{account}:alias/aws/codeartifact",
            req.node.config.aws_region
        ),
        Some(Value::String(k)) if (1..=1011).contains(&k.len()) => k.clone(),
        Some(_) => {
            return Err(field(
                "encryptionKey must be a key ARN of 1-1011 characters",
            ));
        }
    };
    let record = DomainRecord {
        name: name.to_owned(),
        owner: account,
        created_ms: Node::now_ms(),
        encryption_key,
        tags,
    };
    match req.node.propose(Command::CreateDomain(record)).await? {
        CommandResult::Domain(d) => ok_json(json!({ "domain": description(req, &d, true)? })),
        CommandResult::Failed(e) => Err(e.into()),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

pub(super) async fn describe(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let d = req.domain()?;
    let mut v = description(req, &d, true)?;
    // A read of every version in the domain: off the runtime's workers.
    let (state, name) = (req.node.state.clone(), d.name.clone());
    let bytes = tokio::task::spawn_blocking(move || state.domain_asset_bytes(&name))
        .await
        .map_err(|e| ApiError::Internal(format!("reading the domain's assets: {e}")))??;
    v["assetSizeBytes"] = json!(bytes);
    ok_json(json!({ "domain": v }))
}

pub(super) async fn delete(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let d = req.domain()?;
    match req
        .node
        .propose(Command::DeleteDomain {
            name: d.name.clone(),
        })
        .await?
    {
        CommandResult::Domain(d) => {
            let mut v = description(req, &d, false)?;
            v["status"] = json!("Deleted");
            ok_json(json!({ "domain": v }))
        }
        CommandResult::Failed(e) => Err(e.into()),
        other => Err(ApiError::Internal(format!("unexpected result {other:?}"))),
    }
}

pub(super) fn list(req: &ApiRequest<'_>) -> Result<Response<Body>, ApiError> {
    let body = req.json()?;
    let max = match body.get("maxResults") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| field("maxResults must be an integer"))?,
        ),
    };
    let token = match body.get("nextToken") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| field("nextToken must be a string"))?,
        ),
    };
    let mine: Vec<DomainRecord> = req
        .node
        .state
        .domains()?
        .into_iter()
        .filter(|d| d.owner == req.caller.account)
        .collect();
    let (page, next) = paginate(mine, max, token, 1000)?;
    let domains = page
        .iter()
        .map(|d| description(req, d, false))
        .collect::<Result<Vec<_>, _>>()?;
    let out = json!({ "domains": domains });
    ok_page(out, next)
}
